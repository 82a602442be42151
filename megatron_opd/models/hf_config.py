"""Read a Hugging Face `config.json` into `ModelArch`: the architecture facts megatron needs, with the
family-specific differences (QKV bias, QK-norm, head_dim, rope scaling, sliding window, experts) made explicit."""
import json
import os
from dataclasses import dataclass, field
from typing import Optional

# HF `architectures[0]` -> family. The family decides biases and norms; the rest comes from config.json.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}
QKV_BIAS_FAMILIES = ("qwen2", "qwen2_moe")
QK_NORM_FAMILIES = ("qwen3", "qwen3_moe")
WINDOW_FAMILIES = ("mistral", "mixtral")  # one sliding window on every layer


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass(frozen=True)
class Llama3RopeScaling:
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class MoEArch:
    """The mixture-of-experts part of a decoder: which layers route, and how."""
    num_experts: int
    top_k: int
    ffn_hidden_size: int  # one expert's
    norm_topk_prob: bool  # the k chosen probabilities renormalised to sum to 1
    moe_layers: tuple[bool, ...]  # per layer: experts (True) or the dense MLP of `intermediate_size`
    shared_expert_size: Optional[int] = None
    shared_expert_gated: bool = False  # its output scaled by sigmoid(x . gate)
    router_aux_loss_coef: float = 0.0


@dataclass(frozen=True)
class ModelArch:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    initializer_range: float = 0.02
    rope_scaling: Optional[Llama3RopeScaling] = None
    sliding_window: Optional[int] = None
    torch_dtype: str = "float32"
    moe: Optional[MoEArch] = None
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)


def _rope(cfg: dict, source: str) -> tuple[float, Optional[Llama3RopeScaling]]:
    # transformers >= 5 writes `rope_parameters`; older checkpoints have `rope_theta` + `rope_scaling`.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or params
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise UnsupportedArchitectureError(
            f"{source}: rope scaling type {rope_type!r} is not supported; supported: default, llama3")
    return theta, Llama3RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)))


def _sliding_window(cfg: dict, family: str) -> Optional[int]:
    if family in WINDOW_FAMILIES:
        return cfg.get("sliding_window")
    if family.startswith("qwen") and cfg.get("use_sliding_window"):
        raise UnsupportedArchitectureError(
            f"{family} with use_sliding_window=true (per-layer windows) is not supported")
    return None


def _moe(cfg: dict, family: str, num_layers: int, source: str) -> Optional[MoEArch]:
    if family not in ("qwen3_moe", "mixtral", "qwen2_moe"):
        return None
    # Qwen's config.json says num_experts, Mixtral's num_local_experts (transformers maps one to the other).
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    top_k = int(cfg["num_experts_per_tok"])
    if experts < 1 or not 1 <= top_k <= experts:
        raise ValueError(f"{source}: {experts} experts with num_experts_per_tok={top_k}; need 1 <= top-k <= experts")
    if family == "mixtral":  # every layer routes, the top-k always renormalised, no shared expert
        return MoEArch(experts, top_k, int(cfg["intermediate_size"]), True, (True,) * num_layers,
                       router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.001)))
    step, dense = int(cfg.get("decoder_sparse_step") or 1), set(cfg.get("mlp_only_layers") or ())
    norm = bool(cfg.get("norm_topk_prob", False))
    if norm and top_k == 1:  # megatron's softmax over one chosen logit has no gradient, and it refuses it
        raise UnsupportedArchitectureError(f"{source}: num_experts_per_tok=1 with norm_topk_prob=true is not supported")
    shared = int(cfg.get("shared_expert_intermediate_size") or 0) if family == "qwen2_moe" else 0
    return MoEArch(
        experts, top_k, int(cfg["moe_intermediate_size"]), norm,
        tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers)),
        shared_expert_size=shared or None, shared_expert_gated=bool(shared),
        router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.001)))


def arch_from_dict(cfg: dict, source: str = "config.json") -> ModelArch:
    archs = cfg.get("architectures") or []
    name = archs[0] if archs else None
    if name not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{source}: architecture {name!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    family = SUPPORTED_ARCHITECTURES[name]
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            # megatron adds biases to all linear layers or none (besides QKV); HF's flags add o_proj/MLP ones.
            raise UnsupportedArchitectureError(f"{source}: {name} with {flag}=true is not supported")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        theta, scaling = _rope(cfg, source)
        return ModelArch(
            architecture=name, family=family, vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]), num_layers=layers,
            num_attention_heads=heads, num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta, max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family in QKV_BIAS_FAMILIES and bool(cfg.get("qkv_bias", True)),
            qk_norm=family in QK_NORM_FAMILIES, initializer_range=float(cfg.get("initializer_range", 0.02)),
            rope_scaling=scaling, sliding_window=_sliding_window(cfg, family),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            moe=_moe(cfg, family, layers, source), hf_config=cfg)
    except KeyError as missing:
        raise ValueError(f"{source}: missing key {missing} needed for {name}") from None


def load_arch(path: str) -> ModelArch:
    """`path` is a model directory holding config.json, or the config.json itself."""
    config_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: no config.json; point model paths at an HF model directory")
    try:
        with open(config_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from None
    return arch_from_dict(cfg, source=config_path)

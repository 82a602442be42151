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
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
QKV_BIAS_FAMILIES = ("qwen2", "qwen2_moe")
QK_NORM_FAMILIES = ("qwen3", "qwen3_moe", "deepseek_v3")  # deepseek_v3: RMSNorm on the q and kv latents
WINDOW_FAMILIES = ("mistral", "mixtral")  # one sliding window on every layer
MLA_FAMILIES = ("deepseek_v3",)


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass(frozen=True)
class Llama3RopeScaling:
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class YarnRopeScaling:
    """YaRN as transformers computes it (megatron's MLA implements the same formulas)."""
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0  # with mscale_all_dim: cos/sin scaled by mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    mscale_all_dim: float = 0.0  # softmax scale times mscale(factor, mscale_all_dim)^2


@dataclass(frozen=True)
class MLAArch:
    """Multi-latent attention (DeepSeek-V3): q and kv pass through low-rank latents; only `qk_rope_head_dim`
    of each query/key head is rotated."""
    q_lora_rank: Optional[int]  # None: q projected directly from the hidden state
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


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
    # DeepSeek-V3 routing: sigmoid scores; experts chosen by score + a per-expert bias within the best
    # `group_topk` of `num_groups` groups; the chosen (unbiased) scores renormalised, times `scaling_factor`.
    score_function: str = "softmax"
    expert_bias: bool = False
    num_groups: Optional[int] = None
    group_topk: Optional[int] = None
    scaling_factor: Optional[float] = None


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
    rope_scaling: Optional[Llama3RopeScaling | YarnRopeScaling] = None
    sliding_window: Optional[int] = None
    torch_dtype: str = "float32"
    moe: Optional[MoEArch] = None
    mla: Optional[MLAArch] = None
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)


def _rope(cfg: dict, source: str, family: str) -> tuple[float, Optional[Llama3RopeScaling | YarnRopeScaling]]:
    # transformers >= 5 writes `rope_parameters`; older checkpoints have `rope_theta` + `rope_scaling`.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or params
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type in (None, "default"):
        return theta, None
    if rope_type == "yarn" and family in MLA_FAMILIES:  # megatron implements YaRN inside MLA only
        return theta, _yarn(scaling, cfg, source)
    if rope_type != "llama3":
        raise UnsupportedArchitectureError(
            f"{source}: rope scaling type {rope_type!r} is not supported; supported: default, llama3")
    return theta, Llama3RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)))


def _yarn(scaling: dict, cfg: dict, source: str) -> YarnRopeScaling:
    for key, refused in (("attention_factor", lambda v: v is not None), ("truncate", lambda v: v is False)):
        if refused(scaling.get(key)):
            raise UnsupportedArchitectureError(f"{source}: yarn rope scaling with {key}={scaling[key]} is not supported")
    mscale, all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if all_dim and not mscale:
        # transformers then scales cos/sin by mscale(factor) but the softmax by mscale(factor, all_dim)^2;
        # megatron derives both from one (mscale, mscale_all_dim) pair.
        raise UnsupportedArchitectureError(f"{source}: yarn rope scaling with mscale_all_dim but no mscale")
    original = int(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor") or int(cfg["max_position_embeddings"]) / original  # transformers' default
    # Without mscale_all_dim transformers ignores mscale: megatron's (1, 0) gives the same factors.
    return YarnRopeScaling(
        factor=float(factor), original_max_position_embeddings=original,
        beta_fast=float(scaling.get("beta_fast") or 32), beta_slow=float(scaling.get("beta_slow") or 1),
        mscale=float(mscale) if all_dim else 1.0, mscale_all_dim=float(all_dim or 0.0))


def _sliding_window(cfg: dict, family: str) -> Optional[int]:
    if family in WINDOW_FAMILIES:
        return cfg.get("sliding_window")
    if family.startswith("qwen") and cfg.get("use_sliding_window"):
        raise UnsupportedArchitectureError(
            f"{family} with use_sliding_window=true (per-layer windows) is not supported")
    return None


def _moe(cfg: dict, family: str, num_layers: int, source: str) -> Optional[MoEArch]:
    if family == "deepseek_v3":
        return _deepseek_moe(cfg, num_layers, source)
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


def _deepseek_moe(cfg: dict, num_layers: int, source: str) -> MoEArch:
    experts, top_k = int(cfg["n_routed_experts"]), int(cfg["num_experts_per_tok"])
    groups, group_topk = int(cfg.get("n_group") or 1), int(cfg.get("topk_group") or 1)
    if experts % groups or not 1 <= group_topk <= groups or not 1 <= top_k <= experts // groups * group_topk:
        raise ValueError(f"{source}: {experts} experts in n_group={groups}, topk_group={group_topk}, "
                         f"num_experts_per_tok={top_k}: the chosen groups must hold the top-k experts")
    if top_k == 1 or not cfg.get("norm_topk_prob", True):
        # megatron's sigmoid router renormalises the chosen scores iff top-k > 1 (moe_utils.py,
        # topk_routing_with_score_function); transformers iff norm_topk_prob.
        raise UnsupportedArchitectureError(f"{source}: num_experts_per_tok={top_k} with norm_topk_prob="
                                           f"{cfg.get('norm_topk_prob', True)} is not supported (need k > 1, true)")
    if groups > 1 and top_k // group_topk != 2:
        # transformers ranks groups by their 2 best scores, megatron by their top-k/topk_group best
        # (moe_utils.py, group_limited_topk): the same iff top-k = 2 x topk_group, as in DeepSeek-V3.
        raise UnsupportedArchitectureError(f"{source}: num_experts_per_tok={top_k} with topk_group={group_topk} "
                                           f"is not supported (megatron needs num_experts_per_tok = 2 x topk_group)")
    shared = int(cfg.get("n_shared_experts") or 0) * int(cfg["moe_intermediate_size"])
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    return MoEArch(
        experts, top_k, int(cfg["moe_intermediate_size"]), True, tuple(i >= first_dense for i in range(num_layers)),
        shared_expert_size=shared or None, router_aux_loss_coef=float(cfg.get("aux_loss_alpha", 0.0)),
        score_function="sigmoid", expert_bias=True, num_groups=groups if groups > 1 else None,
        group_topk=group_topk if groups > 1 else None, scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)))


def _mla(cfg: dict, family: str, source: str) -> Optional[MLAArch]:
    if family not in MLA_FAMILIES:
        return None
    if cfg.get("quantization_config"):  # DeepSeek-V3/R1 and Kimi K2 are released in block-wise FP8
        raise UnsupportedArchitectureError(f"{source}: {family} with quantization_config "
                                           f"({cfg['quantization_config'].get('quant_method')}) is not supported; "
                                           f"dequantize the checkpoint to bfloat16 first")
    if cfg.get("rope_interleave", True) is False:
        # megatron's MLA always rotates the rope dims as interleaved pairs (multi_latent_attention.py,
        # apply_rotary_pos_emb(..., mla_rotary_interleaved=True)).
        raise UnsupportedArchitectureError(f"{source}: {family} with rope_interleave=false is not supported")
    heads = int(cfg["num_attention_heads"])
    if int(cfg.get("num_key_value_heads") or heads) != heads:
        raise UnsupportedArchitectureError(f"{source}: {family} with num_key_value_heads={cfg['num_key_value_heads']}"
                                           f" != num_attention_heads={heads} is not supported (MLA: one kv head each)")
    q_lora = cfg.get("q_lora_rank")
    return MLAArch(q_lora_rank=int(q_lora) if q_lora else None, kv_lora_rank=int(cfg["kv_lora_rank"]),
                   qk_nope_head_dim=int(cfg["qk_nope_head_dim"]), qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
                   v_head_dim=int(cfg["v_head_dim"]))


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
        theta, scaling = _rope(cfg, source, family)
        mla = _mla(cfg, family, source)
        return ModelArch(
            architecture=name, family=family, vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]), num_layers=layers,
            num_attention_heads=heads, num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim if mla else int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta, max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family in QKV_BIAS_FAMILIES and bool(cfg.get("qkv_bias", True)),
            qk_norm=family in QK_NORM_FAMILIES, initializer_range=float(cfg.get("initializer_range", 0.02)),
            rope_scaling=scaling, sliding_window=_sliding_window(cfg, family),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            moe=_moe(cfg, family, layers, source), mla=mla, hf_config=cfg)
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

"""Read a Hugging Face `config.json` into `ModelArch`: the architecture facts megatron needs, with the
family-specific differences (QKV bias, QK-norm, head_dim, rope scaling, sliding window) made explicit."""
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
}


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass(frozen=True)
class Llama3RopeScaling:
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


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
    if family == "mistral":
        return cfg.get("sliding_window")
    if family in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        raise UnsupportedArchitectureError(
            f"{family} with use_sliding_window=true (per-layer windows) is not supported")
    return None


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
        theta, scaling = _rope(cfg, source)
        return ModelArch(
            architecture=name, family=family, vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads, num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta, max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2",
            qk_norm=family == "qwen3", initializer_range=float(cfg.get("initializer_range", 0.02)),
            rope_scaling=scaling, sliding_window=_sliding_window(cfg, family),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"), hf_config=cfg)
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

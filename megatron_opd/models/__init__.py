"""HF config -> megatron-core GPTModel for a parallel layout; tiny local checkpoints; sharded checkpoint I/O."""
from megatron_opd.models.builder import RouterLoss, build_model, padded_vocab_size, transformer_config
from megatron_opd.models.hf_config import (
    SUPPORTED_ARCHITECTURES, ModelArch, UnsupportedArchitectureError, arch_from_dict, load_arch)

__all__ = ["ModelArch", "RouterLoss", "SUPPORTED_ARCHITECTURES", "UnsupportedArchitectureError", "arch_from_dict",
           "build_model", "load_arch", "padded_vocab_size", "transformer_config"]

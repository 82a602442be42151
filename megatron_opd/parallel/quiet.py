"""Silence messages that megatron-core and torch print on every run of this project and that say nothing
actionable here. Call before importing megatron.

- CPU runs: TE/apex fallbacks, CUDA stream hints, "No CUDA runtime is found".
- torch deprecations of APIs that megatron 0.19 still calls (collectives' names, DCP's ShardedTensor,
  DCP's load argument order), TransformerConfig's default CUDA-graph scope, and the experimental notice of
  megatron's MIMO config class (imported with megatron.core, never used here).
- DDP's note that it computes the distributed optimizer's parameter layout itself (the documented fallback).
- GPTModel's deprecation banner: GPTModel with the local/TE layer specs is the documented path in 0.19.
- the async-save deprecation: checkpoints here are saved synchronously.
- megatron's INFO lines (Hydra turns INFO on: they dump every optimizer field each run) and transformers'
  weight-loading progress bars (one per engine start and weight sync).
"""
import logging
import re
import warnings

_KNOWN_WARNINGS = (
    "Transformer Engine and Apex are not installed", "Apex is not installed", "absl.logging is not installed",
    "CUDA_DEVICE_MAX_CONNECTIONS", "all_gather_into_tensor` is deprecated", "deprecating ShardedTensor",
    "argument order of load has been changed", "assuming the intent is to load in a single process",
    "full scope is deprecated", "reduce_scatter_tensor` is deprecated", "MimoModelConfig is experimental",
)
_KNOWN_LOGGERS = ("megatron.core.models.gpt.gpt_model", "megatron.core.dist_checkpointing.strategies.torch",
                  "megatron.core.distributed.distributed_data_parallel", "torch.utils.cpp_extension")


def quiet_known_messages() -> None:
    pattern = ".*(" + "|".join(re.escape(phrase) for phrase in _KNOWN_WARNINGS) + ").*"
    warnings.filterwarnings("ignore", message=pattern)
    for name in _KNOWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    transformers_logging.disable_progress_bar()

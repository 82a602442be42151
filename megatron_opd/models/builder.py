"""Build megatron-core `GPTModel` chunks for a `ModelArch` under the current parallel state."""
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_opd.models.cp_attention import ContextParallelAttention
from megatron_opd.models.hf_config import ModelArch
from megatron_opd.parallel import ParallelConfig, current_device, transformer_engine_available

VOCAB_PAD_MULTIPLE = 128
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
RECOMPUTE = ("none", "selective", "full")


def padded_vocab_size(vocab_size: int, tensor_parallel: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Megatron's padding: rows up to a multiple of `multiple * TP` so every TP shard is equal and aligned."""
    step = multiple * tensor_parallel
    return -(-vocab_size // step) * step


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def transformer_config(arch: ModelArch, parallel: ParallelConfig, dtype="float32", recompute: str = "none",
                       init_weights: bool = True, device: Optional[torch.device] = None):
    from megatron.core.transformer.transformer_config import TransformerConfig

    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r}; use one of {RECOMPUTE}")
    params_dtype = resolve_dtype(dtype)
    device = device or current_device()
    extra = {}
    if recompute == "full":
        extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        extra = dict(recompute_granularity="selective")
    if arch.sliding_window:
        extra["window_size"] = (arch.sliding_window - 1, 0)  # HF: key j visible from query i iff i-W < j <= i
    return TransformerConfig(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim, normalization="RMSNorm", layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=arch.initializer_range, params_dtype=params_dtype, pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16, use_cpu_initialization=device.type == "cpu",
        perform_initialization=init_weights,
        tensor_model_parallel_size=parallel.tensor, pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        context_parallel_size=parallel.context, sequence_parallel=parallel.sequence_parallel,
        cp_comm_type=parallel.cp_comm_type if parallel.context > 1 else None,
        # Interleaved schedules on gloo mix up micro-batches with batched isend/irecv (see the reference
        # notes); Megatron-LM also disables it whenever p2p overlap is on.
        batch_p2p_comm=parallel.virtual_pipeline is None,
        bias_activation_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        **extra)


def layer_spec(arch: ModelArch, parallel: ParallelConfig, use_te: bool):
    """Transformer Engine's spec on GPUs that have it; otherwise megatron's local spec, with the all-gather
    CP attention in place of its core attention when the layout is context-parallel."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec)

    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    spec = get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")
    if parallel.context > 1:
        spec.submodules.self_attention.submodules.core_attention = ContextParallelAttention
    return spec


def _llama3_inv_freq(rotary, arch: ModelArch) -> torch.Tensor:
    # Megatron's rope_scaling hard-codes low/high freq factors 1/4 and an 8192 context; recompute
    # with the checkpoint's own values so any llama3-style config is exact.
    scaling = arch.rope_scaling
    dim = arch.head_dim
    steps = torch.arange(0, dim, 2, dtype=torch.float32, device=rotary.inv_freq.device)
    return rotary._apply_scaling(
        1.0 / (arch.rope_theta ** (steps / dim)), factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
        high_freq_factor=scaling.high_freq_factor,
        original_max_position_embeddings=scaling.original_max_position_embeddings)


def build_model(arch: ModelArch, parallel: ParallelConfig, dtype="float32", recompute: str = "none",
                use_te: Optional[bool] = None, init_weights: bool = True, device: Optional[torch.device] = None,
                pg_collection=None) -> list:
    """One GPTModel per virtual pipeline stage held by this rank (a list of one without VPP), on `device`
    (default: the one the process group runs on). The model's groups are `pg_collection` (megatron's
    ProcessGroupCollection for `parallel`, e.g. a teacher in a layout of its own) or, by default, megatron's
    global parallel state, which must then be initialised for `parallel`. `use_te` defaults to Transformer
    Engine when it imports and the device is a GPU. `init_weights=False` skips the random init (seconds on
    CPU) when a checkpoint is about to overwrite every weight."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    device = device or current_device()
    parallel.check_model(arch.num_attention_heads, arch.num_key_value_heads, arch.num_layers)
    config = transformer_config(arch, parallel, dtype, recompute, init_weights, device)
    if use_te is None:
        use_te = device.type == "cuda" and transformer_engine_available()
    spec = layer_spec(arch, parallel, use_te)
    vocab = padded_vocab_size(arch.vocab_size, parallel.tensor)
    chunks = []
    for vp_stage in range(parallel.virtual_stages):
        vp = vp_stage if parallel.virtual_pipeline else None
        if pg_collection is None:
            first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp)
            last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp)
        else:
            first, last = pg_collection.pp.rank() == 0, pg_collection.pp.rank() == parallel.pipeline - 1
        model = GPTModel(
            config=config, transformer_layer_spec=spec, vocab_size=vocab,
            max_sequence_length=arch.max_position_embeddings, position_embedding_type="rope",
            rotary_base=arch.rope_theta, share_embeddings_and_output_weights=arch.tie_word_embeddings,
            rope_scaling=arch.rope_scaling is not None,
            rope_scaling_factor=arch.rope_scaling.factor if arch.rope_scaling else 8.0,
            pre_process=first, post_process=last, vp_stage=vp, pg_collection=pg_collection)
        if arch.rope_scaling is not None and hasattr(model, "rotary_pos_emb"):
            model.rotary_pos_emb.inv_freq = _llama3_inv_freq(model.rotary_pos_emb, arch)
        # Norm weights are created in fp32 whatever params_dtype says; one dtype for the whole chunk.
        model.to(device=device, dtype=config.params_dtype)
        chunks.append(model)
    return chunks

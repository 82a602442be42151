"""Build megatron-core `GPTModel` chunks for a `ModelArch` under the current parallel state."""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_opd.models.cp_attention import ContextParallelAttention
from megatron_opd.models.deepseek import mla_fields, sigmoid_router_fields
from megatron_opd.models.hf_config import ModelArch
from megatron_opd.parallel import ParallelConfig, current_device, transformer_engine_available

VOCAB_PAD_MULTIPLE = 128
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
RECOMPUTE = ("none", "selective", "full")
# megatron's router load-balancing losses: over each micro-batch's tokens | over each sequence's
AUX_LOSS_TYPES = ("aux_loss", "seq_aux_loss")


@dataclass(frozen=True)
class RouterLoss:
    """A trained mixture-of-experts model's router losses; the default, none, is a frozen model's."""
    aux_coeff: Optional[float] = 0.0  # None: the model's config.json router_aux_loss_coef
    aux_type: str = "aux_loss"
    z_coeff: float = 0.0  # the router z-loss (ST-MoE), 0: none


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


def moe_fields(arch: ModelArch, parallel: ParallelConfig, router_loss: RouterLoss = RouterLoss()) -> dict:
    """TransformerConfig's mixture-of-experts fields, routing exactly as transformers does (empty: dense)."""
    moe = arch.moe
    if moe is None:
        return {}
    aux_coeff = moe.router_aux_loss_coef if router_loss.aux_coeff is None else router_loss.aux_coeff
    return dict(
        num_moe_experts=moe.num_experts, moe_router_topk=moe.top_k, moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_layer_freq=[int(routed) for routed in moe.moe_layers],
        # HF: softmax over all experts, then top-k, renormalised iff norm_topk_prob. megatron without
        # pre-softmax takes the softmax of the k chosen logits: the renormalised probabilities.
        moe_router_pre_softmax=not moe.norm_topk_prob, **sigmoid_router_fields(moe),
        moe_shared_expert_intermediate_size=moe.shared_expert_size, moe_shared_expert_gate=moe.shared_expert_gated,
        moe_token_dispatcher_type=parallel.token_dispatcher, moe_aux_loss_coeff=aux_coeff,
        moe_router_load_balancing_type=router_loss.aux_type, moe_z_loss_coeff=router_loss.z_coeff or None,
        moe_expert_capacity_factor=None,  # dropless: every token reaches its k experts
        expert_model_parallel_size=parallel.expert, expert_tensor_parallel_size=parallel.expert_tensor)


def transformer_config(arch: ModelArch, parallel: ParallelConfig, dtype="float32", recompute: str = "none",
                       init_weights: bool = True, device: Optional[torch.device] = None,
                       router_loss: RouterLoss = RouterLoss()):
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

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
    return (MLATransformerConfig if arch.mla else TransformerConfig)(
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
        **moe_fields(arch, parallel, router_loss), **mla_fields(arch), **extra)


def layer_spec(arch: ModelArch, parallel: ParallelConfig, use_te: bool, config, vp_stage=None, pp_rank=None):
    """Transformer Engine's spec on GPUs that have it; otherwise megatron's local spec, with the all-gather
    CP attention in place of its core attention when the layout is context-parallel. A mixture-of-experts
    model gets megatron's block spec for the layers of (`vp_stage`, `pp_rank`): its MoE and dense layers
    follow `config.moe_layer_freq`."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec, get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec)
    from megatron_opd.models.mla_attention import local_mla_layer_specs

    if arch.moe is not None:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm",
                                          vp_stage=vp_stage, pp_rank=pp_rank)
        layers = spec.layer_specs
    elif use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")
        layers = [spec]
    if arch.mla is not None and not use_te:
        local_mla_layer_specs(layers)
    if parallel.context > 1 and not use_te:
        for layer in layers:
            layer.submodules.self_attention.submodules.core_attention = ContextParallelAttention
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
                pg_collection=None, router_loss: RouterLoss = RouterLoss()) -> list:
    """One GPTModel per virtual pipeline stage held by this rank (a list of one without VPP), on `device`
    (default: the one the process group runs on). The model's groups are `pg_collection` (megatron's
    ProcessGroupCollection for `parallel`, e.g. a teacher in a layout of its own) or, by default, megatron's
    global parallel state, which must then be initialised for `parallel`. `use_te` defaults to Transformer
    Engine when it imports and the device is a GPU. `init_weights=False` skips the random init (seconds on
    CPU) when a checkpoint is about to overwrite every weight. `router_loss`: a mixture-of-experts model's router
    losses (default: none, a frozen model's)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    device = device or current_device()
    # A dense model may share a layout whose expert parallelism is another model's (a co-located teacher).
    parallel.check_model(arch.num_attention_heads, arch.num_key_value_heads, arch.num_layers,
                         arch.moe.num_experts if arch.moe else None)
    config = transformer_config(arch, parallel, dtype, recompute, init_weights, device, router_loss)
    if use_te is None:
        use_te = device.type == "cuda" and transformer_engine_available()
    if arch.mla is not None and not use_te:
        if parallel.context > 1:  # the CP attention here is for megatron's standard attention only
            raise ValueError(f"{arch.architecture}: context parallelism (parallel.context={parallel.context}) "
                             f"with multi-latent attention needs Transformer Engine")
        config.transformer_impl = "local"  # MLA picks its q/kv norms by this, not by the layer spec
    vocab = padded_vocab_size(arch.vocab_size, parallel.tensor)
    chunks = []
    for vp_stage in range(parallel.virtual_stages):
        vp = vp_stage if parallel.virtual_pipeline else None
        if pg_collection is None:
            first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp)
            last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp)
        else:
            first, last = pg_collection.pp.rank() == 0, pg_collection.pp.rank() == parallel.pipeline - 1
        pp_rank = None if pg_collection is None else pg_collection.pp.rank()
        model = GPTModel(
            config=config, transformer_layer_spec=layer_spec(arch, parallel, use_te, config, vp, pp_rank),
            vocab_size=vocab,
            max_sequence_length=arch.max_position_embeddings, position_embedding_type="rope",
            rotary_base=arch.rope_theta, share_embeddings_and_output_weights=arch.tie_word_embeddings,
            rope_scaling=arch.rope_scaling is not None,
            rope_scaling_factor=arch.rope_scaling.factor if arch.rope_scaling else 8.0,
            pre_process=first, post_process=last, vp_stage=vp, pg_collection=pg_collection)
        if arch.rope_scaling is not None and hasattr(model, "rotary_pos_emb"):
            model.rotary_pos_emb.inv_freq = _llama3_inv_freq(model.rotary_pos_emb, arch)
        # Norm weights are created in fp32 whatever params_dtype says; one dtype for the whole chunk.
        model.to(device=device, dtype=config.params_dtype)
        for module in model.modules():  # but routers' expert bias stays fp32, as megatron and transformers keep it
            if getattr(module, "expert_bias", None) is not None:
                module._maintain_float32_expert_bias()
        chunks.append(model)
    return chunks

"""What DeepSeek-V3 adds to megatron's TransformerConfig: multi-latent attention (with its YaRN rope) and the
sigmoid, group-limited, bias-corrected router. Both reproduce transformers' DeepseekV3 forward."""
from megatron_opd.models.hf_config import ModelArch, MoEArch, YarnRopeScaling


def mla_fields(arch: ModelArch) -> dict:
    """MLATransformerConfig's fields (empty: not an MLA model)."""
    mla = arch.mla
    if mla is None:
        return {}
    fields = dict(
        q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank, qk_head_dim=mla.qk_nope_head_dim,
        qk_pos_emb_head_dim=mla.qk_rope_head_dim, v_head_dim=mla.v_head_dim, rotary_base=arch.rope_theta,
        rope_type="rope")
    yarn = arch.rope_scaling
    if isinstance(yarn, YarnRopeScaling):
        # MLA builds its own rotary embedding per layer from these (GPTModel's is not used with MLA), and
        # scales the softmax by mscale(factor, mscale_all_dim)^2 as transformers does.
        fields.update(
            rope_type="yarn", rotary_scaling_factor=yarn.factor,
            original_max_position_embeddings=yarn.original_max_position_embeddings, beta_fast=yarn.beta_fast,
            beta_slow=yarn.beta_slow, mscale=yarn.mscale, mscale_all_dim=yarn.mscale_all_dim)
    return fields


def sigmoid_router_fields(moe: MoEArch) -> dict:
    """The router fields beyond softmax top-k (empty: a softmax router)."""
    if moe.score_function == "softmax":
        return {}
    return dict(
        moe_router_score_function=moe.score_function, moe_router_enable_expert_bias=moe.expert_bias,
        # The bias is the checkpoint's routing correction: kept as loaded, not re-balanced by megatron's
        # per-step update (aux-loss-free balancing is pre-training's, and would move the routing under us).
        moe_router_bias_update_rate=0.0,
        moe_router_num_groups=moe.num_groups, moe_router_group_topk=moe.group_topk,
        moe_router_topk_scaling_factor=moe.scaling_factor)

"""Multi-latent attention (DeepSeek-V3) on megatron's local spec, for CPUs and GPUs without Transformer Engine.

megatron-core ships MLA's local spec with its local `DotProductAttention` as the core attention, but
`MultiLatentAttention.__init__` builds that core with `k_channels`/`v_channels` keywords the local class does
not take (only TE's does), and the local class sizes its output as `kv_channels * heads` where MLA's context
is `v_head_dim * heads`. `LocalMLADotProductAttention` takes both and sizes the output by `v_channels`.

Without a query latent (q_lora_rank null, e.g. DeepSeek-V2-Lite-style configs) megatron's q/kv-norm resolver
(mla_qk_norm_config.py, `_resolve_mla_qk_layernorm`) insists on a norm fused into `linear_q_proj`, which
only Transformer Engine has and which transformers' q_proj does not apply: `LocalMLASelfAttention` keeps
the plain projection there and the kv latent's norm as the spec names it.
"""
from typing import Optional

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.multi_latent_attention import MLASelfAttention


class LocalMLADotProductAttention(DotProductAttention):
    def __init__(self, *args, k_channels: Optional[int] = None, v_channels: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        # The query/key width only enters through softmax_scale, which MLA passes in.
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition


class LocalMLASelfAttention(MLASelfAttention):
    def _resolve_qk_norm_config(self, submodules) -> dict:
        if self.config.q_lora_rank is not None:
            return super()._resolve_qk_norm_config(submodules)
        return dict(linear_q_proj=submodules.linear_q_proj, linear_q_up_proj=IdentityOp,
                    linear_kv_up_proj=submodules.linear_kv_up_proj, q_layernorm=IdentityOp,
                    kv_layernorm=submodules.kv_layernorm)


def local_mla_layer_specs(layer_specs) -> None:
    """Put the local MLA attention into megatron's local layer specs (in place)."""
    for layer in layer_specs:
        layer.submodules.self_attention.module = LocalMLASelfAttention
        layer.submodules.self_attention.submodules.core_attention = LocalMLADotProductAttention

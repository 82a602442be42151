"""Context-parallel core attention for megatron's local layer spec, where megatron itself has none
(its `DotProductAttention` refuses CP > 1; Transformer Engine's attention is the GPU path).

Each CP rank holds two chunks of every sequence (megatron's load-balanced layout, see
parallel/context_parallel.py). Keys and values are all-gathered over the CP group — the semantics of TE's
`all_gather` CP type — and each local query attends to the gathered keys whose global position is not
after its own (and within the sliding window, if the layer has one). Memory is [b, heads, s/CP, s] per
layer: this is the path that makes CP testable on CPU, not a long-context kernel.
"""
import math
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opd.parallel.context_parallel import local_positions


class _GatherSequence(torch.autograd.Function):
    """[s_local, ...] -> [CP * s_local, ...] in CP-rank order. Backward: every rank's queries contribute
    to the gradient of this rank's keys, so gradients are summed over the group (an all-reduce and a slice:
    gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, tensor, group):
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.length = group, dist.get_rank(group), tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.narrow(0, ctx.rank * ctx.length, ctx.length), None


class ContextParallelAttention(torch.nn.Module):
    """Drop-in for the local spec's `core_attention` (same constructor and forward signature)."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer.utils import is_layer_window_attention

        super().__init__()
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention_dropout={dropout}: the all-gather CP attention has no dropout")
        if pg_collection is None or not hasattr(pg_collection, "cp"):
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        tp = pg_collection.tp.size()
        self.cp_group = pg_collection.cp
        self.heads = config.num_attention_heads // tp
        self.kv_heads = config.num_query_groups // tp
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.window = (config.window_size
                       if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
                       else None)

    def visible(self, local_length: int, device: torch.device) -> torch.Tensor:
        """[s_local, CP * s_local]: may local query i see gathered key j (by global positions)."""
        cp, rank = self.cp_group.size(), self.cp_group.rank()
        total = local_length * cp
        query_pos = local_positions(total, rank, cp, device)[:, None]
        key_pos = torch.cat([local_positions(total, r, cp, device) for r in range(cp)])[None, :]
        visible = key_pos <= query_pos
        if self.window is not None:
            visible &= key_pos >= query_pos - self.window[0]
        return visible

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [s_local, b, heads, d], key/value [s_local, b, kv_heads, d] -> [s_local, b, heads * d]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("the all-gather CP attention takes neither packed sequences nor an attention bias")
        key = _GatherSequence.apply(key, self.cp_group)
        value = _GatherSequence.apply(value, self.cp_group)
        repeat = self.heads // self.kv_heads
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key.repeat_interleave(repeat, dim=2),
                                                 value.repeat_interleave(repeat, dim=2)))  # [b, n, s, d]
        scores = torch.matmul(q, k.transpose(-2, -1)).float() * self.scale
        scores = scores.masked_fill(~self.visible(query.shape[0], query.device), float("-inf"))
        context = torch.matmul(scores.softmax(-1).to(v.dtype), v)  # [b, n, s_local, d]
        return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)

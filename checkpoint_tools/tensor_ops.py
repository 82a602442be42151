"""Pure tensor functions between Hugging Face and megatron-core layouts.

megatron's fused QKV is grouped by query group: for each of the G KV heads, its H/G query heads, then its
key head, then its value head, stacked along the output dim. Splitting that along dim 0 into TP equal
parts gives each rank whole groups, which is why TP must divide the number of KV heads.
megatron's fc1 for gated MLPs is [gate; up] per TP rank, so its TP shards interleave gate and up.
"""
import torch


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int,
              head_dim: int) -> torch.Tensor:
    """q [H*d, ...], k/v [G*d, ...] (weights or biases) -> megatron linear_qkv [G*(H/G+2)*d, ...]."""
    per_group = num_heads // num_groups
    rest = q.shape[1:]
    q = q.reshape(num_groups, per_group * head_dim, *rest)
    k = k.reshape(num_groups, head_dim, *rest)
    v = v.reshape(num_groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(num_groups * (per_group + 2) * head_dim, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int):
    """Inverse of merge_qkv; also valid on one TP shard when given that shard's head and group counts."""
    per_group = num_heads // num_groups
    rest = qkv.shape[1:]
    grouped = qkv.reshape(num_groups, (per_group + 2) * head_dim, *rest)
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(num_heads * head_dim, *rest), k.reshape(num_groups * head_dim, *rest),
            v.reshape(num_groups * head_dim, *rest))


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor, tp: int = 1) -> torch.Tensor:
    """HF gate/up [F, h] -> megatron fc1 as TP shards would hold it, concatenated: [g0; u0; g1; u1; ...]."""
    return torch.cat([part for g, u in zip(gate.chunk(tp), up.chunk(tp)) for part in (g, u)])


def split_gate_up(fc1: torch.Tensor, tp: int = 1):
    """Inverse of merge_gate_up: megatron fc1 (tp shards concatenated) -> (gate, up)."""
    shards = [shard.chunk(2) for shard in fc1.chunk(tp)]
    return torch.cat([g for g, _ in shards]), torch.cat([u for _, u in shards])


def pad_vocab(weight: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Rows up to padded_size; the padded rows are zero (they stand for no token)."""
    if weight.shape[0] > padded_size:
        raise ValueError(f"vocab rows {weight.shape[0]} exceed the padded size {padded_size}")
    if weight.shape[0] == padded_size:
        return weight
    padding = weight.new_zeros(padded_size - weight.shape[0], *weight.shape[1:])
    return torch.cat([weight, padding])


def unpad_vocab(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return weight[:vocab_size]

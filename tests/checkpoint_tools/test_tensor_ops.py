import pytest
import torch

from checkpoint_tools import tensor_ops


@pytest.mark.parametrize("heads, groups", [(8, 8), (8, 2), (8, 1)])
def test_qkv_merge_split_round_trip_and_grouped_layout(heads, groups):
    head_dim, hidden = 4, 16
    q, k, v = torch.randn(heads * head_dim, hidden), torch.randn(groups * head_dim, hidden), torch.randn(groups * head_dim, hidden)
    qkv = tensor_ops.merge_qkv(q, k, v, heads, groups, head_dim)
    assert qkv.shape == ((heads + 2 * groups) * head_dim, hidden)
    # The first group holds its queries, then its key, then its value.
    per_group = heads // groups
    assert torch.equal(qkv[: per_group * head_dim], q[: per_group * head_dim])
    assert torch.equal(qkv[per_group * head_dim: (per_group + 1) * head_dim], k[:head_dim])
    for got, want in zip(tensor_ops.split_qkv(qkv, heads, groups, head_dim), (q, k, v)):
        assert torch.equal(got, want)


def test_qkv_tp_shards_hold_whole_groups():
    heads, groups, head_dim = 8, 4, 2
    q, k, v = torch.randn(16), torch.randn(8), torch.randn(8)  # biases
    shard = tensor_ops.merge_qkv(q, k, v, heads, groups, head_dim).chunk(2)[1]
    q1, k1, v1 = tensor_ops.split_qkv(shard, heads // 2, groups // 2, head_dim)
    assert torch.equal(q1, q[8:]) and torch.equal(k1, k[4:]) and torch.equal(v1, v[4:])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gate_up_interleaves_per_tp_shard(tp):
    gate, up = torch.randn(8, 3), torch.randn(8, 3)
    fc1 = tensor_ops.merge_gate_up(gate, up, tp)
    first_shard = fc1.chunk(tp)[0]
    assert torch.equal(first_shard, torch.cat([gate.chunk(tp)[0], up.chunk(tp)[0]]))
    got_gate, got_up = tensor_ops.split_gate_up(fc1, tp)
    assert torch.equal(got_gate, gate) and torch.equal(got_up, up)


def test_vocab_pad_unpad():
    weight = torch.randn(300, 4)
    padded = tensor_ops.pad_vocab(weight, 384)
    assert padded.shape == (384, 4) and not padded[300:].any()
    assert torch.equal(tensor_ops.unpad_vocab(padded, 300), weight)
    with pytest.raises(ValueError, match="exceed the padded size"):
        tensor_ops.pad_vocab(weight, 256)

"""The shard's place in the (padded) vocabulary, token chunking, and the `group=None` default: a single
shard without torch.distributed, megatron's TP group once model parallel is initialised."""
import pytest
import torch.distributed as dist

from megatron_opd.loss import vocab_parallel_divergence
from megatron_opd.loss.vocab_parallel import chunk_rows, vocab_shard
from megatron_opd.parallel import ParallelConfig, initialize_model_parallel
from tests.conftest import run_distributed
from tests.loss import reference
from tests.loss.reference import assert_rel_close, make_logits, vocab_slice


def _shard_worker(rank, world_size, shard_size, vocab_size):
    group = dist.new_group(list(range(world_size)))
    shard = vocab_shard(group, shard_size, vocab_size)
    # rank 0 hosts the store: nobody may exit while a peer still sets the group up
    dist.barrier(group=group)
    return shard.world_size, shard.offset, shard.valid


def test_shards_of_a_padded_vocabulary():
    # 29 true entries padded to 4 x 10: the last shard holds only padding
    assert run_distributed(_shard_worker, 4, 10, 29) == [(4, 0, 10), (4, 10, 10), (4, 20, 9), (4, 30, 0)]


def test_single_shard_without_torch_distributed():
    assert not dist.is_initialized()
    shard = vocab_shard(None, 12, 10)
    assert (shard.world_size, shard.offset, shard.size, shard.valid) == (1, 0, 12, 10)
    student, teacher, grad_out = make_logits(2, (4,), 10, 12)
    local = student.clone().requires_grad_(True)
    value = vocab_parallel_divergence(local, teacher, "forward", vocab_size=10)
    value.backward(grad_out)
    ref_value, ref_grad = reference.value_and_grad(
        lambda s: reference.divergence(s, teacher.double(), "forward", vocab_size=10), student, grad_out)
    assert_rel_close(value, ref_value, 1e-6, "value")
    assert_rel_close(local.grad, ref_grad, 1e-6, "grad")


def _megatron_default_worker(rank, world_size):
    initialize_model_parallel(ParallelConfig(tensor=2))
    student, teacher, _ = make_logits(4, (6,), 30, 32)
    local = vocab_slice(student, rank % 2, 2)
    value = vocab_parallel_divergence(local, vocab_slice(teacher, rank % 2, 2), "reverse", vocab_size=30)
    dist.barrier()  # rank 0 hosts the store: nobody may exit while a peer still builds megatron's groups
    return value


def test_group_none_is_megatrons_tp_group():
    student, teacher, _ = make_logits(4, (6,), 30, 32)
    expected = reference.divergence(student.double(), teacher.double(), "reverse", vocab_size=30)
    for value in run_distributed(_megatron_default_worker, 4):  # TP=2 x DP=2
        assert_rel_close(value, expected, 1e-6, "group=None under megatron TP=2")


def test_chunk_rows():
    assert chunk_rows(10, 100, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert chunk_rows(0, 100, 4) == []
    # default: a fixed element budget per fp32 buffer, so the rows per chunk shrink with the shard width
    assert len(chunk_rows(4096, 1 << 20)) == 4096
    assert chunk_rows(3, 8) == [slice(0, 3)]
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_rows(3, 8, 0)


def test_vocab_size_larger_than_padded_is_an_error():
    with pytest.raises(ValueError, match="vocab_size=13"):
        vocab_shard(None, 12, 13)

"""vocab_parallel_log_probs (one or K ids per position) and vocab_parallel_entropy == float64 references
on the gathered logits in values and gradients at TP = 1, 2, 4, with padding and temperature; gradcheck."""
import pytest
import torch
import torch.distributed as dist

from megatron_opd.loss import vocab_parallel_entropy, vocab_parallel_log_probs
from tests.conftest import run_distributed
from tests.loss import reference
from tests.loss.reference import assert_rel_close, make_logits, vocab_slice

LEAD = (4, 3)
VOCAB, PADDED = 29, 40  # at TP=4 the last shard is all padding
TEMPERATURE = 0.8


def _token_ids(seed, k):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (*LEAD, k), generator=gen)
    ids[0, 0, 0], ids[0, 1, 0] = 0, VOCAB - 1  # both ends of the true vocabulary
    return ids


def _worker(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    logits, _, grad_out = make_logits(11, LEAD, VOCAB, PADDED)
    results = {}
    for name, ids in (("one", _token_ids(0, 1)[..., 0]), ("topk", _token_ids(1, 5))):
        local = vocab_slice(logits, rank, world_size).clone().requires_grad_(True)
        value = vocab_parallel_log_probs(local, ids, TEMPERATURE, group=group, chunk_size=5, vocab_size=VOCAB)
        value.backward(grad_out.unsqueeze(-1).expand_as(value) if name == "topk" else grad_out)
        results[name] = (value.detach(), local.grad)
    local = vocab_slice(logits, rank, world_size).clone().requires_grad_(True)
    value = vocab_parallel_entropy(local, TEMPERATURE, group=group, chunk_size=5, vocab_size=VOCAB)
    value.backward(grad_out)
    results["entropy"] = (value.detach(), local.grad)
    return results


def _reference(name):
    logits, _, grad_out = make_logits(11, LEAD, VOCAB, PADDED)
    if name == "entropy":
        def fn(x):
            log_p = reference.log_softmax(x, VOCAB, TEMPERATURE)
            return -(log_p.exp() * log_p).sum(-1)
        return reference.value_and_grad(fn, logits, grad_out)
    ids = _token_ids(0, 1)[..., 0] if name == "one" else _token_ids(1, 5)
    gathered = (lambda x: reference.log_softmax(x, VOCAB, TEMPERATURE).gather(-1, ids.unsqueeze(-1)).squeeze(-1)) \
        if name == "one" else (lambda x: reference.log_softmax(x, VOCAB, TEMPERATURE).gather(-1, ids))
    grad = grad_out if name == "one" else grad_out.unsqueeze(-1).expand(*LEAD, 5)
    return reference.value_and_grad(gathered, logits, grad)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_matches_float64_reference(tp):
    ranks = run_distributed(_worker, tp)
    for name in ("one", "topk", "entropy"):
        value, grad = ranks[0][name][0], torch.cat([r[name][1] for r in ranks], dim=-1)
        for r in ranks[1:]:
            assert torch.equal(r[name][0], value), f"{name}: TP ranks disagree"
        ref_value, ref_grad = _reference(name)
        assert_rel_close(value, ref_value, 1e-6, f"TP={tp} {name} value")
        assert_rel_close(grad, ref_grad, 1e-6, f"TP={tp} {name} grad")
        assert not grad[..., VOCAB:].any(), f"TP={tp} {name}: padded columns got a gradient"


def test_gradcheck_float64():
    logits, _, _ = make_logits(5, (2, 3), 10, 12, torch.float64)
    logits.requires_grad_(True)
    ids = torch.tensor([[[0, 9], [3, 3], [5, 1]], [[2, 8], [7, 6], [4, 0]]])
    assert torch.autograd.gradcheck(
        lambda x: vocab_parallel_log_probs(x, ids, 1.4, chunk_size=4, vocab_size=10), (logits,))
    assert torch.autograd.gradcheck(
        lambda x: vocab_parallel_entropy(x, 1.4, chunk_size=4, vocab_size=10), (logits,))


def test_bf16_logits_give_fp32_values_and_bf16_grads():
    logits, _, _ = make_logits(6, (8,), 50, 50, torch.bfloat16)
    logits.requires_grad_(True)
    ids = torch.arange(8) * 6
    value = vocab_parallel_log_probs(logits, ids)
    value.sum().backward()
    assert value.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    expected = torch.log_softmax(logits.detach().double(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert_rel_close(value, expected, 1e-6, "bf16 log-probs")
    log_p = torch.log_softmax(logits.detach().double(), -1)
    assert_rel_close(vocab_parallel_entropy(logits.detach()), -(log_p.exp() * log_p).sum(-1), 1e-6, "bf16 entropy")


@pytest.mark.parametrize("bad_id", [-1, 10])
def test_rejects_ids_outside_the_true_vocabulary(bad_id):
    logits, _, _ = make_logits(1, (3,), 10, 12)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 10\)"):
        vocab_parallel_log_probs(logits, torch.tensor([0, bad_id, 2]), vocab_size=10)


def test_rejects_ids_of_another_shape():
    logits, _, _ = make_logits(1, (3,), 10, 12)
    with pytest.raises(ValueError, match="leading shape"):
        vocab_parallel_log_probs(logits, torch.zeros(4, dtype=torch.long))

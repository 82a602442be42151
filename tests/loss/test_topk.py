"""topk_divergence == a float64 reference over the teacher's top-k + tail buckets computed on the gathered
student logits, forward and reverse, at TP = 1, 2, 4 with padding and temperature; the stable tail."""
import decimal

import pytest
import torch
import torch.distributed as dist

from megatron_opd.loss import topk_divergence
from megatron_opd.loss.topk import log1mexp
from tests.conftest import run_distributed
from tests.loss import reference
from tests.loss.reference import assert_rel_close, make_logits, vocab_slice

LEAD = (4, 3)
VOCAB, PADDED, K = 37, 40, 6
TEMPERATURE = 1.2


def _teacher_topk():
    """The teacher's top-k ids and log-probs (normalised over the full vocabulary). [*LEAD, K] x2"""
    _, teacher, _ = make_logits(21, LEAD, VOCAB, PADDED)
    log_p = reference.log_softmax(teacher, VOCAB)
    values, ids = log_p.topk(K, dim=-1)
    return ids, values.float()


def _reference(student, kind):
    ids, teacher_topk = _teacher_topk()

    def fn(s):
        log_q = reference.log_softmax(s, VOCAB, TEMPERATURE).gather(-1, ids)
        buckets = lambda lp: torch.cat([lp, torch.log(1 - lp.exp().sum(-1, keepdim=True))], -1)  # noqa: E731
        log_p, log_q = buckets(teacher_topk.double()), buckets(log_q)
        if kind == "forward":
            return (log_p.exp() * (log_p - log_q)).sum(-1)
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    _, _, grad_out = make_logits(21, LEAD, VOCAB, PADDED)
    return reference.value_and_grad(fn, student, grad_out)


def _worker(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    student, _, grad_out = make_logits(21, LEAD, VOCAB, PADDED)
    ids, teacher_topk = _teacher_topk()
    results = {}
    for kind in ("forward", "reverse"):
        local = vocab_slice(student, rank, world_size).clone().requires_grad_(True)
        value = topk_divergence(local, ids, teacher_topk, kind, TEMPERATURE, group=group, chunk_size=5,
                                vocab_size=VOCAB)
        value.backward(grad_out)
        results[kind] = (value.detach(), local.grad)
    return results


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_matches_float64_reference(tp):
    ranks = run_distributed(_worker, tp)
    student, _, _ = make_logits(21, LEAD, VOCAB, PADDED)
    for kind in ("forward", "reverse"):
        value, grad = ranks[0][kind][0], torch.cat([r[kind][1] for r in ranks], dim=-1)
        ref_value, ref_grad = _reference(student, kind)
        assert_rel_close(value, ref_value, 1e-6, f"TP={tp} {kind} value")
        assert_rel_close(grad, ref_grad, 1e-6, f"TP={tp} {kind} grad")


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_gradcheck_float64(kind):
    student, teacher, _ = make_logits(3, (2, 3), 10, 12, torch.float64)
    values, ids = torch.log_softmax(teacher[..., :10], -1).topk(3, dim=-1)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: topk_divergence(s, ids, values, kind, temperature=0.9, chunk_size=4, vocab_size=10), (student,))


def test_zero_when_the_student_is_the_teacher():
    _, teacher, _ = make_logits(8, (5,), 20, 20)
    values, ids = torch.log_softmax(teacher, -1).topk(4, dim=-1)
    for kind in ("forward", "reverse"):
        assert topk_divergence(teacher, ids, values, kind).abs().max() < 1e-6


def test_log1mexp_is_accurate_at_both_ends_and_floors_an_empty_tail():
    points = [-1e-10, -0.1, -0.69, -0.7, -5.0, -50.0]
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        expected = [float((1 - decimal.Decimal(x).exp()).ln()) for x in points]
    torch.testing.assert_close(log1mexp(torch.tensor(points, dtype=torch.float64)),
                               torch.tensor(expected, dtype=torch.float64), rtol=1e-14, atol=0)
    # a top-k holding all the mass (or more, by rounding) leaves a tail at the dtype's epsilon, not -inf/nan
    eps = torch.finfo(torch.float64).eps
    torch.testing.assert_close(log1mexp(torch.tensor([0.0, 1e-7], dtype=torch.float64)),
                               torch.full((2,), eps, dtype=torch.float64).log(), rtol=1e-6, atol=0)


def test_rejects_mismatched_top_k_inputs():
    student, teacher, _ = make_logits(1, (3,), 10, 10)
    values, ids = torch.log_softmax(teacher, -1).topk(2, dim=-1)
    with pytest.raises(ValueError, match="same shape"):
        topk_divergence(student, ids, values[:, :1])
    with pytest.raises(ValueError, match="leading shape"):
        topk_divergence(student, ids[:2], values[:2])
    with pytest.raises(ValueError, match="kind"):
        topk_divergence(student, ids, values, kind="jsd")

"""A teacher given as hidden states and an output-layer shard (`LinearHead`) gives the divergence of its
logits — values and gradients, every kind, at TP=1 and TP=2 — and a pair whose vocabularies are padded
differently gives, with the padded rows masked on both sides, the divergence on the truncated vocabularies."""
import pytest
import torch
import torch.distributed as dist

from megatron_opd.loss import LinearHead, vocab_parallel_divergence
from tests.conftest import run_distributed
from tests.loss import reference
from tests.loss.reference import assert_rel_close, vocab_slice

KINDS = (("forward", 0.5, 1.0), ("reverse", 0.5, 0.7), ("jsd", 0.3, 1.2))
LEAD, HIDDEN = (4, 3), 16


def pair(vocab, student_padded, teacher_padded, seed=0):
    """Student logits [*LEAD, student_padded] and a teacher head whose weight has teacher_padded rows; the
    rows past `vocab` hold large values on both sides, so a loss that used them would be far off."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(*LEAD, student_padded, generator=gen, dtype=torch.float64) * 3
    student[..., vocab:] = 40.0
    hidden = torch.randn(*LEAD, HIDDEN, generator=gen, dtype=torch.float64)
    weight = torch.randn(teacher_padded, HIDDEN, generator=gen, dtype=torch.float64)
    weight[vocab:] = 10.0
    return student, hidden, weight, torch.randn(*LEAD, generator=gen, dtype=torch.float64)


def student_shard_rows(weight, padded):
    """The teacher's rows in the student's vocabulary layout: first `padded` rows, zeros where it has none."""
    rows = torch.zeros(padded, weight.shape[1], dtype=weight.dtype)
    rows[:min(padded, weight.shape[0])] = weight[:padded]
    return rows


@pytest.mark.parametrize("kind, beta, temperature", KINDS)
def test_head_equals_its_logits_and_padding_equals_truncation(kind, beta, temperature):
    vocab = 37
    student, hidden, weight, grad_out = pair(vocab, 40, 48)
    head_weight = student_shard_rows(weight, 40)
    logits = (hidden @ head_weight.T).detach()

    def run(teacher, s, vocab_size):
        s = s.clone().requires_grad_(True)
        value = vocab_parallel_divergence(s, teacher, kind, beta, temperature, vocab_size=vocab_size)
        value.backward(grad_out)
        return value.detach(), s.grad

    by_head = run(LinearHead(hidden, head_weight), student, vocab)
    by_logits = run(logits, student, vocab)
    truncated = run(logits[..., :vocab], student[..., :vocab], None)
    assert_rel_close(by_head[0], by_logits[0], 1e-12, "value: head vs logits")
    assert_rel_close(by_head[1], by_logits[1], 1e-12, "grad: head vs logits")
    assert_rel_close(by_head[0], truncated[0], 1e-12, "value: padded vs truncated")
    assert_rel_close(by_head[1][..., :vocab], truncated[1], 1e-12, "grad: padded vs truncated")
    assert torch.all(by_head[1][..., vocab:] == 0)
    expected = reference.divergence(student, logits, kind, beta, temperature, vocab)
    assert_rel_close(by_head[0], expected, 1e-12, "value: head vs float64 reference")


def _tp2(rank, world_size, kind, beta, temperature):
    group = dist.new_group([0, 1])
    vocab, padded = 37, 40
    student, hidden, weight, grad_out = pair(vocab, padded, 48, seed=1)
    head_weight = student_shard_rows(weight, padded)
    local = vocab_slice(student, rank, 2).clone().requires_grad_(True)
    value = vocab_parallel_divergence(local, LinearHead(hidden, vocab_slice(head_weight.T, rank, 2).T), kind, beta,
                                      temperature, group=group, vocab_size=vocab)
    value.backward(grad_out)
    return value.detach(), local.grad


@pytest.mark.parametrize("kind, beta, temperature", KINDS)
def test_head_at_tp2_equals_the_gathered_reference(kind, beta, temperature):
    results = run_distributed(_tp2, 2, kind, beta, temperature)
    student, hidden, weight, grad_out = pair(37, 40, 48, seed=1)
    logits = hidden @ student_shard_rows(weight, 40).T
    value, grad = reference.value_and_grad(
        lambda s: reference.divergence(s, logits, kind, beta, temperature, 37), student, grad_out)
    for rank_value, _ in results:
        assert_rel_close(rank_value, value, 1e-12, "value at TP=2")
    assert_rel_close(torch.cat([g for _, g in results], dim=-1), grad, 1e-12, "gathered grad at TP=2")


def test_head_of_the_wrong_shape_is_refused():
    student, hidden, weight, _ = pair(37, 40, 48)
    with pytest.raises(ValueError, match=r"cannot stand for logits \(4, 3, 40\)"):
        vocab_parallel_divergence(student, LinearHead(hidden, weight), "reverse", vocab_size=37)
    with pytest.raises(ValueError, match=r"comes as a LinearHead cut to the student's shard"):
        vocab_parallel_divergence(student, hidden @ weight.T, "reverse", vocab_size=37)

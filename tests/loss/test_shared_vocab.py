"""The divergence against a teacher of another vocabulary equals, value and gradients, the divergence between
the two softmaxes coarsened to the shared tokens plus one rest bucket, computed in float64 from whole logits
(every kind, at TP=1 and TP=2, with vocabulary padding on the student's side); with the vocabularies one
numbered apart it is the same-vocabulary fused divergence bit for bit."""
import pytest
import torch
import torch.distributed as dist

from megatron_opd.loss import fused_linear_divergence
from megatron_opd.loss.shared_vocab import (
    SharedVocabHead, fused_linear_shared_vocab_divergence, teacher_log_masses)
from tests.conftest import run_distributed
from tests.loss.reference import assert_rel_close, divergence
from tests.loss.test_fused import LargestOutput

STUDENT_VOCAB, PADDED, TEACHER_VOCAB, HIDDEN, TEACHER_HIDDEN, TOKENS, CHUNK, T = 29, 32, 23, 8, 12, 10, 4, 0.8
KINDS = (("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3))


def inputs(seed=0, mapping=None):
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    if mapping is None:  # 17 student ids share a string with a teacher id, in no order; 12 share none
        mapping = [-1] * STUDENT_VOCAB
        for s, t in zip(torch.randperm(STUDENT_VOCAB, generator=gen)[:17].tolist(),
                        torch.randperm(TEACHER_VOCAB, generator=gen)[:17].tolist()):
            mapping[s] = t
    return dict(hidden=draw(TOKENS, HIDDEN), weight=draw(PADDED, HIDDEN), teacher_hidden=draw(TOKENS, TEACHER_HIDDEN),
                teacher_weight=draw(TEACHER_VOCAB, TEACHER_HIDDEN), grad=draw(TOKENS), mapping=mapping)


def head_of(x, rows):
    """The teacher's rows of the student's columns `rows` (zeros where none) and which columns share."""
    mapping = torch.tensor(x["mapping"] + [-1] * (PADDED - STUDENT_VOCAB))[rows]
    shared = mapping >= 0
    weight = torch.where(shared[:, None], x["teacher_weight"][mapping.clamp(min=0)], 0.0)
    return SharedVocabHead(weight, shared)


def masses_of(x, dtype):
    """The teacher's log-normaliser and rest mass, from its own vocabulary: its ids no student id maps to."""
    unshared = torch.ones(x["teacher_weight"].shape[0], dtype=torch.bool)
    unshared[[t for t in x["mapping"] if t >= 0]] = False
    return teacher_log_masses(x["teacher_hidden"].to(dtype), x["teacher_weight"].to(dtype), unshared, T, None,
                              x["teacher_weight"].shape[0])


def reference(x, kind, beta, dtype=torch.float64):
    """The bucket divergence from whole logits in float64, with its gradients to the student's hidden and weight."""
    hidden, weight = x["hidden"].clone().requires_grad_(True), x["weight"].clone().requires_grad_(True)
    log_p = torch.log_softmax((hidden @ weight.T)[:, :STUDENT_VOCAB] / T, -1)
    log_q = torch.log_softmax(x["teacher_hidden"] @ x["teacher_weight"].T / T, -1)
    student_ids = [s for s, t in enumerate(x["mapping"]) if t >= 0]
    teacher_ids = [x["mapping"][s] for s in student_ids]

    def buckets(log_probs, ids):
        shared = log_probs[:, ids]
        return torch.cat([shared, torch.log1p(-shared.exp().sum(-1, keepdim=True))], -1)

    value = divergence(buckets(log_p, student_ids), buckets(log_q, teacher_ids), kind, beta)
    value.backward(x["grad"])
    return value.detach(), hidden.grad, weight.grad


def fused(x, kind, beta, dtype=torch.float64, rank=0, world=1, group=None):
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    rows = slice(rank * PADDED // world, (rank + 1) * PADDED // world)
    hidden = x["hidden"].to(dtype).requires_grad_(True)
    weight = x["weight"][rows].to(dtype).requires_grad_(True)
    head = head_of(x, rows)
    log_masses = masses_of(x, dtype)
    through = copy_to_tensor_model_parallel_region(hidden, group=group) if world > 1 else hidden
    value = fused_linear_shared_vocab_divergence(
        through, weight, x["teacher_hidden"].to(dtype), SharedVocabHead(head.weight.to(dtype), head.shared), log_masses,
        kind, beta, T, group=group, chunk_size=CHUNK, vocab_size=STUDENT_VOCAB)
    value.backward(x["grad"].to(value.dtype))
    return value.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-10), (torch.float32, 2e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind, beta", KINDS, ids=[kind for kind, _ in KINDS])
def test_it_is_the_divergence_over_shared_tokens_and_one_rest_bucket(kind, beta, dtype, rel):
    x = inputs()
    expected, got = reference(x, kind, beta), fused(x, kind, beta, dtype)
    for what, value, want in zip(("value", "hidden grad", "weight grad"), got, expected):
        assert_rel_close(value.double(), want, rel, f"{kind} {what}")
    assert float(got[0].min()) > 0


def _tp2(rank, world_size, kind, beta):
    return fused(inputs(), kind, beta, torch.float64, rank, world_size, dist.new_group([0, 1]))


@pytest.mark.parametrize("kind, beta", KINDS, ids=[kind for kind, _ in KINDS])
def test_at_tp2_it_equals_tp1(kind, beta):
    x = inputs()
    value, hidden_grad, weight_grad = reference(x, kind, beta)
    for rank, (got_value, got_hidden, got_weight) in enumerate(run_distributed(_tp2, 2, kind, beta)):
        assert_rel_close(got_value, value, 1e-10, f"{kind} value, rank {rank}")
        assert_rel_close(got_hidden, hidden_grad, 1e-10, f"{kind} hidden grad, rank {rank}")
        rows = slice(rank * PADDED // 2, (rank + 1) * PADDED // 2)
        assert_rel_close(got_weight, weight_grad[rows], 1e-10, f"{kind} weight grad, rank {rank}")


@pytest.mark.parametrize("kind, beta", KINDS, ids=[kind for kind, _ in KINDS])
def test_one_vocabulary_numbered_apart_is_the_same_vocabulary_divergence(kind, beta):
    """A teacher vocabulary of the student's size whose ids are the student's permuted: every column shared."""
    gen = torch.Generator().manual_seed(1)
    x = inputs(mapping=torch.randperm(STUDENT_VOCAB, generator=gen).tolist())
    x["teacher_weight"] = torch.randn(STUDENT_VOCAB, TEACHER_HIDDEN, generator=gen, dtype=torch.float64)
    hidden, weight, teacher = x["hidden"].float(), x["weight"].float(), x["teacher_hidden"].float()
    head = head_of(x, slice(None))
    head = SharedVocabHead(head.weight.float(), head.shared)
    log_masses = masses_of(x, torch.float32)
    kwargs = dict(kind=kind, beta=beta, temperature=T, chunk_size=CHUNK, vocab_size=STUDENT_VOCAB)
    got = fused_linear_shared_vocab_divergence(hidden, weight, teacher, head, log_masses, **kwargs)
    same = fused_linear_divergence(hidden, weight, teacher, head.weight, **kwargs)
    assert torch.equal(got, same)


def test_no_op_makes_a_tokens_by_vocabulary_tensor():
    """At V = 4096 and 64 tokens in chunks of 8, forward and backward: [V, H] and [C, V] at most, as fused."""
    gen = torch.Generator().manual_seed(0)
    tokens, vocab, width = 64, 4096, 32
    hidden = torch.randn(tokens, width, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, width, generator=gen, requires_grad=True)
    head = SharedVocabHead(torch.randn(vocab, 16, generator=gen), torch.rand(vocab, generator=gen) < 0.7)
    masses = torch.stack([torch.full((tokens,), 9.0), torch.full((tokens,), -2.0)], -1)
    mode = LargestOutput()
    with mode:
        fused_linear_shared_vocab_divergence(hidden, weight, torch.randn(tokens, 16, generator=gen), head, masses,
                                             "reverse", chunk_size=8).sum().backward()
    assert vocab * width <= mode.largest < tokens * vocab, mode.largest

"""vocab_parallel_divergence == a float64 reference on the gathered logits, in values and gradients, for
every kind at TP = 1, 2, 4 (gloo), with and without vocabulary padding (including a shard that is all
padding), with temperature != 1; chunking, TP size and bf16 inputs within stated tolerances; exact zeros
for teacher == student; gradcheck in float64; nothing of size [T, V] saved for backward."""
import pytest
import torch
import torch.distributed as dist

from megatron_opd.loss import vocab_parallel_divergence
from tests.conftest import run_distributed
from tests.loss import reference
from tests.loss.reference import assert_rel_close, make_logits, vocab_slice

LEAD = (5, 3)  # [s, b]: 15 tokens
VOCABS = ((40, 40), (37, 40), (29, 40))  # (true, padded); at TP=4 the last shard of (29, 40) is all padding
KINDS = (("forward", 0.5, 1.0), ("reverse", 0.5, 1.0), ("jsd", 0.3, 1.0), ("forward", 0.5, 0.7),
         ("reverse", 0.5, 1.6), ("jsd", 0.5, 0.7), ("jsd", 0.0, 1.3), ("jsd", 1.0, 1.3))
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}
TP_SIZES = (1, 2, 4)
# bf16 logits: values within 1e-5 of the float64 reference on the same bf16 numbers (fp32 inside); the
# gradient is returned in bf16, so within its rounding (2^-8 relative) of the reference.
BF16_VALUE_REL, BF16_GRAD_REL = 1e-5, 2.0 ** -8


def _cases():
    cases = []
    for seed, (vocab, padded) in enumerate(VOCABS):
        for kind, beta, temperature in KINDS:
            for dtype in ("fp64", "fp32"):
                cases.append((kind, beta, temperature, vocab, padded, dtype, 4, seed))
        cases.append(("reverse", 0.5, 0.9, vocab, padded, "bf16", 4, seed))
        for chunk in (1, None):
            cases.append(("jsd", 0.3, 0.8, vocab, padded, "fp32", chunk, seed))
            cases.append(("reverse", 0.5, 0.8, vocab, padded, "fp32", chunk, seed))
    return cases


def _worker(rank, world_size, cases):
    group = dist.new_group(list(range(world_size)))
    results = {}
    for case in cases:
        kind, beta, temperature, vocab, padded, dtype, chunk, seed = case
        student, teacher, grad_out = make_logits(seed, LEAD, vocab, padded, DTYPES[dtype])
        local = vocab_slice(student, rank, world_size).clone().requires_grad_(True)
        value = vocab_parallel_divergence(local, vocab_slice(teacher, rank, world_size), kind, beta, temperature,
                                          group=group, chunk_size=chunk, vocab_size=vocab)
        value.backward(grad_out)
        results[case] = (value.detach(), local.grad)
        # teacher == student: exactly zero divergence and gradient
        same = vocab_slice(teacher, rank, world_size).clone().requires_grad_(True)
        zero = vocab_parallel_divergence(same, same.detach(), kind, beta, temperature, group=group,
                                         chunk_size=chunk, vocab_size=vocab)
        zero.backward(grad_out)
        results[("same",) + case] = (zero.detach(), same.grad)
    return results


@pytest.fixture(scope="module")
def results():
    """case -> tp -> (per-token value, gathered gradient)."""
    by_tp = {tp: run_distributed(_worker, tp, _cases()) for tp in TP_SIZES}
    return {case: {tp: (ranks[0][case][0], torch.cat([r[case][1] for r in ranks], dim=-1))
                   for tp, ranks in by_tp.items()} for case in by_tp[1][0]}


def _reference(case):
    kind, beta, temperature, vocab, padded, dtype, chunk, seed = case
    student, teacher, grad_out = make_logits(seed, LEAD, vocab, padded, DTYPES[dtype])
    return reference.value_and_grad(
        lambda s: reference.divergence(s, teacher.double(), kind, beta, temperature, vocab), student, grad_out)


@pytest.mark.parametrize("tp", TP_SIZES)
def test_matches_float64_reference(results, tp):
    for case, by_tp in results.items():
        if case[0] == "same" or case[5] == "bf16":
            continue
        value, grad = by_tp[tp]
        ref_value, ref_grad = _reference(case)
        rel = 1e-12 if case[5] == "fp64" else 1e-6
        assert_rel_close(value, ref_value, rel, f"TP={tp} value {case}")
        assert_rel_close(grad, ref_grad, rel, f"TP={tp} grad {case}")
        assert not grad[..., case[3]:].any(), f"TP={tp} {case}: padded columns got a gradient"


@pytest.mark.parametrize("tp", TP_SIZES)
def test_bf16_within_stated_tolerance(results, tp):
    cases = [case for case in results if case[0] != "same" and case[5] == "bf16"]
    assert cases
    for case in cases:
        value, grad = results[case][tp]
        assert value.dtype == torch.float32 and grad.dtype == torch.bfloat16
        ref_value, ref_grad = _reference(case)
        assert_rel_close(value, ref_value, BF16_VALUE_REL, f"TP={tp} bf16 value {case}")
        assert_rel_close(grad, ref_grad, BF16_GRAD_REL, f"TP={tp} bf16 grad {case}")


def test_invariant_to_tp_size(results):
    for case, by_tp in results.items():
        if case[0] == "same" or case[5] == "bf16":
            continue
        rel = 1e-12 if case[5] == "fp64" else 2e-6
        for tp in TP_SIZES[1:]:
            assert_rel_close(by_tp[tp][0], by_tp[1][0], rel, f"value TP={tp} vs TP=1 {case}")
            assert_rel_close(by_tp[tp][1], by_tp[1][1], rel, f"grad TP={tp} vs TP=1 {case}")


def test_chunked_equals_unchunked(results):
    pairs = [(case, case[:6] + (None,) + case[7:]) for case in results
             if case[0] != "same" and case[6] == 1]
    assert pairs
    for one_token_chunks, whole in pairs:
        for tp in TP_SIZES:
            assert_rel_close(results[one_token_chunks][tp][0], results[whole][tp][0], 1e-6, f"value {whole}")
            assert_rel_close(results[one_token_chunks][tp][1], results[whole][tp][1], 1e-6, f"grad {whole}")


def test_teacher_equal_to_student_gives_exact_zeros(results):
    for case, by_tp in results.items():
        if case[0] != "same":
            continue
        for tp, (value, grad) in by_tp.items():
            assert not value.any(), f"TP={tp} {case}: divergence {value.abs().max():.3e}, expected 0"
            assert not grad.any(), f"TP={tp} {case}: gradient {grad.abs().max():.3e}, expected 0"


@pytest.mark.parametrize("kind,beta", [
    ("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)])
def test_gradcheck_float64(kind, beta):
    student, teacher, _ = make_logits(7, (2, 3), 10, 12, torch.float64)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: vocab_parallel_divergence(s, teacher, kind, beta, temperature=1.3, chunk_size=4, vocab_size=10),
        (student,))


def test_jsd_limits_are_forward_and_reverse_kl():
    """jsd / beta -> forward KL as beta -> 0 and jsd / (1 - beta) -> reverse KL as beta -> 1."""
    student, teacher, _ = make_logits(3, (6,), 16, 16, torch.float64, scale=1.0)
    eps = 1e-6
    forward = vocab_parallel_divergence(student, teacher, "forward")
    reverse = vocab_parallel_divergence(student, teacher, "reverse")
    near_zero = vocab_parallel_divergence(student, teacher, "jsd", beta=eps)
    near_one = vocab_parallel_divergence(student, teacher, "jsd", beta=1 - eps)
    assert_rel_close(near_zero / eps, forward, 1e-5, "beta->0")
    assert_rel_close(near_one / eps, reverse, 1e-5, "beta->1")
    assert torch.equal(vocab_parallel_divergence(student, teacher, "jsd", beta=0.0), forward)
    assert torch.equal(vocab_parallel_divergence(student, teacher, "jsd", beta=1.0), reverse)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_saves_no_vocab_sized_tensor_but_the_inputs(kind):
    student, teacher, grad_out = make_logits(5, (64,), 100, 128, torch.float32)
    student.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        value = vocab_parallel_divergence(student, teacher, kind, chunk_size=8, vocab_size=100)
    inputs = {student.data_ptr(), teacher.data_ptr()}
    assert inputs <= {t.data_ptr() for t in saved}, "backward must recompute from the saved input logits"
    large = [tuple(t.shape) for t in saved if t.numel() >= 64 * 8 and t.data_ptr() not in inputs]
    assert not large, f"tensors saved for backward besides the input logits: {large}"
    value.backward(grad_out)
    assert student.grad.shape == student.shape


def _communication_worker(rank, world_size):
    """Per call: (collective, elements per token) of every collective the three kinds issue."""
    group = dist.new_group(list(range(world_size)))
    student, teacher, _ = make_logits(9, (16,), 64, 64)
    calls = []
    real_all_reduce = dist.all_reduce

    def recording_all_reduce(tensor, *args, **kwargs):
        calls.append(("all_reduce", tensor.numel() / 4))
        return real_all_reduce(tensor, *args, **kwargs)
    dist.all_reduce = recording_all_reduce
    for name in ("all_gather", "all_gather_into_tensor", "broadcast", "send", "recv"):
        setattr(dist, name, lambda *args, _name=name, **kwargs: calls.append((_name, None)))
    for kind in ("forward", "reverse", "jsd"):
        local = vocab_slice(student, rank, world_size).clone().requires_grad_(True)
        vocab_parallel_divergence(local, vocab_slice(teacher, rank, world_size), kind, group=group,
                                  chunk_size=4).sum().backward()
    return calls


def test_communicates_a_few_scalars_per_token_and_nothing_in_backward():
    calls = run_distributed(_communication_worker, 2)[0]
    assert {name for name, _ in calls} == {"all_reduce"}, calls
    # 4 chunks of 4 tokens: maxes, then sums (+ one more for the jsd), forward only; never O(V) per token
    assert max(per_token for _, per_token in calls) <= 3
    assert len(calls) == 4 * (2 + 2 + 3)


def test_leading_shape_and_dtypes():
    student, teacher, _ = make_logits(1, (2, 3, 4), 9, 9, torch.bfloat16)
    value = vocab_parallel_divergence(student, teacher, "reverse")
    assert value.shape == (2, 3, 4) and value.dtype == torch.float32
    assert vocab_parallel_divergence(student[:0], teacher[:0]).shape == (0, 3, 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="kl"), "kind"), (dict(beta=1.5), "beta"), (dict(temperature=0.0), "temperature"),
    (dict(vocab_size=13), "vocab_size"), (dict(chunk_size=0), "chunk_size")])
def test_rejects_bad_arguments(kwargs, match):
    student, teacher, _ = make_logits(1, (3,), 12, 12)
    with pytest.raises(ValueError, match=match):
        vocab_parallel_divergence(student, teacher, **kwargs)


def test_rejects_mismatched_shapes():
    student, teacher, _ = make_logits(1, (3,), 12, 12)
    with pytest.raises(ValueError, match="same shape"):
        vocab_parallel_divergence(student, teacher[:, :6])

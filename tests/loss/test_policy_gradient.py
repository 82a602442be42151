"""The policy-gradient form of OPD, exactly, on a tabular policy over 4 tokens and responses of length 2
(every response enumerated, float64): the probability-weighted sum of the pg loss's gradients equals the
gradient of the sequence-level reverse KL (kl_discount=1) and of the per-position KLs with the visited
prefixes held fixed (kl_discount=0); a teacher equal to the student gives zero advantage and gradient;
matching engine log-probs give weights of 1; a known shift of the engine's log-probs is measured, and an
engine's samples, weighted, give the trainer's expectation back."""
import itertools
import math

import pytest
import torch

from megatron_opd.loss.policy_gradient import (
    clipped_surrogate, discounted_sums, group_advantages, kl_advantages, mismatch_weights)

V = 4
RESPONSES = list(itertools.product(range(V), repeat=2))


def tables(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g, dtype=torch.float64), torch.randn(V, V, generator=g, dtype=torch.float64)


def logprobs(first, second, response):
    a, b = response
    return torch.stack([torch.log_softmax(first, -1)[a], torch.log_softmax(second[a], -1)[b]])[None]  # [1, 2]


def expected_pg_gradient(student, teacher, discount, behaviour=None, cap=None):
    """sum over responses y of q(y) * grad pg_loss(y), q the student (or `behaviour`, with importance weights
    truncated at `cap` when one is given)."""
    first, second = (t.clone().requires_grad_() for t in student)
    mask = torch.ones(1, 2)
    total = 0.0
    for response in RESPONSES:
        lp = logprobs(first, second, response)
        sampler = lp if behaviour is None else logprobs(*behaviour, response)
        weight = torch.exp(sampler.sum()).detach()
        advantages = kl_advantages(lp, logprobs(*teacher, response), mask, coef=1.0, discount=discount)
        per_token, _ = clipped_surrogate(lp, lp, advantages, clip_ratio=0.2)
        if cap is not None:
            weights, _ = mismatch_weights(lp, sampler, mask, cap=cap, mode="truncate")
            per_token = per_token * weights
        total = total + weight * per_token.sum()
    total.backward()
    return torch.cat([first.grad, second.grad.flatten()])


def reference_gradient(student, teacher, discount):
    first, second = (t.clone().requires_grad_() for t in student)
    p1, q1 = torch.log_softmax(first, -1), torch.log_softmax(teacher[0], -1)
    p2, q2 = torch.log_softmax(second, -1), torch.log_softmax(teacher[1], -1)
    if discount == 1:  # KL between the two distributions over whole responses
        joint_p, joint_q = p1[:, None] + p2, q1[:, None] + q2
        value = (torch.exp(joint_p) * (joint_p - joint_q)).sum()
    else:  # each position's KL, the prefix's probability held fixed
        position_two = (torch.exp(p2) * (p2 - q2)).sum(-1)
        value = (torch.exp(p1) * (p1 - q1)).sum() + (torch.exp(p1).detach() * position_two).sum()
    value.backward()
    return torch.cat([first.grad, second.grad.flatten()])


@pytest.mark.parametrize("discount", [1.0, 0.0])
def test_expected_pg_gradient_is_the_exact_reverse_kl_gradient(discount):
    student, teacher = tables(0), tables(1)
    got, want = expected_pg_gradient(student, teacher, discount), reference_gradient(student, teacher, discount)
    assert torch.allclose(got, want, atol=1e-6, rtol=0) and want.abs().max() > 1e-2
    other = reference_gradient(student, teacher, 1.0 - discount)
    assert not torch.allclose(got, other, atol=1e-3)  # the two discounts are different objectives


def test_a_teacher_equal_to_the_student_gives_zero_advantage_and_gradient():
    student = tables(0)
    assert expected_pg_gradient(student, student, 1.0).abs().max() == 0.0
    lp = torch.randn(3, 5, dtype=torch.float64)
    assert kl_advantages(lp, lp.clone(), torch.ones(3, 5), 1.0, 1.0).abs().max() == 0.0


def test_matching_engine_log_probs_give_weights_of_one_and_no_clipping_in_the_first_epoch():
    lp, mask = torch.randn(2, 6, dtype=torch.float64), torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1.0]])
    weights, metrics = mismatch_weights(lp, lp.clone(), mask, cap=2.0, mode="truncate")
    assert torch.equal(weights, mask.to(weights.dtype)) and metrics["mismatch/changed_fraction"] == 0
    _, clipped = clipped_surrogate(lp, lp, torch.randn(2, 6, dtype=torch.float64), 0.2)
    assert not clipped.any()


def test_a_known_engine_shift_is_measured_and_corrected():
    lp, mask = torch.zeros(2, 3, dtype=torch.float64) - 1.0, torch.ones(2, 3)
    shifted = lp.clone()
    shifted[0] += 0.5  # the engine gives the first row's tokens e^0.5 times the trainer's probability
    weights, metrics = mismatch_weights(lp, shifted, mask, cap=10.0, mode="truncate")
    assert metrics["mismatch/ratio_max"] == pytest.approx(1.0)
    assert metrics["mismatch/ratio_mean"] == pytest.approx((3 * math.exp(-0.5) + 3) / 6)
    assert metrics["mismatch/kl_engine_trainer"] == pytest.approx(0.5 * 3 / 6)
    _, masked = mismatch_weights(lp, lp + 1.0, mask, cap=2.0, mode="mask")
    assert masked["mismatch/changed_fraction"] == 1.0  # ratio e^-1 < 1/2: every token dropped
    # An engine that samples the last token from other tables: weighted by pi/q, its samples give the
    # trainer's expectation back. Per-token weights correct the sampled token, not its prefix (as verl's
    # and slime's truncated IS), so the check is exact where only the last position differs, at discount 0.
    student, teacher = tables(0), tables(1)
    engine = (student[0], tables(2)[1])
    corrected = expected_pg_gradient(student, teacher, 0.0, behaviour=engine, cap=1e9)
    assert torch.allclose(corrected, reference_gradient(student, teacher, 0.0), atol=1e-6, rtol=0)
    uncorrected = expected_pg_gradient(student, teacher, 0.0, behaviour=engine)
    assert not torch.allclose(uncorrected, corrected, atol=1e-3)


# Ratios pi / pi_old below, inside and above the band [0.8, 1.2] (clip_ratio 0.2), and by hand, per sign of the
# advantage: the ratio the surrogate uses and where the clip acts. A > 0: min(r A, clip(r) A) clips r above 1.2;
# A < 0: it clips r below 0.8.
CLIP_RATIOS = [0.5, 0.85, 1.0, 1.15, 1.5]
BY_HAND = {1.0: ([0.5, 0.85, 1.0, 1.15, 1.2], [False, False, False, False, True]),
           -1.0: ([0.8, 0.85, 1.0, 1.15, 1.5], [True, False, False, False, False])}


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
def test_ppo_clip_bounds_the_ratio_and_stops_the_gradient_where_it_acts(sign):
    old = torch.randn(1, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logprobs = (old + torch.tensor([CLIP_RATIOS], dtype=torch.float64).log()).requires_grad_()
    advantages = sign * torch.tensor([[0.7, 1.3, 0.4, 2.0, 0.9]], dtype=torch.float64)
    per_token, clipped = clipped_surrogate(logprobs, old, advantages, clip_ratio=0.2)
    used, active = torch.tensor([BY_HAND[sign][0]], dtype=torch.float64), torch.tensor([BY_HAND[sign][1]])
    assert torch.allclose(per_token, -used * advantages, rtol=1e-12, atol=0)
    assert torch.equal(clipped, active)
    (grad,) = torch.autograd.grad(per_token.sum(), logprobs)
    # d/d log pi of -r A is -r A where the ratio is free; exactly 0 where the clip holds it
    expected = torch.where(active, 0.0, -torch.tensor([CLIP_RATIOS], dtype=torch.float64) * advantages)
    assert torch.equal(grad[active], torch.zeros_like(grad[active]))
    assert torch.allclose(grad, expected, rtol=1e-12, atol=0)


def test_discounted_sums_and_group_baselines():
    values, mask = torch.tensor([[9.0, 1.0, 2.0, 3.0, 7.0]]), torch.tensor([[0, 1, 1, 1, 0]])
    assert discounted_sums(values, mask, 0.5).tolist() == [[0.0, 1 + 0.5 * (2 + 0.5 * 3), 2 + 0.5 * 3, 3.0, 0.0]]
    assert discounted_sums(values, mask, 0.0).tolist() == [[0.0, 1.0, 2.0, 3.0, 0.0]]
    assert group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 2).tolist() == [0.5, -0.5, 0.0, 0.0]


def test_expected_group_reward_gradient_is_the_reward_gradient():
    """Reward only, groups of 2 samples: the probability-weighted sum over every pair of responses of the pg
    loss's gradient (both samples' tokens summed) is -grad E[r]: the group mean holds the sample itself, which
    scales each sample's share by (n - 1) / n, and n samples add up."""
    reward = {y: float((y[0] + 2 * y[1]) % 3 == 0) for y in RESPONSES}
    first, second = (t.clone().requires_grad_() for t in tables(0))
    total = 0.0
    for pair in itertools.product(RESPONSES, repeat=2):
        lps = [logprobs(first, second, y) for y in pair]
        weight = torch.exp(sum(lp.sum() for lp in lps)).detach()
        advantages = group_advantages(torch.tensor([reward[y] for y in pair], dtype=torch.float64), 2)
        for lp, advantage in zip(lps, advantages):
            per_token, _ = clipped_surrogate(lp, lp, advantage * torch.ones(1, 2, dtype=torch.float64), 0.2)
            total = total + weight * per_token.sum()
    total.backward()
    got = torch.cat([first.grad, second.grad.flatten()])
    first, second = (t.clone().requires_grad_() for t in tables(0))
    expected_reward = sum(torch.exp(logprobs(first, second, y).sum()) * r for y, r in reward.items())
    expected_reward.backward()
    want = -torch.cat([first.grad, second.grad.flatten()])
    assert torch.allclose(got, want, atol=1e-12, rtol=1e-9) and want.abs().max() > 1e-2


def test_kl_advantages_clamp_each_tokens_log_ratio_first():
    """verl's loss_max_clamp in the pg form: the per-token reverse KL is clamped to [-c, c] before the discount."""
    logprobs = torch.tensor([[-0.1, -3.0, -0.5, -6.0]])
    teacher = torch.tensor([[-2.0, -0.2, -0.4, -0.1]])
    mask = torch.ones(1, 4)
    ratio = logprobs - teacher  # 1.9, -2.8, -0.1, -5.9
    assert torch.allclose(kl_advantages(logprobs, teacher, mask, 2.0, 0.0, clamp=1.0),
                          -2.0 * ratio.clamp(-1.0, 1.0))
    assert torch.allclose(kl_advantages(logprobs, teacher, mask, 1.0, 1.0, clamp=1.0),
                          -ratio.clamp(-1.0, 1.0).flip(-1).cumsum(-1).flip(-1))

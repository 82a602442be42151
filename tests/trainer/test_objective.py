"""The temperature convention, end to end through what the teacher keeps and the student's fused per-token loss:
both distributions enter every divergence at one temperature tau (actor.kl_temperature, by default the
rollout temperature) — the full kinds as KL/JSD between softmax(s / tau) and softmax(t / tau), the sampled
kinds on log-probs of those, the top-k kinds on the teacher's top-k of softmax(t / tau) — and teacher = student
gives 0 at any tau."""
import math
from types import SimpleNamespace

import pytest
import torch

from megatron_opd.config import ActorConfig, OPDConfig, divergence_temperature
from megatron_opd.loss import response_counts
from megatron_opd.teacher.outputs import per_token_values
from megatron_opd.trainer.objective import LossInputs, Objective
from tests.loss import reference

VOCAB, PADDED, HIDDEN = 29, 32, 12
TAU = 0.7


def setup(seed=0):
    """The student as hidden states and an output layer, and the teacher's the same way."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *shape, scale=1.0: torch.randn(*shape, generator=gen, dtype=torch.float64) * scale  # noqa: E731
    student = (draw(2, 5, HIDDEN), draw(PADDED, HIDDEN, scale=2.0))
    teacher = (draw(2, 5, HIDDEN), draw(PADDED, HIDDEN))
    return student, teacher, torch.randint(0, VOCAB, (2, 5), generator=gen)


def inputs(student, labels, teacher, mask=None, **batch):
    """The loss inputs of one micro-batch with `labels` (every position a response token unless `mask`)."""
    mask = torch.ones(labels.shape, dtype=torch.float64) if mask is None else mask
    mb = SimpleNamespace(labels=labels, loss_mask=mask, **batch)
    return LossInputs(*student, mb, response_counts(mask), 0, teacher)


def kl(kind, student, teacher, labels, tau, **actor):
    actor = ActorConfig(kl_loss_type=kind, **actor)
    if kind in ("forward", "reverse", "jsd"):
        kept, head = {"hidden": teacher[0]}, teacher[1]
    else:
        kept, head = per_token_values(teacher[0] @ teacher[1].T, labels, kind, actor.topk, tau, VOCAB, None), None
    return Objective(actor, tau, VOCAB, head_weight=head).per_token_kl(inputs(student, labels, kept))


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd", "kl", "low_var_kl", "topk_forward", "topk_reverse"])
def test_both_sides_enter_at_the_divergence_temperature(kind):
    student, teacher, labels = setup()
    got = kl(kind, student, teacher, labels, TAU, topk=VOCAB)
    student_logits, teacher_logits = student[0] @ student[1].T, teacher[0] @ teacher[1].T
    log_s = reference.log_softmax(student_logits, VOCAB, TAU)
    log_t = reference.log_softmax(teacher_logits, VOCAB, TAU)
    if kind in ("forward", "reverse", "jsd"):
        expected = reference.divergence(student_logits, teacher_logits, kind, 0.5, TAU, VOCAB)
    else:
        # A top-k of the whole vocabulary leaves an empty tail: the exact KL. The sampled kinds' estimators
        # are functions of d = log p_s(y) - log p_t(y) at the label y (k3 clamped as in verl).
        d = (log_s - log_t).gather(-1, labels[..., None])[..., 0]
        neg = (-d).clamp(-20, 20)
        expected = {"kl": d, "low_var_kl": (neg.exp() - neg - 1).clamp(-10, 10),
                    "topk_forward": (log_t.exp() * (log_t - log_s)).sum(-1),
                    "topk_reverse": (log_s.exp() * (log_s - log_t)).sum(-1)}[kind]
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-9), kind


@pytest.mark.parametrize("kind, base", [("k3+", "low_var_kl"), ("low_var_kl+", "k3"), ("k1+", "kl"), ("abs+", "abs")])
def test_straight_through_kinds_take_the_estimators_value_and_k2s_gradient(kind, base):
    """verl's "+" kinds, reachable from actor.kl_loss_type: the value of the base estimator, the gradient of k2
    (= mse), w.r.t. the student's hidden states and output layer."""
    student, teacher, labels = setup()

    def value_and_grads(name):
        hidden, weight = (t.clone().requires_grad_() for t in student)
        per_token = kl(name, (hidden, weight), teacher, labels, TAU)
        return per_token.detach(), torch.autograd.grad(per_token.sum(), (hidden, weight))

    ActorConfig(kl_loss_type=kind)  # the config takes it
    value, grads = value_and_grads(kind)
    assert torch.equal(value, value_and_grads(base)[0])
    assert all(torch.allclose(g, w, rtol=1e-12, atol=0) for g, w in zip(grads, value_and_grads("mse")[1]))
    assert not torch.allclose(grads[0], value_and_grads(base)[1][0])


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd", "kl", "low_var_kl", "topk_reverse"])
def test_teacher_equal_to_student_gives_zero_at_any_temperature(kind):
    student, _, labels = setup()
    assert kl(kind, student, student, labels, 1.6, topk=8).abs().max() < 1e-12, kind


def test_kl_temperature_defaults_to_the_rollout_temperature():
    cfg = OPDConfig.__new__(OPDConfig)
    cfg.actor, cfg.rollout = ActorConfig(), type("Rollout", (), {"temperature": 0.6})()
    assert divergence_temperature(cfg) == 0.6
    cfg.actor = ActorConfig(kl_temperature=1.0)
    assert divergence_temperature(cfg) == 1.0
    with pytest.raises(ValueError, match=r"actor.kl_temperature=0.0: must be null \(rollout.temperature\) or > 0"):
        ActorConfig(kl_temperature=0.0)


def test_the_teachers_head_must_be_cut_to_the_students_shard():
    student, teacher, labels = setup()
    with pytest.raises(ValueError, match="cannot stand for logits"):
        Objective(ActorConfig(kl_loss_type="reverse"), 1.0, VOCAB, head_weight=teacher[1][:20]).per_token_kl(
            inputs(student, labels, {"hidden": teacher[0]}))


# The policy-gradient form (actor.policy_loss=pg) on one micro-batch, against autograd on its definition.
MASK = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.float64)
REWARD_ADVANTAGES = torch.tensor([0.5, -0.5], dtype=torch.float64)


def pg_loss(student, teacher, labels, engine_shift, reward_coef=0.7, **actor):
    """(loss, metrics, d loss / d student tensors) of policy_gradient_loss; the engine's log-probs are the
    trainer's plus `engine_shift` ([2, 1])."""
    hidden, weight = (t.clone().requires_grad_() for t in student)
    own = reference.log_softmax(hidden @ weight.T, VOCAB, TAU).gather(-1, labels[..., None])[..., 0].detach()
    actor = ActorConfig(kl_loss_type="reverse", policy_loss="pg", kl_loss_coef=1.3, **actor)
    objective = Objective(actor, TAU, VOCAB, head_weight=teacher[1], reward_coef=reward_coef)
    loss, metrics = objective(inputs((hidden, weight), labels, {"hidden": teacher[0]}, MASK,
                                     reward_advantages=REWARD_ADVANTAGES, engine_logprobs=own + engine_shift))
    return loss, metrics, torch.autograd.grad(loss, (hidden, weight))


def pg_reference(student, teacher, labels, discount, weights, reward_coef=0.7):
    """-sum_t w_t A_t exp(lp_t - sg(lp_t)) / tokens, A_t the reverse KL of the sampled tokens (summed over later
    ones at `discount`) times -1.3, plus reward_coef x the row's reward advantage; `weights` [2, 1] per row or
    [2, 5] per token."""
    hidden, weight = (t.clone().requires_grad_() for t in student)
    pick = lambda h, w: reference.log_softmax(h @ w.T, VOCAB, TAU).gather(-1, labels[..., None])[..., 0]  # noqa: E731
    lp, lt = pick(hidden, weight), pick(*teacher)
    kl = (-1.3 * (lp.detach() - lt) * MASK).tolist()
    advantages = torch.zeros_like(lp)
    for row in range(2):
        for t in range(4, -1, -1):
            later = advantages[row, t + 1] if t < 4 else 0.0
            advantages[row, t] = (kl[row][t] + discount * later) * MASK[row, t]
    advantages = advantages + reward_coef * REWARD_ADVANTAGES[:, None] * MASK
    loss = -(weights * advantages * torch.exp(lp - lp.detach()) * MASK).sum() / MASK.sum()
    return loss, torch.autograd.grad(loss, (hidden, weight)), advantages


@pytest.mark.parametrize("discount", [0.0, 1.0])
def test_pg_loss_is_the_advantage_weighted_log_prob_gradient(discount):
    student, teacher, labels = setup()
    loss, metrics, grads = pg_loss(student, teacher, labels, torch.zeros(2, 1), kl_discount=discount, is_cap=2.0)
    want, want_grads, advantages = pg_reference(student, teacher, labels, discount, torch.ones(2, 1))
    assert loss.item() == pytest.approx(want.item(), rel=1e-10)
    assert all(torch.allclose(g, w, rtol=1e-9, atol=1e-12) for g, w in zip(grads, want_grads))
    assert metrics["actor/advantage_mean"].item() == pytest.approx((advantages * MASK).sum().item() / 6, rel=1e-10)
    # one update, engine = trainer: every weight 1 (to float64 rounding: the engine's are autograd's), nothing clipped
    assert metrics["mismatch/ratio_mean"].item() == pytest.approx(1, abs=1e-12)
    assert metrics["mismatch/ratio_max"].item() == pytest.approx(1, abs=1e-12)
    assert metrics["mismatch/changed_fraction"] == 0 and metrics["actor/pg_clipfrac"] == 0


def test_pg_loss_measures_and_corrects_a_forced_engine_shift():
    student, teacher, labels = setup()
    shift = torch.tensor([[0.5], [0.0]])  # the engine gives row 0's tokens e^0.5 times the trainer's probability
    _, metrics, grads = pg_loss(student, teacher, labels, shift, is_cap=2.0)
    assert metrics["mismatch/ratio_mean"].item() == pytest.approx((3 * math.exp(-0.5) + 3) / 6, rel=1e-6)
    assert metrics["mismatch/kl_engine_trainer"].item() == pytest.approx(0.5 * 3 / 6, rel=1e-6)
    _, want_grads, _ = pg_reference(student, teacher, labels, 0.0, torch.tensor([[math.exp(-0.5)], [1.0]]))
    assert all(torch.allclose(g, w, rtol=1e-6, atol=1e-9) for g, w in zip(grads, want_grads))
    _, measured, uncorrected = pg_loss(student, teacher, labels, shift)  # is_cap null: measured, not applied
    assert measured["mismatch/ratio_mean"] == metrics["mismatch/ratio_mean"]
    _, plain, _ = pg_reference(student, teacher, labels, 0.0, torch.ones(2, 1))
    assert all(torch.allclose(g, w, rtol=1e-9, atol=1e-12) for g, w in zip(uncorrected, plain))
    _, masked, _ = pg_loss(student, teacher, labels, torch.tensor([[2.0], [0.0]]), is_cap=2.0, is_mode="mask")
    assert masked["mismatch/changed_fraction"].item() == pytest.approx(0.5)  # row 0's ratio e^-2 < 1/2: dropped


# Per response token (MASK), the trainer/engine ratio the engine's log-probs give: above the cap of 2, inside the
# band [1/2, 2], below 1/2; and the importance weights each mode makes of them, by hand.
RATIOS = torch.tensor([[1.0, 3.0, 1.5, 1.0, 1.0], [1.0, 1.0, 0.2, 0.8, 2.5]], dtype=torch.float64)
IS_WEIGHTS = {"truncate": [[0, 2.0, 1.5, 1.0, 0], [0, 0, 0.2, 0.8, 2.0]],
              "mask": [[0, 0.0, 1.5, 1.0, 0], [0, 0, 0.0, 0.8, 0.0]]}


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_pg_loss_truncates_or_masks_importance_weights_at_the_cap(mode):
    """is_cap=2: a token whose ratio is above the cap counts with the cap (truncate) or not at all (mask, which
    also drops a ratio below 1/2); the loss and its gradients equal the reference with those weights."""
    student, teacher, labels = setup()
    loss, metrics, grads = pg_loss(student, teacher, labels, -RATIOS.log(), is_cap=2.0, is_mode=mode)
    want, want_grads, _ = pg_reference(student, teacher, labels, 0.0, torch.tensor(IS_WEIGHTS[mode],
                                                                                    dtype=torch.float64))
    assert loss.item() == pytest.approx(want.item(), rel=1e-9)
    assert all(torch.allclose(g, w, rtol=1e-8, atol=1e-12) for g, w in zip(grads, want_grads))
    assert metrics["mismatch/ratio_max"].item() == pytest.approx(3.0)
    assert metrics["mismatch/changed_fraction"].item() == pytest.approx({"truncate": 2 / 6, "mask": 3 / 6}[mode])


def test_pg_teacher_equal_to_student_without_reward_gives_zero_advantage_and_gradient():
    student, _, labels = setup()
    _, metrics, grads = pg_loss(student, student, labels, torch.zeros(2, 1), reward_coef=0.0, kl_discount=1.0)
    assert metrics["actor/advantage_mean"] == 0 and all(g.abs().max() == 0 for g in grads)


def test_verls_clamps_bound_each_token_and_floor_the_log_probs():
    """actor.loss_max_clamp: each token's divergence in [-c, c], no gradient where it binds;
    actor.log_prob_min_clamp: both sides' log-probs floored before the estimator (k1 here: it can be < 0)."""
    student, teacher, labels = setup(seed=3)
    student = (student[0].clone().requires_grad_(True), student[1])
    plain = kl("k1", student, teacher, labels, 1.0)
    clamp = plain.detach().abs().median().item()
    clamped = kl("k1", student, teacher, labels, 1.0, loss_max_clamp=clamp)
    assert torch.equal(clamped, plain.clamp(-clamp, clamp))
    bound = plain.detach().abs() > clamp
    assert bound.any() and (~bound).any()
    (grad,) = torch.autograd.grad(clamped.sum(), student[0])
    assert grad[bound].abs().max() == 0 and grad[~bound].abs().max() > 0
    log_s = reference.log_softmax(student[0].detach() @ student[1].T, VOCAB, 1.0).gather(-1, labels[..., None])[..., 0]
    log_t = reference.log_softmax(teacher[0] @ teacher[1].T, VOCAB, 1.0).gather(-1, labels[..., None])[..., 0]
    floor = log_t.median().item()
    assert (log_s < floor).any() and (log_t < floor).any() and (log_s != log_t).all()
    floored = kl("k1", student, teacher, labels, 1.0, log_prob_min_clamp=floor)
    assert torch.allclose(floored, log_s.clamp(min=floor) - log_t.clamp(min=floor), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(floored, plain)


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_the_direct_form_on_stale_samples_weights_each_sampled_tokens_divergence(mode):
    """rollout.max_staleness > 0 (or actor.is_cap) on a sampled kind: each token's divergence times its capped
    trainer/engine ratio, no gradient through the ratio; without is_cap measured and not applied; a full kind
    measures it only."""
    student, teacher, labels = setup()
    own = reference.log_softmax(student[0] @ student[1].T, VOCAB, TAU).gather(-1, labels[..., None])[..., 0]
    kept = per_token_values(teacher[0] @ teacher[1].T, labels, "low_var_kl", 0, TAU, VOCAB, None)

    def direct(is_cap, kind="low_var_kl", stale=True):
        hidden, weight = (t.clone().requires_grad_() for t in student)
        actor = ActorConfig(kl_loss_type=kind, is_cap=is_cap, is_mode=mode)
        head, outputs = (teacher[1], {"hidden": teacher[0]}) if kind == "reverse" else (None, kept)
        batch = dict(engine_logprobs=own - RATIOS.log(), on_policy=torch.ones(2, dtype=torch.bool))
        loss, metrics = Objective(actor, TAU, VOCAB, head_weight=head, stale=stale)(
            inputs((hidden, weight), labels, outputs, MASK, **batch))
        return loss, metrics, torch.autograd.grad(loss, (hidden, weight))

    plain_kl = kl("low_var_kl", student, teacher, labels, TAU)
    weights = torch.tensor(IS_WEIGHTS[mode], dtype=torch.float64)
    hidden, weight = (t.clone().requires_grad_() for t in student)
    by_hand = Objective(ActorConfig(kl_loss_type="low_var_kl"), TAU, VOCAB).per_token_kl(
        inputs((hidden, weight), labels, kept))
    by_hand = (by_hand * weights * MASK).sum() / MASK.sum()  # the weighted loss, from the per-token divergence
    loss, metrics, grads = direct(2.0)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-9)
    assert all(torch.allclose(g, w, rtol=1e-9, atol=1e-12) for g, w in zip(grads, torch.autograd.grad(by_hand, (hidden, weight))))
    assert metrics["mismatch/ratio_max"].item() == pytest.approx(3.0)
    measured, measured_metrics, _ = direct(None)
    assert measured.item() == pytest.approx(((plain_kl * MASK).sum() / MASK.sum()).item(), rel=1e-9)
    assert measured_metrics["mismatch/ratio_max"] == metrics["mismatch/ratio_max"]
    assert "mismatch/ratio_max" in direct(None, "reverse")[1]
    assert "mismatch/ratio_max" not in direct(None, stale=False)[1]

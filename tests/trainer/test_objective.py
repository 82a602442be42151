"""The temperature convention, end to end through what the teacher keeps and the student's fused per-token loss:
both distributions enter every divergence at one temperature tau (actor.kl_temperature, by default the
rollout temperature) — the full kinds as KL/JSD between softmax(s / tau) and softmax(t / tau), the sampled
kinds on log-probs of those, the top-k kinds on the teacher's top-k of softmax(t / tau) — and teacher = student
gives 0 at any tau."""
import pytest
import torch

from megatron_opd.teacher.outputs import per_token_values
from megatron_opd.trainer.config import ActorConfig, OPDConfig, divergence_temperature
from megatron_opd.trainer.objective import per_token_kl
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


def kl(kind, student, teacher, labels, tau, **actor):
    actor = ActorConfig(kl_loss_type=kind, **actor)
    if kind in ("forward", "reverse", "jsd"):
        kept, head = {"hidden": teacher[0]}, teacher[1]
    else:
        kept, head = per_token_values(teacher[0] @ teacher[1].T, labels, kind, actor.topk, tau, VOCAB, None), None
    return per_token_kl(*student, labels, kept, head, actor, tau, VOCAB, None)


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
        per_token_kl(*student, labels, {"hidden": teacher[0]}, teacher[1][:20], ActorConfig(kl_loss_type="reverse"),
                     1.0, VOCAB, None)

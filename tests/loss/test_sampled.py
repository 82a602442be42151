"""sampled_token_kl: verl's k1 / abs / k2 / k3 values and clamps, the aliases, and the straight-through
"+" variants (value of the estimator, gradient of k2)."""
import math

import pytest
import torch

from megatron_opd.loss import sampled_token_kl

STUDENT = torch.tensor([-1.0, -2.5, -0.1, -30.0, -0.5], dtype=torch.float64)
TEACHER = torch.tensor([-1.5, -0.5, -0.1, -0.2, -40.0], dtype=torch.float64)


def _k3(student, teacher):
    log_ratio = teacher - student
    return math.exp(log_ratio) - log_ratio - 1


@pytest.mark.parametrize("kind,expected", [
    ("kl", [0.5, -2.0, 0.0, -29.8, 39.5]),
    ("abs", [0.5, 2.0, 0.0, 29.8, 39.5]),
    ("mse", [0.125, 2.0, 0.0, 0.5 * 29.8 ** 2, 0.5 * 39.5 ** 2]),
    # k3 clamped to [-10, 10]: the large-ratio tokens saturate
    ("low_var_kl", [_k3(-1.0, -1.5), _k3(-2.5, -0.5), 0.0, 10.0, 10.0]),
])
def test_values(kind, expected):
    torch.testing.assert_close(sampled_token_kl(STUDENT, TEACHER, kind),
                               torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alias,kind", [("k1", "kl"), ("k2", "mse"), ("k3", "low_var_kl")])
def test_aliases(alias, kind):
    assert torch.equal(sampled_token_kl(STUDENT, TEACHER, alias), sampled_token_kl(STUDENT, TEACHER, kind))


def test_low_var_kl_gradient_is_finite_where_clamped():
    student = STUDENT.clone().requires_grad_(True)
    sampled_token_kl(student, TEACHER, "low_var_kl").sum().backward()
    assert torch.isfinite(student.grad).all()
    # d k3 / d logp_s = 1 - exp(logp_t - logp_s) inside the clamp, 0 where the value is clamped
    expected = [1 - math.exp(-0.5), 1 - math.exp(2.0), 0.0, 0.0, 0.0]
    torch.testing.assert_close(student.grad, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["kl+", "k3+", "low_var_kl+", "abs+"])
def test_straight_through_variants(kind):
    student = STUDENT.clone().requires_grad_(True)
    value = sampled_token_kl(student, TEACHER, kind)
    value.sum().backward()
    assert torch.equal(value.detach(), sampled_token_kl(STUDENT, TEACHER, kind[:-1]))
    torch.testing.assert_close(student.grad, STUDENT - TEACHER)  # d k2 / d logp_s


def test_gradient_flows_to_both_inputs():
    student, teacher = STUDENT[:3].clone().requires_grad_(True), TEACHER[:3].clone().requires_grad_(True)
    sampled_token_kl(student, teacher, "mse").sum().backward()
    torch.testing.assert_close(student.grad, -teacher.grad)


def test_rejects_unknown_kind_and_mismatched_shapes():
    with pytest.raises(ValueError, match="kind='full'"):
        sampled_token_kl(STUDENT, TEACHER, "full")
    with pytest.raises(ValueError, match="same shape"):
        sampled_token_kl(STUDENT, TEACHER[:2])

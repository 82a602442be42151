"""Single-sample KL estimators on the sampled token's log-probs, with verl's `kl_penalty` semantics.

With d = logp_s - logp_t at a token sampled from the student (Schulman, "Approximating KL divergence"):
  kl / k1           d                                  unbiased for KL(p_s || p_t), high variance
  abs               |d|
  mse / k2          d^2 / 2
  low_var_kl / k3   exp(-d) + d - 1, with -d clamped to [-20, 20] before exp and the result to [-10, 10]
A trailing "+" (e.g. "k3+", "low_var_kl+") keeps the value of the base estimator but takes the gradient of
k2, whose expected gradient is that of the true KL (verl's straight-through variants).
"""
import torch

BASE_KINDS = ("kl", "abs", "mse", "low_var_kl", "k1", "k2", "k3")  # k1, k2, k3: verl's names of kl, mse, low_var_kl
KINDS = BASE_KINDS + tuple(kind + "+" for kind in BASE_KINDS)


def _estimate(log_ratio: torch.Tensor, kind: str) -> torch.Tensor:  # log_ratio = logp_s - logp_t
    if kind in ("kl", "k1"):
        return log_ratio
    if kind == "abs":
        return log_ratio.abs()
    if kind in ("mse", "k2"):
        return 0.5 * log_ratio.square()
    # the clamp keeps exp finite so that the outer clamp's zero gradient never meets an inf
    neg = torch.clamp(-log_ratio, min=-20.0, max=20.0)
    return torch.clamp(torch.exp(neg) - neg - 1.0, min=-10.0, max=10.0)


def sampled_token_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                     kind: str = "low_var_kl") -> torch.Tensor:
    """Per-token KL estimate from the sampled tokens' log-probs (same shape in and out); differentiable
    w.r.t. both inputs."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    if student_logprobs.shape != teacher_logprobs.shape:
        raise ValueError(f"student log-probs {tuple(student_logprobs.shape)} and teacher log-probs "
                         f"{tuple(teacher_logprobs.shape)} must have the same shape")
    log_ratio = student_logprobs - teacher_logprobs
    if not kind.endswith("+"):
        return _estimate(log_ratio, kind)
    value = _estimate(log_ratio, kind[:-1])
    surrogate = _estimate(log_ratio, "k2")
    return surrogate - surrogate.detach() + value.detach()

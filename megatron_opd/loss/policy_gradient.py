"""On-policy distillation as a policy-gradient loss (the form of verl's use_policy_gradient, slime, NeMo-RL's
opd estimator and the Tinker cookbook): the teacher enters only through the sampled token's log-prob.

- kl_advantages: A_t = -coef * (log pi(y_t) - log pi_T(y_t)), optionally summed over later tokens with a
  discount (0: this token only; 1: all later tokens, the reward-to-go of the sequence-level reverse KL);
- group_advantages: a task reward minus the mean over the samples of its prompt (GRPO's group baseline);
- mismatch_weights: pi_trainer / pi_engine of each sampled token, truncated at a cap or masked outside a band;
- clipped_surrogate: PPO's clipped objective, per token.
With advantages held fixed and the ratio at 1, the gradient of the surrogate is -A_t * grad log pi(y_t): the
probability-weighted sum of it over every response is the gradient of the exact sequence-level reverse KL
(discount 1) or of the per-position KLs with the visited prefixes held fixed (discount 0)."""
from typing import Optional

import torch


def discounted_sums(values: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """out[t] = sum over later response positions s >= t of discount^(s-t) values[s] ([b, s]; mask 0 elsewhere)."""
    values = torch.where(mask.bool(), values, 0.0)
    if discount == 0:
        return values
    out = torch.empty_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):  # a response is contiguous: padding after it adds 0
        running = values[:, t] + discount * running
        out[:, t] = running
    return torch.where(mask.bool(), out, 0.0)


def kl_advantages(logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor, coef: float,
                  discount: float, clamp: Optional[float] = None) -> torch.Tensor:
    """Per-token advantages [b, s] of the reverse KL (no gradient flows through them); `clamp`: each token's
    log-ratio clamped to [-clamp, clamp] first (verl's loss_max_clamp)."""
    log_ratio = (logprobs - teacher_logprobs).detach()
    if clamp is not None:
        log_ratio = log_ratio.clamp(-clamp, clamp)
    return discounted_sums(-coef * log_ratio, mask, discount)


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[n] rewards of consecutive groups of `group_size` samples minus their group's mean."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of rollout.n={group_size}")
    grouped = rewards.reshape(-1, group_size)
    return (grouped - grouped.mean(-1, keepdim=True)).reshape(-1)


def mismatch_weights(trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor, cap: float,
                     mode: str, num_tokens=None) -> tuple[torch.Tensor, dict]:
    """Importance weights [b, s] of the sampled tokens, pi_trainer / pi_engine (no gradient): min(ratio, cap)
    (mode truncate) or 0 outside [1/cap, cap] (mode mask); and their metrics over the response tokens, the
    means as shares of `num_tokens` (default: this mask's; see loss/distillation.py) and the max."""
    log_ratio = (trainer_logprobs - engine_logprobs).detach()
    ratio = torch.exp(log_ratio)
    kept = mask.bool()
    if mode == "truncate":
        changed = (ratio > cap) & kept
        weights = torch.clamp(ratio, max=cap)
    elif mode == "mask":
        changed = ((ratio > cap) | (ratio < 1 / cap)) & kept
        weights = torch.where(changed, 0.0, ratio)
    else:
        raise ValueError(f"actor.is_mode={mode!r}: expected truncate or mask")
    count = (kept.sum() if num_tokens is None else torch.as_tensor(num_tokens, device=mask.device)).clamp(min=1)
    metrics = {"mismatch/ratio_mean": torch.where(kept, ratio, 0.0).sum() / count,
               "mismatch/ratio_max": torch.where(kept, ratio, 0.0).max(),
               "mismatch/changed_fraction": changed.sum() / count,
               # KL(engine || trainer) on the engine's own samples: E_engine[log pi_engine - log pi_trainer]
               "mismatch/kl_engine_trainer": torch.where(kept, -log_ratio, 0.0).sum() / count}
    return torch.where(kept, weights, 0.0), metrics


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token loss -min(r A, clip(r, 1-e, 1+e) A), r = pi / pi_old; and where the clip was active."""
    ratio = torch.exp(logprobs - old_logprobs.detach())
    unclipped, clipped = ratio * advantages, torch.clamp(ratio, 1 - clip_ratio, 1 + clip_ratio) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)

"""The student's loss per micro-batch, fused with its output layer: from its final hidden states [mb, s, H]
and its output-layer weight shard [V/TP, H] (tied to the embedding or not), and what the teacher kept
(megatron_opd/teacher/outputs.py): the sampled token's log-probs, top-k ids and log-probs, or its final
hidden states with its output layer cut to the student's vocabulary shard (`head_weight`). No [T, V/TP]
logits tensor exists on either side (megatron_opd/loss/fused.py).

Two forms (actor.policy_loss): `direct`, the divergence's own gradient; `pg`, a PPO-clipped policy gradient
whose advantages are the sampled tokens' reverse KL (and a task reward), megatron_opd/loss/policy_gradient.py."""
import math

import torch

from megatron_opd.loss import (
    aggregate, distillation_loss, fused_linear_divergence, fused_linear_entropy, fused_linear_log_probs,
    sampled_token_kl)
from megatron_opd.loss.kinds import FULL_KINDS, SAMPLED_KINDS
from megatron_opd.loss.policy_gradient import clipped_surrogate, kl_advantages, mismatch_weights
from megatron_opd.loss.topk import topk_bucket_divergence
from megatron_opd.trainer.config import ActorConfig

PARTS = ("on_policy", "off_policy")  # the student's own samples; given responses (actor.lmbda < 1)


def per_token_kl(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, teacher: dict, head_weight,
                 actor: ActorConfig, temperature: float, vocab_size: int, group,
                 sampled_logprobs=None) -> torch.Tensor:
    """`sampled_logprobs`: the student's log-probs of `labels`, when the caller already has them."""
    kind = actor.kl_loss_type
    if kind in FULL_KINDS:
        return fused_linear_divergence(hidden, weight, teacher["hidden"], head_weight, kind=kind, beta=actor.jsd_beta,
                                       temperature=temperature, group=group, vocab_size=vocab_size)
    if kind in SAMPLED_KINDS and sampled_logprobs is not None:
        return sampled_token_kl(sampled_logprobs, teacher["logprobs"], kind)
    ids = labels if kind in SAMPLED_KINDS else teacher["topk_ids"]
    student_logprobs = fused_linear_log_probs(hidden, weight, ids, temperature, group=group, vocab_size=vocab_size)
    if kind in SAMPLED_KINDS:
        return sampled_token_kl(student_logprobs, teacher["logprobs"], kind)
    return topk_bucket_divergence(student_logprobs, teacher["topk_logprobs"], kind.removeprefix("topk_"))


def student_loss(hidden, weight, labels, loss_mask, teacher, head_weight, actor: ActorConfig, temperature: float,
                 vocab_size: int, group, counts, index: int, on_policy=None) -> tuple[torch.Tensor, dict]:
    """Micro-batch `index`'s share of the mini-batch loss (shares sum to the global value). With `on_policy`
    ([mb], which rows the student sampled): also the KL sum and token count of each part."""
    kl = per_token_kl(hidden, weight, labels, teacher, head_weight, actor, temperature, vocab_size, group)
    entropy = (fused_linear_entropy(hidden, weight, temperature, group=group, vocab_size=vocab_size)
               if actor.entropy_coeff else None)
    loss, metrics = distillation_loss(kl, loss_mask, actor.kl_loss_coef, entropy, actor.entropy_coeff,
                                      actor.loss_agg_mode, global_num_tokens=counts.num_tokens,
                                      global_num_seqs=counts.num_seqs, seq_num_tokens=counts.seq_num_tokens[index])
    if on_policy is not None:
        for part, rows in zip(PARTS, (on_policy, ~on_policy)):
            mask = loss_mask * rows[:, None]
            metrics[f"actor/kl_sum_{part}"] = (kl.detach() * mask).sum()
            metrics[f"actor/tokens_{part}"] = mask.sum()
    return loss, metrics


def teacher_token_log_probs(teacher: dict, head_weight, labels, kind: str, temperature: float, vocab_size: int,
                            group) -> torch.Tensor:
    """The teacher's log-prob of each sampled token [mb, s]: kept as such (sampled kinds), or formed from its
    hidden states and output layer (full kinds)."""
    if kind in SAMPLED_KINDS:
        return teacher["logprobs"]
    with torch.no_grad():
        return fused_linear_log_probs(teacher["hidden"], head_weight, labels, temperature, group=group,
                                      vocab_size=vocab_size)


def policy_gradient_loss(hidden, weight, mb, teacher, head_weight, actor: ActorConfig, reward_coef: float,
                         temperature: float, vocab_size: int, group, counts, index: int,
                         old_logprobs=None) -> tuple[torch.Tensor, dict]:
    """Micro-batch `index`'s share of the PPO-clipped policy-gradient loss on `mb`'s sampled tokens.
    `old_logprobs`: the student's before this step's first update (None: the current ones, the same values
    in a step's only update). The advantages are taken at pi_old, fixed for the step, as in PPO."""
    mask = mb.loss_mask
    logprobs = fused_linear_log_probs(hidden, weight, mb.labels, temperature, group=group, vocab_size=vocab_size)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    teacher_logprobs = teacher_token_log_probs(teacher, head_weight, mb.labels, actor.kl_loss_type, temperature,
                                               vocab_size, group)
    advantages = kl_advantages(old, teacher_logprobs, mask, actor.kl_loss_coef, actor.kl_discount)
    advantages = advantages + reward_coef * mb.reward_advantages[:, None] * mask
    per_token, clipped = clipped_surrogate(logprobs, old, advantages, actor.clip_ratio)
    weights, metrics = mismatch_weights(old, mb.engine_logprobs, mask, actor.is_cap or math.inf, actor.is_mode,
                                        counts.num_tokens)
    if actor.is_cap is not None:
        per_token = per_token * weights
    counted = dict(global_num_tokens=counts.num_tokens, global_num_seqs=counts.num_seqs,
                   seq_num_tokens=counts.seq_num_tokens[index])
    loss = aggregate(per_token, mask, actor.loss_agg_mode, **counted)
    with torch.no_grad():  # the divergence the direct form would train on, reported whatever the form
        kl = per_token_kl(hidden.detach(), weight, mb.labels, teacher, head_weight, actor, temperature, vocab_size,
                          group, logprobs.detach())
    token_mean = lambda values: aggregate(values, mask, "token-mean", counts.num_tokens)  # noqa: E731
    metrics.update({"actor/pg_loss": loss.detach(), "actor/pg_clipfrac": token_mean(clipped.to(mask.dtype)),
                    "actor/advantage_mean": token_mean(advantages),
                    "actor/kl_loss": aggregate(kl, mask, actor.loss_agg_mode, **counted)})
    if actor.entropy_coeff:
        entropy = aggregate(fused_linear_entropy(hidden, weight, temperature, group=group, vocab_size=vocab_size),
                            mask, actor.loss_agg_mode, **counted)
        metrics["actor/entropy_loss"] = entropy.detach()
        loss = loss - actor.entropy_coeff * entropy
    return loss, metrics


def sft_loss(hidden, weight, labels, loss_mask, vocab_size: int, group, counts, index: int, loss_agg_mode: str):
    """Cross-entropy on the given responses, aggregated like the distillation loss."""
    nll = -fused_linear_log_probs(hidden, weight, labels, group=group, vocab_size=vocab_size)
    loss = aggregate(nll, loss_mask, loss_agg_mode, counts.num_tokens, counts.num_seqs, counts.seq_num_tokens[index])
    return loss, {"actor/sft_loss": loss.detach()}

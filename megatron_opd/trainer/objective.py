"""The student's loss per micro-batch, fused with its output layer: from its final hidden states [mb, s, H]
and its output-layer weight shard [V/TP, H] (tied to the embedding or not), and what the teacher kept
(megatron_opd/teacher/outputs.py): the sampled token's log-probs, top-k ids and log-probs, or its final
hidden states with its output layer cut to the student's vocabulary shard (`head_weight`). No [T, V/TP]
logits tensor exists on either side (megatron_opd/loss/fused.py).

Two forms (actor.policy_loss): `direct`, the divergence's own gradient; `pg`, a PPO-clipped policy gradient
whose advantages are the sampled tokens' reverse KL (and a task reward), megatron_opd/loss/policy_gradient.py.
`Objective` holds what a run fixes (the actor's settings, the temperature, the vocabulary and TP group, the
teacher's head); `LossInputs` what one micro-batch brings."""
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_opd.config import ActorConfig, OPDConfig, divergence_temperature
from megatron_opd.loss import (
    ResponseCounts, aggregate, distillation_loss, fused_linear_divergence, fused_linear_entropy,
    fused_linear_log_probs, sampled_token_kl)
from megatron_opd.loss.kinds import FULL_KINDS, SAMPLED_KINDS
from megatron_opd.loss.policy_gradient import clipped_surrogate, kl_advantages, mismatch_weights
from megatron_opd.loss.shared_vocab import SharedVocabHead, fused_linear_shared_vocab_divergence
from megatron_opd.loss.topk import topk_bucket_divergence
from megatron_opd.models.batch import TokenBatch
from megatron_opd.teacher.routed import RoutedTeachers, per_teacher

PARTS = ("on_policy", "off_policy")  # the student's own samples; given responses (actor.lmbda < 1)


def engine_logprobs_read(actor: ActorConfig, stale: bool) -> bool:
    """Whether the loss reads the engine's log-prob of each sampled token: the pg form always; the direct form to
    measure (and with actor.is_cap correct) a lag or mismatch between the engine's weights and the trainer's."""
    return actor.policy_loss == "pg" or stale or actor.is_cap is not None


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch's share of a mini-batch's loss: what the student's last stage made of it and what it
    is compared with."""
    hidden: torch.Tensor  # [mb, s, H] the student's final hidden states
    weight: torch.Tensor  # [V/TP, H] its output layer's vocabulary shard
    batch: TokenBatch  # labels, loss mask, which rows are its own samples, engine log-probs, reward advantages
    counts: ResponseCounts  # the mini-batch's response counts over all ranks
    index: int  # the micro-batch's place in the mini-batch
    teacher: Optional[dict] = None  # what the teacher kept for it; None in SFT
    old_logprobs: Optional[torch.Tensor] = None  # pg: the student's before the step's first update

    def aggregate(self, values: torch.Tensor, mode: str) -> torch.Tensor:
        """This micro-batch's share of the mini-batch aggregate of `values` [mb, s] over its response tokens."""
        counts = self.counts
        return aggregate(values, self.batch.loss_mask, mode, counts.num_tokens, counts.num_seqs,
                         counts.seq_num_tokens[self.index])


class Objective:
    def __init__(self, actor: ActorConfig, temperature: float, vocab_size: int, group: Any = None,
                 head_weight=None, reward_coef: float = 0.0, sft: bool = False, teacher_names: tuple = (),
                 stale: bool = False):
        """`group`: the TP group (None: one vocabulary shard); `head_weight`: the teacher's output layer cut to
        the student's shard (full kinds), or with several teachers (`teacher_names`, in the batch's
        teacher_index order) a list of them; `stale`: samples drawn from older weights (rollout.max_staleness)."""
        self.actor, self.temperature, self.vocab_size, self.group = actor, temperature, vocab_size, group
        self.head_weight, self.reward_coef, self.sft, self.teacher_names = head_weight, reward_coef, sft, teacher_names
        self.direct_mismatch = engine_logprobs_read(actor, stale) and actor.policy_loss == "direct"

    @classmethod
    def of_run(cls, cfg: OPDConfig, vocab_size: int, group, teacher) -> "Objective":
        return cls(cfg.actor, divergence_temperature(cfg), vocab_size, group,
                   teacher.head_weight if teacher is not None else None, cfg.reward.coef, cfg.trainer.mode == "sft",
                   tuple(teacher.names) if isinstance(teacher, RoutedTeachers) else (),
                   cfg.rollout.max_staleness > 0)

    def __call__(self, inputs: LossInputs) -> tuple[torch.Tensor, dict]:
        """The micro-batch's share of the loss (shares sum to the mini-batch's value) and its metrics."""
        if self.sft:
            return self.sft_loss(inputs)
        if self.actor.policy_loss == "pg":
            return self.policy_gradient_loss(inputs)
        return self.direct_loss(inputs)

    def log_probs(self, hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor,
                  temperature: Optional[float] = None) -> torch.Tensor:
        """Log-probs of `token_ids` under hidden @ weight.T at the divergence's temperature (or `temperature`)."""
        return fused_linear_log_probs(hidden, weight, token_ids, self.temperature if temperature is None else temperature,
                                      group=self.group, vocab_size=self.vocab_size)

    def _entropy(self, inputs: LossInputs) -> torch.Tensor:
        return fused_linear_entropy(inputs.hidden, inputs.weight, self.temperature, group=self.group,
                                    vocab_size=self.vocab_size)

    def per_token_kl(self, inputs: LossInputs, sampled_logprobs=None) -> torch.Tensor:
        """[mb, s], each row against its own teacher. `sampled_logprobs`: the student's log-probs of the labels,
        when the caller has them."""
        kind, labels = self.actor.kl_loss_type, inputs.batch.labels

        def divergence(rows, teacher, head):
            hidden = inputs.hidden[rows]
            if kind in FULL_KINDS:
                full = dict(kind=kind, beta=self.actor.jsd_beta, temperature=self.temperature, group=self.group,
                            vocab_size=self.vocab_size)
                if isinstance(head, SharedVocabHead):  # a teacher of another tokenizer
                    return fused_linear_shared_vocab_divergence(hidden, inputs.weight, teacher["hidden"], head,
                                                                teacher["log_masses"], **full)
                return fused_linear_divergence(hidden, inputs.weight, teacher["hidden"], head, **full)
            if kind in SAMPLED_KINDS:
                student = (sampled_logprobs[rows] if sampled_logprobs is not None
                           else self.log_probs(hidden, inputs.weight, labels[rows]))
                return sampled_token_kl(*self._floored(student, teacher["logprobs"]), kind)
            student_topk = self.log_probs(hidden, inputs.weight, teacher["topk_ids"])
            return topk_bucket_divergence(*self._floored(student_topk, teacher["topk_logprobs"]),
                                          kind.removeprefix("topk_"))

        kl = per_teacher(inputs.teacher, inputs.batch, self.head_weight, divergence)
        clamp = self.actor.loss_max_clamp
        return kl if clamp is None else kl.clamp(-clamp, clamp)

    def _floored(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple:
        """actor.log_prob_min_clamp: both sides' log-probs floored before an estimator (verl's knob)."""
        floor = self.actor.log_prob_min_clamp
        return (student, teacher) if floor is None else (student.clamp(min=floor), teacher.clamp(min=floor))

    def _teacher_metrics(self, inputs: LossInputs, kl: torch.Tensor) -> dict:
        """Per teacher: its tokens' summed divergence and their count (the loop makes them a token-mean), and
        with actor.loss_max_clamp the tokens where the clamp binds."""
        mask, metrics = inputs.batch.loss_mask, {}
        if self.actor.loss_max_clamp is not None:
            bound = (kl.detach().abs() >= self.actor.loss_max_clamp).to(mask.dtype)
            metrics["actor/loss_clamp_frac"] = inputs.aggregate(bound, "token-mean")
        for index, name in enumerate(self.teacher_names):
            rows = mask * (inputs.batch.teacher_index == index)[:, None]
            metrics[f"teacher/{name}/kl_sum"] = (kl.detach() * rows).sum()
            metrics[f"teacher/{name}/kl_tokens"] = rows.sum()
        return metrics

    def direct_loss(self, inputs: LossInputs) -> tuple[torch.Tensor, dict]:
        """kl_loss_coef x the divergence - entropy_coeff x entropy. With actor.lmbda < 1 also the KL sum and
        token count of each part (the student's own samples, the given responses)."""
        actor, mask, counts = self.actor, inputs.batch.loss_mask, inputs.counts
        correction = {}
        if self.direct_mismatch:
            kl, correction = self._lag_corrected_kl(inputs)
        else:
            kl = self.per_token_kl(inputs)
        entropy = self._entropy(inputs) if actor.entropy_coeff else None
        loss, metrics = distillation_loss(kl, mask, actor.kl_loss_coef, entropy, actor.entropy_coeff,
                                          actor.loss_agg_mode, global_num_tokens=counts.num_tokens,
                                          global_num_seqs=counts.num_seqs,
                                          seq_num_tokens=counts.seq_num_tokens[inputs.index])
        metrics.update(self._teacher_metrics(inputs, kl))
        metrics.update(correction)
        if actor.lmbda < 1:
            on_policy = inputs.batch.on_policy
            for part, rows in zip(PARTS, (on_policy, ~on_policy)):
                part_mask = mask * rows[:, None]
                metrics[f"actor/kl_sum_{part}"] = (kl.detach() * part_mask).sum()
                metrics[f"actor/tokens_{part}"] = part_mask.sum()
        return loss, metrics

    def _lag_corrected_kl(self, inputs: LossInputs) -> tuple[torch.Tensor, dict]:
        """The direct form on samples the engine drew (older weights under rollout.max_staleness, or an engine of
        other numerics): the trainer/engine ratio of each sampled token measured (mismatch/*) and, with
        actor.is_cap on a sampled kind, each token's divergence weighted by it (no gradient through the weight),
        the per-token importance correction of an estimator on the engine's samples. A full kind is exact at each
        position over the vocabulary; the lag only changes which prefixes are visited, which no per-token weight
        corrects: it is measured."""
        actor, mb = self.actor, inputs.batch
        own = mb.loss_mask * mb.on_policy[:, None]
        if actor.kl_loss_type in SAMPLED_KINDS:
            logprobs = self.log_probs(inputs.hidden, inputs.weight, mb.labels)
            kl = self.per_token_kl(inputs, logprobs)
        else:
            kl = self.per_token_kl(inputs)
            with torch.no_grad():
                logprobs = self.log_probs(inputs.hidden, inputs.weight, mb.labels)
        weights, metrics = mismatch_weights(logprobs.detach(), mb.engine_logprobs, own, actor.is_cap or math.inf,
                                            actor.is_mode, inputs.counts.num_tokens)
        if actor.is_cap is not None:
            kl = torch.where(own.bool(), kl * weights, kl)
        return kl, metrics

    def teacher_token_log_probs(self, inputs: LossInputs) -> torch.Tensor:
        """Each row's teacher's log-prob of each sampled token [mb, s]: kept as such (sampled kinds), or formed
        from its hidden states and output layer (full kinds)."""
        labels = inputs.batch.labels

        def token_log_probs(rows, teacher, head):
            if self.actor.kl_loss_type in SAMPLED_KINDS:
                return teacher["logprobs"]
            with torch.no_grad():
                return self.log_probs(teacher["hidden"], head, labels[rows])

        return per_teacher(inputs.teacher, inputs.batch, self.head_weight, token_log_probs)

    def policy_gradient_loss(self, inputs: LossInputs) -> tuple[torch.Tensor, dict]:
        """The PPO-clipped policy-gradient loss on the micro-batch's sampled tokens. The advantages are taken at
        pi_old (inputs.old_logprobs; None: the current log-probs, the same values in a step's only update),
        fixed for the step, as in PPO."""
        actor, mb, mask = self.actor, inputs.batch, inputs.batch.loss_mask
        logprobs = self.log_probs(inputs.hidden, inputs.weight, mb.labels)
        old = logprobs.detach() if inputs.old_logprobs is None else inputs.old_logprobs
        advantages = kl_advantages(*self._floored(old, self.teacher_token_log_probs(inputs)), mask, actor.kl_loss_coef,
                                   actor.kl_discount, actor.loss_max_clamp)
        advantages = advantages + self.reward_coef * mb.reward_advantages[:, None] * mask
        per_token, clipped = clipped_surrogate(logprobs, old, advantages, actor.clip_ratio)
        weights, metrics = mismatch_weights(old, mb.engine_logprobs, mask, actor.is_cap or math.inf, actor.is_mode,
                                            inputs.counts.num_tokens)
        if actor.is_cap is not None:
            per_token = per_token * weights
        loss = inputs.aggregate(per_token, actor.loss_agg_mode)
        with torch.no_grad():  # the divergence the direct form would train on, reported whatever the form
            detached = LossInputs(inputs.hidden.detach(), inputs.weight, mb, inputs.counts, inputs.index, inputs.teacher)
            kl = self.per_token_kl(detached, logprobs.detach())
        metrics.update({"actor/pg_loss": loss.detach(),
                        "actor/pg_clipfrac": inputs.aggregate(clipped.to(mask.dtype), "token-mean"),
                        "actor/advantage_mean": inputs.aggregate(advantages, "token-mean"),
                        "actor/kl_loss": inputs.aggregate(kl, actor.loss_agg_mode)})
        metrics.update(self._teacher_metrics(inputs, kl))
        if actor.entropy_coeff:
            entropy = inputs.aggregate(self._entropy(inputs), actor.loss_agg_mode)
            metrics["actor/entropy_loss"] = entropy.detach()
            loss = loss - actor.entropy_coeff * entropy
        return loss, metrics

    def sft_loss(self, inputs: LossInputs) -> tuple[torch.Tensor, dict]:
        """Cross-entropy on the given responses (temperature 1), aggregated like the distillation loss."""
        nll = -self.log_probs(inputs.hidden, inputs.weight, inputs.batch.labels, temperature=1.0)
        loss = inputs.aggregate(nll, self.actor.loss_agg_mode)
        return loss, {"actor/sft_loss": loss.detach()}

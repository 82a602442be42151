"""The student's loss per micro-batch, from what the teacher kept for it (megatron_opd/teacher/outputs.py):
the sampled token's log-probs, top-k ids and log-probs, or its final hidden states, whose logits on the
student's vocabulary shard are formed chunk by chunk from the teacher's output layer (`head_weight`)."""
import torch

from megatron_opd.loss import (
    LinearHead, aggregate, distillation_loss, sampled_token_kl, topk_divergence, vocab_parallel_divergence,
    vocab_parallel_entropy, vocab_parallel_log_probs)
from megatron_opd.loss.kinds import FULL_KINDS, SAMPLED_KINDS
from megatron_opd.trainer.config import ActorConfig


def per_token_kl(student_logits: torch.Tensor, labels: torch.Tensor, teacher: dict, head_weight, actor: ActorConfig,
                 temperature: float, vocab_size: int, group) -> torch.Tensor:
    kind = actor.kl_loss_type
    if kind in SAMPLED_KINDS:
        student_lp = vocab_parallel_log_probs(student_logits, labels, temperature, group=group, vocab_size=vocab_size)
        return sampled_token_kl(student_lp, teacher["logprobs"], kind)
    if kind in FULL_KINDS:
        return vocab_parallel_divergence(student_logits, LinearHead(teacher["hidden"], head_weight), kind=kind,
                                         beta=actor.jsd_beta, temperature=temperature, group=group,
                                         vocab_size=vocab_size)
    return topk_divergence(student_logits, teacher["topk_ids"], teacher["topk_logprobs"],
                           kind=kind.removeprefix("topk_"), temperature=temperature, group=group,
                           vocab_size=vocab_size)


def student_loss(student_logits, labels, loss_mask, teacher, head_weight, actor: ActorConfig, temperature: float,
                 vocab_size: int, group, counts, index: int) -> tuple[torch.Tensor, dict]:
    """Micro-batch `index`'s share of the mini-batch loss (shares sum to the global value)."""
    kl = per_token_kl(student_logits, labels, teacher, head_weight, actor, temperature, vocab_size, group)
    entropy = (vocab_parallel_entropy(student_logits, temperature, group=group, vocab_size=vocab_size)
               if actor.entropy_coeff else None)
    return distillation_loss(kl, loss_mask, actor.kl_loss_coef, entropy, actor.entropy_coeff, actor.loss_agg_mode,
                             global_num_tokens=counts.num_tokens, global_num_seqs=counts.num_seqs,
                             seq_num_tokens=counts.seq_num_tokens[index])


def sft_loss(student_logits, labels, loss_mask, vocab_size: int, group, counts, index: int, loss_agg_mode: str):
    """Cross-entropy on the given responses, aggregated like the distillation loss."""
    nll = -vocab_parallel_log_probs(student_logits, labels, group=group, vocab_size=vocab_size)
    loss = aggregate(nll, loss_mask, loss_agg_mode, counts.num_tokens, counts.num_seqs, counts.seq_num_tokens[index])
    return loss, {"actor/sft_loss": loss.detach()}

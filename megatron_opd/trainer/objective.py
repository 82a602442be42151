"""What the teacher keeps from its forward pass, and the student's loss from it, per micro-batch.

The teacher keeps as little as the loss needs, on the last pipeline stage, sharded over TP:
  sampled kinds (kl, abs, mse, low_var_kl): the log-prob of each next token   [mb, s]
  full kinds (forward, reverse, jsd):       its logits shard                  [mb, s, V/TP]
  top-k kinds:                              top-k ids and log-probs           [mb, s, K]
Only per-token scalars (and K ids per token for top-k) cross TP ranks.
"""
import torch
import torch.distributed as dist

from megatron_opd.loss import (
    aggregate, distillation_loss, sampled_token_kl, topk_divergence, vocab_parallel_divergence, vocab_parallel_entropy,
    vocab_parallel_log_probs)
from megatron_opd.trainer.config import FULL_KL, SAMPLED_KL, ActorConfig


def vocab_parallel_topk(logits: torch.Tensor, k: int, vocab_size: int, group) -> torch.Tensor:
    """Global ids [..., K] of the K largest logits of a vocab-sharded [..., V/TP] (K per rank gathered)."""
    shard = logits.shape[-1]
    rank = dist.get_rank(group) if group is not None else 0
    first = rank * shard
    padded = torch.arange(first, first + shard, device=logits.device) >= vocab_size
    masked = logits.float().masked_fill(padded, float("-inf"))
    values, ids = masked.topk(k, dim=-1)
    ids = ids + first
    if group is not None and dist.get_world_size(group) > 1:
        all_values = [torch.empty_like(values) for _ in range(dist.get_world_size(group))]
        all_ids = [torch.empty_like(ids) for _ in range(dist.get_world_size(group))]
        dist.all_gather(all_values, values.contiguous(), group=group)
        dist.all_gather(all_ids, ids.contiguous(), group=group)
        values, ids = torch.cat(all_values, -1), torch.cat(all_ids, -1)
    return ids.gather(-1, values.topk(k, dim=-1).indices)


@torch.no_grad()
def teacher_outputs(logits: torch.Tensor, labels: torch.Tensor, actor: ActorConfig, temperature: float,
                    vocab_size: int, group) -> dict:
    kind = actor.kl_loss_type
    if kind in SAMPLED_KL:
        return {"logprobs": vocab_parallel_log_probs(logits, labels, temperature, group=group, vocab_size=vocab_size)}
    if kind in FULL_KL:
        return {"logits": logits.detach().clone()}
    ids = vocab_parallel_topk(logits / temperature, actor.topk, vocab_size, group)
    return {"topk_ids": ids, "topk_logprobs": vocab_parallel_log_probs(logits, ids, temperature, group=group,
                                                                       vocab_size=vocab_size)}


def per_token_kl(student_logits: torch.Tensor, labels: torch.Tensor, teacher: dict, actor: ActorConfig,
                 temperature: float, vocab_size: int, group) -> torch.Tensor:
    kind = actor.kl_loss_type
    if kind in SAMPLED_KL:
        student_lp = vocab_parallel_log_probs(student_logits, labels, temperature, group=group, vocab_size=vocab_size)
        return sampled_token_kl(student_lp, teacher["logprobs"], kind)
    if kind in FULL_KL:
        return vocab_parallel_divergence(student_logits, teacher["logits"], kind=kind, beta=actor.jsd_beta,
                                         temperature=temperature, group=group, vocab_size=vocab_size)
    return topk_divergence(student_logits, teacher["topk_ids"], teacher["topk_logprobs"],
                           kind=kind.removeprefix("topk_"), temperature=temperature, group=group,
                           vocab_size=vocab_size)


def student_loss(student_logits, labels, loss_mask, teacher, actor: ActorConfig, temperature: float,
                 vocab_size: int, group, counts, index: int) -> tuple[torch.Tensor, dict]:
    """Micro-batch `index`'s share of the mini-batch loss (shares sum to the global value)."""
    kl = per_token_kl(student_logits, labels, teacher, actor, temperature, vocab_size, group)
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

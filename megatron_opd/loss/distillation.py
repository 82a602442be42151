"""The trainer's loss: kl_loss_coef * KL - entropy_coeff * entropy, aggregated over response tokens so that
the result is exact across micro-batches and data/context-parallel ranks.

Aggregation modes (verl's `agg_loss`, over the whole mini-batch on all ranks):
  token-mean            sum of all response tokens' values / number of response tokens
  seq-mean-token-sum    mean over sequences of each sequence's sum
  seq-mean-token-mean   mean over sequences of each sequence's mean
Sequences without response tokens are left out of the sequence means (as in current verl).

Each call sees one micro-batch on one rank, and divides its partial sum by the mini-batch's global counts
(`response_counts`). So the returned losses are shares that SUM to the global value over micro-batches and
DP x CP ranks, and summing their gradients gives the gradient of the global value. A framework that
averages instead (a DDP dividing by its group size, a schedule dividing by the number of micro-batches)
must have its divisor multiplied back. TP ranks hold the same tokens and must not be counted.
"""
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


@dataclass(frozen=True)
class ResponseCounts:
    num_tokens: torch.Tensor  # response tokens in the mini-batch, all ranks
    num_seqs: torch.Tensor  # sequences with at least one response token, all ranks
    seq_num_tokens: list  # per micro-batch: [b] response tokens of each sequence over its CP ranks


def _all_reduce(values: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(values, group=group)
    return values


def response_counts(response_masks: Union[torch.Tensor, Sequence[torch.Tensor]], dp_group=None,
                    cp_group=None) -> ResponseCounts:
    """Counts of this rank's mini-batch (its micro-batches' masks [b, s_local]) over all ranks.
    `cp_group` holds the ranks that split the same sequences (context parallel), `dp_group` the ranks with
    different sequences (data parallel, without CP). None means no split along that axis. Unlike the loss
    functions' `group`, None never means the TP group: TP ranks see the same tokens."""
    masks = [response_masks] if isinstance(response_masks, torch.Tensor) else list(response_masks)
    if not masks:
        raise ValueError("response_counts needs the response masks of at least one micro-batch")
    # float64 holds token counts exactly, and gloo reduces it everywhere
    per_seq = torch.cat([mask.reshape(mask.shape[0], -1).to(torch.float64).sum(-1) for mask in masks])
    per_seq = _all_reduce(per_seq, cp_group)
    totals = _all_reduce(torch.stack([per_seq.sum(), (per_seq > 0).to(torch.float64).sum()]), dp_group)
    return ResponseCounts(num_tokens=totals[0], num_seqs=totals[1],
                          seq_num_tokens=list(per_seq.split([mask.shape[0] for mask in masks])))


def _like(count, values: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(count, device=values.device, dtype=values.dtype).clamp(min=1)


def aggregate(values: torch.Tensor, response_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
              global_num_tokens=None, global_num_seqs=None, seq_num_tokens=None) -> torch.Tensor:
    """This micro-batch's share of the mini-batch aggregate of `values` [b, s] under `response_mask`.
    The counts default to this micro-batch's own (the exact value for a single micro-batch on one rank)."""
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r}: expected one of {AGG_MODES}")
    if values.shape != response_mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and response_mask {tuple(response_mask.shape)} "
                         "must have the same shape [b, s]")
    # where, not values * mask: positions outside the response may hold inf/nan (padding)
    seq_sums = torch.where(response_mask.bool(), values, 0.0).reshape(values.shape[0], -1).sum(-1)  # [b]
    local_seq_tokens = response_mask.to(values.dtype).reshape(values.shape[0], -1).sum(-1)
    if loss_agg_mode == "token-mean":
        num_tokens = local_seq_tokens.sum() if global_num_tokens is None else global_num_tokens
        return seq_sums.sum() / _like(num_tokens, values)
    num_seqs = (local_seq_tokens > 0).sum() if global_num_seqs is None else global_num_seqs
    num_seqs = _like(num_seqs, values)
    if loss_agg_mode == "seq-mean-token-sum":
        return seq_sums.sum() / num_seqs
    seq_tokens = local_seq_tokens if seq_num_tokens is None else seq_num_tokens
    return (seq_sums / _like(seq_tokens, values)).sum() / num_seqs


def distillation_loss(per_token_kl: torch.Tensor, response_mask: torch.Tensor, kl_loss_coef: float = 1.0,
                      entropy: Optional[torch.Tensor] = None, entropy_coeff: float = 0.0,
                      loss_agg_mode: str = "token-mean", global_num_tokens=None, global_num_seqs=None,
                      seq_num_tokens=None) -> tuple[torch.Tensor, dict]:
    """kl_loss_coef * agg(per_token_kl) - entropy_coeff * agg(entropy), both [b, s] under `response_mask`,
    with the counts of `response_counts` (see the module docstring). Returns the loss and the metrics
    `actor/kl_loss` and (when `entropy` is given) `actor/entropy_loss`: detached aggregates, shares that
    sum to the mini-batch value like the loss."""
    counts = dict(loss_agg_mode=loss_agg_mode, global_num_tokens=global_num_tokens,
                  global_num_seqs=global_num_seqs, seq_num_tokens=seq_num_tokens)
    kl_loss = aggregate(per_token_kl, response_mask, **counts)
    loss = kl_loss_coef * kl_loss
    metrics = {"actor/kl_loss": kl_loss.detach()}
    if entropy is None:
        if entropy_coeff != 0.0:
            raise ValueError(f"entropy_coeff={entropy_coeff} needs the per-token entropy "
                             "(vocab_parallel_entropy of the student's logits)")
        return loss, metrics
    entropy_loss = aggregate(entropy, response_mask, **counts)
    metrics["actor/entropy_loss"] = entropy_loss.detach()
    return loss - entropy_coeff * entropy_loss, metrics

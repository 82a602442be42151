"""Forward KL, reverse KL and JSD between a student and a teacher of another vocabulary, over the tokens both
vocabularies share as strings (data/xtok/shared.py), fused with both output layers like the same-vocabulary
divergence: no [T, V] tensor on either side.

Both next-token distributions are coarsened to the same buckets: each shared token on its own, and one bucket
`rest` holding everything else (the student's unshared tokens on one side, the teacher's on the other):
  p(s), q(s) for shared s      P = 1 - sum_s p(s), Q = 1 - sum_s q(s)
q(s) is the teacher's probability of s over its whole vocabulary (its log-normaliser over all of it, and its
rest's mass, come with its hidden states), so the shared part is exact and nothing is renormalised away. The unshared tokens of
either side have no counterpart to compare with one by one; their total mass is compared, as the top-k
kinds compare their tail (loss/topk.py). That is the rest's treatment: a lower bound of any finer matching
(the data-processing inequality), exact when the vocabularies are one numbered apart (P = Q = 0).

The buckets' divergence is the existing divergence kernels' (loss/divergence.py) against a completed teacher
q~ over the student's vocabulary: q~(s) = q(s) on shared tokens, and on the student's unshared tokens u the
rest spread as the student spreads its own, q~(u) = Q p(u) / P. These three divergences are f-divergences,
homogeneous of degree 1 in (p, q), so D(p || q~) over the vocabulary equals D over the buckets, and its
gradient with q~ held fixed is the buckets' gradient (the terms through p(u) / P cancel): the kernels need
no change but their teacher columns. The completed teacher's logits are the teacher's own on shared columns,
and the student's own shifted by one per-token constant on the others, found in a pre-pass over the chunks. The
teacher's rest mass Q comes from the teacher, summed over its unshared tokens (`teacher_log_masses`).
"""
import math
from dataclasses import dataclass

import torch

from megatron_opd.loss.divergence import divergence_kernel
from megatron_opd.loss.fused import ProjectedLogits, _FusedChunkedLoss, _flat
from megatron_opd.loss.vocab_parallel import (
    chunk_rows, compute_dtype, head_chunk_size, local_max, shifted_logits, vocab_shard)

LOG_EPS = math.log(torch.finfo(torch.float64).eps)


@dataclass(frozen=True)
class SharedVocabHead:
    """A teacher of another vocabulary on the student's vocabulary shard: per student column, the teacher's
    output-layer row of the same string (zeros where none) [V/TP, H_t], and whether it has one [V/TP]."""
    weight: torch.Tensor
    shared: torch.Tensor


@torch.no_grad()
def log_sum_exp(chunk: torch.Tensor, shard, inv_temperature: float, columns=None) -> torch.Tensor:
    """log sum exp(chunk / T) over the vocabulary (all TP shards' true columns, or those `columns` [v] marks)
    [C] in fp64; -inf where no column counts."""
    chunk = chunk.double()
    if columns is not None:
        chunk = chunk.masked_fill(~columns, float("-inf"))
    max_ = shard.all_reduce_max(local_max(chunk, torch.float64))
    finite = torch.where(torch.isfinite(max_), max_, torch.zeros_like(max_))
    sums = shard.all_reduce_sum(shifted_logits(chunk, finite, inv_temperature).exp().sum(-1))
    return sums.log() + finite * inv_temperature


@torch.no_grad()
def teacher_log_masses(hidden: torch.Tensor, weight: torch.Tensor, unshared: torch.Tensor, temperature: float, group,
                       vocab_size: int) -> torch.Tensor:
    """What a teacher of another vocabulary sends beside its hidden states [..., H]: per token its log-normaliser
    log sum_v exp(hidden @ weight.T / T) over its vocab-sharded output layer [V/TP, H], and the log of its rest
    mass log Q, summed over the columns `unshared` [V/TP] marks (no student token has their string) rather than
    taken as 1 - the shared sum, which a near-empty rest would lose to rounding. [..., 2] in fp32 (fp64 for fp64
    hidden states); log Q floored at log(float64 eps), as the top-k kinds floor their tail."""
    shard = vocab_shard(group, weight.shape[0], vocab_size)
    flat, inv_t, unshared = hidden.reshape(-1, hidden.shape[-1]), 1.0 / temperature, unshared[:shard.valid]
    out = torch.empty(flat.shape[0], 2, dtype=torch.float64, device=hidden.device)
    for rows in chunk_rows(flat.shape[0], shard.size, head_chunk_size(shard.size), hidden.device):
        logits = flat[rows] @ weight[:shard.valid].T
        out[rows, 0] = log_sum_exp(logits, shard, inv_t)
        out[rows, 1] = (log_sum_exp(logits, shard, inv_t, unshared) - out[rows, 0]).clamp(min=LOG_EPS)
    return out.to(compute_dtype(hidden)).view(*hidden.shape[:-1], 2)


@torch.no_grad()
def completion_shift(student: ProjectedLogits, teacher_log_masses: torch.Tensor, shared: torch.Tensor, shard,
                     chunk_size: int, temperature: float) -> torch.Tensor:
    """Per token [N], the constant that makes the student's unshared logits the completed teacher's:
    T (log Z_t + log Q - log sum_u exp(a_u / T)), 0 where the student has no unshared column."""
    inv_t = 1.0 / temperature
    out = torch.zeros(student.shape[0], dtype=torch.float64, device=student.device)
    for rows in chunk_rows(student.shape[0], shard.size, chunk_size, student.device):
        student_rest = log_sum_exp(student[rows], shard, inv_t, ~shared)
        shift = temperature * (teacher_log_masses[rows].double().sum(-1) - student_rest)
        out[rows] = torch.where(torch.isfinite(student_rest), shift, torch.zeros_like(shift))
    return out


def fused_linear_shared_vocab_divergence(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                         teacher_hidden: torch.Tensor, head: SharedVocabHead,
                                         teacher_log_masses: torch.Tensor, kind: str = "reverse", beta: float = 0.5,
                                         temperature: float = 1.0, group=None, chunk_size=None,
                                         vocab_size=None) -> torch.Tensor:
    """The divergence over shared tokens plus the rest bucket (module docstring) per token [...]: the student's
    hidden states [..., H] and output-layer shard [V/TP, H], the teacher's hidden states [..., H_t], its head on
    the student's shard and its log-normaliser and rest mass [..., 2] at `temperature` (`teacher_log_masses`). Differentiable w.r.t. the student's."""
    shard = vocab_shard(group, student_weight.shape[0], vocab_size)
    hidden = _flat(student_hidden, student_weight)
    teacher = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    if head.weight.shape != (student_weight.shape[0], teacher.shape[-1]):
        raise ValueError(f"a shared-vocabulary head {tuple(head.weight.shape)} for a student shard "
                         f"{tuple(student_weight.shape)} and teacher hidden states {tuple(teacher_hidden.shape)}")
    chunk_size = chunk_size or head_chunk_size(shard.size)
    student = ProjectedLogits(hidden, student_weight)
    shared = head.shared[:shard.valid]
    shift = completion_shift(ProjectedLogits(hidden.detach(), student_weight.detach()[:shard.valid]),
                             teacher_log_masses.reshape(-1, 2), shared, shard, chunk_size, temperature)
    constants = (teacher, head.weight.detach(), shared, shift)
    kernel = divergence_kernel(kind, beta, shard, student, chunk_size, temperature,
                               compute_dtype(hidden, student_weight, teacher, head.weight))
    return _FusedChunkedLoss.apply(hidden, student_weight, kernel, *constants).view(student_hidden.shape[:-1])

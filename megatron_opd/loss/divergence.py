"""Forward KL, reverse KL and generalised JSD between student and teacher softmaxes, on vocab-sharded logits.

With a = student_logits / T, b = teacher_logits / T, p_s = softmax(a), p_t = softmax(b) over the true
vocabulary (all TP shards, padding excluded):
  forward  KL(p_t || p_s)                                   d/da = p_s - p_t
  reverse  KL(p_s || p_t)                                   d/da = p_s (log p_s - log p_t - KL)
  jsd      beta KL(p_t || m) + (1 - beta) KL(p_s || m),     d/da = -(1 - beta) p_s (h - E_ps[h])
           m = beta p_t + (1 - beta) p_s,  h = log m - log p_s = log((1 - beta) + beta exp(log p_t - log p_s))
The jsd formula vanishes identically at beta = 0 and beta = 1; as in TRL's GKD (`generalized_jsd_loss`)
those two values mean forward and reverse KL, the limits of jsd / beta and jsd / (1 - beta).
The teacher is a constant: no gradient flows to it. It comes as logits [..., V/TP], or as a `LinearHead`:
its final hidden states [..., H_t] and its output layer cut to the student's vocabulary shard [V/TP, H_t],
whose logits are formed chunk by chunk (and again in backward): no [T, V/TP] teacher tensor exists, and
only the hidden states (H_t per token instead of V) need to reach the student's ranks.
"""
from typing import Union

import torch

from megatron_opd.loss.vocab_parallel import (
    ChunkKernel, LinearHead, chunked_loss, compute_dtype, local_max, shifted_logits, vocab_shard, weighted_row_sum)

KINDS = ("forward", "reverse", "jsd")


class _DivergenceKernel(ChunkKernel):
    def shifted(self, student, teacher):
        """Both chunks' scaled logits shifted to a global max of 0 [C, v] x2, and the raw maxes [C, 2]."""
        maxes = self.shard.all_reduce_max(
            torch.stack([local_max(student, self.dtype), local_max(teacher, self.dtype)], dim=-1))
        return (shifted_logits(student, maxes[:, 0], self.inv_temperature),
                shifted_logits(teacher, maxes[:, 1], self.inv_temperature), maxes)

    def true_columns(self, teacher, rows, student):  # [C, v]
        """The teacher's logits of the chunk: a slice of its logits, or hidden [C, H] @ weight[:v].T; a teacher
        of another vocabulary (loss/shared_vocab.py) also brings which columns it shares and, per token, the shift
        that makes the student's logits `student` [C, v] its completion on the others."""
        if len(teacher) == 1:
            return teacher[0][rows, :self.shard.valid]
        hidden, weight, *completion = teacher
        columns = hidden[rows] @ weight[:self.shard.valid].T
        if not completion:
            return columns
        shared, shift = completion
        return torch.where(shared, columns, student + shift[rows].to(student.dtype).unsqueeze(-1))

    def normalisers(self, z_a, z_b, *partial_sums):
        """Global z_a, log z_a and log z_b - log z_a from the local sums [C], plus the summed `partial_sums`.
        The difference is reduced rather than the two sums: a ring all-reduce may add two entries in
        different orders, and teacher == student must give exactly log z_b - log z_a = 0."""
        sums = self.shard.all_reduce_sum(torch.stack([z_a, z_a - z_b, *partial_sums], dim=-1))
        z_a = sums[:, 0]
        return (z_a, z_a.log(), torch.log1p(-sums[:, 1] / z_a), *sums[:, 2:].unbind(-1))


class _KLKernel(_DivergenceKernel):
    """KL(p || q): p is the student's softmax for reverse KL, the teacher's for forward KL.
    stats per token: student max, log-normaliser, teacher max, log-normaliser, KL."""

    def __init__(self, student_is_p, *args):
        super().__init__(*args)
        self.student_is_p = student_is_p

    def forward_chunk(self, rows, student, *teacher):
        chunk = student[rows]
        x_s, x_t, maxes = self.shifted(chunk, self.true_columns(teacher, rows, chunk))
        x_p, x_q = (x_s, x_t) if self.student_is_p else (x_t, x_s)
        exp_p = x_p.exp()
        scratch = torch.exp(x_q)
        z_q = scratch.sum(-1)
        diff = torch.sub(x_p, x_q, out=scratch)
        z_p, log_z_p, log_z_q_minus_p, dot = self.normalisers(exp_p.sum(-1), z_q,
                                                              weighted_row_sum(exp_p, diff))
        kl = dot / z_p + log_z_q_minus_p
        log_z_q = log_z_p + log_z_q_minus_p
        log_z_s, log_z_t = (log_z_p, log_z_q) if self.student_is_p else (log_z_q, log_z_p)
        return kl, torch.stack([maxes[:, 0], log_z_s, maxes[:, 1], log_z_t, kl], dim=-1)

    def backward_chunk(self, rows, student, stats, grad_out, out, *teacher):
        scale = (grad_out * self.inv_temperature).to(self.dtype).unsqueeze(-1)
        inv_t = self.inv_temperature
        chunk = student[rows]
        log_p_s = shifted_logits(chunk, stats[:, 0], inv_t, stats[:, 1])
        if self.student_is_p:
            log_p_t_plus_kl = shifted_logits(self.true_columns(teacher, rows, chunk), stats[:, 2], inv_t,
                                             stats[:, 3] - stats[:, 4])
            delta = torch.sub(log_p_s, log_p_t_plus_kl, out=log_p_t_plus_kl)
            torch.mul(log_p_s.exp_().mul_(delta), scale, out=out)
        else:
            p_t = shifted_logits(self.true_columns(teacher, rows, chunk), stats[:, 2], inv_t, stats[:, 3]).exp_()
            torch.mul(log_p_s.exp_().sub_(p_t), scale, out=out)


class _JSDKernel(_DivergenceKernel):
    """stats per token: student max, log-normaliser, teacher max, log-normaliser, E_ps[h]."""

    def __init__(self, beta, *args):
        super().__init__(*args)
        self.beta = beta

    def log_mix_ratio(self, log_ratio):
        """h = log((1 - beta) + beta e^r) for r = log p_t - log p_s, exactly 0 at r = 0 and overflow-free:
        relu(r) + log1p(c expm1(-|r|)) with c = beta for r <= 0, 1 - beta for r > 0."""
        coef = torch.where(log_ratio > 0, log_ratio.new_tensor(1.0 - self.beta), log_ratio.new_tensor(self.beta))
        h = log_ratio.abs().neg_().expm1_().mul_(coef).log1p_()
        return h.add_(log_ratio.clamp(min=0))

    def forward_chunk(self, rows, student, *teacher):
        chunk = student[rows]
        x_s, x_t, maxes = self.shifted(chunk, self.true_columns(teacher, rows, chunk))
        exp_s, exp_t = x_s.exp(), x_t.exp()
        z_s, log_z_s, log_z_t_minus_s = self.normalisers(exp_s.sum(-1), exp_t.sum(-1))
        z_t = z_s * log_z_t_minus_s.exp()
        log_ratio = torch.sub(x_t, x_s, out=x_t).sub_(log_z_t_minus_s.unsqueeze(-1))  # log p_t - log p_s
        h = self.log_mix_ratio(log_ratio)
        t_log_ratio_to_mix = log_ratio.sub_(h)  # r - h = log p_t - log m
        # E_pt[r - h] = KL(p_t || m), E_ps[h] = -KL(p_s || m)
        sums = self.shard.all_reduce_sum(torch.stack(
            [weighted_row_sum(exp_t, t_log_ratio_to_mix) / z_t, weighted_row_sum(exp_s, h) / z_s], dim=-1))
        jsd = self.beta * sums[:, 0] - (1.0 - self.beta) * sums[:, 1]
        stats = [maxes[:, 0], log_z_s, maxes[:, 1], log_z_s + log_z_t_minus_s, sums[:, 1]]
        return jsd, torch.stack(stats, dim=-1)

    def backward_chunk(self, rows, student, stats, grad_out, out, *teacher):
        scale = (grad_out * (-(1.0 - self.beta) * self.inv_temperature)).to(self.dtype).unsqueeze(-1)
        chunk = student[rows]
        log_p_s = shifted_logits(chunk, stats[:, 0], self.inv_temperature, stats[:, 1])
        log_p_t = shifted_logits(self.true_columns(teacher, rows, chunk), stats[:, 2], self.inv_temperature,
                                 stats[:, 3])
        h = self.log_mix_ratio(log_p_t.sub_(log_p_s))
        h.sub_(stats[:, 4].unsqueeze(-1))
        torch.mul(log_p_s.exp_().mul_(h), scale, out=out)


def vocab_parallel_divergence(student_logits: torch.Tensor, teacher: Union[torch.Tensor, LinearHead],
                              kind: str = "reverse", beta: float = 0.5, temperature: float = 1.0, group=None,
                              chunk_size=None, vocab_size=None) -> torch.Tensor:
    """Per-token divergence between student and teacher, logits [..., V/TP] sharded over `group`'s
    vocabulary (None: megatron's TP group, or one shard). Returns [...] in fp32 (fp64 for fp64 logits),
    replicated on the TP ranks. `teacher`: logits of the same shape, or a `LinearHead`. `vocab_size` (the
    true size) excludes vocabulary padding: columns at or above it take no part, on either side.
    Extra memory is a few [chunk_size, V/TP] fp32 buffers; only per-token scalars cross ranks."""
    shard = vocab_shard(group, student_logits.shape[-1], vocab_size)
    student = student_logits.reshape(-1, shard.size)  # [N, V/TP]
    if isinstance(teacher, LinearHead):
        constants, chunk_size = teacher.flat(student_logits.shape), chunk_size or teacher.chunk_size()
    else:
        constants = (_teacher_logits(teacher, student_logits.shape),)
    kernel = divergence_kernel(kind, beta, shard, student, chunk_size, temperature, compute_dtype(student, *constants))
    return chunked_loss(kernel, student, *constants).view(student_logits.shape[:-1])


def divergence_kernel(kind: str, beta: float, shard, student, chunk_size, temperature: float, dtype) -> ChunkKernel:
    """The chunk kernel of `kind` over the student's logits [N, V/TP] (a tensor, or logits formed per chunk)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must be in [0, 1]")
    args = (shard, student, chunk_size, temperature, dtype)
    if kind == "jsd" and 0.0 < beta < 1.0:
        return _JSDKernel(float(beta), *args)
    return _KLKernel(kind == "reverse" or (kind == "jsd" and beta == 1.0), *args)


def _teacher_logits(teacher_logits: torch.Tensor, student_shape) -> torch.Tensor:
    if teacher_logits.shape != student_shape:
        raise ValueError(f"student logits {tuple(student_shape)} and teacher logits {tuple(teacher_logits.shape)} "
                         f"must have the same shape (the same vocabulary shard); a teacher with another padded "
                         f"vocabulary comes as a LinearHead cut to the student's shard")
    return teacher_logits.detach().reshape(-1, student_shape[-1])

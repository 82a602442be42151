"""The output layer fused with the losses: the student's logits hidden @ weight.T [T, V/TP] are formed chunk
by chunk of tokens inside the loss, in forward and again in backward, and never exist whole. At TP=1 with
a 152k vocabulary that is what keeps a 16k-token step from allocating 9.7 GB of fp32 logits per model.

`fused_linear_divergence`, `fused_linear_log_probs` and `fused_linear_entropy` equal the unfused losses on
hidden @ weight.T (vocab_parallel_divergence / _log_probs / _entropy), with the same kernels. Gradients flow
to the hidden states and to the weight (a vocab-sharded output layer, or the embedding it is tied to). The
hidden states' gradient is this rank's vocabulary shard's part, as for megatron's column-parallel output
layer: the caller's TP region op (megatron's copy_to_tensor_model_parallel_region, or the sequence-parallel
gather) sums it over the TP group.
"""
import torch

from megatron_opd.loss.divergence import divergence_kernel
from megatron_opd.loss.logprob import EntropyKernel, LogProbKernel, flat_token_ids
from megatron_opd.loss.vocab_parallel import LinearHead, compute_dtype, head_chunk_size, vocab_shard


class ProjectedLogits:
    """The logits [N, v] of hidden [N, H] and weight rows [v, H], formed for the rows asked for."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor):
        self.hidden, self.weight = hidden, weight
        self.shape, self.device = (hidden.shape[0], weight.shape[0]), hidden.device

    def __getitem__(self, rows) -> torch.Tensor:
        return self.hidden[rows] @ self.weight.T


class _FusedChunkedLoss(torch.autograd.Function):
    """A chunk kernel (vocab_parallel.ChunkKernel) over projected logits; differentiable w.r.t. the hidden
    states [N, H] and the weight shard [V/TP, H]."""

    @staticmethod
    def forward(ctx, hidden, weight, kernel, *constants):
        out, stats = kernel.forward_all(ProjectedLogits(hidden, weight[:kernel.shard.valid]), *constants)
        ctx.kernel = kernel
        ctx.save_for_backward(hidden, weight, stats, *constants)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, stats, *constants = ctx.saved_tensors
        kernel = ctx.kernel
        valid = kernel.shard.valid
        logits = ProjectedLogits(hidden, weight[:valid])
        grad_hidden = torch.empty_like(hidden)
        # Summed over chunks in fp32 at least: a bf16 running sum would lose the small terms.
        accumulate = torch.promote_types(torch.float32, weight.dtype)
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device)
        longest = max((rows.stop - rows.start for rows in kernel.rows), default=0)
        buffer = torch.empty((longest, valid), dtype=kernel.dtype, device=hidden.device)  # d loss / d logits
        for rows in kernel.rows:
            grad_logits = buffer[:rows.stop - rows.start]
            kernel.backward_chunk(rows, logits, stats[rows], grad_out[rows], grad_logits, *constants)
            grad_logits = grad_logits.to(weight.dtype)
            torch.matmul(grad_logits, weight[:valid], out=grad_hidden[rows])
            grad_weight[:valid].addmm_(grad_logits.T.to(accumulate), hidden[rows].to(accumulate))
        return (grad_hidden, grad_weight.to(weight.dtype), None) + (None,) * len(constants)


def _flat(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and an output layer {tuple(weight.shape)} of "
                         f"another width")
    return hidden.reshape(-1, hidden.shape[-1])


def fused_linear_divergence(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                            teacher_weight: torch.Tensor, kind: str = "reverse", beta: float = 0.5,
                            temperature: float = 1.0, group=None, chunk_size=None, vocab_size=None) -> torch.Tensor:
    """vocab_parallel_divergence(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, ...)
    per token [...], with hidden states [..., H] (H_t for the teacher) and both output layers cut to this
    rank's vocabulary shard [V/TP, H]. Differentiable w.r.t. the student's hidden states and weight."""
    shard = vocab_shard(group, student_weight.shape[0], vocab_size)
    hidden = _flat(student_hidden, student_weight)
    teacher = LinearHead(teacher_hidden, teacher_weight).flat((*student_hidden.shape[:-1], student_weight.shape[0]))
    kernel = divergence_kernel(kind, beta, shard, ProjectedLogits(hidden, student_weight),
                               chunk_size or head_chunk_size(shard.size), temperature,
                               compute_dtype(hidden, student_weight, *teacher))
    return _FusedChunkedLoss.apply(hidden, student_weight, kernel, *teacher).view(student_hidden.shape[:-1])


def fused_linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor,
                           temperature: float = 1.0, group=None, chunk_size=None, vocab_size=None) -> torch.Tensor:
    """vocab_parallel_log_probs(hidden @ weight.T, token_ids, ...): [...] or [..., K] like `token_ids`."""
    shard = vocab_shard(group, weight.shape[0], vocab_size)
    flat = _flat(hidden, weight)
    ids = flat_token_ids(token_ids, hidden.shape[:-1], shard, vocab_size)
    kernel = LogProbKernel(ids.shape[1], shard, ProjectedLogits(flat, weight), chunk_size or head_chunk_size(shard.size),
                           temperature, compute_dtype(flat, weight))
    return _FusedChunkedLoss.apply(flat, weight, kernel, ids).view(token_ids.shape)


def fused_linear_entropy(hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0, group=None,
                         chunk_size=None, vocab_size=None) -> torch.Tensor:
    """vocab_parallel_entropy(hidden @ weight.T, ...) per token [...]."""
    shard = vocab_shard(group, weight.shape[0], vocab_size)
    flat = _flat(hidden, weight)
    kernel = EntropyKernel(shard, ProjectedLogits(flat, weight), chunk_size or head_chunk_size(shard.size), temperature,
                           compute_dtype(flat, weight))
    return _FusedChunkedLoss.apply(flat, weight, kernel).view(hidden.shape[:-1])

"""Shared machinery of the losses on vocab-sharded logits: where this rank's shard sits in the vocabulary,
the O(1)-scalars-per-token collectives, and an autograd Function that runs a loss chunk by chunk of
tokens and recomputes the softmaxes in backward instead of saving them.

Layout: logits are `[N, V/TP]` on every rank of the TP group, rank r holding the global columns
`[r * V/TP, (r + 1) * V/TP)`. Megatron pads the vocabulary at its end, so the true columns of a shard are
a prefix of it (possibly empty on the last ranks); padded columns take no part and get zero gradient.

The losses are replicated on the TP ranks (every rank returns the same per-token values), and their
backward assumes the incoming gradient is replicated too: each rank returns d loss / d its own shard,
which is megatron's convention for vocab-parallel losses (identity backward of the final reduce).
"""
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Elements of one fp32 working buffer of a chunk when `chunk_size` is None. On CPU 4 MiB keeps a chunk's
# buffers near the caches (measured 2x faster than 64 MiB chunks); on GPU 64 MiB makes the per-chunk
# kernel launches and collectives negligible. Either way the workspace does not grow with T.
DEFAULT_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}
# A chunk of logits formed from an output layer re-reads the whole shard [V/TP, H] for its matmul, and a
# fused backward adds the chunk's rank-C update to the [V/TP, H] weight gradient: chunks large enough that
# the matmuls, not those passes over V x H, take the time (measured on CPU at V=152k: 6-token chunks made
# the loss 4x slower, 110-token ones the fused backward 2.6x slower than 440-token ones). 256 MiB of fp32
# logits per chunk: 441 tokens at V=152k.
HEAD_CHUNK_ELEMENTS = 1 << 26


def resolve_group(group):
    """`group`, or megatron's TP group when model parallel is initialised, else None (one shard)."""
    if group is not None:
        return group
    from megatron_opd.parallel import tp_group

    return tp_group()


@dataclass(frozen=True)
class VocabShard:
    group: object  # process group, or None for a single shard
    world_size: int
    offset: int  # global index of the shard's first column
    size: int  # V/TP, padding included
    valid: int  # leading columns below the true vocabulary size

    def all_reduce_max(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
        return values

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self.group)
        return values


def head_chunk_size(shard_size: int) -> int:
    """Tokens per chunk when the chunk's logits come from a matmul with a [shard_size, H] output layer."""
    return max(1, HEAD_CHUNK_ELEMENTS // max(1, shard_size))


@dataclass(frozen=True)
class LinearHead:
    """A model's output as its final hidden states [..., H] and an output-layer shard [V/TP, H] (rows in
    the vocabulary shard's order), standing for the logits hidden @ weight.T without forming them."""
    hidden: torch.Tensor
    weight: torch.Tensor

    def chunk_size(self) -> int:
        return head_chunk_size(self.weight.shape[0])

    def flat(self, logits_shape) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [N, H], weight [V/TP, H]), checked against the logits [..., V/TP] they stand for."""
        if tuple(self.hidden.shape[:-1]) != tuple(logits_shape[:-1]) or self.weight.shape[0] != logits_shape[-1] \
                or self.weight.shape[1] != self.hidden.shape[-1]:
            raise ValueError(f"a LinearHead with hidden {tuple(self.hidden.shape)} and weight "
                             f"{tuple(self.weight.shape)} cannot stand for logits {tuple(logits_shape)}")
        return self.hidden.detach().reshape(-1, self.hidden.shape[-1]), self.weight.detach()


def vocab_shard(group, shard_size: int, vocab_size=None) -> VocabShard:
    """This rank's shard of a vocabulary of `vocab_size` true entries padded to TP * `shard_size`."""
    group = resolve_group(group)
    world_size, rank = 1, 0
    if group is not None and dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    padded = world_size * shard_size
    vocab_size = padded if vocab_size is None else int(vocab_size)
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {padded}] (TP={world_size} shards of "
                         f"{shard_size} columns); pass the tokenizer's true vocabulary size")
    offset = rank * shard_size
    return VocabShard(group, world_size, offset, shard_size, max(0, min(shard_size, vocab_size - offset)))


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 logits, fp64 for fp64 (gradcheck)."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def chunk_rows(num_tokens: int, shard_size: int, chunk_size=None, device=None) -> list[slice]:
    """Token slices of at most `chunk_size` rows (default: DEFAULT_CHUNK_ELEMENTS per fp32 buffer)."""
    if chunk_size is None:
        elements = DEFAULT_CHUNK_ELEMENTS["cuda" if torch.device(device or "cpu").type == "cuda" else "cpu"]
        chunk_size = max(1, elements // max(1, shard_size))
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of tokens")
    return [slice(start, min(start + chunk_size, num_tokens)) for start in range(0, num_tokens, chunk_size)]


def local_max(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row max of `logits` [C, v] as `dtype` [C]; -inf for a shard with no true columns."""
    if logits.shape[-1] == 0:
        return torch.full(logits.shape[:-1], float("-inf"), dtype=dtype, device=logits.device)
    return logits.amax(dim=-1).to(dtype)


def weighted_row_sum(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum(weights * values, -1) for [C, v] tensors, overwriting `values`. torch's sum reduces pairwise;
    a BLAS dot (bmm/einsum) accumulates in fp32 blocks and loses ~sqrt(V) eps (1e-5 at V=32000)."""
    return values.mul_(weights).sum(-1)


def shifted_logits(logits: torch.Tensor, max_: torch.Tensor, inv_temperature: float, log_norm=None) -> torch.Tensor:
    """(logits - max) / T - log_norm in max_'s dtype: with log_norm the log-softmax, without it the scaled
    logits shifted to a global max of 0. [C, v] Subtracting the max first keeps the high-probability
    entries exact (Sterbenz), which scaling first then shifting would not."""
    shifted = torch.sub(logits, max_.unsqueeze(-1))
    if log_norm is not None:
        return torch.add(-log_norm.unsqueeze(-1), shifted, alpha=inv_temperature, out=shifted)
    return shifted.mul_(inv_temperature) if inv_temperature != 1.0 else shifted


class ChunkKernel:
    """One loss over vocab-sharded logits [N, V/TP], in chunks of tokens. Subclasses implement:

    forward_chunk(rows, logits, *constants) -> (out [C, ...], stats [C, k]): the loss of the chunk and
        the per-token scalars backward needs (global maxes, log-normalisers, ...), collectives included;
    backward_chunk(rows, logits, stats, grad_out, out, *constants): write d loss / d logits[rows, :valid]
        into `out` [C, valid] (the input's dtype), with no collectives.
    `logits` are the [N, valid] true columns of the differentiable input, `constants` the other
    (non-differentiable) tensors, whole."""

    out_tail: tuple = ()  # trailing shape of one token's output

    def __init__(self, shard: VocabShard, logits: torch.Tensor, chunk_size, temperature: float,
                 dtype: torch.dtype):
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature={temperature} must be a positive number")
        self.shard, self.dtype, self.inv_temperature = shard, dtype, 1.0 / temperature
        self.rows = chunk_rows(logits.shape[0], shard.size, chunk_size, logits.device)

    def forward_all(self, logits, *constants) -> tuple[torch.Tensor, torch.Tensor]:
        """(every chunk's output, concatenated; the stats backward needs, None when there are no tokens)."""
        outs, stats = [], []
        for rows in self.rows:
            out, stat = self.forward_chunk(rows, logits, *constants)
            outs.append(out)
            stats.append(stat)
        if not outs:
            return torch.empty((0, *self.out_tail), dtype=self.dtype, device=logits.device), None
        return torch.cat(outs), torch.cat(stats)


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, kernel, *constants):  # logits [N, V/TP]
        out, stats = kernel.forward_all(logits[:, :kernel.shard.valid], *constants)
        ctx.kernel = kernel
        ctx.save_for_backward(logits, stats, *constants)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, stats, *constants = ctx.saved_tensors
        kernel = ctx.kernel
        valid = kernel.shard.valid
        grad = torch.empty_like(logits)  # [N, V/TP]
        grad[:, valid:].zero_()
        for rows in kernel.rows:
            kernel.backward_chunk(rows, logits[:, :valid], stats[rows], grad_out[rows], grad[rows, :valid],
                                  *constants)
        return (grad, None) + (None,) * len(constants)


def chunked_loss(kernel: ChunkKernel, logits: torch.Tensor, *constants: torch.Tensor) -> torch.Tensor:
    """Run `kernel` over `logits` [N, V/TP]; differentiable w.r.t. `logits` only."""
    return _ChunkedLoss.apply(logits, kernel, *constants)

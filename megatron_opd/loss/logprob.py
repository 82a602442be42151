"""Log-probabilities of given token ids and the entropy of the softmax, on vocab-sharded logits.

Both are differentiable w.r.t. the logits, chunked over tokens with the softmax recomputed in backward,
and exchange only per-token scalars across the TP group (see vocab_parallel.py for the layout).
With a = logits / T and p = softmax(a) over the true vocabulary:
  log p[id]                   d/da = onehot(id) - p
  H = -sum p log p            d/da = -p (log p + H)
"""
import torch

from megatron_opd.loss.vocab_parallel import (
    ChunkKernel, chunked_loss, compute_dtype, local_max, shifted_logits, vocab_shard, weighted_row_sum)


class LogProbKernel(ChunkKernel):
    """stats per token: max, log-normaliser."""

    def __init__(self, num_ids, *args):
        super().__init__(*args)
        self.out_tail = (num_ids,)

    def owned(self, token_ids):
        """Local column of each id (clamped into the shard) and whether this shard holds it. [C, K] x2"""
        local = token_ids - self.shard.offset
        owned = (local >= 0) & (local < self.shard.valid)
        return local.clamp(0, max(self.shard.valid - 1, 0)), owned

    def forward_chunk(self, rows, logits, token_ids):
        chunk = logits[rows]  # [C, v]; for projected logits, formed here
        max_ = self.shard.all_reduce_max(local_max(chunk, self.dtype))
        shifted = shifted_logits(chunk, max_, self.inv_temperature)
        local, owned = self.owned(token_ids[rows])
        picked = torch.zeros(owned.shape, dtype=self.dtype, device=shifted.device)
        if self.shard.valid:
            picked = torch.where(owned, shifted.gather(-1, local), picked)
        sums = self.shard.all_reduce_sum(torch.cat([shifted.exp_().sum(-1, keepdim=True), picked], dim=-1))
        log_z = sums[:, 0].log()
        return sums[:, 1:] - log_z.unsqueeze(-1), torch.stack([max_, log_z], dim=-1)

    def backward_chunk(self, rows, logits, stats, grad_out, out, token_ids):
        grad = (grad_out * self.inv_temperature).to(self.dtype)  # [C, K]
        probs = shifted_logits(logits[rows], stats[:, 0], self.inv_temperature, stats[:, 1]).exp_()
        probs.mul_(-grad.sum(-1, keepdim=True))
        if self.shard.valid:
            local, owned = self.owned(token_ids[rows])
            probs.scatter_add_(-1, local, torch.where(owned, grad, torch.zeros_like(grad)))
        out.copy_(probs)


class EntropyKernel(ChunkKernel):
    """stats per token: max, log-normaliser, entropy."""

    def forward_chunk(self, rows, logits):
        chunk = logits[rows]  # [C, v]; for projected logits, formed here
        max_ = self.shard.all_reduce_max(local_max(chunk, self.dtype))
        shifted = shifted_logits(chunk, max_, self.inv_temperature)
        unnormalised = shifted.exp()
        sums = self.shard.all_reduce_sum(
            torch.stack([unnormalised.sum(-1), weighted_row_sum(unnormalised, shifted)], dim=-1))
        log_z = sums[:, 0].log()
        entropy = log_z - sums[:, 1] / sums[:, 0]
        return entropy, torch.stack([max_, log_z, entropy], dim=-1)

    def backward_chunk(self, rows, logits, stats, grad_out, out):
        entropy = stats[:, 2]
        # u = log p + H; p = exp(u) e^-H, the e^-H folded into the per-token scale
        scale = (-grad_out * self.inv_temperature * torch.exp(-entropy)).to(self.dtype).unsqueeze(-1)
        log_p_plus_entropy = shifted_logits(logits[rows], stats[:, 0], self.inv_temperature, stats[:, 1] - entropy)
        weighted = torch.exp(log_p_plus_entropy).mul_(log_p_plus_entropy)
        torch.mul(weighted, scale, out=out)


def flat_token_ids(token_ids: torch.Tensor, lead: tuple, shard, vocab_size) -> torch.Tensor:
    """`token_ids` [*lead] or [*lead, K], checked against the true vocabulary, as [N, K]."""
    one_per_token = tuple(token_ids.shape) == tuple(lead)
    if not one_per_token and tuple(token_ids.shape[:-1]) != tuple(lead):
        raise ValueError(f"token_ids {tuple(token_ids.shape)} must have the logits' leading shape "
                         f"{tuple(lead)}, optionally followed by K ids per position")
    true_vocab = vocab_size if vocab_size is not None else shard.world_size * shard.size
    if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= true_vocab):
        raise ValueError(f"token ids must lie in [0, {true_vocab}); got [{int(token_ids.min())}, "
                         f"{int(token_ids.max())}]")
    return token_ids.reshape(-1, 1 if one_per_token else token_ids.shape[-1]).long()


def vocab_parallel_log_probs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0,
                             group=None, chunk_size=None, vocab_size=None) -> torch.Tensor:
    """log softmax(logits / T)[token_ids] with logits [..., V/TP] sharded over `group`'s vocabulary and
    global `token_ids` [...] (one per position) or [..., K] (K per position). Returns the ids' shape
    in fp32 (fp64 for fp64 logits), replicated on the TP ranks; differentiable w.r.t. `logits`."""
    shard = vocab_shard(group, logits.shape[-1], vocab_size)
    ids = flat_token_ids(token_ids, logits.shape[:-1], shard, vocab_size)  # [N, K]
    flat = logits.reshape(-1, shard.size)  # [N, V/TP]
    kernel = LogProbKernel(ids.shape[1], shard, flat, chunk_size, temperature, compute_dtype(flat))
    return chunked_loss(kernel, flat, ids).view(token_ids.shape)


def vocab_parallel_entropy(logits: torch.Tensor, temperature: float = 1.0, group=None, chunk_size=None,
                           vocab_size=None) -> torch.Tensor:
    """Entropy of softmax(logits / T) per position, logits [..., V/TP] sharded over `group`'s vocabulary.
    Returns [...] in fp32 (fp64 for fp64 logits), replicated on the TP ranks; differentiable."""
    shard = vocab_shard(group, logits.shape[-1], vocab_size)
    flat = logits.reshape(-1, shard.size)  # [N, V/TP]
    kernel = EntropyKernel(shard, flat, chunk_size, temperature, compute_dtype(flat))
    return chunked_loss(kernel, flat).view(logits.shape[:-1])

"""Context parallelism's sequence layout, as megatron-core expects it: a sequence padded to a multiple of
2 x CP is cut into 2 x CP chunks and CP rank r holds chunks r and 2 CP - 1 - r, so that every rank gets
the same share of causal-attention work. megatron's rotary embedding slices its positions the same way
(`get_pos_emb_on_this_cp_rank`), and so do the labels, masks and teacher outputs of a batch."""
import torch


def padded_length(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def chunk_ids(cp_rank: int, cp_size: int) -> tuple[int, int]:
    return cp_rank, 2 * cp_size - 1 - cp_rank


def split_sequence(tensor: torch.Tensor, cp_rank: int, cp_size: int, seq_dim: int = 1) -> torch.Tensor:
    """This CP rank's two chunks of `tensor` along `seq_dim` (whose length must divide by 2 x CP)."""
    if cp_size == 1:
        return tensor
    length = tensor.shape[seq_dim]
    if length % (2 * cp_size):
        raise ValueError(f"sequence length {length} is not a multiple of 2 x CP = {2 * cp_size}")
    chunks = tensor.chunk(2 * cp_size, dim=seq_dim)
    first, second = chunk_ids(cp_rank, cp_size)
    return torch.cat([chunks[first], chunks[second]], dim=seq_dim)


def local_positions(length: int, cp_rank: int, cp_size: int, device: torch.device) -> torch.Tensor:
    """Global positions [length / CP] of the tokens CP rank `cp_rank` holds of a `length`-token sequence."""
    chunk = length // (2 * cp_size)
    return torch.cat([torch.arange(i * chunk, (i + 1) * chunk, device=device) for i in chunk_ids(cp_rank, cp_size)])

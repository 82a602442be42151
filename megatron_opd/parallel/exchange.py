"""Rows of one global tensor [N, ...], held by some ranks and wanted by others, moved point to point.

Each rank says which rows it holds (a slice of the global tensor) and which it wants; every rank derives
the same plan from everyone's answer: each wanted row comes from the lowest rank that holds it, and a
rank's own rows are copied locally. Used for a teacher's output layer cut to the student's vocabulary
shards (once), and for a teacher in its own layout: its outputs go from the ranks that computed them to
the student's last-stage ranks that hold the same sequences (every step).
"""
from typing import Optional

import torch
import torch.distributed as dist

Rows = Optional[tuple[int, int]]  # [start, stop) in the global tensor, or None


def _plan(spans: list[tuple[Rows, Rows]]) -> list[tuple[int, int, int, int]]:
    """(source, destination, start, stop) for every wanted row, in one order all ranks agree on."""
    moves = []
    for dst, (_, wanted) in enumerate(spans):
        if wanted is None:
            continue
        row = wanted[0]
        while row < wanted[1]:
            holders = [(src, held) for src, (held, _) in enumerate(spans) if held and held[0] <= row < held[1]]
            if not holders:
                raise ValueError(f"rank {dst} wants row {row}, which no rank holds")
            src, held = holders[0]
            stop = min(held[1], wanted[1])
            moves.append((src, dst, row, stop))
            row = stop
    return moves


def exchange_rows(held: Optional[torch.Tensor], held_rows: Rows, wanted_rows: Rows, row_shape: tuple,
                  dtype: torch.dtype, device: torch.device) -> tuple[Optional[torch.Tensor], int]:
    """Collective over all ranks. `held` is the slice [held_rows] of the global tensor (None with no rows);
    returns (the wanted rows [stop - start, *row_shape] or None, the bytes this rank sent to others)."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (held_rows, wanted_rows))
    me = dist.get_rank()
    out = None
    if wanted_rows is not None:
        out = torch.empty((wanted_rows[1] - wanted_rows[0], *row_shape), dtype=dtype, device=device)
    ops, sent = [], 0
    for src, dst, start, stop in _plan(everyone):
        if src == me:
            piece = held[start - held_rows[0]:stop - held_rows[0]].contiguous()
            if dst == me:
                out[start - wanted_rows[0]:stop - wanted_rows[0]].copy_(piece)
            else:
                ops.append(dist.P2POp(dist.isend, piece, dst))
                sent += piece.numel() * piece.element_size()
        elif dst == me:
            ops.append(dist.P2POp(dist.irecv, out[start - wanted_rows[0]:stop - wanted_rows[0]], src))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    return out, sent

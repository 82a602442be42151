"""Comparisons over the response tokens of the doctor's rows: the largest and mean gap between two sets of
per-token values, and the temperature at which one side's log-probs best match the other's (what names a
temperature applied on one side only)."""
import math
from typing import Callable

import torch

FIT_RANGE = (0.05, 20.0)  # temperatures searched, on a log scale
FIT_STEPS = 40
GOLDEN = (math.sqrt(5) - 1) / 2


def gaps(a: list, b: list, masks: list) -> tuple[float, float]:
    """(max, mean) of |a - b| over the positions where the mask is 1; per micro-batch lists of [mb, s, ...]
    tensors (a trailing dimension, e.g. top-k, counts each value)."""
    diffs = [(x.float() - y.float()).abs()[m.bool()] for x, y, m in zip(a, b, masks)]
    flat = torch.cat([d.reshape(-1) for d in diffs])
    if flat.numel() == 0:
        return 0.0, 0.0
    return flat.max().item(), flat.mean().item()


def masked_values(values: list, masks: list) -> torch.Tensor:
    """The values at the response positions, flattened (a trailing dimension kept)."""
    return torch.cat([v[m.bool()] for v, m in zip(values, masks)])


def fit_temperature(target: list, log_probs_at: Callable[[float], list], masks: list) -> tuple[float, float]:
    """(T, max gap): the temperature whose log-probs (log_probs_at(T)) are closest to `target` on average
    (golden-section search over log T), and the largest gap there."""
    def cost(log_t):
        return gaps(target, log_probs_at(math.exp(log_t)), masks)[1]

    low, high = (math.log(t) for t in FIT_RANGE)
    for _ in range(FIT_STEPS):
        left, right = high - GOLDEN * (high - low), low + GOLDEN * (high - low)
        if cost(left) <= cost(right):
            high = right
        else:
            low = left
    best = math.exp((low + high) / 2)
    return best, gaps(target, log_probs_at(best), masks)[0]

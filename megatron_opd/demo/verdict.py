"""The comparison's statistics, fixed before any run: two arms scored on the same seeds (same teacher and
cold-start student within a seed) are compared by the paired differences of their per-seed scores.

- ahead:     the paired 95% confidence interval of the mean difference excludes 0 on the positive side, and
             at least MIN_AGREE seeds have a positive difference;
- behind:    the same on the negative side;
- on par:    otherwise, when the whole interval lies within +-ON_PAR;
- undecided: anything else.
Ahead/behind are checked first: a small lead that the seeds all show is a lead, however small.
"""
import math
import statistics

from scipy.stats import t as student_t

CONFIDENCE = 0.95
MIN_AGREE = 4  # of the 5 seeds
ON_PAR = 0.03
VERDICTS = ("ahead", "on par", "behind", "undecided")


def paired_interval(first: list[float], second: list[float]) -> tuple[float, float, float]:
    """(mean difference first - second, low, high) of the paired Student-t interval at CONFIDENCE."""
    if len(first) != len(second) or len(first) < 2:
        raise ValueError(f"paired scores need the same seeds, at least 2: got {len(first)} and {len(second)}")
    differences = [a - b for a, b in zip(first, second)]
    mean = statistics.fmean(differences)
    half = student_t.ppf((1 + CONFIDENCE) / 2, len(differences) - 1) * statistics.stdev(differences) / math.sqrt(
        len(differences))
    return mean, mean - half, mean + half


def verdict(first: list[float], second: list[float], min_agree: int = MIN_AGREE) -> str:
    """How the first arm compares with the second over the same seeds (see the module docstring)."""
    _, low, high = paired_interval(first, second)
    differences = [a - b for a, b in zip(first, second)]
    if low > 0 and sum(d > 0 for d in differences) >= min_agree:
        return "ahead"
    if high < 0 and sum(d < 0 for d in differences) >= min_agree:
        return "behind"
    if -ON_PAR <= low and high <= ON_PAR:
        return "on par"
    return "undecided"

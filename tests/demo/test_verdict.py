"""The comparison's verdicts: the paired interval against a hand computation, and each verdict's edges."""
import pytest

from megatron_opd.demo.verdict import paired_interval, verdict


def test_paired_interval_is_students_t_on_the_differences():
    # differences 0.1, 0.2, 0.3, 0.4, 0.5: mean 0.3, sd 0.1581, t(0.975, 4) = 2.7764
    mean, low, high = paired_interval([0.6, 0.7, 0.8, 0.9, 1.0], [0.5] * 5)
    assert mean == pytest.approx(0.3) and high - mean == pytest.approx(2.7764 * 0.158114 / 5 ** 0.5, rel=1e-4)
    assert mean - low == pytest.approx(high - mean)


@pytest.mark.parametrize("first, second, expected", [
    ([0.60, 0.62, 0.58, 0.61, 0.63], [0.50, 0.51, 0.49, 0.52, 0.50], "ahead"),
    ([0.50, 0.51, 0.49, 0.52, 0.50], [0.60, 0.62, 0.58, 0.61, 0.63], "behind"),
    ([0.500, 0.505, 0.498, 0.502, 0.501], [0.501, 0.500, 0.500, 0.503, 0.499], "on par"),
    ([0.70, 0.40, 0.65, 0.35, 0.55], [0.50, 0.50, 0.50, 0.50, 0.50], "undecided"),
])
def test_verdicts(first, second, expected):
    assert verdict(first, second) == expected


def test_ahead_needs_the_seeds_to_agree():
    first, second = [0.6, 0.6, 0.6, 0.6, 0.499], [0.5] * 5  # the interval excludes 0; 4 of 5 seeds ahead
    assert paired_interval(first, second)[1] > 0
    assert verdict(first, second) == "ahead" and verdict(first, second, min_agree=5) == "undecided"


def test_unpaired_scores_are_refused():
    with pytest.raises(ValueError, match="same seeds"):
        verdict([0.5, 0.6], [0.5])

"""benchmarks/study.py's statistics: queries to target, the bootstrap intervals (against exact enumeration of the
resamples), the censored median, diversity at equal accuracy, and the tuning choice rule."""

import itertools
import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import study  # noqa: E402


def _exact_quantiles(values, stat, qs):
    """Quantiles of `stat` over every one of the n^n equally likely resamples (the bootstrap distribution)."""
    draws = sorted(stat(list(c)) for c in itertools.product(values, repeat=len(values)))
    return [draws[int(q * len(draws))] for q in qs]


@pytest.mark.parametrize(
    "values, stat",
    [
        ([0.52, 0.55, 0.61, 0.58], statistics.mean),
        ([1600.0, 3200.0, math.inf, 2400.0, 4000.0], study.median_inf),
    ],
)
def test_bootstrap_interval_is_the_resampling_distributions_percentiles(values, stat):
    lo, hi = study.bootstrap(values, stat)
    exact_lo, exact_hi = _exact_quantiles(values, stat, (0.025, 0.975))
    # The Monte Carlo percentile may land on a neighbouring atom of the discrete distribution; it must lie between
    # the exact quantiles a little inside and outside (0.5 % and 4.5 % / 95.5 % and 99.5 %).
    inner = _exact_quantiles(values, stat, (0.045, 0.955))
    outer = _exact_quantiles(values, stat, (0.005, 0.995))
    assert outer[0] <= lo <= inner[0] and inner[1] <= hi <= outer[1], (lo, hi, exact_lo, exact_hi)


def test_censored_median_and_first_reaching():
    seq = [dict(reward_queries=q, geneval=a) for q, a in ((0, 0.52), (1280, 0.57), (2560, 0.59), (3840, 0.56))]
    assert study.first_reaching(seq, "geneval", 0.58) == 2560
    assert study.first_reaching(seq, "geneval", 0.60) == math.inf
    assert study.median_inf([1.0, 2.0, math.inf, math.inf, 3.0]) == 3.0
    assert study.median_inf([1.0, math.inf, math.inf, math.inf, 3.0]) == math.inf  # most seeds never reached it
    assert study.fmt_q(math.inf) == "not reached" and study.fmt_q(2560.0) == "2,560"


def test_diversity_is_read_where_the_mean_accuracy_curve_reaches_the_common_level():
    seqs = {
        0: [dict(epoch=0, geneval=0.50, diversity=0.30, reward_queries=0),
            dict(epoch=20, geneval=0.60, diversity=0.20, reward_queries=1280)],
        1: [dict(epoch=0, geneval=0.52, diversity=0.32, reward_queries=0),
            dict(epoch=20, geneval=0.62, diversity=0.22, reward_queries=1280)],
    }  # fmt: skip
    # mean curve (0.51, 0.31) -> (0.61, 0.21): at accuracy 0.56, halfway
    assert study.diversity_at(seqs, 0.56) == pytest.approx(0.26)
    assert study.diversity_at(seqs, 0.70) is None  # never reached


def test_tuning_choice_rule_is_the_highest_mean_and_ties_go_to_the_smaller_lr():
    acc = {1e-4: {20: 0.57, 40: 0.59}, 3e-5: {20: 0.59, 40: 0.57}, 3e-4: {20: 0.60, 40: 0.50}}
    assert study.choose_lr(acc) == 3e-5  # 0.58 = 0.58 > 0.55: the tie goes to the smaller rate
    acc[1e-4][40] = 0.60
    assert study.choose_lr(acc) == 1e-4

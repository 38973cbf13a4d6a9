"""The claims' verdict rules on made-up numbers, on both sides of each threshold."""
from __future__ import annotations

import math

import pytest
from scipy import stats

from pipeline.claims.rules import (
    combine,
    judge_pairs,
    mean_interval,
    pair_outcome,
    paired_seed_test,
    threshold_outcome,
    trend_outcome,
)
from pipeline.engine.scaling import loglog_slope


@pytest.mark.parametrize("pair, expected, outcome", [
    ("better", "better", "supported"), ("equivalent", "better", "not supported"), ("worse", "better", "not supported"),
    ("inconclusive", "better", "inconclusive"),
    ("equivalent", "not_worse", "supported"), ("better", "not_worse", "supported"), ("worse", "not_worse", "not supported"),
    ("worse", "not_better", "supported"), ("better", "not_better", "not supported"),
    ("equivalent", "equivalent", "supported"), ("better", "equivalent", "not supported"),
    ("worse", "worse", "supported"), ("better", "worse", "not supported"), ("inconclusive", "worse", "inconclusive"),
])
def test_a_pair_verdict_holds_or_breaks_the_expectation(pair, expected, outcome):
    assert pair_outcome(pair, expected) == outcome


def test_a_claim_is_supported_only_when_every_expectation_holds():
    assert combine(["supported", "supported"]) == "supported"
    assert combine(["supported", "inconclusive"]) == "inconclusive"
    assert combine(["inconclusive", "not supported", "supported"]) == "not supported"
    assert combine([]) == "inconclusive"


def test_the_seed_test_is_scipys_paired_t_test_oriented_by_direction():
    a, b = [0.9, 0.8, 0.85, 0.95], [0.7, 0.75, 0.7, 0.8]
    t = paired_seed_test(a, b, "max", log=False)
    reference = stats.ttest_rel(a, b)
    assert t.p_value == pytest.approx(reference.pvalue)
    assert t.advantage == pytest.approx(0.1375)
    ci = reference.confidence_interval(0.95)
    assert (t.low, t.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    lower = paired_seed_test(a, b, "min", log=False)  # lower is better: A's advantage turns negative
    assert lower.advantage == pytest.approx(-0.1375) and lower.p_value == pytest.approx(t.p_value)


def test_a_log_measure_compares_factors():
    t = paired_seed_test([1e-2, 2e-2, 1.5e-2], [1e-8, 3e-8, 2e-8], "max", log=True)
    assert 5.5 < t.advantage < 6.5  # six orders of magnitude
    assert t.low > 0


def test_identical_differences_are_known_exactly_and_a_single_seed_decides_nothing():
    t = paired_seed_test([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], "max", log=False)
    assert (t.advantage, t.low, t.high, t.p_value) == (1.0, 1.0, 1.0, 0.0)
    (verdict, _, _), = judge_pairs([t], [None])
    assert verdict == "better"
    one = paired_seed_test([1.0], [0.0], "max", log=False)
    (verdict, reason, _), = judge_pairs([one], [None])
    assert verdict == "inconclusive" and "single seed" in reason


def test_holm_runs_across_the_claims_comparisons():
    weak = paired_seed_test([0.2, 0.4, 0.25, 0.15], [0.1, 0.2, 0.1, 0.1], "max", log=False)
    assert weak.low > 0 and 0.025 < weak.p_value < 0.05  # better on its own ...
    (alone, _, _), = judge_pairs([weak], [None])
    assert alone == "better"
    judged = judge_pairs([weak, weak], [None, None])  # ... not when it is one of two such comparisons
    assert [v for v, _, _ in judged] == ["inconclusive", "inconclusive"]
    assert all(p >= 0.05 and "Holm" in reason for _, reason, p in judged)


@pytest.mark.parametrize("low, high, side, outcome", [
    (0.2, 0.4, "above", "supported"), (0.05, 0.09, "above", "not supported"), (0.05, 0.2, "above", "inconclusive"),
    (0.01, 0.09, "below", "supported"), (0.11, 0.5, "below", "not supported"), (0.09, 0.11, "below", "inconclusive"),
])
def test_threshold_rule_on_each_side(low, high, side, outcome):
    assert threshold_outcome(3, low, high, side, 0.1)[0] == outcome
    assert threshold_outcome(1, low, high, side, 0.1)[0] == "inconclusive"


def test_mean_interval_is_the_t_interval_and_log_measures_come_back_in_their_units():
    mean, low, high = mean_interval([1.0, 2.0, 3.0], log=False)
    ci = stats.t.interval(0.95, 2, loc=2.0, scale=stats.sem([1.0, 2.0, 3.0]))
    assert (mean, low, high) == (pytest.approx(2.0), pytest.approx(ci[0]), pytest.approx(ci[1]))
    mean, low, high = mean_interval([1e-3, 1e-3, 1e-3], log=True)
    assert mean == pytest.approx(1e-3) and low == pytest.approx(1e-3) and high == pytest.approx(1e-3)


def test_the_slope_of_exact_power_laws_and_the_trend_rule():
    xs = [16, 32, 64, 128]
    quadratic = loglog_slope(xs, [3 * x ** 2 for x in xs])
    assert quadratic.slope == pytest.approx(2.0) and quadratic.high - quadratic.low < 1e-9
    assert trend_outcome(quadratic, 2, 1.8, 2.2)[0] == "supported"
    assert trend_outcome(quadratic, 2, 2.5, None)[0] == "not supported"
    assert trend_outcome(quadratic, 2, None, 1.5)[0] == "not supported"
    assert trend_outcome(quadratic, 1, 1.8, 2.2)[0] == "inconclusive"  # one seed decides nothing
    noisy = loglog_slope(xs * 2, [x * f for x in xs for f in (1,)] + [x * 3 for x in xs])
    assert trend_outcome(noisy, 2, 1.1, None)[0] == "inconclusive" or noisy.low >= 1.1
    wide = loglog_slope([1, 2, 3, 4], [1, 8, 2, 9])
    assert math.isfinite(wide.low) and trend_outcome(wide, 2, 0.9, 1.1)[0] == "inconclusive"

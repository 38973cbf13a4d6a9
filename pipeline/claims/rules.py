"""The verdict rules of the claims, stated in code: each expectation is supported, not supported or inconclusive,
and a claim is supported only when all of its expectations are.

- compare: a paired comparison of two variants over shared seeds. On the main test metric with per-example
  records, the project's statistics (reports/statistics.py: two-level bootstrap, permutation test); on any other
  measure, one number per seed, a paired t-test (scipy.stats.ttest_1samp on the differences; on log10 values
  for a log measure). Holm's correction runs across the claim's comparisons. The pair's verdict (better, worse,
  equivalent, inconclusive: statistics.verdict) then holds or breaks the expectation.
- threshold: the 95% t-interval of a variant's mean measure lies wholly on the expected side of the value
  (supported), wholly on the other side (not supported), or across it (inconclusive).
- trend: the 95% interval of a log-log slope fitted over the variants (scipy.stats.linregress) lies wholly
  inside [low, high] (supported), wholly outside (not supported), or across a bound (inconclusive).
A single seed decides nothing: every rule says inconclusive on fewer than two seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from pipeline.engine.scaling import Slope
from pipeline.reports.statistics import CONFIDENCE, holm, verdict

OUTCOMES = ("supported", "not supported", "inconclusive")

# How each pair verdict bears on each expectation: (verdicts that support it, verdicts that refute it).
_HOLDS: dict[str, tuple[set[str], set[str]]] = {
    "better": ({"better"}, {"worse", "equivalent"}),
    "worse": ({"worse"}, {"better", "equivalent"}),
    "not_worse": ({"better", "equivalent"}, {"worse"}),
    "not_better": ({"worse", "equivalent"}, {"better"}),
    "equivalent": ({"equivalent"}, {"better", "worse"}),
}


def pair_outcome(pair_verdict: str, expected: str) -> str:
    """supported / not supported / inconclusive, from a pair's verdict and what the claim expects of it."""
    holds, breaks = _HOLDS[expected]
    if pair_verdict in holds:
        return "supported"
    return "not supported" if pair_verdict in breaks else "inconclusive"


def combine(outcomes: list[str]) -> str:
    """A claim's verdict: not supported if any expectation is refuted, supported if all hold, else inconclusive."""
    if "not supported" in outcomes:
        return "not supported"
    return "supported" if outcomes and all(o == "supported" for o in outcomes) else "inconclusive"


@dataclass
class SeedTest:
    """A paired test on one number per seed: A's mean advantage over B (positive: A better), its interval, p."""

    n: int
    advantage: float
    low: float
    high: float
    p_value: float


def paired_seed_test(a: list[float], b: list[float], mode: str, log: bool) -> SeedTest:
    """A against B over the same seeds: a paired t-test on the differences (log10 values for a log measure)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if log:
        x, y = np.log10(x), np.log10(y)
    d = (x - y) if mode == "max" else (y - x)
    if len(d) < 2:
        return SeedTest(len(d), float(d.mean()) if len(d) else math.nan, -math.inf, math.inf, 1.0)
    if np.all(d == d[0]):  # no spread: the t-test is undefined; the difference is exactly known
        return SeedTest(len(d), float(d[0]), float(d[0]), float(d[0]), 0.0 if d[0] != 0 else 1.0)
    result = stats.ttest_1samp(d, 0.0)
    ci = result.confidence_interval(CONFIDENCE)
    return SeedTest(len(d), float(d.mean()), float(ci.low), float(ci.high), float(result.pvalue))


def judge_pairs(tests: list[SeedTest], margins: list[float | None]) -> list[tuple[str, str, float]]:
    """Holm across the claim's comparisons, then each pair's (verdict, reason, Holm p)."""
    adjusted = holm([t.p_value for t in tests]) if tests else []
    return [(*verdict(t.n, t.low, t.high, p, m), p) for t, p, m in zip(tests, adjusted, margins)]


def mean_interval(values: list[float], log: bool) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t-interval of the mean (of log10 values for a log measure, given back in the
    measure's own units)."""
    v = np.log10(values) if log else np.asarray(values, dtype=float)
    mean = float(v.mean())
    if len(v) < 2 or np.all(v == v[0]):
        low = high = mean
    else:
        low, high = stats.t.interval(CONFIDENCE, len(v) - 1, loc=mean, scale=stats.sem(v))
    back = (lambda z: 10 ** z) if log else (lambda z: z)
    return back(mean), back(float(low)), back(float(high))


def threshold_outcome(n: int, low: float, high: float, side: str, value: float) -> tuple[str, str]:
    """Whether the interval [low, high] of a mean lies above / below `value`."""
    if n < 2:
        return "inconclusive", "single seed: decides nothing"
    above, below = low > value, high < value
    if (side == "above" and above) or (side == "below" and below):
        return "supported", f"95% interval wholly {side} {value:g}"
    if (side == "above" and high <= value) or (side == "below" and low >= value):
        return "not supported", f"95% interval wholly on the wrong side of {value:g}"
    return "inconclusive", f"95% interval spans {value:g}"


def trend_outcome(slope: Slope, seeds: int, low: float | None, high: float | None) -> tuple[str, str]:
    """Whether the slope's interval lies inside [low, high]."""
    lo, hi = -math.inf if low is None else low, math.inf if high is None else high
    bounds = f"[{'-∞' if low is None else f'{low:g}'}, {'∞' if high is None else f'{high:g}'}]"
    if seeds < 2:
        return "inconclusive", "single seed: decides nothing"
    if lo <= slope.low and slope.high <= hi:
        return "supported", f"slope's 95% interval inside {bounds}"
    if slope.high < lo or slope.low > hi:
        return "not supported", f"slope's 95% interval outside {bounds}"
    return "inconclusive", f"slope's 95% interval crosses a bound of {bounds}"

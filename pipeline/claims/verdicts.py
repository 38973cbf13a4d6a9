"""A claim's verdict from its runs: each expectation measured over the seeds and judged by its rule."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.claims.measures import Measure, measure
from pipeline.claims.rules import (
    SeedTest,
    combine,
    judge_pairs,
    mean_interval,
    pair_outcome,
    paired_seed_test,
    threshold_outcome,
    trend_outcome,
)
from pipeline.engine.scaling import loglog_slope
from pipeline.reports.records import find_seed_dirs
from pipeline.reports.statistics import compare_pair, load_evidence
from pipeline.specs.claim import Claim, CompareExpectation, ThresholdExpectation, TrendExpectation

RNG_SEED = 0  # the bootstrap and permutation draws: fixed, so a report rebuilt from the same runs is the same


@dataclass
class Outcome:
    """One expectation, judged."""

    text: str  # what was expected, in words
    measure: str
    n: int  # seeds
    statistic: float  # A's advantage, a mean, or a slope
    low: float
    high: float
    outcome: str  # supported / not supported / inconclusive
    reason: str


@dataclass
class VariantValues:
    variant: str
    measure: str
    values: dict[int, float]  # seed → value
    log: bool = False  # the measure is compared on a log scale
    label: str = ""  # how the report names the measure
    mean: float = math.nan
    low: float = math.nan
    high: float = math.nan


@dataclass
class ClaimResult:
    claim: Claim
    verdict: str
    outcomes: list[Outcome]
    variants: list[VariantValues] = field(default_factory=list)

    @property
    def deciding(self) -> Outcome:
        """The expectation that decided: the first refuted one, else the first undecided one, else the first."""
        for wanted in ("not supported", "inconclusive"):
            for o in self.outcomes:
                if o.outcome == wanted:
                    return o
        return self.outcomes[0]


def _main_metric(seed_dirs: dict[int, Path]) -> str | None:
    from pipeline.engine.runfiles import Evaluation, read_run_fields
    for folder in seed_dirs.values():
        metric = read_run_fields(folder, Evaluation).get("main_metric")
        if metric:
            return metric
    return None


class ClaimRuns:
    """The runs of one claim, and each measure's value per variant and seed."""

    def __init__(self, claim: Claim, runs: Path):
        self.claim, self.runs = claim, runs
        self.seed_dirs = {v: find_seed_dirs(runs / claim.name / v, claim.seeds) for v in claim.variants}
        self.metrics = {v: _main_metric(dirs) for v, dirs in self.seed_dirs.items()}  # variants may differ in task
        self._values: dict[tuple[str, str], VariantValues] = {}

    def measure(self, name: str, variant: str) -> Measure:
        return measure(name, self.metrics[variant])

    def values(self, variant: str, name: str) -> VariantValues:
        key = (variant, name)
        if key not in self._values:
            m = self.measure(name, variant)
            read = {s: m.read(folder) for s, folder in self.seed_dirs[variant].items()}
            kept = {s: v for s, v in read.items() if v is not None and not (m.log and v <= 0)}
            vv = VariantValues(variant, name, kept, m.log, m.label)
            if kept:
                vv.mean, vv.low, vv.high = mean_interval(list(kept.values()), m.log)
            self._values[key] = vv
        return self._values[key]


def _compare_test(runs: ClaimRuns, e: CompareExpectation, rng: np.random.Generator) -> SeedTest:
    """The main test metric, paired on seeds and test examples with the project's statistics."""
    task = runs.claim.variants[e.a].task
    a = load_evidence(e.a, task, runs.seed_dirs[e.a])
    b = load_evidence(e.b, task, runs.seed_dirs[e.b])
    if a is None or b is None:
        return SeedTest(0, math.nan, -math.inf, math.inf, 1.0)
    c = compare_pair(a, b, rng)
    return SeedTest(c.n, c.advantage, c.low, c.high, c.p_value)


def _compare(runs: ClaimRuns, e: CompareExpectation, rng: np.random.Generator) -> SeedTest:
    if e.measure == "test_metric":
        return _compare_test(runs, e, rng)
    m = runs.measure(e.measure, e.a)
    a, b = runs.values(e.a, e.measure).values, runs.values(e.b, e.measure).values
    shared = sorted(set(a) & set(b))
    return paired_seed_test([a[s] for s in shared], [b[s] for s in shared], m.mode, m.log)


def _margin(runs: ClaimRuns, e: CompareExpectation, margins: dict[str, float]) -> float | None:
    if e.margin is not None:
        return e.margin
    return margins.get(runs.metrics[e.a] or "") if e.measure == "test_metric" else None


def _comparisons(runs: ClaimRuns, margins: dict[str, float], rng: np.random.Generator) -> dict[int, Outcome]:
    """Every compare expectation, judged together (Holm across them)."""
    indexed = [(i, e) for i, e in enumerate(runs.claim.spec.expect) if isinstance(e, CompareExpectation)]
    tests = [_compare(runs, e, rng) for _, e in indexed]
    judged = judge_pairs(tests, [_margin(runs, e, margins) for _, e in indexed])
    out = {}
    for (i, e), t, (pair_verdict, reason, p_holm) in zip(indexed, tests, judged):
        m = runs.measure(e.measure, e.a)
        scale = " (log10)" if m.log else ""
        text = f"{e.a} vs {e.b} on {m.label}{scale}: {e.expect.replace('_', ' ')}"
        out[i] = Outcome(text, m.label, t.n, t.advantage, t.low, t.high, pair_outcome(pair_verdict, e.expect),
                         f"{pair_verdict}: {reason}")
    return out


def _threshold(runs: ClaimRuns, e: ThresholdExpectation) -> Outcome:
    vv = runs.values(e.of, e.measure)
    n = len(vv.values)
    outcome, reason = threshold_outcome(n, vv.low, vv.high, e.expect, e.value) if n else ("inconclusive", "no runs")
    return Outcome(f"{e.of}: {e.measure} {e.expect} {e.value:g}", e.measure, n, vv.mean, vv.low, vv.high, outcome,
                   reason)


def _trend(runs: ClaimRuns, e: TrendExpectation) -> Outcome:
    xs, ys, seeds = [], [], set()
    for variant, x in zip(e.variants, e.x):
        for seed, y in runs.values(variant, e.measure).values.items():
            if y > 0:
                xs.append(x)
                ys.append(y)
                seeds.add(seed)
    bounds = (f"at most {e.high:g}" if e.low is None else f"at least {e.low:g}" if e.high is None
              else f"within [{e.low:g}, {e.high:g}]")
    text = f"log-log slope of {e.measure} against {e.x_name} over {', '.join(e.variants)}: {bounds}"
    if len(set(xs)) < 3:
        return Outcome(text, e.measure, len(seeds), math.nan, math.nan, math.nan, "inconclusive", "too few points")
    slope = loglog_slope(xs, ys)
    outcome, reason = trend_outcome(slope, len(seeds), e.low, e.high)
    return Outcome(text, e.measure, len(seeds), slope.slope, slope.low, slope.high, outcome, reason)


def judge_claim(claim: Claim, runs: Path, margins: dict[str, float]) -> ClaimResult:
    """The claim's expectations judged on its runs, in the order the claim states them."""
    claim_runs = ClaimRuns(claim, runs)
    rng = np.random.default_rng(RNG_SEED)
    compared = _comparisons(claim_runs, margins, rng)
    outcomes = []
    for i, e in enumerate(claim.spec.expect):
        if isinstance(e, CompareExpectation):
            outcomes.append(compared[i])
        elif isinstance(e, ThresholdExpectation):
            outcomes.append(_threshold(claim_runs, e))
        else:
            outcomes.append(_trend(claim_runs, e))
    measures = list(dict.fromkeys([*(e.measure for e in claim.spec.expect), *claim.spec.show]))
    variants = [claim_runs.values(v, m) for m in measures for v in claim.variants]
    return ClaimResult(claim, combine([o.outcome for o in outcomes]), outcomes, variants)

"""Evidence from repeats: per-experiment intervals, paired comparisons and their verdicts.

Sources of variance: the seeds (initialisation, data order, dropout, augmentation, and the train/val split
under `vary: split`) and the test set, a sample of the examples the model could meet. So:
- an experiment's 95% interval comes from a two-level bootstrap: seeds drawn with replacement, then each
  drawn seed's test examples drawn with replacement (percentile interval). A task without per-example
  records (generate: FID) is bootstrapped over seeds alone, with scipy.stats.bootstrap;
- a comparison A vs B pairs them on their shared seeds and, within a seed, on the same test examples: the
  two-level bootstrap of the paired difference, P(A>B) over the shared seeds (Bouthillier et al., 2021), and
  a paired permutation test (scipy.stats.permutation_test) over (seed, example) pairs, or over seeds where
  there are no records, Holm-corrected across the comparisons of one dataset/task group.
Differences are signed as advantages: positive means A is better, whichever way the metric runs (the
task's `mode`, pipeline/engine/tasks.py, is the one place that says).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from pipeline.engine.examples import (
    example_scores,
    has_records,
    metric_from_records,
    read_records,
)
from pipeline.engine.runfiles import Evaluation, read_run_fields
from pipeline.reports.records import finite, task_mode

CONFIDENCE = 0.95
ALPHA = 0.05  # family-wise error rate of one group's comparisons, after Holm's correction
BOOTSTRAP_RESAMPLES = 2000
PERMUTATIONS = 9999
CHUNK = 100  # bootstrap resamples drawn at once: bounds memory at CHUNK × examples per seed slot
VERDICTS = ("better", "worse", "equivalent", "inconclusive")


@dataclass
class Evidence:
    """One experiment's per-seed test results: its main metric per seed and, where the task keeps them,
    each seed's per-example records."""

    name: str
    task: str
    metric: str
    values: dict[int, float]
    records: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return task_mode(self.task)

    @property
    def seeds(self) -> list[int]:
        return sorted(self.values)

    def has_records(self, seeds: list[int]) -> bool:
        return has_records(self.task) and all(s in self.records for s in seeds)


def load_evidence(name: str, task: str, seed_dirs: dict[int, Path]) -> Evidence | None:
    """The seeds with a finite test metric in their eval.json (and their records.npz); None without any."""
    values, records, metric = {}, {}, None
    for seed, folder in seed_dirs.items():
        evaluation = read_run_fields(folder, Evaluation)
        metric = evaluation.get("main_metric") or metric
        value = finite((evaluation.get("test") or {}).get(metric)) if metric else None
        if value is None:
            continue
        values[seed] = value
        kept = read_records(folder / evaluation["records"]) if evaluation.get("records") else None
        if kept is not None:
            records[seed] = kept
    return Evidence(name, task, metric, values, records) if values else None


# ── the two-level bootstrap ──────────────────────────────────────────────────
def two_level_bootstrap(per_seed, seeds: list[int], n_examples: int, rng: np.random.Generator,
                        resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray:
    """Bootstrap distribution of the mean over seeds of `per_seed(seed, idx (R, n_examples)) → (R,)`:
    each resample draws len(seeds) seeds with replacement, then each drawn seed's examples with replacement."""
    out = []
    for start in range(0, resamples, CHUNK):
        r = min(CHUNK, resamples - start)
        picks = rng.integers(len(seeds), size=(r, len(seeds)))  # (R, S): which seed fills each slot
        total = np.zeros(r)
        for slot in range(len(seeds)):
            idx = rng.integers(n_examples, size=(r, n_examples))  # (R, N): this slot's examples, per resample
            for k, seed in enumerate(seeds):
                rows = picks[:, slot] == k
                if rows.any():
                    total[rows] += per_seed(seed, idx[rows])
        out.append(total / len(seeds))
    return np.concatenate(out)


def percentile_interval(samples: np.ndarray) -> tuple[float, float]:
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(samples, [tail, 1 - tail])
    return float(low), float(high)


def seed_interval(values: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """95% bootstrap interval of the mean over seeds alone (scipy; percentile, as the two-level one)."""
    if len(values) < 2 or np.all(values == values[0]):
        return float(values.mean()), float(values.mean())
    result = stats.bootstrap((values,), np.mean, confidence_level=CONFIDENCE, n_resamples=BOOTSTRAP_RESAMPLES,
                             method="percentile", rng=rng)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _n_examples(evidence: Evidence, seeds: list[int]) -> int:
    first = next(iter(evidence.records[seeds[0]].values()))
    return len(first)


# ── one experiment ───────────────────────────────────────────────────────────
@dataclass
class Summary:
    name: str
    metric: str
    n: int  # seeds
    mean: float
    std: float | None  # across seeds (ddof 1); None for a single seed
    low: float
    high: float
    levels: str  # what the interval resamples: "seeds+examples", "seeds" or "examples" (one seed)


def summarize(evidence: Evidence, rng: np.random.Generator) -> Summary:
    seeds = evidence.seeds
    values = np.array([evidence.values[s] for s in seeds])
    std = float(values.std(ddof=1)) if len(values) > 1 else None
    if evidence.has_records(seeds):
        n = _n_examples(evidence, seeds)
        boot = two_level_bootstrap(lambda s, idx: metric_from_records(evidence.task, evidence.records[s], idx),
                                   seeds, n, rng)
        low, high = percentile_interval(boot)
        levels = "seeds+examples" if len(seeds) > 1 else "examples"
    else:
        (low, high), levels = seed_interval(values, rng), "seeds"
    return Summary(evidence.name, evidence.metric, len(seeds), float(values.mean()), std, low, high, levels)


# ── one comparison ───────────────────────────────────────────────────────────
@dataclass
class Comparison:
    a: str
    b: str
    metric: str
    n: int  # shared seeds
    advantage: float  # mean over shared seeds of A's advantage over B (positive: A better)
    low: float
    high: float
    p_a_beats_b: float
    p_value: float
    declared: bool = False
    margin: float | None = None  # the metric's practical-equivalence margin
    p_holm: float = float("nan")
    verdict: str = "inconclusive"
    reason: str = ""


def prob_outperform(advantages: np.ndarray) -> float:
    """P(A>B): the share of shared seeds on which A beats B, a tie counting half."""
    return float(np.mean(advantages > 0) + 0.5 * np.mean(advantages == 0))


def _mean(x, axis):
    return np.mean(x, axis=axis)


def paired_permutation_p(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> float:
    """Two-sided p-value of a paired permutation test on the mean difference: A and B swapped within pairs,
    which flips the sign of the pair's difference. Tied pairs flip into themselves, so only the others count
    (the same p-value, far less work: most test examples are right, or wrong, for both models)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    d = d[d != 0]
    if len(d) < 2:  # no difference, or one that its own sign flip matches: nothing to tell
        return 1.0
    if 2 ** len(d) <= PERMUTATIONS:  # few enough for scipy to enumerate every sign pattern: exact
        return float(stats.permutation_test((d,), _mean, permutation_type="samples", vectorized=True,
                                            n_resamples=PERMUTATIONS, rng=rng).pvalue)
    return sign_flip_p(d, rng)


def sign_flip_p(d: np.ndarray, rng: np.random.Generator, resamples: int = PERMUTATIONS, batch: int = 500) -> float:
    """scipy.stats.permutation_test's randomized one-sample `samples` p-value, computed as it does (|null| ≥
    |observed| up to its relative tolerance, plus one for the observed pattern), in numpy: scipy passes every
    observation to the statistic as an array of its own, which took 18 s for 3,000 pairs here."""
    observed = abs(d.mean())
    hits = 0
    for start in range(0, resamples, batch):
        signs = rng.integers(0, 2, size=(min(batch, resamples - start), len(d))) * 2 - 1  # (R, n) of ±1
        hits += int(np.sum(np.abs((signs * d).mean(axis=1)) >= observed * (1 - 1e-14)))
    return (hits + 1) / (resamples + 1)


def compare_pair(a: Evidence, b: Evidence, rng: np.random.Generator, declared: bool = False) -> Comparison:
    """A against B on their shared seeds (and, with records, the same test examples)."""
    seeds = sorted(set(a.values) & set(b.values))
    sign = 1.0 if a.mode == "max" else -1.0
    advantages = sign * np.array([a.values[s] - b.values[s] for s in seeds])
    if not seeds:
        return Comparison(a.name, b.name, a.metric, 0, float("nan"), float("nan"), float("nan"), float("nan"),
                          1.0, declared)
    if a.has_records(seeds) and b.has_records(seeds):
        def per_seed(s, idx):
            return sign * (metric_from_records(a.task, a.records[s], idx) - metric_from_records(b.task, b.records[s], idx))
        low, high = percentile_interval(two_level_bootstrap(per_seed, seeds, _n_examples(a, seeds), rng))
        scores_a = np.concatenate([example_scores(a.task, a.records[s]) for s in seeds])
        scores_b = np.concatenate([example_scores(b.task, b.records[s]) for s in seeds])
        p = paired_permutation_p(scores_a, scores_b, rng)
    else:
        low, high = seed_interval(advantages, rng)
        p = paired_permutation_p(np.array([a.values[s] for s in seeds]), np.array([b.values[s] for s in seeds]), rng)
    return Comparison(a.name, b.name, a.metric, len(seeds), float(advantages.mean()), low, high,
                      prob_outperform(advantages), p, declared)


# ── the rules ────────────────────────────────────────────────────────────────
def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment: the k-th smallest p times (m - k + 1), kept monotone, capped at 1."""
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def verdict(n: int, low: float, high: float, p_holm: float, margin: float | None) -> tuple[str, str]:
    """The rule, in this order:
    1. fewer than 2 shared seeds → inconclusive: a single seed is never a win;
    2. the whole 95% interval of A's advantage inside ±margin → equivalent;
    3. interval above 0 and Holm-corrected p < ALPHA → better; below 0 and p < ALPHA → worse;
    4. anything else → inconclusive."""
    if n < 2:
        return "inconclusive", "single seed: never a win"
    if margin is not None and -margin <= low and high <= margin:
        return "equivalent", f"95% interval within ±{margin:g}"
    significant = p_holm < ALPHA
    if low > 0 and significant:
        return "better", f"interval above 0, Holm p={p_holm:.3g}"
    if high < 0 and significant:
        return "worse", f"interval below 0, Holm p={p_holm:.3g}"
    if low > 0 or high < 0:
        return "inconclusive", f"interval excludes 0 but Holm p={p_holm:.3g} ≥ {ALPHA}"
    return "inconclusive", "interval spans 0" + (f" and leaves ±{margin:g}" if margin is not None else "")


def judge(comparisons: list[Comparison], margin: float | None) -> list[Comparison]:
    """Holm across one group's comparisons, then each one's verdict."""
    for c, adjusted in zip(comparisons, holm([c.p_value for c in comparisons])):
        c.p_holm, c.margin = adjusted, margin
        c.verdict, c.reason = verdict(c.n, c.low, c.high, adjusted, margin)
    return comparisons


# ── one dataset/task group ───────────────────────────────────────────────────
def group_best(summaries: dict[str, Summary], mode: str) -> str:
    """The experiment with the best mean (ties by name)."""
    sign = -1.0 if mode == "max" else 1.0
    return min(summaries, key=lambda name: (sign * summaries[name].mean, name))


def group_comparisons(evidence: dict[str, Evidence], summaries: dict[str, Summary], declared: list[tuple[str, str]],
                      margin: float | None, rng: np.random.Generator) -> list[Comparison]:
    """Every experiment of the group against the group's best, then the declared pairs (once each), judged
    together."""
    if not evidence:
        return []
    best = group_best(summaries, next(iter(evidence.values())).mode)
    pairs = [(name, best, False) for name in evidence if name != best]
    seen = {frozenset((a, b)) for a, b, _ in pairs}
    for a, b in declared:
        if frozenset((a, b)) in seen:  # already compared with the best: mark it declared, keep its orientation
            pairs = [(x, y, d or frozenset((x, y)) == frozenset((a, b))) for x, y, d in pairs]
        else:
            pairs.append((a, b, True))
            seen.add(frozenset((a, b)))
    return judge([compare_pair(evidence[a], evidence[b], rng, declared=d) for a, b, d in pairs], margin)

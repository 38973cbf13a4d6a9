"""Statistics against known answers (scipy's own results, hand-computed values) and the verdict rule on made-up
numbers on each side of each threshold."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from pipeline.engine.examples import metric_from_records
from pipeline.reports import statistics as st

VALUES = np.array([0.91, 0.94, 0.93, 0.90, 0.95])


def test_p_a_beats_b_by_hand():
    # A beats B on seeds 0 and 2, ties on seed 3, loses on 1 and 4: (2 + 0.5) / 5.
    assert st.prob_outperform(np.array([0.02, -0.01, 0.03, 0.0, -0.02])) == pytest.approx(0.5)
    assert st.prob_outperform(np.array([0.1, 0.2])) == 1.0


def test_seed_interval_is_scipys_percentile_bootstrap():
    ours = st.seed_interval(VALUES, np.random.default_rng(3))
    theirs = stats.bootstrap((VALUES,), np.mean, confidence_level=0.95, n_resamples=st.BOOTSTRAP_RESAMPLES,
                             method="percentile", rng=np.random.default_rng(3)).confidence_interval
    assert ours == pytest.approx((theirs.low, theirs.high))


def test_paired_permutation_p_is_scipys_exact_paired_test():
    a, b = np.array([0.91, 0.94, 0.93, 0.90, 0.95]), np.array([0.90, 0.92, 0.93, 0.88, 0.91])
    theirs = stats.permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis),
                                    permutation_type="samples", vectorized=True).pvalue
    assert st.paired_permutation_p(a, b, np.random.default_rng(0)) == pytest.approx(theirs)
    # 4 of 5 differences positive and one zero: exact over 2^5 sign flips, the two extreme ones of each sign
    # pattern with the same |mean|: p = 4/32 (the zero difference flips with itself).
    assert theirs == pytest.approx(4 / 32)


def test_sign_flip_p_agrees_with_scipys_randomized_test():
    """Past enumeration, our p-value and scipy's are two Monte Carlo estimates of the same number."""
    rng = np.random.default_rng(5)
    for shift in (0.0, 0.15, 0.4):
        d = rng.normal(shift, 1.0, size=60)
        theirs = stats.permutation_test((d,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples",
                                        vectorized=True, n_resamples=20000, rng=np.random.default_rng(1)).pvalue
        ours = st.sign_flip_p(d, np.random.default_rng(2), resamples=20000)
        assert ours == pytest.approx(theirs, abs=0.01), (shift, ours, theirs)


def test_tied_pairs_do_not_change_the_p_value():
    a = np.array([1, 1, 0, 1, 1, 1, 0, 0, 1, 1], dtype=float)
    b = np.array([1, 0, 0, 0, 1, 0, 0, 1, 1, 0], dtype=float)
    full = stats.permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples",
                                  vectorized=True).pvalue  # exact: 2^10 patterns
    assert st.paired_permutation_p(a, b, np.random.default_rng(0)) == pytest.approx(full)


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04 → 3×0.01 = 0.03, 2×0.02 = 0.04, 1×0.04 = 0.04 (kept monotone)
    assert st.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert st.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_two_level_bootstrap_of_one_seed_is_the_example_bootstrap():
    """With one seed the two-level bootstrap is the percentile bootstrap of the accuracy over examples."""
    correct = np.array([1] * 80 + [0] * 20, dtype=bool)
    boot = st.two_level_bootstrap(lambda s, idx: metric_from_records("classify", {"correct": correct}, idx), [0],
                                  len(correct), np.random.default_rng(0), resamples=4000)
    low, high = st.percentile_interval(boot)
    theirs = stats.bootstrap((correct.astype(float),), np.mean, method="percentile", n_resamples=4000,
                             rng=np.random.default_rng(1)).confidence_interval
    assert boot.mean() == pytest.approx(0.8, abs=0.005)
    assert low == pytest.approx(theirs.low, abs=0.02) and high == pytest.approx(theirs.high, abs=0.02)


def test_records_add_up_to_r2_and_ratio_metrics():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(50, 1))
    pred = target + rng.normal(scale=0.5, size=(50, 1))
    se = (pred - target) ** 2
    everything = np.arange(50)[None]
    r2 = 1 - se.sum() / ((target - target.mean()) ** 2).sum()
    assert metric_from_records("regress", {"se": se, "target": target}, everything)[0] == pytest.approx(r2)
    lm = {"loss_bits": np.array([10.0, 30.0]), "tokens": np.array([10, 10])}
    assert metric_from_records("lm", lm, np.array([[0, 1]]))[0] == pytest.approx(2.0)


# ── the verdict rule, on each side of each threshold ─────────────────────────
@pytest.mark.parametrize("n, low, high, p, margin, expected", [
    (1, 0.05, 0.09, 0.001, 0.005, "inconclusive"),   # one seed: never a win, however clear
    (2, 0.05, 0.09, 0.001, 0.005, "better"),          # two seeds and a clear interval
    (5, -0.004, 0.004, 0.9, 0.005, "equivalent"),     # inside ±margin
    (5, -0.004, 0.006, 0.9, 0.005, "inconclusive"),   # just leaves the margin
    (5, -0.004, 0.004, 0.9, None, "inconclusive"),    # no margin declared: never equivalent
    (5, 0.001, 0.02, 0.049, 0.005, "better"),         # above 0, p just under alpha
    (5, 0.001, 0.02, 0.051, 0.005, "inconclusive"),   # above 0, p just over alpha
    (5, -0.001, 0.02, 0.001, 0.005, "inconclusive"),  # interval touches below 0
    (5, -0.02, -0.001, 0.049, 0.005, "worse"),
    (5, -0.02, -0.001, 0.051, 0.005, "inconclusive"),
    (5, 0.001, 0.004, 0.001, 0.005, "equivalent"),    # a real but practically nil difference
])
def test_verdict_rule(n, low, high, p, margin, expected):
    assert st.verdict(n, low, high, p, margin)[0] == expected


def _evidence(name: str, per_seed: list[float], n_examples: int = 200, seed: int = 0) -> st.Evidence:
    """Classification records whose accuracy on each seed is the given number."""
    rng = np.random.default_rng(seed)
    records = {}
    for s, acc in enumerate(per_seed):
        correct = np.zeros(n_examples, dtype=bool)
        correct[rng.choice(n_examples, round(acc * n_examples), replace=False)] = True
        records[s] = {"correct": correct}
    return st.Evidence(name, "classify", "accuracy", {s: float(r["correct"].mean()) for s, r in records.items()},
                       records)


def test_group_comparisons_judge_everyone_against_the_best():
    strong = _evidence("strong", [0.95, 0.96, 0.94, 0.95, 0.96])
    weak = _evidence("weak", [0.60, 0.62, 0.58, 0.61, 0.60], seed=1)
    twin = st.Evidence("twin", "classify", "accuracy", dict(strong.values), dict(strong.records))
    rng = np.random.default_rng(0)
    evidence = {e.name: e for e in (strong, weak, twin)}
    summaries = {name: st.summarize(e, rng) for name, e in evidence.items()}
    out = {(c.a, c.b): c for c in st.group_comparisons(evidence, summaries, [("weak", "twin")], 0.005, rng)}
    assert out[("weak", "strong")].verdict == "worse"
    assert out[("weak", "strong")].p_a_beats_b == 0.0
    assert out[("twin", "strong")].verdict == "equivalent"  # the very same results under another name
    assert out[("weak", "twin")].declared and out[("weak", "twin")].verdict == "worse"
    assert summaries["weak"].low < summaries["weak"].mean < summaries["weak"].high
    assert summaries["weak"].levels == "seeds+examples" and summaries["weak"].n == 5


def test_single_seed_is_reported_as_such():
    one = _evidence("one", [0.99])
    other = _evidence("other", [0.50], seed=2)
    c = st.judge([st.compare_pair(one, other, np.random.default_rng(0))], 0.005)[0]
    assert c.n == 1 and c.verdict == "inconclusive" and "single seed" in c.reason


# ── what the registry says of a champion ─────────────────────────────────────
def _judged(a: str, b: str, verdict: str) -> st.Comparison:
    return st.Comparison(a=a, b=b, metric="accuracy", n=4, advantage=0.0, low=0.0, high=0.0, p_a_beats_b=0.5,
                         p_value=0.5, verdict=verdict)


def test_a_champion_that_every_verdict_puts_ahead_beats_its_group():
    from pipeline.reports.compare import champion_evidence
    verdicts = [_judged("rnn", "lstm", "worse"), _judged("lstm", "gru", "better")]  # either orientation
    assert champion_evidence("lstm", ["lstm", "gru", "rnn"], verdicts) == (
        "beats every other experiment of its group (2, paired tests over seeds, Holm-corrected)")


def test_a_champion_names_every_experiment_it_is_not_shown_better_than_with_the_verdict():
    from pipeline.reports.compare import champion_evidence
    verdicts = [_judged("rnn", "lstm", "worse"), _judged("gru", "lstm", "equivalent"),
                _judged("cnn", "lstm", "inconclusive")]
    assert champion_evidence("lstm", ["lstm", "gru", "cnn", "rnn", "mlp"], verdicts) == (
        "not shown better than: gru (equivalent), cnn (inconclusive), mlp (not compared)")
    assert champion_evidence("lstm", ["lstm"], []) == "the only experiment of its group"

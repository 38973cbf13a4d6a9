"""Scaling against n and d: the log-log fit on made-up numbers, and small real grids (FLOP slopes are exact)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.engine.scaling import (
    attention_scaling,
    loglog_slope,
    lstm,
    matching_width,
    measure_grid,
    params_of,
    recurrence_vs_attention,
    transformer_layer,
)

QUICK = {"budget_s": 0.02, "batch": 2}  # timing is not what these tests check


# ── the fit ─────────────────────────────────────────────────────────────────────────────────────
def test_exact_quadratic_data_gives_slope_two_with_no_width():
    ns = [16, 32, 64, 128]
    fit = loglog_slope(ns, [3.0 * n ** 2 for n in ns])
    assert fit.slope == pytest.approx(2.0, abs=1e-12) and fit.stderr == pytest.approx(0.0, abs=1e-12)
    assert fit.low == pytest.approx(2.0, abs=1e-9) and fit.high == pytest.approx(2.0, abs=1e-9)
    assert fit.points == 4


def test_noisy_data_gives_an_interval_around_the_true_slope():
    rng = np.random.default_rng(0)
    xs = np.geomspace(10, 1000, 12)
    ys = 0.5 * xs ** 1.5 * np.exp(rng.normal(0, 0.05, len(xs)))
    fit = loglog_slope(xs, ys)
    assert fit.low < 1.5 < fit.high and 0 < fit.high - fit.low < 0.2
    assert fit.slope == pytest.approx(1.5, abs=0.05)


def test_a_wider_confidence_gives_a_wider_interval():
    xs, ys = [1, 2, 4, 8], [1.0, 4.5, 15.0, 70.0]
    narrow, wide = loglog_slope(xs, ys, 0.8), loglog_slope(xs, ys, 0.99)
    assert wide.low < narrow.low < narrow.slope < narrow.high < wide.high


@pytest.mark.parametrize("xs, ys", [([1, 2], [1, 4]), ([1, 2, 4], [1, 4]), ([0, 1, 2], [1, 2, 3])])
def test_a_fit_refuses_too_few_or_non_positive_points(xs, ys):
    with pytest.raises(ValueError):
        loglog_slope(xs, ys)


# ── real grids ───────────────────────────────────────────────────────────────────────────────────
def test_a_transformer_grid_in_n_has_exact_flop_slopes_and_positive_times():
    rng = torch.get_rng_state()
    points = measure_grid(transformer_layer, [(8, 16), (16, 16), (32, 16)], **QUICK)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is untouched
    attention = [p.flops["attention"] for p in points]
    assert attention[1] == 4 * attention[0] and attention[2] == 4 * attention[1]
    assert loglog_slope([8, 16, 32], [p.flops["ffn"] for p in points]).slope == pytest.approx(1.0)
    for p in points:
        assert p.flops["total"] == sum(v for k, v in p.flops.items() if k != "total")
        assert p.train_step_flops > 2 * p.flops["total"] and p.runs >= 2 * 5  # every round times at least 2
        assert p.step_s > 0 and p.sequences_per_s == pytest.approx(p.batch / p.step_s)
        assert p.params == points[0].params  # n changes the input, not the weights


def test_attention_scaling_returns_the_fitted_slopes_as_plain_numbers():
    result = attention_scaling(ns=(8, 16, 32), ds=(16, 32, 64), d_at=16, n_at=8, **QUICK)
    slopes = result["slopes"]
    assert slopes["attention_flops_vs_n"]["slope"] == pytest.approx(2.0)
    assert slopes["attention_flops_vs_d"]["slope"] == pytest.approx(1.0)
    assert slopes["ffn_flops_vs_n"]["slope"] == pytest.approx(1.0)
    assert slopes["ffn_flops_vs_d"]["slope"] == pytest.approx(2.0)
    assert slopes["projection_flops_vs_d"]["slope"] == pytest.approx(2.0)
    assert {"time_vs_n", "time_vs_d", "total_flops_vs_n"} <= set(slopes)
    assert [p["n"] for p in result["by_n"]] == [8, 16, 32] and [p["d"] for p in result["by_d"]] == [16, 32, 64]
    json.dumps(result, allow_nan=False)


def test_the_lstm_is_sized_to_the_transformers_parameter_count():
    target = params_of(transformer_layer, 16, 32)
    hidden = matching_width(lstm("cells"), target, 16)
    assert params_of(lstm("cells"), 16, hidden - 1) < target <= params_of(lstm("cells"), 16, hidden)


def test_recurrence_vs_attention_times_both_and_the_lstm_flops_grow_linearly():
    result = recurrence_vs_attention(ns=(8, 16, 32), d=16, impls=("cells", "torch"), **QUICK)
    assert set(result["models"]) == {"transformer", "lstm_cells", "lstm_torch"}
    cells = result["models"]["lstm_cells"]
    recurrence = [p["flops"]["recurrence"] for p in cells]
    assert recurrence[1] == 2 * recurrence[0] and recurrence[2] == 2 * recurrence[1]
    assert len(result["ratio"]["lstm_cells"]) == 3 and all(r > 0 for r in result["ratio"]["lstm_torch"])
    assert set(result["time_slopes"]) == set(result["models"])
    json.dumps(result, allow_nan=False)

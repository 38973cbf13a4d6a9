"""Metric directions: the one vocabulary that tasks, early stopping, sweeps and reports share.

A metric is lower-is-better when its name is on LOWER_IS_BETTER, else higher-is-better (accuracy, r2,
exact_accuracy, masked_accuracy, coverage, elbo). Known by name, so that reports need not import the tasks (and torch).
"""
from __future__ import annotations

from typing import Literal

Mode = Literal["min", "max"]
LOWER_IS_BETTER = frozenset({"loss", "mse", "mae", "rmse", "cross_entropy", "bits_per_char", "excess_bits_per_char",
                             "perplexity", "fid", "kid", "nll", "bce", "kl", "nelbo", "reconstruction_error"})
# Optuna's words for the same two directions (a sweep spec's `objective.direction`).
OPTUNA_DIRECTION: dict[Mode, str] = {"min": "minimize", "max": "maximize"}


def metric_mode(metric: str | None) -> Mode:
    """'min' when a lower value of the metric is better, else 'max'. A split prefix (val/, test/) is ignored."""
    name = (metric or "").lower().rsplit("/", 1)[-1]
    return "min" if name in LOWER_IS_BETTER else "max"


def mode_of_direction(direction: str) -> Mode:
    """An Optuna direction ('minimize' / 'maximize') in this vocabulary."""
    return "min" if direction == "minimize" else "max"


def is_better(value: float, than: float, mode: Mode, margin: float = 0.0) -> bool:
    """Whether `value` beats `than` by more than `margin` in direction `mode`."""
    return value < than - margin if mode == "min" else value > than + margin

"""Metric directions: one vocabulary for tasks, early stopping, sweeps and reports."""
from __future__ import annotations

from pipeline.engine.tasks import TASKS
from pipeline.specs.metrics import OPTUNA_DIRECTION, is_better, metric_mode, mode_of_direction


def test_every_task_main_metric_has_the_direction_its_meaning_gives():
    expected = {"classify": "max", "regress": "max", "seq2seq": "max", "lm": "min", "reconstruct": "min",
                "generate": "min", "mlm": "max"}
    assert {name: make().mode for name, make in TASKS.items()} == expected


def test_split_prefixes_do_not_change_a_direction():
    assert metric_mode("val/loss") == metric_mode("loss") == "min"
    assert metric_mode("test/accuracy") == metric_mode("accuracy") == "max"
    assert metric_mode(None) == "max"


def test_optuna_words_map_both_ways():
    assert all(mode_of_direction(OPTUNA_DIRECTION[m]) == m for m in ("min", "max"))


def test_is_better_respects_direction_and_margin():
    assert is_better(0.9, 0.8, "max") and not is_better(0.8, 0.9, "max")
    assert is_better(0.1, 0.2, "min") and not is_better(0.2, 0.1, "min")
    assert not is_better(0.85, 0.8, "max", margin=0.1) and is_better(0.95, 0.8, "max", margin=0.1)
    assert not is_better(0.8, 0.8, "max")

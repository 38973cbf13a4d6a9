"""What a claim measures on each seed's run: one number per seed, read from the run files, with its direction.

Each measure has one entry in MEASURES (or is a `test.KEY` / `flops.KIND` / `epochs_to:VALUE` family), so that a
claim file names measures by word and the report explains each once.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.engine.runfiles import Cost, Diagnostics, Evaluation, RunMetrics, read_run_fields
from pipeline.reports.records import finite, read_history
from pipeline.specs.metrics import LOWER_IS_BETTER, Mode


@dataclass(frozen=True)
class Measure:
    name: str
    mode: Mode  # which way is better
    log: bool  # compared on a log10 scale (ratios, sizes, times): a factor, not a difference, is what matters
    meaning: str
    read: Callable[[Path], float | None]
    label: str = ""  # how reports name it, when not by its name
    validation: bool = False  # read from the validation metric: the data must hold a validation split

    def __post_init__(self):
        if not self.label:
            object.__setattr__(self, "label", self.name)


def _test(folder: Path, key: str) -> float | None:
    value = (read_run_fields(folder, Evaluation).get("test") or {})
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return finite(value)


def test_metric(folder: Path) -> float | None:
    evaluation = read_run_fields(folder, Evaluation)
    return _test(folder, evaluation["main_metric"]) if evaluation.get("main_metric") else None


def gap(folder: Path) -> float | None:
    """How far the final training metric is past the test metric, in the direction that flatters training."""
    metrics, evaluation = read_run_fields(folder, RunMetrics), read_run_fields(folder, Evaluation)
    metric = metrics.get("main_metric")
    train = finite((metrics.get("final") or {}).get(f"train/{metric}"))
    test = finite((evaluation.get("test") or {}).get(metric))
    if train is None or test is None:
        return None
    return test - train if direction_of(metric) == "min" else train - test


def grad_ratio(folder: Path) -> float | None:
    """First epoch's mean gradient norm of the layer nearest the input over that of the layer nearest the output."""
    norms = (read_run_fields(folder, Diagnostics).get("grad_norm") or {}).get("mean") or []
    first = norms[0] if norms and norms[0] else []
    if len(first) < 2 or finite(first[0]) is None or not finite(first[-1]):
        return None
    return first[0] / first[-1]


def max_grad_norm(folder: Path) -> float | None:
    series = (read_run_fields(folder, Diagnostics).get("grad_norm") or {}).get("global_max") or []
    values = [v for v in map(finite, series) if v is not None]
    return max(values) if values else None


def _troubled(folder: Path, flags_raised: tuple[str, ...]) -> float | None:
    """1 when the run diverged (a NaN or Inf loss) or raised any of the flags, else 0."""
    metrics, flags = read_run_fields(folder, RunMetrics), read_run_fields(folder, Diagnostics).get("flags") or {}
    if not metrics:
        return None
    return float(metrics.get("status") == "diverged" or any(flags.get(f) for f in flags_raised))


def finite_training(folder: Path) -> float | None:
    """1 when training ended with a finite loss, else 0."""
    metrics = read_run_fields(folder, RunMetrics)
    if not metrics:
        return None
    return float(metrics.get("status") != "diverged" and finite((metrics.get("final") or {}).get("train/loss"))
                 is not None)


def _metrics_value(folder: Path, key: str) -> float | None:
    return finite((read_run_fields(folder, RunMetrics).get("final") or {}).get(key))


def params(folder: Path) -> float | None:
    return finite(read_run_fields(folder, Cost).get("params_total"))


def time_per_example(folder: Path) -> float | None:
    rate = finite(read_run_fields(folder, RunMetrics).get("train_samples_per_s"))
    return 1.0 / rate if rate else None


def _flops(folder: Path, kind: str) -> float | None:
    return finite((read_run_fields(folder, Cost).get("flops_by_kind") or {}).get(kind))


def _epochs_to(folder: Path, target: float) -> float | None:
    """The first epoch whose validation metric reaches `target`; a run that never does counts as one epoch past
    its budget (censored: the claim's figure shows it as such)."""
    metrics = read_run_fields(folder, RunMetrics)
    metric = metrics.get("main_metric")
    if not metric or not (folder / "history.csv").is_file():
        return None
    better_low = direction_of(metric) == "min"
    for i, row in enumerate(read_history(folder / "history.csv")):
        value = finite(row.get(f"val/{metric}"))
        if value is not None and (value <= target if better_low else value >= target):
            return float(row.get("epoch", i + 1))
    return float(metrics.get("epochs", 0) + 1)


def direction_of(key: str | None) -> Mode:
    """Lower is better for a metric on the shared list, or one named after it (denoised_mse, val_loss)."""
    name = (key or "").rsplit(".", 1)[-1].lower()
    return "min" if name in LOWER_IS_BETTER or name.rsplit("_", 1)[-1] in LOWER_IS_BETTER else "max"


MEASURES: dict[str, Measure] = {m.name: m for m in [
    Measure("test_metric", "max", False, "the task's main test metric (paired on the same test examples)",
            test_metric),
    Measure("gap", "min", False, "the last epoch's training metric (as measured while training: dropout and "
            "augmentation on) minus the test metric", gap),
    Measure("grad_ratio", "max", True, "first epoch: gradient norm of the first layer over that of the last "
            "(vanishing when far below 1)", grad_ratio),
    Measure("max_grad_norm", "min", True, "largest global gradient norm of any step", max_grad_norm),
    Measure("blew_up", "min", False, "1 when the run diverged or its gradient norm spiked (flag `exploding`), else 0",
            lambda folder: _troubled(folder, ("exploding",))),
    Measure("unstable", "min", False, "1 when the run diverged, its training loss jumped back up (flag `unstable`) or "
            "its gradient norm spiked, else 0", lambda folder: _troubled(folder, ("unstable", "exploding"))),
    Measure("dead_units", "min", False, "1 when most of a layer's ReLU units never fired at the end (flag "
            "`dead_units`), else 0", lambda folder: _troubled(folder, ("dead_units",))),
    Measure("finite_training", "max", False, "1 when training ended with a finite loss, else 0", finite_training),
    Measure("train_loss", "min", True, "final training loss",
            lambda folder: _metrics_value(folder, "train/loss")),
    Measure("params", "min", True, "parameters", params),
    Measure("time_per_example", "min", True, "seconds of training per example", time_per_example),
]}


def measure(name: str, task_metric: str | None = None) -> Measure:
    """The measure a claim names: a table entry, or test.KEY, flops.KIND or epochs_to:VALUE."""
    if name in MEASURES:
        m = MEASURES[name]
        if name == "test_metric":
            return Measure(m.name, direction_of(task_metric), m.log, m.meaning, m.read, f"test {task_metric}")
        return m
    if name.startswith("test."):
        key = name.removeprefix("test.")
        return Measure(name, direction_of(key), False, f"test {key}", lambda folder: _test(folder, key))
    if name.startswith("flops."):
        kind = name.removeprefix("flops.")
        return Measure(name, "min", True, f"forward FLOPs per example in {kind}", lambda folder: _flops(folder, kind))
    if name.startswith("epochs_to:"):
        target = float(name.removeprefix("epochs_to:"))
        return Measure(name, "min", False, f"epochs until the validation metric reaches {target:g}",
                       lambda folder: _epochs_to(folder, target), validation=True)
    raise KeyError(name)


def known_measure(name: str) -> str | None:
    """Why `name` is not a measure, or None when it is."""
    try:
        if name.startswith("epochs_to:"):
            float(name.removeprefix("epochs_to:"))
        measure(name)
    except (KeyError, ValueError):
        return (f"unknown measure {name!r}; measures: {', '.join(MEASURES)}, test.KEY, flops.KIND, "
                "epochs_to:VALUE")
    return None

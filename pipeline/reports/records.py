"""What the reports read: one record per experiment from its run folder, tolerant of missing pieces.

A run that failed, was never trained, or ran with diagnostics off still gets a record; whatever is
missing reads as None and shows as "—" in the reports.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.engine.runfiles import Cost, Diagnostics, Evaluation, RunMetrics, path_of, read_run_fields
from pipeline.engine.verdicts import FLAG_NAMES, HISTORY_FLAGS
from pipeline.specs.metrics import Mode, metric_mode

SAMPLE_EPOCH = re.compile(r"epoch_(\d+)$")


def read_history(path: Path) -> list[dict[str, float]]:
    """history.csv → one dict per epoch, numbers as floats (empty cells dropped)."""
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for key, text in raw.items():
                if key is None or text in (None, ""):
                    continue
                try:
                    row[key] = float(text)
                except ValueError:
                    continue
            rows.append(row)
    return rows


def finite(value) -> float | None:
    """A real finite number, else None (NaN, Inf, strings and missing values are not plotted or ranked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def loss_quantities(history: list[dict]) -> list[str]:
    """The losses a history holds: ['loss'], or each player's (['d_loss', 'g_loss']) where there is no single one."""
    keys = dict.fromkeys(k.split("/", 1)[1] for row in history for k in row if k.startswith(("train/", "val/")))
    if "loss" in keys:
        return ["loss"]
    return [k for k in keys if k.endswith("_loss")]


def task_mode(task: str | None, metric: str | None = None) -> Mode:
    """Which way a task's main metric runs: the task's own `mode` (pipeline/engine/tasks.py); by the metric's
    name only for a run whose task is unknown."""
    from pipeline.engine.tasks import TASKS
    return TASKS[task]().mode if task in TASKS else metric_mode(metric)


@dataclass
class RunRecord:
    """Everything the reports know of one experiment."""

    name: str
    run_dir: Path
    metrics: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    sample_images: list[Path] = field(default_factory=list)
    sample_text: str | None = None
    # Repeats: each seed's folder and test value; the files above are those of the first seed.
    seed_dirs: dict[int, Path] = field(default_factory=dict)
    seed_values: dict[int, float] = field(default_factory=dict)
    seed_histories: dict[int, list[dict[str, float]]] = field(default_factory=dict)
    summary: object = None  # statistics.Summary, set by compare

    # identity ------------------------------------------------------------------
    @property
    def dataset(self) -> str:
        return self.metrics.get("dataset") or "unknown"

    @property
    def task(self) -> str:
        return self.metrics.get("task") or "unknown"

    @property
    def kind(self) -> str | None:
        return self.metrics.get("kind")

    @property
    def status(self) -> str:
        return self.metrics.get("status") or self.evaluation.get("status") or "missing"

    @property
    def main_metric(self) -> str | None:
        return self.metrics.get("main_metric") or self.evaluation.get("main_metric")

    @property
    def mode(self) -> Mode:
        return task_mode(self.task, self.main_metric)

    # results -------------------------------------------------------------------
    @property
    def test(self) -> dict:
        test = self.evaluation.get("test")
        return test if isinstance(test, dict) else {}

    @property
    def test_value(self) -> float | None:
        """The main test metric: its mean over the seeds."""
        if self.seed_values:
            return sum(self.seed_values.values()) / len(self.seed_values)
        return finite(self.test.get(self.main_metric)) if self.main_metric else None

    def val_value(self, when: str = "best") -> float | None:
        """The main metric on the validation split at the best or the final epoch."""
        return finite(self.metrics.get(when, {}).get(f"val/{self.main_metric}"))

    def test_scalars(self) -> dict[str, float]:
        """Every number among the test metrics (confusion matrices, samples and examples left out)."""
        return {k: float(v) for k, v in self.test.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    # diagnostics ---------------------------------------------------------------
    @property
    def diagnostics_on(self) -> bool:
        return bool(self.diagnostics.get("enabled"))

    @property
    def overfitting(self) -> dict:
        value = self.diagnostics.get("overfitting")
        return value if isinstance(value, dict) else {}

    def gap(self, quantity: str, when: str) -> float | None:
        """Validation minus training `quantity` ('loss' or 'metric') at the 'best' or 'final' epoch.

        From diagnostics.json when it has it, else from the epoch summaries in metrics.json.
        """
        recorded = self.overfitting.get(f"gap_{when}")
        if isinstance(recorded, dict) and quantity in recorded:
            return finite(recorded[quantity])
        key = "loss" if quantity == "loss" else self.main_metric
        epoch = self.metrics.get(when, {})
        val, train = finite(epoch.get(f"val/{key}")), finite(epoch.get(f"train/{key}"))
        return None if val is None or train is None else val - train

    @property
    def verdict(self) -> str | None:
        return self.overfitting.get("verdict")

    def flags(self) -> dict[str, bool] | None:
        """Each measured flag, raised or not; None when the run has no diagnostics at all.

        With diagnostics off the gradient flags were never measured (only unstable and diverged, which
        need just the loss history), so they are left out rather than reported as clear.
        """
        raw = self.diagnostics.get("flags")
        if not isinstance(raw, dict):
            return None
        measured = FLAG_NAMES if self.diagnostics_on else HISTORY_FLAGS
        return {name: bool(raw.get(name)) for name in measured if name in raw}

    def raised_flags(self) -> list[str]:
        return [name for name, on in (self.flags() or {}).items() if on]

    def flag_detail(self, name: str) -> str:
        details = self.diagnostics.get("flag_details")
        return str(details.get(name, "")) if isinstance(details, dict) else ""

    def grad_norm_matrix(self) -> tuple[list[str], list[int], list[list[float]]] | None:
        """(layers, epochs, mean norm per epoch × layer), or None when not recorded."""
        grad = self.diagnostics.get("grad_norm")
        layers = self.diagnostics.get("layers")
        if not isinstance(grad, dict) or not layers or not grad.get("mean"):
            return None
        mean = grad["mean"]
        epochs = self.diagnostics.get("epochs") or list(range(1, len(mean) + 1))
        if not all(isinstance(row, list) and len(row) == len(layers) for row in mean):
            return None
        return list(layers), list(epochs), mean


def sample_images(run_dir: Path) -> list[Path]:
    """The sample grids worth showing: the last epoch's grid plus every grid not named by epoch."""
    folder = run_dir / "samples"
    if not folder.is_dir():
        return []
    pngs = sorted(folder.glob("*.png"))
    by_epoch = [p for p in pngs if SAMPLE_EPOCH.search(p.stem)]
    others = [p for p in pngs if not SAMPLE_EPOCH.search(p.stem)]
    last = max(by_epoch, key=lambda p: int(SAMPLE_EPOCH.search(p.stem).group(1)), default=None)
    return ([last] if last else []) + others


def last_sample_text(run_dir: Path) -> str | None:
    """The last epoch's section of samples.txt ('=== epoch N ===' headers), or None."""
    path = run_dir / "samples.txt"
    if not path.is_file():
        return None
    text = path.read_text(errors="replace")
    sections = text.split("=== epoch ")
    if len(sections) < 2:
        return text.strip() or None
    header, _, body = sections[-1].partition(" ===\n")
    return f"epoch {header}:\n{body.strip()}"


def find_seed_dirs(run_dir: Path, seeds: list[int] | None = None) -> dict[int, Path]:
    """runs/NAME/seed-K folders holding a run: the listed seeds, or every one there is; a run folder from
    before repeats (metrics.json at its top) counts as its training seed."""
    if seeds is None:
        found = {int(p.name[5:]): p for p in run_dir.glob("seed-*") if p.name[5:].isdigit()}
    else:
        found = {s: run_dir / f"seed-{s}" for s in seeds}
    found = {s: p for s, p in sorted(found.items()) if path_of(p, RunMetrics).is_file()}
    if not found and path_of(run_dir, RunMetrics).is_file():
        found = {0: run_dir}  # metrics.json holds no seed (it never did): such a folder counts as seed 0
    return found


def load_run(name: str, runs_dir: Path, seeds: list[int] | None = None) -> RunRecord:
    seed_dirs = find_seed_dirs(Path(runs_dir) / name, seeds)
    run_dir = next(iter(seed_dirs.values()), Path(runs_dir) / name)
    values = {}
    for seed, folder in seed_dirs.items():
        evaluation = read_run_fields(folder, Evaluation)
        value = finite((evaluation.get("test") or {}).get(evaluation.get("main_metric")))
        if value is not None:
            values[seed] = value
    return RunRecord(
        name=name, run_dir=run_dir, seed_dirs=seed_dirs, seed_values=values,
        seed_histories={seed: read_history(folder / "history.csv") for seed, folder in seed_dirs.items()},
        metrics=read_run_fields(run_dir, RunMetrics),
        evaluation=read_run_fields(run_dir, Evaluation),
        diagnostics=read_run_fields(run_dir, Diagnostics),
        cost=read_run_fields(run_dir, Cost),
        history=read_history(run_dir / "history.csv"),
        sample_images=sample_images(run_dir),
        sample_text=last_sample_text(run_dir),
    )


def rank(records: list[RunRecord]) -> list[RunRecord]:
    """Best test metric first, in each record's own direction; ties by the validation metric, then by name.
    Runs without a test metric come last."""
    def signed(r: RunRecord, v: float | None) -> float:
        return float("inf") if v is None else (-v if r.mode == "max" else v)

    return sorted(records, key=lambda r: (r.test_value is None, signed(r, r.test_value),
                                          signed(r, r.val_value("best")), r.name))


def group_by_dataset_task(records: list[RunRecord]) -> list[tuple[tuple[str, str], list[RunRecord]]]:
    """Records grouped by (dataset, task), groups in first-seen order, each ranked best first."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.dataset, r.task), []).append(r)
    return [(key, rank(members)) for key, members in groups.items()]


def pareto_front(points: list[tuple[float, float]], mode: str) -> list[int]:
    """Indices of the points no other point beats: cost (x) no higher and metric (y) no worse, one strictly.

    Returned in increasing cost, so they can be joined by a step line.
    """
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    front = []
    for i, (xi, yi) in enumerate(points):
        dominated = any(
            xj <= xi and (better(yj, yi) or yj == yi) and (xj < xi or better(yj, yi))
            for j, (xj, yj) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


# ── the leaderboard ──────────────────────────────────────────────────────────
COST_COLUMNS = {  # leaderboard column → cost.json key
    "params": "params_total",
    "params_trainable": "params_trainable",
    "flops_forward_per_sample": "flops_forward_per_sample",
    "flops_train_step_per_sample": "flops_train_step_per_sample",
    "train_time_s": "train_time_s",
    "train_samples_per_s": "train_samples_per_s",
    "infer_samples_per_s": "infer_samples_per_s",
    "latency_ms_p50": "latency_ms_p50",
    "latency_ms_p95": "latency_ms_p95",
    "peak_memory_mb": "peak_memory_mb",
    "memory_kind": "memory_kind",
    "peak_flops": "peak_flops",
    "mfu": "mfu",
    "device": "device",
}


def leaderboard_row(r: RunRecord) -> dict:
    """One flat row: identity, task metric (test and validation), gaps, verdict, flags, cost."""
    flags = r.flags()
    row = {
        "experiment": r.name, "dataset": r.metrics.get("dataset"), "task": r.metrics.get("task"), "kind": r.kind,
        "status": r.status, "metric": r.main_metric,
        "test_metric": r.test_value, "n_seeds": len(r.seed_values) or None,
        "test_std": getattr(r.summary, "std", None), "test_ci_low": getattr(r.summary, "low", None),
        "test_ci_high": getattr(r.summary, "high", None), "val_metric": r.val_value("best"), "val_metric_final": r.val_value("final"),
        "best_epoch": r.metrics.get("best_epoch"), "epochs": r.metrics.get("epochs"),
        "onset_epoch": r.overfitting.get("onset_epoch"),
        "gap_loss_best": r.gap("loss", "best"), "gap_metric_best": r.gap("metric", "best"),
        "gap_loss_final": r.gap("loss", "final"), "gap_metric_final": r.gap("metric", "final"),
        "verdict": r.verdict,
        "flags": None if flags is None else ";".join(r.raised_flags()),
    }
    for name in FLAG_NAMES:
        row[f"flag_{name}"] = None if flags is None or name not in flags else flags[name]
    for column, key in COST_COLUMNS.items():
        row[column] = r.cost.get(key)
    # Training time and throughput are in metrics.json too: a run whose cost.json is missing still has them.
    for column in ("train_time_s", "train_samples_per_s"):
        if row[column] is None:
            row[column] = r.metrics.get(column)
    row.update({f"test/{k}": v for k, v in r.test_scalars().items()})
    row["mlflow_run_id"] = r.metrics.get("mlflow_run_id")
    return row

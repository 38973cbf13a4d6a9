"""Per-example test records: each test example's score, kept beside eval.json as records.npz.

Paired tests and the test-set bootstrap of pipeline/reports/statistics.py resample these. For each task
the records add up to its main metric exactly (`metric_from_records`), so a resampled set of examples
gives the metric that set would have scored. A task whose metric is not a sum over examples (generate:
FID) keeps no records; its statistics rest on the seeds alone.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pipeline.engine.tasks import TASKS
from pipeline.io import atomic_write_bytes

if TYPE_CHECKING:
    from pipeline.data.prepare import DataMeta

RECORDS = "records.npz"


def example_records(task: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    meta: DataMeta) -> dict[str, np.ndarray]:
    """Each test example's scores, or {} for a task without per-example scores (generate). What each task
    records lives in its file (engine/tasks/), beside its metrics."""
    model.eval()
    with torch.no_grad():
        return TASKS[task]().example_records(model, x, y, meta)


def write_records(path: str | Path, records: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **records)
    atomic_write_bytes(path, buffer.getvalue())


def read_records(path: str | Path) -> dict[str, np.ndarray] | None:
    path = Path(path)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# ── from records back to the metric ─────────────────────────────────────────
def has_records(task: str) -> bool:
    return task in TASKS and TASKS[task]().keeps_records


def metric_from_records(task: str, records: dict[str, np.ndarray], idx: np.ndarray) -> np.ndarray:
    """The task's main metric on resampled examples: idx (R, M) indices into the records → (R,) values."""
    return TASKS[task]().metric_from_records(records, idx)


def example_scores(task: str, records: dict[str, np.ndarray]) -> np.ndarray:
    """One number per example whose mean moves with the metric: between two models on the same examples, the
    mean paired difference has the sign of their metrics' difference (for R², the test set's spread is fixed)."""
    return TASKS[task]().example_scores(records)

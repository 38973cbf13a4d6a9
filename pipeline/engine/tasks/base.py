"""What every task is: the protocol the engine calls, the defaults most tasks keep, and shared helpers.

The engine knows nothing of accuracy or R²: a task turns a batch into a loss plus summable statistics
(kept on the device, so no host sync per step), and turns summed statistics into metrics once per epoch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

from models.contract import Model, Phase, Stats
from pipeline.specs.metrics import Mode, metric_mode

if TYPE_CHECKING:
    from pipeline.data.prepare import DataMeta


class Task(Protocol):
    name: str
    metric: str  # the main metric, a key of summarize()'s result
    reads: frozenset[str]  # the kinds of data it can read (see data_kind)

    @property
    def mode(self) -> Mode: ...

    def attach(self, meta: DataMeta) -> None: ...

    def phases(self, model: Model) -> list[Phase]: ...

    def eval_stats(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> Stats: ...

    def summarize(self, stats: dict[str, float]) -> dict[str, float]: ...

    def test_metrics(self, model: Model, x: torch.Tensor, y: torch.Tensor, meta: DataMeta) -> dict: ...

    def end_epoch(self, model: Model, epoch: int, run_dir, data) -> dict[str, float]: ...

    def inference_forward(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class TaskDefaults:
    """The hooks most tasks leave as they are. Each task file declares name, metric and reads."""

    @property
    def mode(self) -> Mode:
        """Whether the main metric is better low or high: from the one vocabulary in specs/metrics.py."""
        return metric_mode(self.metric)

    def attach(self, meta: DataMeta) -> None:
        """Take the data's facts (a task that needs where its prepared folder is keeps them)."""

    def end_epoch(self, model: Model, epoch: int, run_dir, data) -> dict[str, float]:
        """After validation each epoch: write per-epoch artifacts, return extra history columns."""
        return {}

    def inference_forward(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """How the model runs for inference on a batch (cost measurement): its forward on x."""
        return model.example_forward(x)

    # Per-example test records (records.npz; see engine/examples.py). A task that keeps them says how they add
    # up to its main metric: Σ numerator / Σ denominator over the examples (no denominator: the numerator's mean).
    keeps_records = False
    records_ratio: tuple[str, str | None] | None = None

    def example_records(self, model: Model, x: torch.Tensor, y: torch.Tensor, meta: DataMeta) -> dict[str, np.ndarray]:
        """Each test example's scores (the model in eval mode, no grad); {} for a task that keeps none."""
        return {}

    def metric_from_records(self, records: dict[str, np.ndarray], idx: np.ndarray) -> np.ndarray:
        """The main metric on resampled examples: idx (R, M) indices into the records → (R,) values."""
        num, den = self.records_ratio
        top = records[num][idx].astype(np.float64).sum(-1)
        bottom = records[den][idx].astype(np.float64).sum(-1) if den else idx.shape[-1]
        return top / bottom

    def example_scores(self, records: dict[str, np.ndarray]) -> np.ndarray:
        """One number per example whose mean moves with the metric: between two models on the same examples,
        the mean paired difference has the sign of their metrics' difference."""
        return records[self.records_ratio[0]].astype(np.float64)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Model outputs over a whole split, in eval mode, batch by batch."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 512):
    """(x, y) in consecutive batches of `size` (evaluation of a whole split without holding all activations)."""
    for i in range(0, len(x), size):
        yield x[i:i + size], y[i:i + size]


def add_stats(total: Stats, stats: Stats) -> None:
    """Sum a batch's statistics into a running total, key by key."""
    for k, v in stats.items():
        total[k] = total[k] + v if k in total else v


def seeded(device: torch.device, seed: int) -> torch.Generator:
    """A generator of its own for evaluation noise: the training's random stream is never moved."""
    return torch.Generator(device=device).manual_seed(seed)

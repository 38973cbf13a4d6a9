"""What every task is: the protocol the engine calls, the defaults most tasks keep, and shared helpers.

The engine knows nothing of accuracy or R²: a task turns a batch into a loss plus summable statistics
(kept on the device, so no host sync per step), and turns summed statistics into metrics once per epoch.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from models.contract import Model, Phase, Stats
from pipeline.specs.metrics import Mode, metric_mode


class Task(Protocol):
    name: str
    metric: str  # the main metric, a key of summarize()'s result
    reads: frozenset[str]  # the kinds of data it can read (see data_kind)

    @property
    def mode(self) -> Mode: ...

    def attach(self, meta: dict) -> None: ...

    def phases(self, model: Model) -> list[Phase]: ...

    def eval_stats(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> Stats: ...

    def summarize(self, stats: dict[str, float]) -> dict[str, float]: ...

    def test_metrics(self, model: Model, x: torch.Tensor, y: torch.Tensor, meta: dict) -> dict: ...

    def end_epoch(self, model: Model, epoch: int, run_dir, data) -> dict[str, float]: ...

    def inference_forward(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class TaskDefaults:
    """The hooks most tasks leave as they are. Each task file declares name, metric and reads."""

    @property
    def mode(self) -> Mode:
        """Whether the main metric is better low or high: from the one vocabulary in specs/metrics.py."""
        return metric_mode(self.metric)

    def attach(self, meta: dict) -> None:
        """Take the data's facts (a task that needs where its prepared folder is keeps them)."""

    def end_epoch(self, model: Model, epoch: int, run_dir, data) -> dict[str, float]:
        """After validation each epoch: write per-epoch artifacts, return extra history columns."""
        return {}

    def inference_forward(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """How the model runs for inference on a batch (cost measurement): its forward on x."""
        return model.example_forward(x)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Model outputs over a whole split, in eval mode, batch by batch."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def add_stats(total: Stats, stats: Stats) -> None:
    """Sum a batch's statistics into a running total, key by key."""
    for k, v in stats.items():
        total[k] = total[k] + v if k in total else v


def seeded(device: torch.device, seed: int) -> torch.Generator:
    """A generator of its own for evaluation noise: the training's random stream is never moved."""
    return torch.Generator(device=device).manual_seed(seed)

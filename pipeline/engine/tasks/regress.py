"""regress: mean squared error on real-valued targets; MSE and MAE in the target's units, and R²."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from models.contract import Model, Phase, Stats
from pipeline.engine.tasks.base import TaskDefaults, predict

if TYPE_CHECKING:
    from pipeline.data.prepare import DataMeta


def _regress_loss(model: Model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    pred = model(x)  # (B, D), in the standardised units of prepare
    loss = F.mse_loss(pred, y)
    n = y.new_tensor(len(y), dtype=torch.float32)
    err = (pred.detach() - y)
    # R² per epoch from sums: 1 - SSE / (Σy² - (Σy)²/n), over all target dims.
    return loss, {"loss": loss.detach() * n, "abs_err": err.abs().mean(1).sum(), "sse": (err ** 2).sum(),
                  "sum_y": y.sum(0), "sum_y2": (y ** 2).sum(0), "n": n}


def _as_list(v) -> list[float]:
    return v if isinstance(v, list) else [v]


@dataclass
class RegressTask(TaskDefaults):
    name: str = "regress"
    metric: str = "r2"
    reads: frozenset[str] = frozenset({"value"})
    keeps_records = True  # R² is not a ratio of sums over examples: its own metric_from_records

    def phases(self, model: Model) -> list[Phase]:
        return model.training_phases(_regress_loss)

    def eval_stats(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> Stats:
        return _regress_loss(model, x, y)[1]

    def summarize(self, stats: dict) -> dict[str, float]:
        n = stats["n"]
        sst = float(sum(s2 - s * s / n for s, s2 in zip(_as_list(stats["sum_y"]), _as_list(stats["sum_y2"]))))
        return {"loss": stats["loss"] / n, "mae": stats["abs_err"] / n, "r2": 1.0 - stats["sse"] / max(sst, 1e-12)}

    def test_metrics(self, model: Model, x: torch.Tensor, y: torch.Tensor, meta: DataMeta) -> dict:
        """MSE and MAE in the target's original units (prepare standardised it), R² (unit-free)."""
        norm = meta.normalisation
        mean, std = (torch.tensor(norm[k], dtype=y.dtype, device=y.device) for k in ("y_mean", "y_std"))
        pred, true = predict(model, x) * std + mean, y * std + mean
        sse = ((pred - true) ** 2).sum(0)
        sst = ((true - true.mean(0)) ** 2).sum(0)
        return {"mse": ((pred - true) ** 2).mean().item(), "mae": (pred - true).abs().mean().item(),
                "r2": (1 - sse / sst.clamp(min=1e-12)).mean().item()}

    def example_records(self, model: Model, x: torch.Tensor, y: torch.Tensor, meta: DataMeta) -> dict[str, np.ndarray]:
        """Squared errors and targets in the target's original units (R² needs the targets' spread)."""
        norm = meta.normalisation
        mean, std = (torch.tensor(norm[k], dtype=y.dtype, device=y.device) for k in ("y_mean", "y_std"))
        pred, true = predict(model, x) * std + mean, y * std + mean  # (N, D)
        return {"se": ((pred - true) ** 2).cpu().numpy().astype(np.float64),
                "target": true.cpu().numpy().astype(np.float64)}

    def metric_from_records(self, records: dict[str, np.ndarray], idx: np.ndarray) -> np.ndarray:
        """R² averaged over target dimensions, as summarize reports it: se, target (R, M, D) → (R,)."""
        se, target = records["se"][idx], records["target"][idx]
        sst = ((target - target.mean(-2, keepdims=True)) ** 2).sum(-2)  # (R, D)
        return (1 - se.sum(-2) / np.maximum(sst, 1e-12)).mean(-1)

    def example_scores(self, records: dict[str, np.ndarray]) -> np.ndarray:
        return -records["se"].sum(-1)  # for R² on the same examples the spread is fixed: less error, higher R²

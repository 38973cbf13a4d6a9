"""Tasks: what a model learns. Each task gives the engine its optimisation phases and its metrics.

The engine knows nothing of accuracy or R²: a task turns a batch into a loss plus summable statistics
(kept on the device, so no host sync per step), and turns summed statistics into metrics once per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

Stats = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Stats]]


@dataclass
class Phase:
    """One optimisation step per batch: a loss over a set of parameters, with its own optimizer.

    Most models have one phase; a GAN has two (discriminator, generator) — the engine treats both alike.
    """

    name: str
    params: list[nn.Parameter]
    loss: LossFn
    lr: float | None = None  # overrides the spec's learning rate for this phase
    betas: tuple[float, float] | None = None  # overrides the spec's Adam betas for this phase


class Task(Protocol):
    name: str
    metric: str  # the main metric, a key of summarize()'s result
    mode: Literal["min", "max"]

    def phases(self, model: nn.Module) -> list[Phase]: ...

    def eval_stats(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Stats: ...

    def summarize(self, stats: dict[str, float]) -> dict[str, float]: ...

    def test_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, meta: dict) -> dict: ...

    # Optional: `end_epoch(model, epoch, run_dir, data) -> dict[str, float]`, called after validation each
    # epoch; generative tasks write sample grids / sampled text there and may return extra history columns.


def model_phases(model: nn.Module, default: LossFn) -> list[Phase]:
    """A model that trains in several phases (a GAN) says so with `training_phases()`; others get one."""
    custom = getattr(model, "training_phases", None)
    if custom is not None:
        return custom()
    return [Phase("main", [p for p in model.parameters() if p.requires_grad], default)]


# ── classify ─────────────────────────────────────────────────────────────────
def _classify_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    logits = model(x)  # (B, K)
    loss = F.cross_entropy(logits, y)
    n = y.new_tensor(len(y), dtype=torch.float32)
    return loss, {"loss": loss.detach() * n, "correct": (logits.argmax(1) == y).sum().float(), "n": n}


@dataclass
class ClassifyTask:
    name: str = "classify"
    metric: str = "accuracy"
    mode: Literal["min", "max"] = "max"

    def phases(self, model: nn.Module) -> list[Phase]:
        return model_phases(model, _classify_loss)

    def eval_stats(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Stats:
        return _classify_loss(model, x, y)[1]

    def summarize(self, stats: dict[str, float]) -> dict[str, float]:
        return {"loss": stats["loss"] / stats["n"], "accuracy": stats["correct"] / stats["n"]}

    def test_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, meta: dict) -> dict:
        logits = predict(model, x)
        k = meta["num_classes"]
        pred = logits.argmax(1)
        confusion = torch.bincount(y * k + pred, minlength=k * k).reshape(k, k)  # rows: true, cols: predicted
        tp = confusion.diag().float()
        precision = tp / confusion.sum(0).clamp(min=1)
        recall = tp / confusion.sum(1).clamp(min=1)
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
        present = confusion.sum(1) > 0  # macro-average over classes that occur in the test set
        return {"accuracy": (pred == y).float().mean().item(), "macro_f1": f1[present].mean().item(),
                "cross_entropy": F.cross_entropy(logits, y).item(), "confusion_matrix": confusion.tolist(),
                "classes": meta.get("classes")}


# ── regress ──────────────────────────────────────────────────────────────────
def _regress_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    pred = model(x)  # (B, D), in the standardised units of prepare
    loss = F.mse_loss(pred, y)
    n = y.new_tensor(len(y), dtype=torch.float32)
    err = (pred.detach() - y)
    # R² per epoch from sums: 1 - SSE / (Σy² - (Σy)²/n), over all target dims.
    return loss, {"loss": loss.detach() * n, "abs_err": err.abs().mean(1).sum(), "sse": (err ** 2).sum(),
                  "sum_y": y.sum(0), "sum_y2": (y ** 2).sum(0), "n": n}


@dataclass
class RegressTask:
    name: str = "regress"
    metric: str = "r2"
    mode: Literal["min", "max"] = "max"

    def phases(self, model: nn.Module) -> list[Phase]:
        return model_phases(model, _regress_loss)

    def eval_stats(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Stats:
        return _regress_loss(model, x, y)[1]

    def summarize(self, stats: dict) -> dict[str, float]:
        n = stats["n"]
        sst = float(sum(s2 - s * s / n for s, s2 in zip(_as_list(stats["sum_y"]), _as_list(stats["sum_y2"]))))
        return {"loss": stats["loss"] / n, "mae": stats["abs_err"] / n, "r2": 1.0 - stats["sse"] / max(sst, 1e-12)}

    def test_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, meta: dict) -> dict:
        """MSE and MAE in the target's original units (prepare standardised it), R² (unit-free)."""
        norm = meta["normalisation"]
        mean, std = (torch.tensor(norm[k], dtype=y.dtype, device=y.device) for k in ("y_mean", "y_std"))
        pred, true = predict(model, x) * std + mean, y * std + mean
        sse = ((pred - true) ** 2).sum(0)
        sst = ((true - true.mean(0)) ** 2).sum(0)
        return {"mse": ((pred - true) ** 2).mean().item(), "mae": (pred - true).abs().mean().item(),
                "r2": (1 - sse / sst.clamp(min=1e-12)).mean().item()}


def _as_list(v) -> list[float]:
    return v if isinstance(v, list) else [v]


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Model outputs over a whole split, in eval mode, batch by batch."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


# One entry per task name; the zoo adds seq2seq, lm, reconstruct and generate.
TASKS: dict[str, Callable[[], Task]] = {"classify": ClassifyTask, "regress": RegressTask}


def make_task(name: str, meta: dict | None = None) -> Task:
    return TASKS[name]()

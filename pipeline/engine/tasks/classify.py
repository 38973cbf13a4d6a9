"""classify: cross-entropy on class labels; accuracy, macro F1 and the confusion matrix; and, when a spec asks,
accuracy on test inputs shifted along their last axis."""
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


def _classify_loss(model: Model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    logits = model(x)  # (B, K)
    loss = F.cross_entropy(logits, y)
    n = y.new_tensor(len(y), dtype=torch.float32)
    return loss, {"loss": loss.detach() * n, "correct": (logits.argmax(1) == y).sum().float(), "n": n}


@dataclass
class ClassifyTask(TaskDefaults):
    name: str = "classify"
    metric: str = "accuracy"
    reads: frozenset[str] = frozenset({"class"})
    keeps_records = True
    records_ratio = ("correct", None)  # accuracy

    def phases(self, model: Model) -> list[Phase]:
        return model.training_phases(_classify_loss)

    def eval_stats(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> Stats:
        return _classify_loss(model, x, y)[1]

    def summarize(self, stats: dict[str, float]) -> dict[str, float]:
        return {"loss": stats["loss"] / stats["n"], "accuracy": stats["correct"] / stats["n"]}

    def test_metrics(self, model: Model, x: torch.Tensor, y: torch.Tensor, meta: DataMeta) -> dict:
        logits = predict(model, x)
        k = meta.num_classes
        pred = logits.argmax(1)
        confusion = torch.bincount(y * k + pred, minlength=k * k).reshape(k, k)  # rows: true, cols: predicted
        tp = confusion.diag().float()
        precision = tp / confusion.sum(0).clamp(min=1)
        recall = tp / confusion.sum(1).clamp(min=1)
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
        present = confusion.sum(1) > 0  # macro-average over classes that occur in the test set
        return {"accuracy": (pred == y).float().mean().item(), "macro_f1": f1[present].mean().item(),
                "cross_entropy": F.cross_entropy(logits, y).item(), "confusion_matrix": confusion.tolist(),
                "classes": meta.classes}

    def example_records(self, model: Model, x: torch.Tensor, y: torch.Tensor, meta: DataMeta) -> dict[str, np.ndarray]:
        logits = predict(model, x)  # (N, K)
        return {"correct": (logits.argmax(1) == y).cpu().numpy(),
                "loss": F.cross_entropy(logits, y, reduction="none").cpu().numpy().astype(np.float32)}


def shifted(x: torch.Tensor, k: int) -> torch.Tensor:
    """x translated by k positions along its last axis (k > 0: towards its end), the vacated positions 0.

    Nothing wraps around (unlike torch.roll, which the training augmentation uses): a shifted input holds only
    what the input held, moved, and zeros where nothing came in.
    """
    if k == 0:
        return x
    out = torch.zeros_like(x)
    if abs(k) >= x.shape[-1]:
        return out
    if k > 0:
        out[..., k:] = x[..., :-k]
    else:
        out[..., :k] = x[..., -k:]
    return out


def shifted_accuracy(model: Model, x: torch.Tensor, y: torch.Tensor, shifts: list[int]) -> dict[str, float]:
    """{str(k): accuracy} on the inputs shifted by k, each example scored at +k and at -k, the two averaged
    (one fixed rule: no random direction to seed, and a model biased to one side is not flattered)."""
    out = {}
    for k in shifts:
        right, left = ((predict(model, shifted(x, d)).argmax(1) == y).float().mean().item() for d in (k, -k))
        out[str(k)] = (right + left) / 2
    return out

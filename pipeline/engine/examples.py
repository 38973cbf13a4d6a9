"""Per-example test records: each test example's score, kept beside eval.json as records.npz.

Paired tests and the test-set bootstrap of pipeline/reports/statistics.py resample these. For each task
the records add up to its main metric exactly (`metric_from_records`), so a resampled set of examples
gives the metric that set would have scored. A task whose metric is not a sum over examples (generate:
FID) keeps no records; its statistics rest on the seeds alone.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.tokens import PAD
from pipeline.engine.tasks.base import predict
from pipeline.engine.tasks.seq2seq import teacher_forcing_input
from pipeline.io import atomic_write_bytes

RECORDS = "records.npz"
BATCH = 512

# task → (numerator, denominator or None): the main metric is Σ numerator / Σ denominator (or the mean of the
# numerator). regress (R²) is the one task whose metric is not such a ratio; see _r2.
RATIO_METRICS: dict[str, tuple[str, str | None]] = {
    "classify": ("correct", None),            # accuracy
    "seq2seq": ("exact", None),               # exact_accuracy: the whole sequence right
    "lm": ("loss_bits", "tokens"),            # bits_per_char
    "reconstruct": ("sse", "elements"),       # mse
}


# ── what each task records ───────────────────────────────────────────────────
def _batches(x: torch.Tensor, y: torch.Tensor):
    for i in range(0, len(x), BATCH):
        yield x[i:i + BATCH], y[i:i + BATCH]


def _classify(model: nn.Module, x, y, meta) -> dict[str, np.ndarray]:
    logits = predict(model, x)  # (N, K)
    return {"correct": (logits.argmax(1) == y).cpu().numpy(),
            "loss": F.cross_entropy(logits, y, reduction="none").cpu().numpy().astype(np.float32)}


def _regress(model: nn.Module, x, y, meta) -> dict[str, np.ndarray]:
    """Squared errors and targets in the target's original units (R² needs the targets' spread)."""
    norm = meta["normalisation"]
    mean, std = (torch.tensor(norm[k], dtype=y.dtype, device=y.device) for k in ("y_mean", "y_std"))
    pred, true = predict(model, x) * std + mean, y * std + mean  # (N, D)
    return {"se": ((pred - true) ** 2).cpu().numpy().astype(np.float64), "target": true.cpu().numpy().astype(np.float64)}


@torch.no_grad()
def _seq2seq(model: nn.Module, x, y, meta) -> dict[str, np.ndarray]:
    """Greedy decoding per sequence: whole sequence right, tokens right, tokens; teacher-forced loss."""
    parts: dict[str, list] = {"exact": [], "token_correct": [], "tokens": [], "loss": []}
    for xb, yb in _batches(x, y):
        real = yb != PAD
        hits = (model.generate(xb, yb.shape[1]) == yb) & real  # (B, T)
        logits = model(xb, teacher_forcing_input(yb))  # (B, T, V)
        loss = F.cross_entropy(logits.transpose(1, 2), yb, ignore_index=PAD, reduction="none").sum(1)  # (B,)
        parts["exact"].append((hits | ~real).all(1))
        parts["token_correct"].append(hits.sum(1))
        parts["tokens"].append(real.sum(1))
        parts["loss"].append(loss)
    return {k: torch.cat(v).cpu().numpy() for k, v in parts.items()}


@torch.no_grad()
def _lm(model: nn.Module, x, y, meta) -> dict[str, np.ndarray]:
    """Per test sequence: −Σ log2 P(x_t | x_<t) and the number of tokens."""
    losses = []
    for xb, yb in _batches(x, y):
        logits = model(xb)  # (B, T, V)
        losses.append(F.cross_entropy(logits.transpose(1, 2), yb, reduction="none").sum(1) / math.log(2))
    return {"loss_bits": torch.cat(losses).cpu().numpy().astype(np.float64),
            "tokens": np.full(len(x), y.shape[1], dtype=np.int64)}


@torch.no_grad()
def _reconstruct(model: nn.Module, x, y, meta) -> dict[str, np.ndarray]:
    """Squared error of each example's reconstruction (z = μ for a vae, clean inputs for a dae)."""
    sse = []
    for xb, _ in _batches(x, y):
        recon = model.reconstruct(xb)[0]
        sse.append((recon - xb).pow(2).flatten(1).sum(1))
    return {"sse": torch.cat(sse).cpu().numpy().astype(np.float64),
            "elements": np.full(len(x), x[0].numel(), dtype=np.int64)}


RECORDERS = {"classify": _classify, "regress": _regress, "seq2seq": _seq2seq, "lm": _lm, "reconstruct": _reconstruct}


def example_records(task: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, meta: dict) -> dict[str, np.ndarray]:
    """Each test example's scores, or {} for a task without per-example scores (generate)."""
    recorder = RECORDERS.get(task)
    if recorder is None:
        return {}
    model.eval()
    with torch.no_grad():
        return recorder(model, x, y, meta)


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
    return task in RECORDERS


def metric_from_records(task: str, records: dict[str, np.ndarray], idx: np.ndarray) -> np.ndarray:
    """The task's main metric on resampled examples: idx (R, M) indices into the records → (R,) values."""
    if task == "regress":
        return _r2(records["se"][idx], records["target"][idx])
    num, den = RATIO_METRICS[task]
    top = records[num][idx].astype(np.float64).sum(-1)
    bottom = records[den][idx].astype(np.float64).sum(-1) if den else idx.shape[-1]
    return top / bottom


def _r2(se: np.ndarray, target: np.ndarray) -> np.ndarray:
    """R² averaged over target dimensions, as the regress task reports it: se, target (R, M, D) → (R,)."""
    sst = ((target - target.mean(-2, keepdims=True)) ** 2).sum(-2)  # (R, D)
    return (1 - se.sum(-2) / np.maximum(sst, 1e-12)).mean(-1)


def example_scores(task: str, records: dict[str, np.ndarray]) -> np.ndarray:
    """One number per example whose mean moves with the metric: between two models on the same examples, the
    mean paired difference has the sign of their metrics' difference (for R², the test set's spread is fixed)."""
    if task == "regress":
        return -records["se"].sum(-1)
    return records[RATIO_METRICS[task][0]].astype(np.float64)

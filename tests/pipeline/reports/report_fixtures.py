"""Run folders in the formats diagnostics.py, cost.py and the generative tasks write, built by hand.

The report tests use them for what a tiny real run may not show: raised flags, verdicts, sample grids,
sampled text, a diverged run. Real runs are used wherever they can be (tests/pipeline/test_compare.py).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

FLAGS = ("vanishing", "exploding", "dead_units", "unstable", "diverged")


def diagnostics(epochs: int, layers: list[str], raised: tuple[str, ...] = (), verdict: str = "good fit",
                onset: int | None = None, seed: int = 0) -> dict:
    """diagnostics.json: per-layer gradient norms (E × L) falling towards the input when 'vanishing' is raised."""
    g = np.random.default_rng(seed)
    depth = np.arange(len(layers))[None, :]  # (1, L): 0 = first layer
    scale = 10.0 ** (depth - len(layers) + 1) if "vanishing" in raised else np.ones((1, len(layers)))
    mean = scale * np.exp(-np.arange(epochs)[:, None] / 10) * g.uniform(0.5, 1.5, (epochs, len(layers)))  # (E, L)
    global_mean = np.sqrt((mean ** 2).sum(1))
    global_max = global_mean * (1.5 + (50 * (np.arange(epochs) == epochs // 2) if "exploding" in raised else 0))
    dead = np.full((epochs, len(layers)), 0.7 if "dead_units" in raised else 0.05)
    return {
        "enabled": True, "layers": layers, "epochs": list(range(1, epochs + 1)),
        "grad_norm": {"mean": mean.tolist(), "min": (mean / 2).tolist(), "max": (mean * 2).tolist(),
                      "global_mean": global_mean.tolist(), "global_max": global_max.tolist()},
        "update_ratio": (mean * 1e-3).tolist(),
        "activations": {"layers": layers, "mean": np.zeros((epochs, len(layers))).tolist(),
                        "std": np.ones((epochs, len(layers))).tolist(), "dead_fraction": dead.tolist()},
        "flags": {name: name in raised for name in FLAGS},
        "flag_details": {name: f"{name} because of a constructed case" for name in raised},
        "overfitting": {"best_epoch": max(1, epochs // 2), "onset_epoch": onset,
                        "gap_best": {"loss": 0.05, "metric": -0.01}, "gap_final": {"loss": 0.2, "metric": -0.04},
                        "verdict": verdict},
    }


def cost(params: int, flops: float, train_time_s: float) -> dict:
    return {"params_total": params, "params_trainable": params, "flops_forward_per_sample": flops,
            "flops_train_step_per_sample": 3 * flops, "train_time_s": train_time_s,
            "train_samples_per_s": 1000 / train_time_s, "infer_samples_per_s": 9000 / train_time_s,
            "latency_ms_p50": 0.2, "latency_ms_p95": 0.3, "peak_memory_mb": 321.0, "memory_kind": "rss",
            "peak_flops": 1e11, "mfu": 0.0012, "device": "cpu"}


def history(epochs: int, metric: str, diverge: bool = False) -> list[dict]:
    rows = []
    for e in range(1, epochs + 1):
        loss = 2.0 * math.exp(-e / 3)
        row = {"epoch": e, "step": 10 * e, "train/loss": loss, f"train/{metric}": 1 - loss / 2,
               "val/loss": loss * 1.2, f"val/{metric}": 1 - loss / 1.8, "lr": 1e-3, "epoch_time_s": 0.01}
        if diverge and e == epochs:
            row["train/loss"] = row["val/loss"] = float("nan")
        rows.append(row)
    return rows


def write_run(runs: Path, name: str, *, dataset: str = "toy", task: str = "classify", metric: str = "accuracy",
              test: dict | None = None, epochs: int = 6, diag: dict | None = None, cost_: dict | None = None,
              status: str = "finished", kind: str = "mlp") -> Path:
    """A complete run folder: metrics.json, history.csv, eval.json and optionally diagnostics/cost."""
    folder = runs / name
    folder.mkdir(parents=True, exist_ok=True)
    rows = history(epochs, metric, diverge=status == "diverged")
    best = rows[-2] if status == "diverged" else rows[-1]
    metrics = {"name": name, "status": status, "task": task, "kind": kind, "dataset": dataset, "main_metric": metric,
               "epochs": epochs, "best_epoch": best["epoch"],
               "final": {k: v for k, v in rows[-1].items() if k.startswith(("train/", "val/"))},
               "best": {k: v for k, v in best.items() if k.startswith(("train/", "val/"))},
               "train_time_s": 1.5, "train_samples_per_s": 1000.0, "mlflow_run_id": None}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    columns = list(rows[0])
    (folder / "history.csv").write_text("\n".join([",".join(columns)] + [",".join(str(r[c]) for c in columns)
                                                                           for r in rows]) + "\n")
    (folder / "eval.json").write_text(json.dumps({"name": name, "status": status, "main_metric": metric,
                                                  "test": test if test is not None else {metric: 0.5}}))
    if diag is not None:
        (folder / "diagnostics.json").write_text(json.dumps(diag))
    if cost_ is not None:
        (folder / "cost.json").write_text(json.dumps(cost_))
    return folder


def write_png(path: Path, seed: int = 0) -> None:
    """A real little PNG (a noise grid), as a generative task's sample grid would be."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(1.2, 1.2))
    fig.add_axes((0, 0, 1, 1)).imshow(np.random.default_rng(seed).random((16, 16)), cmap="gray")
    fig.savefig(path, dpi=50)

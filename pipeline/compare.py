"""`archlab compare`: one row per experiment from the runs' JSON files → reports/.

(First version: leaderboard.csv and comparison.md. Issue 4 adds figures, diagnostics and the HTML report.)
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeline.io import atomic_write_text

LEADERBOARD = "leaderboard.csv"
COMPARISON_MD = "comparison.md"


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_row(name: str, run_dir: Path) -> dict:
    metrics, evaluation, cost = (_read(run_dir / f) for f in ("metrics.json", "eval.json", "cost.json"))
    main = metrics.get("main_metric") or evaluation.get("main_metric")
    test = evaluation.get("test", {})
    return {
        "experiment": name,
        "dataset": metrics.get("dataset"),
        "task": metrics.get("task"),
        "kind": metrics.get("kind"),
        "status": metrics.get("status", "missing"),
        "metric": main,
        "test_metric": test.get(main),
        "val_metric": metrics.get("best", {}).get(f"val/{main}"),
        "params": cost.get("params_total"),
        "epochs": metrics.get("epochs"),
        "train_time_s": metrics.get("train_time_s"),
    }


def leaderboard(names: list[str], runs_dir: Path) -> pd.DataFrame:
    rows = [run_row(name, runs_dir / name) for name in names]
    return pd.DataFrame(rows)


def markdown_table(frame: pd.DataFrame) -> str:
    def fmt(v) -> str:
        if v is None or (isinstance(v, float) and pd.isna(v)):
            return "—"
        if isinstance(v, float):
            return f"{v:.4g}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.astype(object).itertuples(index=False)]
    return "\n".join(lines)


def render_markdown(frame: pd.DataFrame) -> str:
    parts = ["# archlab comparison", ""]
    for (dataset, task), group in frame.groupby(["dataset", "task"], sort=False, dropna=False):
        parts += [f"## {dataset} — {task}", "", markdown_table(group.drop(columns=["dataset", "task"])), ""]
    return "\n".join(parts)


def compare(names: list[str], runs_dir: Path, out_dir: Path, tracking_uri: str | None = None) -> pd.DataFrame:
    frame = leaderboard(names, Path(runs_dir))
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / LEADERBOARD, frame.to_csv(index=False))
    atomic_write_text(out_dir / COMPARISON_MD, render_markdown(frame))
    return frame

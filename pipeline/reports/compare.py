"""`archlab compare`: the runs' JSON files → reports/ (leaderboard, markdown and HTML reports, figures).

reports/
  leaderboard.csv      one row per experiment: metrics, gaps, verdict, flags, cost
  comparison.md        grouped by dataset and task; figures linked relatively
  comparison.html      the same, one self-contained file (figures inlined)
  figures/*.png        learning curves, gaps, gradient heatmaps, Pareto plots, confusion, samples
  plots/*.json         long-format data for `dvc plots show/diff` (learning curves, gradient norms)
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeline.io import atomic_write_text, replace_dir
from pipeline.specs.errors import UserError, refuse_unless_ours
from pipeline.reports.records import FLAG_NAMES, RunRecord, finite, group_by_dataset_task, leaderboard_row, load_run, metric_mode

LEADERBOARD = "leaderboard.csv"
COMPARISON_MD = "comparison.md"
COMPARISON_HTML = "comparison.html"
FIGURES = "figures"
FIGURES_KIND = "report figures"  # the kind of folder replace_dir marks (pipeline/io.py)
PLOTS = "plots"
MLFLOW_EXPERIMENT = "archlab/compare"

FLAG_MEANINGS = {
    "vanishing": "the first layers' gradient norm is a tiny fraction of the last layers': the early layers barely "
                 "learn. See the run's gradient heatmap.",
    "exploding": "the global gradient norm spiked far above its running median, or a gradient was Inf/NaN. See "
                 "the global norm beside the heatmap.",
    "dead_units": "a large share of a layer's ReLU-family units never fired on the probe batch. See the dead-unit "
                  "bars beside the heatmap.",
    "unstable": "the training loss oscillated rather than fell. See the learning curves.",
    "diverged": "the loss became NaN or Inf and training stopped. See the learning curves.",
}
VERDICT_MEANING = ("verdict: underfit (training loss still high or falling), good fit, or overfit (validation "
                   "loss rose for several epochs while training loss fell); the gap is validation minus training. "
                   "'—' means not recorded (run missing or failed, or diagnostics off).")


# ── formatting ───────────────────────────────────────────────────────────────
DASH = "—"


def fmt_metric(value) -> str:
    v = finite(value)
    if v is None:
        return DASH
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.2f}" if abs(v) >= 10 else f"{v:.4f}"


def fmt_signed(value) -> str:
    v = finite(value)
    return DASH if v is None else ("+" if v >= 0 else "−") + fmt_metric(abs(v))


def fmt_si(value, unit: str = "") -> str:
    """1234 → '1.23k', 5.1e6 → '5.1M': three significant digits."""
    v = finite(value)
    if v is None:
        return DASH
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= factor:
            return f"{v / factor:.3g}{prefix}{unit}"
    return f"{v:.3g}{unit}"


def fmt_seconds(value) -> str:
    v = finite(value)
    if v is None:
        return DASH
    if v >= 3600:
        return f"{v / 3600:.1f} h"
    return f"{v / 60:.1f} min" if v >= 120 else f"{v:.3g} s"


def fmt_ms(value) -> str:
    v = finite(value)
    return DASH if v is None else f"{v:.3g} ms"


def fmt_memory(value, kind) -> str:
    v = finite(value)
    if v is None:
        return DASH
    return f"{v:,.0f} MB" + (f" ({kind})" if kind else "")


def fmt_percent(value) -> str:
    v = finite(value)
    return DASH if v is None else f"{100 * v:.3g}%"


# ── the document ─────────────────────────────────────────────────────────────
def flags_cell(r: RunRecord, explains: dict[str, str]):
    """Raised flags as links to the figure that shows them; 'none' when all measured flags are clear;
    a note when the gradient flags were not measured (diagnostics off); '—' without diagnostics.json."""
    from pipeline.reports.document import Link
    flags = r.flags()
    if flags is None:
        return DASH
    cell: list = [Link(n, explains[n], r.flag_detail(n) or FLAG_MEANINGS[n]) for n in r.raised_flags()]
    if not r.diagnostics_on:
        cell.append("gradients not recorded")
    return cell or "none"


def leaderboard_table(records: list[RunRecord], metric: str, section: str, curves: str | None, gap: str | None,
                      grad: dict[str, str]):
    """One group's leaderboard; flags, verdicts and a diverged status link to the figure that explains them.

    `curves`, `gap` and `grad` (experiment → anchor) are the anchors of the figures that exist; a link
    whose figure could not be drawn points at the section instead, so no link dangles.
    """
    from pipeline.reports.document import Link, Table
    curves, gap = curves or section, gap or section
    columns = ["#", "experiment", "model", "status", f"test {metric}", f"val {metric} (best)", "best epoch",
               "loss gap best → last", f"{metric} gap best → last", "verdict", "flags", "params",
               "FLOPs/sample (fwd)", "train time", "train samples/s", "latency p50", "peak memory", "MFU"]
    rows = []
    for position, r in enumerate(records, start=1):
        explains = {name: (grad.get(r.name) or curves) if name in ("vanishing", "exploding", "dead_units")
                    else curves for name in FLAG_NAMES}
        flag_cell = flags_cell(r, explains)
        onset = r.overfitting.get("onset_epoch")
        why = r.overfitting.get("rule") or (f"overfitting sets in at epoch {onset}" if onset else "")
        verdict = Link(r.verdict, gap, why) if r.verdict else DASH
        status = Link(r.status, curves, "the loss became NaN or Inf") if r.status == "diverged" else r.status
        rows.append([
            str(position), r.name, r.kind or DASH, status, fmt_metric(r.test_value), fmt_metric(r.val_value("best")),
            str(r.metrics.get("best_epoch") or DASH),
            f"{fmt_signed(r.gap('loss', 'best'))} → {fmt_signed(r.gap('loss', 'final'))}",
            f"{fmt_signed(r.gap('metric', 'best'))} → {fmt_signed(r.gap('metric', 'final'))}",
            verdict, flag_cell, fmt_si(r.cost.get("params_total")), fmt_si(r.cost.get("flops_forward_per_sample")),
            fmt_seconds(r.cost.get("train_time_s", r.metrics.get("train_time_s"))),
            fmt_si(r.cost.get("train_samples_per_s", r.metrics.get("train_samples_per_s"))),
            fmt_ms(r.cost.get("latency_ms_p50")), fmt_memory(r.cost.get("peak_memory_mb"), r.cost.get("memory_kind")),
            fmt_percent(r.cost.get("mfu")),
        ])
    return Table(columns, rows, numeric={0, 4, 5, 6, 7, 8, 11, 12, 13, 14, 15, 16, 17})


def test_metrics_table(records: list[RunRecord], metric: str):
    """Every scalar test metric of the group, main metric first."""
    from pipeline.reports.document import Table
    names: list[str] = [metric] if metric else []
    for r in records:
        names += [k for k in r.test_scalars() if k not in names]
    if not names:
        return None
    rows = [[r.name, *(fmt_metric(r.test_scalars().get(k)) for k in names)] for r in records]
    return Table(["experiment", *names], rows, numeric=set(range(1, len(names) + 1)))


def text_blocks(record: RunRecord):
    """Sampled text (lm) or decoded examples (seq2seq) of one run."""
    from pipeline.reports.figures import slug
    from pipeline.reports.document import TextBlock
    blocks = []
    sample = record.test.get("sample")
    if isinstance(sample, str) and sample:
        blocks.append(TextBlock(f"text-{slug(record.name)}", f"Sampled text — {record.name}", sample,
                                f"{record.name}: text sampled from the trained model after a prompt from the test "
                                "split ('|' marks where the prompt ends)."))
    elif record.sample_text:
        blocks.append(TextBlock(f"text-{slug(record.name)}", f"Sampled text — {record.name}", record.sample_text,
                                f"{record.name}: the last epoch's sampled text, from runs/{record.name}/samples.txt."))
    examples = record.test.get("examples")
    if isinstance(examples, list) and examples and all(isinstance(e, dict) for e in examples):
        lines = [f"{'✓' if e.get('predicted') == e.get('target') else '✗'} {e.get('source', '')} → "
                 f"{e.get('predicted', '')}   (target {e.get('target', '')})" for e in examples]
        blocks.append(TextBlock(f"examples-{slug(record.name)}", f"Decoded examples — {record.name}",
                                "\n".join(lines), f"{record.name}: greedy decodings of the first test sources, "
                                "✓ where the whole output equals the target."))
    return blocks


def build_section(writer, dataset: str, task: str, records: list[RunRecord]):
    from pipeline.reports import figures as rf
    from pipeline.reports.document import Section
    metric = next((r.main_metric for r in records if r.main_metric), None)
    mode = metric_mode(metric)
    colors = rf.colors_for(records)
    anchor = f"sec-{rf.slug(dataset, task)}"
    grad_figures = {r.name: ref for r in records if (ref := rf.grad_health(writer, r)) is not None}
    curves = rf.learning_curves(writer, dataset, task, records, colors)
    gap = rf.gap_chart(writer, dataset, task, records)
    items = [ref for ref in (curves, gap, rf.pareto(writer, dataset, task, records, colors, mode)) if ref is not None]
    classifiers = [r for r in records if r.test.get("confusion_matrix")]
    if classifiers and (ref := rf.confusion(writer, classifiers[0])) is not None:  # ranked: the first is best
        items.append(ref)
    items += [grad_figures[r.name] for r in records if r.name in grad_figures]
    for r in records:
        items += rf.sample_grids(writer, r)
        items += text_blocks(r)
    tables = [(f"Leaderboard (best test {metric} first)" if metric else "Leaderboard",
               leaderboard_table(records, metric or "metric", anchor, curves and curves.anchor, gap and gap.anchor,
                                 {k: v.anchor for k, v in grad_figures.items()}))]
    others = test_metrics_table(records, metric)
    if others is not None and len(others.columns) > 2:
        tables.append(("All test metrics", others))
    notes = []
    missing = [r.name for r in records if r.status == "missing"]
    if missing:
        notes.append("No run found for: " + ", ".join(missing) + ".")
    return Section(f"{dataset} — {task}", anchor, tables, items, notes)


def summary_lines(groups) -> list[str]:
    total = sum(len(members) for _, members in groups)
    lines = [(f"{total} experiments in {len(groups)} dataset/task groups. Tables rank by the test metric; every "
              "flag and verdict links to the figure that explains it.")]
    for (dataset, task), members in groups:
        best = members[0]
        if best.test_value is not None:
            lines.append(f"Best on {dataset} ({task}): {best.name} — test {best.main_metric} "
                         f"{fmt_metric(best.test_value)}.")
    return lines


def build_report(records: list[RunRecord], figures_dir: Path):
    from pipeline.reports.figures import FigureWriter
    from pipeline.reports.document import Report
    writer = FigureWriter(figures_dir)
    groups = group_by_dataset_task(records)
    sections = [build_section(writer, dataset, task, members) for (dataset, task), members in groups]
    legend = [(name, meaning) for name, meaning in FLAG_MEANINGS.items()] + [("verdict and gap", VERDICT_MEANING)]
    return Report("archlab comparison", summary_lines(groups), sections, legend)


# ── DVC plot data ────────────────────────────────────────────────────────────
def learning_curve_points(records: list[RunRecord]) -> list[dict]:
    """Long format for the learning_curves DVC template: one point per experiment, split, quantity, epoch."""
    points = []
    for r in records:
        for quantity in ("loss", r.main_metric):
            for split in ("train", "val"):
                for i, row in enumerate(r.history):
                    value = finite(row.get(f"{split}/{quantity}")) if quantity else None
                    if value is not None:
                        points.append({"experiment": r.name, "dataset": r.dataset, "task": r.task, "split": split,
                                       "quantity": quantity, "epoch": int(row.get("epoch", i + 1)), "value": value})
    return points


def grad_norm_points(records: list[RunRecord]) -> list[dict]:
    """Long format for the grad_norms DVC template: mean gradient norm per experiment, layer, epoch."""
    points = []
    for r in records:
        matrix = r.grad_norm_matrix()
        if matrix is None:
            continue
        layers, epochs, mean = matrix
        for epoch, row in zip(epochs, mean):
            for index, (layer, value) in enumerate(zip(layers, row)):
                if finite(value) is not None:
                    points.append({"experiment": r.name, "layer": f"{index:02d} {layer}", "epoch": int(epoch),
                                   "grad_norm": float(value)})
    return points


def write_plot_data(records: list[RunRecord], out_dir: Path) -> None:
    folder = out_dir / PLOTS
    for name, points in (("learning_curves.json", learning_curve_points(records)),
                         ("grad_norms.json", grad_norm_points(records))):
        atomic_write_text(folder / name, json.dumps(points, separators=(",", ":")) + "\n")


# ── MLflow ───────────────────────────────────────────────────────────────────
def log_report(tracking_uri: str, out_dir: Path, names: list[str], frame: pd.DataFrame) -> str:
    """Log the report files as artifacts of a new `compare` run; returns its run id."""
    from pipeline.engine.tracking import Tracker
    tracker = Tracker(tracking_uri, MLFLOW_EXPERIMENT, run_name="compare",
                      tags={"experiments": ",".join(names)[:5000], "n_experiments": str(len(names))})
    for name in (LEADERBOARD, COMPARISON_MD, COMPARISON_HTML):
        tracker.log_artifact(out_dir / name)
    for folder in (FIGURES, PLOTS):
        if any((out_dir / folder).iterdir()):
            tracker.client.log_artifacts(tracker.run_id, str(out_dir / folder), folder)
    tested = frame.dropna(subset=["test_metric"])
    tracker.log_metrics({f"test_metric/{row.experiment}": row.test_metric for row in tested.itertuples()}, step=0)
    tracker.end("FINISHED")
    return tracker.run_id


# ── the stage ────────────────────────────────────────────────────────────────
def leaderboard_frame(records: list[RunRecord]) -> pd.DataFrame:
    """The rows in a fixed column order (test metrics of every task after the fixed columns, the MLflow
    run id last); counts stay integers even where some runs lack them."""
    rows = [leaderboard_row(r) for r in records]
    fixed = [k for k in rows[0] if not k.startswith("test/") and k != "mlflow_run_id"] if rows else ["experiment"]
    tests = list(dict.fromkeys(k for row in rows for k in row if k.startswith("test/")))
    frame = pd.DataFrame(rows, columns=[*fixed, *tests, "mlflow_run_id"])
    for column in frame.columns:
        values = [row[column] for row in rows if row.get(column) is not None]
        if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            frame[column] = frame[column].astype("Int64")
    return frame


def leaderboard(names: list[str], runs_dir: Path) -> pd.DataFrame:
    return leaderboard_frame([load_run(name, Path(runs_dir)) for name in names])


def compare(names: list[str], runs_dir: Path, out_dir: Path, tracking_uri: str | None = None) -> pd.DataFrame:
    """Write every report for the named experiments from runs_dir into out_dir; log it to MLflow if asked."""
    from pipeline.reports.document import render_html, render_markdown
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(out_dir, "is a file; the reports need a folder")
    refuse_unless_ours(out_dir / FIGURES, FIGURES_KIND)
    records = [load_run(name, Path(runs_dir)) for name in names]
    frame = leaderboard_frame(records)
    holder = {}
    # Figures are drawn into a fresh folder swapped in whole: no stale figure of a dropped experiment stays.
    replace_dir(out_dir / FIGURES, lambda folder: holder.setdefault("report", build_report(records, folder)),
                kind=FIGURES_KIND)
    report = holder["report"]
    write_plot_data(records, out_dir)
    atomic_write_text(out_dir / LEADERBOARD, frame.to_csv(index=False))
    atomic_write_text(out_dir / COMPARISON_MD, render_markdown(report))
    atomic_write_text(out_dir / COMPARISON_HTML, render_html(report, out_dir))
    if tracking_uri:
        log_report(tracking_uri, out_dir, names, frame)
    return frame

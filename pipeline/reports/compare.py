"""`archlab compare`: the runs' JSON files → reports/ (leaderboard, markdown and HTML reports, figures).

reports/
  leaderboard.csv      one row per experiment: metrics (mean over seeds, interval, n), gaps, verdict, flags, cost
  comparisons.csv      each comparison of a group: advantage, interval, P(A>B), p, Holm p, verdict
  evidence.json        numbers only, for `dvc metrics`: n, mean, std, interval per experiment
  comparison.md        grouped by dataset and task; figures linked relatively
  comparison.html      the same, one self-contained file (figures inlined)
  figures/*.png        learning curves, gaps, gradient heatmaps, Pareto plots, confusion, samples
  plots/*.json         long-format data for `dvc plots show/diff` (learning curves, gradient norms)
  scores/NAME.json     numbers only, the same keys for every experiment: `dvc metrics show/diff`, `dvc exp show`
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeline.engine.verdicts import FLAG_NAMES
from pipeline.io import atomic_write_text, replace_dir
from pipeline.reports.records import (RunRecord, finite, group_by_dataset_task, leaderboard_row, load_run,
                                      loss_quantities)
from pipeline.specs.errors import UserError, refuse_unless_ours

LEADERBOARD = "leaderboard.csv"
COMPARISONS = "comparisons.csv"
EVIDENCE = "evidence.json"
COMPARISON_MD = "comparison.md"
COMPARISON_HTML = "comparison.html"
FIGURES = "figures"
FIGURES_KIND = "report figures"  # the kind of folder replace_dir marks (pipeline/io.py)
PLOTS = "plots"
SCORES = "scores"
# leaderboard column → key in scores/NAME.json. The gaps are validation minus training at the final epoch.
SCORE_KEYS = {"test_metric": "test_metric", "val_metric": "val_metric", "gap_metric_final": "gap_metric",
              "gap_loss_final": "gap_loss", "params": "params", "flops_forward_per_sample": "flops",
              "train_time_s": "train_time_s", "epochs": "epochs", "best_epoch": "best_epoch"}
MODEL_NAME_PREFIX = "archlab"  # registered model names: archlab-DATASET-TASK
CHAMPION = "champion"
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

EVIDENCE_MEANING = ("each experiment against its group's best, and the pairs declared under `comparisons:` in "
                    "params.yaml. better / worse: the 95% interval of A's advantage excludes 0 and the paired "
                    "permutation test's Holm-corrected p is below 0.05; equivalent: the whole interval lies within the "
                    "metric's margin (`equivalence:` in params.yaml); inconclusive: anything else, and always with "
                    "fewer than 2 shared seeds. The rule is pipeline/reports/statistics.py `verdict`.")


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


def fmt_interval(r: RunRecord) -> str:
    """'0.9712 [0.9650, 0.9770]': the mean over seeds and its 95% interval (the value alone without one)."""
    summary = r.summary
    if summary is None or summary.levels == "seeds" and summary.n < 2:  # one seed and nothing to resample
        return fmt_metric(r.test_value)
    return f"{fmt_metric(summary.mean)} [{fmt_metric(summary.low)}, {fmt_metric(summary.high)}]"


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
    columns = ["#", "experiment", "model", "status", f"test {metric}: mean [95% interval]", "n", f"val {metric} (best)",
               "best epoch",
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
            str(position), r.name, r.kind or DASH, status, fmt_interval(r), str(len(r.seed_values) or DASH),
            fmt_metric(r.val_value("best")),
            str(r.metrics.get("best_epoch") or DASH),
            f"{fmt_signed(r.gap('loss', 'best'))} → {fmt_signed(r.gap('loss', 'final'))}",
            f"{fmt_signed(r.gap('metric', 'best'))} → {fmt_signed(r.gap('metric', 'final'))}",
            verdict, flag_cell, fmt_si(r.cost.get("params_total")), fmt_si(r.cost.get("flops_forward_per_sample")),
            fmt_seconds(r.cost.get("train_time_s", r.metrics.get("train_time_s"))),
            fmt_si(r.cost.get("train_samples_per_s", r.metrics.get("train_samples_per_s"))),
            fmt_ms(r.cost.get("latency_ms_p50")), fmt_memory(r.cost.get("peak_memory_mb"), r.cost.get("memory_kind")),
            fmt_percent(r.cost.get("mfu")),
        ])
    full = Table(columns, rows, numeric={0, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16, 17, 18})
    more = ["best epoch", "loss gap best → last", "train samples/s", "latency p50", "peak memory", "MFU"]
    return (select_columns(full, [c for c in columns if c not in more]),
            select_columns(full, ["#", "experiment", *more], folded=True))


def select_columns(table, names: list[str], folded: bool = False):
    """Some columns of a table, in the given order (the leaderboard's first view, or the rest one click away)."""
    from pipeline.reports.document import Table
    index = [table.columns.index(name) for name in names]
    return Table(names, [[row[i] for i in index] for row in table.rows],
                 numeric={k for k, i in enumerate(index) if i in table.numeric}, folded=folded)


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


def verdict_table(comparisons: list):
    """One group's comparisons: A against B, the advantage of A with its interval, P(A>B), p, the verdict."""
    from pipeline.reports.document import Table
    rows = [[c.a, c.b, c.verdict, f"{fmt_signed(c.advantage)} [{fmt_signed(c.low)}, {fmt_signed(c.high)}]",
             fmt_metric(c.p_a_beats_b), f"{c.p_value:.3g}", f"{c.p_holm:.3g}", str(c.n),
             "declared" if c.declared else "vs best", c.reason] for c in comparisons]
    return Table(["A", "B", "verdict", "advantage of A (95% interval)", "P(A>B)", "p", "p (Holm)", "shared seeds",
                  "why compared", "rule"], rows, numeric={3, 4, 5, 6, 7})


def text_blocks(record: RunRecord):
    """Sampled text (lm) or decoded examples (seq2seq) of one run."""
    from pipeline.reports.document import TextBlock
    from pipeline.reports.figures import slug
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


def build_section(writer, dataset: str, task: str, records: list[RunRecord], comparisons: list):
    from pipeline.reports import figures as rf
    from pipeline.reports.document import Section
    metric = next((r.main_metric for r in records if r.main_metric), None)
    mode = records[0].mode
    colors = rf.colors_for(records)
    anchor = f"sec-{rf.slug(dataset, task)}"
    grad_figures = {r.name: ref for r in records if (ref := rf.grad_health(writer, r)) is not None}
    curves = rf.learning_curves(writer, dataset, task, records, colors)
    gap = rf.gap_chart(writer, dataset, task, records)
    forest = rf.forest(writer, dataset, task, comparisons)
    items = [ref for ref in (forest, curves, gap, rf.pareto(writer, dataset, task, records, colors, mode))
             if ref is not None]
    classifiers = [r for r in records if r.test.get("confusion_matrix")]
    if classifiers and (ref := rf.confusion(writer, classifiers[0])) is not None:  # ranked: the first is best
        items.append(ref)
    items += [grad_figures[r.name] for r in records if r.name in grad_figures]
    for r in records:
        items += rf.sample_grids(writer, r)
        items += text_blocks(r)
    board, more = leaderboard_table(records, metric or "metric", anchor, curves and curves.anchor,
                                    gap and gap.anchor, {k: v.anchor for k, v in grad_figures.items()})
    tables = [(f"Leaderboard (best test {metric} first)" if metric else "Leaderboard", board),
              ("More columns: best epoch, loss gap, speed and memory", more)]
    if comparisons:
        tables.append(("Who beats whom (paired over seeds and test examples)", verdict_table(comparisons)))
    others = test_metrics_table(records, metric)
    if others is not None and len(others.columns) > 2:
        tables.append(("All test metrics (of each experiment's first seed)", others))
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


def build_report(records: list[RunRecord], figures_dir: Path, comparisons: dict | None = None):
    from pipeline.reports.figures import FigureWriter
    from pipeline.reports.document import Report
    writer = FigureWriter(figures_dir)
    groups = group_by_dataset_task(records)
    comparisons = comparisons or {}
    sections = [build_section(writer, dataset, task, members, comparisons.get((dataset, task), []))
                for (dataset, task), members in groups]
    legend = [(name, meaning) for name, meaning in FLAG_MEANINGS.items()] + [("verdict and gap", VERDICT_MEANING),
                                                                             ("who beats whom", EVIDENCE_MEANING)]
    return Report("archlab comparison", summary_lines(groups), sections, legend)


# ── DVC plot data ────────────────────────────────────────────────────────────
def learning_curve_points(records: list[RunRecord]) -> list[dict]:
    """Long format for the learning_curves DVC template: one point per experiment, split, quantity, epoch."""
    points = []
    for r in records:
        for quantity in (*loss_quantities(r.history), r.main_metric):
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


# ── DVC metrics ──────────────────────────────────────────────────────────────
def score_record(row: dict) -> dict[str, float]:
    """One experiment's numbers for DVC: no names, ids or text (those are in the leaderboard and reports)."""
    return {key: row[column] for column, key in SCORE_KEYS.items() if finite(row.get(column)) is not None}


def write_scores(records: list[RunRecord], out_dir: Path) -> None:
    """reports/scores/NAME.json per experiment, each written atomically. The folder is versioned in git, so it
    holds no mark file (DVC would read one as a metric): a score file of an experiment no longer compared is
    removed only when it holds exactly the score keys, i.e. archlab wrote it."""
    folder = out_dir / SCORES
    if folder.exists() and not folder.is_dir():
        raise UserError(folder, "is a file; the scores need a folder")
    for r in records:
        atomic_write_text(folder / f"{r.name}.json", json.dumps(score_record(leaderboard_row(r)), indent=1) + "\n")
    keep = {f"{r.name}.json" for r in records}
    for stale in sorted(folder.glob("*.json")):
        if stale.name not in keep and _is_score_file(stale):
            stale.unlink()


def _is_score_file(path: Path) -> bool:
    """Holds score keys and nothing else: a file write_scores made."""
    try:
        keys = set(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return False
    return bool(keys) and keys <= set(SCORE_KEYS.values())


# ── MLflow ───────────────────────────────────────────────────────────────────
def log_run_figures(client, records: list[RunRecord], figures_dir: Path) -> None:
    """Each training run carries its figures under figures/: its own gradient health and confusion matrix, and
    its group's learning curves, gaps and Pareto plot (its sample grids are logged by training itself)."""
    from mlflow.exceptions import MlflowException

    from pipeline.reports.figures import slug
    for r in records:
        run_id = r.metrics.get("mlflow_run_id")
        if not run_id:
            continue
        group = slug(r.dataset or "unknown", r.task or "unknown")
        names = [f"grad_{slug(r.name)}", f"confusion_{slug(r.name)}", f"curves_{group}", f"gap_{group}",
                 f"pareto_{group}"]
        try:
            for path in (figures_dir / f"{name}.png" for name in names):
                if path.is_file():
                    client.log_artifact(run_id, str(path), FIGURES)
        except MlflowException:
            continue  # a run of another store


def registered_model_name(dataset: str, task: str) -> str:
    return f"{MODEL_NAME_PREFIX}-{dataset}-{task}"


def register_champions(tracking_uri: str, records: list[RunRecord],
                       comparisons: dict[tuple[str, str], list] | None = None) -> dict[str, str]:
    """Register each dataset/task group's best model (the first of its ranked leaderboard that has an MLflow
    model) and point the alias `champion` at it, the verdicts on it written on the version (tag
    `archlab.evidence`, and its description); returns {registered name: version}."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    champions = {}
    for (dataset, task), members in group_by_dataset_task(records):
        for r in members:
            run_id = r.metrics.get("mlflow_run_id")
            if r.test_value is None or not run_id or not _has_model(client, run_id):
                continue
            name = registered_model_name(dataset, task)
            try:
                version = _version_of(client, name, run_id) or mlflow.register_model(
                    f"runs:/{run_id}/model", name, tags={"experiment": r.name}).version
            except MlflowException:
                continue  # a run from another store: the next in rank
            evidence = champion_evidence(r.name, [m.name for m in members],
                                         (comparisons or {}).get((dataset, task), []))
            client.set_model_version_tag(name, version, "archlab.evidence", evidence)
            client.update_model_version(name, version, description=f"{r.name}: {evidence}")
            client.set_registered_model_alias(name, CHAMPION, version)
            champions[name] = str(version)
            break
    return champions


_FLIPPED = {"better": "worse", "worse": "better"}


def champion_evidence(champion: str, group: list[str], comparisons: list) -> str:
    """What the paired verdicts say of the champion against the rest of its group: that it beats every one, or
    which ones it is not shown better than (a single seed is never a win; a lead within the noise is none)."""
    others = [name for name in group if name != champion]
    if not others:
        return "the only experiment of its group"
    seen = {}  # other → the verdict from the champion's side
    for c in comparisons:
        if champion in (c.a, c.b):
            other = c.b if c.a == champion else c.a
            seen[other] = c.verdict if c.a == champion else _FLIPPED.get(c.verdict, c.verdict)
    unbeaten = [f"{o} ({seen.get(o, 'not compared')})" for o in others if seen.get(o) != "better"]
    if not unbeaten:
        return f"beats every other experiment of its group ({len(others)}, paired tests over seeds, Holm-corrected)"
    return "not shown better than: " + ", ".join(unbeaten)


def _has_model(client, run_id: str) -> bool:
    try:
        return bool(client.get_run(run_id).outputs.model_outputs)
    except Exception:  # noqa: BLE001 - a run id from another store or a deleted run
        return False


def _version_of(client, name: str, run_id: str) -> str | None:
    """The version already registered from this run (a rerun of compare registers nothing twice)."""
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        return version.version
    return None


def log_report(tracking_uri: str, out_dir: Path, names: list[str], frame: pd.DataFrame,
               records: list[RunRecord]) -> str:
    """Log the report files as artifacts of a new `compare` run; returns its run id."""
    from pipeline.engine.tracking import Tracker
    tracker = Tracker(tracking_uri, MLFLOW_EXPERIMENT, run_name="compare",
                      tags={"experiments": ",".join(names)[:5000], "n_experiments": str(len(names))})
    for name in (LEADERBOARD, COMPARISONS, EVIDENCE, COMPARISON_MD, COMPARISON_HTML):
        tracker.log_artifact(out_dir / name)
    for folder in (FIGURES, PLOTS):
        if any((out_dir / folder).iterdir()):
            tracker.client.log_artifacts(tracker.run_id, str(out_dir / folder), folder)
    log_run_figures(tracker.client, records, out_dir / FIGURES)
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


# ── evidence ─────────────────────────────────────────────────────────────────
def attach_statistics(records: list[RunRecord], declared: list[tuple[str, str]], margins: dict[str, float],
                      seed: int = 0) -> dict[tuple[str, str], list]:
    """Each record's summary over its seeds; each group's comparisons, judged → {(dataset, task): [Comparison]}."""
    import numpy as np

    from pipeline.engine.tasks import TASKS
    from pipeline.reports import statistics as st
    rng = np.random.default_rng(seed)  # fixed: the same runs give the same report
    group_of = {r.name: (r.dataset, r.task) for r in records}
    evidence: dict[tuple[str, str], dict] = {}
    for r in records:
        found = st.load_evidence(r.name, r.task, r.seed_dirs) if r.task in TASKS else None
        if found is not None:
            r.summary = st.summarize(found, rng)
            evidence.setdefault(group_of[r.name], {})[r.name] = found
    out = {}
    for key, members in evidence.items():
        pairs = [(a, b) for a, b in declared if a in members and b in members]
        metric = next(iter(members.values())).metric
        summaries = {name: next(r.summary for r in records if r.name == name) for name in members}
        out[key] = st.group_comparisons(members, summaries, pairs, margins.get(metric), rng)
    return out


def check_declared(declared: list[tuple[str, str]], records: list[RunRecord], source: str) -> None:
    """A declared pair must share a dataset and task: their metric is the same only then."""
    group_of = {r.name: (r.dataset, r.task) for r in records if r.status != "missing"}
    for i, (a, b) in enumerate(declared):
        if a in group_of and b in group_of and group_of[a] != group_of[b]:
            raise UserError(source, f"{a} ({'/'.join(group_of[a])}) and {b} ({'/'.join(group_of[b])}) differ in "
                            "dataset or task, so they share no metric", field=f"comparisons[{i}]")


def evidence_metrics(records: list[RunRecord]) -> dict:
    """Numbers only, for `dvc metrics`: per experiment, n, mean, std and the 95% interval of its main metric."""
    out = {}
    for r in records:
        s = r.summary
        if s is not None:
            out[r.name] = {"n": s.n, "mean": s.mean, "std": s.std, "low": s.low, "high": s.high}
    return out


def comparisons_frame(comparisons: dict) -> pd.DataFrame:
    rows = [{"dataset": dataset, "task": task, **c.__dict__} for (dataset, task), cs in comparisons.items() for c in cs]
    return pd.DataFrame(rows, columns=["dataset", "task", "a", "b", "metric", "n", "advantage", "low", "high",
                                       "p_a_beats_b", "p_value", "p_holm", "margin", "verdict", "reason", "declared"])


def _summary_run_id(tracking_uri: str, experiment: str, name: str) -> str | None:
    """The experiment's summary run from an earlier compare, updated rather than repeated."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], max_results=1, filter_string=(
        f"tags.`archlab.experiment` = '{name}' and tags.`archlab.summary` = 'true'"))
    return runs[0].info.run_id if runs else None


def log_summaries(tracking_uri: str, records: list[RunRecord]) -> None:
    """One summary run per experiment beside its seeds' runs (same MLflow experiment and archlab.experiment tag):
    mean, std and interval of the main metric over the seeds."""
    from pipeline.engine.tracking import Tracker
    for r in records:
        s = r.summary
        if s is None:
            continue
        experiment = f"{r.dataset}/{r.task}"
        tracker = Tracker(tracking_uri, experiment, run_id=_summary_run_id(tracking_uri, experiment, r.name),
                          run_name=f"{r.name} (summary)")
        tracker.set_tags({"archlab.experiment": r.name, "archlab.summary": "true", "kind": r.kind or "",
                          "seeds": ",".join(map(str, sorted(r.seed_values)))})
        values = {"n_seeds": s.n, f"test/{s.metric}/mean": s.mean, f"test/{s.metric}/ci_low": s.low,
                  f"test/{s.metric}/ci_high": s.high}
        if s.std is not None:
            values[f"test/{s.metric}/std"] = s.std
        tracker.log_metrics(values, step=0)
        tracker.end("FINISHED")


# ── the stage ────────────────────────────────────────────────────────────────
def compare(names: list[str], runs_dir: Path, out_dir: Path, tracking_uri: str | None = None,
            seeds: dict[str, list[int]] | None = None, declared: list[tuple[str, str]] = (),
            margins: dict[str, float] | None = None, source: str = "params.yaml") -> pd.DataFrame:
    """Write every report for the named experiments from runs_dir into out_dir; log it to MLflow if asked.

    `seeds` names the seeds of each experiment (default: every runs/NAME/seed-K there is); `declared` the
    pairs always compared; `margins` the practical-equivalence margin per metric."""
    from pipeline.reports.document import render_html, render_markdown
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(out_dir, "is a file; the reports need a folder")
    refuse_unless_ours(out_dir / FIGURES, FIGURES_KIND)
    seeds = seeds or {}
    records = [load_run(name, Path(runs_dir), seeds.get(name)) for name in names]
    check_declared(list(declared), records, source)
    comparisons = attach_statistics(records, list(declared), margins or {})
    frame = leaderboard_frame(records)
    holder = {}
    # Figures are drawn into a fresh folder swapped in whole: no stale figure of a dropped experiment stays.
    replace_dir(out_dir / FIGURES, lambda folder: holder.setdefault("report", build_report(records, folder, comparisons)),
                kind=FIGURES_KIND)
    report = holder["report"]
    write_plot_data(records, out_dir)
    write_scores(records, out_dir)
    atomic_write_text(out_dir / LEADERBOARD, frame.to_csv(index=False))
    atomic_write_text(out_dir / COMPARISONS, comparisons_frame(comparisons).to_csv(index=False))
    atomic_write_text(out_dir / EVIDENCE, json.dumps(evidence_metrics(records), indent=2) + "\n")
    atomic_write_text(out_dir / COMPARISON_MD, render_markdown(report))
    atomic_write_text(out_dir / COMPARISON_HTML, render_html(report, out_dir))
    if tracking_uri:
        log_report(tracking_uri, out_dir, names, frame, records)
        register_champions(tracking_uri, records, comparisons)
        log_summaries(tracking_uri, records)
    return frame

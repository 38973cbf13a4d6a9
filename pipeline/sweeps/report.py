"""The sweep report: reports/sweeps/NAME/ — best trial per architecture, history, importances, trade-offs.

Figures are plain matplotlib (Agg, offline). Every file is built in a temporary folder that replaces the
report folder at the end, so a reader never sees half a report.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.io import atomic_write_json, atomic_write_text, replace_dir
from pipeline.reports.document import Code, Report, Section, frame_table, markdown_table, render_html, render_markdown
from pipeline.reports.figures import FigureRef, slug
from pipeline.specs.errors import refuse_unless_ours
from pipeline.specs.metrics import is_better, mode_of_direction
from pipeline.specs.sweep import COST_KEYS, CategoricalDim, Sweep
from pipeline.sweeps.space import build_trial_spec, values_from_params

STATE_NAMES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
               "WAITING": "waiting"}


def dashboard_command(storage_url: str) -> str:
    return f"optuna-dashboard {storage_url}"


# ── tables ───────────────────────────────────────────────────────────────────
def trials_table(study, sweep: Sweep) -> pd.DataFrame:
    """One row per trial: state, candidate, objective values, costs, and its own candidate's parameters."""
    metric = sweep.spec.objective.metric
    rows = []
    for t in study.get_trials(deepcopy=False):
        candidate = t.params.get("candidate")
        row: dict[str, Any] = {
            "trial": t.number, "state": STATE_NAMES.get(t.state.name, t.state.name.lower()),
            "candidate": candidate, "kind": t.user_attrs.get("kind"),
            metric: t.values[0] if t.values else None,
            **{k: t.user_attrs.get(k) for k in COST_KEYS.values()},
            "epochs": t.user_attrs.get("epochs", t.user_attrs.get("pruned_at_epoch")),
            "duration_s": round(t.duration.total_seconds(), 2) if t.duration else None,
            "retry_of": t.user_attrs.get("retry_of"), "interrupted": bool(t.user_attrs.get("interrupted")),
            "fail_reason": t.user_attrs.get("fail_reason"),
        }
        if candidate is not None:
            _, values = values_from_params(sweep, t.params)
            row["sampled"] = "; ".join(f"{p}={_short(v)}" for p, v in values.items())
        rows.append(row)
    return pd.DataFrame(rows)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _better(a: float, b: float, direction: str) -> bool:
    return is_better(a, b, mode_of_direction(direction))


def best_trials(study, sweep: Sweep) -> dict[str, Any]:
    """The complete trial with the best metric, per candidate (ties: the earlier trial)."""
    from optuna.trial import TrialState
    best: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        key = t.params["candidate"]
        if key not in best or _better(t.values[0], best[key].values[0], sweep.spec.objective.direction):
            best[key] = t
    return {k: best[k] for k in sweep.spec.candidates if k in best}


def pareto_numbers(study) -> set[int]:
    if len(study.directions) < 2:
        return set()
    return {t.number for t in study.best_trials}


def export_name(sweep: Sweep, candidate: str) -> str:
    return f"{sweep.name}_best_{candidate}"[:64]


def best_table(study, sweep: Sweep, table: pd.DataFrame) -> pd.DataFrame:
    metric = sweep.spec.objective.metric
    pareto = pareto_numbers(study)
    bests = best_trials(study, sweep)
    rows = []
    for key in sweep.spec.candidates:
        mine = table[table["candidate"] == key] if len(table) else table
        counts = {s: int((mine["state"] == s).sum()) if len(mine) else 0 for s in ("complete", "pruned", "failed")}
        row: dict[str, Any] = {"candidate": key, "kind": sweep.bases[key].model.kind, "best_trial": None,
                               metric: None, **{k: None for k in COST_KEYS.values()}, **counts}
        best = bests.get(key)
        if best is not None:
            hit = table[table["trial"] == best.number].iloc[0]
            row.update({"best_trial": best.number, metric: best.values[0],
                        **{k: hit[k] for k in COST_KEYS.values()}, "sampled": hit.get("sampled", ""),
                        "spec": f"{export_name(sweep, key)}.yaml"})
            if pareto:
                row["on_pareto_front"] = best.number in pareto
        rows.append(row)
    out = pd.DataFrame(rows)
    ranked = out[metric].notna()
    if ranked.any():
        ascending = sweep.spec.objective.direction == "minimize"
        out = pd.concat([out[ranked].sort_values(metric, ascending=ascending), out[~ranked]])
    return out.reset_index(drop=True)


def best_summary(study, sweep: Sweep) -> dict[str, Any]:
    """Figures for the parent MLflow run: the overall best and each candidate's best."""
    metric = sweep.spec.objective.metric
    best = best_trials(study, sweep)
    out: dict[str, Any] = {}
    if best:
        pick = best[next(iter(best))]
        for t in best.values():
            if _better(t.values[0], pick.values[0], sweep.spec.objective.direction):
                pick = t
        out.update({f"best/{metric}": pick.values[0], "trial": pick.number, "candidate": pick.params["candidate"]})
    for key, t in best.items():
        out[f"best/{key}/{metric}"] = t.values[0]
    states = [STATE_NAMES.get(t.state.name, "") for t in study.get_trials(deepcopy=False)]
    for s in ("complete", "pruned", "failed"):
        out[f"trials/{s}"] = states.count(s)
    return out


def terminal_table(study, sweep: Sweep) -> str:
    """Each candidate's best trial and value (and its trial counts) as aligned text, best first."""
    best = best_table(study, sweep, trials_table(study, sweep))
    columns = [c for c in ("candidate", "kind", "best_trial", sweep.spec.objective.metric, *COST_KEYS.values(),
                           "complete", "pruned", "failed") if c in best and best[c].notna().any()]
    return best[columns].to_string(index=False, na_rep="—", float_format=lambda v: f"{v:.4g}")


# ── figures ──────────────────────────────────────────────────────────────────
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _colors(sweep: Sweep) -> dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return {key: cmap(i % 10) for i, key in enumerate(sweep.spec.candidates)}


def plot_history(table: pd.DataFrame, sweep: Sweep, path: Path) -> bool:
    """The metric of every finished trial by trial number, per candidate, with the best so far."""
    metric, direction = sweep.spec.objective.metric, sweep.spec.objective.direction
    done = table[table["state"].isin(["complete", "pruned"]) & table[metric].notna()] if len(table) else table
    if done.empty:
        return False
    plt = _plt()
    colors = _colors(sweep)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, group in done.groupby("candidate", sort=False):
        complete = group[group["state"] == "complete"]
        pruned = group[group["state"] == "pruned"]
        ax.scatter(complete["trial"], complete[metric], color=colors[key], label=f"{key}", s=30)
        if len(pruned):
            ax.scatter(pruned["trial"], pruned[metric], color=colors[key], marker="x", s=25, alpha=0.6,
                       label=f"{key} (pruned, last epoch)")
    complete = done[done["state"] == "complete"].sort_values("trial")
    if len(complete):
        running = complete[metric].cummax() if direction == "maximize" else complete[metric].cummin()
        ax.step(complete["trial"], running, where="post", color="black", lw=1.2, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(f"{sweep.name}: optimisation history")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def candidate_importances(study, sweep: Sweep) -> pd.DataFrame:
    """fANOVA importance of each candidate's parameters over that candidate's complete trials.

    A study-wide importance would see only `candidate` (the one parameter every trial has), so each
    architecture's sub-space is judged on its own trials.
    """
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances
    from optuna.trial import TrialState
    rows = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for key, cand in sweep.spec.candidates.items():
        mine = [t for t in complete if t.params.get("candidate") == key]
        names = [sweep.param_name(key, p) for p in cand.space]
        names = [n for n in names if len({repr(t.params.get(n)) for t in mine}) > 1]
        if len(mine) < 3 or not names or len({t.values[0] for t in mine}) < 2:
            continue  # importance needs a few trials whose parameters and metric both vary
        sub = optuna.create_study(directions=study.directions)
        sub.add_trials(mine)
        scores = get_param_importances(sub, evaluator=FanovaImportanceEvaluator(seed=0), params=names,
                                       target=lambda t: t.values[0])
        rows += [{"candidate": key, "param": n.split("/", 1)[1], "importance": float(v)} for n, v in scores.items()]
    return pd.DataFrame(rows, columns=["candidate", "param", "importance"])


def plot_importances(importances: pd.DataFrame, sweep: Sweep, path: Path) -> bool:
    if importances.empty:
        return False
    plt = _plt()
    colors = _colors(sweep)
    groups = list(importances.groupby("candidate", sort=False))
    fig, axes = plt.subplots(len(groups), 1, figsize=(7, 1.2 + 0.45 * len(importances) + 0.5 * len(groups)),
                             squeeze=False)
    for ax, (key, group) in zip(axes[:, 0], groups):
        group = group.sort_values("importance")
        ax.barh(group["param"], group["importance"], color=colors[key])
        ax.set_title(f"{key}: importance for {sweep.spec.objective.metric} (fANOVA)", fontsize=9)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _axis_value(dim, value) -> float:
    """A parameter on a 0..1 axis: log ranges on a log scale, categoricals by their index."""
    if isinstance(dim, CategoricalDim):
        return dim.encoded().index(value) / max(1, len(dim.choices) - 1)
    if dim.log:
        return (math.log(value) - math.log(dim.low)) / (math.log(dim.high) - math.log(dim.low))
    return (value - dim.low) / (dim.high - dim.low)


def plot_parallel(study, sweep: Sweep, path: Path) -> bool:
    """Per candidate: one line per complete trial across its parameters and the metric, coloured by the metric."""
    from optuna.trial import TrialState
    plt = _plt()
    metric = sweep.spec.objective.metric
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    panels = [(k, c, [t for t in complete if t.params.get("candidate") == k]) for k, c in sweep.spec.candidates.items()]
    panels = [(k, c, ts) for k, c, ts in panels if ts and c.space]
    if not panels:
        return False
    cmap = plt.get_cmap("viridis" if sweep.spec.objective.direction == "maximize" else "viridis_r")
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), squeeze=False)
    for ax, (key, cand, trials) in zip(axes[:, 0], panels):
        dims = list(cand.space.items())
        lo, hi = min(t.values[0] for t in trials), max(t.values[0] for t in trials)  # this candidate's own range
        for t in trials:
            ys = [_axis_value(dim, t.params[sweep.param_name(key, p)]) for p, dim in dims]
            ys.append((t.values[0] - lo) / (hi - lo) if hi > lo else 0.5)
            ax.plot(range(len(ys)), ys, color=cmap((t.values[0] - lo) / (hi - lo) if hi > lo else 0.5), alpha=0.8)
        labels = []
        for p, dim in dims:
            if isinstance(dim, CategoricalDim):
                labels.append(f"{p}\n{' | '.join(_short(c) for c in dim.choices)}"[:60])
            else:
                labels.append(f"{p}\n{_short(dim.low)}..{_short(dim.high)}{' (log)' if dim.log else ''}")
        labels.append(f"{metric}\n{lo:.3g}..{hi:.3g}")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_yticks([])
        for x in range(len(labels)):
            ax.axvline(x, color="grey", lw=0.6)
        ax.set_title(f"{key} ({len(trials)} complete trials)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_tradeoff(table: pd.DataFrame, sweep: Sweep, pareto: set[int], path: Path) -> bool:
    """The metric against each cost (log x), per candidate; Pareto-optimal trials ringed and joined."""
    from pipeline.reports.figures import log_axis
    metric = sweep.spec.objective.metric
    complete = table[(table["state"] == "complete")] if len(table) else table
    costs = [c for c in (sweep.spec.objective.costs or list(COST_KEYS))
             if COST_KEYS[c] in complete and complete[COST_KEYS[c]].notna().any()]
    if complete.empty or not costs:
        return False
    plt = _plt()
    colors = _colors(sweep)
    fig, axes = plt.subplots(1, len(costs), figsize=(4.6 * len(costs), 4), squeeze=False)
    for ax, cost in zip(axes[0], costs):
        for key, group in complete.groupby("candidate", sort=False):
            ax.scatter(group[COST_KEYS[cost]], group[metric], color=colors[key], label=key, s=28)
        if pareto:
            front = complete[complete["trial"].isin(pareto)].sort_values(COST_KEYS[cost])
            ax.scatter(front[COST_KEYS[cost]], front[metric], facecolors="none", edgecolors="black", s=90, lw=1.2,
                       label="Pareto front")
            if len(sweep.spec.objective.costs) == 1:
                ax.step(front[COST_KEYS[cost]], front[metric], where="post", color="black", lw=0.8)
        ax.set_xscale("log")
        values = complete[COST_KEYS[cost]].dropna()
        log_axis(ax.xaxis, float(values.min()), float(values.max()))  # 2× and 5× labels, never 8 a decade
        ax.set_xlabel({"flops": "forward FLOPs per sample", "params": "parameters",
                       "train_time": "training time (s)"}[cost])
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    title = "Pareto front" if pareto else f"{metric} against cost"
    fig.suptitle(f"{sweep.name}: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ── best specs, ready to run ─────────────────────────────────────────────────
def export_best_specs(study, sweep: Sweep, folder: Path, final_folder: Path, specs_dir: Path) -> dict[str, str]:
    """Each candidate's best trial as an experiment spec: `archlab train FILE` reproduces its metric."""
    from pipeline.specs.experiment import spec_to_yaml
    metric = sweep.spec.objective.metric
    schema_ref = os.path.relpath(specs_dir / "schema.json", final_folder)
    written = {}
    for key, t in best_trials(study, sweep).items():
        _, values = values_from_params(sweep, t.params)
        name = export_name(sweep, key)
        spec = build_trial_spec(sweep, key, values, name,
                                f"Best {key} of sweep {sweep.name} (trial {t.number}, {metric}={t.values[0]:.4g}); "
                                f"train it with: archlab train {final_folder / (name + '.yaml')}")
        atomic_write_text(folder / f"{name}.yaml", spec_to_yaml(spec, schema_ref))
        written[key] = f"{name}.yaml"
    return written


# ── the report ───────────────────────────────────────────────────────────────
REPORT_KIND = "sweep report"  # the kind of folder replace_dir marks (pipeline/io.py)
REPORT_MD = "README.md"  # shown by a code host when the folder is opened
REPORT_HTML = "README.html"  # the same report, one self-contained file (figures inlined)


@dataclass(frozen=True)
class SweepFigure:
    """A figure the sweep report may hold: its file, title and caption ({metric}: the objective's metric)."""

    file: str
    title: str
    caption: str


HISTORY = SweepFigure("optimization_history.png", "Optimisation history",
                      "{metric} of every finished trial by trial number, per candidate (x: pruned, at its last "
                      "epoch), with the best so far.")
IMPORTANCES = SweepFigure("param_importances.png", "Parameter importances",
                          "fANOVA importance of each candidate's parameters for {metric}, over that candidate's "
                          "complete trials.")
PARALLEL = SweepFigure("parallel_coordinates.png", "Parallel coordinates",
                       "Per candidate, one line per complete trial across its parameters and {metric}, coloured "
                       "by {metric}.")
PARETO = SweepFigure("pareto_front.png", "Pareto front",
                     "{metric} against each cost (log scale), per candidate; Pareto-optimal trials ringed.")
TRADEOFF = SweepFigure("metric_vs_cost.png", "Metric against cost",
                       "{metric} against each cost (log scale), per candidate.")


def draw_figures(study, sweep: Sweep, table: pd.DataFrame, importances: pd.DataFrame, pareto: set[int],
                 folder: Path) -> dict[SweepFigure, bool]:
    """Each figure drawn into folder → whether it was (a figure with nothing to show is left out)."""
    tradeoff = PARETO if pareto else TRADEOFF
    return {
        HISTORY: plot_history(table, sweep, folder / HISTORY.file),
        IMPORTANCES: plot_importances(importances, sweep, folder / IMPORTANCES.file),
        PARALLEL: plot_parallel(study, sweep, folder / PARALLEL.file),
        tradeoff: plot_tradeoff(table, sweep, pareto, folder / tradeoff.file),
    }


def build_report(sweep: Sweep, study, storage_url: str, best: pd.DataFrame, figures: list[SweepFigure],
                 out_dir: Path) -> Report:
    """The sweep report as the compare report's document model: one source for its markdown and its HTML."""
    objective = sweep.spec.objective
    costs = [f", minimise {', '.join(objective.costs)} (Pareto front)"] if objective.costs else []
    about = sweep.spec.description or f"Candidates: {', '.join(sweep.spec.candidates)}."
    summary = [[about],
               ["Study ", Code(study.study_name), " in ", Code(storage_url), f"; objective: {objective.direction} ",
                Code(objective.metric), *costs, "."],
               ["Open it in the dashboard: ", Code(dashboard_command(storage_url))],
               ["All trials: ", Code("trials.csv"), "; parameter importances: ", Code("param_importances.csv"), "."]]
    shown = best.drop(columns=[c for c in ("sampled",) if c in best])  # the parameters get their own table
    tables = [(f"Best {objective.metric} first; each candidate's trial counts", frame_table(shown))]
    if "sampled" in best:
        sampled = best[best["sampled"].map(lambda v: isinstance(v, str))][["candidate", "sampled"]]
        tables.append(("Parameters of each best trial", frame_table(sampled.rename(columns={"sampled": "parameters"}))))
    notes = [["Each ", Code("spec"), " file is that trial as a ready-to-run experiment: ",
              Code(f"archlab train {out_dir}/SPEC.yaml"), "."]]
    sections = [Section("Best trial per architecture", "best", tables, [], notes)]
    if figures:
        refs = [FigureRef(f"fig-{slug(Path(f.file).stem)}", f.file, f.title, f.caption.format(metric=objective.metric))
                for f in figures]
        sections.append(Section("Figures", "figures", [], refs))
    return Report(f"Sweep {sweep.name}", summary, sections, legend=[])


def write_report(study, sweep: Sweep, out_dir: Path, storage_url: str, specs_dir: Path = Path("specs")) -> None:
    refuse_unless_ours(out_dir, REPORT_KIND)
    table = trials_table(study, sweep)
    best = best_table(study, sweep, table)
    pareto = pareto_numbers(study)
    importances = candidate_importances(study, sweep)

    def fill(folder: Path) -> None:
        atomic_write_text(folder / "trials.csv", table.to_csv(index=False))
        atomic_write_text(folder / "best_per_architecture.csv", best.to_csv(index=False))
        atomic_write_text(folder / "best_per_architecture.md", markdown_table(frame_table(best)) + "\n")
        atomic_write_text(folder / "param_importances.csv", importances.to_csv(index=False))
        figures = draw_figures(study, sweep, table, importances, pareto, folder)
        if pareto:
            front = table[table["trial"].isin(pareto)]
            atomic_write_text(folder / "pareto_front.csv", front.to_csv(index=False))
        exported = export_best_specs(study, sweep, folder, out_dir, specs_dir)
        summary = {"sweep": sweep.name, "study": study.study_name, "storage": storage_url,
                   "objectives": [sweep.spec.objective.metric, *sweep.spec.objective.costs],
                   "directions": sweep.directions, "best": best_summary(study, sweep),
                   "pareto_front": sorted(pareto), "exported_specs": exported,
                   "figures": [figure.file for figure, made in figures.items() if made]}
        atomic_write_json(folder / "summary.json", summary)
        report = build_report(sweep, study, storage_url, best, [f for f, made in figures.items() if made], out_dir)
        atomic_write_text(folder / REPORT_MD, render_markdown(report))
        atomic_write_text(folder / REPORT_HTML, render_html(report, folder))

    replace_dir(out_dir, fill, kind=REPORT_KIND)

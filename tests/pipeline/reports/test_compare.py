"""archlab compare: reports from the real runs of a shrunk pipeline, checked against the runs' JSON files.

The module fixture trains three tiny experiments (two classifiers, one regressor) with the real engine,
evaluates them, tracks them in a real SQLite MLflow store, and writes the reports. Hand-built run folders
(tests/pipeline/reports/report_fixtures.py) cover what tiny real runs do not show: raised flags, a diverged run,
sample grids, sampled text, missing and broken files.
"""
from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.reports.compare import compare
from pipeline.data.prepare import Prepared
from pipeline.engine.evaluate import evaluate_run
from pipeline.reports.records import pareto_front
from pipeline.specs.experiment import ExperimentSpec
from pipeline.engine.train import train_experiment
from tests.conftest import REPO, tiny_classification
from tests.pipeline.reports import report_fixtures as fx

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:|//|file:)""", re.IGNORECASE)


# ── the real runs ────────────────────────────────────────────────────────────
def make_spec(name: str, dataset: str, task: str, model: dict, epochs: int = 5) -> ExperimentSpec:
    return ExperimentSpec.model_validate({
        "name": name, "data": {"dataset": dataset}, "task": task, "model": model,
        "train": {"epochs": epochs, "batch_size": 16, "seed": 0, "checkpoint_every_s": 0,
                  "optimizer": {"name": "adamw", "lr": 0.01}}})


def tiny_regression(n: int = 96, features: int = 6, seed: int = 1) -> Prepared:
    """y = a linear function of x plus noise, already standardised (mean 0, std 1 recorded in meta)."""
    g = np.random.default_rng(seed)
    w = g.normal(size=(features, 1))
    tensors = {}
    for part, count in (("train", n), ("val", n // 3), ("test", n // 3)):
        x = g.normal(size=(count, features))
        tensors[f"{part}_x"] = torch.tensor(x, dtype=torch.float32)
        tensors[f"{part}_y"] = torch.tensor(x @ w + 0.3 * g.normal(size=(count, 1)), dtype=torch.float32)
    meta = {"name": "tinyreg", "target": "value", "input_shape": [features], "output_size": 1,
            "normalisation": {"y_mean": [0.0], "y_std": [1.0]},
            "sizes": {p: len(tensors[f"{p}_x"]) for p in ("train", "val", "test")}}
    return Prepared(meta=meta, tensors=tensors)


EXPERIMENTS = {
    "toy_relu": ("tiny", "classify", {"kind": "mlp", "hidden": [32, 16], "activation": "relu"}),
    "toy_tanh": ("tiny", "classify", {"kind": "mlp", "hidden": [8], "activation": "tanh"}),
    "toy_reg": ("tinyreg", "regress", {"kind": "mlp", "hidden": [16], "activation": "silu"}),
}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    runs, reports = root / "runs", root / "reports"
    data = {"tiny": tiny_classification(), "tinyreg": tiny_regression()}
    for name, (dataset, task, model) in EXPERIMENTS.items():
        spec = make_spec(name, dataset, task, model)
        spec_path = root / f"{name}.yaml"
        spec_path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
        train_experiment(spec, spec_path, data[dataset], runs / name, uri, progress=False)
        evaluate_run(spec, data[dataset], runs / name, uri)
    names = [*EXPERIMENTS, "never_trained"]
    frame = compare(names, runs, reports, uri)
    return SimpleNamespace(root=root, runs=runs, reports=reports, uri=uri, frame=frame, names=names)


def load(run: Path, name: str) -> dict:
    path = run / name
    return json.loads(path.read_text()) if path.is_file() else {}


def unescape(text: str) -> str:
    """Markdown's backslash escapes removed: the text a reader sees."""
    return re.sub(r"\\(.)", r"\1", text)


def md_tables(markdown: str) -> list[list[dict[str, str]]]:
    """Every markdown table as a list of {column: cell} rows."""
    tables, lines = [], markdown.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|--"):
            header = [unescape(c.strip()) for c in line.strip("|").split(" | ")]
            rows = []
            for body in lines[i + 2:]:
                if not body.startswith("| "):
                    break
                cells = [unescape(c.strip()) for c in re.split(r"(?<!\\) \| ", body.strip()[2:-2])]
                rows.append(dict(zip(header, cells)))
            tables.append(rows)
    return tables


def leaderboard_rows(markdown: str) -> dict[str, dict[str, str]]:
    """Each experiment's leaderboard cells, its first view and its folded columns together."""
    rows: dict[str, dict[str, str]] = {}
    for table in md_tables(markdown):
        for row in table:
            if "#" in row and "experiment" in row:
                rows.setdefault(row["experiment"], {}).update(row)
    return rows


def measured_flags(diag: dict) -> set[str]:
    """Raised flags a report may show: gradient flags only when diagnostics were on."""
    flags = diag.get("flags") or {}
    allowed = set(flags) if diag.get("enabled") else {"unstable", "diverged"}
    return {k for k, v in flags.items() if v and k in allowed}


def expected_gap(metrics: dict, diag: dict, when: str) -> float | None:
    recorded = (diag.get("overfitting") or {}).get(f"gap_{when}")
    if isinstance(recorded, dict) and "loss" in recorded:
        return recorded["loss"]
    epoch = metrics[when]
    return epoch["val/loss"] - epoch["train/loss"]


def assert_links_resolve(markdown: str) -> None:
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', markdown))
    for target in re.findall(r"\]\(#([^) \"]+)", markdown):
        assert target in anchors, target


def as_float(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


# ── tests on the real runs ───────────────────────────────────────────────────
@pytest.mark.slow
def test_leaderboard_csv_rows_equal_the_runs_json_files(real):
    rows = {r["experiment"]: r for r in csv.DictReader((real.reports / "leaderboard.csv").open())}
    assert list(rows) == real.names
    for name in EXPERIMENTS:
        run = real.runs / name
        metrics, evaluation, cost, diag = (load(run, f) for f in ("metrics.json", "eval.json", "cost.json",
                                                                    "diagnostics.json"))
        row, main = rows[name], metrics["main_metric"]
        assert row["status"] == metrics["status"] == "finished"
        assert (row["dataset"], row["task"], row["kind"], row["metric"]) == (
            metrics["dataset"], metrics["task"], metrics["kind"], main)
        assert float(row["test_metric"]) == pytest.approx(evaluation["test"][main], rel=1e-12)
        assert float(row["val_metric"]) == pytest.approx(metrics["best"][f"val/{main}"], rel=1e-12)
        assert float(row["val_metric_final"]) == pytest.approx(metrics["final"][f"val/{main}"], rel=1e-12)
        assert int(row["best_epoch"]) == metrics["best_epoch"] and int(row["epochs"]) == metrics["epochs"]
        assert float(row["gap_loss_final"]) == pytest.approx(expected_gap(metrics, diag, "final"), rel=1e-9)
        assert float(row["gap_loss_best"]) == pytest.approx(expected_gap(metrics, diag, "best"), rel=1e-9)
        assert float(row["train_time_s"]) == pytest.approx(cost.get("train_time_s", metrics["train_time_s"]))
        for column, key in (("params", "params_total"), ("flops_forward_per_sample", "flops_forward_per_sample"),
                            ("peak_memory_mb", "peak_memory_mb"), ("mfu", "mfu"),
                            ("latency_ms_p50", "latency_ms_p50")):
            assert as_float(row[column]) == (None if cost.get(key) is None else pytest.approx(cost[key])), column
        assert row["params"] == str(cost["params_total"])  # written as an integer, not 50826.0
        assert row["verdict"] == ((diag.get("overfitting") or {}).get("verdict") or "")
        assert set(filter(None, row["flags"].split(";"))) == measured_flags(diag)
        for key, value in evaluation["test"].items():
            if isinstance(value, float):
                assert float(row[f"test/{key}"]) == pytest.approx(value, rel=1e-12)
    missing = rows["never_trained"]
    assert missing["status"] == "missing" and missing["test_metric"] == "" and missing["params"] == ""


@pytest.mark.slow
def test_markdown_leaderboards_show_the_runs_numbers(real):
    md = (real.reports / "comparison.md").read_text()
    rows = leaderboard_rows(md)
    assert set(rows) == set(real.names)
    for name in EXPERIMENTS:
        run = real.runs / name
        metrics, evaluation, cost, diag = (load(run, f) for f in ("metrics.json", "eval.json", "cost.json",
                                                                    "diagnostics.json"))
        row, main = rows[name], metrics["main_metric"]
        assert row["status"] == metrics["status"]
        # one seed: its value, then the interval of the test-set bootstrap
        assert row[f"test {main}: mean [95% interval]"].split(" [")[0] == f"{evaluation['test'][main]:.4f}"
        assert row[f"val {main} (best)"] == f"{metrics['best'][f'val/{main}']:.4f}"
        gap = expected_gap(metrics, diag, "final")
        assert row["loss gap best → last"].endswith(("+" if gap >= 0 else "−") + f"{abs(gap):.4f}")
        params = cost.get("params_total")
        assert row["params"] == (str(params) if params < 1000 else f"{params / 1000:.3g}k")
        verdict = (diag.get("overfitting") or {}).get("verdict")
        if verdict:
            assert row["verdict"].startswith(f"[{verdict}](#fig-gap-")
        raised = measured_flags(diag)
        assert all(f"[{flag}](#" in row["flags"] for flag in raised)
        if not raised and diag:
            assert row["flags"] in ("none", "gradients not recorded")
    # Ranked best first within a dataset: the classifiers' test accuracies do not increase down the table.
    classify = [r for r in md_tables(md)[0]]
    scores = [float(r["test accuracy: mean [95% interval]"].split(" [")[0]) for r in classify]
    assert scores == sorted(scores, reverse=True)
    assert rows["never_trained"]["status"] == "missing" and rows["never_trained"]["params"] == "—"


@pytest.mark.slow
def test_every_figure_and_anchor_the_markdown_names_exists(real):
    md = (real.reports / "comparison.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert any("curves_" in p for p in images) and any("confusion_" in p for p in images)
    assert any("pareto_" in p for p in images) and any("gap_" in p for p in images)
    for path in images:
        assert not path.startswith(("/", "http")), path
        assert (real.reports / path).read_bytes().startswith(PNG_MAGIC), path
    assert_links_resolve(md)
    # Each figure has a one-line caption right under it.
    for path in images:
        block = md.split(f"]({path})", 1)[1].lstrip("\n").splitlines()[0]
        assert block.startswith("*") and block.endswith(".*"), block


@pytest.mark.slow
def test_html_is_one_self_contained_file(real):
    html = (real.reports / "comparison.html").read_text()
    assert not EXTERNAL.search(html)
    assert "<script" not in html.lower() and "<link" not in html.lower()
    sources = re.findall(r'<img[^>]* src="([^"]+)"', html)
    md_images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (real.reports / "comparison.md").read_text())
    assert len(sources) == len(md_images) > 0
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    ids = set(re.findall(r' id="([^"]+)"', html))
    for target in re.findall(r'href="#([^"]+)"', html):
        assert target in ids, target
    assert html.count("<figcaption>") == len(re.findall(r"<figure ", html))


@pytest.mark.slow
def test_the_report_is_logged_to_mlflow_as_a_compare_run(real):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(real.uri)
    experiment = client.get_experiment_by_name("archlab/compare")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "compare" and run.info.status == "FINISHED"
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"leaderboard.csv", "comparison.md", "comparison.html", "figures", "plots"} <= top
    figures = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {p.name for p in (real.reports / "figures").iterdir()}
    tested = {k.split("/", 1)[1]: v for k, v in run.data.metrics.items() if k.startswith("test_metric/")}
    assert tested == pytest.approx({n: load(real.runs / n, "eval.json")["test"][load(real.runs / n, "eval.json")
                                                                                  ["main_metric"]]
                                    for n in EXPERIMENTS})


@pytest.mark.slow
def test_dvc_plot_data_holds_each_runs_history(real):
    points = json.loads((real.reports / "plots" / "learning_curves.json").read_text())
    for name in EXPERIMENTS:
        rows = list(csv.DictReader((real.runs / name / "history.csv").open()))
        val_loss = [p["value"] for p in points if p["experiment"] == name and p["split"] == "val"
                    and p["quantity"] == "loss"]
        assert val_loss == pytest.approx([float(r["val/loss"]) for r in rows])
    # Every point has the same keys: DVC only reads a list of dicts whose keys all match.
    assert len({tuple(sorted(p)) for p in points}) == 1


# ── hand-built runs ──────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> SimpleNamespace:
    """Runs in the writers' formats with every case the report must handle (read-only for the tests)."""
    tmp_path = tmp_path_factory.mktemp("zoo")
    runs = tmp_path / "runs"
    fx.write_run(runs, "deep_sigmoid", test={"accuracy": 0.4}, cost_=fx.cost(900, 1800, 2.0),
                 diag=fx.diagnostics(6, ["l0", "l1", "l2", "l3"], ("vanishing", "dead_units"), "underfit"))
    fx.write_run(runs, "huge_lr", status="diverged", test={"accuracy": 0.1}, cost_=fx.cost(500, 1000, 0.5),
                 diag=fx.diagnostics(6, ["l0", "l1"], ("exploding", "diverged"), "diverged"))
    off = fx.diagnostics(6, ["l0"], ("unstable",), "good fit")
    off["enabled"] = False
    fx.write_run(runs, "no_grads", test={"accuracy": 0.7}, diag=off)
    fx.write_run(runs, "no_diag", test={"accuracy": 0.6})
    gan = fx.write_run(runs, "gan", task="generate", metric="fid", test={"fid": 40.0, "class_coverage": 0.8},
                       kind="gan")
    for epoch in (1, 2, 3):
        fx.write_png(gan / "samples" / f"epoch_{epoch:03d}.png", seed=epoch)
    lm = fx.write_run(runs, "char_lm", dataset="text", task="lm", metric="bits_per_char",
                      test={"bits_per_char": 2.1, "sample": "a <b> & c|ontinued"})
    (lm / "samples.txt").write_text("=== epoch 1 ===\nx|y\n")
    names = ["deep_sigmoid", "huge_lr", "no_grads", "no_diag", "gan", "char_lm"]
    reports = tmp_path / "reports"
    frame = compare(names, runs, reports)
    return SimpleNamespace(runs=runs, reports=reports, names=names, frame=frame,
                           md=(reports / "comparison.md").read_text(), html=(reports / "comparison.html").read_text())


def test_flags_link_to_the_figure_that_explains_them(zoo):
    assert_links_resolve(zoo.md)
    rows = leaderboard_rows(zoo.md)
    deep = rows["deep_sigmoid"]["flags"]
    assert "[vanishing](#fig-grad-deep_sigmoid" in deep and "[dead_units](#fig-grad-deep_sigmoid" in deep
    assert '"vanishing because of a constructed case"' in deep  # the diagnostics' own sentence, on hover
    assert (zoo.reports / "figures" / "grad_deep_sigmoid.png").is_file()
    assert '<a id="fig-grad-deep_sigmoid"></a>' in zoo.md and 'id="fig-grad-deep_sigmoid"' in zoo.html
    huge = rows["huge_lr"]
    assert "[exploding](#fig-grad-huge_lr" in huge["flags"] and "[diverged](#fig-curves-toy-classify" in huge["flags"]
    assert huge["status"].startswith("[diverged](#fig-curves-toy-classify")
    # Diagnostics off: the loss-history flags still count, the gradient flags are not claimed clear.
    assert rows["no_grads"]["flags"].startswith("[unstable](#fig-curves-toy-classify")
    assert rows["no_grads"]["flags"].endswith("gradients not recorded")
    assert rows["no_diag"]["flags"] == "—" and rows["no_diag"]["verdict"] == "—"
    assert 'class="flag"' in zoo.html and 'title="vanishing because of a constructed case"' in zoo.html


def test_generative_runs_show_their_last_sample_grid_and_text(zoo):
    figures = {p.name for p in (zoo.reports / "figures").iterdir()}
    assert "samples_gan_epoch_003.png" in figures and "samples_gan_epoch_001.png" not in figures
    assert (zoo.reports / "figures" / "samples_gan_epoch_003.png").read_bytes() == \
        (zoo.runs / "gan" / "samples" / "epoch_003.png").read_bytes()
    assert "(figures/samples_gan_epoch_003.png)" in zoo.md
    assert 'class="samples"' in zoo.html
    assert "```text\na <b> & c|ontinued\n```" in zoo.md
    assert "<pre>a &lt;b&gt; &amp; c|ontinued</pre>" in zoo.html
    # fid is lower-is-better: its Pareto caption says so, and the lm's too.
    assert "Test fid (lower is better)" in zoo.md and "Test bits_per_char (lower is better)" in zoo.md


def test_missing_and_broken_run_files_show_as_dashes(tmp_path):
    runs = tmp_path / "runs"
    fx.write_run(runs, "good", test={"accuracy": 0.9}, cost_=fx.cost(2000, 4000, 1.0))
    broken = fx.write_run(runs, "broken", test={"accuracy": 0.5})
    (broken / "metrics.json").write_text('{"status": "fini')  # cut off mid-write
    (broken / "history.csv").unlink()
    # Flags with nothing to show them (no history, no gradient norms): the links fall back to the section.
    (broken / "diagnostics.json").write_text(json.dumps({"enabled": True, "flags": {"unstable": True,
                                                                                     "vanishing": True}}))
    frame = compare(["good", "broken", "absent"], runs, tmp_path / "reports")
    # The broken run keeps what eval.json says (its status and test score), the rest reads as unknown.
    assert list(frame["status"]) == ["finished", "finished", "missing"]
    assert frame["test_metric"].tolist()[:2] == [0.9, 0.5] and pd.isna(frame["dataset"][1])
    rows = leaderboard_rows((tmp_path / "reports" / "comparison.md").read_text())
    assert rows["broken"]["loss gap best → last"] == "— → —" and rows["broken"]["best epoch"] == "—"
    assert rows["good"]["params"] == "2k" and rows["good"]["test accuracy: mean [95% interval]"] == "0.9000"
    assert rows["absent"]["test accuracy: mean [95% interval]"] == "—" and rows["absent"]["flags"] == "—"  # grouped with "broken"
    assert "[vanishing](#sec-unknown-unknown" in rows["broken"]["flags"]
    assert_links_resolve((tmp_path / "reports" / "comparison.md").read_text())
    assert (tmp_path / "reports" / "comparison.html").is_file()


def test_a_rerun_drops_the_figures_of_experiments_no_longer_compared(tmp_path):
    runs = tmp_path / "runs"
    for name in ("a", "b"):
        fx.write_run(runs, name, diag=fx.diagnostics(4, ["l0", "l1"]))
    compare(["a", "b"], runs, tmp_path / "reports")
    assert (tmp_path / "reports" / "figures" / "grad_b.png").is_file()
    compare(["a"], runs, tmp_path / "reports")
    assert not (tmp_path / "reports" / "figures" / "grad_b.png").exists()
    assert (tmp_path / "reports" / "figures" / "grad_a.png").is_file()


def test_pareto_front_keeps_only_models_nothing_beats():
    points = [(1.0, 0.80), (2.0, 0.90), (3.0, 0.85), (4.0, 0.95), (2.0, 0.70)]
    assert pareto_front(points, "max") == [0, 1, 3]
    losses = [(1.0, 3.0), (2.0, 2.0), (3.0, 2.5), (5.0, 1.0)]
    assert pareto_front(losses, "min") == [0, 1, 3]
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)], "max") == [0, 1]  # equal points do not beat each other


# ── DVC plots and the browser ────────────────────────────────────────────────
def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    result = subprocess.run(cmd, cwd=cwd, env=env, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{cmd}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_dvc_plots_diff_overlays_two_revisions_of_the_compare_stage(tmp_path):
    """The project's own dvc.yaml and templates: the compare stage committed, rerun on changed runs, then
    `dvc plots diff HEAD` shows both revisions of both experiments in one plot."""
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["experiments"] = {"a": {"dataset": "toy"}, "b": {"dataset": "toy"}}
    params["comparisons"] = []  # the project's declared pairs name experiments this project does not have
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for name, layers in (("a", ["l0", "l1"]), ("b", ["l0", "l1", "l2"])):
        fx.write_run(tmp_path / "runs", name, epochs=5, diag=fx.diagnostics(5, layers))
    _run(["git", "init", "-q"], tmp_path)
    _run([sys.executable, "-m", "dvc", "repro", "-s", "compare"], tmp_path)
    _run(["git", "add", "-A"], tmp_path)
    _run(["git", "commit", "-qm", "first"], tmp_path)
    # Experiment a retrained for longer; the workspace's report is the second revision.
    fx.write_run(tmp_path / "runs", "a", epochs=8, diag=fx.diagnostics(8, ["l0", "l1"]))
    _run([sys.executable, "-m", "pipeline.cli", "compare", "--no-track"], tmp_path)
    out = _run([sys.executable, "-m", "dvc", "plots", "diff", "HEAD", "--json"], tmp_path).stdout
    shown = json.loads(out[out.index("{"):])
    assert "data" in shown, out
    data = shown["data"]
    for plot, key in (("reports/plots/learning_curves.json", "value"), ("reports/plots/grad_norms.json", "grad_norm")):
        (rendered,) = data[plot]
        values = rendered["content"]["data"]["values"]
        assert {v["rev"] for v in values} == {"HEAD", "workspace"}
        assert {v["experiment"] for v in values} == {"a", "b"}
        assert rendered["content"]["facet"]  # our template, not DVC's default line plot
    epochs = {(v["rev"], v["epoch"]) for v in data["reports/plots/learning_curves.json"][0]["content"]["data"]
              ["values"] if v["experiment"] == "a"}
    assert max(e for rev, e in epochs if rev == "workspace") == 8 and max(e for rev, e in epochs if rev == "HEAD") == 5


def _chromium() -> str | None:
    sys.path.insert(0, str(REPO / "bench"))
    from check_report_html import find_chromium
    return find_chromium()


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no Chromium (apt-get install chromium)")
def test_headless_chromium_loads_every_image_and_notices_a_broken_one(zoo, tmp_path):
    script = [sys.executable, str(REPO / "bench" / "check_report_html.py")]
    good = subprocess.run([*script, str(zoo.reports / "comparison.html")], check=False, capture_output=True,
                          text=True, timeout=180)
    assert good.returncode == 0, good.stderr
    count = len(re.findall(r"<img ", zoo.html))
    assert f"{count} images, 0 broken" in good.stdout
    # The check can fail: a figure whose data is not an image is reported by its id.
    html = re.sub(r'(id="fig-grad-huge_lr"><h3>[^<]*</h3><img[^>]* src=")[^"]+', r"\1data:image/png;base64,AAAA",
                  zoo.html)
    bad_path = tmp_path / "bad.html"
    bad_path.write_text(html)
    bad = subprocess.run([*script, str(bad_path)], check=False, capture_output=True, text=True, timeout=180)
    assert bad.returncode == 1 and "fig-grad-huge_lr" in bad.stderr and "1 broken" in bad.stdout


def test_pareto_labels_of_crowded_points_do_not_overlap():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    from pipeline.reports.figures import LABEL_OFFSETS, label_points
    fig = Figure(figsize=(4, 3))
    ax = fig.subplots()
    points = [(f"experiment_{i}", 1.0 + 0.05 * i, 0.97 + 0.001 * (i % 2), (0, 0, 0)) for i in range(5)]
    points.append(("far_away", 3.0, 0.5, (0, 0, 0)))
    ax.scatter([x for _, x, _, _ in points], [y for _, _, y, _ in points])
    ax.margins(x=0.15, y=0.12)  # as the Pareto figure has them
    FigureCanvasAgg(fig).draw()
    label_points(ax, points)
    renderer = fig.canvas.get_renderer()
    boxes = []
    for text in ax.texts:
        text.update_positions(renderer)
        boxes.append(Text.get_window_extent(text, renderer))
    assert sorted(t.get_text() for t in ax.texts) == sorted(name for name, *_ in points)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    lone = next(t for t in ax.texts if t.get_text() == "far_away")
    assert lone.xyann in LABEL_OFFSETS[:4]  # a lone point's label stays beside it, with no leader line


def test_a_deep_models_gradient_figure_labels_every_layer_and_keeps_its_titles_apart(tmp_path):
    from pipeline.reports import figures as rf
    from pipeline.reports.records import load_run
    layers = [f"blocks.{i}.attn.qkv" for i in range(44)]
    fx.write_run(tmp_path / "runs", "deep", test={"accuracy": 0.9}, diag=fx.diagnostics(6, layers))
    kept = {}

    class Keep(rf.FigureWriter):
        def save(self, fig, stem, anchor, title, caption):
            kept["fig"] = fig
            return super().save(fig, stem, anchor, title, caption)

    assert rf.grad_health(Keep(tmp_path / "figures"), load_run("deep", tmp_path / "runs")) is not None
    fig = kept["fig"]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    renderer = FigureCanvasAgg(fig).get_renderer()
    heatmap = fig.axes[0]
    assert [t.get_text() for t in heatmap.get_yticklabels()] == [rf._short(name) for name in layers]
    boxes = sorted((t.get_window_extent(renderer) for t in heatmap.get_yticklabels()), key=lambda b: b.y0)
    assert all(a.y1 <= b.y0 + 0.5 for a, b in zip(boxes, boxes[1:])), "row labels overlap"
    title = fig._suptitle.get_window_extent(renderer)
    assert all(not title.overlaps(ax.title.get_window_extent(renderer)) for ax in fig.axes if ax.get_title())


# mnist1d in the README's run: test accuracy, forward FLOPs per sample, training time (s)
MNIST1D = {"mnist1d_mlp": (0.639, 1.57e5, 2.7), "mnist1d_cnn": (0.985, 1.33e6, 7.9), "mnist1d_rnn": (0.588, 1.32e6, 9.6),
           "mnist1d_lstm": (0.963, 5.29e6, 19.8), "mnist1d_gru": (0.971, 3.97e6, 15.8),
           "mnist1d_bigru": (0.962, 4.47e6, 24.0), "mnist1d_transformer": (0.894, 2.26e6, 27.4)}


def test_the_mnist1d_pareto_labels_neither_overlap_nor_lie_under_a_leader_line(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    from pipeline.reports import figures as rf
    from pipeline.reports.records import load_run
    for name, (accuracy, flops, seconds) in MNIST1D.items():
        fx.write_run(tmp_path / "runs", name, dataset="mnist1d", test={"accuracy": accuracy},
                     cost_=fx.cost(1000, flops, seconds))
    records = [load_run(name, tmp_path / "runs") for name in MNIST1D]
    kept = {}

    class Keep(rf.FigureWriter):
        def save(self, fig, stem, anchor, title, caption):
            kept["fig"] = fig
            return super().save(fig, stem, anchor, title, caption)

    assert rf.pareto(Keep(tmp_path / "figures"), "mnist1d", "classify", records, rf.colors_for(records), "max")
    fig = kept["fig"]
    renderer = FigureCanvasAgg(fig).get_renderer()
    for ax in fig.axes:
        boxes = []
        for text in ax.texts:
            text.update_positions(renderer)
            boxes.append(Text.get_window_extent(text, renderer))
        assert sorted(t.get_text() for t in ax.texts) == sorted(MNIST1D)
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
        leaders = [(i, (tuple(ax.transData.transform(t.xy)), (b.x0 if t.xyann[0] > 0 else b.x1, (b.y0 + b.y1) / 2)))
                   for i, (t, b) in enumerate(zip(ax.texts, boxes)) if t.arrow_patch is not None]
        assert not [(ax.texts[i].get_text(), ax.texts[j].get_text()) for i, line in leaders
                    for j, box in enumerate(boxes) if j != i and rf._crosses(line, box)]

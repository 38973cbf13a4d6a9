"""Sweeps: real Optuna studies on tiny data in a temporary project — conditional spaces, pruning, failures,
killed workers, parallel workers, Pareto fronts, exported specs, MLflow nesting and bad sweep specs."""
from __future__ import annotations

import base64
import contextlib
import html
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from pipeline.cli import main
from pipeline.engine.train import train_experiment
from pipeline.specs.experiment import load_spec
from pipeline.specs.sweep import Sweep, load_sweep, parse_path
from pipeline.sweeps.storage import default_storage_url, open_storage, trials_used
from pipeline.sweeps.study import open_study, run_sweep
from tests.conftest import REPO, free_port, serving, tiny_project

MLP = {"name": "tiny_mlp", "data": {"dataset": "tiny"}, "task": "classify",
       "model": {"kind": "mlp", "hidden": [16]},
       "train": {"epochs": 3, "batch_size": 32, "seed": 1, "optimizer": {"name": "adamw", "lr": 0.01}}}
CNN = {"name": "tiny_cnn", "data": {"dataset": "tiny"}, "task": "classify",
       "model": {"kind": "cnn", "layers": [{"type": "conv", "channels": 4, "kernel": 3}, {"type": "pool", "kernel": 2}],
                 "head": [8]},
       "train": {"epochs": 3, "batch_size": 32, "seed": 1, "optimizer": {"name": "adamw", "lr": 0.01}}}


def sweep_dict(name="tiny_sweep", **overrides) -> dict:
    raw = {"name": name,
           "candidates": {
               "mlp": {"spec": "tiny_mlp", "space": {
                   "model.hidden": {"type": "categorical", "choices": [[8], [16, 16]]},
                   "train.optimizer.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}}},
               "cnn": {"spec": "tiny_cnn", "space": {
                   "model.layers[0].channels": {"type": "int", "low": 2, "high": 6, "step": 2},
                   "model.head_dropout": {"type": "float", "low": 0.0, "high": 0.3}}}},
           "objective": {"metric": "val/accuracy", "direction": "maximize"},
           "sampler": {"name": "random"}, "pruner": {"name": "none"}, "seed": 0,
           "budget": {"trials": 4, "epochs": 2}}
    raw.update(overrides)
    return raw


@pytest.fixture
def lab(tmp_path, monkeypatch) -> Path:
    """A project folder: tiny prepared data, two candidate specs, the repo's params.yaml; the working directory."""
    tiny_project(tmp_path, [MLP, CNN])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def write_sweep(lab: Path, raw: dict) -> Path:
    path = lab / "specs" / "sweeps" / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(lab: Path, raw: dict, workers: int = 1, tracking: bool = False, before=None) -> tuple[Sweep, optuna.Study]:
    """Run a sweep through the Python API; `before(study)` may enqueue trials first."""
    sweep = load_sweep(write_sweep(lab, raw), lab / "specs")
    url = default_storage_url(lab / "sweeps", sweep.name)
    if before is not None:
        before(open_study(sweep, url, 0))
    run_sweep(sweep, lab / "data/prepared/tiny", lab / "runs/sweeps" / sweep.name, lab / "reports/sweeps" / sweep.name,
              url, workers=workers, tracking_uri=f"sqlite:///{lab / 'mlflow.db'}" if tracking else None,
              specs_dir=lab / "specs")
    return sweep, open_study(sweep, url, 0)


def test_each_trial_samples_only_its_own_candidates_space(lab):
    sweep, study = run(lab, sweep_dict(budget={"trials": 8, "epochs": 1}))
    trials = study.get_trials()
    assert len(trials) == 8 and all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.params["candidate"] for t in trials} == {"mlp", "cnn"}
    for t in trials:
        own = t.params["candidate"]
        assert {k for k in t.params if k != "candidate"} == {f"{own}/{p}" for p in sweep.spec.candidates[own].space}
        # The values really went into the trial's spec, at their paths.
        spec = load_spec(Path(t.user_attrs["run_dir"]) / "spec.yaml")
        assert spec.model.kind == own and spec.train.epochs == 1
        if own == "mlp":
            assert spec.model.hidden == json.loads(t.params["mlp/model.hidden"])
            assert spec.train.optimizer.lr == t.params["mlp/train.optimizer.lr"]
        else:
            assert spec.model.layers[0].channels == t.params["cnn/model.layers[0].channels"]
            assert spec.model.head_dropout == t.params["cnn/model.head_dropout"]


def test_a_bad_trial_is_pruned_by_the_median_of_its_candidate(lab):
    raw = sweep_dict(candidates={"mlp": {"spec": "tiny_mlp", "space": {
        "train.optimizer.lr": {"type": "float", "low": 1e-7, "high": 3e-2, "log": True}}}},
        pruner={"name": "median", "startup_trials": 2, "warmup_epochs": 0}, budget={"trials": 3, "epochs": 6})

    def queue(study):
        for lr in (3e-2, 2e-2, 1e-7):  # two good runs set the median; a frozen one falls below it at once
            study.enqueue_trial({"candidate": "mlp", "mlp/train.optimizer.lr": lr})

    _, study = run(lab, raw, before=queue)
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    pruned = study.trials[2]
    assert 1 <= max(pruned.intermediate_values) < 6  # stopped before its epoch budget
    assert len(study.trials[0].intermediate_values) == 6  # every epoch was reported


@pytest.mark.parametrize("scope, frozen_cnn", [("candidate", TrialState.COMPLETE), ("study", TrialState.PRUNED)])
def test_the_median_pruner_judges_a_trial_by_its_own_candidate_or_by_the_whole_study(lab, scope, frozen_cnn):
    lr = {"train.optimizer.lr": {"type": "float", "low": 1e-7, "high": 3e-2, "log": True}}
    raw = sweep_dict(candidates={"mlp": {"spec": "tiny_mlp", "space": lr}, "cnn": {"spec": "tiny_cnn", "space": lr}},
                     pruner={"name": "median", "startup_trials": 2, "warmup_epochs": 0, "scope": scope},
                     budget={"trials": 3, "epochs": 6})

    def queue(study):  # two good MLPs set the study's median; a frozen CNN is the first of its candidate
        for candidate, rate in (("mlp", 3e-2), ("mlp", 2e-2), ("cnn", 1e-7)):
            study.enqueue_trial({"candidate": candidate, f"{candidate}/train.optimizer.lr": rate})

    _, study = run(lab, raw, before=queue)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.COMPLETE, frozen_cnn]


def test_an_invalid_combination_fails_its_trial_and_the_study_goes_on(lab):
    raw = sweep_dict(candidates={"cnn": {"spec": "tiny_cnn", "space": {
        "model.layers[1].kernel": {"type": "categorical", "choices": [2, 64]},  # a 64-wide pool on 8 samples
        "model.head_dropout": {"type": "categorical", "choices": [0.1, 1.5]}}}},  # dropout must be < 1
        budget={"trials": 3, "epochs": 1})

    def queue(study):
        study.enqueue_trial({"candidate": "cnn", "cnn/model.layers[1].kernel": 64, "cnn/model.head_dropout": 0.1})
        study.enqueue_trial({"candidate": "cnn", "cnn/model.layers[1].kernel": 2, "cnn/model.head_dropout": 1.5})
        study.enqueue_trial({"candidate": "cnn", "cnn/model.layers[1].kernel": 2, "cnn/model.head_dropout": 0.1})

    _, study = run(lab, raw, before=queue)
    impossible, invalid, fine = study.get_trials()
    assert impossible.state == invalid.state == TrialState.FAIL and fine.state == TrialState.COMPLETE
    assert "impossible architecture" in impossible.user_attrs["fail_reason"]
    assert "model.head_dropout" in invalid.user_attrs["fail_reason"]
    table = pd.read_csv(lab / "reports/sweeps/tiny_sweep/trials.csv")
    assert table["fail_reason"].notna().sum() == 2


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_trial_left_running_by_a_dead_worker_is_failed_and_queued_again(lab):
    raw = sweep_dict(budget={"trials": 2, "epochs": 1})

    def orphan(study):
        study.enqueue_trial({"candidate": "mlp", "mlp/model.hidden": "[8]", "mlp/train.optimizer.lr": 0.01})
        trial = study.ask()  # as a worker would, then it dies before telling
        trial.suggest_categorical("candidate", ["mlp", "cnn"])
        trial.suggest_categorical("mlp/model.hidden", ["[8]", "[16, 16]"])
        trial.suggest_float("mlp/train.optimizer.lr", 1e-3, 3e-2, log=True)
        trial.set_user_attr("worker_host", socket.gethostname())
        trial.set_user_attr("worker_pid", _dead_pid())

    _, study = run(lab, raw, before=orphan)
    trials = study.get_trials()
    dead, *rest = trials
    assert dead.state == TrialState.FAIL and dead.user_attrs["interrupted"]
    retry = next(t for t in rest if t.user_attrs.get("retry_of") == 0)
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params
    assert retry.user_attrs["run_dir"].endswith("trial-0000")  # resumes the original's folder
    assert trials_used(study) == 2 and len(trials) == 3  # the interrupted one does not eat the budget
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))


@pytest.mark.slow
def test_killing_a_real_worker_then_rerunning_finishes_the_study(lab):
    slow = {**MLP, "name": "slow_mlp", "train": {**MLP["train"], "epochs": 300, "checkpoint_every_s": 0}}
    (lab / "specs" / "slow_mlp.yaml").write_text(yaml.safe_dump(slow))
    raw = sweep_dict(candidates={"mlp": {"spec": "slow_mlp", "space": {
        "train.optimizer.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}}}},
        budget={"trials": 2})
    path = write_sweep(lab, raw)
    cmd = [sys.executable, "-m", "pipeline.cli", "sweep", str(path), "--no-track"]
    proc = subprocess.Popen(cmd, cwd=lab, env={**os.environ, "PYTHONPATH": str(REPO)})
    checkpoint = lab / "runs/sweeps/tiny_sweep/trial-0000/checkpoint.pt"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not checkpoint.is_file():
            time.sleep(0.2)
        assert checkpoint.is_file(), "the worker never reached its first checkpoint"
    finally:
        proc.kill()  # SIGKILL: no handler runs, the trial stays RUNNING in the storage
        proc.wait()
    storage = open_storage(default_storage_url(lab / "sweeps", "tiny_sweep"))
    name = optuna.get_all_study_names(storage)[0]
    assert optuna.load_study(study_name=name, storage=storage).trials[0].state == TrialState.RUNNING

    assert main(["sweep", str(path), "--no-track"]) == 0
    study = optuna.load_study(study_name=name, storage=open_storage(default_storage_url(lab / "sweeps", "tiny_sweep")))
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert study.trials[0].user_attrs["interrupted"]
    assert study.trials[1].user_attrs["retry_of"] == 0 and study.trials[1].params == study.trials[0].params
    assert json.loads((checkpoint.parent / "metrics.json").read_text())["epochs"] == 300


@pytest.mark.slow
def test_two_workers_share_one_study_without_losing_or_repeating_a_trial(lab):
    raw = sweep_dict(budget={"trials": 5, "epochs": 3})
    _, study = run(lab, raw, workers=2, tracking=True)
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(5))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # The first worker runs in the sweep's own process, which has paid its imports; the second, spawned, joins
    # once it has paid its own, and may find the budget spent if the trials are quick: no third process.
    pids = {t.user_attrs["worker_pid"] for t in trials}
    assert os.getpid() in pids and len(pids) <= 2
    assert len({t.user_attrs["run_dir"] for t in trials}) == 5
    # one nested MLflow run per trial, none twice
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{lab / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sweeps/tiny_sweep")
    children = client.search_runs([exp.experiment_id], filter_string="tags.`sweep.trial` != ''")
    assert sorted(int(r.data.tags["sweep.trial"]) for r in children) == list(range(5))


@pytest.mark.slow
def test_the_study_opens_in_optuna_dashboard_with_the_command_the_report_gives(lab):
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is in the dev extra")
    sweep, study = run(lab, sweep_dict())
    command = (lab / "reports/sweeps/tiny_sweep/README.md").read_text().split("Open it in the dashboard: `")[1]
    program, storage = command.split("`")[0].split()
    assert program == "optuna-dashboard" and storage == default_storage_url(lab / "sweeps", sweep.name)
    port = free_port()
    with serving([str(Path(sys.executable).parent / program), storage, "--host", "127.0.0.1", "--port", str(port)],
                 cwd=lab) as ask:
        (summary,) = ask(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        shown = ask(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}?after=0")
    assert summary["study_name"] == study.study_name
    assert sorted(t["number"] for t in shown["trials"]) == [t.number for t in study.trials]


@pytest.mark.slow
def test_mlflow_holds_a_parent_run_and_one_child_per_trial_with_its_state(lab):
    raw = sweep_dict(candidates={"mlp": {"spec": "tiny_mlp", "space": {
        "train.optimizer.lr": {"type": "float", "low": 1e-7, "high": 3e-2, "log": True},
        "model.dropout": {"type": "categorical", "choices": [0.0, 1.5]}}}},
        pruner={"name": "median", "startup_trials": 2, "warmup_epochs": 0}, budget={"trials": 4, "epochs": 5})

    def queue(study):
        for lr, dropout in ((3e-2, 0.0), (2e-2, 0.0), (1e-7, 0.0), (1e-2, 1.5)):
            study.enqueue_trial({"candidate": "mlp", "mlp/train.optimizer.lr": lr, "mlp/model.dropout": dropout})

    _, study = run(lab, raw, tracking=True, before=queue)
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{lab / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sweeps/tiny_sweep")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "parent")
    children = {int(r.data.tags["sweep.trial"]): r for r in runs if "sweep.trial" in r.data.tags}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
    assert [children[i].data.tags["state"] for i in range(4)] == ["complete", "complete", "pruned", "failed"]
    assert all(r.data.tags["candidate_kind"] == "mlp" for r in children.values())
    assert children[3].info.status == "FAILED" and "dropout" in children[3].data.tags["fail_reason"]
    assert children[3].data.params["model.dropout"] == "1.5"
    # per-epoch metrics: all epochs of a complete trial, and every epoch a pruned one ran (none lost in buffers)
    assert len(client.get_metric_history(children[0].info.run_id, "val/accuracy")) == 5
    pruned_epochs = max(study.trials[2].intermediate_values)
    assert len(client.get_metric_history(children[2].info.run_id, "val/accuracy")) == pruned_epochs
    assert children[2].info.status == "KILLED"
    assert parent.data.metrics["best/val/accuracy"] == study.best_value
    assert parent.data.tags["mlflow.source.name"].endswith("tiny_sweep.yaml") and parent.data.tags["mlflow.user"]
    assert "mlflow.source.git.commit" in parent.data.tags and "description" not in parent.data.params
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {
        "report/best_per_architecture.csv", "report/optimization_history.png"}


def test_a_multi_objective_sweep_reports_its_pareto_front(lab):
    raw = sweep_dict(objective={"metric": "val/accuracy", "direction": "maximize", "costs": ["params"]},
                     sampler={"name": "nsga2", "population_size": 4}, budget={"trials": 6, "epochs": 1})
    _, study = run(lab, raw)
    assert study.directions[1] == optuna.study.StudyDirection.MINIMIZE
    report = lab / "reports/sweeps/tiny_sweep"
    assert (report / "pareto_front.png").is_file() and not (report / "metric_vs_cost.png").exists()
    front = pd.read_csv(report / "pareto_front.csv")
    table = pd.read_csv(report / "trials.csv")
    done = table[table["state"] == "complete"]
    assert set(front["trial"]) == {t.number for t in study.best_trials}
    for row in front.itertuples():  # nothing beats a front member on both accuracy and size
        better = done[(done["val/accuracy"] >= row._5) & (done["params_total"] <= row.params_total)
                      & ((done["val/accuracy"] > row._5) | (done["params_total"] < row.params_total))]
        assert better.empty
    assert json.loads((report / "summary.json").read_text())["pareto_front"] == sorted(front["trial"])


def test_the_exported_best_spec_validates_and_reproduces_its_trial(lab, capsys):
    _, study = run(lab, sweep_dict(budget={"trials": 4, "epochs": 2}))
    report = lab / "reports/sweeps/tiny_sweep"
    best = pd.read_csv(report / "best_per_architecture.csv")
    assert (report / "optimization_history.png").is_file() and (report / "parallel_coordinates.png").is_file()
    assert (report / "metric_vs_cost.png").is_file()
    row = best.iloc[0]
    spec_file = report / row["spec"]
    assert main(["validate", str(spec_file)]) == 0
    spec = load_spec(spec_file)
    assert spec.name == spec_file.stem
    from pipeline.data.prepare import load_prepared
    again = train_experiment(spec, spec_file, load_prepared(lab / "data/prepared/tiny"), lab / "runs/again", None,
                             progress=False)
    assert again["best"]["val/accuracy"] == study.trials[int(row["best_trial"])].value == row["val/accuracy"]


class _Tables(HTMLParser):
    """The text of every <table> of a page, as rows of cells."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("th", "td"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            self.tables[-1][-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def _markdown_tables(text: str) -> list[list[list[str]]]:
    """The text of every pipe table of a markdown page (escapes undone), as rows of cells."""
    tables, previous = [], ""
    for line in text.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|(-+:?\|)+", line):
            if not previous.startswith("|"):
                tables.append([])
            cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
            tables[-1].append([html.unescape(re.sub(r"\\(.)", r"\1", c.strip())) for c in cells])
        previous = line
    return tables


def test_the_sweep_report_html_is_self_contained_and_holds_the_markdowns_tables(lab):
    run(lab, sweep_dict(budget={"trials": 3, "epochs": 1}))
    report = lab / "reports/sweeps/tiny_sweep"
    md, page = (report / "README.md").read_text(), (report / "README.html").read_text()
    assert not re.search(r"https?://", page)  # no stylesheet, script, font or image from elsewhere
    assert not re.search(r'(?:src|href)="(?!data:|#)', page)  # every reference inline or within the page
    figures = json.loads((report / "summary.json").read_text())["figures"]
    images = re.findall(r'<img[^>]* src="data:image/png;base64,([^"]+)"', page)
    assert len(figures) >= 3 and len(images) == len(figures) == md.count("![")
    assert sorted(base64.b64decode(i) for i in images) == sorted((report / f).read_bytes() for f in figures)
    parser = _Tables()
    parser.feed(page)
    tables = _markdown_tables(md)
    assert [t[0] for t in tables] == [["candidate", "kind", "best_trial", "val/accuracy", "flops_forward_per_sample",
                                       "params_total", "train_time_s", "complete", "pruned", "failed", "spec"],
                                      ["candidate", "parameters"]]
    assert parser.tables == tables
    best = pd.read_csv(report / "best_per_architecture.csv")
    assert [row[3] for row in tables[0][1:]] == [f"{v:.4g}" for v in best["val/accuracy"]]  # numbers as in the csv
    (whole,) = _markdown_tables((report / "best_per_architecture.md").read_text())  # every column, the same renderer
    assert whole[0] == list(best.columns) and [row[0] for row in whole[1:]] == list(best["candidate"])


def test_rerunning_continues_the_study_and_a_bigger_budget_tops_it_up(lab, capsys):
    path = write_sweep(lab, sweep_dict(budget={"trials": 2, "epochs": 1}))
    assert main(["sweep", str(path), "--no-track"]) == 0
    storage = open_storage(default_storage_url(lab / "sweeps", "tiny_sweep"))
    [name] = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    assert study.metric_names == ["val/accuracy"]  # what optuna-dashboard labels the objective with
    first = capsys.readouterr().out
    best = study.best_trial
    assert f"best {best.params['candidate']} (trial {best.number}, val/accuracy {best.value:.4g})" in first
    # the terminal shows each architecture's best trial and value, not only the report
    table = first.split("best trial per architecture (val/accuracy):\n", 1)[1].splitlines()
    assert table[0].split()[:4] == ["candidate", "kind", "best_trial", "val/accuracy"]
    assert {line.split()[0] for line in table[1:]} == {"mlp", "cnn"}
    assert main(["sweep", str(path), "--no-track"]) == 0
    assert "2 trials (0 new)" in capsys.readouterr().out
    write_sweep(lab, sweep_dict(budget={"trials": 3, "epochs": 1}))
    assert main(["sweep", str(path), "--no-track"]) == 0
    assert "3 trials (1 new)" in capsys.readouterr().out
    assert (lab / "sweeps" / "tiny_sweep.journal").is_file()
    assert (lab / "reports/sweeps/tiny_sweep/best_per_architecture.md").is_file()


@pytest.mark.parametrize("change, field, words", [
    ({"candidates": {"mlp": {"spec": "tiny_mlp", "space": {"model.hiden": {"type": "int", "low": 1, "high": 4}}}}},
     "candidates.mlp.space[model.hiden]", "no field 'hiden'"),
    ({"candidates": {"cnn": {"spec": "tiny_cnn", "space": {
        "model.layers[5].channels": {"type": "int", "low": 1, "high": 4}}}}},
     "candidates.cnn.space[model.layers[5].channels]", "index 5 is out of range"),
    ({"candidates": {"mlp": {"spec": "tiny_mlp", "space": {
        "train.optimizer.lr": {"type": "float", "low": 0.1, "high": 0.01}}}}},
     "candidates.mlp.space[train.optimizer.lr]", "empty range"),
    ({"candidates": {"mlp": {"spec": "tiny_mlp", "space": {
        "model.hidden": {"type": "categorical", "choices": []}}}}},
     "candidates.mlp.space[model.hidden].choices", "at least 1"),
    ({"candidates": {"rnn": {"spec": "no_such_spec"}}}, "candidates.rnn.spec", "unknown candidate 'no_such_spec'"),
    ({"objective": {"metric": "val/accuracy", "direction": "maximize", "costs": ["params"]},
      "pruner": {"name": "median"}}, "pruner.name", "pruning needs a single objective"),
    ({"objective": {"metric": "val/acc", "direction": "maximize"}}, "objective.metric", "not a validation metric"),
    ({"budget": {"epochs": 2}}, "budget", "budget needs"),
    ({"samplr": "tpe"}, "samplr", "Extra inputs"),
])
def test_a_bad_sweep_spec_is_a_clear_error(lab, capsys, change, field, words):
    path = write_sweep(lab, sweep_dict(**change))
    assert main(["sweep", str(path), "--no-track"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {field}:" in err and words in err
    assert not (lab / "sweeps").exists() and not (lab / "runs").exists()


def test_a_candidate_whose_task_cannot_read_the_data_stops_the_sweep_before_any_trial(lab, capsys):
    (lab / "specs" / "tiny_cnn.yaml").write_text(yaml.safe_dump({**CNN, "task": "regress"}))  # tiny has classes
    path = write_sweep(lab, sweep_dict())
    assert main(["sweep", str(path), "--no-track"]) == 2
    err = capsys.readouterr().err
    assert "tiny_cnn.yaml: task: regress needs value data, but dataset 'tiny' holds class data" in err, err
    assert not (lab / "runs").exists()


def test_parse_path_reads_names_and_indices():
    assert parse_path("model.layers[1].channels") == ["model", "layers", 1, "channels"]
    assert parse_path("train.optimizer.lr") == ["train", "optimizer", "lr"]


def test_the_default_sweep_validates_against_the_repo_specs():
    sweep = load_sweep(REPO / "specs/sweeps/mnist1d_arch.yaml", REPO / "specs")
    assert {"mlp", "cnn", "gru", "transformer"} <= set(sweep.spec.candidates) and sweep.dataset == "mnist1d"
    assert sweep.spec.budget.trials and sweep.spec.budget.timeout_s


def test_the_sweep_inputs_digest_changes_only_with_what_the_sweep_reads(lab):
    path = write_sweep(lab, sweep_dict())
    out = lab / "sweeps" / "tiny_sweep.inputs.json"

    def digest() -> str:
        assert main(["sweep", str(path), "--write-inputs", str(out)]) == 0
        return out.read_text()

    first = digest()
    assert set(json.loads(first)["candidates"]) == {"mlp", "cnn"}
    assert not (lab / "sweeps" / "tiny_sweep.journal").exists()  # only the digest: no study, no trial
    (lab / "specs" / "unrelated.yaml").write_text(yaml.safe_dump({**MLP, "name": "unrelated"}))
    (lab / "specs" / "tiny_mlp.yaml").write_text("# a comment changes nothing\n" + yaml.safe_dump(MLP))
    assert digest() == first
    (lab / "specs" / "tiny_mlp.yaml").write_text(yaml.safe_dump({**MLP, "model": {"kind": "mlp", "hidden": [32]}}))
    assert digest() != first


def test_the_metric_against_time_plot_labels_a_narrow_log_axis_without_overlap(lab, monkeypatch, tmp_path):
    import matplotlib.pyplot as plt

    from pipeline.specs.sweep import COST_KEYS
    from pipeline.sweeps.report import plot_tradeoff
    sweep = load_sweep(write_sweep(lab, sweep_dict()), lab / "specs")
    # training times of 1.2-3.4 s: a fraction of a decade, where default log ticks print crowded minor labels
    table = pd.DataFrame([{"trial": i, "state": "complete", "candidate": "mlp" if i % 2 else "cnn",
                           "val/accuracy": 0.5 + 0.04 * i, COST_KEYS["flops"]: 1000.0 * (i + 1),
                           COST_KEYS["params"]: 100 + 10 * i, COST_KEYS["train_time"]: 1.2 + 0.25 * i}
                          for i in range(10)])
    monkeypatch.setattr(plt, "close", lambda fig=None: None)  # keep the figure to measure its labels
    assert plot_tradeoff(table, sweep, set(), tmp_path / "tradeoff.png")
    fig = plt.gcf()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        labels = [t for t in ax.xaxis.get_ticklabels(minor=False) + ax.xaxis.get_ticklabels(minor=True)
                  if t.get_text() and t.get_visible() and ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]
        boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
        assert len(boxes) >= 2, "a narrow axis still carries numbers"
        assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), [t.get_text() for t in labels]
    plt.close("all")


# ── faults with real processes: a killed worker, a stale journal lock ────────
def test_a_journal_lock_left_by_a_killed_process_points_at_the_journal(lab):
    """Optuna breaks a stale journal lock only if its symlink resolves (it stats the target); with the
    relative path Optuna was once given, it dangled and a survivor spun on it forever."""
    code = ("import os; from pipeline.sweeps.storage import open_storage; "
            "s = open_storage('sweeps/x.journal'); s._backend._lock.acquire(); os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=lab, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -9
    lock = lab / "sweeps" / "x.journal.lock"
    assert lock.is_symlink()
    assert lock.exists() and lock.resolve() == (lab / "sweeps" / "x.journal").resolve()


def _running_trial_pids(path: Path, parent_pid: int) -> list[int]:
    """Worker pids of the trials RUNNING now (read from the journal while the sweep writes it)."""
    try:
        storage = open_storage(default_storage_url(path, "tiny_sweep"))
        names = optuna.get_all_study_names(storage)
        if not names:
            return []
        trials = optuna.load_study(study_name=names[0], storage=storage).get_trials(states=(TrialState.RUNNING,))
    except Exception:  # noqa: BLE001 - the study may not exist yet
        return []
    return [int(t.user_attrs["worker_pid"]) for t in trials if int(t.user_attrs.get("worker_pid", parent_pid))
            != parent_pid]


def _mlflow_runs(lab: Path) -> list:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{lab / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sweeps/tiny_sweep")
    return client.search_runs([exp.experiment_id]) if exp else []


def _wait_for_a_training_worker(lab: Path, proc) -> int:
    """The pid of a worker training a trial whose MLflow run has started."""
    deadline = time.time() + 120
    while time.time() < deadline:
        pids = _running_trial_pids(lab / "sweeps", proc.pid)
        if pids and any(r.info.status == "RUNNING" and "sweep.trial" in r.data.tags for r in _mlflow_runs(lab)):
            return pids[0]
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.3)
    raise AssertionError("no worker started a trial")


def _group_gone(group: int, within_s: float) -> bool:
    """Every process of the group has ended (a zombie reaped by init may take a moment)."""
    deadline = time.time() + within_s
    while time.time() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def _tiny_study(lab: Path):
    storage = open_storage(default_storage_url(lab / "sweeps", "tiny_sweep"))
    return optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)


@pytest.mark.slow
def test_a_killed_worker_is_one_line_the_survivor_finishes_and_ctrl_c_stops_every_worker(lab):
    # Trials long enough that the spawned worker, which pays its imports first, starts one while the worker
    # in the sweep's own process is still on its first.
    slow = {**MLP, "name": "slow_mlp", "train": {**MLP["train"], "epochs": 600, "checkpoint_every_s": 0}}
    (lab / "specs" / "slow_mlp.yaml").write_text(yaml.safe_dump(slow))
    raw = sweep_dict(candidates={"mlp": {"spec": "slow_mlp", "space": {
        "train.optimizer.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}}}}, budget={"trials": 3})
    path = write_sweep(lab, raw)
    cmd = [sys.executable, "-m", "pipeline.cli", "sweep", str(path), "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{lab / 'mlflow.db'}"}

    # 1. SIGKILL of one worker mid-trial: one line, the survivor takes its trial up and spends the budget
    proc = subprocess.Popen(cmd, cwd=lab, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim = _wait_for_a_training_worker(lab, proc)
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert "Traceback" not in err, err
    killed = [line for line in err.splitlines() if "killed" in line]
    assert len(killed) == 1 and re.fullmatch(r"archlab: sweep worker [01] was killed by SIGKILL; its trial is "
                                             r"queued again and the other workers went on", killed[0]), err
    assert proc.returncode == 0, err
    study = _tiny_study(lab)
    assert trials_used(study) == 3
    interrupted = [t for t in study.trials if t.user_attrs.get("interrupted")]
    assert len(interrupted) == 1 and interrupted[0].user_attrs["worker_pid"] == victim
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    assert "RUNNING" not in {r.info.status for r in _mlflow_runs(lab)}

    # 2. Ctrl-C (SIGINT to the whole process group, as a terminal sends it) stops the parent and every worker
    write_sweep(lab, {**raw, "budget": {"trials": 5}})
    # Started with Ctrl-C's default disposition, as from a terminal: a test run in the background would otherwise
    # hand the sweep an ignored SIGINT, which archlab (as Python) then leaves ignored.
    proc = subprocess.Popen(cmd, cwd=lab, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for_a_training_worker(lab, proc)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # only if something outlived the test
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert _group_gone(proc.pid, within_s=15), "a process of the sweep outlived it"
    assert "RUNNING" not in {r.info.status for r in _mlflow_runs(lab)}

    # 3. a rerun completes the budget
    again = subprocess.run(cmd, cwd=lab, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    study = _tiny_study(lab)
    assert trials_used(study) == 5 and not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    assert "RUNNING" not in {r.info.status for r in _mlflow_runs(lab)}

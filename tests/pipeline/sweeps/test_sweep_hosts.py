"""One sweep over two "machines": two working copies that share nothing but a PostgreSQL study and an MLflow
tracking server. One is killed with SIGKILL mid-trial; nothing is lost, nothing repeated, the budget holds, and a
third copy that ran no trial rebuilds the report."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline.cli import main
from pipeline.sweeps.storage import open_storage, trials_used
from tests.conftest import REPO, tiny_project
from tests.pipeline.sweeps.test_sweep import MLP, sweep_dict

pytestmark = pytest.mark.slow

BUDGET = 6
SLOW_MLP = {**MLP, "name": "slow_mlp", "train": {**MLP["train"], "checkpoint_every_s": 0}}
SWEEP = sweep_dict(name="hosts", candidates={"mlp": {"spec": "slow_mlp", "space": {
    "train.optimizer.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}}}},
    budget={"trials": BUDGET, "epochs": 20})


def load(storage: str) -> optuna.Study:
    (name,) = optuna.get_all_study_names(open_storage(storage))
    return optuna.load_study(study_name=name, storage=open_storage(storage))


def machine(folder: Path) -> Path:
    tiny_project(folder, [SLOW_MLP])
    (folder / "specs" / "sweeps" / "hosts.yaml").write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    return folder


def sweep_cmd(storage: str, workers: int) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "sweep", "specs/sweeps/hosts.yaml", "--storage", storage,
            "--workers", str(workers)]


def kill_mid_trial(proc: subprocess.Popen, runs: Path) -> None:
    """SIGKILL once the host has checkpointed an epoch of a trial: no handler runs, its trial stays RUNNING."""
    deadline = time.time() + 120
    while time.time() < deadline and not list(runs.glob("trial-*/checkpoint.pt")):
        assert proc.poll() is None, "host A stopped before its first checkpoint"
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert list(runs.glob("trial-*/checkpoint.pt")), "host A never reached a checkpoint"


def test_two_hosts_share_one_sweep_and_a_killed_host_loses_nothing(tmp_path, monkeypatch, postgres_db,
                                                                   tracking_server):
    a, b, c = (machine(tmp_path / name) for name in ("host_a", "host_b", "host_c"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": tracking_server}
    host_a = subprocess.Popen(sweep_cmd(postgres_db, 1), cwd=a, env=env)
    host_b = subprocess.Popen(sweep_cmd(postgres_db, 2), cwd=b, env=env, start_new_session=True)
    try:
        kill_mid_trial(host_a, a / "runs/sweeps/hosts")
        study = load(postgres_db)
        # RUNNING, or already found dead and requeued by host B
        orphans = [t.number for t in study.get_trials() if t.user_attrs.get("worker_pid") == host_a.pid
                   and (t.state == TrialState.RUNNING or t.user_attrs.get("interrupted"))]
        assert len(orphans) == 1, "host A was killed between trials: nothing to recover"
        assert host_b.wait(timeout=180) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(host_b.pid, signal.SIGKILL)  # its workers too, if the test failed early
    # Host A comes back (in this process, to save a start): whatever its death left is finished, by B or by A.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    monkeypatch.chdir(a)
    assert main(sweep_cmd(postgres_db, 1)[3:]) == 0

    study = load(postgres_db)
    trials = study.get_trials()
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    counted = [t for t in trials if not t.user_attrs.get("interrupted")]
    assert trials_used(study) == BUDGET and len(counted) == BUDGET  # the budget held: no overrun, none lost
    assert all(t.state == TrialState.COMPLETE for t in counted)
    assert [t.number for t in interrupted] == orphans
    retry = next(t for t in counted if t.user_attrs.get("retry_of") == orphans[0])
    assert retry.params == interrupted[0].params
    # Each trial's files are on the one host that trained it (its retry may have moved to the other).
    held = [[h for h in (a, b) if (h / t.user_attrs["run_dir"] / "metrics.json").is_file()] for t in counted]
    assert all(len(hosts) == 1 for hosts in held) and [b] in held

    client = MlflowClient(tracking_server)
    runs = client.search_runs([client.get_experiment_by_name("sweeps/hosts").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]  # hosts starting at once share it
    children = [r for r in runs if "sweep.trial" in r.data.tags]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert not [r for r in runs if r.info.status == "RUNNING"]  # the killed host's run was closed or continued
    finished = sorted(int(r.data.tags["sweep.trial"]) for r in children if r.info.status == "FINISHED")
    assert finished == sorted(t.number for t in counted)  # one child run per trial, none twice

    # A machine that ran no trial rebuilds the report from the study alone, and fetches any trial's files
    # from the tracking server.
    monkeypatch.chdir(c)
    assert main(sweep_cmd(postgres_db, 1)[3:]) == 0
    assert not list(c.rglob("trial-*"))
    rebuilt = pd.read_csv(c / "reports/sweeps/hosts/trials.csv")
    assert rebuilt.drop(columns="duration_s").equals(
        pd.read_csv(a / "reports/sweeps/hosts/trials.csv").drop(columns="duration_s"))
    best = pd.read_csv(c / "reports/sweeps/hosts/best_per_architecture.csv").iloc[0]
    assert best["complete"] == BUDGET and best["params_total"] > 0 and best["flops_forward_per_sample"] > 0
    on_b = next(t for t, hosts in zip(counted, held) if hosts == [b])
    run_id = next(r.info.run_id for r in children if r.data.tags["sweep.trial"] == str(on_b.number))
    fetched = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="metrics.json",
                                                  dst_path=str(tmp_path / "fetched"), tracking_uri=tracking_server)
    local = b / on_b.user_attrs["run_dir"] / "metrics.json"
    assert json.loads(Path(fetched).read_text()) == json.loads(local.read_text())

"""Every command through a real MLflow tracking server (PostgreSQL backend store, artifact proxy), as a team
shares one: train, a resume that continues its run over HTTP, evaluate and compare."""
from __future__ import annotations

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.engine.train import train_experiment
from pipeline.specs.experiment import load_spec
from pipeline.data.prepare import load_prepared
from tests.conftest import tiny_project

pytestmark = pytest.mark.slow

SPEC = {"name": "served_mlp", "data": {"dataset": "tiny"}, "task": "classify", "model": {"kind": "mlp", "hidden": [16]},
        "train": {"epochs": 4, "batch_size": 32, "checkpoint_every_s": 0}}


class Stop(Exception):
    """Stands for a kill after epoch 2 (the checkpoint of epoch 2 is on disk)."""


def stop_at_2(epoch, row):
    if epoch == 2:
        raise Stop


def test_train_resume_evaluate_and_compare_through_a_tracking_server(tmp_path, monkeypatch, tracking_server):
    project = tiny_project(tmp_path, [SPEC])
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    spec_file = "specs/served_mlp.yaml"
    with pytest.raises(Stop):
        train_experiment(load_spec(spec_file), spec_file, load_prepared("data/prepared/tiny"), "runs/served_mlp/seed-0",
                         tracking_server, callbacks=[stop_at_2], progress=False)
    assert main(["train", spec_file, "--seed", "0"]) == 0  # resumes epoch 3 from the checkpoint, in the same run
    assert main(["evaluate", spec_file, "--seed", "0"]) == 0
    assert main(["compare", "served_mlp"]) == 0

    client = MlflowClient(tracking_server)
    exp = client.get_experiment_by_name("tiny/classify")
    (run,) = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'served_mlp'")
    metrics = json.loads((project / "runs/served_mlp/seed-0/metrics.json").read_text())
    assert run.info.run_id == metrics["mlflow_run_id"] and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]
    assert run.data.metrics["test/accuracy"] == json.loads((project / "runs/served_mlp/seed-0/eval.json").read_text())[
        "test"]["accuracy"]
    # Artifacts went through the server's proxy: a machine without this run folder downloads them.
    fetched = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="metrics.json",
                                                  dst_path=str(tmp_path / "fetched"), tracking_uri=tracking_server)
    assert json.loads(open(fetched).read()) == metrics
    (report,) = client.search_runs([client.get_experiment_by_name("archlab/compare").experiment_id])
    assert "leaderboard.csv" in {a.path for a in client.list_artifacts(report.info.run_id)}

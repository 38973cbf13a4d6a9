"""MLflow: one run per experiment with params, per-epoch curves and tags; evaluate and resume reuse the run."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipeline.engine.evaluate import evaluate_run
from pipeline.specs.experiment import ExperimentSpec
from pipeline.engine.train import train_experiment
from tests.conftest import tiny_classification


def spec(epochs: int = 4) -> ExperimentSpec:
    return ExperimentSpec.model_validate({
        "name": "tracked", "data": {"dataset": "tiny"}, "task": "classify",
        "model": {"kind": "mlp", "hidden": [16]},
        "train": {"epochs": epochs, "batch_size": 32, "checkpoint_every_s": 0}})


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_a_run_holds_params_curves_tags_artifacts_and_test_metrics(tmp_path, store):
    spec_file = tmp_path / "tracked.yaml"
    spec_file.write_text("name: tracked\n")
    data = tiny_classification()
    metrics = train_experiment(spec(), spec_file, data, tmp_path / "run", store, progress=False)
    evaluate_run(spec(), data, tmp_path / "run", store)

    client = MlflowClient(store)
    run = client.get_run(metrics["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "tiny/classify"
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["model.hidden"] == "[16]" and run.data.params["train.optimizer.name"] == "adamw"
    assert run.data.tags["kind"] == "mlp" and run.data.tags["dataset"] == "tiny"
    assert run.data.tags["spec_hash"] == spec().spec_hash() and "git_commit" in run.data.tags
    curve = client.get_metric_history(run.info.run_id, "val/loss")
    assert [m.step for m in curve] == [1, 2, 3, 4]
    assert run.data.metrics["test/accuracy"] > 0.5
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"history.csv", "metrics.json", "checkpoint.pt", "tracked.yaml", "eval.json"} <= artifacts


def test_a_resumed_run_continues_the_same_mlflow_run(tmp_path, store):
    class Stop(Exception):
        pass

    def stop_at_2(epoch, row):
        if epoch == 2:
            raise Stop

    spec_file = tmp_path / "tracked.yaml"
    spec_file.write_text("name: tracked\n")
    data = tiny_classification()
    with pytest.raises(Stop):
        train_experiment(spec(), spec_file, data, tmp_path / "run", store, callbacks=[stop_at_2], progress=False)
    metrics = train_experiment(spec(), spec_file, data, tmp_path / "run", store, progress=False)

    client = MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.run_id == metrics["mlflow_run_id"]
    steps = [m.step for m in client.get_metric_history(metrics["mlflow_run_id"], "train/loss")]
    assert steps == [1, 2, 3, 4]

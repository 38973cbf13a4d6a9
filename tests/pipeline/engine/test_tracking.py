"""MLflow: one run per experiment with params, per-epoch curves, standard fields and a loadable model;
evaluate adds to the run without moving its times; an interrupted run is KILLED and continued by the rerun."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.engine.evaluate import evaluate_run
from pipeline.engine.tracking import spec_params
from pipeline.ui import training_runs_urls
from pipeline.specs.experiment import ExperimentSpec
from pipeline.engine.train import train_experiment
from tests.conftest import tiny_classification


def spec(epochs: int = 4, checkpoint_every_s: float = 0) -> ExperimentSpec:
    return ExperimentSpec.model_validate({
        "name": "tracked", "description": "a long description that is prose, not a param", "data": {"dataset": "tiny"},
        "task": "classify", "model": {"kind": "mlp", "hidden": [16]},
        "train": {"epochs": epochs, "batch_size": 32, "checkpoint_every_s": checkpoint_every_s}})


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "tracked.yaml"
    path.write_text("name: tracked\n")
    return path


def test_a_run_holds_params_curves_standard_fields_artifacts_and_test_metrics(tmp_path, store, spec_file):
    data = tiny_classification()
    metrics = train_experiment(spec(), spec_file, data, tmp_path / "run", store, progress=False)
    client = MlflowClient(store)
    trained = client.get_run(metrics["mlflow_run_id"]).info
    evaluate_run(spec(), data, tmp_path / "run", store)

    run = client.get_run(metrics["mlflow_run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "tiny/classify"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI shows training runs
    assert f"  tiny/classify: http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?workflowType=" \
           "machine_learning" in training_runs_urls(store, 5000)
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    # evaluation added its metrics but the run's times still describe the training
    assert (run.info.start_time, run.info.end_time) == (trained.start_time, trained.end_time)
    assert run.data.params["model.hidden"] == "[16]" and run.data.params["train.optimizer.name"] == "adamw"
    assert "description" not in run.data.params
    assert run.data.tags["mlflow.note.content"] == spec().description
    assert run.data.tags["kind"] == "mlp" and run.data.tags["dataset"] == "tiny"
    assert run.data.tags["mlflow.source.name"] == str(spec_file) and run.data.tags["mlflow.user"]
    assert run.data.tags["mlflow.source.git.commit"]
    [dataset] = run.inputs.dataset_inputs
    assert dataset.dataset.name == "tiny" and json.loads(dataset.dataset.profile)["input_shape"] == [8]
    # cost numbers are params (a runs-table column), not one-point curves
    assert int(run.data.params["cost.params_total"]) == metrics_params(tmp_path)
    assert not any(k.startswith("cost") for k in run.data.metrics)
    curve = client.get_metric_history(run.info.run_id, "val/loss")
    assert [m.step for m in curve] == [1, 2, 3, 4]
    assert run.data.metrics["test/accuracy"] > 0.5
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"history.csv", "metrics.json", "checkpoint.pt", "tracked.yaml", "eval.json"} <= artifacts


def metrics_params(tmp_path) -> int:
    return json.loads((tmp_path / "run" / "cost.json").read_text())["params_total"]


PREDICT = """
import sys, json, numpy as np, mlflow
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(f"runs:/{sys.argv[2]}/model")
logits = model.predict(np.load(sys.argv[3]))
print(json.dumps({"accuracy": float((logits.argmax(1) == np.load(sys.argv[4])).mean()), "shape": list(logits.shape)}))
"""


def test_the_logged_model_loads_through_pyfunc_in_a_fresh_process_and_scores_the_test_metric(tmp_path, store,
                                                                                             spec_file):
    data = tiny_classification()
    metrics = train_experiment(spec(), spec_file, data, tmp_path / "run", store, progress=False)
    result = evaluate_run(spec(), data, tmp_path / "run", store)
    np.save(tmp_path / "x.npy", data.tensors["test_x"].numpy())
    np.save(tmp_path / "y.npy", data.tensors["test_y"].numpy())
    out = subprocess.run([sys.executable, "-c", PREDICT, store, metrics["mlflow_run_id"], str(tmp_path / "x.npy"),
                          str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    served = json.loads(out.stdout.strip().splitlines()[-1])
    assert served["shape"] == [len(data.tensors["test_x"]), 3]
    assert served["accuracy"] == pytest.approx(result["test"]["accuracy"])
    model_info = MlflowClient(store).get_run(metrics["mlflow_run_id"]).outputs.model_outputs
    assert len(model_info) == 1


def test_a_resumed_run_continues_the_same_mlflow_run(tmp_path, store, spec_file):
    class Stop(Exception):
        pass

    def stop_at_2(epoch, row):
        if epoch == 2:
            raise Stop

    data = tiny_classification()
    with pytest.raises(Stop):
        train_experiment(spec(), spec_file, data, tmp_path / "run", store, callbacks=[stop_at_2], progress=False)
    client = MlflowClient(store)
    [failed] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert failed.info.status == "FAILED"  # a crash archlab lives to see leaves no run RUNNING
    metrics = train_experiment(spec(), spec_file, data, tmp_path / "run", store, progress=False)

    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.run_id == metrics["mlflow_run_id"]
    steps = [m.step for m in client.get_metric_history(metrics["mlflow_run_id"], "train/loss")]
    assert steps == [1, 2, 3, 4]


def test_ctrl_c_before_the_first_checkpoint_marks_the_run_killed_and_the_rerun_continues_it(tmp_path, store,
                                                                                          spec_file):
    def interrupt(epoch, row):
        raise KeyboardInterrupt

    data = tiny_classification()
    slow_checkpoints = spec(checkpoint_every_s=3600)  # no checkpoint after epoch 0's before the last epoch
    with pytest.raises(KeyboardInterrupt):
        train_experiment(slow_checkpoints, spec_file, data, tmp_path / "run", store, callbacks=[interrupt],
                         progress=False)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["state"]
    assert state["epoch"] == 0 and state["run_id"]  # the start's checkpoint: nothing trained, the run id kept
    client = MlflowClient(store)
    [killed] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert killed.info.status == "KILLED"
    assert client.get_metric_history(killed.info.run_id, "train/loss") == []  # the lost epoch is not kept

    metrics = train_experiment(slow_checkpoints, spec_file, data, tmp_path / "run", store, progress=False)
    assert metrics["mlflow_run_id"] == killed.info.run_id
    run = client.get_run(killed.info.run_id)
    assert run.info.status == "FINISHED" and len(run.inputs.dataset_inputs) == 1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]


def test_params_are_short_a_cnn_layer_list_is_spread_over_indexed_keys():
    params = spec_params({"description": "prose", "model": {"kind": "cnn", "layers": [
        {"type": "conv", "channels": 16, "kernel": 3}, {"type": "pool", "size": 2}], "hidden": [64, 32]}})
    assert params == {"model.kind": "cnn", "model.layers.0.type": "conv", "model.layers.0.channels": "16",
                      "model.layers.0.kernel": "3", "model.layers.1.type": "pool", "model.layers.1.size": "2",
                      "model.hidden": "[64, 32]"}


def _log_the_same_dataset(uri: str, run_ids: list[str], barrier, failures) -> None:
    """One of two processes: in each round, log the round's dataset to this process's run at the same moment as
    the other process does to its own."""
    from pipeline.engine.tracking import Tracker
    from tests.conftest import data_meta
    for round_, run_id in enumerate(run_ids):
        tracker = Tracker(uri, f"race-{round_}", run_id=run_id)
        barrier.wait()
        try:
            tracker.log_dataset(data_meta(name="digits", content_hash=f"hash{round_}"))
        except Exception as err:  # noqa: BLE001 - reported to the test, which names it
            failures.put(f"round {round_}: {type(err).__name__}: {err}"[:300])


@pytest.mark.slow
def test_seeds_logging_the_same_dataset_at_the_same_moment_both_get_it(store):
    """Seeds trained side by side log the same new dataset at once; MLflow's store looks the row up, then
    inserts it, so one of them used to fail on the unique constraint and take its seed down with it."""
    import multiprocessing
    client = MlflowClient(store)
    rounds = 12
    runs = [[client.create_run(client.create_experiment(f"race-{r}")).info.run_id for r in range(rounds)]]
    runs.append([client.create_run(client.get_experiment_by_name(f"race-{r}").experiment_id).info.run_id
                 for r in range(rounds)])
    ctx = multiprocessing.get_context("spawn")
    barrier, failures = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_log_the_same_dataset, args=(store, ids, barrier, failures)) for ids in runs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    errors = [failures.get() for _ in range(failures.qsize())]
    assert not errors and all(p.exitcode == 0 for p in procs), errors
    for ids in runs:
        for r, run_id in enumerate(ids):
            [dataset] = client.get_run(run_id).inputs.dataset_inputs
            assert dataset.dataset.digest == f"hash{r}"

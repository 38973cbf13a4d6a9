"""Data without a validation split (`split: {val_fraction: 0}`): a run trains on every non-test example,
evaluates and reports; a spec that needs validation data is refused with exit 2, naming the field, before
anything is written."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from pipeline.cli import main
from pipeline.data.prepare import build_arrays
from pipeline.engine.evaluate import evaluate_run
from pipeline.engine.train import Trainer, train_experiment
from pipeline.reports.compare import compare
from pipeline.specs.datasets import BUILTIN_DATASETS, SplitSpec
from pipeline.specs.experiment import ExperimentSpec
from tests.conftest import files_under

NO_VAL = BUILTIN_DATASETS["digits"].model_copy(update={"split": SplitSpec(val_fraction=0)})
SPEC = {"name": "all_train", "data": {"dataset": "digits_all"}, "task": "classify",
        "model": {"kind": "mlp", "hidden": [32]},
        "train": {"epochs": 3, "batch_size": 64, "seed": 0, "checkpoint_every_s": 0, "optimizer": {"lr": 0.01}}}


def spec_of(**train) -> ExperimentSpec:
    return ExperimentSpec.model_validate({**SPEC, "train": {**SPEC["train"], **train}})


@pytest.fixture(scope="module")
def no_val_data():
    import torch

    from pipeline.data.prepare import Prepared
    arrays, meta = build_arrays("digits_all", NO_VAL)
    return Prepared(meta=meta, tensors={k: torch.from_numpy(v) for k, v in arrays.items()})


def test_a_run_without_validation_trains_evaluates_and_reports(no_val_data, tmp_path):
    spec, runs = spec_of(), tmp_path / "runs"
    run_dir = runs / "all_train"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    metrics = train_experiment(spec, tmp_path / "spec.yaml", no_val_data, run_dir, tracking_uri=None, progress=False)
    assert metrics["status"] == "finished" and metrics["epochs"] == 3
    header = (run_dir / "history.csv").read_text().splitlines()[0].split(",")
    assert [c for c in header if c.startswith(("train/", "val/"))] == ["train/loss", "train/accuracy"]
    assert metrics["best_epoch"] == 3 and metrics["best"] == metrics["final"]  # the best epoch is the last
    assert metrics["final"]["train/accuracy"] > 0.8
    overfitting = json.loads((run_dir / "diagnostics.json").read_text())["overfitting"]
    assert overfitting["verdict"] == "n/a" and "no validation split" in overfitting["rule"]
    cost = json.loads((run_dir / "cost.json").read_text())
    assert cost["infer_samples_per_s"] > 0  # timed on training examples

    evaluation = evaluate_run(spec, no_val_data, run_dir, None)
    assert evaluation["test"]["accuracy"] > 0.8 and len(no_val_data.tensors["test_y"]) == 270

    frame = compare(["all_train"], runs, tmp_path / "reports")
    row = frame.iloc[0]
    assert math.isclose(row["test_metric"], evaluation["test"]["accuracy"])
    assert row["val_metric"] is None or math.isnan(row["val_metric"])
    md = (tmp_path / "reports" / "comparison.md").read_text()
    leaderboard = next(line for line in md.splitlines() if line.startswith("| 1 | all_train | mlp |"))
    assert "| — | — → — | [n/a]" in leaderboard  # val accuracy, its gap, and the verdict


def test_early_stopping_on_a_training_metric_still_works_without_validation(no_val_data, tmp_path):
    spec = spec_of(epochs=30, early_stopping={"monitor": "train/loss", "mode": "min", "patience": 1,
                                              "min_delta": 10.0})
    metrics = Trainer(spec, no_val_data, tmp_path, progress=False).run()
    assert metrics["status"] == "early_stopped" and metrics["epochs"] == 2


# ── what needs validation data is refused: exit 2, the field named, nothing written ──────────────────
@pytest.fixture
def no_val_project(project):
    """The repo's project with dataset `digits_all` declared without a validation split."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["datasets"]["digits_all"] = {"source": "digits", "split": {"val_fraction": 0}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    return project


def refused(args: list[str], field: str, capsys, project) -> str:
    before = files_under(project)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and field in err and "val_fraction is 0" in err, err
    assert files_under(project) == before  # no prepared data, no run, no study, no report
    return err


@pytest.mark.parametrize("train, field", [
    ({"early_stopping": {"patience": 2}}, "train.early_stopping.monitor"),  # its default monitor is val/loss
    ({"early_stopping": {"monitor": "val/accuracy", "mode": "max"}}, "train.early_stopping.monitor"),
])
def test_early_stopping_on_validation_is_refused(no_val_project, capsys, train, field):
    (no_val_project / "t.yaml").write_text(yaml.safe_dump({**SPEC, "train": {**SPEC["train"], **train}}))
    refused(["train", "t.yaml", "--no-track"], field, capsys, no_val_project)
    refused(["validate", "t.yaml"], field, capsys, no_val_project)


def test_a_split_seed_is_refused(no_val_project, capsys):
    (no_val_project / "t.yaml").write_text(yaml.safe_dump({**SPEC, "data": {"dataset": "digits_all",
                                                                            "split_seed": 1}}))
    refused(["train", "t.yaml", "--no-track"], "data.split_seed", capsys, no_val_project)


def test_a_trainer_given_a_split_seed_directly_stops_with_the_field_named(no_val_data, tmp_path):
    from pipeline.specs.errors import UserError
    spec = ExperimentSpec.model_validate({**SPEC, "data": {"dataset": "digits_all", "split_seed": 1}})
    with pytest.raises(UserError) as err:
        Trainer(spec, no_val_data, tmp_path / "run", progress=False)
    assert err.value.field == "data.split_seed" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("entry_vary", [True, False])
def test_vary_split_is_refused(no_val_project, capsys, entry_vary):
    params = yaml.safe_load((no_val_project / "params.yaml").read_text())
    if entry_vary:
        params["experiments"]["all_train"] = {"dataset": "digits_all", "vary": "split"}
    else:
        params["vary"] = "split"
    (no_val_project / "params.yaml").write_text(yaml.safe_dump(params))
    (no_val_project / "specs" / "all_train.yaml").write_text(yaml.safe_dump(SPEC))
    field = "experiments.all_train.vary" if entry_vary else "params.yaml: vary"
    refused(["train", "specs/all_train.yaml", "--no-track"], field, capsys, no_val_project)


def test_a_sweep_is_refused(no_val_project, capsys):
    (no_val_project / "specs" / "all_train.yaml").write_text(yaml.safe_dump(SPEC))
    sweep = {"name": "no_val_sweep", "candidates": {"mlp": {"spec": "all_train", "space": {
                 "train.optimizer.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}}}},
             "objective": {"metric": "val/accuracy", "direction": "maximize"},
             "sampler": {"name": "random"}, "pruner": {"name": "none"}, "budget": {"trials": 2, "epochs": 1}}
    (no_val_project / "specs" / "sweeps" / "no_val_sweep.yaml").write_text(yaml.safe_dump(sweep))
    refused(["sweep", "specs/sweeps/no_val_sweep.yaml", "--no-track"], "objective.metric", capsys, no_val_project)


# ── tasks that show examples each epoch take training ones ──────────────────────────────────────────
def prepared_without_validation(tmp_path, name: str, source):
    from pipeline.data.prepare import load_prepared, write_prepared
    arrays, meta = build_arrays(name, source.model_copy(update={"split": SplitSpec(val_fraction=0)}))
    write_prepared(arrays, meta, tmp_path / name)
    return load_prepared(tmp_path / name)


@pytest.mark.parametrize("task, model", [
    ("reconstruct", {"kind": "autoencoder", "variant": "vae", "latent": 4, "hidden": [16]}),
    ("generate", {"kind": "gan", "latent": 8, "hidden": [32]}),
])
def test_sample_grids_show_training_examples(tmp_path, task, model):
    data = prepared_without_validation(tmp_path, "digits_all", BUILTIN_DATASETS["digits"])
    spec = ExperimentSpec.model_validate({**SPEC, "task": task, "model": model, "train": {"epochs": 1}})
    metrics = Trainer(spec, data, tmp_path / "run", progress=False).run()
    assert metrics["status"] == "finished" and metrics["best_epoch"] == 1
    assert not any(k.startswith("val/") for k in metrics["final"])
    assert (tmp_path / "run" / "samples" / "epoch_001.png").is_file()
    if task == "generate":  # its feature classifier, trained on the training split, has no validation score
        from pipeline.engine.quality import cache_paths
        assert evaluate_run(spec, data, tmp_path / "run", None)["test"]["fid"] >= 0
        report = json.loads(cache_paths(data.meta.prepared_dir)[1].read_text())
        assert report["val_accuracy"] is None and report["test_accuracy"] > 0.5


def test_a_language_model_samples_from_a_training_prompt(tmp_path):
    from pipeline.specs.datasets import CorpusSource
    data = prepared_without_validation(tmp_path, "text", CorpusSource(source="corpus", characters=3000, context=16))
    spec = ExperimentSpec.model_validate({**SPEC, "data": {"dataset": "text"}, "task": "lm", "train": {"epochs": 1},
                                          "model": {"kind": "transformer", "shape": "decoder", "d_model": 16,
                                                    "heads": 2, "layers": 1}})
    metrics = Trainer(spec, data, tmp_path / "run", progress=False).run()
    assert metrics["best"] == metrics["final"] and "train/bits_per_char" in metrics["final"]
    assert (tmp_path / "run" / "samples.txt").read_text().startswith("=== epoch 1 ===")


def test_a_claim_measured_on_the_validation_metric_is_refused(no_val_project, capsys):
    claim = {"claim": "ReLU learns faster.", "seeds": 1,
             "base": {"data": {"dataset": "digits_all"}, "task": "classify", "model": {"kind": "mlp", "hidden": [16]},
                      "train": {"epochs": 1}},
             "variants": {"relu": {}, "tanh": {"model.activation": "tanh"}},
             "expect": [{"rule": "compare", "a": "relu", "b": "tanh", "expect": "better", "measure": "epochs_to:0.9"}]}
    (no_val_project / "claims").mkdir()
    (no_val_project / "claims" / "faster.yaml").write_text(yaml.safe_dump(claim))
    refused(["claims", "--claims", "claims", "--data", "cdata", "--runs", "cruns", "--out", "creports", "--no-track"],
            "expect[0].measure", capsys, no_val_project)


def test_a_tracked_run_without_validation_logs_training_metrics_only(no_val_data, tmp_path):
    from mlflow.tracking import MlflowClient
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    metrics = train_experiment(spec_of(epochs=1), tmp_path / "spec.yaml", no_val_data, tmp_path / "run", store,
                               progress=False)
    run = MlflowClient(store).get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["diagnostics/verdict"] == "n/a"
    assert "train/accuracy" in run.data.metrics and not any(k.startswith("val/") for k in run.data.metrics)


def test_archlab_train_prepares_the_data_without_validation_and_says_so(no_val_project, capsys):
    (no_val_project / "specs" / "all_train.yaml").write_text(yaml.safe_dump(SPEC))
    assert main(["train", "specs/all_train.yaml", "--no-track", "--evaluate"]) == 0
    out = capsys.readouterr().out
    assert "all_train seed 0: finished after 3 epochs, no validation split, test/accuracy=" in out, out
    meta = json.loads((no_val_project / "data/prepared/digits_all/meta.json").read_text())
    assert meta["sizes"]["val"] == 0 and meta["spec"]["split"]["val_fraction"] == 0

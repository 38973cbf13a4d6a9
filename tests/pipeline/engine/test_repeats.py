"""Repeats: params.yaml's seeds, the seeds' specs, the re-drawn split, per-example records that add up to the
reported metric, and the mistakes a user can make about them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.data.prepare import redraw_split
from pipeline.engine.checkpoints import seed_dir
from pipeline.engine.evaluate import evaluate_run
from pipeline.engine.examples import metric_from_records, read_records
from pipeline.engine.repeats import is_done, seed_spec, worker_plan
from pipeline.engine.train import train_experiment
from pipeline.specs.config import load_config
from pipeline.specs.experiment import ExperimentSpec
from tests.conftest import files_under, tiny_classification


def test_plain_and_mapping_entries_and_the_project_default(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seeds: 3\nvary: split\nexperiments:\n  a: digits\n  b: {dataset: digits, seeds: 5, vary: init}\n"
                    "comparisons:\n  - [a, b]\n")
    config = load_config(path)
    assert config.dataset_of("a") == "digits" and config.seed_list("a") == [0, 1, 2]
    assert config.seed_list("b", base=10) == [10, 11, 12, 13, 14]
    assert config.vary_of("a") == "split" and config.vary_of("b") == "init"
    assert config.comparisons == [("a", "b")]


@pytest.mark.parametrize("params, words", [
    ("seeds: 0\n", "params.yaml: seeds: Input should be greater than 0"),
    ("experiments:\n  a: {dataset: digits, seeds: 2, vary: data}\n", "experiments.a.vary: Input should be 'init' or 'split'"),
    ("experiments:\n  a: digits\ncomparisons:\n  - [a, nope]\n", "comparisons[0] names nope, not under `experiments`"),
    ("experiments:\n  a: digits\ncomparisons:\n  - [a, a]\n", "compares a with itself"),
    ("equivalence: {accuracy: -0.1}\n", "equivalence.accuracy: Input should be greater than 0"),
])
def test_bad_repeats_in_params_exit_2_naming_the_field(params, words, project, capsys):
    (project / "params.yaml").write_text(params)
    assert main(["compare", "--no-track"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err


@pytest.mark.parametrize("args, words", [(["--seed", "-1"], "--seed must be at least 0, got -1"),
                                         (["--workers", "0"], "--workers must be at least 1, got 0")])
def test_bad_seed_options_exit_2_and_write_nothing(args, words, project, capsys):
    before = files_under(project)
    assert main(["train", "specs/digits_mlp.yaml", "--no-track", *args]) == 2
    assert words in capsys.readouterr().err
    assert files_under(project) == before


@pytest.mark.parametrize("args, flag", [(["--out", "x"], "--out"), (["--data", "d"], "--data"), (["--seed", "0"], "--seed"),
                                        (["--restart"], "--restart"), (["--nproc", "2"], "--nproc")])
def test_options_for_one_experiment_without_a_spec_exit_2_and_write_nothing(args, flag, project, capsys):
    before = files_under(project)
    assert main(["train", "--no-track", *args]) == 2
    err = capsys.readouterr().err
    assert f"{flag}: {flag} applies to one experiment; name its spec" in err and "Traceback" not in err, err
    assert files_under(project) == before


def test_without_a_spec_a_bad_experiment_anywhere_in_params_trains_nothing(project, capsys):
    (project / "params.yaml").write_text("experiments:\n  digits_mlp: digits\n  nope: digits\n")
    before = files_under(project)
    assert main(["train", "--no-track"]) == 2
    assert "specs/nope.yaml: file not found" in capsys.readouterr().err
    assert files_under(project) == before  # not even digits_mlp's data, though its spec comes first


def test_without_a_spec_every_experiment_trains_over_its_seeds_in_one_pool(project, capsys):
    """Two experiments, three seeds in all, two workers: each seed lands in its own run folder, and a second
    call finds them all done."""
    for name, hidden in (("a", "[8]"), ("b", "[]")):
        (project / "specs" / f"{name}.yaml").write_text(
            f"name: {name}\ndata: {{dataset: digits}}\ntask: classify\nmodel: {{kind: mlp, hidden: {hidden}}}\n"
            "train: {epochs: 1, checkpoint_every_s: 0}\n")
    (project / "params.yaml").write_text("experiments:\n  a: {dataset: digits, seeds: 2}\n  b: digits\n")
    assert main(["train", "--no-track", "--evaluate", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    for name, seed in (("a", 0), ("a", 1), ("b", 0)):
        assert f"{name} seed {seed}: finished after 1 epochs" in out
        assert json.loads((project / "runs" / name / f"seed-{seed}" / "eval.json").read_text())["seed"] == seed
    assert not (project / "runs" / "b" / "seed-1").exists()
    assert main(["train", "--no-track", "--evaluate"]) == 0
    out = capsys.readouterr().out
    assert "a: seeds [0, 1] already done for this spec, skipped" in out and "b: seeds [0] already done" in out


def test_a_dataset_prepared_anew_trains_its_experiments_again(project, capsys):
    """Runs are done only for the data they trained on: params.yaml changing the dataset retrains them."""
    (project / "specs" / "a.yaml").write_text("name: a\ndata: {dataset: digits}\ntask: classify\n"
                                              "model: {kind: mlp, hidden: []}\ntrain: {epochs: 1}\n")
    (project / "params.yaml").write_text("experiments:\n  a: digits\n")
    assert main(["train", "--no-track"]) == 0
    metrics = project / "runs" / "a" / "seed-0" / "metrics.json"
    first = json.loads(metrics.read_text())["data_hash"]
    assert main(["train", "--no-track"]) == 0 and "a: seeds [0] already done" in capsys.readouterr().out
    (project / "params.yaml").write_text("datasets:\n  digits: {source: digits, split: {seed: 1}}\n"
                                         "experiments:\n  a: digits\n")
    assert main(["train", "--no-track"]) == 0
    out = capsys.readouterr().out
    assert "already done" not in out and "a seed 0: finished" in out
    assert json.loads(metrics.read_text())["data_hash"] not in (first, None)


def test_a_declared_pair_across_groups_exits_2(project, capsys):
    (project / "params.yaml").write_text("experiments:\n  a: digits\n  b: diabetes\ncomparisons:\n  - [a, b]\n")
    for name, dataset, task in (("a", "digits", "classify"), ("b", "diabetes", "regress")):
        folder = project / "runs" / name / "seed-0"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"dataset": dataset, "task": task, "status": "finished"}))
    assert main(["compare", "--no-track"]) == 2
    assert "params.yaml: comparisons[0]: a (digits/classify) and b (diabetes/regress) differ" in capsys.readouterr().err


def test_a_seed_changes_the_training_seed_and_with_vary_split_the_split():
    spec = ExperimentSpec.model_validate({"name": "t", "data": {"dataset": "tiny"}, "task": "classify",
                                          "model": {"kind": "mlp", "hidden": []}, "train": {"seed": 7}})
    assert seed_spec(spec, 8, False).train.seed == 8 and seed_spec(spec, 8, False).data.split_seed is None
    assert seed_spec(spec, 8, True).data.split_seed == 8
    assert len({seed_spec(spec, s, v).spec_hash() for s in (8, 9) for v in (False, True)}) == 4


def test_redrawn_split_keeps_the_test_set_and_the_sizes():
    data = tiny_classification(n=120)
    a, b = redraw_split(data, 1), redraw_split(data, 2)
    for part in ("train", "val"):
        assert len(a.tensors[f"{part}_x"]) == len(data.tensors[f"{part}_x"])
    assert torch.equal(a.tensors["test_x"], data.tensors["test_x"])
    assert not torch.equal(a.tensors["val_x"], b.tensors["val_x"])
    pooled = torch.cat([data.tensors["train_x"], data.tensors["val_x"]])
    redrawn = torch.cat([a.tensors["train_x"], a.tensors["val_x"]])
    assert sorted(map(tuple, pooled.tolist())) == sorted(map(tuple, redrawn.tolist()))  # the same examples


def test_worker_plan_never_oversubscribes(monkeypatch):
    monkeypatch.setattr("pipeline.engine.repeats.available_cores", lambda: 8)
    assert worker_plan(3, None) == (3, 2)
    assert worker_plan(20, None) == (8, 1)
    assert worker_plan(20, 2) == (2, 4)
    assert worker_plan(1, None) == (1, 8)


@pytest.mark.parametrize("task, model, metric", [("classify", {"kind": "mlp", "hidden": [16]}, "accuracy"),
                                                 ("regress", {"kind": "mlp", "hidden": [16]}, "r2"),
                                                 ("reconstruct", {"kind": "autoencoder", "variant": "ae"}, "mse")])
def test_per_example_records_add_up_to_the_reported_metric(task, model, metric, tmp_path):
    data = tiny_classification()
    if task == "regress":
        data.meta = data.meta.model_copy(update={"target": "value", "output_size": 1,
                                                 "normalisation": {"y_mean": [0.0], "y_std": [2.0]}})
        for part in ("train", "val", "test"):
            data.tensors[f"{part}_y"] = data.tensors[f"{part}_x"][:, :1].clone()
    spec = ExperimentSpec.model_validate({"name": "t", "data": {"dataset": "tiny"}, "task": task, "model": model,
                                          "train": {"epochs": 2, "batch_size": 32, "checkpoint_every_s": 0}})
    run_dir = seed_dir(tmp_path, 0)
    train_experiment(spec, "t.yaml", data, run_dir, None, progress=False)
    data_hash = data.meta.content_hash
    assert not is_done(spec, run_dir, evaluate=True, data_hash=data_hash)  # trained, not yet evaluated
    result = evaluate_run(spec, data, run_dir, None)
    assert is_done(spec, run_dir, evaluate=True, data_hash=data_hash)
    assert not is_done(spec, run_dir, evaluate=True, data_hash="prepared-anew")
    records = read_records(run_dir / result["records"])
    every = np.arange(len(data.tensors["test_x"]))[None]
    assert metric_from_records(task, records, every)[0] == pytest.approx(result["test"][metric], rel=1e-5)


def test_vary_split_trains_each_seed_on_its_own_split(tmp_path):
    from pipeline.engine.train import Trainer
    data = tiny_classification(n=120)
    spec = ExperimentSpec.model_validate({"name": "t", "data": {"dataset": "tiny"}, "task": "classify",
                                          "model": {"kind": "mlp", "hidden": []}, "train": {"epochs": 1}})
    same = [Trainer(seed_spec(spec, s, False), data, tmp_path / f"i{s}", progress=False) for s in (0, 1)]
    split = [Trainer(seed_spec(spec, s, True), data, tmp_path / f"s{s}", progress=False) for s in (0, 1)]
    assert torch.equal(same[0].val_x, same[1].val_x) and torch.equal(same[0].val_x, data.tensors["val_x"])
    assert not torch.equal(split[0].val_x, split[1].val_x)
    assert len(split[0].val_x) == len(data.tensors["val_x"])


def test_every_task_that_keeps_records_records_them_itself():
    """A task that says it keeps per-example records must define how (not inherit the empty default)."""
    from pipeline.engine.tasks import TASKS
    from pipeline.engine.tasks.base import TaskDefaults
    keeping = {name for name, make in TASKS.items() if make().keeps_records}
    assert keeping == {"classify", "regress", "seq2seq", "lm", "reconstruct", "mlm"}
    assert all(TASKS[name].example_records is not TaskDefaults.example_records for name in keeping)

"""Evaluation on shifted inputs (spec field evaluate.shifts → eval.json's test.shifted_accuracy)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from pipeline.engine.evaluate import evaluate_run
from pipeline.engine.repeats import is_done
from pipeline.engine.tasks.classify import shifted, shifted_accuracy
from pipeline.engine.train import train_experiment
from pipeline.specs.experiment import EvaluateSpec, ExperimentSpec
from tests.conftest import tiny_classification, validate_error, write_spec
from tests.pipeline.data.test_data import declare


def test_a_shift_moves_values_along_the_last_axis_and_fills_zeros_without_wrapping():
    x = torch.arange(1.0, 6.0).expand(2, 3, 5)  # (N, C, L): 1 2 3 4 5 in every channel
    assert torch.equal(shifted(x, 0), x)
    assert shifted(x, 2)[0, 0].tolist() == [0, 0, 1, 2, 3]
    assert shifted(x, -2)[0, 0].tolist() == [3, 4, 5, 0, 0]
    assert torch.equal(shifted(x, 5), torch.zeros_like(x))
    image = torch.arange(4.0).reshape(1, 1, 2, 2)  # (N, C, H, W): only W moves
    assert shifted(image, 1)[0, 0].tolist() == [[0, 0], [0, 2]]


class ReadsOnePosition(nn.Module):
    """Class 1 where the signal is positive at one position, else 0: a model that looks at nothing else."""

    def __init__(self, position: int):
        super().__init__()
        self.position = position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, self.position]
        return torch.stack([-v, v], dim=1)  # (B, 2)


def test_a_shift_changes_what_a_model_reading_one_position_sees():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 10, generator=g)
    y = (x[:, 4] > 0).long()
    scores = shifted_accuracy(ReadsOnePosition(4), x, y, [0, 1, 3])
    assert scores["0"] == 1.0  # what it reads, unmoved
    assert scores["1"] == pytest.approx(0.5, abs=0.05) and scores["3"] == pytest.approx(0.5, abs=0.05)
    # +k and -k averaged: the value read comes from position 4 - k, then from 4 + k
    right = ((shifted(x, 1)[:, 4] > 0).long() == y).float().mean().item()
    left = ((shifted(x, -1)[:, 4] > 0).long() == y).float().mean().item()
    assert scores["1"] == (right + left) / 2


def spec(shifts: list[int] | None = None) -> ExperimentSpec:
    fields = {"name": "tiny", "data": {"dataset": "tiny"}, "task": "classify", "model": {"kind": "mlp",
              "hidden": [8]}, "train": {"epochs": 2, "batch_size": 32, "checkpoint_every_s": 0}}
    if shifts is not None:
        fields["evaluate"] = {"shifts": shifts}
    return ExperimentSpec.model_validate(fields)


def test_eval_json_holds_shifted_accuracy_and_shift_0_is_the_plain_accuracy(tmp_path):
    data = tiny_classification()
    run = tmp_path / "run"
    train_experiment(spec([0, 1, 3]), "tiny.yaml", data, run, None, progress=False)
    result = evaluate_run(spec([0, 1, 3]), data, run, None)
    data_hash = data.meta.content_hash
    test = result["test"]
    assert set(test["shifted_accuracy"]) == {"0", "1", "3"}
    assert test["shifted_accuracy"]["0"] == test["accuracy"]
    assert json.loads((run / "eval.json").read_text())["test"]["shifted_accuracy"] == test["shifted_accuracy"]
    assert is_done(spec([0, 1, 3]), run, evaluate=True, data_hash=data_hash)
    assert not is_done(spec([0, 2]), run, evaluate=True, data_hash=data_hash)  # other shifts asked: evaluated again, not retrained
    assert is_done(spec([0, 2]), run, evaluate=False, data_hash=data_hash)


def test_without_shifts_eval_json_is_as_it_was(tmp_path):
    data = tiny_classification()
    run = tmp_path / "run"
    train_experiment(spec(), "tiny.yaml", data, run, None, progress=False)
    assert "shifted_accuracy" not in evaluate_run(spec(), data, run, None)["test"]
    data_hash = data.meta.content_hash
    assert is_done(spec(), run, evaluate=True, data_hash=data_hash)


def test_the_field_validates_and_leaves_the_training_hash_alone():
    assert EvaluateSpec().shifts == [] and spec().evaluate.shifts == []
    assert spec([1, 2]).spec_hash() == spec().spec_hash()  # evaluation settings change no training
    for bad in ([-1], [2, 2], "2"):
        with pytest.raises(ValidationError):
            EvaluateSpec(shifts=bad)


@pytest.mark.parametrize("model,dataset,task,shifts,words", [
    ("kind: autoencoder", "digits", "reconstruct", "[1]", "scores classifiers; this spec's task is reconstruct"),
    ("kind: mlp", "digits", "classify", "[2, 8]", "a shift of 8 moves every value out"),
    ("kind: mlp", "digits", "classify", "[-1]", "greater than or equal to 0"),
])
def test_a_bad_use_of_shifts_exits_2_naming_the_field(model, dataset, task, shifts, words, project, capsys):
    path = write_spec(project, model, dataset, task)
    with open(path, "a") as f:
        f.write(f"evaluate: {{shifts: {shifts}}}\n")
    err = validate_error(path, capsys)
    assert "t.yaml: evaluate.shifts" in err and words in err, err


def test_shifts_on_a_table_exit_2(project, capsys):
    g = np.random.default_rng(0)
    pd.DataFrame({"a": g.normal(size=40), "b": g.normal(size=40), "kind": g.integers(0, 2, 40)}).to_csv(
        project / "t.csv", index=False)
    declare(project, "tab", {"source": "table", "path": "t.csv", "target_column": "kind"})
    path = write_spec(project, "kind: mlp", "tab", "classify")
    with open(path, "a") as f:
        f.write("evaluate: {shifts: [1]}\n")
    err = validate_error(path, capsys)
    assert "t.yaml: evaluate.shifts: " in err and "holds a table" in err, err


def test_shifted_accuracy_reaches_mlflow_one_metric_per_shift(tmp_path):
    from mlflow.tracking import MlflowClient
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = tiny_classification()
    (tmp_path / "s.yaml").write_text("name: tiny\n")  # the spec file goes to MLflow as an artifact
    metrics = train_experiment(spec([1, 2]), tmp_path / "s.yaml", data, tmp_path / "run", store, progress=False)
    result = evaluate_run(spec([1, 2]), data, tmp_path / "run", store)
    logged = MlflowClient(store).get_run(metrics["mlflow_run_id"]).data.metrics
    assert logged["test/shifted_accuracy/1"] == pytest.approx(result["test"]["shifted_accuracy"]["1"])
    assert logged["test/shifted_accuracy/2"] == pytest.approx(result["test"]["shifted_accuracy"]["2"])

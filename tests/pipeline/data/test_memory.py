"""The long-range memory dataset (`source: memory`): recall the symbol shown `gap` steps before the end."""
from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.cli import main
from pipeline.data.prepare import build_arrays, load_prepared, write_prepared
from pipeline.data.synthetic import memory_sequences
from pipeline.engine.evaluate import evaluate_run
from pipeline.engine.train import train_experiment
from pipeline.specs.datasets import MemorySource
from pipeline.specs.experiment import ExperimentSpec
from tests.pipeline.data.test_data import declare, prepare_cli


def test_the_label_is_the_symbol_at_the_first_step():
    x, y = memory_sequences(symbols=5, gap=7, samples=400, seed=3)
    assert x.shape == (400, 5, 8) and x.dtype == np.float32 and y.dtype == np.int64
    assert (x.sum(axis=1) == 1).all()  # one symbol per step: one-hot channels
    assert (x[:, :, 0].argmax(axis=1) == y).all()
    np.testing.assert_array_equal(np.bincount(y, minlength=5) > 60, True)  # every class, about uniform
    again = memory_sequences(symbols=5, gap=7, samples=400, seed=3)
    np.testing.assert_array_equal(again[0], x)  # seeded
    assert not np.array_equal(memory_sequences(symbols=5, gap=7, samples=400, seed=4)[0], x)


def test_only_the_first_step_tells_the_label():
    """A classifier of every step but the first stays at chance (1/symbols); one of the first step is perfect."""
    from sklearn.linear_model import LogisticRegression
    x, y = memory_sequences(symbols=4, gap=10, samples=4000, seed=0)
    train, test = slice(0, 3000), slice(3000, None)

    def accuracy(features):
        fit = LogisticRegression(max_iter=500).fit(features[train], y[train])
        return fit.score(features[test], y[test])

    assert accuracy(x[:, :, 0]) == 1.0
    assert accuracy(x[:, :, 1:].reshape(len(x), -1)) < 0.25 + 0.05  # the distractors carry nothing


def test_prepare_writes_a_memory_dataset_whose_standardised_inputs_keep_the_label(project, capsys):
    declare(project, "recall", {"source": "memory", "symbols": 6, "gap": 9, "samples": 600})
    code, err, _ = prepare_cli(project, "recall", capsys)
    assert code == 0, err
    meta = json.loads((project / "data/prepared/recall/meta.json").read_text())
    assert meta["input_shape"] == [6, 10] and meta["num_classes"] == 6 and meta["target"] == "class"
    assert meta["chance_accuracy"] == pytest.approx(1 / 6)
    assert sum(meta["sizes"].values()) == 600
    data = load_prepared(project / "data/prepared/recall")
    for part in ("train", "val", "test"):  # per-channel standardisation is affine per channel: one-hot survives
        x, y = data.tensors[f"{part}_x"], data.tensors[f"{part}_y"]
        assert (x[:, :, 0].argmax(dim=1) == y).all()


@pytest.mark.parametrize("fields,where", [({"gap": 0}, "gap"), ({"symbols": 1}, "symbols"),
                                         ({"samples": 5}, "samples"), ({"length": 10}, "length")])
def test_memory_fields_validate(fields, where):
    with pytest.raises(ValidationError) as err:
        MemorySource(source="memory", **fields)
    assert err.value.errors()[0]["loc"][0] == where


def test_a_bad_memory_field_exits_2_naming_it(project, capsys):
    declare(project, "recall", {"source": "memory", "gap": 0})
    code, err, _ = prepare_cli(project, "recall", capsys)
    assert code == 2 and "datasets.recall.gap" in err, err


def test_an_lstm_trains_and_evaluates_on_it(tmp_path):
    arrays, meta = build_arrays("recall", MemorySource(source="memory", symbols=4, gap=5, samples=300))
    write_prepared(arrays, meta, tmp_path / "recall")
    data = load_prepared(tmp_path / "recall")
    spec = ExperimentSpec.model_validate({
        "name": "recall_lstm", "data": {"dataset": "recall"}, "task": "classify",
        "model": {"kind": "rnn", "cell": "lstm", "hidden_size": 8},
        "train": {"epochs": 1, "batch_size": 32, "checkpoint_every_s": 0}})
    metrics = train_experiment(spec, tmp_path / "s.yaml", data, tmp_path / "run", None, progress=False)
    assert metrics["status"] == "finished" and metrics["epochs"] == 1
    result = evaluate_run(spec, data, tmp_path / "run", None)
    assert 0.0 <= result["test"]["accuracy"] <= 1.0 and len(result["test"]["confusion_matrix"]) == 4


@pytest.mark.parametrize("model", [{"kind": "mlp", "hidden": [8]}, {"kind": "rnn", "cell": "gru", "hidden_size": 8},
                                   {"kind": "rnn", "cell": "rnn", "hidden_size": 8},
                                   {"kind": "transformer", "shape": "encoder", "d_model": 16, "heads": 2}],
                         ids=["mlp", "gru", "rnn", "transformer"])
def test_classifiers_of_signals_read_it_as_gap_plus_one_steps_of_one_hot_symbols(model):
    import torch
    from models.registry import DataShape, build_model
    spec = ExperimentSpec.model_validate({"name": "r", "data": {"dataset": "recall"}, "task": "classify",
                                          "model": model})
    x, _ = memory_sequences(symbols=4, gap=6, samples=3, seed=0)
    net = build_model(spec.model, DataShape(input_shape=(4, 7), output_size=4))  # (symbols, gap + 1)
    assert net(torch.from_numpy(x)).shape == (3, 4)

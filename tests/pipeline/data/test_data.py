"""Datasets: built-ins offline, user files of every format, seeded stratified splits, and clear errors."""
from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.specs.datasets import BUILTIN_DATASETS
from pipeline.data.prepare import RawData, build_arrays, load_prepared, prepare, split_and_normalise
from pipeline.engine.grids import original_units
from pipeline.specs.datasets import SplitSpec
from pipeline.specs.errors import UserError
from tests.conftest import data_meta, files_under


def test_digits_is_prepared_as_images_with_a_stratified_split(tmp_path):
    meta = prepare("digits", BUILTIN_DATASETS["digits"], tmp_path / "digits")
    assert meta.input_shape == [1, 8, 8] and meta.num_classes == 10
    assert sum(meta.sizes.values()) == 1797
    data = load_prepared(tmp_path / "digits")
    counts = np.bincount(data.tensors["val_y"].numpy(), minlength=10)
    assert counts.min() >= 0.8 * counts.max()  # stratified: every class about equally present
    train_x = data.tensors["train_x"].numpy()
    assert abs(train_x.mean()) < 1e-4 and abs(train_x.std() - 1) < 1e-3  # statistics from the training split only
    assert len(meta.content_hash) == 16


def test_mnist1d_keeps_its_own_test_split():
    arrays, meta = build_arrays("mnist1d", BUILTIN_DATASETS["mnist1d"])
    assert meta.sizes["test"] == 1000 and meta.sizes["train"] + meta.sizes["val"] == 4000
    assert meta.input_shape == [40]


def test_the_split_is_seeded_and_repeatable():
    a, meta_a = build_arrays("digits", BUILTIN_DATASETS["digits"])
    b, meta_b = build_arrays("digits", BUILTIN_DATASETS["digits"])
    assert meta_a.content_hash == meta_b.content_hash
    assert np.array_equal(a["val_y"], b["val_y"])


def test_diabetes_standardises_targets_and_remembers_the_scale():
    arrays, meta = build_arrays("diabetes", BUILTIN_DATASETS["diabetes"])
    assert meta.target == "value" and meta.output_size == 1
    assert abs(arrays["train_y"].mean()) < 1e-4
    assert 100 < meta.normalisation["y_mean"][0] < 200


def raw_inputs(shape: tuple[int, ...]) -> RawData:
    """Inputs whose every element has its own mean and scale, so each way of standardising leaves a trace."""
    g = np.random.default_rng(0)
    offsets = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    x = (offsets + (1 + offsets) * g.normal(size=(200, *shape))).astype(np.float32)
    return RawData(x=x, y=g.integers(0, 2, 200), target="class")


@pytest.mark.parametrize("shape", [(6,), (2, 5), (1, 4, 4), (3, 2, 2)])
@pytest.mark.parametrize("how", ["auto", "global", "channel", "feature"])
def test_each_normalisation_standardises_what_it_says(shape, how):
    raw = raw_inputs(shape)
    untouched, none_stats = split_and_normalise(raw, SplitSpec(normalise="none"))
    arrays, stats = split_and_normalise(raw, SplitSpec(normalise=how))
    assert "x_mean" not in none_stats and np.ptp(untouched["train_x"].mean(axis=0)) > 1  # none: left as it was
    x = arrays["train_x"]
    if how == "auto":  # tables and (L,) signals per element, (C, ...) inputs per channel
        how = "feature" if len(shape) == 1 else "channel"
    per_channel = tuple(i for i in range(x.ndim) if i != 1) if len(shape) > 1 else tuple(range(x.ndim))
    axes = {"global": tuple(range(x.ndim)), "feature": (0,), "channel": per_channel}[how]
    np.testing.assert_allclose(x.mean(axis=axes), 0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=axes), 1, atol=1e-3)
    assert len(stats["x_mean"]) == {"global": 1, "feature": int(np.prod(shape)),
                                    "channel": shape[0] if len(shape) > 1 else 1}[how]
    if how != "feature":  # a coarser statistic leaves the elements' own means apart
        assert np.ptp(x.mean(axis=0)) > 0.1
    # original_units undoes it, whatever the shape of the statistics
    restored = original_units(torch.from_numpy(arrays["test_x"]), data_meta(normalisation=stats))
    np.testing.assert_allclose(restored, untouched["test_x"], rtol=1e-4, atol=1e-3)


def test_a_bad_normalisation_name_names_the_field(project, capsys):
    declare(project, "bad", {"source": "digits", "split": {"normalise": "per_channel"}})
    code, err, _ = prepare_cli(project, "bad", capsys)
    assert code == 2 and "params.yaml: datasets.bad.split.normalise: " in err and "'channel'" in err, err


def declare(project, name, entry):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["datasets"][name] = entry
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def prepare_cli(project, name, capsys):
    before = files_under(project)
    code = main(["prepare", name])
    captured = capsys.readouterr()
    return code, captured.err, before


def test_user_npz_with_its_own_test_split(project, capsys):
    g = np.random.default_rng(0)
    np.savez(project / "mine.npz", x=g.normal(size=(60, 2, 10)).astype(np.float32), y=g.integers(0, 3, 60),
             x_test=g.normal(size=(20, 2, 10)).astype(np.float32), y_test=g.integers(0, 3, 20))
    declare(project, "mine", {"source": "npz", "path": "mine.npz"})
    code, err, _ = prepare_cli(project, "mine", capsys)
    assert code == 0, err
    meta = json.loads((project / "data/prepared/mine/meta.json").read_text())
    assert meta["input_shape"] == [2, 10] and meta["sizes"]["test"] == 20 and meta["num_classes"] == 3


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_user_table_with_text_labels(project, capsys, suffix):
    g = np.random.default_rng(0)
    frame = pd.DataFrame({"a": g.normal(size=50), "b": g.normal(size=50), "kind": g.choice(["cat", "dog"], 50)})
    path = project / f"table{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    declare(project, "tab", {"source": "table", "path": path.name, "target_column": "kind"})
    code, err, _ = prepare_cli(project, "tab", capsys)
    assert code == 0, err
    meta = json.loads((project / "data/prepared/tab/meta.json").read_text())
    assert meta["classes"] == ["cat", "dog"] and meta["input_shape"] == [2]


def write_idx(path, array):
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_user_idx_folder_like_mnist(project, capsys):
    g = np.random.default_rng(0)
    folder = project / "fashion"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte.gz", g.integers(0, 255, (40, 6, 6)))
    write_idx(folder / "train-labels-idx1-ubyte.gz", g.integers(0, 10, 40))
    write_idx(folder / "t10k-images-idx3-ubyte.gz", g.integers(0, 255, (12, 6, 6)))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", g.integers(0, 10, 12))
    declare(project, "fashion", {"source": "idx", "path": "fashion"})
    code, err, _ = prepare_cli(project, "fashion", capsys)
    assert code == 0, err
    meta = json.loads((project / "data/prepared/fashion/meta.json").read_text())
    assert meta["input_shape"] == [1, 6, 6] and meta["sizes"]["test"] == 12


def _npz(project, **arrays):
    np.savez(project / "bad.npz", **arrays)
    declare(project, "bad", {"source": "npz", "path": "bad.npz"})


BAD_DATA = {
    # case: (make the data, words in the message)
    "missing_file": (lambda p: declare(p, "bad", {"source": "npz", "path": "absent.npz"}), "absent.npz: path: data file not found"),
    "wrong_shape": (lambda p: _npz(p, x=np.zeros((20, 1, 1, 2, 2), np.float32), y=np.zeros(20, int)), "x must have shape"),
    "nan_values": (lambda p: _npz(p, x=np.full((20, 3), np.nan, np.float32), y=np.zeros(20, int)), "NaN or Inf"),
    "negative_label": (lambda p: _npz(p, x=np.zeros((20, 3), np.float32), y=-np.ones(20, int)), "y: class labels must be >= 0"),
    "label_out_of_range": (lambda p: (np.savez(p / "bad.npz", x=np.zeros((20, 3), np.float32), y=np.full(20, 7)),
                                      declare(p, "bad", {"source": "npz", "path": "bad.npz", "num_classes": 5})),
                           "label 7 is out of range for num_classes=5"),
    "length_mismatch": (lambda p: _npz(p, x=np.zeros((20, 3), np.float32), y=np.zeros(19, int)), "labels have 19"),
    "missing_array": (lambda p: _npz(p, inputs=np.zeros((20, 3), np.float32)), "missing array 'x'"),
    "no_target_column": (lambda p: (pd.DataFrame({"a": [1.0] * 20}).to_csv(p / "t.csv", index=False),
                                    declare(p, "bad", {"source": "table", "path": "t.csv", "target_column": "label"})),
                         "t.csv: target_column: no column 'label'"),
    "unknown_source_field": (lambda p: declare(p, "bad", {"source": "npz", "path": "x.npz", "pth": 1}),
                             "params.yaml: datasets.bad.pth: Extra inputs are not permitted"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_exits_2_with_a_clear_message_and_writes_nothing(case, project, capsys):
    make, words = BAD_DATA[case]
    make(project)
    code, err, before = prepare_cli(project, "bad", capsys)
    assert code == 2
    assert words in err, err
    assert "Traceback" not in err
    assert not (project / "data").exists()


def test_a_prepared_folder_from_another_split_is_prepared_again_when_archlab_made_it(project, capsys):
    """Stale data is never used silently: params.yaml's dataset spec changed, so the verb prepares anew."""
    from pipeline.engine.checks import ensure_prepared
    from pipeline.specs.config import load_config
    from pipeline.specs.experiment import load_spec
    assert main(["prepare", "digits"]) == 0
    old = json.loads((project / "data/prepared/digits/meta.json").read_text())
    params = yaml.safe_load((project / "params.yaml").read_text())
    params.setdefault("datasets", {})["digits"] = {"source": "digits", "split": {"seed": 7}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    capsys.readouterr()
    data = ensure_prepared(load_config(), load_spec("specs/digits_mlp.yaml"), project / "data/prepared/digits",
                           "specs/digits_mlp.yaml")
    assert "split.seed: 0 → 7" in capsys.readouterr().err
    assert data.meta.spec["split"]["seed"] == 7 and data.meta.content_hash != old["content_hash"]


def test_meta_json_is_read_and_written_through_its_record_with_the_same_content(tmp_path):
    from pipeline.data.prepare import DataMeta, read_meta, write_meta
    prepare("digits", BUILTIN_DATASETS["digits"], tmp_path / "digits")
    meta = read_meta(tmp_path / "digits")
    assert isinstance(meta, DataMeta) and meta.name == "digits" and meta.sizes["test"] > 0
    write_meta(tmp_path, meta)
    assert (tmp_path / "meta.json").read_bytes() == (tmp_path / "digits" / "meta.json").read_bytes()
    # A folder prepared before a key was recorded (value_range) still reads; a source's own facts ride along.
    content = {"name": "old", "input_shape": [3], "output_size": 2, "corpus": "grammar"}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "meta.json").write_text(json.dumps(content))
    assert read_meta(tmp_path / "old").as_dict() == content


def test_a_meta_json_key_of_the_wrong_type_is_a_user_error_naming_file_and_key(tmp_path):
    from pipeline.data.prepare import read_meta
    (tmp_path / "meta.json").write_text(json.dumps({"name": "x", "input_shape": [3], "output_size": "two"}))
    with pytest.raises(UserError) as caught:
        read_meta(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'meta.json'}: output_size: Input should be a valid integer")


def test_without_a_validation_split_training_gets_the_former_validation_share(tmp_path):
    """`split: {val_fraction: 0}`: the same test examples, and train holds what train and validation held."""
    with_val, meta = build_arrays("digits", BUILTIN_DATASETS["digits"])
    spec = BUILTIN_DATASETS["digits"].model_copy(update={"split": SplitSpec(val_fraction=0)})
    meta0 = prepare("digits", spec, tmp_path / "digits")
    assert meta0.sizes == {"train": meta.sizes["train"] + meta.sizes["val"], "val": 0, "test": meta.sizes["test"]}
    data = load_prepared(tmp_path / "digits")
    assert tuple(data.tensors["val_x"].shape) == (0, 1, 8, 8) and len(data.tensors["val_y"]) == 0
    assert np.array_equal(data.tensors["test_y"].numpy(), with_val["test_y"])  # the test split never moves
    pooled = np.concatenate([with_val["train_y"], with_val["val_y"]])
    assert np.array_equal(np.bincount(data.tensors["train_y"].numpy()), np.bincount(pooled))
    train_x = data.tensors["train_x"].numpy()
    assert abs(train_x.mean()) < 1e-4 and abs(train_x.std() - 1) < 1e-3  # statistics of the larger training split


def test_prepare_without_names_prepares_only_what_is_missing_or_out_of_date(project, capsys):
    """The pipeline's prepare stage: one call for every dataset, leaving the up-to-date ones untouched."""
    (project / "params.yaml").write_text("datasets:\n  digits: {source: digits}\n  diabetes: {source: diabetes}\n")
    assert main(["prepare"]) == 0
    arrays = {name: project / "data" / "prepared" / name / "arrays.npz" for name in ("digits", "diabetes")}
    made = {name: path.stat().st_mtime_ns for name, path in arrays.items()}
    capsys.readouterr()
    (project / "params.yaml").write_text("datasets:\n  digits: {source: digits}\n"
                                         "  diabetes: {source: diabetes, split: {seed: 3}}\n")
    assert main(["prepare"]) == 0
    out = capsys.readouterr().out
    assert "digits: up to date in data/prepared/digits" in out and "diabetes: {" in out
    assert arrays["digits"].stat().st_mtime_ns == made["digits"]
    assert arrays["diabetes"].stat().st_mtime_ns != made["diabetes"]
    assert main(["prepare", "digits"]) == 0  # named: prepared again
    assert arrays["digits"].stat().st_mtime_ns != made["digits"]

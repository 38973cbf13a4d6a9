"""The run files' records: a real run's files fit them and their schemas, a file that does not fit is refused
naming the file and the key, and the reports' reader takes what a half-written file holds."""
from __future__ import annotations

import json
import math

import jsonschema
import pytest

from pipeline.engine.evaluate import evaluate_run
from pipeline.engine.runfiles import (FILES, Evaluation, RunMetrics, read_run_fields, read_run_file,
                                      run_file_schemas, schema_name, write_run_file)
from pipeline.engine.train import train_experiment
from pipeline.specs.errors import UserError
from pipeline.specs.experiment import ExperimentSpec
from pipeline.specs.schema import render
from tests.conftest import REPO, tiny_classification


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny real run, trained and evaluated: every run file as the engine writes it."""
    spec = ExperimentSpec.model_validate({
        "name": "tiny", "data": {"dataset": "tiny"}, "task": "classify", "model": {"kind": "mlp", "hidden": [8]},
        "train": {"epochs": 2, "batch_size": 32, "checkpoint_every_s": 0}})
    data = tiny_classification()
    folder = tmp_path_factory.mktemp("run")
    train_experiment(spec, "tiny.yaml", data, folder, None, progress=False)
    evaluate_run(spec, data, folder, None)
    return folder


@pytest.mark.parametrize("name", list(FILES))
def test_a_real_runs_file_reads_as_its_record_and_writes_back_the_same_bytes(run_dir, name, tmp_path):
    record = read_run_file(run_dir, FILES[name])
    write_run_file(tmp_path, record)
    assert (tmp_path / name).read_bytes() == (run_dir / name).read_bytes()
    assert read_run_fields(run_dir, FILES[name]) == json.loads((run_dir / name).read_text())


@pytest.mark.parametrize("name", list(FILES))
def test_the_schema_takes_a_real_runs_file_and_refuses_a_wrong_typed_key(run_dir, name):
    schema = run_file_schemas()[schema_name(name)]
    content = json.loads((run_dir / name).read_text())
    jsonschema.validate(content, schema)
    key = {"metrics.json": "epochs", "eval.json": "seed", "diagnostics.json": "enabled", "cost.json": "params_total"}
    with pytest.raises(jsonschema.ValidationError) as caught:
        jsonschema.validate({**content, key[name]: "2"}, schema)
    assert list(caught.value.path) == [key[name]] and caught.value.instance == "2"
    with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
        jsonschema.validate({**content, "mistyped_key": 1}, schema)


def test_the_committed_run_file_schemas_are_current():
    for name, schema in run_file_schemas().items():
        committed = REPO / "specs" / name
        assert committed.is_file() and committed.read_text() == render(schema), \
            f"specs/{name} is missing or stale: run `archlab schema`"


def test_a_file_that_does_not_fit_is_a_user_error_naming_file_and_key(run_dir, tmp_path):
    content = json.loads((run_dir / "metrics.json").read_text())
    (tmp_path / "metrics.json").write_text(json.dumps({**content, "epochs": "two"}))
    with pytest.raises(UserError) as caught:
        read_run_file(tmp_path, RunMetrics)
    assert str(caught.value).startswith(f"{tmp_path / 'metrics.json'}: epochs: Input should be a valid integer")
    (tmp_path / "eval.json").write_text('{"name": "tin')  # cut off mid-write
    with pytest.raises(UserError, match=r"eval\.json: cannot be read as JSON"):
        read_run_file(tmp_path, Evaluation)
    with pytest.raises(UserError, match="not found"):
        read_run_file(tmp_path / "absent", Evaluation)


def test_the_reports_reader_keeps_what_fits_and_warns_of_the_rest(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "finished", "epochs": "two", "typo": 1,
                                                       "final": {"val/loss": math.nan}}))
    fields = read_run_fields(tmp_path, RunMetrics)
    assert fields.keys() == {"status", "final"} and math.isnan(fields["final"]["val/loss"])
    err = capsys.readouterr().err
    assert f"{tmp_path / 'metrics.json'}: epochs: Input should be a valid integer" in err
    assert f"{tmp_path / 'metrics.json'}: typo: not a key of metrics.json" in err
    (tmp_path / "metrics.json").write_text('{"status": "fini')
    assert read_run_fields(tmp_path, RunMetrics) == {} and read_run_fields(tmp_path / "absent", Evaluation) == {}


def test_an_optional_key_stays_out_of_the_file_until_it_is_set(tmp_path):
    evaluation = Evaluation(name="a", status="finished", main_metric="mse", seed=0, spec_hash="h", test={"mse": 1})
    write_run_file(tmp_path, evaluation)
    assert "records" not in json.loads((tmp_path / "eval.json").read_text())
    evaluation.records = "records.npz"
    write_run_file(tmp_path, evaluation)
    assert json.loads((tmp_path / "eval.json").read_text())["records"] == "records.npz"


def test_the_keys_others_name_are_keys_of_the_records():
    """Where a cost key is named outside the record (a sweep's cost objectives, the leaderboard's columns), it is
    one of the record's: a renamed key fails here, not as a silently empty column."""
    from pipeline.engine.runfiles import Cost
    from pipeline.reports.records import COST_COLUMNS
    from pipeline.specs.sweep import COST_KEYS
    assert {*COST_KEYS.values(), *COST_COLUMNS.values()} <= Cost.model_fields.keys()


def test_numbers_keep_their_type_through_a_record(tmp_path):
    """cost.json writes whole FLOP counts as ints and rounded figures as floats: the record changes neither."""
    from pipeline.engine.runfiles import Cost
    content = {key: None for key in Cost.model_fields if Cost.model_fields[key].is_required()}
    content.update(device="cpu", train_samples_per_s=18000, peak_flops=96040000000.0, mfu=math.nan,
                   peak_memory_mb_per_rank=[329.6, 330])
    write_run_file(tmp_path, Cost.model_validate(content))
    assert (tmp_path / "cost.json").read_text() == json.dumps(content, indent=2) + "\n"

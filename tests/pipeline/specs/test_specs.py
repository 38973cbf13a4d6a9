"""Every spec in specs/ validates; the committed schema is current; bad specs fail clearly, writing nothing."""
from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from pipeline.specs.schema import render, schema_files
from pipeline.specs.experiment import load_spec
from tests.conftest import REPO, files_under

SPEC_FILES = sorted((REPO / "specs").glob("*.yaml"))


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_spec_validates_and_builds(path, project, capsys):
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "parameters" in out
    assert not (project / "data").exists(), "validate must not write prepared data"


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_spec_name_is_its_file_name_and_it_points_editors_at_the_schema(path):
    assert load_spec(path).name == path.stem
    assert path.read_text().splitlines()[0] == "# yaml-language-server: $schema=schema.json"


def test_committed_schemas_are_current():
    for name, schema in schema_files().items():
        committed = (REPO / "specs" / name)
        assert committed.is_file(), f"specs/{name} missing: run `archlab schema`"
        assert committed.read_text() == render(schema), f"specs/{name} is stale: run `archlab schema`"


def test_every_field_has_a_description():
    def walk(node, path):
        if isinstance(node, dict):
            props = node.get("properties", {})
            for key, sub in props.items():
                assert sub.get("description"), f"{path}.{key} has no description"
            for key, sub in node.items():
                walk(sub, f"{path}.{key}")
        elif isinstance(node, list):
            for i, sub in enumerate(node):
                walk(sub, f"{path}[{i}]")

    for name, schema in schema_files().items():
        walk(schema, name)


def test_every_experiment_in_params_has_a_spec_on_its_dataset():
    from pipeline.specs.config import load_config
    config = load_config(REPO / "params.yaml")
    for name, entry in config.experiments.items():
        spec = load_spec(REPO / "specs" / f"{name}.yaml")
        dataset = entry.dataset
        assert spec.data.dataset == dataset, f"params.yaml says {name} trains on {dataset}, its spec says otherwise"


VALID = """\
name: ok
data: {dataset: digits}
task: classify
model: {kind: mlp, hidden: [16]}
train: {epochs: 1}
"""

BAD_SPECS = {
    # case: (file content, field named in the message, words in the message)
    "misspelled_field": (VALID.replace("hidden: [16]", "hiden: [16]"), "model.hiden",
                         "Extra inputs are not permitted (did you mean 'hidden'?)"),
    "misspelled_value": (VALID.replace("hidden: [16]", "hidden: [16], activation: rellu"), "model.activation",
                         "(did you mean 'relu'?)"),
    "misspelled_kind": (VALID.replace("kind: mlp", "kind: mpl"), "model", "(did you mean 'mlp'?)"),
    "misspelled_nested_field": (VALID.replace("train: {epochs: 1}", "train: {epochs: 1, optimizer: {lr: 0.1, "
                                                                      "wieght_decay: 0.1}}"),
                                "train.optimizer.wieght_decay", "(did you mean 'weight_decay'?)"),
    "wrong_type": (VALID.replace("epochs: 1", "epochs: many"), "train.epochs", "valid integer"),
    "negative_size": (VALID.replace("[16]", "[-4]"), "model.hidden[0]", "greater than 0"),
    "unknown_kind": (VALID.replace("kind: mlp", "kind: perceptron"), "model", "does not match any of the expected tags"),
    "impossible_shape": (VALID.replace("model: {kind: mlp, hidden: [16]}",
                                       "model: {kind: cnn, layers: [{type: pool, kernel: 2}, {type: pool, kernel: 2},"
                                       " {type: pool, kernel: 2}, {type: pool, kernel: 2}]}"),
                         "model.layers[3]", "does not fit"),
    "unsafe_name": (VALID.replace("name: ok", "name: ../escape"), "name", "should match pattern"),
    "empty_file": ("", None, "the file is empty"),
    "invalid_yaml": ("name: [unclosed\n", None, "invalid YAML"),
    "not_a_mapping": ("- just\n- a list\n", None, "expected a mapping"),
    "unknown_dataset": (VALID.replace("dataset: digits", "dataset: nosuchdata"), "data.dataset", "unknown dataset"),
    "task_model_mismatch": (VALID.replace("task: classify", "task: lm"), None, "cannot serve task 'lm'"),
    # an mlp can regress, but digits holds class labels, not real-valued targets
    "task_data_mismatch": (VALID.replace("task: classify", "task: regress"), "task",
                           "regress needs value data, but dataset 'digits' holds class data; tasks for class data: "
                           "classify, reconstruct, generate"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
@pytest.mark.parametrize("verb", ["validate", "train"])
def test_bad_spec_exits_2_naming_file_and_field_and_writes_nothing(case, verb, project, capsys):
    content, field, words = BAD_SPECS[case]
    spec = project / "bad.yaml"
    spec.write_text(content)
    before = files_under(project)
    assert main([verb, "bad.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("archlab: error: bad.yaml: "), err
    if field:
        assert f"bad.yaml: {field}: " in err, err
    assert words in err, err
    assert "Traceback" not in err
    assert files_under(project) == before, "a bad spec must leave nothing behind"


def test_a_far_miss_gets_no_suggestion(project, capsys):
    (project / "bad.yaml").write_text(VALID.replace("kind: mlp", "kind: perceptron"))
    assert main(["validate", "bad.yaml"]) == 2
    assert "did you mean" not in capsys.readouterr().err


def test_an_editor_schema_validator_points_at_the_mistyped_field_not_at_other_families():
    """JSON-Schema validators ignore `discriminator`: the schema picks the family by `kind` with if/then."""
    jsonschema = pytest.importorskip("jsonschema")
    import yaml
    schema = schema_files()["schema.json"]
    validator = jsonschema.Draft202012Validator(schema)
    for path in SPEC_FILES:
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path
    spec = yaml.safe_load(VALID)
    spec["model"]["activation"] = "rellu"
    [error] = validator.iter_errors(spec)
    assert list(error.absolute_path) == ["model", "activation"] and "'rellu' is not one of" in error.message
    spec["model"] = {"kind": "cnn", "layers": [{"type": "conv", "chanels": 4, "kernel": 3}]}
    errors = {(tuple(e.absolute_path), e.message) for e in validator.iter_errors(spec)}
    assert ((("model", "layers", 0), "Additional properties are not allowed ('chanels' was unexpected)") in errors)
    spec["model"] = {"kind": "perceptron"}
    [error] = validator.iter_errors(spec)
    assert list(error.absolute_path) == ["model", "kind"]


def test_missing_spec_file(project, capsys):
    assert main(["train", "nope.yaml"]) == 2
    assert "nope.yaml: file not found" in capsys.readouterr().err


def test_bad_command_line_exits_2(project, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--workers"])
    assert exc.value.code == 2


def test_evaluating_a_run_never_trained_exits_2_and_writes_nothing(project, capsys):
    before = files_under(project)
    assert main(["evaluate", "specs/digits_mlp.yaml"]) == 2
    assert "runs/digits_mlp/seed-0: no checkpoint.pt; run `archlab train` first" in capsys.readouterr().err
    assert files_under(project) == before  # not even the dataset is prepared for it


def test_schema_verb_writes_the_schema(project, capsys):
    assert main(["schema", "--out", str(project / "out")]) == 0
    schema = json.loads((project / "out" / "schema.json").read_text())
    assert schema["title"] == "archlab experiment spec"
    # and the run files' schemas, from the engine's records, beside them
    assert json.loads((project / "out" / "runs" / "cost.schema.json").read_text())["title"] == "cost.json"


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_every_spec_written_out_in_full_loads_again(path, tmp_path):
    """A sweep writes each trial's spec with every default spelled out; it must load as the same spec."""
    from pipeline.specs.experiment import spec_to_yaml
    spec = load_spec(path)
    again = tmp_path / path.name
    again.write_text(spec_to_yaml(spec))
    assert load_spec(again) == spec

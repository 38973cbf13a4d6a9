"""Property: `archlab validate` on any YAML document, or on a valid spec with one value mutated, either
succeeds (exit 0) or says what is wrong in one line (exit 2). Never a traceback, never another status."""
from __future__ import annotations

import copy

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cli import main
from tests.conftest import REPO

BASE = yaml.safe_load((REPO / "specs" / "digits_mlp.yaml").read_text())

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


def _paths(node, prefix=()):
    """Every (path, value) in a nested spec, so a mutation can land anywhere."""
    yield prefix, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from _paths(value, (*prefix, key))


PATHS = [path for path, _ in _paths(BASE) if path]


@st.composite
def mutated_specs(draw):
    raw = copy.deepcopy(BASE)
    path = draw(st.sampled_from(PATHS))
    node = raw
    for key in path[:-1]:
        node = node[key]
    if draw(st.booleans()) and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = draw(documents)
    return raw


def _validate(tmp_path, capsys, text: str) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    capsys.readouterr()
    code = main(["--params", str(REPO / "params.yaml"), "validate", str(spec)])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        assert err.startswith(f"archlab: error: {spec}"), err


SETTINGS = settings(max_examples=100, deadline=None, database=None,  # nothing written into the project
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(document=documents)
def test_any_yaml_document_validates_or_is_one_clear_error(document, tmp_path, capsys):
    _validate(tmp_path, capsys, yaml.safe_dump(document))


@SETTINGS
@given(raw=mutated_specs())
def test_a_mutated_valid_spec_validates_or_is_one_clear_error(raw, tmp_path, capsys):
    _validate(tmp_path, capsys, yaml.safe_dump(raw))


@pytest.mark.parametrize("text", ["{", "a: [1, 2", "? [a]\n: b", "&a [*a]", "x: !!python/object:os.system 1"])
def test_malformed_yaml_is_one_clear_error(text, tmp_path, capsys):
    _validate(tmp_path, capsys, text)

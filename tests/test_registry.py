"""Every model kind: one tag in the spec union, one builder in the registry, built, run forward and backward."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import TypeAdapter

from models import ModelSpec, build_model, registered_kinds
from models.mlp import MLPSpec
from pipeline.engine.tasks import make_task
from pipeline.specs.config import load_config
from pipeline.specs.experiment import load_spec
from tests.conftest import REPO

SPEC_FILES = sorted((REPO / "specs").glob("*.yaml"))


def union_kinds() -> set[str]:
    """The kinds pydantic's discriminated union accepts, read from the ExperimentSpec's model field."""
    adapter = TypeAdapter(ModelSpec)
    return set(adapter.json_schema()["discriminator"]["mapping"])


def test_union_tags_and_registry_keys_are_the_same_set():
    assert union_kinds() == set(registered_kinds())


def test_every_kind_has_a_spec_in_specs_folder():
    used = {load_spec(p).model.kind for p in SPEC_FILES}
    assert set(registered_kinds()) <= used, f"kinds without an example spec: {set(registered_kinds()) - used}"


def test_registering_a_kind_twice_raises():
    from models.registry import register
    with pytest.raises(ValueError, match="registered twice"):
        register(MLPSpec)(lambda spec, shape: None)


def _one_spec_per_kind():
    seen = {}
    for path in SPEC_FILES:
        spec = load_spec(path)
        seen.setdefault(spec.model.kind, path)
    return sorted(seen.values())


@pytest.mark.parametrize("path", _one_spec_per_kind(), ids=lambda p: p.stem)
def test_every_kind_runs_forward_and_backward_without_nan(path):
    from pipeline.data.prepare import build_arrays
    from pipeline.specs.config import dataset_spec

    spec = load_spec(path)
    config = load_config(REPO / "params.yaml")
    arrays, meta = build_arrays(spec.data.dataset, dataset_spec(config, spec.data.dataset))
    from pipeline.data.prepare import shape_from_meta
    torch.manual_seed(0)
    model = build_model(spec.model, shape_from_meta(meta))
    task = make_task(spec.task, meta)
    x = torch.from_numpy(arrays["train_x"][:8])
    y = torch.from_numpy(arrays["train_y"][:8])
    for phase in task.phases(model):
        model.zero_grad()
        loss, _ = phase.loss(model, x, y)
        assert math.isfinite(loss.item())
        loss.backward()
        grads = [p.grad for p in phase.params if p.grad is not None]
        assert grads, f"{path.stem}: phase {phase.name} produced no gradients"
        assert all(torch.isfinite(g).all() for g in grads)

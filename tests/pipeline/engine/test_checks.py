"""The memory check sizes a model before building it: small models by a real one-sample forward on the CPU,
large ones on the meta device; both count the same, and neither moves the seeded random stream."""
from __future__ import annotations

import pytest
import torch

from models.registry import DataShape
from pipeline.engine import checks
from pipeline.specs.experiment import load_spec
from tests.conftest import REPO

SHAPES = {  # the datasets' per-sample shapes, as prepare describes them
    "digits_lenet5": DataShape(input_shape=(1, 8, 8), output_size=10),
    "mnist1d_lstm": DataShape(input_shape=(40,), output_size=10),
    "digits_vae": DataShape(input_shape=(1, 8, 8), output_size=10, value_range=(-1.0, 3.0)),
    "reverse_transformer": DataShape(input_shape=(12,), output_size=16, vocab_size=16, max_len=12, target_len=12),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_a_model_sized_on_the_cpu_counts_what_the_meta_device_counts(name, monkeypatch):
    spec = load_spec(REPO / "specs" / f"{name}.yaml")
    on_cpu = checks.memory_estimate(spec, SHAPES[name])
    monkeypatch.setattr(checks, "SIZED_ON_CPU_BELOW", 0)  # everything on the meta device
    on_meta = checks.memory_estimate(spec, SHAPES[name])
    assert on_cpu == on_meta and on_cpu[0] > 0 and on_cpu[1] > 0


def test_sizing_on_the_cpu_leaves_the_seeded_random_stream_where_it_was():
    spec = load_spec(REPO / "specs" / "digits_lenet5.yaml")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    checks.memory_estimate(spec, SHAPES["digits_lenet5"])
    assert torch.equal(torch.rand(3), expected)

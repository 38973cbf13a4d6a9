"""Forward FLOPs by kind: the kinds sum to the total, each kind holds the work it names, and each grows with n and d
as the arithmetic says."""
from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter
from torch import nn

from models import DataShape, ModelSpec, build_model
from models.layers.attention import MultiHeadAttention
from pipeline.engine.cost import count_flops, forward_flops
from pipeline.engine.flops import KINDS, count_flops_by_kind, flops_by_kind
from pipeline.engine.runfiles import FlopsByKind
from tests.conftest import REPO


def forward(model, x, y):
    return model(x)


def build(spec: dict, input_shape: tuple[int, ...], outputs: int = 3, **facts) -> nn.Module:
    torch.manual_seed(0)
    return build_model(TypeAdapter(ModelSpec).validate_python(spec), DataShape(input_shape, outputs, **facts))


def split(model: nn.Module, x: torch.Tensor, run=forward) -> dict[str, float]:
    total, kinds = flops_by_kind(model, run, x, None)
    assert sum(kinds.values()) == total == forward_flops(model, run, x, None)  # one pass, the same total
    return kinds


def nonzero(kinds: dict[str, float]) -> set[str]:
    return {kind for kind, n in kinds.items() if n}


def test_the_kinds_are_the_cost_records_keys():
    assert KINDS == ("attention", "projection", "ffn", "convolution", "recurrence", "other")
    assert tuple(FlopsByKind.model_fields) == KINDS


# ── each kind holds the work it names ───────────────────────────────────────────────────────────
def test_attention_is_the_scores_and_mixing_and_projection_the_four_linear_maps():
    d, heads, t = 16, 4, 6
    block = MultiHeadAttention(d, heads).eval()
    x = torch.randn(3, t, d)
    with torch.no_grad():
        total, kinds = count_flops_by_kind(lambda: block(x, x, x))
    per_sample = {kind: n / len(x) for kind, n in kinds.items()}
    assert per_sample["attention"] == 2 * t * t * d + 2 * t * t * d  # Q Kᵀ and softmax(·) V over all heads
    assert per_sample["projection"] == 4 * 2 * t * d * d  # Q, K, V and output
    assert total == sum(kinds.values())
    assert nonzero(kinds) == {"attention", "projection"}


def test_a_plain_mlp_is_all_other():
    """ffn is the Transformer's position-wise FFN (the n·d² term); an MLP's layers and head are `other`."""
    kinds = split(build({"kind": "mlp", "hidden": [32, 16]}, (10,)), torch.randn(4, 10))
    assert nonzero(kinds) == {"other"} and kinds["other"] == 2 * (10 * 32 + 32 * 16 + 16 * 3)


def test_a_cnn_is_convolution_plus_its_linear_head():
    model = build({"kind": "cnn", "layers": [{"type": "conv", "channels": 4, "kernel": 3, "padding": 1}]}, (1, 8, 8))
    kinds = split(model, torch.randn(2, 1, 8, 8))
    assert kinds["convolution"] == 2 * 3 * 3 * 4 * 8 * 8
    assert nonzero(kinds) <= {"convolution", "other"}


def test_a_functional_convolution_outside_any_conv_module_is_convolution():
    weight = torch.randn(4, 2, 3)
    _, kinds = count_flops_by_kind(lambda: torch.nn.functional.conv1d(torch.randn(1, 2, 10), weight))
    assert nonzero(kinds) == {"convolution"}


def test_an_rnn_decoders_attention_is_attention_and_its_layers_projection():
    spec = {"kind": "seq2seq_rnn", "cell": "gru", "hidden_size": 8, "embed_dim": 4, "attention": "dot"}
    model = build(spec, (6,), 12, vocab_size=12, max_len=6, target_len=5)
    src, tgt = torch.randint(3, 12, (2, 6)), torch.randint(3, 12, (2, 5))
    kinds = split(model, src, lambda m, x, y: m(x, tgt))
    assert kinds["attention"] == 2 * (2 * 5 * 6 * 8)  # scores (T×H)(H×S) and context (T×S)(S×H) per example
    assert kinds["projection"] == 2 * 5 * (2 * 8) * 8  # W_c on [context; query]
    assert kinds["recurrence"] > 0 and kinds["ffn"] == kinds["convolution"] == 0


# ── how each kind grows with n and d (exact: these are counts) ───────────────────────────────────────────
def encoder(n: int, d: int) -> tuple[nn.Module, torch.Tensor]:
    spec = {"kind": "transformer", "shape": "encoder", "d_model": d, "heads": 2, "layers": 1, "pooling": "mean"}
    return build(spec, (3, n)), torch.randn(2, 3, n)


def test_encoder_attention_quadruples_and_ffn_doubles_when_n_doubles():
    at_n, at_2n = split(*encoder(8, 16)), split(*encoder(16, 16))
    assert at_2n["attention"] == 4 * at_n["attention"]
    assert at_2n["ffn"] == 2 * at_n["ffn"] and at_2n["projection"] == 2 * at_n["projection"]
    assert nonzero(at_n) == {"attention", "projection", "ffn", "other"}


def test_encoder_attention_doubles_and_ffn_quadruples_when_d_doubles():
    at_d, at_2d = split(*encoder(8, 16)), split(*encoder(8, 32))
    assert at_2d["attention"] == 2 * at_d["attention"]
    assert at_2d["ffn"] == 4 * at_d["ffn"] and at_2d["projection"] == 4 * at_d["projection"]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_recurrence_grows_linearly_in_n(cell):
    def kinds(n):
        return split(build({"kind": "rnn", "cell": cell, "hidden_size": 8}, (2, n)), torch.randn(2, 2, n))
    at_n, at_2n = kinds(10), kinds(20)
    assert at_n["recurrence"] > 0 and at_2n["recurrence"] == 2 * at_n["recurrence"]
    assert nonzero(at_n) == {"recurrence", "other"}


def test_the_split_leaves_no_hook_behind_after_a_failure():
    from torch.nn.modules import module as torch_module
    before = (len(torch_module._global_forward_pre_hooks), len(torch_module._global_forward_hooks))
    with pytest.raises(RuntimeError):
        count_flops_by_kind(lambda: nn.Linear(3, 2)(torch.randn(1, 4)))
    assert (len(torch_module._global_forward_pre_hooks), len(torch_module._global_forward_hooks)) == before
    assert count_flops(lambda: nn.Linear(3, 2)(torch.randn(1, 3))) == 12  # counting still works


# ── every family: the kinds add up ─────────────────────────────────────────────────────────────────
def one_spec_per_kind():
    from pipeline.specs.experiment import load_spec
    seen = {}
    for path in sorted((REPO / "specs").glob("*.yaml")):
        seen.setdefault(load_spec(path).model.kind, path)
    return sorted(seen.values())


@pytest.mark.parametrize("path", one_spec_per_kind(), ids=lambda p: p.stem)
def test_every_familys_kinds_sum_to_its_forward_flops(path):
    from pipeline.data.prepare import build_arrays, shape_from_meta
    from pipeline.engine.tasks import make_task
    from pipeline.specs.config import dataset_spec, load_config
    from pipeline.specs.experiment import load_spec
    spec = load_spec(path)
    arrays, meta = build_arrays(spec.data.dataset, dataset_spec(load_config(REPO / "params.yaml"), spec.data.dataset))
    torch.manual_seed(0)
    model = build_model(spec.model, shape_from_meta(meta))
    task = make_task(spec.task, meta)
    x, y = torch.from_numpy(arrays["train_x"][:4]), torch.from_numpy(arrays["train_y"][:4])
    total, kinds = flops_by_kind(model, task.inference_forward, x, y)
    assert set(kinds) == set(KINDS) and all(n >= 0 for n in kinds.values())
    assert sum(kinds.values()) == total == forward_flops(model, task.inference_forward, x, y)

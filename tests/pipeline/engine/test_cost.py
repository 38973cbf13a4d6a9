"""Compute cost: FLOPs against hand counts, and measure_cost on real trained models."""
from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from pipeline.engine.cost import count_flops, forward_flops, measure_cost, peak_cache_path, peak_flops, peak_key
from pipeline.engine.runfiles import Cost
from pipeline.engine.train import Trainer
from pipeline.specs.experiment import ExperimentSpec
from tests.conftest import tiny_classification


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """The peak-FLOP/s cache in a temporary folder, holding a known value so no test pays for a measurement."""
    monkeypatch.setenv("ARCHLAB_CACHE_DIR", str(tmp_path / "cache"))
    path = peak_cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({peak_key(torch.device("cpu")): 5e10}))


def forward(model, x, y):
    return model(x)


# ── FLOPs against hand counts (a multiply-add is 2 FLOPs; bias adds are not counted) ──────────
def test_linear_flops_are_two_per_weight_per_sample():
    layer = nn.Linear(10, 5)
    assert forward_flops(layer, forward, torch.randn(4, 10), None) == 2 * 10 * 5


def test_conv2d_flops_are_two_per_kernel_weight_per_output_position():
    conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
    per_output = 2 * 3 * 3 * 3  # C_in × k × k multiply-adds
    assert forward_flops(conv, forward, torch.randn(2, 3, 8, 8), None) == per_output * 4 * 8 * 8


def attention_block(d_model: int, heads: int) -> tuple[nn.Module, callable]:
    """The project's attention layer when it is there, else torch's own (same arithmetic)."""
    try:
        from models.layers.attention import MultiHeadAttention
        return MultiHeadAttention(d_model, heads), lambda m, x: m(x, x, x)
    except ImportError:
        mha = nn.MultiheadAttention(d_model, heads, batch_first=True)
        return mha, lambda m, x: m(x, x, x, need_weights=False)[0]


def test_attention_flops_count_projections_scores_and_mixing():
    d, heads, t = 16, 4, 6
    block, call = attention_block(d, heads)
    block.eval()
    x = torch.randn(3, t, d)
    projections = 4 * 2 * t * d * d  # Q, K, V and output: (T, D) @ (D, D) each
    scores = 2 * t * t * d  # Q Kᵀ over all heads: (T, d_k) @ (d_k, T) per head
    mixing = 2 * t * t * d  # softmax(·) V over all heads
    with torch.no_grad():
        assert count_flops(lambda: call(block, x)) / len(x) == projections + scores + mixing


# ── measure_cost on a trained model ─────────────────────────────────────────────────────────────
def trained(tmp_path, hidden=(32,), epochs=2) -> tuple[Trainer, dict]:
    spec = ExperimentSpec.model_validate({
        "name": "cost", "data": {"dataset": "tiny"}, "task": "classify",
        "model": {"kind": "mlp", "hidden": list(hidden)},
        "train": {"epochs": epochs, "batch_size": 32, "checkpoint_every_s": 0}})
    trainer = Trainer(spec, tiny_classification(), tmp_path / "run", progress=False)
    return trainer, trainer.run()


def test_measure_cost_counts_and_times_a_trained_mlp(tmp_path):
    trainer, metrics = trained(tmp_path)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rng = torch.get_rng_state()
    start = time.perf_counter()
    cost = measure_cost(trainer, metrics)
    elapsed = time.perf_counter() - start

    # 8 → 32 → 3 with biases: forward 2·(8·32 + 32·3); a step adds the weight gradients (the same again)
    # and the hidden layer's input gradient (2·32·3; the data needs none).
    assert cost["params_total"] == cost["params_trainable"] == 8 * 32 + 32 + 32 * 3 + 3
    assert cost["flops_forward_per_sample"] == 2 * (8 * 32 + 32 * 3)
    assert cost["flops_by_kind"] == {"attention": 0, "projection": 0, "ffn": 0, "convolution": 0, "recurrence": 0,
                                     "other": 2 * (8 * 32 + 32 * 3)}  # a plain MLP's layers are `other`
    assert cost["flops_train_step_per_sample"] == 2 * 2 * (8 * 32 + 32 * 3) + 2 * 32 * 3
    assert cost["train_time_s"] == metrics["train_time_s"] and cost["train_samples_per_s"] > 0
    assert cost["infer_samples_per_s"] > 0 and 0 < cost["latency_ms_p50"] <= cost["latency_ms_p95"]
    assert cost["memory_kind"] == "rss" and cost["peak_memory_mb"] > 10
    assert cost["device"] == "cpu" and cost["peak_flops"] == 5e10
    assert cost["mfu"] == pytest.approx(cost["flops_train_step_per_sample"] * cost["train_samples_per_s"] / 5e10,
                                        rel=1e-3)
    assert "unavailable" not in cost
    assert elapsed < 2.0  # well under a second on an idle machine; CI shares its cores
    # Measuring left the trained model and the random stream as they were.
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    json.dumps(cost, allow_nan=False)


def test_a_failing_measurement_is_null_with_a_reason_not_a_crash(tmp_path):
    trainer, metrics = trained(tmp_path)
    trainer.val_x = trainer.val_x[:, :3]  # inputs the model cannot take: inference timing fails
    cost = measure_cost(trainer, metrics)
    for key in ("infer_samples_per_s", "latency_ms_p50", "latency_ms_p95"):
        assert cost[key] is None and "RuntimeError" in cost["unavailable"][key]
    assert cost["flops_forward_per_sample"] > 0 and cost["mfu"] is not None  # the rest was still measured


def test_peak_flops_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHLAB_CACHE_DIR", str(tmp_path / "fresh"))
    cpu = torch.device("cpu")
    measured = peak_flops(cpu)
    assert 1e8 < measured < 1e14
    cache = json.loads(peak_cache_path().read_text())
    key = peak_key(cpu)
    assert f"threads {torch.get_num_threads()}" in key and torch.__version__ in key
    assert cache[key] == measured
    peak_cache_path().write_text(json.dumps({key: 123.0}))
    assert peak_flops(cpu) == 123.0  # read back, not measured again


def test_a_seq2seq_transformer_is_counted_teacher_forced_with_its_attention(tmp_path):
    from pipeline.data.prepare import Prepared, build_arrays
    from pipeline.specs.datasets import SequenceSource
    arrays, meta = build_arrays("reverse", SequenceSource(source="sequence", samples=120, max_len=5))
    data = Prepared(meta=meta, tensors={k: torch.from_numpy(v) for k, v in arrays.items()})
    spec = ExperimentSpec.model_validate({
        "name": "rev", "data": {"dataset": "reverse"}, "task": "seq2seq",
        "model": {"kind": "transformer", "shape": "encoder_decoder", "d_model": 16, "heads": 2, "layers": 1,
                  "ffn_ratio": 2},
        "train": {"epochs": 1, "batch_size": 32, "checkpoint_every_s": 0}})
    trainer = Trainer(spec, data, tmp_path / "run", progress=False)
    cost = measure_cost(trainer, trainer.run())
    assert "unavailable" not in cost, cost.get("unavailable")
    assert cost["flops_forward_per_sample"] > 0
    kinds = cost["flops_by_kind"]
    assert sum(kinds.values()) == cost["flops_forward_per_sample"]
    assert kinds["attention"] > 0 and kinds["projection"] > 0 and kinds["ffn"] > 0 and kinds["recurrence"] == 0
    Cost.model_validate(cost)  # what train_experiment writes
    # A training step costs about three forward passes (backward ≈ 2×), never less than two.
    assert 2 < cost["flops_train_step_per_sample"] / cost["flops_forward_per_sample"] < 3.5

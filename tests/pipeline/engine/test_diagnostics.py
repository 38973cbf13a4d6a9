"""Diagnostics on real tiny training runs: flags on constructed cases, overfitting verdicts, the numbers
themselves, MLflow output, and a resumed run ending with the same diagnostics."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from pipeline.data.prepare import Prepared
from pipeline.engine.diagnostics import GradientMonitor, make_monitor
from pipeline.engine.verdicts import overfitting, unstable
from pipeline.specs.experiment import DiagnosticsSpec, ExperimentSpec
from models.contract import Model, Phase
from pipeline.engine.train import Trainer, train_experiment
from tests.conftest import tiny_classification


def make_spec(model: dict, data: dict | None = None, diagnostics: dict | None = None, **train) -> ExperimentSpec:
    return ExperimentSpec.model_validate({
        "name": "diag", "data": {"dataset": "tiny", **(data or {})}, "task": "classify", "model": model,
        "train": {"epochs": 3, "batch_size": 32, "checkpoint_every_s": 0, **train},
        "diagnostics": diagnostics or {}})


def run(spec: ExperimentSpec, data: Prepared, run_dir, before=None) -> tuple[dict, dict]:
    trainer = Trainer(spec, data, run_dir, progress=False)
    if before:
        before(trainer.model)
    metrics = trainer.run()
    return metrics, json.loads((run_dir / "diagnostics.json").read_text())


def overlapping_blobs(n: int = 200, features: int = 16, classes: int = 4, seed: int = 0) -> Prepared:
    """Classes whose clouds overlap: a model that memorises the training set pays for it on validation."""
    g = np.random.default_rng(seed)
    centers = g.normal(0, 0.8, size=(classes, features))
    tensors = {}
    for part in ("train", "val", "test"):
        y = g.integers(0, classes, size=n)
        tensors[f"{part}_x"] = torch.tensor(centers[y] + g.normal(0, 1, size=(n, features)), dtype=torch.float32)
        tensors[f"{part}_y"] = torch.tensor(y, dtype=torch.int64)
    meta = {"name": "blobs", "target": "class", "input_shape": [features], "output_size": classes,
            "num_classes": classes, "classes": [str(i) for i in range(classes)],
            "sizes": {p: n for p in ("train", "val", "test")}, "normalisation": {}}
    return Prepared(meta=meta, tensors=tensors)


# ── flags on constructed cases ──────────────────────────────────────────────────────
def test_deep_sigmoid_mlp_vanishes_and_the_relu_residual_twin_does_not(tmp_path):
    deep = {"kind": "mlp", "hidden": [32] * 10}
    _, sigmoid = run(make_spec({**deep, "activation": "sigmoid"}), tiny_classification(), tmp_path / "sigmoid")
    _, residual = run(make_spec({**deep, "activation": "relu", "residual": True}), tiny_classification(),
                      tmp_path / "residual")
    assert sigmoid["flags"]["vanishing"] is True
    assert residual["flags"]["vanishing"] is False
    assert "blocks.0.linear" in sigmoid["flag_details"]["vanishing"]
    # The flag follows the numbers: first layer's norm far below the head's in the sigmoid net only.
    first, head = sigmoid["layers"].index("blocks.0.linear"), sigmoid["layers"].index("head")
    assert sigmoid["grad_norm"]["mean"][0][first] < 1e-4 * sigmoid["grad_norm"]["mean"][0][head]
    first, head = residual["layers"].index("blocks.0.linear"), residual["layers"].index("head")
    assert residual["grad_norm"]["mean"][0][first] > 0.05 * residual["grad_norm"]["mean"][0][head]


def test_a_huge_learning_rate_is_flagged_exploding_and_diverged(tmp_path):
    spec = make_spec({"kind": "mlp", "hidden": [32, 32]}, epochs=5, optimizer={"name": "sgd", "lr": 1e6})
    metrics, diag = run(spec, tiny_classification(), tmp_path)
    assert metrics["status"] == "diverged"
    assert diag["flags"]["diverged"] is True
    assert diag["flags"]["exploding"] is True
    assert diag["overfitting"]["verdict"] == "diverged"
    assert diag["flags"]["dead_units"] is False  # NaN activations are not dead units
    # Strict JSON: the NaN norms of the last epoch are written as null.
    json.loads((tmp_path / "diagnostics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


def test_clipping_shows_as_norms_after_the_clip_beside_those_before(tmp_path):
    """A large initialisation gives gradient norms far above the clip; after it every step's norm is the clip."""
    model = {"kind": "mlp", "hidden": [32, 32], "init": {"scheme": "normal", "std": 1.0}}
    _, diag = run(make_spec(model, grad_clip=0.5, optimizer={"lr": 1e-4}), tiny_classification(), tmp_path / "clip")
    rows = list(csv.DictReader((tmp_path / "clip" / "history.csv").open()))
    assert rows
    for row in rows:
        before, after = float(row["grad_norm/global"]), float(row["grad_norm/global_clipped"])
        assert before > 5 * 0.5, row  # every step was clipped hard ...
        assert after == pytest.approx(0.5, rel=1e-4)  # ... down to the clip
        assert float(row["grad_norm/global_clipped_max"]) <= 0.5 * (1 + 1e-4)
    assert diag["grad_norm"]["global_clipped_mean"] == pytest.approx([0.5] * len(rows), rel=1e-4)
    _, unclipped = run(make_spec(model, optimizer={"lr": 1e-4}), tiny_classification(), tmp_path / "free")
    assert "global_clipped_mean" not in unclipped["grad_norm"]
    assert "grad_norm/global_clipped" not in (tmp_path / "free" / "history.csv").read_text()


def test_a_gradient_spike_far_above_the_running_median_is_exploding(tmp_path):
    """A healthy run, then one weight scaled by 1e4 between epochs: the next epoch's norms jump."""
    spec = make_spec({"kind": "mlp", "hidden": [16]}, epochs=4, batch_size=8,
                     optimizer={"name": "sgd", "lr": 1e-4, "momentum": 0.0})

    def boost_after_epoch_2(trainer):
        def callback(epoch, row):
            if epoch == 2:
                with torch.no_grad():
                    trainer.model.head.weight.mul_(1e4)
        return callback

    trainer = Trainer(spec, tiny_classification(), tmp_path, progress=False)
    trainer.callbacks.append(boost_after_epoch_2(trainer))
    trainer.run()
    diag = json.loads((tmp_path / "diagnostics.json").read_text())
    assert diag["flags"]["exploding"] is True
    assert diag["exploding_events"][0]["epoch"] == 3
    assert diag["nonfinite_gradient_steps"] == 0  # called by the spike, not by a NaN
    assert "running median" in diag["flag_details"]["exploding"]
    quiet = make_spec({"kind": "mlp", "hidden": [16]}, epochs=4, batch_size=8,
                      optimizer={"name": "sgd", "lr": 1e-4, "momentum": 0.0})
    _, calm = run(quiet, tiny_classification(), tmp_path / "calm")
    assert calm["flags"]["exploding"] is False


def test_relus_pushed_below_zero_are_dead_units(tmp_path):
    def kill_first_layer(model):
        with torch.no_grad():
            model.blocks[0].linear.bias.fill_(-1e3)  # every pre-activation negative: ReLU outputs 0, no gradient

    spec = make_spec({"kind": "mlp", "hidden": [32, 32]})
    _, dead = run(spec, tiny_classification(), tmp_path / "dead", before=kill_first_layer)
    _, alive = run(spec, tiny_classification(), tmp_path / "alive")
    acts = dead["activations"]
    assert acts["layers"] == ["blocks.0.act", "blocks.1.act"]
    assert acts["dead_fraction"][-1][0] == 1.0
    assert dead["flags"]["dead_units"] is True and "100%" in dead["flag_details"]["dead_units"]
    assert alive["flags"]["dead_units"] is False


def test_a_tiny_training_subset_with_a_big_model_overfits(tmp_path):
    big = {"kind": "mlp", "hidden": [256, 256]}
    data = overlapping_blobs()
    _, memorised = run(make_spec(big, data={"train_subset": 12}, epochs=30, batch_size=64,
                                 optimizer={"lr": 0.01}), data, tmp_path / "tiny")
    over = memorised["overfitting"]
    assert over["verdict"] == "overfit"
    assert over["onset_epoch"] is not None and over["onset_epoch"] > over["min_val_loss_epoch"]
    assert over["gap_final"]["loss"] > over["gap_best"]["loss"] > 0  # the gap widened after the best epoch
    assert over["gap_final"]["metric"] < 0  # validation accuracy below training accuracy

    _, modest = run(make_spec({"kind": "mlp", "hidden": [8]}, epochs=30, batch_size=64,
                              optimizer={"lr": 0.003}), overlapping_blobs(n=600), tmp_path / "modest")
    assert modest["overfitting"]["verdict"] != "overfit"
    assert modest["overfitting"]["onset_epoch"] is None


# ── the rules, on histories written by hand ───────────────────────────────────────────
def history(train: list[float], val: list[float]) -> list[dict]:
    return [{"epoch": i + 1, "train/loss": t, "val/loss": v, "train/accuracy": 1 - t, "val/accuracy": 1 - v}
            for i, (t, v) in enumerate(zip(train, val))]


def test_verdict_rules():
    spec = DiagnosticsSpec()
    falling = [1.0, 0.6, 0.4, 0.3, 0.25, 0.22, 0.2, 0.19]
    u_curve = overfitting(history(falling, [1.0, 0.7, 0.5, 0.45, 0.5, 0.55, 0.6, 0.7]), spec, "accuracy", 4, False)
    assert (u_curve["verdict"], u_curve["onset_epoch"], u_curve["best_epoch"]) == ("overfit", 5, 4)
    assert u_curve["gap_best"] == pytest.approx({"loss": 0.15, "metric": -0.15})
    assert u_curve["gap_final"] == pytest.approx({"loss": 0.51, "metric": -0.51})

    still_learning = overfitting(history([1.0, 0.8, 0.6, 0.45, 0.35], [1.0, 0.8, 0.6, 0.45, 0.35]), spec,
                                 "accuracy", 5, False)
    assert still_learning["verdict"] == "underfit" and still_learning["onset_epoch"] is None
    barely = overfitting(history([2.30, 2.29, 2.29, 2.28, 2.28], [2.30, 2.29, 2.29, 2.28, 2.28]), spec, None, None,
                         False)
    assert barely["verdict"] == "underfit" and "only 1%" in barely["rule"]

    settled = [1.0, 0.5, 0.3, 0.3, 0.299, 0.299, 0.298]
    assert overfitting(history(settled, [1.0, 0.5, 0.32, 0.31, 0.31, 0.312, 0.311]), spec, "accuracy", 5,
                       False)["verdict"] == "good fit"
    # Early stopping cut the U-curve short, but validation loss is 3x the training loss and accuracy 30 points off.
    cut_short = overfitting(history([1.0, 0.5, 0.3, 0.25], [1.0, 0.8, 0.78, 0.76]), spec, "accuracy", 4, False)
    assert cut_short["onset_epoch"] is None and cut_short["verdict"] == "overfit"
    # A rise within the tolerance is noise, not overfitting.
    assert overfitting(history(falling, [1, .7, .5, .45, .46, .47, .46, .48]), spec, None, None,
                       False)["onset_epoch"] is None


def test_a_creeping_validation_loss_with_a_small_metric_gap_is_not_overfit():
    """Validation loss rising from a tiny value (confident mistakes) while accuracy stays within a point."""
    train = [1.0, 0.5, 0.2, 0.06, 0.05, 0.045, 0.04]
    val = [1.0, 0.5, 0.2, 0.1, 0.12, 0.14, 0.16]
    rows = [{"epoch": i + 1, "train/loss": t, "val/loss": v, "train/accuracy": 0.99, "val/accuracy": 0.98}
            for i, (t, v) in enumerate(zip(train, val))]
    verdict = overfitting(rows, DiagnosticsSpec(), "accuracy", 4, False)
    assert verdict["onset_epoch"] == 5  # the onset is still reported
    assert verdict["verdict"] == "good fit"
    assert overfitting(rows, DiagnosticsSpec(overfit_gap=0.005), "accuracy", 4, False)["verdict"] == "overfit"


def test_unstable_is_oscillation_not_a_fall_nor_plateau_noise():
    assert unstable([1.0, 0.8, 0.6, 0.5, 0.45], 0.25)[0] is False
    assert unstable([1.0, 0.5, 0.9, 0.4, 0.85, 0.45], 0.25)[0] is True
    assert unstable([1.0, 1.1, 1.05, 1.2], 0.25)[0] is True  # never fell
    # A long plateau with small noise: its rises add up, but it never gives back much of its gain.
    assert unstable([1.0, 0.5] + [0.30, 0.31] * 40, 0.25)[0] is False


# ── the numbers themselves ───────────────────────────────────────────────────────────
class SequentialModel(Model, nn.Sequential):
    """An nn.Sequential that speaks the model contract (its default hooks)."""


class TwoPhase(Model):
    """Two independent linear maps, each trained by its own phase (the shape of a GAN's two players)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))

    def forward(self, x):
        return self.a(x).sum(1) + self.b(x).sum(1)

    def training_phases(self, task_loss=None):
        return [Phase("a", list(self.a.parameters()), lambda m, x, y: ((m.a(x) - 1) ** 2).mean()),
                Phase("b", list(self.b.parameters()), lambda m, x, y: (m.b(x) ** 2).mean())]


def test_per_layer_norms_and_update_ratio_match_a_hand_computation():
    torch.manual_seed(0)
    model = TwoPhase()
    x = torch.randn(64, 4)
    monitor = make_monitor(DiagnosticsSpec(), model, model.training_phases(), x[:16], None)
    assert isinstance(monitor, GradientMonitor)
    assert monitor.index.names == ["a", "b.0", "b.2"] and monitor.index.layer_phase == ["a", "b", "b"]
    opts = {ph.name: torch.optim.SGD(ph.params, lr=0.1) for ph in model.training_phases()}
    expected = []  # per step: norm of each layer's gradient in its own phase
    before = after = None
    for step in range(4):
        xb = x[16 * step:16 * (step + 1)]
        if step == 0:
            before = [p.detach().clone() for p in model.parameters()]
        norms = {}
        for phase in model.training_phases():
            opts[phase.name].zero_grad()
            phase.loss(model, xb, None).backward()
            monitor.after_backward(phase.name)
            for layer, module in (("a", model.a), ("b.0", model.b[0]), ("b.2", model.b[2])):
                if layer.startswith(phase.name):
                    norms[layer] = torch.cat([p.grad.flatten() for p in module.parameters()]).norm().item()
            opts[phase.name].step()
        monitor.after_step()
        if step == 0:
            after = [p.detach().clone() for p in model.parameters()]
        expected.append([norms["a"], norms["b.0"], norms["b.2"]])
    row = monitor.end_epoch(1)
    got = monitor.state
    want = np.array(expected)
    np.testing.assert_allclose(got["grad_mean"][0], want.mean(0), rtol=1e-5)
    np.testing.assert_allclose(got["grad_min"][0], want.min(0), rtol=1e-5)
    np.testing.assert_allclose(got["grad_max"][0], want.max(0), rtol=1e-5)
    global_norms = np.sqrt((want ** 2).sum(1))
    assert row["grad_norm/global"] == pytest.approx(global_norms.mean(), rel=1e-5)
    assert row["grad_norm/global_max"] == pytest.approx(global_norms.max(), rel=1e-5)
    # Update ratio on the first step of epoch 1: |w_after - w_before| / |w_before| per layer (a: 2 tensors).
    delta_a = torch.cat([(after[i] - before[i]).flatten() for i in (0, 1)]).norm()
    assert got["update_ratio"][0][0] == pytest.approx((delta_a / torch.cat([before[0].flatten(), before[1]]).norm())
                                                      .item(), rel=1e-5)
    assert monitor.state["measure_at"] == 2  # next epoch measures its middle step
    assert got["act_layers"] == ["b.1"] and len(got["act_dead"][0]) == 1


def test_the_probe_leaves_no_hooks_and_restores_every_mode():
    model = SequentialModel(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))
    model.train()
    model[2].eval()  # a submodule deliberately in eval mode must stay so
    monitor = make_monitor(DiagnosticsSpec(), model, model.training_phases(lambda m, x, y: None), torch.randn(8, 4), None)
    rng = torch.get_rng_state()
    monitor.end_epoch(1)
    assert all(not m._forward_hooks for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, True, False, True]
    assert torch.equal(torch.get_rng_state(), rng)
    assert monitor.state["act_layers"] == ["1"]


def test_diagnostics_off_still_judges_the_fit(tmp_path):
    _, diag = run(make_spec({"kind": "mlp", "hidden": [16]}, diagnostics={"enabled": False}), tiny_classification(),
                  tmp_path)
    assert diag["enabled"] is False
    assert diag["overfitting"]["verdict"] in ("underfit", "good fit", "overfit")
    assert set(diag["flags"]) == {"vanishing", "exploding", "dead_units", "unstable", "diverged"}


# ── resume and MLflow ────────────────────────────────────────────────────────────────
class Interrupt(Exception):
    pass


def test_a_resumed_run_ends_with_the_same_diagnostics(tmp_path):
    spec = make_spec({"kind": "mlp", "hidden": [32, 32], "dropout": 0.2}, epochs=5, batch_size=16)
    data = tiny_classification()
    _, straight = run(spec, data, tmp_path / "straight")

    def stop_at_3(epoch, row):
        if epoch == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        Trainer(spec, data, tmp_path / "resumed", callbacks=[stop_at_3], progress=False).run()
    _, resumed = run(spec, data, tmp_path / "resumed")
    assert resumed == straight
    assert resumed["epochs"] == [1, 2, 3, 4, 5] and len(resumed["update_ratio"]) == 5


@pytest.mark.slow
def test_layer_norms_reach_mlflow_and_flags_become_tags(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec_file = tmp_path / "diag.yaml"
    spec_file.write_text("name: diag\n")
    metrics = train_experiment(make_spec({"kind": "mlp", "hidden": [16]}), spec_file, tiny_classification(),
                               tmp_path / "run", store, progress=False)
    client = MlflowClient(store)
    run_id = metrics["mlflow_run_id"]
    for layer in ("blocks.0.linear", "head"):
        assert [m.step for m in client.get_metric_history(run_id, f"grad_norm/{layer}")] == [1, 2, 3]
    assert len(client.get_metric_history(run_id, "grad_norm/global")) == 3
    tags = client.get_run(run_id).data.tags
    assert tags["diagnostics/vanishing"] == "false" and tags["diagnostics/diverged"] == "false"
    assert tags["diagnostics/verdict"] in ("underfit", "good fit", "overfit")
    header = (tmp_path / "run" / "history.csv").read_text().splitlines()[0].split(",")
    assert "grad_norm/global" in header and not any(h.startswith("grad_norm/blocks") for h in header)

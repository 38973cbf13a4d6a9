"""GANs (mlp and dcgan): the two players' phases and losses, the bounded generator output, and spec checks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.base import ArchitectureError
from models.contract import Model
from models.gan import GANSpec, RangeTanh, discriminator_loss, generator_loss
from models.registry import DataShape
from pipeline.cli import main
from pipeline.engine.tasks import make_task
from tests.conftest import validate_error
from tests.conftest import write_spec as write_spec_file

LOW, HIGH = -0.8, 1.8
DIGITS = DataShape(input_shape=(1, 8, 8), output_size=10, value_range=(LOW, HIGH))
ARCHS = ["mlp", "dcgan"]


def gan(arch: str = "mlp", shape: DataShape = DIGITS, **fields):
    sizes = {"hidden": [32, 32]} if arch == "mlp" else {"channels": [8, 16]}
    return build_model(GANSpec(kind="gan", arch=arch, latent=8, **{**sizes, **fields}), shape)


def real_batch(n: int = 32, seed: int = 0) -> torch.Tensor:
    """Digit-like images in the data's range: a bright stroke on a dark ground."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 1, 8, 8), LOW)
    cols = torch.randint(1, 7, (n,), generator=g)
    x[torch.arange(n), 0, 1:7, cols] = HIGH
    return x


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ── the players ──────────────────────────────────────────────────────────────
@pytest.mark.parametrize("arch", ARCHS)
def test_gan_builds_and_both_players_run_forward_and_backward(arch):
    torch.manual_seed(0)
    model = gan(arch)
    x = real_batch(6)
    z = model.noise(6, x.device)
    fake = model(z)
    assert z.shape == (6, 8) and fake.shape == (6, 1, 8, 8)
    logits = model.discriminator(torch.cat([x, fake]))
    assert logits.shape == (12,)
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.example_forward(x).shape == x.shape


@pytest.mark.parametrize("arch", ARCHS)
def test_the_phases_split_the_parameters_between_the_players(arch):
    model = gan(arch)
    phases = make_task("generate").phases(model)
    assert [p.name for p in phases] == ["discriminator", "generator"]
    d, g = ({id(p) for p in phase.params} for phase in phases)
    assert d == {id(p) for p in model.discriminator.parameters()}
    assert g == {id(p) for p in model.generator.parameters()}
    assert not d & g and d | g == {id(p) for p in model.parameters()}
    spec_rates = gan(arch, d_lr=1e-3, g_lr=3e-4, g_betas=(0.1, 0.9)).training_phases()
    assert [(p.lr, p.betas) for p in spec_rates] == [(1e-3, (0.5, 0.999)), (3e-4, (0.1, 0.9))]


@pytest.mark.parametrize("arch", ARCHS)
def test_each_phase_moves_only_its_own_player(arch):
    """The engine's loop (pipeline/train.py): per phase, zero its grads, backward its loss, step its optimizer."""
    torch.manual_seed(0)
    model = gan(arch).train()
    phases = model.training_phases()
    opts = [torch.optim.Adam(p.params, lr=1e-3, betas=p.betas) for p in phases]
    d_params, g_params = list(model.discriminator.parameters()), list(model.generator.parameters())
    x = real_batch(16)
    for _ in range(3):
        for phase, opt in zip(phases, opts):
            d_before, g_before = snapshot(d_params), snapshot(g_params)
            opt.zero_grad(set_to_none=True)
            g_grads = [None if p.grad is None else p.grad.clone() for p in g_params]  # from G's last phase
            loss, stats = phase.loss(model, x, None)
            assert torch.isfinite(loss)
            loss.backward()
            if phase.name == "discriminator":
                assert all((p.grad is None) if old is None else torch.equal(p.grad, old)
                           for p, old in zip(g_params, g_grads)), "G's samples must be detached in D's phase"
                assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d_params)
                assert set(stats) == {"d_loss", "d_real", "d_fake", "n"}
            else:
                assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g_params)
                assert set(stats) == {"g_loss", "n"}
            opt.step()
            d_moved, g_moved = not same(d_before, d_params), not same(g_before, g_params)
            assert (d_moved, g_moved) == ((True, False) if phase.name == "discriminator" else (False, True))


@pytest.mark.parametrize("arch", ARCHS)
def test_a_few_discriminator_steps_on_fixed_fakes_lower_its_loss(arch):
    torch.manual_seed(0)
    model = gan(arch).train()
    real = real_batch(32)
    with torch.no_grad():
        fake = model(model.noise(32, real.device))
    opt = torch.optim.Adam(model.discriminator.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss, stats = discriminator_loss(model.discriminator(real), model.discriminator(fake))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(2 * math.log(2), abs=0.3)  # an untrained D is near chance: D ≈ ½
    assert losses[-1] < 0.5 * losses[0], losses
    assert stats["d_real"] / stats["n"] > 0.5 > stats["d_fake"] / stats["n"]


# ── the losses against their formulas ────────────────────────────────────────
LOGITS = torch.tensor([-6.0, -1.5, -0.2, 0.0, 0.7, 4.0], dtype=torch.float64)


def test_generator_losses_equal_their_formulas():
    d = torch.sigmoid(LOGITS)  # D(G(z))
    minimax, stats = generator_loss(LOGITS, "minimax")
    torch.testing.assert_close(minimax, torch.log(1 - d).mean())
    non_saturating, _ = generator_loss(LOGITS, "non_saturating")
    torch.testing.assert_close(non_saturating, -torch.log(d).mean())
    assert stats["n"].item() == 6
    torch.testing.assert_close(stats["g_loss"], 6 * minimax)


def test_discriminator_loss_equals_its_formula():
    real, fake = LOGITS, LOGITS.flip(0)[:4] * 0.5
    loss, stats = discriminator_loss(real, fake)
    expected = -torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stats["d_real"], torch.sigmoid(real).sum())
    torch.testing.assert_close(stats["d_fake"], torch.sigmoid(fake).sum())
    assert stats["n"].item() == len(real)


def test_the_minimax_loss_saturates_where_the_non_saturating_one_does_not():
    """Early in training D rejects G's samples (logit ≪ 0): log(1 − D) has almost no gradient there."""
    grads = {}
    for kind in ("minimax", "non_saturating"):
        logit = torch.tensor([-8.0], requires_grad=True)
        generator_loss(logit, kind)[0].backward()
        grads[kind] = logit.grad.item()
    assert grads["minimax"] == pytest.approx(-torch.sigmoid(torch.tensor(-8.0)).item())  # ≈ −3e-4
    assert grads["non_saturating"] == pytest.approx(-1.0, abs=1e-3)
    assert abs(grads["non_saturating"]) > 1000 * abs(grads["minimax"])


def test_losses_stay_finite_at_extreme_logits():
    extreme = torch.tensor([-200.0, 200.0])
    for kind in ("minimax", "non_saturating"):
        assert torch.isfinite(generator_loss(extreme, kind)[0])
    loss, _ = discriminator_loss(extreme, extreme)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(F.softplus(torch.tensor(200.0)).item())


# ── the generator's bounded output ───────────────────────────────────────────
def test_range_tanh_maps_the_real_line_onto_the_data_range():
    out = RangeTanh(LOW, HIGH)(torch.tensor([-60.0, 0.0, 60.0]))
    torch.testing.assert_close(out, torch.tensor([LOW, (LOW + HIGH) / 2, HIGH]))


@pytest.mark.parametrize("arch", ARCHS)
def test_a_bounded_generator_spans_the_data_range(arch):
    torch.manual_seed(0)
    model = gan(arch).eval()
    assert isinstance(model.generator.body[-1], RangeTanh)
    samples = model.sample(64)
    assert samples.min() >= LOW and samples.max() <= HIGH
    last = [m for m in model.generator.modules() if isinstance(m, (torch.nn.Linear, torch.nn.ConvTranspose2d))][-1]
    with torch.no_grad():
        last.weight.mul_(1000)  # drive the tanh into saturation: both ends of the range are reached
    samples = model.sample(64)
    assert samples.min() == pytest.approx(LOW, abs=1e-4) and samples.max() == pytest.approx(HIGH, abs=1e-4)


def test_a_linear_generator_or_an_unknown_range_is_unbounded():
    for model in (gan(output="linear"), gan(shape=DataShape(input_shape=(1, 8, 8), output_size=10))):
        assert not any(isinstance(m, RangeTanh) for m in model.modules())
        with torch.no_grad():
            model.generator.body[-2].weight.mul_(1000)  # the last Linear, before the identity output
        samples = model.eval().sample(64)
        assert samples.max() > HIGH + 1 or samples.min() < LOW - 1


# ── sampling, shapes and architecture errors ─────────────────────────────────
def test_samples_are_seeded_and_adversarial_stats_report_both_players():
    torch.manual_seed(0)
    model = gan("dcgan").eval()
    a, b = model.sample(4, torch.Generator().manual_seed(0)), model.sample(4, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, model.sample(4, torch.Generator().manual_seed(1)))
    stats = model.adversarial_stats(real_batch(4), a)
    assert set(stats) == {"d_loss", "d_real", "d_fake", "g_loss", "n"}
    summary = make_task("generate").summarize({k: v.item() for k, v in stats.items()})
    assert set(summary) == {"d_loss", "d_real", "d_fake", "g_loss"}
    assert 0 < summary["d_real"] < 1 and summary["d_loss"] > 0


def test_dcgan_structure_and_odd_image_sizes():
    model = gan("dcgan", DataShape(input_shape=(3, 7, 5), output_size=1, value_range=(0.0, 1.0)))
    assert model.sample(2).shape == (2, 3, 7, 5)
    assert model.discriminator(torch.randn(2, 3, 7, 5)).shape == (2,)
    norms = [m for m in model.discriminator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 1  # DCGAN: none on the layer that sees the image
    no_bn = gan("dcgan", batch_norm=False)
    assert not any(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) for m in no_bn.modules())


def test_dcgan_refuses_signals_and_too_many_stages():
    with pytest.raises(ArchitectureError) as err:
        gan("dcgan", DataShape(input_shape=(40,), output_size=10))
    assert err.value.field == "model.arch"
    with pytest.raises(ArchitectureError) as err:
        gan("dcgan", channels=[2, 2, 2, 2])
    assert err.value.field == "model.channels"
    assert gan("mlp", DataShape(input_shape=(40,), output_size=10)).sample(3).shape == (3, 40)


class LinearModel(Model, torch.nn.Linear):
    """A model with the contract's default single phase: not something that can play a game."""


def test_generate_needs_a_model_with_phases():
    model = LinearModel(2, 2)
    (phase,) = make_task("generate").phases(model)
    with pytest.raises(TypeError, match="needs a model that trains in its own phases; LinearModel has none"):
        phase.loss(model, torch.zeros(1, 2), None)


# ── specs through the real loader ────────────────────────────────────────────
MODEL = "kind: gan, latent: 8"  # the smallest valid one; tests append fields


def write_spec(folder, dataset="digits", task="generate", extra=""):
    return write_spec_file(folder, MODEL + extra, dataset, task)


@pytest.mark.parametrize("extra", [", arch: dcgan, channels: [8, 16], loss: minimax",
                                   ", hidden: [32], output: linear, g_betas: [0.0, 0.9]"], ids=["dcgan", "mlp"])
def test_a_valid_gan_spec(extra, project, capsys):
    assert main(["validate", write_spec(project, extra=extra)]) == 0
    out = capsys.readouterr().out
    assert "gan for generate on digits" in out and "output (1, 8, 8)" in out, out


@pytest.mark.parametrize("dataset,task,extra,field,words", [
    ("digits", "generate", ", channels: [8]", "model", "channels applies to arch dcgan only"),
    ("digits", "generate", ", arch: dcgan, hidden: [8]", "model", "hidden applies to arch mlp only"),
    ("digits", "generate", ", g_betas: [0.5, 1.0]", "model.g_betas[1]", "less than 1"),
    ("digits", "generate", ", leaky_slope: -0.1", "model.leaky_slope", "greater than or equal to 0"),
    ("digits", "generate", ", loss: wasserstein", "model.loss", "'minimax' or 'non_saturating'"),
    ("digits", "generate", ", arch: dcgan, channels: [4, 4, 4, 4]", "model.channels", "do not fit"),
    ("diabetes", "generate", ", arch: dcgan", "model.arch", "needs (C, H, W) images"),
    ("digits", "classify", "", None, "cannot serve task 'classify'"),
])
def test_invalid_gan_specs(dataset, task, extra, field, words, project, capsys):
    err = validate_error(write_spec(project, dataset, task, extra), capsys)
    assert words in err, err
    if field:
        assert f"t.yaml: {field}: " in err, err
    else:
        assert "Valid pairs: " in err and "gan: generate" in err and "mlp: classify" in err, err

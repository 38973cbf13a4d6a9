"""Autoencoders (ae, dae, vae; mlp and conv): a few training steps, the VAE's KL and likelihood against
torch.distributions, the reparameterisation trick, the denoising corruption, and spec checks."""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from models import build_model
from models.autoencoder import AutoencoderSpec, corrupt, gaussian_nll, kl_to_standard_normal
from models.base import ArchitectureError
from models.registry import DataShape
from pipeline.cli import main
from pipeline.engine.tasks import make_task
from tests.conftest import validate_error, write_spec as write_spec_file

DIGITS = DataShape(input_shape=(1, 8, 8), output_size=10, value_range=(-0.8, 1.8))
VARIANTS = [(v, a) for v in ("ae", "dae", "vae") for a in ("mlp", "conv")]


def autoencoder(variant: str = "ae", arch: str = "mlp", shape: DataShape = DIGITS, **fields):
    sizes = {"hidden": [32]} if arch == "mlp" else {"channels": [4, 8]}
    return build_model(AutoencoderSpec(kind="autoencoder", variant=variant, arch=arch, latent=4,
                                       **{**sizes, **fields}), shape)


def digit_like(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 1, 8, 8) images on a 3-dimensional manifold: a small code can reconstruct them."""
    g = torch.Generator().manual_seed(seed)
    codes, basis = torch.randn(n, 3, generator=g), torch.randn(3, 64, generator=g)
    return torch.tanh(codes @ basis / math.sqrt(3)).reshape(n, 1, 8, 8)


# ── every variant trains ─────────────────────────────────────────────────────
@pytest.mark.parametrize("variant,arch", VARIANTS, ids=[f"{v}-{a}" for v, a in VARIANTS])
def test_autoencoder_trains_a_few_steps_and_its_loss_falls(variant, arch):
    torch.manual_seed(0)
    model = autoencoder(variant, arch, **({"likelihood_std": 0.3} if variant == "vae" else {}))
    x = digit_like(16)
    assert model(x).shape == x.shape
    (phase,) = make_task("reconstruct").phases(model)
    assert {id(p) for p in phase.params} == {id(p) for p in model.parameters()}
    opt = torch.optim.Adam(phase.params, lr=1e-2)
    losses, mses = [], []
    model.train()
    for _ in range(40):
        opt.zero_grad()
        loss, stats = phase.loss(model, x, None)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in phase.params)
        opt.step()
        losses.append(loss.item())
        mses.append((stats["sse"] / stats["elements"]).item())
    assert set(stats) >= ({"sse", "elements", "n", "loss", "nll", "kl"} if variant == "vae"
                          else {"sse", "elements", "n", "loss"})
    assert losses[-1] < losses[0] - 0.3 * abs(losses[0]), losses
    assert mses[-1] < 0.75 * mses[0], mses  # the mlp variants fall far more (to 2-10%); conv ones more slowly


def test_the_ae_loss_is_the_mean_squared_error_and_the_vae_loss_the_negative_elbo():
    torch.manual_seed(0)
    x = digit_like(6)
    ae = autoencoder("ae").eval()
    (phase,) = make_task("reconstruct").phases(ae)
    loss, _ = phase.loss(ae, x, None)
    torch.testing.assert_close(loss, (ae(x) - x).pow(2).mean())

    vae = autoencoder("vae", likelihood_std=0.5, beta=2.0).eval()  # eval: z = μ, so the loss is deterministic
    (phase,) = make_task("reconstruct").phases(vae)
    loss, stats = phase.loss(vae, x, None)
    recon, mu, logvar = vae.reconstruct(x)
    nll = -Normal(recon, 0.5).log_prob(x).flatten(1).sum(1)
    kl = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(loss, (nll + 2.0 * kl).mean())
    torch.testing.assert_close(stats["kl"], kl.sum())
    torch.testing.assert_close(stats["nll"], nll.sum())


# ── the VAE's pieces against torch.distributions ─────────────────────────────
def test_kl_to_standard_normal_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = 2 * torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g,
                                                                                      dtype=torch.float64)
    exact = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(dim=1)
    torch.testing.assert_close(kl_to_standard_normal(mu, logvar), exact)
    zero = kl_to_standard_normal(torch.zeros(3, 4), torch.zeros(3, 4))
    assert torch.equal(zero, torch.zeros(3))  # q = N(0, I) exactly: no divergence


@pytest.mark.parametrize("std", [1.0, 0.3, 2.5])
def test_gaussian_nll_matches_normal_log_prob(std):
    g = torch.Generator().manual_seed(1)
    x, mean = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 1, 8, 8, generator=g,
                                                                                    dtype=torch.float64)
    exact = -Normal(mean, std).log_prob(x).flatten(1).sum(dim=1)
    torch.testing.assert_close(gaussian_nll(x, mean, std), exact)


def test_reparameterisation_is_reproducible_and_has_the_right_moments():
    n = 20000
    mu = torch.tensor([1.0, -2.0, 0.5]).expand(n, 3).clone().requires_grad_()
    sigma = torch.tensor([0.5, 2.0, 1.0])
    logvar = (2 * sigma.log()).expand(n, 3).clone().requires_grad_()
    model = autoencoder("vae")

    def draw(seed: int) -> torch.Tensor:
        return model.reparameterise(mu, logvar, torch.Generator().manual_seed(seed))

    z = draw(0)
    assert torch.equal(z, draw(0)) and not torch.equal(z, draw(1))
    torch.testing.assert_close(z.mean(0), mu[0].detach(), atol=0.05, rtol=0)  # 4σ/√n is at most 0.06 for σ=2
    torch.testing.assert_close(z.std(0), sigma, rtol=0.03, atol=0)
    # The noise sits outside the gradient's path: ∂z/∂μ = 1 and ∂z/∂logvar = ½σε = ½(z − μ).
    z.sum().backward()
    assert torch.equal(mu.grad, torch.ones_like(mu))
    torch.testing.assert_close(logvar.grad, 0.5 * (z - mu).detach())


def test_a_vae_samples_in_training_and_uses_the_mean_in_evaluation():
    torch.manual_seed(0)
    model, x = autoencoder("vae"), digit_like(4)
    model.eval()
    recon, mu, logvar = model.reconstruct(x)
    assert logvar is not None and mu.shape == logvar.shape == (4, 4)
    torch.testing.assert_close(recon, model.decode(mu))
    torch.testing.assert_close(model.reconstruct(x)[0], recon)
    model.train()
    assert not torch.allclose(model.reconstruct(x)[0], recon)


def test_vae_samples_are_seeded_and_only_a_vae_samples():
    torch.manual_seed(0)
    vae = autoencoder("vae", "conv")
    a, b = vae.sample(5, torch.Generator().manual_seed(3)), vae.sample(5, torch.Generator().manual_seed(3))
    assert a.shape == (5, 1, 8, 8) and torch.equal(a, b)
    with pytest.raises(ValueError, match="only a vae can sample"):
        autoencoder("ae").sample(2)


# ── the denoising corruption ─────────────────────────────────────────────────
@pytest.mark.parametrize("level", [0.1, 0.5, 2.0])
def test_gaussian_corruption_adds_noise_of_std_level(level):
    x = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    noisy = corrupt(x, "gaussian", level, torch.Generator().manual_seed(1))
    noise = noisy - x
    assert noisy.shape == x.shape
    assert abs(noise.mean().item()) < 0.05 * level
    assert noise.std().item() == pytest.approx(level, rel=0.03)
    assert torch.equal(noisy, corrupt(x, "gaussian", level, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("level", [0.1, 0.25, 0.6])
def test_masking_sets_a_level_fraction_to_the_batchs_lowest_value(level):
    x = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    noisy = corrupt(x, "masking", level, torch.Generator().manual_seed(1))
    changed = noisy != x
    assert changed.float().mean().item() == pytest.approx(level, abs=0.01)
    assert torch.all(noisy[changed] == x.min())  # "off" pixels
    assert torch.equal(noisy[~changed], x[~changed])
    assert torch.equal(noisy, corrupt(x, "masking", level, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("level", [0.1, 0.3])
def test_salt_and_pepper_sets_a_level_fraction_to_the_extremes_half_each(level):
    x = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    noisy = corrupt(x, "salt_and_pepper", level, torch.Generator().manual_seed(1))
    changed = noisy != x
    assert changed.float().mean().item() == pytest.approx(level, abs=0.01)
    salt, pepper = (noisy[changed] == x.max()).sum().item(), (noisy[changed] == x.min()).sum().item()
    assert salt + pepper == changed.sum().item()
    assert salt / (salt + pepper) == pytest.approx(0.5, abs=0.05)
    assert torch.equal(noisy[~changed], x[~changed])


def encoder_inputs(model, x: torch.Tensor) -> torch.Tensor:
    """What the encoder sees when the model reconstructs x (recorded by a forward pre-hook)."""
    seen = []
    handle = model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        model.reconstruct(x)
    finally:
        handle.remove()
    return seen[0].reshape(x.shape)


@pytest.mark.parametrize("noise,level", [("gaussian", 0.5), ("masking", 0.3), ("salt_and_pepper", 0.2)])
def test_a_dae_corrupts_its_input_in_training_only(noise, level):
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    dae = autoencoder("dae", noise=noise, noise_level=level)
    dae.train()
    seen = encoder_inputs(dae, x)
    if noise == "gaussian":
        assert (seen - x).std().item() == pytest.approx(level, rel=0.1)
    else:
        assert (seen != x).float().mean().item() == pytest.approx(level, abs=0.04)
    dae.eval()
    assert torch.equal(encoder_inputs(dae, x), x)
    plain = autoencoder("ae").train()  # a plain autoencoder never corrupts
    assert torch.equal(encoder_inputs(plain, x), x)


# ── shapes and architecture errors ───────────────────────────────────────────
@pytest.mark.parametrize("shape", [(1, 7, 7), (3, 9, 6), (2, 8, 8)])
def test_conv_autoencoder_restores_odd_and_even_sizes(shape):
    model = autoencoder("vae", "conv", DataShape(input_shape=shape, output_size=1))
    x = torch.randn(2, *shape)
    assert model(x).shape == x.shape and model.sample(3).shape == (3, *shape)


def test_mlp_autoencoder_on_signals_and_conv_refuses_them():
    signals = DataShape(input_shape=(40,), output_size=10)
    assert autoencoder("dae", "mlp", signals)(torch.randn(3, 40)).shape == (3, 40)
    with pytest.raises(ArchitectureError) as err:
        autoencoder("ae", "conv", signals)
    assert err.value.field == "model.arch"
    with pytest.raises(ArchitectureError) as err:
        autoencoder("ae", "conv", channels=[2, 2, 2, 2])  # 8 → 4 → 2 → 1 → 0
    assert err.value.field == "model.channels"


# ── specs through the real loader ────────────────────────────────────────────
MODEL = "kind: autoencoder, latent: 4"  # the smallest valid one; tests append fields


def write_spec(folder, dataset="digits", task="reconstruct", extra=""):
    return write_spec_file(folder, MODEL + extra, dataset, task)


@pytest.mark.parametrize("extra", [", variant: vae, arch: conv, channels: [8, 16], beta: 0.5",
                                   ", variant: dae, noise: masking, noise_level: 0.25, hidden: [32]",
                                   ", variant: ae, noise: masking, noise_level: 0.25"],
                         ids=["vae-conv", "dae-mlp", "ae-scored-on-masking"])
def test_a_valid_autoencoder_spec(extra, project, capsys):
    assert main(["validate", write_spec(project, extra=extra)]) == 0
    out = capsys.readouterr().out
    assert "autoencoder for reconstruct on digits" in out and "output (1, 8, 8)" in out, out


@pytest.mark.parametrize("dataset,task,extra,field,words", [
    ("digits", "reconstruct", ", variant: vae, noise: masking", "model", "noise applies to variant ae or dae only"),
    ("digits", "reconstruct", ", channels: [8]", "model", "channels applies to arch conv only"),
    ("digits", "reconstruct", ", variant: dae, noise: masking, noise_level: 1.5", "model",
     "noise_level is the fraction of entries masking corrupts: it must be below 1"),
    ("digits", "reconstruct", ", variant: vae, likelihood_std: 0", "model.likelihood_std", "greater than 0"),
    ("digits", "reconstruct", ", arch: conv, channels: [4, 4, 4, 4]", "model.channels", "do not fit"),
    ("diabetes", "reconstruct", ", arch: conv", "model.arch", "needs (C, H, W) images"),
    ("digits", "reconstruct", ", variant: sparse", "model.variant", "'ae', 'dae' or 'vae'"),
    ("digits", "classify", "", None, "cannot serve task 'classify'"),
])
def test_invalid_autoencoder_specs(dataset, task, extra, field, words, project, capsys):
    err = validate_error(write_spec(project, dataset, task, extra), capsys)
    assert words in err, err
    if field:
        assert f"t.yaml: {field}: " in err, err
    else:
        assert "Valid pairs: " in err and "autoencoder: reconstruct" in err, err

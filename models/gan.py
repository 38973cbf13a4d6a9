"""Generative adversarial network (Goodfellow et al., 2014): a generator G and a discriminator D.

G maps noise z ~ N(0, I) to a sample G(z); D gives a logit, the log-odds that its input is real. They play
min_G max_D  E_x[log D(x)] + E_z[log(1 − D(G(z)))], one optimisation phase each per batch:

- discriminator phase: minimise −log D(x) − log(1 − D(G(z))), with G(z) held fixed (detached);
- generator phase: `minimax` minimises log(1 − D(G(z))) as in the game above, whose gradient vanishes while
  D easily rejects G's samples (early in training); `non_saturating` minimises −log D(G(z)) instead (the
  paper's practical variant): the same fixed point, strong gradients when G is poor.

The model announces the two phases with `training_phases()` (each its own parameters, loss, learning rate
and Adam betas), so the engine runs two optimizers without knowing what a GAN is.
arch `mlp`: fully connected G and D. arch `dcgan` (Radford et al., 2016): G projects z to a small grid and
doubles it with transposed convolutions (batch norm + ReLU); D halves the image with stride-2 convolutions
(batch norm after the first, LeakyReLU), no pooling. G's output is DCGAN's tanh, rescaled from [−1, 1] to the
training data's value range (prepare's normalised units): backgrounds can be exactly "off", as in real images.
"""
from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt, model_validator
from torch import nn

from models.base import ArchitectureError, reject_fields_set_in_vain
from models.contract import LossFn, Model, ModelSpecBase, Phase
from models.layers.resampling import conv_down, conv_up, halving_sizes
from models.registry import DataShape, register

GanLoss = Literal["minimax", "non_saturating"]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


# ── blocks ────────────────────────────────────────────────────────────────────
def _norm1d(width: int, on: bool) -> nn.Module:
    return nn.BatchNorm1d(width) if on else nn.Identity()


def _norm2d(channels: int, on: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if on else nn.Identity()


class RangeTanh(nn.Module):
    """tanh rescaled from [−1, 1] to [low, high]: the generator's output spans exactly the data's range."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low, self.high = low, high

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.low + (self.high - self.low) * (torch.tanh(h) + 1.0) / 2.0


def output_layer(value_range: tuple[float, float] | None) -> nn.Module:
    """RangeTanh over the data's range; linear (identity) when the range is not known."""
    return RangeTanh(*value_range) if value_range else nn.Identity()


class MLPGenerator(nn.Module):
    """z (B, latent) → Linear [→ BatchNorm] → ReLU per hidden width → Linear → output → (B, *output_shape)."""

    def __init__(self, latent: int, hidden: list[int], output_shape: tuple[int, ...], batch_norm: bool,
                 value_range: tuple[float, float] | None):
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip([latent, *hidden], hidden):
            layers += [nn.Linear(a, b), _norm1d(b, batch_norm), nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.Linear(hidden[-1], math.prod(output_shape)), output_layer(value_range))
        self.output_shape = output_shape

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z).reshape(len(z), *self.output_shape)


class MLPDiscriminator(nn.Module):
    """x flattened → Linear → LeakyReLU per hidden width (the generator's, reversed) → one logit (B,)."""

    def __init__(self, in_features: int, hidden: list[int], slope: float):
        super().__init__()
        widths = [in_features, *reversed(hidden)]
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), nn.LeakyReLU(slope)]
        self.body = nn.Sequential(*layers, nn.Linear(widths[-1], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1)).squeeze(1)


class DCGANGenerator(nn.Module):
    """z → Linear → (B, C_last, h, w) → transposed convolutions, each doubling the grid → output (B, C, H, W)."""

    def __init__(self, latent: int, channels: list[int], sizes: list[tuple[int, ...]], out_channels: int,
                 batch_norm: bool, value_range: tuple[float, float] | None):
        super().__init__()
        self.start = (channels[-1], *sizes[-1])
        self.project = nn.Sequential(nn.Linear(latent, math.prod(self.start), bias=not batch_norm),
                                     _norm1d(math.prod(self.start), batch_norm), nn.ReLU())
        widths = [*reversed(channels), out_channels]
        up_sizes = list(reversed(sizes))  # smallest grid first
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            last = i == len(widths) - 2
            layers.append(conv_up(a, b, up_sizes[i], up_sizes[i + 1], bias=last or not batch_norm))
            if not last:  # the last layer gives the image: no norm, then the output layer
                layers += [_norm2d(b, batch_norm), nn.ReLU()]
        self.body = nn.Sequential(*layers, output_layer(value_range))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).reshape(len(z), *self.start))  # (B, C_last, h, w) → (B, C, H, W)


class DCGANDiscriminator(nn.Module):
    """(B, C, H, W) → stride-2 convolutions (batch norm after the first) + LeakyReLU → Linear → logit (B,)."""

    def __init__(self, in_channels: int, channels: list[int], sizes: list[tuple[int, ...]], slope: float,
                 batch_norm: bool):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip([in_channels, *channels], channels)):
            norm = batch_norm and i > 0  # DCGAN: no norm on the layer that sees the image
            layers += [conv_down(a, b, bias=not norm), _norm2d(b, norm), nn.LeakyReLU(slope)]
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels[-1] * math.prod(sizes[-1]), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(1)


# ── the two players' losses (D's logits in, mean loss and summable statistics out) ──
def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """−log D(x) − log(1 − D(G(z))), averaged; log σ(l) = −softplus(−l), log(1 − σ(l)) = −softplus(l)."""
    loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    n = real_logits.new_tensor(len(real_logits))
    return loss, {"d_loss": loss.detach() * n, "d_real": torch.sigmoid(real_logits.detach()).sum(),
                  "d_fake": torch.sigmoid(fake_logits.detach()).sum(), "n": n}


def generator_loss(fake_logits: torch.Tensor, kind: GanLoss) -> tuple[torch.Tensor, dict]:
    """minimax: log(1 − D(G(z))) = −softplus(l); non_saturating: −log D(G(z)) = softplus(−l); averaged."""
    per_sample = -F.softplus(fake_logits) if kind == "minimax" else F.softplus(-fake_logits)
    loss = per_sample.mean()
    n = fake_logits.new_tensor(len(fake_logits))
    return loss, {"g_loss": loss.detach() * n, "n": n}


def discriminator_step(model: "GAN", x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The discriminator's phase: real batch against as many fresh samples, G frozen by detach()."""
    fake = model.generator(model.noise(len(x), x.device)).detach()
    return discriminator_loss(model.discriminator(x), model.discriminator(fake))


def generator_step(model: "GAN", x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The generator's phase: fresh samples judged by D (D's weights get gradients but are not stepped)."""
    fake = model.generator(model.noise(len(x), x.device))
    return generator_loss(model.discriminator(fake), model.loss_kind)


# ── module ────────────────────────────────────────────────────────────────────
class GAN(Model):
    def __init__(self, input_shape: tuple[int, ...], arch: Literal["mlp", "dcgan"], latent: int, hidden: list[int],
                 channels: list[int], batch_norm: bool, leaky_slope: float, loss: GanLoss, g_lr: float, d_lr: float,
                 g_betas: tuple[float, float], d_betas: tuple[float, float],
                 value_range: tuple[float, float] | None = None):
        super().__init__()
        self.input_shape, self.latent, self.loss_kind = tuple(input_shape), latent, loss
        self.g_lr, self.d_lr, self.g_betas, self.d_betas = g_lr, d_lr, tuple(g_betas), tuple(d_betas)
        if arch == "mlp":
            self.generator = MLPGenerator(latent, hidden, self.input_shape, batch_norm, value_range)
            self.discriminator = MLPDiscriminator(math.prod(self.input_shape), hidden, leaky_slope)
        else:
            if len(self.input_shape) != 3:
                raise ArchitectureError("model.arch", f"arch dcgan needs (C, H, W) images, got input shape "
                                        f"{self.input_shape}; use arch: mlp")
            sizes = halving_sizes(self.input_shape[1:], len(channels), "model.channels")
            self.generator = DCGANGenerator(latent, channels, sizes, self.input_shape[0], batch_norm, value_range)
            self.discriminator = DCGANDiscriminator(self.input_shape[0], channels, sizes, leaky_slope, batch_norm)

    def noise(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.latent, device=device, generator=generator)  # (n, latent)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The generative model: z (B, latent) → samples (B, *input_shape)."""
        return self.generator(z)

    def example_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Both players on a data batch (for shape checks and activation probes): D judges x, G draws as many."""
        self.discriminator(x)
        return self.generator(self.noise(len(x), x.device))

    def adversarial_stats(self, real: torch.Tensor, fake: torch.Tensor) -> dict:
        """Both players' losses on a real batch and given samples (evaluation: no phase, no step)."""
        _, d_stats = discriminator_loss(self.discriminator(real), self.discriminator(fake))
        _, g_stats = generator_loss(self.discriminator(fake), self.loss_kind)
        return {**d_stats, **g_stats}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples (n, *input_shape); a seeded `generator` gives the same ones every time."""
        return self.generator(self.noise(n, next(self.parameters()).device, generator))

    def training_phases(self, task_loss: LossFn | None = None) -> list[Phase]:
        """Discriminator first, then generator: each with its own parameters, loss, learning rate and betas.
        The game is the loss: a task's loss has no part in it."""
        return [Phase("discriminator", list(self.discriminator.parameters()), discriminator_step, self.d_lr,
                      self.d_betas),
                Phase("generator", list(self.generator.parameters()), generator_step, self.g_lr, self.g_betas)]


# ── spec ──────────────────────────────────────────────────────────────────────
_ONLY_FOR = {"hidden": ("arch", "mlp"), "channels": ("arch", "dcgan")}  # field → (attribute, value it needs)


class GANSpec(ModelSpecBase):
    """A GAN: generator and discriminator, MLP or DCGAN-style, each trained by its own optimizer."""

    tasks: ClassVar[frozenset[str]] = frozenset({"generate"})
    kind: Literal["gan"] = Field(description="Model family: generative adversarial network.")
    arch: Literal["mlp", "dcgan"] = Field(default="mlp", description="mlp: fully connected G and D; dcgan: "
                                          "transposed-convolution G and stride-2 convolution D ((C, H, W) images "
                                          "only).")
    latent: PositiveInt = Field(default=32, description="Size of the noise vector z fed to the generator.")
    hidden: list[PositiveInt] = Field(default=[256, 256], min_length=1, description="mlp: generator hidden widths, "
                                      "noise side first; the discriminator uses them in reverse (data side first).")
    channels: list[PositiveInt] = Field(default=[64, 128], min_length=1, description="dcgan: discriminator "
                                        "channels per stride-2 stage, image side first; the generator mirrors them.")
    batch_norm: bool = Field(default=True, description="Batch norm in the generator's hidden layers (and, for "
                             "dcgan, in the discriminator after its first layer).")
    output: Literal["bounded", "linear"] = Field(default="bounded", description="Generator output: bounded (tanh "
                                                 "rescaled to the training data's value range; linear when the "
                                                 "range is unknown) or linear.")
    leaky_slope: float = Field(default=0.2, ge=0.0, lt=1.0, description="Negative slope of the discriminator's "
                               "LeakyReLUs.")
    loss: GanLoss = Field(default="non_saturating", description="Generator loss: minimax (minimise "
                          "log(1 - D(G(z))), the game's own) or non_saturating (minimise -log D(G(z))).")
    g_lr: PositiveFloat = Field(default=2e-4, description="Generator learning rate (its own optimizer; the "
                                "schedule in train.schedule scales it).")
    d_lr: PositiveFloat = Field(default=2e-4, description="Discriminator learning rate (its own optimizer).")
    g_betas: tuple[Beta, Beta] = Field(default=(0.5, 0.999), description="Generator Adam betas (adam/adamw).")
    d_betas: tuple[Beta, Beta] = Field(default=(0.5, 0.999), description="Discriminator Adam betas (adam/adamw).")

    @model_validator(mode="after")
    def _fields_fit_arch(self) -> "GANSpec":
        reject_fields_set_in_vain(self, _ONLY_FOR)
        return self


# ── builder ───────────────────────────────────────────────────────────────────
@register(GANSpec)
def build_gan(spec: GANSpec, shape: DataShape) -> GAN:
    if shape.vocab_size:
        raise ArchitectureError("data", "a gan generates real-valued data (images, signals, tables), not tokens")
    return GAN(input_shape=shape.input_shape, arch=spec.arch, latent=spec.latent, hidden=spec.hidden,
               channels=spec.channels, batch_norm=spec.batch_norm, leaky_slope=spec.leaky_slope, loss=spec.loss,
               g_lr=spec.g_lr, d_lr=spec.d_lr, g_betas=spec.g_betas, d_betas=spec.d_betas,
               value_range=shape.value_range if spec.output == "bounded" else None)

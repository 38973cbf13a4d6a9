"""Autoencoders: plain (ae), denoising (dae) and variational (vae), with MLP or convolutional halves.

- ae: x → encoder → code z → decoder → x̂, trained to make x̂ close to x through a narrow code.
  Trained on clean inputs, it is also scored on corrupted ones (`noise`), the dae's yardstick.
- dae (Vincent et al., 2008): the encoder sees a corrupted x̃ ~ q(x̃ | x) during training only, and the
  decoder must still give back the clean x: the code has to capture structure, not copy pixels.
- vae (Kingma & Welling, 2014): the encoder gives a Gaussian q(z | x) = N(μ, diag σ²); z = μ + σ·ε with
  ε ~ N(0, I) (the reparameterisation trick: the sampling noise sits outside the gradient's path); the
  decoder is a Gaussian p(x | z) = N(x̂, s² I) with a fixed s (`likelihood_std`). Training minimises
  −log p(x | z) + β·KL(q(z | x) ‖ N(0, I)); with β = 1 that is the negative ELBO. Decoding z ~ N(0, I) samples.

What makes each variant itself lives here, behind models.contract.Reconstructor: its corruption, its loss
terms (`reconstruction_terms`) and whether it can sample. The `reconstruct` task calls them.
Data are in prepare's normalised units, so the decoder's output layer is linear.
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt, model_validator
from torch import nn

from models.base import ArchitectureError, reject_fields_set_in_vain
from models.contract import Model, ModelSpecBase, Stats
from models.layers.activations import ActivationName, make_activation
from models.layers.resampling import conv_down, conv_up, halving_sizes
from models.registry import DataShape, register

Variant = Literal["ae", "dae", "vae"]
NoiseName = Literal["gaussian", "masking", "salt_and_pepper"]


# ── blocks ────────────────────────────────────────────────────────────────────
def corrupt(x: torch.Tensor, noise: NoiseName, level: float, generator: torch.Generator | None = None
            ) -> torch.Tensor:
    """The denoising autoencoder's corruption x̃ ~ q(x̃ | x), same shape as x.

    gaussian: add N(0, level²) noise (level in normalised units);
    masking: set a `level` fraction of the entries to the batch's lowest value ("off" pixels);
    salt_and_pepper: set a `level` fraction to the batch's lowest or highest value, half each.
    A seeded `generator` gives the same corruption every time (figures, test metrics).
    """
    def draw(sampler):
        return sampler(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    if noise == "gaussian":
        return x + level * draw(torch.randn)
    low, high = x.amin(), x.amax()  # 0-d tensors on the device: no host sync
    hit = draw(torch.rand) < level
    if noise == "masking":
        return torch.where(hit, low, x)
    salt = draw(torch.rand) < 0.5
    return torch.where(hit, torch.where(salt, high, low), x)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ_j (μ_j² + σ_j² − log σ_j² − 1), per sample: (B, Z) → (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(dim=1)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """−log N(x; mean, std² I) per sample, over all of a sample's D entries: (B, ...) → (B,).

    = Σ (x − mean)² / (2 std²) + D·(log std + ½ log 2π).
    """
    d = x[0].numel()
    sq = (x - mean).pow(2).flatten(1).sum(dim=1)
    return sq / (2.0 * std * std) + d * (math.log(std) + 0.5 * math.log(2.0 * math.pi))


class MLPEncoder(nn.Module):
    """(B, ...) flattened → hidden layers → (B, out_features)."""

    def __init__(self, in_features: int, hidden: list[int], out_features: int, activation: ActivationName):
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip([in_features, *hidden], hidden):
            layers += [nn.Linear(a, b), make_activation(activation)]
        self.body = nn.Sequential(*layers, nn.Linear(hidden[-1], out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1))


class MLPDecoder(nn.Module):
    """(B, latent) → the encoder's hidden widths in reverse → (B, *output_shape), linear output."""

    def __init__(self, latent: int, hidden: list[int], output_shape: tuple[int, ...], activation: ActivationName):
        super().__init__()
        widths = [latent, *reversed(hidden)]
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), make_activation(activation)]
        self.body = nn.Sequential(*layers, nn.Linear(widths[-1], math.prod(output_shape)))
        self.output_shape = output_shape

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z).reshape(len(z), *self.output_shape)


class ConvEncoder(nn.Module):
    """(B, C, H, W) → stride-2 convolutions, each halving the image → flatten → (B, out_features)."""

    def __init__(self, in_channels: int, channels: list[int], sizes: list[tuple[int, ...]], out_features: int,
                 activation: ActivationName):
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip([in_channels, *channels], channels):
            layers += [conv_down(a, b), make_activation(activation)]
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels[-1] * math.prod(sizes[-1]), out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ConvDecoder(nn.Module):
    """(B, latent) → linear → (B, C_last, h, w) → transposed convolutions, each doubling → (B, C, H, W)."""

    def __init__(self, latent: int, channels: list[int], sizes: list[tuple[int, ...]], out_channels: int,
                 activation: ActivationName):
        super().__init__()
        self.start = (channels[-1], *sizes[-1])
        self.project = nn.Sequential(nn.Linear(latent, math.prod(self.start)), make_activation(activation))
        widths = [*reversed(channels), out_channels]
        up_sizes = list(reversed(sizes))  # smallest first
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers.append(conv_up(a, b, up_sizes[i], up_sizes[i + 1]))
            if i < len(widths) - 2:  # the last layer gives the image: linear
                layers.append(make_activation(activation))
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).reshape(len(z), *self.start))  # (B, C_last, h, w) → (B, C, H, W)


# ── module ────────────────────────────────────────────────────────────────────
class Autoencoder(Model):
    """Encoder → code → decoder. `reconstruct` gives what the loss needs; `forward` just the reconstruction."""

    def __init__(self, input_shape: tuple[int, ...], variant: Variant, arch: Literal["mlp", "conv"], latent: int,
                 hidden: list[int], channels: list[int], activation: ActivationName, noise: NoiseName,
                 noise_level: float, beta: float, likelihood_std: float):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.variant, self.latent = variant, latent
        self.noise, self.noise_level = noise, noise_level
        self.beta, self.likelihood_std = beta, likelihood_std
        code = 2 * latent if variant == "vae" else latent  # a vae's encoder gives μ and log σ² side by side
        if arch == "mlp":
            self.encoder = MLPEncoder(math.prod(self.input_shape), hidden, code, activation)
            self.decoder = MLPDecoder(latent, hidden, self.input_shape, activation)
        else:
            if len(self.input_shape) != 3:
                raise ArchitectureError("model.arch", f"arch conv needs (C, H, W) images, got input shape "
                                        f"{self.input_shape}; use arch: mlp")
            sizes = halving_sizes(self.input_shape[1:], len(channels), "model.channels")
            self.encoder = ConvEncoder(self.input_shape[0], channels, sizes, code, activation)
            self.decoder = ConvDecoder(latent, channels, sizes, self.input_shape[0], activation)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, ...) → code (B, Z) and, for a vae, log σ² (B, Z); the code is μ for a vae."""
        h = self.encoder(x.reshape(len(x), *self.input_shape))
        if self.variant != "vae":
            return h, None
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar

    @staticmethod
    def reparameterise(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
                       ) -> torch.Tensor:
        """z = μ + σ·ε, ε ~ N(0, I): a sample of q(z | x) through which gradients reach μ and σ."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)  # (B, Z) → (B, *input_shape)

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x̂, code or μ, log σ² or None). Training: the dae corrupts its input and the vae samples z;
        evaluation: clean input and z = μ, so a reconstruction is deterministic."""
        if self.variant == "dae" and self.training:
            x = corrupt(x, self.noise, self.noise_level)
        mu, logvar = self.encode(x)
        z = self.reparameterise(mu, logvar) if logvar is not None and self.training else mu
        return self.decode(z), mu, logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)[0]

    def reconstruction_terms(self, x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor,
                             logvar: torch.Tensor | None) -> tuple[torch.Tensor, Stats]:
        """The loss and its summable parts. ae/dae: the mean squared error. vae: −log p(x | z) +
        β·KL(q(z | x) ‖ N(0, I)) per sample (nats)."""
        n = x.new_tensor(len(x))
        sse = (recon - x).pow(2).flatten(1).sum(dim=1)  # (B,)
        stats = {"sse": sse.detach().sum(), "elements": n * x[0].numel(), "n": n}
        if logvar is None:
            loss = sse.sum() / (len(x) * x[0].numel())
            stats["loss"] = loss.detach() * n
            return loss, stats
        nll = gaussian_nll(x, recon, self.likelihood_std)  # (B,)
        kl = kl_to_standard_normal(mu, logvar)  # (B,)
        per_sample = nll + self.beta * kl
        stats.update(loss=per_sample.detach().sum(), nll=nll.detach().sum(), kl=kl.detach().sum())
        return per_sample.mean(), stats

    def corrupted(self, x: torch.Tensor, generator: torch.Generator) -> tuple[str, torch.Tensor] | None:
        """The corruption of x (`noise`, `noise_level`) drawn from `generator`, with a title for figures; None for
        a vae. A dae trains on it; an ae never sees it in training, but is scored on the same draw, so that a dae
        and a plain ae with the same noise settings are compared on the very same corrupted inputs."""
        if self.variant == "vae":
            return None
        return f"corrupted ({self.noise}, {self.noise_level:g})", corrupt(x, self.noise, self.noise_level, generator)

    @property
    def can_sample(self) -> bool:
        """Only a vae has a prior to sample codes from."""
        return self.variant == "vae"

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """A vae's samples: decode z ~ N(0, I). (n, *input_shape)."""
        if self.variant != "vae":
            raise ValueError(f"only a vae can sample (this autoencoder is a {self.variant})")
        device = next(self.parameters()).device
        return self.decode(torch.randn(n, self.latent, generator=generator, device=device))


# ── spec ──────────────────────────────────────────────────────────────────────
_ONLY_FOR = {  # field → (spec attribute, the value or values it must have for the field to mean anything)
    "noise": ("variant", ("ae", "dae")), "noise_level": ("variant", ("ae", "dae")),
    "beta": ("variant", "vae"), "likelihood_std": ("variant", "vae"),
    "hidden": ("arch", "mlp"), "channels": ("arch", "conv"),
}


class AutoencoderSpec(ModelSpecBase):
    """An autoencoder: plain, denoising or variational; MLP or convolutional encoder and decoder."""

    tasks: ClassVar[frozenset[str]] = frozenset({"reconstruct"})
    kind: Literal["autoencoder"] = Field(description="Model family: autoencoder (ae, dae or vae).")
    variant: Variant = Field(default="ae", description="ae: plain; dae: denoising (input corrupted during "
                             "training); vae: variational (Gaussian code, loss = reconstruction + beta * KL).")
    arch: Literal["mlp", "conv"] = Field(default="mlp", description="mlp: fully connected encoder and decoder; "
                                         "conv: stride-2 convolutions down and transposed convolutions up "
                                         "((C, H, W) images only).")
    latent: PositiveInt = Field(default=16, description="Size of the code z (the bottleneck).")
    hidden: list[PositiveInt] = Field(default=[256, 128], min_length=1, description="mlp: encoder hidden widths, "
                                      "input side first; the decoder mirrors them.")
    channels: list[PositiveInt] = Field(default=[32, 64], min_length=1, description="conv: encoder channels per "
                                        "stride-2 stage, input side first (each halves the image); the decoder "
                                        "mirrors them.")
    activation: ActivationName = Field(default="relu", description="Non-linearity after each hidden layer.")
    noise: NoiseName = Field(default="gaussian", description="ae and dae: the corruption gaussian (additive), "
                             "masking (entries set to the batch's lowest value) or salt_and_pepper (entries set to "
                             "the lowest or highest value). A dae trains on corrupted inputs; both are also scored "
                             "on the test set corrupted so (one seeded draw, the same for ae and dae): "
                             "corrupted_mse and denoised_mse in eval.json. An ae trains on clean inputs only.")
    noise_level: float = Field(default=0.5, gt=0.0, description="ae and dae: the noise's std for gaussian "
                               "(normalised units), else the fraction of entries corrupted (below 1); in training "
                               "(dae) and in the test-set evaluation on corrupted inputs (ae and dae).")
    beta: float = Field(default=1.0, ge=0.0, description="vae: weight of the KL term (1: the ELBO; above 1: "
                        "beta-VAE).")
    likelihood_std: PositiveFloat = Field(default=1.0, description="vae: std s of the Gaussian decoder p(x|z) = "
                                          "N(x_hat, s^2 I), in normalised units; smaller weighs reconstruction "
                                          "more against the KL term.")

    @model_validator(mode="after")
    def _fields_fit_variant_and_arch(self) -> "AutoencoderSpec":
        reject_fields_set_in_vain(self, _ONLY_FOR)
        if self.variant != "vae" and self.noise != "gaussian" and self.noise_level >= 1.0:
            raise ValueError(f"noise_level is the fraction of entries {self.noise} corrupts: it must be below 1, "
                             f"got {self.noise_level}")
        return self


# ── builder ───────────────────────────────────────────────────────────────────
@register(AutoencoderSpec)
def build_autoencoder(spec: AutoencoderSpec, shape: DataShape) -> Autoencoder:
    if shape.vocab_size:
        raise ArchitectureError("data", "an autoencoder reconstructs real-valued data (images, signals, tables), "
                                "not tokens")
    return Autoencoder(input_shape=shape.input_shape, variant=spec.variant, arch=spec.arch, latent=spec.latent,
                       hidden=spec.hidden, channels=spec.channels, activation=spec.activation, noise=spec.noise,
                       noise_level=spec.noise_level, beta=spec.beta, likelihood_std=spec.likelihood_std)

"""The one declared interface between the pipeline and the models: what the engine and the tasks may call.

- `Phase`: one optimisation step per batch (a loss over a set of parameters, with its own optimizer).
- `Model`: the base of every family's top-level module, with the hooks the engine calls and their defaults.
  The pipeline never probes a model with getattr/hasattr: a hook a family does not override keeps its default.
- `ModelSpecBase`: the base of every family's spec, declaring the tasks the family serves.
- The Protocols below say what a task needs of the models it serves (a seq2seq model can `generate`, a
  generative model can `sample`, ...): declared here, so that a family knows what it signs up to.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

import torch
from pydantic import Field
from torch import nn

from models.base import StrictModel
from models.layers.init import InitSpec

Stats = dict[str, torch.Tensor]  # summable statistics of a batch, kept on the device
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Stats]]


@dataclass
class Phase:
    """One optimisation step per batch: a loss over a set of parameters, with its own optimizer.

    Most models have one phase; a GAN has two (discriminator, generator) — the engine treats both alike.
    """

    name: str
    params: list[nn.Parameter]
    loss: LossFn
    lr: float | None = None  # overrides the spec's learning rate for this phase
    betas: tuple[float, float] | None = None  # overrides the spec's Adam betas for this phase


class Model(nn.Module):
    """A zoo model: an nn.Module with the hooks the pipeline calls, each with the default most families want."""

    def training_phases(self, task_loss: LossFn) -> list[Phase]:
        """How the model trains: by default one phase, the task's loss over every trainable parameter.
        A model that trains itself in several phases (a GAN) returns its own and ignores `task_loss`."""
        return [Phase("main", [p for p in self.parameters() if p.requires_grad], task_loss)]

    def example_forward(self, x: torch.Tensor) -> torch.Tensor:
        """A forward pass on a data batch alone (shape checks, activation probes, cost); models whose
        forward needs more than x (a decoder's input, a generator's noise) say here how to run on x."""
        return self(x)

    def adversarial_stats(self, real: torch.Tensor, fake: torch.Tensor) -> Stats:
        """Players' losses on a real batch and given samples; only adversarial models have any."""
        return {}

    def transferable(self) -> nn.Module | None:
        """The part of the model whose weights another run may start it from (`train.init_from`), such as a
        token encoder's body under its masked-LM or classifier head; None: the family offers none."""
        return None


class ModelSpecBase(StrictModel):
    """Every family's spec: `tasks` is the set of tasks the family can serve."""

    tasks: ClassVar[frozenset[str]]
    init: InitSpec = Field(default_factory=InitSpec, description="How the weight matrices start; the default "
                           "keeps the family's own initialisation.")

    def served_tasks(self) -> frozenset[str]:
        """The tasks this configuration serves; a family whose shape decides it (a decoder-only
        transformer models language, an encoder classifies) narrows its `tasks` here."""
        return self.tasks

    @classmethod
    def describe_tasks(cls) -> str:
        """The family's tasks, worded for an error message that lists the valid pairs."""
        return ", ".join(sorted(cls.tasks))


# ── what each task needs of the models it serves ─────────────────────────────
class Seq2SeqModel(Protocol):
    def __call__(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor: ...  # logits (B, T, V)

    def generate(self, src: torch.Tensor, max_len: int) -> torch.Tensor: ...  # greedy tokens (B, max_len)


class LanguageModel(Protocol):
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...  # logits (B, T, V), position t sees x[:, :t+1]

    def sample(self, prefix: torch.Tensor, n_tokens: int, temperature: float,
               generator: torch.Generator) -> torch.Tensor: ...  # (1, P + n)


class MaskedLanguageModel(Protocol):
    """x (B, T) tokens, some of them [MASK] (models/tokens.py) → logits (B, T, V + 1) at every position, each
    position seeing the whole sequence (no causal mask)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class Sampler(Protocol):
    """A generative model: n samples (n, *input_shape); a seeded generator gives the same ones every time."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor: ...


class Reconstructor(Protocol):
    """An autoencoder: `reconstruct` corrupts (dae) and samples z (vae) in train mode only."""

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...

    def reconstruction_terms(self, x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor,
                             logvar: torch.Tensor | None) -> tuple[torch.Tensor, Stats]: ...

    def reparameterise(self, mu: torch.Tensor, logvar: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor: ...

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...

    def corrupted(self, x: torch.Tensor, generator: torch.Generator) -> tuple[str, torch.Tensor] | None: ...

    @property
    def can_sample(self) -> bool: ...

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor: ...

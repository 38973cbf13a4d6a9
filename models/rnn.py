"""Recurrent networks: a vanilla RNN, an LSTM or a GRU, stacked and optionally bidirectional.

The cells (the gate equations), the layer that unrolls a cell over time and the stack are in
models/layers/recurrent.py, shared with the seq2seq_rnn family. This file decides how data becomes a sequence
and what is read out of it:

- a 1-D signal (L,) is L steps of 1 feature; (C, L) is L steps of C features;
- an image (C, H, W) is read row by row: H steps of C·W features;
- tokens (data with a vocabulary) are embedded, and the network predicts the next token at every step
  (language modelling, loss −Σ log P(x_t | x_<t)); `sample` continues a text.

Classification and regression read the top layer's last state (when bidirectional, the final states of both
directions: the left-to-right one after step T, the right-to-left one after step 1) or its mean over time,
then one linear layer.
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field, PositiveInt
from torch import nn

from models.base import ArchitectureError
from models.cnn import as_channels_first
from models.contract import Model, ModelSpecBase
from models.layers.recurrent import STACKS, CellName, Impl, State
from models.registry import DataShape, register

Readout = Literal["last", "mean", "flatten"]


# ── blocks ────────────────────────────────────────────────────────────────────
class SequenceView(nn.Module):
    """Reads a batch of signals or images as sequences: the first spatial axis is time.

    (B, L) → (B, L, 1);  (B, C, L) → (B, L, C);  (B, C, H, W) → (B, H, C·W).
    """

    def __init__(self, input_shape: tuple[int, ...]):
        super().__init__()
        channels, spatial = as_channels_first(input_shape)
        if len(spatial) not in (1, 2):
            raise ArchitectureError("data", f"rnn reads (L,), (C, L) or (C, H, W) inputs, got {input_shape}")
        self.channels, self.steps, self.row = channels, spatial[0], math.prod(spatial[1:])
        self.features = channels * self.row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.channels, self.steps, self.row)  # (B, C, T, W)
        return x.permute(0, 2, 1, 3).reshape(x.shape[0], self.steps, self.features)  # (B, T, C·W)


def final_hidden(finals: list[State], directions: int) -> torch.Tensor:
    """The top layer's final h of each direction, concatenated: (B, D·H)."""
    return torch.cat([state[0] for state in finals[-directions:]], dim=1)


# ── modules ───────────────────────────────────────────────────────────────────
class RecurrentNet(Model):
    """Sequence in, one prediction out (classification logits or regression values)."""

    def __init__(self, input_shape: tuple[int, ...], cell: CellName, hidden_size: int, num_layers: int,
                 bidirectional: bool, dropout: float, readout: Readout, out_features: int, impl: Impl = "cells"):
        super().__init__()
        self.view = SequenceView(input_shape)
        self.rnn = STACKS[impl](cell, self.view.features, hidden_size, num_layers, bidirectional, dropout)
        self.readout = readout
        summary_size = self.rnn.output_size * (self.view.steps if readout == "flatten" else 1)
        self.head = nn.Linear(summary_size, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs, finals = self.rnn(self.view(x))  # (B, T, D·H)
        if self.readout == "mean":
            summary = outputs.mean(dim=1)  # pool over time
        elif self.readout == "flatten":
            summary = outputs.flatten(1)  # every step side by side: (B, T·D·H)
        else:
            summary = final_hidden(finals, self.rnn.directions)
        return self.head(summary)  # (B, out)


class RecurrentLM(Model):
    """Language model: embed tokens (B, T), run the stack left to right, logits for the next token (B, T, V)."""

    def __init__(self, vocab_size: int, embed_dim: int, cell: CellName, hidden_size: int, num_layers: int,
                 dropout: float, impl: Impl = "cells"):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.rnn = STACKS[impl](cell, embed_dim, hidden_size, num_layers, bidirectional=False, dropout=dropout)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: torch.Tensor, states: list[State] | None = None) -> torch.Tensor:
        return self.step(tokens, states)[0]

    def step(self, tokens: torch.Tensor, states: list[State] | None = None) -> tuple[torch.Tensor, list[State]]:
        """Logits (B, T, V) for tokens (B, T), continuing from `states`; also returns the states after them."""
        outputs, states = self.rnn(self.embed(tokens), states)  # (B, T, H)
        return self.head(outputs), states

    @torch.no_grad()
    def sample(self, prefix_tokens: torch.Tensor, n_tokens: int, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue each prefix (B, P), P ≥ 1, by n_tokens drawn from softmax(logits / temperature) → (B, P + n).

        temperature 0 takes the most likely token (greedy). The recurrent state is carried from step to step,
        so each new token costs one step, not a rerun of the whole text. `generator` is a CPU generator (the
        draw happens on the CPU, so a seeded text is the same on any device).
        """
        was_training = self.training
        self.eval()
        logits, states = self.step(prefix_tokens)
        seq = [prefix_tokens]
        for i in range(n_tokens):
            if i > 0:
                logits, states = self.step(seq[-1], states)  # one step on the token just drawn
            last = logits[:, -1].float()  # (B, V)
            if temperature <= 0:
                token = last.argmax(dim=1, keepdim=True)
            else:
                probs = torch.softmax(last / temperature, dim=1).cpu()
                token = torch.multinomial(probs, 1, generator=generator).to(prefix_tokens.device)  # (B, 1)
            seq.append(token)
        self.train(was_training)
        return torch.cat(seq, dim=1)


# ── spec ──────────────────────────────────────────────────────────────────────
class RNNSpec(ModelSpecBase):
    """A recurrent network (vanilla RNN, LSTM or GRU) over a signal, an image's rows, or tokens."""

    tasks: ClassVar[frozenset[str]] = frozenset({"classify", "regress", "lm"})
    kind: Literal["rnn"] = Field(description="Model family: recurrent network (RNN, LSTM or GRU).")
    cell: CellName = Field(default="lstm", description="Recurrent cell: rnn (Elman, tanh), lstm or gru.")
    hidden_size: PositiveInt = Field(default=128, description="Size of the hidden state h (per direction).")
    layers: PositiveInt = Field(default=1, le=16, description="Stacked recurrent layers.")
    bidirectional: bool = Field(default=False, description="Also read each sequence right to left and concatenate "
                                "both directions (classify and regress only: a language model must not see the "
                                "future).")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout between stacked layers.")
    readout: Readout = Field(default="last", description="What classify/regress read: the last hidden state, "
                             "the mean of the top layer's outputs over time, or all of them side by side (flatten: "
                             "a head of steps × directions × hidden_size inputs, as in the MNIST-1D paper's GRU, "
                             "40 × 2 × 6 = 480 → 10). Not used by lm.")
    embed_dim: PositiveInt = Field(default=64, description="Token embedding size (token data, i.e. lm, only).")
    impl: Impl = Field(default="cells", description="cells: the textbook cells of models/layers/recurrent.py, one "
                       "op per gate (readable, the default); torch: torch.nn's fused RNN/LSTM/GRU kernels, same "
                       "initialisation (much faster for small LSTMs and RNNs on the CPU; see bench/"
                       "bench_recurrent.py).")

    def served_tasks(self) -> frozenset[str]:
        return self.tasks - {"lm"} if self.bidirectional else self.tasks

    @classmethod
    def describe_tasks(cls) -> str:
        return "classify, regress, lm (lm unidirectional only)"


# ── builder ───────────────────────────────────────────────────────────────────
@register(RNNSpec)
def build_rnn(spec: RNNSpec, shape: DataShape) -> nn.Module:
    if shape.vocab_size:  # token data: a language model
        if shape.target == "class":
            raise ArchitectureError("model.kind", "an rnn models text (lm) or classifies signals; to classify "
                                    "labelled text use a transformer with shape: encoder")
        if spec.bidirectional:
            raise ArchitectureError("model.bidirectional", "a language model reads left to right only; "
                                    "set bidirectional: false")
        return RecurrentLM(vocab_size=shape.vocab_size, embed_dim=spec.embed_dim, cell=spec.cell,
                           hidden_size=spec.hidden_size, num_layers=spec.layers, dropout=spec.dropout, impl=spec.impl)
    return RecurrentNet(input_shape=shape.input_shape, cell=spec.cell, hidden_size=spec.hidden_size,
                        num_layers=spec.layers, bidirectional=spec.bidirectional, dropout=spec.dropout,
                        readout=spec.readout, out_features=shape.output_size, impl=spec.impl)

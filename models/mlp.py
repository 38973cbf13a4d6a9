"""Multi-layer perceptron: Linear → [BatchNorm] → activation → [Dropout], optionally residual."""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field, PositiveInt
from torch import nn

from models.contract import Model, ModelSpecBase
from models.layers.activations import ActivationName, make_activation
from models.registry import DataShape, register


# ── blocks ────────────────────────────────────────────────────────────────────
class DenseBlock(nn.Module):
    """One hidden layer. With `residual`, adds its input back (through a projection when widths differ)."""

    def __init__(self, d_in: int, d_out: int, activation: ActivationName, dropout: float, batch_norm: bool,
                 residual: bool):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=not batch_norm)
        self.norm = nn.BatchNorm1d(d_out) if batch_norm else nn.Identity()
        self.act = make_activation(activation)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if residual:
            self.shortcut = nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out, bias=False)
        else:
            self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, d_in) → (B, d_out)
        y = self.drop(self.act(self.norm(self.linear(x))))
        return y if self.shortcut is None else y + self.shortcut(x)


# ── module ────────────────────────────────────────────────────────────────────
class MLP(Model):
    def __init__(self, in_features: int, hidden: list[int], out_features: int, activation: ActivationName,
                 dropout: float, batch_norm: bool, residual: bool):
        super().__init__()
        widths = [in_features, *hidden]
        self.blocks = nn.Sequential(*[
            DenseBlock(a, b, activation, dropout, batch_norm, residual) for a, b in zip(widths, widths[1:])
        ])
        self.head = nn.Linear(widths[-1], out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x.flatten(1)))  # (B, ...) → (B, out)


# ── spec ──────────────────────────────────────────────────────────────────────
class MLPSpec(ModelSpecBase):
    """A fully connected network on the flattened input."""

    tasks: ClassVar[frozenset[str]] = frozenset({"classify", "regress"})
    kind: Literal["mlp"] = Field(description="Model family: multi-layer perceptron.")
    hidden: list[PositiveInt] = Field(default=[128, 128], description="Width of each hidden layer, input side first; "
                                      "[] is a linear model (logistic regression for classify, least squares for "
                                      "regress).")
    activation: ActivationName = Field(default="relu", description="Non-linearity after each hidden layer.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout probability after each hidden layer.")
    batch_norm: bool = Field(default=False, description="Batch normalisation before each activation.")
    residual: bool = Field(default=False, description="Add each hidden layer's input to its output (projected when widths differ).")


# ── builder ───────────────────────────────────────────────────────────────────
@register(MLPSpec)
def build_mlp(spec: MLPSpec, shape: DataShape) -> MLP:
    return MLP(in_features=math.prod(shape.input_shape), hidden=spec.hidden, out_features=shape.output_size,
               activation=spec.activation, dropout=spec.dropout, batch_norm=spec.batch_norm, residual=spec.residual)

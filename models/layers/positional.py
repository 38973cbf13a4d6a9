"""Positional encodings: attention is blind to order, so each position adds its own vector to the token's.

Sinusoidal (Vaswani et al. 2017, section 3.5), fixed:
    PE(pos, 2i)   = sin(pos / 10000^(2i/d))
    PE(pos, 2i+1) = cos(pos / 10000^(2i/d))
Learned (BERT, GPT, ViT): one trained vector per position.
None (an ablation): nothing is added, so a model without recurrence or convolution cannot tell positions apart.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

PositionalName = Literal["sinusoidal", "learned", "none"]


def sinusoidal_table(positions: int, d_model: int) -> torch.Tensor:
    """(positions, d_model): even columns sin(pos / 10000^(2i/d)), odd columns cos of the same angle."""
    pos = torch.arange(positions, dtype=torch.float64)[:, None]  # (P, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # 2i = 0, 2, 4, ...
    angle = pos / 10000.0 ** (two_i / d_model)  # (P, ceil(d/2))
    table = torch.zeros(positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : d_model // 2])  # an odd d_model has one sine more than cosines
    return table.float()


class SinusoidalPositions(nn.Module):
    """Adds the fixed sinusoidal table; nothing to learn, and nothing stored in checkpoints."""

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:  # (B, T, D) → (B, T, D)
        return x + self.table[offset:offset + x.shape[1]]


class LearnedPositions(nn.Module):
    """Adds one learned vector per position (initialised small, as in GPT-2 and ViT)."""

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(max_len, d_model) * 0.02)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:  # (B, T, D) → (B, T, D)
        return x + self.table[offset:offset + x.shape[1]]


class NoPositions(nn.Module):
    """Adds nothing: the tokens pass through as they are (order-blind attention stays order-blind)."""

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return x


def make_positions(name: PositionalName, max_len: int, d_model: int) -> nn.Module:
    if name == "none":
        return NoPositions()
    return SinusoidalPositions(max_len, d_model) if name == "sinusoidal" else LearnedPositions(max_len, d_model)


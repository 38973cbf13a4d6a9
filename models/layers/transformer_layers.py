"""The Transformer's layers (Vaswani et al. 2017, section 3.1), shared by the transformer and vit families.

Every sub-layer (attention or feed-forward) is wrapped in a residual connection and a LayerNorm:
    post-norm (the paper):  x = LayerNorm(x + Dropout(SubLayer(x)))
    pre-norm (GPT-2, ViT):  x = x + Dropout(SubLayer(LayerNorm(x)))   and one final LayerNorm after the stack.
For ablations either part can be removed: without `residual` the "x +" goes, without `layer_norm` every
LayerNorm (the final one too) becomes the identity. Both on is the default and the paper's model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from models.layers.activations import ActivationName, make_activation
from models.layers.attention import MultiHeadAttention

NormPlacement = Literal["post", "pre"]


class FeedForward(nn.Module):
    """Position-wise FFN(x) = W2 · act(W1 x + b1) + b2, the same two layers applied at every position."""

    def __init__(self, d_model: int, d_ff: int, activation: ActivationName, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff)
        self.act = make_activation(activation)
        self.drop = nn.Dropout(dropout)
        self.w2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) → (B, T, d_ff) → (B, T, D)
        return self.w2(self.drop(self.act(self.w1(x))))


@dataclass(frozen=True)
class LayerParts:
    """Which parts wrap each sub-layer: both on is the Transformer; either off is an ablation."""

    residual: bool = True
    layer_norm: bool = True

    def norm(self, d_model: int) -> nn.Module:
        return nn.LayerNorm(d_model) if self.layer_norm else nn.Identity()


FULL_PARTS = LayerParts()  # both on: the Transformer as published (the default everywhere)


class Residual(nn.Module):
    """Residual connection + LayerNorm around one sub-layer, post- or pre-norm; either part can be left out."""

    def __init__(self, d_model: int, norm: NormPlacement, dropout: float, parts: LayerParts = FULL_PARTS):
        super().__init__()
        self.norm = parts.norm(d_model)
        self.pre = norm == "pre"
        self.residual = parts.residual
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, sublayer) -> torch.Tensor:
        if self.pre:
            out = self.drop(sublayer(self.norm(x)))
            return x + out if self.residual else out
        out = self.drop(sublayer(x))
        return self.norm(x + out if self.residual else out)


class EncoderLayer(nn.Module):
    """Self-attention, then FFN. With `causal`, each position sees only itself and earlier ones (a GPT block)."""

    def __init__(self, d_model: int, heads: int, d_ff: int, activation: ActivationName, dropout: float,
                 attention_dropout: float, norm: NormPlacement, parts: LayerParts = FULL_PARTS):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, heads, attention_dropout)
        self.ffn = FeedForward(d_model, d_ff, activation, dropout)
        self.attn_residual = Residual(d_model, norm, dropout, parts)
        self.ffn_residual = Residual(d_model, norm, dropout, parts)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        x = self.attn_residual(x, lambda h: self.self_attn(h, h, h, key_padding_mask=padding_mask, causal=causal))
        return self.ffn_residual(x, self.ffn)  # (B, T, D)


class DecoderLayer(nn.Module):
    """Masked self-attention over the target so far, cross-attention to the encoder's memory, then FFN.
    Without `causal` (an ablation) the self-attention sees the whole target, the future included."""

    def __init__(self, d_model: int, heads: int, d_ff: int, activation: ActivationName, dropout: float,
                 attention_dropout: float, norm: NormPlacement, parts: LayerParts = FULL_PARTS, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.self_attn = MultiHeadAttention(d_model, heads, attention_dropout)
        self.cross_attn = MultiHeadAttention(d_model, heads, attention_dropout)
        self.ffn = FeedForward(d_model, d_ff, activation, dropout)
        self.self_residual = Residual(d_model, norm, dropout, parts)
        self.cross_residual = Residual(d_model, norm, dropout, parts)
        self.ffn_residual = Residual(d_model, norm, dropout, parts)

    def forward(self, y: torch.Tensor, memory: torch.Tensor, memory_padding_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """y (B, T, D) the target so far, memory (B, S, D) the encoded source → (B, T, D)."""
        # Target padding needs no mask: it sits after the real tokens, which the causal mask keeps from seeing it.
        y = self.self_residual(y, lambda h: self.self_attn(h, h, h, causal=self.causal))
        y = self.cross_residual(y, lambda h: self.cross_attn(h, memory, memory, key_padding_mask=memory_padding_mask))
        return self.ffn_residual(y, self.ffn)


class LayerStack(nn.Module):
    """N identical layers; under pre-norm a final LayerNorm, since the residual stream is never normalised."""

    def __init__(self, layers: list[nn.Module], d_model: int, norm: NormPlacement, parts: LayerParts = FULL_PARTS):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.final_norm = parts.norm(d_model) if norm == "pre" else nn.Identity()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, *args, **kwargs)
        return self.final_norm(x)


def encoder_stack(layers: int, d_model: int, heads: int, d_ff: int, activation: ActivationName, dropout: float,
                  attention_dropout: float, norm: NormPlacement, parts: LayerParts = FULL_PARTS) -> LayerStack:
    return LayerStack([EncoderLayer(d_model, heads, d_ff, activation, dropout, attention_dropout, norm, parts)
                       for _ in range(layers)], d_model, norm, parts)


def decoder_stack(layers: int, d_model: int, heads: int, d_ff: int, activation: ActivationName, dropout: float,
                  attention_dropout: float, norm: NormPlacement, parts: LayerParts = FULL_PARTS,
                  causal: bool = True) -> LayerStack:
    return LayerStack([DecoderLayer(d_model, heads, d_ff, activation, dropout, attention_dropout, norm, parts, causal)
                       for _ in range(layers)], d_model, norm, parts)


class TokenEmbedding(nn.Module):
    """Token id → vector, scaled by √d_model (section 3.4). Vectors start at std 1/√d, so the scaled ones
    have unit size, like the positional encodings they are added to."""

    def __init__(self, vocab_size: int, d_model: int, padding_idx: int | None = None):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=padding_idx)
        nn.init.normal_(self.embed.weight, std=d_model ** -0.5)
        if padding_idx is not None:
            with torch.no_grad():
                self.embed.weight[padding_idx].zero_()
        self.scale = math.sqrt(d_model)

    @property
    def weight(self) -> nn.Parameter:
        return self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) long → (B, T, D)
        return self.embed(tokens) * self.scale

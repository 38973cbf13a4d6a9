"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

The image is cut into P×P patches; each patch is flattened and linearly projected to d_model (one convolution
with kernel = stride = P does both at once). A learned [class] token is prepended (or the patch tokens are
averaged), positions are added, a stack of pre-norm Transformer encoder layers (models/layers) mixes the
tokens, and a linear head classifies. On digits (1×8×8) with patch 2: 4×4 = 16 patch tokens.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt, field_validator
from torch import nn

from models.base import ArchitectureError
from models.contract import Model, ModelSpecBase
from models.layers.activations import ActivationName
from models.layers.attention import heads_divide_width
from models.layers.positional import PositionalName, make_positions
from models.layers.transformer_layers import FULL_PARTS, LayerParts, NormPlacement, encoder_stack
from models.registry import DataShape, register


# ── blocks ────────────────────────────────────────────────────────────────────
class PatchEmbedding(nn.Module):
    """(B, C, H, W) → (B, N, D) with N = (H/P)·(W/P): one linear map per non-overlapping P×P patch."""

    def __init__(self, channels: int, patch: int, d_model: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, d_model, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, H/P, W/P) → (B, N, D), patches row by row


# ── module ────────────────────────────────────────────────────────────────────
class ViT(Model):
    def __init__(self, image_shape: tuple[int, int, int], patch: int, d_model: int, depth: int, heads: int,
                 d_ff: int, activation: ActivationName, dropout: float, attention_dropout: float,
                 positional: PositionalName, norm: NormPlacement, pooling: Literal["cls", "mean"], classes: int,
                 parts: LayerParts = FULL_PARTS):
        super().__init__()
        channels, height, width = image_shape
        self.image_shape = image_shape
        self.patches = PatchEmbedding(channels, patch, d_model)
        n_patches = (height // patch) * (width // patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model)) if pooling == "cls" else None
        self.positions = make_positions(positional, n_patches + (pooling == "cls"), d_model)
        self.drop = nn.Dropout(dropout)
        self.encoder = encoder_stack(depth, d_model, heads, d_ff, activation, dropout, attention_dropout, norm, parts)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patches(x.reshape(len(x), *self.image_shape))  # (B, N, D)
        if self.cls_token is not None:
            h = torch.cat([self.cls_token.expand(len(h), -1, -1), h], dim=1)  # (B, 1 + N, D)
        h = self.encoder(self.drop(self.positions(h)))
        pooled = h[:, 0] if self.cls_token is not None else h.mean(dim=1)  # (B, D)
        return self.head(pooled)  # (B, K)


# ── spec ──────────────────────────────────────────────────────────────────────
class ViTSpec(ModelSpecBase):
    """A Vision Transformer: patch embedding, [class] token or mean pooling, positions, encoder layers, head."""

    tasks: ClassVar[frozenset[str]] = frozenset({"classify"})
    kind: Literal["vit"] = Field(description="Model family: Vision Transformer.")
    patch: PositiveInt = Field(default=2, description="Side of the square patches; must divide the image's height "
                               "and width (8×8 digits, patch 2: 16 patches).")
    d_model: PositiveInt = Field(default=64, description="Width of every token vector (the residual stream).")
    depth: PositiveInt = Field(default=4, description="Transformer encoder layers.")
    heads: PositiveInt = Field(default=4, description="Attention heads per layer; must divide d_model.")
    mlp_ratio: PositiveFloat = Field(default=2.0, description="Hidden width of each layer's MLP as a multiple of "
                                     "d_model (ViT-Base: 4).")
    activation: ActivationName = Field(default="gelu", description="Non-linearity inside the MLP (ViT: gelu).")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="Dropout on each sub-layer's output, inside "
                           "the MLP, and on the patch embeddings plus positions.")
    attention_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the attention weights.")
    pooling: Literal["cls", "mean"] = Field(default="cls", description="Classify the [class] token's output "
                                            "(ViT) or the mean of the patch tokens.")
    positional: PositionalName = Field(default="learned", description="Position embeddings: learned (ViT), fixed "
                                       "sinusoidal over the patch index (row by row), or none (an ablation: the "
                                       "patches' arrangement is invisible).")
    norm: NormPlacement = Field(default="pre", description="pre: x + SubLayer(LayerNorm(x)) and a final LayerNorm "
                                "(ViT); post: LayerNorm(x + SubLayer(x)) (the original Transformer).")
    residual: bool = Field(default=True, description="Residual connection around every sub-layer (ViT); false is "
                           "an ablation.")
    layer_norm: bool = Field(default=True, description="LayerNorm around every sub-layer and the final one (ViT); "
                             "false is an ablation.")

    _heads_divide_width = field_validator("heads")(heads_divide_width)


# ── builder ───────────────────────────────────────────────────────────────────
@register(ViTSpec)
def build_vit(spec: ViTSpec, shape: DataShape) -> ViT:
    if len(shape.input_shape) != 3:
        raise ArchitectureError("model", f"a vit reads images (C, H, W); this dataset's inputs have shape "
                                f"{shape.input_shape}")
    channels, height, width = shape.input_shape
    if height % spec.patch or width % spec.patch:
        raise ArchitectureError("model.patch", f"patch {spec.patch} does not divide the {height}x{width} image")
    return ViT(image_shape=(channels, height, width), patch=spec.patch, d_model=spec.d_model, depth=spec.depth,
               heads=spec.heads, d_ff=max(1, round(spec.mlp_ratio * spec.d_model)), activation=spec.activation,
               dropout=spec.dropout, attention_dropout=spec.attention_dropout, positional=spec.positional,
               norm=spec.norm, pooling=spec.pooling, classes=shape.output_size,
               parts=LayerParts(residual=spec.residual, layer_norm=spec.layer_norm))

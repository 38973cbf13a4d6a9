"""Residual network (He et al. 2016): a stem convolution, stages of residual blocks with batch norm,
global average pooling and a linear head.

A residual block computes y = act(F(x) + shortcut(x)), where F is two 3x3 convolutions ("basic") or a
1x1 → 3x3 → 1x1 "bottleneck", each followed by batch norm. The shortcut is the identity, or a strided 1x1
convolution with batch norm (the paper's projection shortcut, option B) where the block changes the width or
the resolution. With `skip: false` the shortcut is left out: the "plain" network of the same depth that the
paper compares against. With `norm: none` every batch norm is left out (each convolution gets a bias instead),
so depth can be studied without normalisation too.

1-D or 2-D is chosen from the input, as in the cnn family: (L,) and (C, L) give Conv1d, (C, H, W) Conv2d.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from models.base import ArchitectureError, StrictModel
from models.cnn import _CONV, _NORM, as_channels_first
from models.contract import Model, ModelSpecBase
from models.layers.activations import ActivationName, make_activation
from models.registry import DataShape, register

BlockName = Literal["basic", "bottleneck"]
NormName = Literal["batch", "none"]


# ── blocks ────────────────────────────────────────────────────────────────────
def conv_bn(dims: int, c_in: int, c_out: int, kernel: int, stride: int = 1, norm: NormName = "batch") -> nn.Sequential:
    """Convolution (no bias: batch norm's shift replaces it) followed by batch norm; with norm none, a
    convolution with its own bias and nothing after it."""
    if norm == "none":
        return nn.Sequential(_CONV[dims](c_in, c_out, kernel, stride, kernel // 2, bias=True))
    return nn.Sequential(_CONV[dims](c_in, c_out, kernel, stride, kernel // 2, bias=False), _NORM[dims](c_out))


class ResidualBlock(nn.Module):
    """y = act(F(x) + shortcut(x)); F is basic or bottleneck; without `skip`, y = act(F(x))."""

    def __init__(self, dims: int, c_in: int, c_out: int, stride: int, block: BlockName, bottleneck_ratio: int,
                 activation: ActivationName, skip: bool, norm: NormName = "batch"):
        super().__init__()
        if block == "basic":  # 3x3 (stride) → BN → act → 3x3 → BN
            self.body = nn.Sequential(conv_bn(dims, c_in, c_out, 3, stride, norm), make_activation(activation),
                                      conv_bn(dims, c_out, c_out, 3, norm=norm))
        else:  # 1x1 reduce → 3x3 (stride) → 1x1 expand, BN after each, act between
            inner = c_out // bottleneck_ratio
            self.body = nn.Sequential(conv_bn(dims, c_in, inner, 1, norm=norm), make_activation(activation),
                                      conv_bn(dims, inner, inner, 3, stride, norm), make_activation(activation),
                                      conv_bn(dims, inner, c_out, 1, norm=norm))
        if not skip:
            self.shortcut = None
        elif stride == 1 and c_in == c_out:
            self.shortcut = nn.Identity()
        else:  # projection: match the body's width and resolution
            self.shortcut = conv_bn(dims, c_in, c_out, 1, stride, norm)
        self.act = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, c_in, *S) → (B, c_out, *S/stride)
        out = self.body(x)
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.act(out)


# ── module ────────────────────────────────────────────────────────────────────
class ResNet(Model):
    def __init__(self, input_shape: tuple[int, ...], stem_channels: int, stem_kernel: int,
                 stages: list[tuple[int, int, int]], block: BlockName, bottleneck_ratio: int,
                 activation: ActivationName, skip: bool, norm: NormName, head_dropout: float, out_features: int):
        """stages: (width, blocks, stride) per stage, input side first."""
        super().__init__()
        channels, spatial = as_channels_first(input_shape)
        dims = len(spatial)
        if dims not in (1, 2):
            raise ArchitectureError("data", f"resnet needs (L,), (C, L) or (C, H, W) inputs, got {input_shape}")
        self.in_shape = (channels, *spatial)
        self.stem = nn.Sequential(conv_bn(dims, channels, stem_channels, stem_kernel, norm=norm),
                                  make_activation(activation))
        blocks: list[nn.Module] = []
        c_in = stem_channels
        for width, count, stride in stages:
            for b in range(count):  # only a stage's first block changes width and resolution
                blocks.append(ResidualBlock(dims, c_in, width, stride if b == 0 else 1, block, bottleneck_ratio,
                                            activation, skip, norm))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(head_dropout)
        self.head = nn.Linear(c_in, out_features)
        self._init_weights(activation)

    def _init_weights(self, activation: ActivationName) -> None:
        """He initialisation for the convolutions (the paper's), unit scale and zero shift for batch norm."""
        gain_of = {"tanh": "tanh", "sigmoid": "sigmoid", "identity": "linear"}.get(activation, "relu")  # silu, gelu ≈ relu
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity=gain_of)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.in_shape)  # (B, C, L) or (B, C, H, W)
        features = self.blocks(self.stem(x))  # (B, C_last, *S)
        return self.head(self.drop(self.pool(features).flatten(1)))  # global average pool → (B, C_last) → (B, out)


# ── spec ──────────────────────────────────────────────────────────────────────
class ResNetStage(StrictModel):
    width: PositiveInt = Field(description="Output channels of every block in the stage.")
    blocks: PositiveInt = Field(default=2, le=64, description="Residual blocks in the stage.")
    stride: PositiveInt = Field(default=1, le=4, description="Stride of the stage's first block (2 halves each "
                                "spatial side); the other blocks keep the resolution.")


def _default_stages() -> list[ResNetStage]:
    return [ResNetStage(width=16, blocks=2, stride=1), ResNetStage(width=32, blocks=2, stride=2),
            ResNetStage(width=64, blocks=2, stride=2)]


class ResNetSpec(ModelSpecBase):
    """A residual network: stem convolution, stages of residual blocks with batch norm, global pooling, linear head."""

    tasks: ClassVar[frozenset[str]] = frozenset({"classify", "regress"})
    kind: Literal["resnet"] = Field(description="Model family: residual network (1-D or 2-D from the input's shape).")
    stem_channels: PositiveInt = Field(default=16, description="Channels of the stem convolution.")
    stem_kernel: PositiveInt = Field(default=3, description="Kernel size of the stem convolution (stride 1, 'same' "
                                     "padding).")
    stages: list[ResNetStage] = Field(default_factory=_default_stages, min_length=1,
                                      description="Stages, input side first: width, number of blocks and stride.")
    block: BlockName = Field(default="basic", description="basic: two 3x3 convolutions; bottleneck: 1x1 reduce, "
                             "3x3, 1x1 expand.")
    bottleneck_ratio: PositiveInt = Field(default=4, description="Bottleneck blocks only: a stage's width divided by "
                                          "its blocks' inner width (the paper's expansion, 4).")
    activation: ActivationName = Field(default="relu", description="Non-linearity after the stem, inside blocks and "
                                       "after each addition.")
    skip: bool = Field(default=True, description="Residual (skip) connections; false gives the plain network of the "
                       "same depth, for comparison.")
    norm: NormName = Field(default="batch", description="batch: batch norm after every convolution (the paper); "
                           "none: no normalisation, each convolution gets a bias instead (an ablation, e.g. of the "
                           "plain network with skip: false).")
    head_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the pooled features before "
                                "the linear head.")

    @model_validator(mode="after")
    def _bottleneck_fits(self) -> ResNetSpec:
        if self.block == "bottleneck":
            for i, stage in enumerate(self.stages):
                if stage.width % self.bottleneck_ratio:
                    raise ValueError(f"stages[{i}].width {stage.width} must be a multiple of bottleneck_ratio "
                                     f"{self.bottleneck_ratio} (the bottleneck's inner width is width / ratio)")
        return self

    def depth(self) -> int:
        """Weighted layers on the main path: stem + convolutions in the blocks + head (the paper's count)."""
        per_block = 2 if self.block == "basic" else 3
        return 1 + per_block * sum(s.blocks for s in self.stages) + 1


# ── builder ───────────────────────────────────────────────────────────────────
@register(ResNetSpec)
def build_resnet(spec: ResNetSpec, shape: DataShape) -> ResNet:
    return ResNet(input_shape=shape.input_shape, stem_channels=spec.stem_channels, stem_kernel=spec.stem_kernel,
                  stages=[(s.width, s.blocks, s.stride) for s in spec.stages], block=spec.block,
                  bottleneck_ratio=spec.bottleneck_ratio, activation=spec.activation, skip=spec.skip, norm=spec.norm,
                  head_dropout=spec.head_dropout, out_features=shape.output_size)

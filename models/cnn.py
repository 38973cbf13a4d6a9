"""Convolutional network from a declarative list of layers, then a fully connected head.

1-D or 2-D is chosen from the input: (C, L) or (L,) gives Conv1d, (C, H, W) gives Conv2d.
LeNet-5 and the AlexNet-style net are presets in specs/, not code.
"""
from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field, PositiveInt
from torch import nn

from models.base import ArchitectureError, StrictModel
from models.contract import Model, ModelSpecBase
from models.layers.activations import ActivationName, make_activation
from models.registry import DataShape, register


# ── layer specs (the declarative list) ───────────────────────────────────────
class ConvLayer(StrictModel):
    type: Literal["conv"] = Field(description="Convolution followed by an activation.")
    channels: PositiveInt = Field(description="Output channels.")
    kernel: PositiveInt = Field(default=3, description="Kernel size (square in 2-D).")
    stride: PositiveInt = Field(default=1, description="Stride.")
    padding: int | Literal["same"] = Field(default="same", description="Zero padding on each side, or 'same' (kernel // 2).")
    activation: ActivationName = Field(default="relu", description="Non-linearity after the convolution.")


class PoolLayer(StrictModel):
    type: Literal["pool"] = Field(description="Spatial pooling.")
    op: Literal["max", "avg"] = Field(default="max", description="Max or average pooling.")
    kernel: PositiveInt = Field(default=2, description="Window size.")
    stride: PositiveInt | None = Field(default=None, description="Stride; defaults to the window size.")


class NormLayer(StrictModel):
    type: Literal["norm"] = Field(description="Batch normalisation over channels.")


class DropoutLayer(StrictModel):
    type: Literal["dropout"] = Field(description="Dropout.")
    p: float = Field(default=0.25, ge=0.0, lt=1.0, description="Drop probability.")


CNNLayer = Annotated[ConvLayer | PoolLayer | NormLayer | DropoutLayer, Field(discriminator="type")]


# ── blocks ────────────────────────────────────────────────────────────────────
_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_POOL = {(1, "max"): nn.MaxPool1d, (2, "max"): nn.MaxPool2d, (1, "avg"): nn.AvgPool1d, (2, "avg"): nn.AvgPool2d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


def _out_len(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def build_feature_layers(layers: list, channels: int, spatial: tuple[int, ...]) -> tuple[nn.Sequential, int, tuple[int, ...]]:
    """Turn the layer list into modules, tracking (channels, spatial) so an impossible shape names its layer."""
    dims = len(spatial)
    modules: list[nn.Module] = []
    for i, layer in enumerate(layers):
        where = f"model.layers[{i}] ({layer.type})"
        if isinstance(layer, ConvLayer):
            pad = layer.kernel // 2 if layer.padding == "same" else layer.padding
            new = tuple(_out_len(s, layer.kernel, layer.stride, pad) for s in spatial)
            if min(new) < 1:
                raise ArchitectureError(f"model.layers[{i}]", f"{where}: kernel {layer.kernel} does not fit an input of "
                                        f"size {'x'.join(map(str, spatial))} (padding {pad})")
            modules += [_CONV[dims](channels, layer.channels, layer.kernel, layer.stride, pad),
                        make_activation(layer.activation)]
            channels, spatial = layer.channels, new
        elif isinstance(layer, PoolLayer):
            stride = layer.stride or layer.kernel
            new = tuple(_out_len(s, layer.kernel, stride, 0) for s in spatial)
            if min(new) < 1:
                raise ArchitectureError(f"model.layers[{i}]", f"{where}: a {layer.kernel}-wide window does not fit an "
                                        f"input of size {'x'.join(map(str, spatial))}; remove a pooling layer or pad")
            modules.append(_POOL[(dims, layer.op)](layer.kernel, stride))
            spatial = new
        elif isinstance(layer, NormLayer):
            modules.append(_NORM[dims](channels))
        else:
            modules.append(nn.Dropout(layer.p))
    return nn.Sequential(*modules), channels, spatial


def as_channels_first(input_shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """(L,) and (F,) are one-channel signals; (C, L) and (C, H, W) are taken as they are."""
    if len(input_shape) == 1:
        return 1, input_shape
    return input_shape[0], tuple(input_shape[1:])


# ── module ────────────────────────────────────────────────────────────────────
class CNN(Model):
    def __init__(self, input_shape: tuple[int, ...], layers: list, head: list[int], head_dropout: float,
                 activation: ActivationName, out_features: int):
        super().__init__()
        channels, spatial = as_channels_first(input_shape)
        if len(spatial) not in (1, 2):
            raise ArchitectureError("data", f"cnn needs (L,), (C, L) or (C, H, W) inputs, got {input_shape}")
        self.in_shape = (channels, *spatial)
        self.features, channels, spatial = build_feature_layers(layers, channels, spatial)
        widths = [channels * math.prod(spatial), *head]
        fc: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            fc += [nn.Linear(a, b), make_activation(activation)]
            if head_dropout > 0:
                fc.append(nn.Dropout(head_dropout))
        fc.append(nn.Linear(widths[-1], out_features))
        self.head = nn.Sequential(*fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.in_shape)  # (B, C, L) or (B, C, H, W)
        return self.head(self.features(x).flatten(1))


# ── spec ──────────────────────────────────────────────────────────────────────
class CNNSpec(ModelSpecBase):
    """A convolutional network: a list of conv / pool / norm / dropout layers, then fully connected layers."""

    tasks: ClassVar[frozenset[str]] = frozenset({"classify", "regress"})
    kind: Literal["cnn"] = Field(description="Model family: convolutional network (1-D or 2-D from the input's shape).")
    layers: list[CNNLayer] = Field(min_length=1, description="Feature layers, input side first.")
    head: list[PositiveInt] = Field(default=[], description="Hidden widths of the fully connected head.")
    head_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout after each hidden head layer.")
    activation: ActivationName = Field(default="relu", description="Non-linearity in the head.")


# ── builder ───────────────────────────────────────────────────────────────────
@register(CNNSpec)
def build_cnn(spec: CNNSpec, shape: DataShape) -> CNN:
    return CNN(input_shape=shape.input_shape, layers=spec.layers, head=spec.head, head_dropout=spec.head_dropout,
               activation=spec.activation, out_features=shape.output_size)

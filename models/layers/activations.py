"""The closed set of activation functions a spec may name, in one table."""
from __future__ import annotations

from typing import Literal

from torch import nn

ActivationName = Literal["sigmoid", "tanh", "relu", "silu", "gelu", "identity"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "identity": nn.Identity,  # no non-linearity: a stack of layers is one linear map
}


def make_activation(name: ActivationName) -> nn.Module:
    return ACTIVATIONS[name]()

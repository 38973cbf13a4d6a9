"""Weight initialisation a spec can choose (`model.init`), applied once to a freshly built model.

`default` leaves every family's own initialisation untouched (torch's, or the family's: ResNet's He fan-out,
the recurrent cells' U(-1/√H, 1/√H), the GAN's), so a spec without `init` gets exactly the weights it got
before this choice existed. The other schemes redraw the weight matrices of every Linear and convolution
(recurrent input and hidden-to-hidden maps included, as they are Linear layers):

    xavier:     N(0, gain² · 2 / (fan_in + fan_out))          (Glorot & Bengio 2010, normal form)
    he:         N(0, gain² · 2 / fan_in)                      (He et al. 2015, fan-in mode)
    normal:     N(0, std²)
    orthogonal: a (semi-)orthogonal matrix times gain         (Saxe et al. 2014)

`recurrent: orthogonal` makes each gate's hidden-to-hidden block of an RNN / LSTM / GRU cell an orthogonal
H×H matrix (times gain), whatever the scheme of the other weights.

Left alone, and why: biases (the LSTM's forget-gate bias of +1 is a deliberate choice, and the schemes are
statements about weight matrices); norm layers' scale and shift; token embeddings, including an output layer
tied to one (an embedding is a lookup table, not a map with a fan-in); positional tables and [CLS] tokens.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, PositiveFloat, model_validator
from torch import nn

from models.base import ArchitectureError, StrictModel
from models.layers.recurrent import GRUCell, LSTMCell, RNNCell

InitScheme = Literal["default", "xavier", "he", "normal", "orthogonal"]
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)
_CELLS = (RNNCell, LSTMCell, GRUCell)


class InitSpec(StrictModel):
    """How the model's weight matrices start."""

    scheme: InitScheme = Field(default="default", description="default: each family's own initialisation, "
                               "untouched; xavier: N(0, gain²·2/(fan_in+fan_out)); he: N(0, gain²·2/fan_in); "
                               "normal: N(0, std²); orthogonal: (semi-)orthogonal matrices times gain. Applies to "
                               "the weights of every linear and convolutional layer (recurrent cells included); "
                               "biases, norms and embeddings keep their own.")
    std: PositiveFloat | None = Field(default=None, description="normal only (and required there): the weights' "
                                      "standard deviation.")
    gain: PositiveFloat = Field(default=1.0, description="xavier, he and orthogonal (and recurrent: orthogonal): "
                                "a factor on the scheme's scale.")
    recurrent: Literal["same", "orthogonal"] = Field(default="same", description="same: recurrent hidden-to-hidden "
                                                     "weights follow `scheme`; orthogonal: each gate's H×H "
                                                     "hidden-to-hidden block is orthogonal (times gain).")

    @model_validator(mode="after")
    def _fields_mean_something(self) -> InitSpec:
        if self.scheme == "normal" and self.std is None:
            raise ValueError("scheme normal needs `std`, the weights' standard deviation")
        if self.std is not None and self.scheme != "normal":
            raise ValueError(f"std applies to scheme normal only (this one is {self.scheme}); remove it")
        # judged by value, not by whether it was written: a dumped spec (gain: 1.0) must validate again
        if self.gain != 1.0 and self.scheme in ("default", "normal") and self.recurrent == "same":
            raise ValueError(f"gain applies to schemes xavier, he and orthogonal and to recurrent: orthogonal "
                             f"(this one is scheme {self.scheme}); remove it")
        return self


def _draw(weight: torch.Tensor, spec: InitSpec) -> None:
    if spec.scheme == "xavier":
        nn.init.xavier_normal_(weight, gain=spec.gain)
    elif spec.scheme == "he":
        fan_in = weight[0].numel()  # in-features × kernel elements, for Linear and convolutions alike
        nn.init.normal_(weight, std=spec.gain * math.sqrt(2.0 / fan_in))
    elif spec.scheme == "normal":
        nn.init.normal_(weight, std=spec.std)
    else:
        nn.init.orthogonal_(weight, gain=spec.gain)


def _orthogonal_gates(cell: nn.Module, gain: float) -> None:
    """Each gate's (H, H) block of the stacked hidden-to-hidden matrix (gates·H, H) becomes orthogonal."""
    with torch.no_grad():
        for block in cell.hidden_proj.weight.split(cell.hidden_size, dim=0):
            nn.init.orthogonal_(block, gain=gain)


def connection_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weight matrices of every linear and convolutional layer (recurrent cells' too), each once; not
    biases, norms, or embedding tables (nor an output layer tied to one). What `init` redraws and L1 penalises."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, _WEIGHTED) and id(module.weight) not in embedded:
            seen.setdefault(id(module.weight), module.weight)
    return list(seen.values())


def initialise(model: nn.Module, spec: InitSpec) -> None:
    """Apply `spec` to a freshly built model; `default` with `recurrent: same` touches nothing (draws nothing)."""
    if spec.scheme == "default" and spec.recurrent == "same":
        return
    if spec.scheme != "default":
        with torch.no_grad():
            for weight in connection_weights(model):
                _draw(weight, spec)
    if spec.recurrent == "orthogonal":
        cells = [m for m in model.modules() if isinstance(m, _CELLS)]
        if not cells:
            raise ArchitectureError("model.init.recurrent", "recurrent: orthogonal needs a recurrent cell; this "
                                    "model has none (use it with the rnn and seq2seq_rnn families)")
        for cell in cells:
            _orthogonal_gates(cell, spec.gain)

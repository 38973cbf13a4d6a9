"""Recurrent cells written from the textbook equations, a layer that unrolls a cell over time, and a stack.

Notation (Goodfellow, Bengio & Courville ch. 10; the same as the torch.nn.RNN / LSTM / GRU docs):
x_t is the input at step t, h_t the hidden state, c_t the LSTM's cell state, σ the logistic sigmoid,
⊙ the elementwise product.

Each cell splits its affine maps into an input part (W_i· x_t + b_i·) and a recurrent part (W_h· h_{t-1} + b_h·).
The input part does not depend on the previous step, so `RecurrentLayer` computes it for every step in one
matrix product before the time loop; inside the loop only the recurrent product and the gate arithmetic remain.
The gates are stacked in torch's order (LSTM: i, f, g, o; GRU: r, z, n), so torch's weights copy across
one to one (the parity tests do exactly that).

Used by the `rnn` family (models/rnn.py) and the `seq2seq_rnn` family (models/seq2seq_rnn.py).

`FusedRNN` offers the same stack through torch.nn.RNN / LSTM / GRU, whose fused kernels (oneDNN on the CPU for
the LSTM and the vanilla RNN, cuDNN on a GPU) run each step without a Python-level op per gate. Measured on
this project's CPU by bench/bench_recurrent.py: at hidden size 6, torch's LSTM is 2.6x and its RNN 16x faster
than these cells, while its GRU, which has no such kernel on the CPU, is only 1.1x faster. The cells stay the
readable default; `impl: torch` in an rnn spec picks the fused stack, initialised the same way.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

CellName = Literal["rnn", "lstm", "gru"]
Impl = Literal["cells", "torch"]
State = tuple[torch.Tensor, ...]  # (h,) for rnn and gru, (h, c) for lstm; each (B, H)


def _uniform_init(cell: nn.Module, hidden_size: int) -> None:
    """Every weight and bias ~ U(-1/√H, 1/√H), the classic recurrent initialisation (torch's too)."""
    bound = 1.0 / math.sqrt(hidden_size)
    for p in cell.parameters():
        nn.init.uniform_(p, -bound, bound)


def _open_forget_gate(input_bias: torch.Tensor, hidden_size: int) -> None:
    """An LSTM's forget gate open at the start, so gradients flow through c (Jozefowicz et al. 2015):
    +1 on the forget part of the input bias (gates stacked i, f, g, o)."""
    with torch.no_grad():
        input_bias[hidden_size:2 * hidden_size] += 1.0


# ── cells: one step of the recurrence ────────────────────────────────────────
class RNNCell(nn.Module):
    """Elman (vanilla) RNN:  h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)."""

    gates = 1
    state_count = 1

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.input_proj = nn.Linear(input_size, hidden_size)  # W_ih, b_ih
        self.hidden_proj = nn.Linear(hidden_size, hidden_size)  # W_hh, b_hh
        _uniform_init(self, hidden_size)

    def forward(self, x_proj: torch.Tensor, state: State) -> State:
        """x_proj: (B, H) = W_ih x_t + b_ih, precomputed by the layer."""
        (h,) = state
        return (torch.tanh(x_proj + self.hidden_proj(h)),)


class LSTMCell(nn.Module):
    """Long short-term memory (Hochreiter & Schmidhuber 1997, with a forget gate as in Gers et al. 2000):

        i_t = σ(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)      input gate
        f_t = σ(W_if x_t + b_if + W_hf h_{t-1} + b_hf)      forget gate
        g_t = tanh(W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)   candidate cell
        o_t = σ(W_io x_t + b_io + W_ho h_{t-1} + b_ho)      output gate
        c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t
        h_t = o_t ⊙ tanh(c_t)
    """

    gates = 4
    state_count = 2

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.input_proj = nn.Linear(input_size, 4 * hidden_size)  # [W_ii; W_if; W_ig; W_io], [b_ii; ...]
        self.hidden_proj = nn.Linear(hidden_size, 4 * hidden_size)  # [W_hi; W_hf; W_hg; W_ho], [b_hi; ...]
        _uniform_init(self, hidden_size)
        _open_forget_gate(self.input_proj.bias, hidden_size)

    def forward(self, x_proj: torch.Tensor, state: State) -> State:
        """x_proj: (B, 4H), the input half of the four gates, precomputed by the layer."""
        h, c = state
        i, f, g, o = (x_proj + self.hidden_proj(h)).chunk(4, dim=1)  # each (B, H)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class GRUCell(nn.Module):
    """Gated recurrent unit (Cho et al. 2014), in torch's form (the reset gate scales W_hn h + b_hn):

        r_t = σ(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)             reset gate
        z_t = σ(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)             update gate
        n_t = tanh(W_in x_t + b_in + r_t ⊙ (W_hn h_{t-1} + b_hn))  candidate state
        h_t = (1 - z_t) ⊙ n_t + z_t ⊙ h_{t-1}
    """

    gates = 3
    state_count = 1

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.input_proj = nn.Linear(input_size, 3 * hidden_size)  # [W_ir; W_iz; W_in], [b_ir; b_iz; b_in]
        self.hidden_proj = nn.Linear(hidden_size, 3 * hidden_size)  # [W_hr; W_hz; W_hn], [b_hr; b_hz; b_hn]
        _uniform_init(self, hidden_size)

    def forward(self, x_proj: torch.Tensor, state: State) -> State:
        """x_proj: (B, 3H), the input half of the three gates, precomputed by the layer."""
        (h,) = state
        x_r, x_z, x_n = x_proj.chunk(3, dim=1)  # each (B, H)
        h_r, h_z, h_n = self.hidden_proj(h).chunk(3, dim=1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (torch.lerp(n, h, z),)  # lerp(n, h, z) = n + z ⊙ (h - n) = (1 - z) ⊙ n + z ⊙ h


CELLS: dict[str, type[nn.Module]] = {"rnn": RNNCell, "lstm": LSTMCell, "gru": GRUCell}


# ── a layer: the cell applied at every step ──────────────────────────────────
class RecurrentLayer(nn.Module):
    """One direction of one layer: the cell unrolled left to right (or right to left, `reverse`)."""

    def __init__(self, cell: nn.Module, reverse: bool = False):
        super().__init__()
        self.cell = cell
        self.reverse = reverse

    def initial_state(self, batch: int, like: torch.Tensor) -> State:
        """h_0 = 0 (and c_0 = 0 for the LSTM)."""
        zeros = like.new_zeros(batch, self.cell.hidden_size)
        return tuple(zeros for _ in range(self.cell.state_count))

    def forward(self, x: torch.Tensor, state: State | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """x (B, T, I) → outputs h_1..h_T (B, T, H) and the final state.

        mask (B, T), False at padding: there the state is carried over unchanged, so a padded sequence ends
        in the state of its last real step (and a reversed layer starts at its last real step).
        """
        batch, steps, _ = x.shape
        if state is None:
            state = self.initial_state(batch, x)
        # The input part of every gate at every step, in one matmul: (B, T, G·H), split into T tensors (B, G·H).
        # unbind, not x_proj[:, t]: the backward of T slices would build T full-size gradients; unbind's builds one.
        x_proj = self.cell.input_proj(x).unbind(dim=1)
        keep = mask[:, :, None].unbind(dim=1) if mask is not None else None  # T tensors (B, 1)
        outputs: list[torch.Tensor | None] = [None] * steps  # filled in step order
        for t in (range(steps - 1, -1, -1) if self.reverse else range(steps)):
            new = self.cell(x_proj[t], state)
            if keep is not None:
                new = tuple(torch.where(keep[t], n, s) for n, s in zip(new, state))
            state = new
            outputs[t] = state[0]
        return torch.stack(outputs, dim=1), state


# ── a stack of layers, optionally bidirectional ──────────────────────────────
class StackedRNN(nn.Module):
    """`num_layers` recurrent layers, each reading the outputs of the one below.

    Bidirectional: each layer has a left-to-right and a right-to-left direction whose outputs are concatenated,
    (B, T, 2H), and the next layer reads both. Dropout is applied between layers (not after the top one),
    as torch.nn.LSTM's `dropout` does.
    """

    def __init__(self, cell: CellName, input_size: int, hidden_size: int, num_layers: int = 1,
                 bidirectional: bool = False, dropout: float = 0.0):
        super().__init__()
        directions = 2 if bidirectional else 1
        self.layers = nn.ModuleList()
        for k in range(num_layers):
            size_in = input_size if k == 0 else hidden_size * directions
            self.layers.append(nn.ModuleList(
                RecurrentLayer(CELLS[cell](size_in, hidden_size), reverse=d == 1) for d in range(directions)))
        self.drop = nn.Dropout(dropout)
        self.directions = directions
        self.output_size = hidden_size * directions

    def forward(self, x: torch.Tensor, states: list[State] | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[State]]:
        """x (B, T, I) → top-layer outputs (B, T, D·H) and the final states, one per (layer, direction).

        `states` (from a previous call) continues a sequence where it stopped: how a decoder or a language
        model steps forward one token at a time. Order: layer 0 forward, layer 0 backward, layer 1 forward, ...
        """
        finals: list[State] = []
        for k, directions in enumerate(self.layers):
            if k > 0:
                x = self.drop(x)
            outputs = []
            for layer in directions:
                start = None if states is None else states[len(finals)]
                out, final = layer(x, start, mask)
                outputs.append(out)
                finals.append(final)
            x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)  # (B, T, D·H)
        return x, finals


# ── the same stack on torch's fused kernels ──────────────────────────────────
class FusedRNN(nn.Module):
    """StackedRNN's interface and initialisation on torch.nn.RNN / LSTM / GRU (see the module docstring).

    States are exchanged in StackedRNN's form, one tuple per (layer, direction), so readouts, decoders and
    language models work with either stack. Padding masks are not supported: torch's kernels need packed
    sequences for them, which the families that pad (seq2seq_rnn) do not use.
    """

    TORCH = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}

    def __init__(self, cell: CellName, input_size: int, hidden_size: int, num_layers: int = 1,
                 bidirectional: bool = False, dropout: float = 0.0):
        super().__init__()
        self.cell = cell
        self.rnn = self.TORCH[cell](input_size, hidden_size, num_layers, batch_first=True,
                                    bidirectional=bidirectional, dropout=dropout if num_layers > 1 else 0.0)
        self.directions = 2 if bidirectional else 1
        self.output_size = hidden_size * self.directions
        _uniform_init(self.rnn, hidden_size)
        if cell == "lstm":
            for name, p in self.rnn.named_parameters():
                if name.startswith("bias_ih"):
                    _open_forget_gate(p, hidden_size)

    def forward(self, x: torch.Tensor, states: list[State] | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[State]]:
        """x (B, T, I) → top-layer outputs (B, T, D·H) and the final states, one per (layer, direction)."""
        if mask is not None:
            raise ValueError("FusedRNN takes no padding mask; use the cells (impl: cells) for padded sequences")
        start = None
        if states is not None:  # [(h,) or (h, c)] per (layer, direction) → (L·D, B, H) each
            stacked = tuple(torch.stack(parts) for parts in zip(*states))
            start = stacked if self.cell == "lstm" else stacked[0]
        outputs, final = self.rnn(x, start)
        finals = final if self.cell == "lstm" else (final,)
        return outputs, [tuple(part[i] for part in finals) for i in range(finals[0].shape[0])]


STACKS: dict[str, type[nn.Module]] = {"cells": StackedRNN, "torch": FusedRNN}

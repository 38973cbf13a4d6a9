"""Our recurrent cells (models/layers/recurrent.py) against torch.nn.LSTM / GRU / RNN, forward and backward.

Batch 100, 40 steps (MNIST-1D's length), one layer, one thread; each configuration alternates the two
implementations for `--repeats` rounds and prints the median time of each and the ratio ours / torch.

    python bench/bench_recurrent.py [--repeats 15] [--sizes 6 32 128]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from models.layers.recurrent import StackedRNN

TORCH = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def step_time(module: nn.Module, x: torch.Tensor, ours: bool) -> float:
    """Seconds for one forward and backward pass over the whole sequence."""
    module.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    out = module(x)[0]
    out.sum().backward()
    return time.perf_counter() - t0


def compare(cell: str, hidden: int, repeats: int, batch: int = 100, steps: int = 40, features: int = 1) -> tuple:
    torch.manual_seed(0)
    x = torch.randn(batch, steps, features)
    ours = StackedRNN(cell, features, hidden)
    theirs = TORCH[cell](features, hidden, batch_first=True)
    for _ in range(3):  # warm-up: allocator, autograd graph caches
        step_time(ours, x, True), step_time(theirs, x, False)
    a, b = [], []
    for _ in range(repeats):
        a.append(step_time(ours, x, True))
        b.append(step_time(theirs, x, False))
    return statistics.median(a), statistics.median(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--sizes", type=int, nargs="+", default=[6, 32, 128])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'cell':5} {'hidden':>6} {'ours ms':>9} {'torch ms':>9} {'ours/torch':>10}")
    for cell in ("lstm", "gru", "rnn"):
        for hidden in args.sizes:
            ours, theirs = compare(cell, hidden, args.repeats)
            print(f"{cell:5} {hidden:6d} {ours * 1e3:9.2f} {theirs * 1e3:9.2f} {ours / theirs:10.2f}")


if __name__ == "__main__":
    main()

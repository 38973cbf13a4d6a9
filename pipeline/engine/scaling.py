"""How FLOPs and training-step time grow with sequence length n and width d, with log-log slopes fitted.

Two textbook claims rest on these numbers:
- self-attention costs O(n²·d) and the FFN (and the projections) O(n·d²): `attention_scaling` measures one
  Transformer encoder layer against n at a fixed d and against d at a fixed n, and fits the slope of
  log FLOPs (per kind, pipeline/engine/flops.py) and log time against log n and log d;
- an RNN processes the steps one after another while self-attention processes them at once:
  `recurrence_vs_attention` times a training step of an LSTM and of a Transformer encoder of about the same
  parameter count against n.

Every point builds the model from a model spec (the `model:` part of an experiment YAML) on synthetic inputs:
a batch of signals of `features` channels and n steps, n tokens for the Transformer (patch 1, mean pooling, so
exactly n positions) and n steps for the LSTM, with random class labels. A training step is the classify task's
loss, forward and backward (no optimizer update); its time is the median of runs after a warmup, the points of
a grid timed round-robin, on whatever threads torch has (the result records them). FLOPs are exact counts;
times are what this machine measured, on its load at the time.

Everything returns plain dicts of numbers (dataclasses turned into dicts), for a claims runner to judge.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from pydantic import TypeAdapter

from models import DataShape, ModelSpec, build_model
from pipeline.engine.cost import timed_runs, train_step_flops
from pipeline.engine.flops import flops_by_kind
from pipeline.engine.tasks import make_task

FEATURES = 16  # channels per input step
CLASSES = 4
BATCH = 8  # sequences per training step
HEAD_WIDTH = 16  # a Transformer's heads: d / 16 (attention FLOPs do not depend on the number of heads)
POINT_BUDGET_S = 0.6  # timing budget per point, after the warmup
ROUNDS = 5  # the points of a grid are timed round-robin, this many times over
WARMUP = 2  # untimed steps per point first
CONFIDENCE = 0.95

SpecOf = Callable[[int, int], dict]  # (n, d) → a model spec


# ── the slope of a log-log line ─────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Slope:
    """The fitted exponent k of y ≈ c·xᵏ: the slope of log y against log x, its standard error and a
    CONFIDENCE interval (Student's t with points − 2 degrees of freedom)."""

    slope: float
    stderr: float
    low: float
    high: float
    points: int


def loglog_slope(xs: Sequence[float], ys: Sequence[float], confidence: float = CONFIDENCE) -> Slope:
    """Least-squares slope of log y on log x (scipy.stats.linregress) with its confidence interval."""
    from scipy import stats
    if len(xs) != len(ys) or len(xs) < 3:
        raise ValueError(f"a slope with an interval needs at least 3 (x, y) pairs, got {len(xs)} and {len(ys)}")
    if min(xs) <= 0 or min(ys) <= 0:
        raise ValueError("a log-log slope needs positive x and y")
    fit = stats.linregress(np.log(xs), np.log(ys))
    half = stats.t.ppf((1 + confidence) / 2, len(xs) - 2) * fit.stderr
    return Slope(slope=float(fit.slope), stderr=float(fit.stderr), low=float(fit.slope - half),
                 high=float(fit.slope + half), points=len(xs))


# ── one point: a model at (n, d) ─────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Point:
    """One model at sequence length n and width d: its size, FLOPs per sequence and training-step time."""

    n: int
    d: int
    params: int
    flops: dict[str, float]  # forward FLOPs per sequence by kind (pipeline/engine/flops.py), plus "total"
    train_step_flops: float  # FLOPs per sequence of a training step (forward and backward)
    step_s: float  # median seconds of one training step on `batch` sequences
    sequences_per_s: float  # batch / step_s
    batch: int
    runs: int  # timed steps behind the median


def transformer_layer(n: int, d: int) -> dict:
    """One Transformer encoder layer of width d reading n tokens (FFN 4d, no dropout, mean pooling)."""
    return {"kind": "transformer", "shape": "encoder", "d_model": d, "heads": max(1, d // HEAD_WIDTH), "layers": 1,
            "ffn_ratio": 4.0, "dropout": 0.0, "pooling": "mean", "patch": 1}


def lstm(impl: str = "torch") -> SpecOf:
    """An LSTM of hidden size d over n steps: impl 'torch' (fused kernels) or 'cells' (models/layers/recurrent)."""
    return lambda n, d: {"kind": "rnn", "cell": "lstm", "hidden_size": d, "layers": 1, "impl": impl}


def build_on_synthetic(spec: dict, n: int, batch: int, seed: int) -> tuple[torch.nn.Module, torch.Tensor,
                                                                             torch.Tensor]:
    """The model of `spec` for signals of FEATURES channels × n steps, a batch of such signals and labels."""
    shape = DataShape(input_shape=(FEATURES, n), output_size=CLASSES)
    with torch.random.fork_rng():  # the caller's random stream is left as it was
        torch.manual_seed(seed)
        model = build_model(TypeAdapter(ModelSpec).validate_python(spec), shape)
        x = torch.randn(batch, FEATURES, n)
        y = torch.randint(0, CLASSES, (batch,))
    return model, x, y


@dataclass
class Prepared:
    """A model at (n, d) on its synthetic batch, counted, with its training step ready to time."""

    n: int
    d: int
    params: int
    flops: dict[str, float]
    train_step_flops: float
    batch: int
    step: Callable[[], None]


def prepare_point(spec_of: SpecOf, n: int, d: int, batch: int = BATCH, seed: int = 0) -> Prepared:
    """Build spec_of(n, d) on synthetic inputs and count its FLOPs by kind; its training step is the classify
    task's loss, forward and backward."""
    model, x, y = build_on_synthetic(spec_of(n, d), n, batch, seed)
    task = make_task("classify")
    total, by_kind = flops_by_kind(model, lambda m, inputs, _: m(inputs), x, y)
    step_flops = train_step_flops(model, task, x, y)
    loss_of = task.phases(model)[0].loss
    model.train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_of(model, x, y)[0].backward()

    return Prepared(n=n, d=d, params=sum(p.numel() for p in model.parameters()), flops={**by_kind, "total": total},
                    train_step_flops=step_flops, batch=batch, step=step)


def interleaved_times(steps: Sequence[Callable[[], None]], budget_s: float, rounds: int = ROUNDS) -> list[list[float]]:
    """Seconds of each step's runs, timed round-robin: `rounds` rounds that give every step budget_s / rounds
    each, so a slow spell of a shared machine falls on all points alike rather than on a few."""
    for step in steps:  # warm up all first: the first runs of a shape build its kernels
        for _ in range(WARMUP):
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(rounds):
        for runs, step in zip(times, steps):
            runs += timed_runs(step, torch.device("cpu"), budget_s / rounds, max_runs=100, warmup=0)
    return times


def measure_grid(spec_of: SpecOf, points: Iterable[tuple[int, int]], batch: int = BATCH,
                 budget_s: float = POINT_BUDGET_S, seed: int = 0) -> list[Point]:
    """Each (n, d): spec_of(n, d)'s FLOPs by kind and the median time of its training step (timed interleaved)."""
    prepared = [prepare_point(spec_of, n, d, batch, seed) for n, d in points]
    times = interleaved_times([p.step for p in prepared], budget_s)
    return [Point(n=p.n, d=p.d, params=p.params, flops=p.flops, train_step_flops=p.train_step_flops,
                  step_s=statistics.median(runs), sequences_per_s=p.batch / statistics.median(runs), batch=p.batch,
                  runs=len(runs)) for p, runs in zip(prepared, times)]


def slopes_against(points: list[Point], axis: str, kinds: Iterable[str]) -> dict[str, Slope]:
    """Slopes of each kind's FLOPs and of the step time against `axis` ('n' or 'd') over the points."""
    xs = [getattr(p, axis) for p in points]
    out = {f"{kind}_flops_vs_{axis}": loglog_slope(xs, [p.flops[kind] for p in points]) for kind in kinds}
    out[f"time_vs_{axis}"] = loglog_slope(xs, [p.step_s for p in points])
    return out


# ── claim 9: attention O(n²·d), FFN O(n·d²) ─────────────────────────────────────────────────────────────
def attention_scaling(ns: Sequence[int] = (32, 64, 128, 256, 512), ds: Sequence[int] = (32, 64, 128, 256),
                      d_at: int = 64, n_at: int = 64, **options) -> dict:
    """One Transformer encoder layer: FLOPs by kind and step time against n (at d = d_at) and against d (at
    n = n_at), with their log-log slopes. Expected: attention 2 in n and 1 in d; ffn and projection 1 in n and 2
    in d; time somewhere between, since a small model's time is not all matmuls."""
    by_n = measure_grid(transformer_layer, [(n, d_at) for n in ns], **options)
    by_d = measure_grid(transformer_layer, [(n_at, d) for d in ds], **options)
    fitted = ("attention", "projection", "ffn", "total")
    slopes = {**slopes_against(by_n, "n", fitted), **slopes_against(by_d, "d", fitted)}
    return {"model": transformer_layer(n_at, d_at), "threads": torch.get_num_threads(),
            "by_n": [asdict(p) for p in by_n], "by_d": [asdict(p) for p in by_d],
            "slopes": {name: asdict(s) for name, s in slopes.items()}}


# ── claim 8: an LSTM's steps one after another, attention's at once ─────────────────────────────────────
def params_of(spec_of: SpecOf, n: int, d: int) -> int:
    model, _, _ = build_on_synthetic(spec_of(n, d), n, 1, 0)
    return sum(p.numel() for p in model.parameters())


def matching_width(spec_of: SpecOf, params: int, n: int) -> int:
    """The smallest width d whose spec_of(n, d) has at least `params` parameters (a bisection: parameter counts
    grow with the width)."""
    low, high = 1, max(2, math.isqrt(params) + 1)  # every family here has at least d² parameters
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if params_of(spec_of, n, mid) < params else (low, mid)
    return low


def recurrence_vs_attention(ns: Sequence[int] = (16, 32, 64, 128, 256), d: int = 64,
                            impls: Sequence[str] = ("torch", "cells"), **options) -> dict:
    """Training-step time and throughput against n for a Transformer encoder layer of width d and LSTMs of about
    its parameter count (one per impl), with the slopes of log time against log n; `ratio` is the LSTM's step
    time over the Transformer's at each n."""
    reference = params_of(transformer_layer, ns[0], d)
    models: dict[str, list[Point]] = {"transformer": measure_grid(transformer_layer, [(n, d) for n in ns], **options)}
    for impl in impls:
        hidden = matching_width(lstm(impl), reference, ns[0])
        models[f"lstm_{impl}"] = measure_grid(lstm(impl), [(n, hidden) for n in ns], **options)
    transformer_s = [p.step_s for p in models["transformer"]]
    return {"threads": torch.get_num_threads(), "ns": list(ns),
            "models": {name: [asdict(p) for p in points] for name, points in models.items()},
            "time_slopes": {name: asdict(loglog_slope(ns, [p.step_s for p in points]))
                            for name, points in models.items()},
            "ratio": {name: [p.step_s / t for p, t in zip(points, transformer_s)]
                      for name, points in models.items() if name != "transformer"}}



def main() -> None:
    """`python -m pipeline.engine.scaling`: both measurements at their default grids, as JSON on stdout."""
    import json
    print(json.dumps({"attention_scaling": attention_scaling(), "recurrence_vs_attention": recurrence_vs_attention()},
                     indent=1))


if __name__ == "__main__":
    main()

"""Compute cost of a trained model: parameters, FLOPs, time, throughput, latency, memory and MFU.

`measure_cost(trainer, metrics)` runs after training (train_experiment writes its result to
runs/NAME/cost.json). Each measurement is guarded: one that cannot be made is recorded as null with a
reason under `unavailable`, and never fails the run. Timing loops stop after a small time budget,
so the whole measurement takes well under a second for the small models of the default experiments.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and attention; a
multiply-add counts 2). On the CPU it counts fused scaled-dot-product attention as 0, so every count
runs under the math SDPA backend with the MHA fast path off. The forward count is also split by kind of
work (attention, projection, ffn, convolution, recurrence, other: pipeline/engine/flops.py) in the same pass.
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pipeline.engine.flops import countable_attention, flops_by_kind

PEAK_CACHE_ENV = "ARCHLAB_CACHE_DIR"  # overrides ~/.cache/archlab (tests point it at a temporary folder)
FLOP_BATCH = 8  # samples per FLOP count: FLOPs are linear in the batch for every family here
LATENCY_BUDGET_S = 0.25
THROUGHPUT_BUDGET_S = 0.25

Forward = Callable[[nn.Module, torch.Tensor, torch.Tensor], object]


def count_parameters(model: nn.Module) -> dict[str, int]:
    return {"params_total": sum(p.numel() for p in model.parameters()),
            "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


# ── FLOPs ─────────────────────────────────────────────────────────────────────
def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of everything `fn` runs (forward and, if it calls it, backward)."""
    from torch.utils.flop_counter import FlopCounterMode
    with countable_attention(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def forward_flops(model: nn.Module, forward: Forward, x: torch.Tensor, y: torch.Tensor) -> float:
    """FLOPs per sample of one inference forward pass (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return count_flops(lambda: forward(model, x, y)) / len(x)
    finally:
        model.train(was_training)


def train_step_flops(model: nn.Module, task, x: torch.Tensor, y: torch.Tensor) -> float:
    """FLOPs per sample of one training step: every phase's loss (the task's), forward and backward.

    Counted on a copy, so the trained model's gradients, batch-norm statistics and RNG draws stay as
    they were. The optimizer's elementwise update is not counted (FlopCounterMode counts matmul-like
    work only; it is a few FLOPs per parameter).
    """
    clone = copy.deepcopy(model).train()
    phases = task.phases(clone)  # bound to the copy (a GAN's phases close over its own modules)
    total = 0
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        for phase in phases:
            def step(phase=phase):
                loss, _ = phase.loss(clone, x, y)
                loss.backward()
            total += count_flops(step)
            clone.zero_grad(set_to_none=True)
    return total / len(x)


# ── time ──────────────────────────────────────────────────────────────────────
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_runs(fn: Callable[[], object], device: torch.device, budget_s: float, max_runs: int,
               warmup: int = 2) -> list[float]:
    """Wall seconds of each call of fn, after warmup, until the budget or max_runs is reached."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (time.perf_counter() - start < budget_s or len(times) < 2):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def inference_speed(model: nn.Module, forward: Forward, x: torch.Tensor, y: torch.Tensor,
                    device: torch.device) -> dict[str, float]:
    """Samples/s over one large batch (median run) and latency at batch 1 (p50, p95), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            big = timed_runs(lambda: forward(model, x, y), device, THROUGHPUT_BUDGET_S, 20, warmup=1)
            one_x, one_y = x[:1], y[:1]
            single = timed_runs(lambda: forward(model, one_x, one_y), device, LATENCY_BUDGET_S, 200, warmup=3)
    finally:
        model.train(was_training)
    return {"infer_samples_per_s": len(x) / statistics.median(big),
            "latency_ms_p50": 1000 * percentile(single, 0.5), "latency_ms_p95": 1000 * percentile(single, 0.95)}


# ── memory ────────────────────────────────────────────────────────────────────
def peak_memory(device: torch.device) -> tuple[float, str]:
    """Peak CUDA memory allocated by tensors on a GPU; the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), "rss"


# ── peak FLOP/s, measured once per machine ──────────────────────────────────────
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_cache_path() -> Path:
    base = os.environ.get(PEAK_CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "archlab"
    return Path(base) / "peak_flops.json"


def peak_key(device: torch.device) -> str:
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return f"{device_name(device)}|torch {torch.__version__}|threads {threads}"


def measure_peak_flops(device: torch.device, budget_s: float = 0.5) -> float:
    """Dense float32 matmul FLOP/s: the best of several square products sized for the device."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    times = timed_runs(lambda: a @ b, device, budget_s, 50)
    return 2 * n ** 3 / min(times)


def peak_flops(device: torch.device) -> float:
    """Peak dense-matmul FLOP/s of this device, thread count and torch version (cached on disk)."""
    from pipeline.io import atomic_write_json
    path, key = peak_cache_path(), peak_key(device)
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), (int, float)):
        return float(cache[key])
    value = measure_peak_flops(device)
    cache[key] = value
    try:
        atomic_write_json(path, cache)
    except OSError:
        pass  # a read-only home: measure again next time
    return value


# ── everything ────────────────────────────────────────────────────────────────
KEYS = ("params_total", "params_trainable", "flops_forward_per_sample", "flops_by_kind", "flops_train_step_per_sample",
        "train_time_s", "train_samples_per_s", "infer_samples_per_s", "latency_ms_p50", "latency_ms_p95",
        "peak_memory_mb", "memory_kind", "peak_flops", "mfu", "device")


def measure_cost(trainer, metrics: dict) -> dict:
    """Cost of the trained model in `trainer` (its .model, .task, .phases, .device, .train_x, .val_x, ...)."""
    cost: dict = dict.fromkeys(KEYS)
    unavailable: dict[str, str] = {}
    device = trainer.device
    model = trainer.model
    cost.update(device=str(device), device_name=None, train_time_s=metrics.get("train_time_s"),
                train_samples_per_s=metrics.get("train_samples_per_s"))

    def attempt(keys: tuple[str, ...], fn: Callable[[], dict]) -> None:
        try:
            cost.update(fn())
        except Exception as err:  # noqa: BLE001 - cost is a report; it must never fail the run
            for key in keys:
                cost[key] = None
                unavailable[key] = f"{type(err).__name__}: {err}"[:300]

    attempt(("params_total", "params_trainable"), lambda: count_parameters(model))
    attempt(("train_samples_per_s",), lambda: {"train_samples_per_s": samples_per_second(trainer, metrics)})
    forward = trainer.task.inference_forward  # teacher-forced for seq2seq, the model's example forward else
    train_x, train_y = trainer.train_x[:FLOP_BATCH], trainer.train_y[:FLOP_BATCH]
    attempt(("flops_forward_per_sample", "flops_by_kind"), lambda: forward_flop_split(model, forward, train_x, train_y))
    attempt(("flops_train_step_per_sample",),
            lambda: {"flops_train_step_per_sample": train_step_flops(model, trainer.task, train_x, train_y)})
    timed_x, timed_y = (t[:256] for t in trainer.held_out())
    attempt(("infer_samples_per_s", "latency_ms_p50", "latency_ms_p95"),
            lambda: inference_speed(model, forward, timed_x, timed_y, device))
    attempt(("peak_memory_mb", "memory_kind"), lambda: dict(zip(("peak_memory_mb", "memory_kind"),
                                                                peak_memory(device))))
    attempt(("peak_flops", "device_name"), lambda: {"peak_flops": peak_flops(device),
                                                    "device_name": device_name(device)})
    cost["mfu"] = mfu(cost, unavailable)
    if unavailable:
        cost["unavailable"] = unavailable
    return {k: _rounded(v) for k, v in cost.items()}


def forward_flop_split(model: nn.Module, forward: Forward, x: torch.Tensor, y: torch.Tensor) -> dict:
    """flops_forward_per_sample and flops_by_kind from one counting pass (the total is forward_flops's)."""
    total, by_kind = flops_by_kind(model, forward, x, y)
    return {"flops_forward_per_sample": total, "flops_by_kind": {kind: _rounded(n) for kind, n in by_kind.items()}}


def samples_per_second(trainer, metrics: dict) -> float | None:
    """Training samples per second of training time, counting the samples the steps really saw (a step
    budget can end an epoch early, so epochs × training-set size would overcount)."""
    steps, per_epoch = trainer.state.step, trainer.steps_per_epoch
    n_train, batch = len(trainer.train_x), trainer.batch_size
    samples = (steps // per_epoch) * n_train + (steps % per_epoch) * batch
    seconds = metrics.get("train_time_s") or trainer.state.train_time_s
    return samples / seconds if seconds else None


def mfu(cost: dict, unavailable: dict[str, str]) -> float | None:
    """Achieved training FLOP/s (FLOPs per sample × samples/s) over the device's peak matmul FLOP/s."""
    flops, rate, peak = cost.get("flops_train_step_per_sample"), cost.get("train_samples_per_s"), cost.get("peak_flops")
    if not flops or not rate or not peak:
        unavailable["mfu"] = "needs training FLOPs, training samples/s and the peak FLOP/s"
        return None
    return flops * rate / peak


def _rounded(value):
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        return int(value)  # FLOP counts stay exact
    if isinstance(value, float):
        return float(f"{value:.4g}") if math.isfinite(value) else None
    return value

"""Gradient health and overfitting diagnostics, recorded while the engine trains.

The engine calls a monitor at three points: `after_backward(phase)` (gradients are there, the
optimizer has not stepped), `after_step()` (every phase has stepped) and `end_epoch(epoch)`.

What is recorded, and what it costs:

- Gradient norms, every step: one fused `torch._foreach_norm` over the phase's gradients plus one
  `torch.stack`, kept on the device as a (P,) tensor per step (P = parameter tensors). At the end of
  the epoch the (S, P) stack is grouped into layers with one matmul and read back in one host sync.
  A layer is the module that owns the parameters, named by its module path (`blocks.0.linear`).
  Multi-phase models (GANs): each layer's norm is taken in the phase whose optimizer updates it, so a
  layer appears once (merged); the global norm of a step is over every phase's gradients together.
- Update-to-weight ratio ‖Δw‖/‖w‖ per layer (Δw = lr·update as the optimizer applied it, weight
  decay included), on one step per epoch: the middle step (by the previous epoch's step count; the
  first step in epoch 1). The weights are copied before that step and compared after it.
- Activation statistics at the end of each epoch on a fixed probe batch (the first 256 training
  samples), in eval mode and without gradients, through forward hooks on the activation modules:
  mean, std and, for ReLU-family activations, the fraction of dead units — output elements (every
  feature, channel-position or token-feature of one sample) never positive on any probe sample. The
  hooks are removed and every module's train/eval mode and the RNG state are restored afterwards.
"""
from __future__ import annotations

import bisect
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from models.contract import Model, Phase

# ── tunables that are not worth a spec field ────────────────────────────────────
SPIKE_WINDOW = 500  # steps of global-norm history the running median is taken over
SPIKE_MIN_HISTORY = 20  # no spike is called before this many steps are known
SPIKE_RECORD = 10.0  # steps this many times above the median are kept (the spec's factor judges them later)
SPIKE_KEEP = 200  # at most this many such steps are kept (the checkpoint carries them)
MIN_PROGRESS = 0.1  # a training loss that never fell by 10% of its first value: the model barely learned
# ReLU-family: a unit whose output is never positive passes (almost) no gradient.
RELU_FAMILY = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Hardswish)
ACTIVATIONS = RELU_FAMILY + (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Hardsigmoid,
                             nn.LogSigmoid, nn.Tanhshrink)
FLAG_NAMES = ("vanishing", "exploding", "dead_units", "unstable", "diverged")


# ── layers and phases ────────────────────────────────────────────────────────────
@dataclass
class LayerIndex:
    """Trainable parameters grouped by the module that owns them, and by the phase that updates them."""

    names: list[str]  # layer (module path) per layer, in registration order: input side first
    params: list[nn.Parameter]  # every trainable parameter, in the same order
    param_layer: list[int]  # layer index of each parameter
    weight_layer: list[bool]  # layer has a ≥2-D parameter (Linear, Conv, Embedding, RNN), not a norm or bias only
    phase_params: dict[str, list[int]] = field(default_factory=dict)  # phase → indices into params
    layer_phase: list[str] = field(default_factory=list)  # the phase that updates each layer

    def grouping(self, param_ids: list[int], device: torch.device) -> torch.Tensor:
        """(len(param_ids), L) one-hot matrix: squared param norms @ it = squared layer norms."""
        m = torch.zeros(len(param_ids), len(self.names), device=device)
        for row, i in enumerate(param_ids):
            m[row, self.param_layer[i]] = 1.0
        return m


def layer_name(param_name: str) -> str:
    """'blocks.0.linear.weight' → 'blocks.0.linear'; a parameter of the model itself keeps its own name."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def index_layers(model: nn.Module, phases: list[Phase]) -> LayerIndex:
    """Group the trainable parameters by layer, each layer marked with the phase that updates it."""
    names: list[str] = []
    params: list[nn.Parameter] = []
    param_layer: list[int] = []
    weight: list[bool] = []
    for pname, p in model.named_parameters():  # shared (tied) parameters are listed once
        if not p.requires_grad:
            continue
        lname = layer_name(pname)
        if lname not in names:
            names.append(lname)
            weight.append(False)
        li = names.index(lname)
        params.append(p)
        param_layer.append(li)
        weight[li] = weight[li] or p.dim() >= 2
    index = LayerIndex(names, params, param_layer, weight)
    position = {id(p): i for i, p in enumerate(params)}
    index.layer_phase = ["main"] * len(names)
    for phase in phases:
        ids = [position[id(p)] for p in phase.params if id(p) in position]
        index.phase_params[phase.name] = ids
        for i in ids:
            index.layer_phase[param_layer[i]] = phase.name
    return index


# ── the monitor ────────────────────────────────────────────────────────────────
class NullMonitor:
    """Records nothing during training (diagnostics off); the summary still reads the history."""

    _last: dict | None = None  # the summary, once written

    def after_backward(self, phase: str) -> None: ...

    def after_step(self) -> None: ...

    def end_epoch(self, epoch: int) -> dict[str, float]:
        return {}

    def mlflow_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    def summary(self, history: list[dict], spec, run: dict | None = None) -> dict:
        self._last = history_summary(history, spec, run)
        return {"enabled": False, **self._last}

    def tags(self) -> dict[str, str]:
        return flag_tags(self._last)


class GradientMonitor:
    """Per-layer gradient norms, update ratios and activation statistics; flags and overfitting at the end."""

    def __init__(self, spec, model: Model, phases: list[Phase], probe_x: torch.Tensor, probe_y: torch.Tensor):
        self.spec = spec
        self.model = model
        self.probe_x, self.probe_y = probe_x, probe_y
        self.index = index_layers(model, phases)
        self.device = self.index.params[0].device if self.index.params else torch.device("cpu")
        self._zero = torch.zeros((), device=self.device)  # stands in for a missing gradient
        self._grouping = {ph: self.index.grouping(ids, self.device) for ph, ids in self.index.phase_params.items()}
        self._all_grouping = self.index.grouping(list(range(len(self.index.params))), self.device)
        # per-epoch device buffers
        self._step_norms: dict[str, list[torch.Tensor]] = defaultdict(list)  # phase → [(P_phase,)] per step
        self._snapshot: list[torch.Tensor] | None = None
        self._ratio: torch.Tensor | None = None  # (L,) this epoch's update ratio
        self._steps_in_epoch = 0
        # host state, carried by the checkpoint
        self.state: dict = {"epochs": [], "grad_mean": [], "grad_min": [], "grad_max": [], "global_mean": [],
                            "global_max": [], "update_ratio": [], "act_mean": [], "act_std": [], "act_dead": [],
                            "act_layers": None, "window": [], "spikes": [], "nonfinite_steps": 0,
                            "measure_at": 0, "activation_error": None}
        self._last: dict | None = None

    # called by the engine every step -------------------------------------------------
    def after_backward(self, phase: str) -> None:
        if self.spec.update_ratio and self._snapshot is None and self._steps_in_epoch == self.state["measure_at"]:
            # Weights before this step's update (the first phase's backward comes before any phase steps).
            with torch.no_grad():
                self._snapshot = torch._foreach_mul([p.detach() for p in self.index.params], 1.0)
        if not self.spec.grad_norms:
            return
        ids = self.index.phase_params.get(phase)
        if ids is None:  # a phase the model did not announce: count every parameter under it
            ids = self.index.phase_params[phase] = list(range(len(self.index.params)))
            self._grouping[phase] = self._all_grouping
        grads = [self.index.params[i].grad for i in ids]
        grads = [g if g is not None else self._zero for g in grads]
        self._step_norms[phase].append(torch.stack(torch._foreach_norm(grads)))  # (P_phase,), no host sync

    def after_step(self) -> None:
        if self._snapshot is not None and self._ratio is None:
            with torch.no_grad():
                now = [p.detach() for p in self.index.params]
                delta = torch.stack(torch._foreach_norm(torch._foreach_sub(now, self._snapshot))) ** 2  # (P,)
                weight = torch.stack(torch._foreach_norm(self._snapshot)) ** 2
                self._ratio = (delta @ self._all_grouping).sqrt() / (weight @ self._all_grouping).sqrt()  # (L,)
            self._snapshot = None
        self._steps_in_epoch += 1

    # called by the engine once per epoch ---------------------------------------------
    def end_epoch(self, epoch: int) -> dict[str, float]:
        parts: dict[str, torch.Tensor] = {}
        layer_sq = self._layer_squares()  # (S, L) or None
        if layer_sq is not None:
            norms = layer_sq.sqrt()
            global_norm = layer_sq.sum(1).sqrt()  # (S,)
            parts.update(mean=norms.mean(0), min=norms.min(0).values, max=norms.max(0).values, steps=global_norm)
        if self._ratio is not None:
            parts["ratio"] = self._ratio
        if self.spec.activation_stats:
            parts.update(self._probe_activations())
        host = _read_back(parts)  # one host sync for the whole epoch
        self._record(epoch, host)
        self._step_norms.clear()
        self._ratio, self._snapshot = None, None
        self.state["measure_at"] = self._steps_in_epoch // 2
        self._steps_in_epoch = 0
        steps = host.get("steps", [])
        if not steps:
            return {}
        return {"grad_norm/global": self.state["global_mean"][-1], "grad_norm/global_max": max(steps)}

    def mlflow_metrics(self) -> dict[str, float]:
        """This epoch's mean gradient norm per layer, as `grad_norm/<layer>` (MLflow only, not history.csv)."""
        if not self.state["grad_mean"]:
            return {}
        row = self.state["grad_mean"][-1]
        return {f"grad_norm/{name}": v for name, v in zip(self.index.names, row) if v is not None and math.isfinite(v)}

    def _layer_squares(self) -> torch.Tensor | None:
        """Every step's squared norm per layer, all phases merged: (S, L)."""
        if not self._step_norms:
            return None
        steps = min(len(v) for v in self._step_norms.values())
        total = None
        for phase, norms in self._step_norms.items():
            sq = torch.stack(norms[:steps]).float() ** 2  # (S, P_phase)
            part = sq @ self._grouping[phase]  # (S, L)
            total = part if total is None else total + part
        return total

    def _record(self, epoch: int, host: dict) -> None:
        s = self.state
        s["epochs"].append(epoch)
        n = len(self.index.names)
        for key, src in (("grad_mean", "mean"), ("grad_min", "min"), ("grad_max", "max"), ("update_ratio", "ratio")):
            s[key].append(host.get(src, [float("nan")] * n))
        steps = host.get("steps", [])
        finite = [v for v in steps if math.isfinite(v)]
        s["global_mean"].append(sum(finite) / len(finite) if finite and len(finite) == len(steps) else
                                (float("nan") if steps else None))
        s["global_max"].append(max(steps) if steps else None)
        self._scan_spikes(epoch, steps)
        if "act_mean" in host:
            s["act_mean"].append(host["act_mean"])
            s["act_std"].append(host["act_std"])
            s["act_dead"].append(host["act_dead"])

    def _scan_spikes(self, epoch: int, steps: list[float]) -> None:
        """A step whose global norm is `exploding_factor` × the running median of the steps before it."""
        s = self.state
        window = s["window"]  # the last SPIKE_WINDOW finite norms, oldest first (checkpointed)
        ordered = sorted(window)  # the same, sorted: the median in O(1), updates by bisection
        for i, g in enumerate(steps):
            if not math.isfinite(g):
                s["nonfinite_steps"] += 1
                continue
            if len(ordered) >= SPIKE_MIN_HISTORY:
                n = len(ordered)
                median = ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])
                if median > 0 and g > SPIKE_RECORD * median:
                    event = {"epoch": epoch, "step_in_epoch": i, "norm": g, "median": median, "ratio": g / median}
                    if len(s["spikes"]) < SPIKE_KEEP:
                        s["spikes"].append(event)
                    elif event["ratio"] > min(e["ratio"] for e in s["spikes"]):  # keep the largest
                        s["spikes"].remove(min(s["spikes"], key=lambda e: e["ratio"]))
                        s["spikes"].append(event)
            window.append(g)
            bisect.insort(ordered, g)
            if len(window) > SPIKE_WINDOW:
                del ordered[bisect.bisect_left(ordered, window.pop(0))]

    # activation statistics on the probe batch -------------------------------------------
    def _activation_modules(self) -> list[tuple[str, nn.Module]]:
        acts = [(n, m) for n, m in self.model.named_modules() if isinstance(m, ACTIVATIONS)]
        if acts:
            return acts
        # No activation modules (functional activations): watch the parameterised layers' outputs instead.
        layers = set(self.index.names)
        return [(n, m) for n, m in self.model.named_modules() if n in layers]

    def _probe_activations(self) -> dict[str, torch.Tensor]:
        modules = self._activation_modules()
        if not modules or self.state["activation_error"]:
            return {}
        sums = {name: [] for name, _ in modules}  # name → [(sum, sumsq, count)] per call
        alive: dict[str, dict[tuple, torch.Tensor]] = {name: {} for name, _ in modules}  # per output shape

        def hook_for(name: str, relu_like: bool):
            def hook(_module, _inputs, output):
                out = output[0] if isinstance(output, (tuple, list)) else output
                if not torch.is_tensor(out) or not out.is_floating_point() or out.dim() < 1:
                    return
                out = out.detach().float()
                # A non-finite output (a diverged model) counts as a NaN total, so no unit is called dead for it.
                sums[name].append(torch.stack([out.sum(), (out * out).sum(), out.new_full((), out.numel())]))  # no H2D copy
                if relu_like:
                    fired = (out > 0).any(dim=0)  # (units...) fired on at least one probe sample
                    shape = tuple(fired.shape)
                    alive[name][shape] = fired | alive[name][shape] if shape in alive[name] else fired
            return hook

        modes = [(m, m.training) for m in self.model.modules()]
        handles = [m.register_forward_hook(hook_for(n, isinstance(m, RELU_FAMILY))) for n, m in modules]
        self.model.eval()
        try:
            # Forked RNG: a model that samples even in eval mode must not shift the training's random stream.
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                self.model.example_forward(self.probe_x)
        except Exception as err:  # noqa: BLE001 - a model whose forward needs more than x: no activation stats
            self.state["activation_error"] = f"probe forward failed: {type(err).__name__}: {err}"
            return {}
        finally:
            for h in handles:
                h.remove()
            for m, was_training in modes:
                m.training = was_training
        names = [n for n, _ in modules if sums[n]]
        self.state["act_layers"] = self.state["act_layers"] or names
        names = self.state["act_layers"]
        nan = torch.tensor(float("nan"), device=self.device)
        mean, std, dead = [], [], []
        for name in names:
            if not sums.get(name):
                mean.append(nan), std.append(nan), dead.append(nan)
                continue
            total, total_sq, count = torch.stack(sums[name]).sum(0)
            mu = total / count
            mean.append(mu)
            std.append((total_sq / count - mu * mu).clamp(min=0).sqrt())
            masks = alive[name]
            dead_share = torch.stack([1 - m.float().mean() for m in masks.values()]).mean() if masks else nan
            dead.append(torch.where(total.isfinite(), dead_share, nan))  # (NaN outputs are not "dead")
        return {"act_mean": torch.stack(mean), "act_std": torch.stack(std), "act_dead": torch.stack(dead)}

    # checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"layers": list(self.index.names), **self.state}

    def load_state_dict(self, state: dict) -> None:
        if not state or state.get("layers") != self.index.names:
            return  # from a run without diagnostics, or another model: start afresh
        self.state = {k: v for k, v in state.items() if k != "layers"}

    # results ----------------------------------------------------------------------------
    def summary(self, history: list[dict], spec, run: dict | None = None) -> dict:
        s = self.state
        flags = history_summary(history, spec, run)
        grad_flags = self._gradient_flags(spec)
        flags["flags"].update(grad_flags["flags"])
        flags["flag_details"].update(grad_flags["flag_details"])
        out = {
            "enabled": True,
            "layers": list(self.index.names),
            "layer_phase": list(self.index.layer_phase),
            "epochs": list(s["epochs"]),
            "grad_norm": {"mean": s["grad_mean"], "min": s["grad_min"], "max": s["grad_max"],
                          "global_mean": s["global_mean"], "global_max": s["global_max"],
                          "scope": "per layer, in the phase that updates it; global over all phases"},
            "update_ratio": s["update_ratio"],
            "activations": {"layers": s["act_layers"] or [], "mean": s["act_mean"], "std": s["act_std"],
                            "dead_fraction": s["act_dead"],
                            "relu_family": [self._is_relu_family(n) for n in s["act_layers"] or []],
                            "error": s["activation_error"]},
            "exploding_events": [e for e in s["spikes"] if e["ratio"] > spec.exploding_factor][:20],
            "largest_spike": max(s["spikes"], key=lambda e: e["ratio"], default=None),
            "nonfinite_gradient_steps": s["nonfinite_steps"],
            **flags,
        }
        self._last = out
        return clean_json(out)

    def tags(self) -> dict[str, str]:
        return flag_tags(self._last)

    def _is_relu_family(self, name: str) -> bool:
        module = dict(self.model.named_modules()).get(name)
        return isinstance(module, RELU_FAMILY)

    def _gradient_flags(self, spec) -> dict:
        flags: dict[str, bool] = {}
        details: dict[str, str] = {}
        flags["vanishing"], details["vanishing"] = self._vanishing(spec)
        flags["exploding"], details["exploding"] = self._exploding(spec)
        flags["dead_units"], details["dead_units"] = self._dead_units(spec)
        return {"flags": flags, "flag_details": details}

    def _vanishing(self, spec) -> tuple[bool, str]:
        """Per phase: median over epochs of (earliest weight layers' mean norm / last weight layers')."""
        if not self.state["grad_mean"] or not any(self.state["global_max"]):
            return False, "no gradient norms recorded"
        worst: tuple[float, str, str, str] | None = None
        for phase in self.index.phase_params:
            layers = [i for i, w in enumerate(self.index.weight_layer) if w and self.index.layer_phase[i] == phase]
            if len(layers) < 2:
                continue
            k = max(1, len(layers) // 4)
            first, last = layers[:k], layers[-k:]
            ratios = []
            for row in self.state["grad_mean"]:
                a, b = _mean([row[i] for i in first]), _mean([row[i] for i in last])
                if a is not None and b is not None and b > 0:
                    ratios.append(a / b)
            if ratios:
                r = float(np.median(ratios))
                if worst is None or r < worst[0]:
                    worst = (r, phase, self.index.names[first[0]], self.index.names[last[-1]])
        if worst is None:
            return False, "fewer than two weight layers: nothing to compare"
        r, phase, first_name, last_name = worst
        where = f" (phase {phase})" if len(self.index.phase_params) > 1 else ""
        return r < spec.vanishing_ratio, (
            f"the earliest layers' gradient norm ({first_name}, ...) is {r:.2e} of the last layers' "
            f"(..., {last_name}){where}, median over epochs; threshold {spec.vanishing_ratio:g}.")

    def _exploding(self, spec) -> tuple[bool, str]:
        s = self.state
        if s["nonfinite_steps"]:
            return True, f"{s['nonfinite_steps']} step(s) had an Inf or NaN gradient norm."
        spikes = [e for e in s["spikes"] if e["ratio"] > spec.exploding_factor]
        if spikes:
            top = max(spikes, key=lambda e: e["ratio"])
            return True, (f"{len(spikes)} step(s) had a global gradient norm above {spec.exploding_factor:g}x its "
                          f"running median; the largest, in epoch {top['epoch']}, was {top['norm']:.3g} against a "
                          f"median of {top['median']:.3g} ({top['norm'] / top['median']:.0f}x).")
        if not s["window"]:
            return False, "no gradient norms recorded"
        peak = max((m for m in s["global_max"] if m is not None), default=float("nan"))
        top = max(s["spikes"], key=lambda e: e["ratio"], default=None)
        largest = (f"its largest jump was {top['ratio']:.0f}x (epoch {top['epoch']})" if top else
                   f"no step went above {SPIKE_RECORD:g}x")
        return False, (f"the global gradient norm peaked at {peak:.3g}; against its running median {largest}, "
                       f"below the {spec.exploding_factor:g}x threshold; no Inf or NaN gradient.")

    def _dead_units(self, spec) -> tuple[bool, str]:
        s = self.state
        if not s["act_dead"]:
            return False, s["activation_error"] or "no activation statistics recorded"
        last = s["act_dead"][-1]
        relu = [(v, n) for v, n in zip(last, s["act_layers"]) if v is not None and math.isfinite(v)
                and self._is_relu_family(n)]
        if not relu:
            return False, "no ReLU-family activations to check"
        worst, name = max(relu)
        return worst >= spec.dead_fraction, (
            f"at the last epoch, {worst:.0%} of the units after {name} never fired on the probe batch "
            f"(the worst of {len(relu)} ReLU-family layers); threshold {spec.dead_fraction:.0%}.")


def _mean(values: list) -> float | None:
    ok = [v for v in values if v is not None and math.isfinite(v)]
    return sum(ok) / len(ok) if ok else None


def _read_back(parts: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Device tensors → host lists with one transfer (one sync), split back by name."""
    if not parts:
        return {}
    flat = torch.cat([t.detach().reshape(-1).float() for t in parts.values()]).tolist()
    out, at = {}, 0
    for key, t in parts.items():
        out[key] = flat[at:at + t.numel()]
        at += t.numel()
    return out


# ── what the history alone says: overfitting, instability, divergence ───────────────────
def history_summary(history: list[dict], spec, run: dict | None = None) -> dict:
    """Flags and the overfitting verdict that need only the per-epoch history (free: no hooks)."""
    run = run or {}
    train = _column(history, "train/loss")
    val = _column(history, "val/loss")
    diverged = run.get("status") == "diverged" if "status" in run else any(
        v is not None and not math.isfinite(v) for v in train + val)
    flags = {"vanishing": False, "exploding": False, "dead_units": False}
    details = {"vanishing": "diagnostics off", "exploding": "diagnostics off", "dead_units": "diagnostics off"}
    if any(v is not None for v in train):
        flags["unstable"], details["unstable"] = unstable(train, spec.unstable_ratio)
    else:
        flags["unstable"], details["unstable"] = False, "no train/loss column (a multi-phase model logs per phase)"
    flags["diverged"] = diverged
    details["diverged"] = ("a loss became NaN or Inf; training stopped (status diverged)." if diverged else
                           "every loss stayed finite.")
    return {"flags": flags, "flag_details": details,
            "overfitting": overfitting(history, spec, run.get("main_metric"), run.get("best_epoch"), diverged)}


def _column(history: list[dict], key: str) -> list[float | None]:
    out = []
    for row in history:
        v = row.get(key)
        out.append(float(v) if isinstance(v, (int, float)) else None)
    return out


def unstable(train_loss: list[float | None], ratio: float) -> tuple[bool, str]:
    """Oscillation: at some epoch the training loss had climbed back above its best-so-far by more than
    `ratio` of its whole fall (first epoch to lowest). Noise on a plateau climbs back a few percent at most,
    however long the run; a rate too high for the model gives back much of what it had gained."""
    losses = [v for v in train_loss if v is not None and math.isfinite(v)]
    if len(losses) < 3:
        return False, "fewer than three epochs with a finite training loss"
    best, climb, where = losses[0], 0.0, 0
    for epoch, v in enumerate(losses):
        best = min(best, v)
        if v - best > climb:
            climb, where = v - best, epoch + 1
    fall = losses[0] - min(losses)
    if fall <= 0:
        return climb > 0, (f"the training loss never fell below its first epoch's {losses[0]:.4g}; it climbed to "
                           f"{max(losses):.4g}.")
    share = climb / fall
    return share > ratio, (f"the training loss climbed back {share:.0%} of its whole fall ({losses[0]:.4g} → "
                           f"{min(losses):.4g}) at its worst (epoch {where or 1}); threshold {ratio:.0%}.")


def overfitting(history: list[dict], spec, main_metric: str | None, best_epoch: int | None,
                diverged: bool) -> dict:
    """Generalisation gaps, best epoch, overfitting onset and a verdict.

    Rules (k = spec.overfit_patience, tol = spec.overfit_tolerance):
    - onset: let m be the epoch of the lowest validation loss. Overfitting set in at m + 1 when at least k
      epochs follow m, the training loss at m + k is below its value at m (still fitting the training set),
      and the validation loss ended more than tol (relative) above its minimum.
    - verdict `overfit`: a material gap in the main metric at the final epoch (|validation − training| ≥
      spec.overfit_gap; unknown counts as material), with either an onset or a validation loss more than
      twice the training loss (early stopping may cut the U-curve short; the gap stays). A model whose
      validation loss creeps up from a tiny value while its metric stays within a point of training is not.
    - else `underfit`: the training loss barely fell (by less than MIN_PROGRESS of its first epoch's value),
      or it was still falling at the end: over the last k epochs by more than spec.underfit_fall of its
      whole fall (the budget ended before the fit did).
    - else `good fit`. A diverged run gets `diverged`.
    Gaps are validation minus training; the training figures are the epoch's running averages in train
    mode (dropout, augmentation on), so a regularised model can show a negative loss gap.
    """
    epochs = [row.get("epoch") for row in history]
    train, val = _column(history, "train/loss"), _column(history, "val/loss")
    finite = [i for i, v in enumerate(val) if v is not None and math.isfinite(v)
              and train[i] is not None and math.isfinite(train[i])]
    metric = main_metric or _guess_metric(history)
    train_m, val_m = _column(history, f"train/{metric}"), _column(history, f"val/{metric}")

    def gap(i: int | None) -> dict:
        if i is None:
            return {"loss": None, "metric": None}
        loss_gap = val[i] - train[i] if val[i] is not None and train[i] is not None else None
        metric_gap = val_m[i] - train_m[i] if val_m[i] is not None and train_m[i] is not None else None
        return {"loss": loss_gap, "metric": metric_gap}

    result = {"best_epoch": None, "onset_epoch": None, "gap_best": gap(None), "gap_final": gap(None),
              "verdict": "diverged" if diverged else "n/a", "metric": metric, "min_val_loss_epoch": None,
              "val_loss_rise": None, "rule": "no epoch with finite train/loss and val/loss"}
    if not finite:
        return clean_json(result)
    m = min(finite, key=lambda i: val[i])
    last = finite[-1]
    best = epochs.index(best_epoch) if best_epoch in epochs else m
    k = spec.overfit_patience
    rise = (val[last] - val[m]) / max(abs(val[m]), 1e-12)
    onset = None
    if last - m >= k and train[m + k] is not None and train[m + k] < train[m] and rise > spec.overfit_tolerance:
        onset = epochs[m + 1]
    final_gap = gap(last)
    result.update(best_epoch=epochs[best], onset_epoch=onset, gap_best=gap(best), gap_final=final_gap,
                  min_val_loss_epoch=epochs[m], val_loss_rise=rise)
    if diverged:
        result["rule"] = "the run diverged"
        return clean_json(result)
    losses = [train[i] for i in finite]
    whole_fall = losses[0] - min(losses)
    progress = whole_fall / max(abs(losses[0]), 1e-12)
    recent = losses[-(k + 1):]
    late_fall = (recent[0] - recent[-1]) / whole_fall if len(recent) > k and whole_fall > 0 else 0.0
    metric_gap = final_gap["metric"]
    material = metric_gap is None or abs(metric_gap) >= spec.overfit_gap
    gap_text = f"the final {metric} gap is {metric_gap:+.3g}" if metric_gap is not None else "no metric gap"
    loss_ratio = val[last] / train[last] if train[last] > 0 else float("inf")
    if material and onset is not None:
        verdict, rule = "overfit", (f"validation loss ended {rise:.0%} above its minimum (epoch {epochs[m]}) while "
                                    f"the training loss kept falling, and {gap_text}")
    elif material and val[last] > 0 and loss_ratio > 2:
        verdict, rule = "overfit", (f"the final validation loss is {loss_ratio:.1f}x the training loss, and "
                                    f"{gap_text}")
    elif progress < MIN_PROGRESS:
        verdict, rule = "underfit", f"the training loss fell only {progress:.0%} from its first epoch"
    elif late_fall > spec.underfit_fall:
        verdict, rule = "underfit", (f"the training loss was still falling: {late_fall:.0%} of its whole fall came "
                                     f"in the last {k} epochs")
    else:
        verdict = "good fit"
        rule = (f"validation loss rose {rise:.0%} after epoch {epochs[m]} but {gap_text}, within "
                f"{spec.overfit_gap:g}" if onset is not None else
                f"validation loss ended {rise:.0%} above its minimum; {max(late_fall, 0.0):.0%} of the training "
                f"loss's fall came in the last {k} epochs")
    result.update(verdict=verdict, rule=rule)
    return clean_json(result)


def _guess_metric(history: list[dict]) -> str | None:
    for key in (history[0] if history else {}):
        if key.startswith("val/") and key != "val/loss":
            return key[4:]
    return None


def flag_tags(summary: dict | None) -> dict[str, str]:
    """MLflow tags: `diagnostics/<flag>` = true/false, plus the overfitting verdict."""
    if not summary:
        return {}
    tags = {f"diagnostics/{k}": str(bool(v)).lower() for k, v in summary.get("flags", {}).items()}
    verdict = summary.get("overfitting", {}).get("verdict")
    if verdict:
        tags["diagnostics/verdict"] = verdict
    return tags


def clean_json(obj):
    """NaN and Inf become null: diagnostics.json stays strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj


def make_monitor(spec, model: Model, phases: list[Phase], probe_x: torch.Tensor, probe_y: torch.Tensor):
    """The engine's monitor: a GradientMonitor when diagnostics are on, else one that records nothing."""
    if not spec.enabled or not any(p.requires_grad for p in model.parameters()):
        return NullMonitor()
    return GradientMonitor(spec, model, phases, probe_x, probe_y)

"""Gradient health diagnostics, recorded live while the engine trains (the verdicts on them: verdicts.py).

The engine calls a monitor at three points: `after_backward(phase)` (gradients are there, the
optimizer has not stepped), `after_step()` (every phase has stepped) and `end_epoch(epoch)`; with
`train.grad_clip` set, also `after_clip(phase)` (gradients clipped, the optimizer has not stepped).

What is recorded, and what it costs:

- Gradient norms, every step: one fused `torch._foreach_norm` over the phase's gradients plus one
  `torch.stack`, kept on the device as a (P,) tensor per step (P = parameter tensors). At the end of
  the epoch the (S, P) stack is grouped into layers with one matmul and read back in one host sync.
  A layer is the module that owns the parameters, named by its module path (`blocks.0.linear`).
  Multi-phase models (GANs): each layer's norm is taken in the phase whose optimizer updates it, so a
  layer appears once (merged); the global norm of a step is over every phase's gradients together.
  With clipping, the global norm is also taken after the clip (one more fused norm per step), so that
  `grad_norm/global_clipped` sits beside `grad_norm/global` (before the clip) in the history.
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

import torch
from torch import nn

from models.contract import Model, Phase
from pipeline.engine.distributed import Ranks
from pipeline.engine.verdicts import SPIKE_RECORD, clean_json, flag_tags, gradient_flags, history_summary

# ── tunables that are not worth a spec field ────────────────────────────────────
SPIKE_WINDOW = 500  # steps of global-norm history the running median is taken over
SPIKE_MIN_HISTORY = 20  # no spike is called before this many steps are known
SPIKE_KEEP = 200  # at most this many such steps are kept (the checkpoint carries them)
# ReLU-family: a unit whose output is never positive passes (almost) no gradient.
RELU_FAMILY = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Hardswish)
ACTIVATIONS = RELU_FAMILY + (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Hardsigmoid,
                             nn.LogSigmoid, nn.Tanhshrink)


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

    def before_average(self, phase: str) -> None: ...

    def after_backward(self, phase: str) -> None: ...

    def after_clip(self, phase: str) -> None: ...

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

    def __init__(self, spec, model: Model, phases: list[Phase], probe_x: torch.Tensor, probe_y: torch.Tensor,
                 ranks: Ranks = Ranks()):
        self.spec = spec
        self.model = model
        self.ranks = ranks
        self.probe_x, self.probe_y = probe_x, probe_y
        self.index = index_layers(model, phases)
        self.device = self.index.params[0].device if self.index.params else torch.device("cpu")
        self._zero = torch.zeros((), device=self.device)  # stands in for a missing gradient
        self._grouping = {ph: self.index.grouping(ids, self.device) for ph, ids in self.index.phase_params.items()}
        self._all_grouping = self.index.grouping(list(range(len(self.index.params))), self.device)
        # per-epoch device buffers
        self._step_norms: dict[str, list[torch.Tensor]] = defaultdict(list)  # phase → [(P_phase,)] per step
        self._clipped_sq: dict[str, list[torch.Tensor]] = defaultdict(list)  # phase → [() squared norm] per step
        self._local_sq: dict[str, list[torch.Tensor]] = defaultdict(list)  # phase → [() this rank's, squared]
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
    def before_average(self, phase: str) -> None:
        """Under data parallelism: this rank's own gradient norm, from its shard, before the ranks average."""
        if self.ranks.active and self.spec.grad_norms:
            norms = torch.stack(torch._foreach_norm(self._grads(self._phase_ids(phase))))
            self._local_sq[phase].append((norms.float() ** 2).sum())

    def _phase_ids(self, phase: str) -> list[int]:
        ids = self.index.phase_params.get(phase)
        if ids is None:  # a phase the model did not announce: count every parameter under it
            ids = self.index.phase_params[phase] = list(range(len(self.index.params)))
            self._grouping[phase] = self._all_grouping
        return ids

    def after_backward(self, phase: str) -> None:
        if self.spec.update_ratio and self._snapshot is None and self._steps_in_epoch == self.state["measure_at"]:
            # Weights before this step's update (the first phase's backward comes before any phase steps).
            with torch.no_grad():
                self._snapshot = torch._foreach_mul([p.detach() for p in self.index.params], 1.0)
        if not self.spec.grad_norms:
            return
        ids = self._phase_ids(phase)
        self._step_norms[phase].append(torch.stack(torch._foreach_norm(self._grads(ids))))  # (P_phase,), no sync

    def after_clip(self, phase: str) -> None:
        """The phase's global gradient norm after clipping, squared, kept on the device."""
        if self.spec.grad_norms:
            norms = torch.stack(torch._foreach_norm(self._grads(self.index.phase_params[phase])))
            self._clipped_sq[phase].append((norms.float() ** 2).sum())

    def _grads(self, ids: list[int]) -> list[torch.Tensor]:
        grads = [self.index.params[i].grad for i in ids]
        return [g if g is not None else self._zero for g in grads]

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
        if self._clipped_sq:
            steps = min(len(v) for v in self._clipped_sq.values())
            parts["clipped"] = sum(torch.stack(v[:steps]) for v in self._clipped_sq.values()).sqrt()  # (S,)
        if self._local_sq:
            steps = min(len(v) for v in self._local_sq.values())
            parts["local"] = sum(torch.stack(v[:steps]) for v in self._local_sq.values()).sqrt()  # (S,)
        if self._ratio is not None:
            parts["ratio"] = self._ratio
        if self.spec.activation_stats:
            parts.update(self._probe_activations())
        host = _read_back(parts)  # one host sync for the whole epoch
        self._record(epoch, host)
        self._step_norms.clear()
        self._clipped_sq.clear()
        self._local_sq.clear()
        self._ratio, self._snapshot = None, None
        self.state["measure_at"] = self._steps_in_epoch // 2
        self._steps_in_epoch = 0
        steps = host.get("steps", [])
        if not steps:
            return {}
        row = {"grad_norm/global": self.state["global_mean"][-1], "grad_norm/global_max": max(steps)}
        if "clipped" in host:
            row.update({"grad_norm/global_clipped": self.state["clipped_mean"][-1],
                        "grad_norm/global_clipped_max": self.state["clipped_max"][-1]})
        return row

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
        s["global_mean"].append(_mean_or_nan(steps))
        s["global_max"].append(max(steps) if steps else None)
        if "clipped" in host:  # only runs that clip have these (a checkpoint from before them starts them here)
            s.setdefault("clipped_mean", []).append(_mean_or_nan(host["clipped"]))
            s.setdefault("clipped_max", []).append(max(host["clipped"]))
        self._scan_spikes(epoch, steps)
        if self.ranks.active and self.spec.grad_norms:  # every rank gathers: the collective needs them all
            s.setdefault("rank_global_mean", []).append(self.ranks.gather(_mean_or_nan(host.get("local", []))))
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
        relu_layers = {n for n in s["act_layers"] or [] if self._is_relu_family(n)}
        grad_flags = gradient_flags(s, self.index, relu_layers, spec)
        flags["flags"].update(grad_flags["flags"])
        flags["flag_details"].update(grad_flags["flag_details"])
        out = {
            "enabled": True,
            "layers": list(self.index.names),
            "layer_phase": list(self.index.layer_phase),
            "epochs": list(s["epochs"]),
            "grad_norm": {"mean": s["grad_mean"], "min": s["grad_min"], "max": s["grad_max"],
                          "global_mean": s["global_mean"], "global_max": s["global_max"],
                          # after the clip (runs with train.grad_clip only); every other norm is before it
                          **({"global_clipped_mean": s["clipped_mean"], "global_clipped_max": s["clipped_max"]}
                             if "clipped_mean" in s else {}),
                          # data-parallel runs: per epoch, each rank's own gradient norm (its shard's, before
                          # the ranks average); global_mean is the total, the norm of the averaged gradient
                          **({"per_rank_global_mean": s["rank_global_mean"]} if "rank_global_mean" in s else {}),
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

def _mean_or_nan(steps: list[float]) -> float | None:
    """The mean of an epoch's step values; nan if any is not finite, None if there are none."""
    finite = [v for v in steps if math.isfinite(v)]
    return sum(finite) / len(finite) if finite and len(finite) == len(steps) else (float("nan") if steps else None)


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


def make_monitor(spec, model: Model, phases: list[Phase], probe_x: torch.Tensor, probe_y: torch.Tensor,
                 ranks: Ranks = Ranks()):
    """The engine's monitor: a GradientMonitor when diagnostics are on, else one that records nothing."""
    if not spec.enabled or not any(p.requires_grad for p in model.parameters()):
        return NullMonitor()
    return GradientMonitor(spec, model, phases, probe_x, probe_y, ranks)

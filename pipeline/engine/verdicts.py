"""After-the-fact verdicts: what a run's records say about it, once it is over.

The live monitor (diagnostics.py) records gradient norms, update ratios and activation statistics; the rules
here turn those records and the per-epoch history into flags (vanishing, exploding, dead units, unstable,
diverged) and the overfitting verdict, each with the sentence that explains it.
"""
from __future__ import annotations

import math

import numpy as np

SPIKE_RECORD = 10.0  # steps this many times above the median are kept (the spec's factor judges them later)
FLAG_NAMES = ("vanishing", "exploding", "dead_units", "unstable", "diverged")
HISTORY_FLAGS = ("unstable", "diverged")  # judged from the loss history, so known even with diagnostics off
MIN_PROGRESS = 0.1  # a training loss that never fell by 10% of its first value: the model barely learned


# ── what the gradient records say ─────────────────────────────────────────────────
def gradient_flags(state: dict, index, relu_layers: set[str], spec) -> dict:
    flags: dict[str, bool] = {}
    details: dict[str, str] = {}
    flags["vanishing"], details["vanishing"] = vanishing(state, index, spec)
    flags["exploding"], details["exploding"] = exploding(state, spec)
    flags["dead_units"], details["dead_units"] = dead_units(state, relu_layers, spec)
    return {"flags": flags, "flag_details": details}

def vanishing(state: dict, index, spec) -> tuple[bool, str]:
    """Per phase: median over epochs of (earliest weight layers' mean norm / last weight layers')."""
    if not state["grad_mean"] or not any(state["global_max"]):
        return False, "no gradient norms recorded"
    worst: tuple[float, str, str, str] | None = None
    for phase in index.phase_params:
        layers = [i for i, w in enumerate(index.weight_layer) if w and index.layer_phase[i] == phase]
        if len(layers) < 2:
            continue
        k = max(1, len(layers) // 4)
        first, last = layers[:k], layers[-k:]
        ratios = []
        for row in state["grad_mean"]:
            a, b = _mean([row[i] for i in first]), _mean([row[i] for i in last])
            if a is not None and b is not None and b > 0:
                ratios.append(a / b)
        if ratios:
            r = float(np.median(ratios))
            if worst is None or r < worst[0]:
                worst = (r, phase, index.names[first[0]], index.names[last[-1]])
    if worst is None:
        return False, "fewer than two weight layers: nothing to compare"
    r, phase, first_name, last_name = worst
    where = f" (phase {phase})" if len(index.phase_params) > 1 else ""
    return r < spec.vanishing_ratio, (
        f"the earliest layers' gradient norm ({first_name}, ...) is {r:.2e} of the last layers' "
        f"(..., {last_name}){where}, median over epochs; threshold {spec.vanishing_ratio:g}.")

def exploding(s: dict, spec) -> tuple[bool, str]:
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

def dead_units(s: dict, relu_layers: set[str], spec) -> tuple[bool, str]:
    if not s["act_dead"]:
        return False, s["activation_error"] or "no activation statistics recorded"
    last = s["act_dead"][-1]
    relu = [(v, n) for v, n in zip(last, s["act_layers"]) if v is not None and math.isfinite(v)
            and n in relu_layers]
    if not relu:
        return False, "no ReLU-family activations to check"
    worst, name = max(relu)
    return worst >= spec.dead_fraction, (
        f"at the last epoch, {worst:.0%} of the units after {name} never fired on the probe batch "
        f"(the worst of {len(relu)} ReLU-family layers); threshold {spec.dead_fraction:.0%}.")


def _mean(values: list) -> float | None:
    ok = [v for v in values if v is not None and math.isfinite(v)]
    return sum(ok) / len(ok) if ok else None


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
    if history and not any(key.startswith("val/") for row in history for key in row):
        result["rule"] = "no validation split (the dataset's split.val_fraction is 0): overfitting is not judged"
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
    verdict, rule = _fit_verdict(spec, epochs, train, val, finite, m, onset, rise, metric, final_gap)
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


def _fit_verdict(spec, epochs: list, train: list, val: list, finite: list[int], m: int, onset, rise: float,
                 metric: str | None, final_gap: dict) -> tuple[str, str]:
    """The overfit / underfit / good fit rule of `overfitting` (see its docstring), with the sentence that
    explains it. `m` is the index of the lowest validation loss, `finite` the usable epochs."""
    last = finite[-1]
    k = spec.overfit_patience
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
        return "overfit", (f"validation loss ended {rise:.0%} above its minimum (epoch {epochs[m]}) while the "
                           f"training loss kept falling, and {gap_text}")
    if material and val[last] > 0 and loss_ratio > 2:
        return "overfit", f"the final validation loss is {loss_ratio:.1f}x the training loss, and {gap_text}"
    if progress < MIN_PROGRESS:
        return "underfit", f"the training loss fell only {progress:.0%} from its first epoch"
    if late_fall > spec.underfit_fall:
        return "underfit", (f"the training loss was still falling: {late_fall:.0%} of its whole fall came in the "
                            f"last {k} epochs")
    if onset is not None:
        return "good fit", (f"validation loss rose {rise:.0%} after epoch {epochs[m]} but {gap_text}, within "
                            f"{spec.overfit_gap:g}")
    return "good fit", (f"validation loss ended {rise:.0%} above its minimum; {max(late_fall, 0.0):.0%} of the "
                        f"training loss's fall came in the last {k} epochs")

"""From a trial's sampled values to a complete, checked ExperimentSpec, and back."""
from __future__ import annotations

import copy
import itertools
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pipeline.engine.checks import check_buildable
from pipeline.specs.errors import UserError, from_validation_error
from pipeline.specs.experiment import ExperimentSpec, union_tags
from pipeline.specs.sweep import CategoricalDim, FloatDim, IntDim, Sweep, set_path

if TYPE_CHECKING:
    from pipeline.data.prepare import DataMeta


# ── trials: from sampled values to a complete, checked ExperimentSpec ────────
class InvalidTrial(Exception):
    """A sampled combination that does not make a valid, buildable experiment."""


def trial_name(sweep_name: str, number: int) -> str:
    return f"{sweep_name[:50]}-t{number:04d}"


def build_trial_spec(sweep: Sweep, candidate: str, values: dict[str, Any], name: str,
                     description: str = "") -> ExperimentSpec:
    """The candidate's spec with the sampled values at their paths and the sweep's epoch budget; validated."""
    raw = copy.deepcopy(sweep.base_dumps[candidate])
    for dotted, value in values.items():
        set_path(raw, dotted, value)
    raw["name"] = name
    raw["description"] = description or raw.get("description", "")
    if sweep.spec.budget.epochs:
        raw["train"]["epochs"] = sweep.spec.budget.epochs
    try:
        return ExperimentSpec.model_validate(raw)
    except ValidationError as err:
        bad = from_validation_error(f"{candidate} trial", err, union_tags())
        raise InvalidTrial(f"invalid spec: {bad.field}: {bad.message}") from None


def check_trial_buildable(spec: ExperimentSpec, meta: DataMeta) -> None:
    """Build the model and run a zero batch; any failure makes the trial invalid, with the reason."""
    try:
        check_buildable(spec, meta, "trial")
    except UserError as err:
        raise InvalidTrial(f"impossible architecture: {err.field or 'model'}: {err.message}") from None
    except Exception as err:  # noqa: BLE001 - e.g. an attention width not divisible by its heads
        raise InvalidTrial(f"impossible architecture: {type(err).__name__}: {err}") from None


def sample_candidate(trial, sweep: Sweep) -> tuple[str, dict[str, Any]]:
    """Define-by-run: the candidate first, then only that candidate's dimensions."""
    candidate = trial.suggest_categorical("candidate", list(sweep.spec.candidates))
    values = {}
    for dotted, dim in sweep.spec.candidates[candidate].space.items():
        name = sweep.param_name(candidate, dotted)
        if isinstance(dim, FloatDim):
            values[dotted] = trial.suggest_float(name, dim.low, dim.high, log=dim.log)
        elif isinstance(dim, IntDim):
            values[dotted] = trial.suggest_int(name, dim.low, dim.high, step=dim.step, log=dim.log)
        else:
            values[dotted] = dim.decode(trial.suggest_categorical(name, dim.encoded()))
    return candidate, values


def values_from_params(sweep: Sweep, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A finished trial's Optuna params → (candidate, {dotted path: spec value})."""
    candidate = params["candidate"]
    values = {}
    for dotted, dim in sweep.spec.candidates[candidate].space.items():
        name = sweep.param_name(candidate, dotted)
        if name in params:
            values[dotted] = dim.decode(params[name]) if isinstance(dim, CategoricalDim) else params[name]
    return candidate, values


def grid_points(sweep: Sweep) -> list[dict]:
    """Every combination of every candidate's own space: a conditional grid, with no redundant points."""
    points = []
    for key, cand in sweep.spec.candidates.items():
        names = [sweep.param_name(key, p) for p in cand.space]
        for combo in itertools.product(*(d.grid() for d in cand.space.values())):
            points.append({"candidate": key, **dict(zip(names, combo))})
    return points

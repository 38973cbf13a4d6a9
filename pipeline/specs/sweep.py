"""Sweep specs: the YAML a person writes (candidates, spaces, objective, sampler, pruner, budget), loaded
with clear errors, and the step from a trial's sampled values to a complete, checked ExperimentSpec.

Each trial first picks a candidate (the top-level categorical `candidate`), then samples only that
candidate's sub-space: parameters are named `CANDIDATE/dotted.path`, so a trial never carries another
candidate's parameters. The sampled values are written into a copy of the candidate's spec at their dotted
paths; the result is validated and its model built before it trains.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    JsonValue,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    StringConstraints,
    ValidationError,
    model_validator,
)

from models.base import StrictModel
from pipeline.specs.errors import UserError
from pipeline.specs.experiment import ExperimentSpec, Slug, read_yaml

# ── the sweep spec ───────────────────────────────────────────────────────────
DottedPath = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_]\w*(\[\d+\])*(\.[A-Za-z_]\w*(\[\d+\])*)*$")]
CostName = Literal["flops", "params", "train_time"]
# cost objective → key of the trial run's cost.json (written by pipeline/cost.py)
COST_KEYS: dict[str, str] = {"flops": "flops_forward_per_sample", "params": "params_total",
                             "train_time": "train_time_s"}
# paths a trial may not change: they tie the trial to its sweep and its data
FIXED_PATHS = ("name", "data.dataset", "task")


class FloatDim(StrictModel):
    type: Literal["float"] = Field(description="A real number drawn from [low, high].")
    low: float = Field(description="Smallest value (inclusive).")
    high: float = Field(description="Largest value (inclusive); must exceed low.")
    log: bool = Field(default=False, description="Sample on a log scale (low must be > 0); right for learning "
                      "rates and weight decay.")
    grid_points: int = Field(default=3, ge=2, le=50, description="Grid sampler only: how many evenly spaced "
                             "values (log-spaced when log) the grid takes from [low, high].")

    @model_validator(mode="after")
    def _non_empty(self) -> FloatDim:
        if not self.low < self.high:
            raise ValueError(f"empty range: low ({self.low}) must be below high ({self.high}); use a categorical "
                             "with one choice for a fixed value")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scaled range needs low > 0, got {self.low}")
        return self

    def grid(self) -> list[float]:
        n = self.grid_points
        if self.log:
            a, b = math.log(self.low), math.log(self.high)
            return [math.exp(a + (b - a) * i / (n - 1)) for i in range(n)]
        return [self.low + (self.high - self.low) * i / (n - 1) for i in range(n)]


class IntDim(StrictModel):
    type: Literal["int"] = Field(description="An integer drawn from low, low+step, ..., high.")
    low: int = Field(description="Smallest value (inclusive).")
    high: int = Field(description="Largest value (inclusive); must exceed low.")
    step: PositiveInt = Field(default=1, description="Spacing between values (e.g. 16 for channel counts).")
    log: bool = Field(default=False, description="Sample on a log scale (low must be >= 1, step must be 1).")

    @model_validator(mode="after")
    def _non_empty(self) -> IntDim:
        if not self.low < self.high:
            raise ValueError(f"empty range: low ({self.low}) must be below high ({self.high}); use a categorical "
                             "with one choice for a fixed value")
        if self.step > self.high - self.low:
            raise ValueError(f"step {self.step} is wider than the range {self.low}..{self.high}")
        if self.log and (self.low < 1 or self.step != 1):
            raise ValueError("a log-scaled int range needs low >= 1 and step 1")
        return self

    def grid(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))


class CategoricalDim(StrictModel):
    type: Literal["categorical"] = Field(description="One of a list of values.")
    choices: list[JsonValue] = Field(min_length=1, description="The values; any YAML value (numbers, strings, "
                                     "lists such as hidden sizes [256, 256], mappings).")

    @model_validator(mode="after")
    def _distinct(self) -> CategoricalDim:
        encoded = self.encoded()
        if len(set(encoded)) != len(encoded):
            raise ValueError("choices repeat a value")
        return self

    def encoded(self) -> list:
        """Optuna stores only scalars: lists and mappings become their JSON text (readable in the dashboard)."""
        return [c if c is None or isinstance(c, (bool, int, float, str)) else json.dumps(c, separators=(", ", ": "))
                for c in self.choices]

    def decode(self, value) -> Any:
        return self.choices[self.encoded().index(value)]

    def grid(self) -> list:
        return self.encoded()


Dimension = Annotated[FloatDim | IntDim | CategoricalDim, Field(discriminator="type")]
DIM_TAGS = frozenset({"float", "int", "categorical"})


class Candidate(StrictModel):
    spec: str = Field(min_length=1, description="The competing experiment: a spec name in specs/ (mnist1d_mlp) "
                      "or a path to a spec YAML file.")
    space: dict[DottedPath, Dimension] = Field(default_factory=dict, description="Search space: dotted path into "
                                               "the spec (train.optimizer.lr, model.hidden, model.layers[1].channels)"
                                               " → dimension. Empty: the spec competes as written.")


class ObjectiveSpec(StrictModel):
    metric: Annotated[str, StringConstraints(pattern=r"^val/\S+$")] = Field(
        description="Validation metric to optimise, a column of the runs' history (val/accuracy, val/loss, ...). "
                    "A trial's value is this metric at the run's best epoch (metrics.json `best`).")
    direction: Literal["maximize", "minimize"] = Field(description="Whether higher or lower is better.")
    costs: list[CostName] = Field(default_factory=list, description="Costs minimised alongside the metric: flops "
                                  "(forward FLOPs per sample), params (parameter count), train_time (seconds). "
                                  "Any makes the sweep multi-objective; its result is the Pareto front.")

    @model_validator(mode="after")
    def _distinct_costs(self) -> ObjectiveSpec:
        if len(set(self.costs)) != len(self.costs):
            raise ValueError("costs repeat a name")
        return self


class SamplerSpec(StrictModel):
    name: Literal["tpe", "random", "grid", "nsga2"] = Field(default="tpe", description="tpe: Bayesian (multivariate,"
                                                            " grouped for the conditional space); random; grid: every "
                                                            "combination of every candidate's space, once; nsga2: "
                                                            "genetic search for multi-objective sweeps.")
    startup_trials: NonNegativeInt = Field(default=5, description="tpe only: random trials before the model of "
                                           "good and bad regions takes over.")
    population_size: int = Field(default=8, ge=2, description="nsga2 only: trials per generation.")


class PrunerSpec(StrictModel):
    name: Literal["median", "hyperband", "none"] = Field(default="median", description="median: stop a trial whose "
                                                         "best validation metric so far is worse than the median of "
                                                         "completed trials at that epoch (those of the same "
                                                         "candidate, or all: see scope); hyperband: "
                                                         "successive-halving brackets over all trials; none. "
                                                         "Pruning needs a single objective.")
    scope: Literal["candidate", "study"] = Field(default="candidate", description="median only: candidate: a trial "
                                                 "is compared with its own architecture's trials, so a slow starter "
                                                 "is not judged by a fast one; study: with every trial, as Optuna's "
                                                 "MedianPruner does. study prunes more, but the architectures that "
                                                 "learn slowly may lose every trial early and end the sweep without "
                                                 "a finished one.")
    startup_trials: NonNegativeInt = Field(default=2, description="median only: completed trials (of a candidate, "
                                           "or of the study: see scope) before a trial may be pruned.")
    warmup_epochs: NonNegativeInt = Field(default=1, description="median only: epochs every trial runs before it "
                                          "may be pruned.")
    min_epochs: PositiveInt = Field(default=1, description="hyperband only: epochs the shortest bracket trains.")
    reduction_factor: int = Field(default=3, ge=2, description="hyperband only: 1/reduction_factor of trials "
                                  "survive each rung.")


class BudgetSpec(StrictModel):
    trials: PositiveInt | None = Field(default=None, description="Trials in the study (finished or running), "
                                       "counted across reruns and workers; a rerun only tops the study up.")
    timeout_s: PositiveFloat | None = Field(default=None, description="Wall-clock limit of one `archlab sweep` "
                                            "run: no trial starts after it (running ones finish).")
    epochs: PositiveInt | None = Field(default=None, description="Epochs per trial, replacing each candidate's "
                                       "train.epochs (the pruner's yardstick).")


class SweepSpec(StrictModel):
    """A search across architectures and their hyperparameters."""

    name: Slug = Field(description="Sweep name: the file stem; names the study, sweeps/NAME.db, runs/sweeps/NAME/ "
                       "and reports/sweeps/NAME/.")
    description: str = Field(default="", description="Free text shown in the report.")
    candidates: dict[Slug, Candidate] = Field(min_length=1, description="The architectures that compete, by "
                                              "name; the first choice of every trial.")
    objective: ObjectiveSpec = Field(description="What the search optimises.")
    sampler: SamplerSpec = Field(default_factory=SamplerSpec, description="How trials pick their values.")
    pruner: PrunerSpec = Field(default_factory=PrunerSpec, description="How bad trials are stopped early; every "
                               "epoch reports the validation metric.")
    seed: NonNegativeInt = Field(default=0, description="Seed of the sampler (worker k uses seed + k); trials keep "
                                 "their candidate's train.seed, so a trial can be reproduced from its spec.")
    budget: BudgetSpec = Field(default_factory=BudgetSpec, description="How much searching: trials and/or time, "
                               "and epochs per trial.")


def check_consistent(spec: SweepSpec, source: str | Path) -> None:
    """Rules across sections, each blamed on the field to change."""
    if spec.objective.costs and spec.pruner.name != "none":
        raise UserError(source, "pruning needs a single objective: use `pruner: {name: none}` in a sweep with costs",
                        field="pruner.name")
    if spec.sampler.name != "grid" and spec.budget.trials is None and spec.budget.timeout_s is None:
        raise UserError(source, "budget needs `trials` or `timeout_s` (or both); only a grid sweep ends by itself",
                        field="budget")


def json_schema() -> dict:
    schema = SweepSpec.model_json_schema()
    schema["title"] = "archlab sweep spec"
    return schema


# ── dotted paths into a spec ─────────────────────────────────────────────────
_TOKEN = re.compile(r"([A-Za-z_]\w*)|\[(\d+)\]")


def parse_path(path: str) -> list[str | int]:
    """'model.layers[1].channels' → ['model', 'layers', 1, 'channels']."""
    return [name if name else int(index) for name, index in _TOKEN.findall(path)]


def _show(tokens: list[str | int]) -> str:
    out = ""
    for t in tokens:
        out += f"[{t}]" if isinstance(t, int) else ("." if out else "") + t
    return out


def locate(raw: dict, path: str) -> tuple[Any, str | int]:
    """The container holding `path` in a spec dump and the key within it; ValueError says where it broke."""
    tokens = parse_path(path)
    node: Any = raw
    for i, tok in enumerate(tokens):
        here = _show(tokens[:i]) or "the spec"
        if isinstance(tok, int):
            if not isinstance(node, list):
                raise ValueError(f"{here} is not a list")
            if tok >= len(node):
                raise ValueError(f"{here} has {len(node)} entries; index {tok} is out of range")
        else:
            if not isinstance(node, dict):
                raise ValueError(f"{here} has no fields")
            if tok not in node:
                raise ValueError(f"{here} has no field {tok!r} (it has: {', '.join(node)})")
        if i == len(tokens) - 1:
            return node, tok
        node = node[tok]
    raise ValueError("empty path")


def set_path(raw: dict, path: str, value: Any) -> None:
    container, key = locate(raw, path)
    container[key] = copy.deepcopy(value)


# ── a loaded sweep ───────────────────────────────────────────────────────────
@dataclass
class Sweep:
    """A validated sweep spec with its candidates' experiment specs resolved."""

    spec: SweepSpec
    path: Path
    bases: dict[str, ExperimentSpec]
    base_paths: dict[str, Path]
    base_dumps: dict[str, dict] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dataset(self) -> str:
        return next(iter(self.bases.values())).data.dataset

    @property
    def directions(self) -> list[str]:
        return [self.spec.objective.direction] + ["minimize"] * len(self.spec.objective.costs)

    @property
    def multi_objective(self) -> bool:
        return bool(self.spec.objective.costs)

    @property
    def epochs(self) -> int:
        return self.spec.budget.epochs or max(b.train.epochs for b in self.bases.values())

    def space_hash(self) -> str:
        """What gives a trial its meaning: candidates (with their specs' content), spaces, objective, epochs.

        Budget, sampler, pruner and seed are left out: changing them continues the same study.
        """
        payload = {"candidates": {k: {"base": self.bases[k].spec_hash(),
                                      "space": {p: d.model_dump(mode="json") for p, d in c.space.items()}}
                                  for k, c in self.spec.candidates.items()},
                   "objective": self.spec.objective.model_dump(mode="json"), "epochs": self.spec.budget.epochs}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]

    @property
    def study_name(self) -> str:
        return f"{self.name}-{self.space_hash()}"

    def param_name(self, candidate: str, path: str) -> str:
        return f"{candidate}/{path}"


def _field_of(loc: tuple) -> str:
    """Pydantic's error location → the field as the user wrote it: candidates.cnn.space[model.hidden].low."""
    out, after_space, skip_tag = "", False, False
    for part in loc:
        if after_space:
            out += f"[{part}]"
            after_space, skip_tag = False, True
            continue
        if skip_tag and (part in DIM_TAGS or part == "[key]"):
            skip_tag = False
            continue
        skip_tag = False
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
        after_space = part == "space"
    return out or "(top level)"


def parse_sweep(raw: dict, source: str | Path) -> SweepSpec:
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as err:
        lines = [(_field_of(e["loc"]), e["msg"].removeprefix("Value error, ")) for e in err.errors(include_url=False)]
        message = lines[0][1] + "".join(f"\n  {source}: {f}: {m}" for f, m in lines[1:])
        raise UserError(source, message, field=lines[0][0]) from None


def resolve_candidate_path(ref: str, specs_dir: Path) -> Path:
    if re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", ref):
        return specs_dir / f"{ref}.yaml"
    return Path(ref)


def load_sweep(path: str | Path, specs_dir: str | Path = "specs") -> Sweep:
    """Load a sweep spec, its candidates' specs and check every path of every space against its spec.

    Every mistake is a UserError naming the sweep file and the field (or the candidate spec's own file).
    """
    from pipeline.specs.experiment import load_spec
    path = Path(path)
    spec = parse_sweep(read_yaml(path), path)
    check_consistent(spec, path)
    if spec.name != path.stem:
        raise UserError(path, f"the sweep's name {spec.name!r} must equal its file name {path.stem!r}", field="name")
    bases, base_paths, dumps = {}, {}, {}
    for key, cand in spec.candidates.items():
        where = f"candidates.{key}.spec"
        cand_path = resolve_candidate_path(cand.spec, Path(specs_dir))
        if not cand_path.is_file():
            raise UserError(path, f"unknown candidate {cand.spec!r}: no experiment spec at {cand_path}", field=where)
        base = load_spec(cand_path)
        dump = base.model_dump(mode="json")
        for dotted, dim in cand.space.items():
            here = f"candidates.{key}.space[{dotted}]"
            if any(dotted == p or dotted.startswith(p + ".") for p in FIXED_PATHS):
                raise UserError(path, f"{dotted} is fixed by the sweep and cannot be searched", field=here)
            try:
                locate(dump, dotted)
            except ValueError as err:
                raise UserError(path, f"unknown path in {cand_path}: {err}", field=here) from None
        bases[key], base_paths[key], dumps[key] = base, cand_path, dump
    datasets = {b.data.dataset for b in bases.values()}
    if len(datasets) > 1:
        raise UserError(path, f"candidates train on different datasets ({', '.join(sorted(datasets))}); a sweep "
                        "compares them on one validation set", field="candidates")
    return Sweep(spec, path, bases, base_paths, dumps)

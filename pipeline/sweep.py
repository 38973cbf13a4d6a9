"""Optuna sweeps across architectures: a sweep spec, a conditional search space, parallel workers, MLflow.

A sweep names candidate experiment specs that compete. Each trial first picks a candidate (the top-level
categorical `candidate`), then samples only that candidate's sub-space (define-by-run: parameters are named
`CANDIDATE/dotted.path`, so a trial never carries another candidate's parameters). The sampled values are
written into a copy of the candidate's spec at their dotted paths; the result is a complete ExperimentSpec,
validated and built before it trains. An invalid combination is a failed trial with its reason.

Workers (processes on this machine, or on other machines given the same database URL) share one study.
Optuna stores neither sampler nor pruner, so every worker builds both from the spec. A trial records the
host and pid of its worker and a heartbeat; a RUNNING trial whose worker is gone is marked failed and its
parameters are queued again, so a rerun continues the study where it stopped.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import re
import socket
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

from pydantic import Field, JsonValue, NonNegativeInt, PositiveFloat, PositiveInt, StringConstraints, \
    ValidationError, model_validator

from models.base import StrictModel
from pipeline.errors import UserError
from pipeline.spec import ExperimentSpec, Slug, read_yaml, union_tags

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
    def _non_empty(self) -> "FloatDim":
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
    def _non_empty(self) -> "IntDim":
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
    def _distinct(self) -> "CategoricalDim":
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
    def _distinct_costs(self) -> "ObjectiveSpec":
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
                                                         "completed trials of the same candidate at that epoch; "
                                                         "hyperband: successive-halving brackets over all trials; "
                                                         "none. Pruning needs a single objective.")
    startup_trials: NonNegativeInt = Field(default=2, description="median only: completed trials of a candidate "
                                           "before its trials may be pruned.")
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
    from pipeline.spec import load_spec
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


# ── trials: from sampled values to a complete, checked ExperimentSpec ────────
class InvalidTrial(Exception):
    """A sampled combination that does not make a valid, buildable experiment."""


def trial_name(sweep_name: str, number: int) -> str:
    return f"{sweep_name[:50]}-t{number:04d}"


def build_trial_spec(sweep: Sweep, candidate: str, values: dict[str, Any], name: str,
                     description: str = "") -> ExperimentSpec:
    """The candidate's spec with the sampled values at their paths and the sweep's epoch budget; validated."""
    from pipeline.errors import from_validation_error
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


def check_trial_buildable(spec: ExperimentSpec, shape) -> None:
    """Build the model and run a zero batch; any failure makes the trial invalid, with the reason."""
    from pipeline.cli import check_buildable
    try:
        check_buildable(spec, shape, "trial")
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


# ── storage, sampler, pruner ─────────────────────────────────────────────────
RDB_SCHEMES = ("sqlite:", "postgresql", "mysql", "oracle", "mssql")
DEFAULT_STORAGE = "journal"  # measured in bench/bench_sweep.py: see the report there


def default_storage_url(sweeps_dir: str | Path, name: str) -> str:
    folder = Path(sweeps_dir)
    if DEFAULT_STORAGE == "journal":
        return str(folder / f"{name}.journal")
    return f"sqlite:///{folder / f'{name}.db'}"


def open_storage(url: str):
    """An RDB URL (sqlite:///..., postgresql://...) or a journal file path (JournalStorage, append-only log)."""
    import optuna
    if url.startswith(RDB_SCHEMES):
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            # Wait for the write lock instead of failing after SQLite's default 5 s.
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        return optuna.storages.RDBStorage(url)
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(url))


def lock_path(url: str) -> Path | None:
    """A file lock beside a local storage makes 'count the budget, then ask a trial' atomic across workers."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///") + ".sweep-lock")
    if url.startswith(RDB_SCHEMES):
        return None  # a server: workers on other machines cannot share a file lock (the budget may overshoot)
    return Path(url + ".sweep-lock")


@contextlib.contextmanager
def file_lock(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    import fcntl
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _SameCandidate:
    """A view of a study holding only one candidate's trials: what a median pruner compares with."""

    def __init__(self, study, candidate: str):
        self._study, self._candidate = study, candidate

    @property
    def direction(self):
        return self._study.direction

    @property
    def directions(self):
        return self._study.directions

    def get_trials(self, deepcopy: bool = True, states=None):
        return [t for t in self._study.get_trials(deepcopy=deepcopy, states=states)
                if t.params.get("candidate") == self._candidate]


def make_pruner(sweep: Sweep):
    import optuna

    class PerCandidatePruner(optuna.pruners.BasePruner):
        """Compare a trial only with trials of its own architecture: a slow starter is not judged by a fast one."""

        def __init__(self, inner):
            self.inner = inner

        def prune(self, study, trial) -> bool:
            return self.inner.prune(_SameCandidate(study, trial.params.get("candidate")), trial)

    p = sweep.spec.pruner
    if p.name == "median":
        # Epochs are reported as steps 1, 2, ...: warmup_epochs=1 lets pruning start at epoch 2.
        return PerCandidatePruner(optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials,
                                                              n_warmup_steps=p.warmup_epochs + 1))
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_epochs, max_resource=sweep.epochs,
                                              reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


def make_sampler(sweep: Sweep, seed: int):
    import optuna
    s = sweep.spec.sampler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if s.name == "tpe":
            # group=True: the space is conditional, so TPE models each candidate's sub-space jointly.
            return optuna.samplers.TPESampler(n_startup_trials=s.startup_trials, seed=seed, multivariate=True,
                                              group=True, constant_liar=True)
        if s.name == "nsga2":
            return optuna.samplers.NSGAIISampler(population_size=s.population_size, seed=seed)
        # random, and grid (whose points are all queued up front; the sampler never gets asked)
        return optuna.samplers.RandomSampler(seed=seed)


def grid_points(sweep: Sweep) -> list[dict]:
    """Every combination of every candidate's own space: a conditional grid, with no redundant points."""
    import itertools
    points = []
    for key, cand in sweep.spec.candidates.items():
        names = [sweep.param_name(key, p) for p in cand.space]
        for combo in itertools.product(*(d.grid() for d in cand.space.values())):
            points.append({"candidate": key, **dict(zip(names, combo))})
    return points


# ── study state: budget, interrupted trials ──────────────────────────────────
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # a trial on another machine silent this long is taken for dead


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_orphan(trial, host: str, now: float) -> bool:
    attrs = trial.user_attrs
    if attrs.get("worker_host") == host and "worker_pid" in attrs:
        return not _pid_alive(int(attrs["worker_pid"]))
    beat = attrs.get("heartbeat", trial.datetime_start.timestamp() if trial.datetime_start else now)
    return now - float(beat) > STALE_AFTER_S


def requeue(study, trial) -> bool:
    """Mark a trial interrupted and failed, then queue its parameters again. Only the caller that wins the
    RUNNING → FAIL transition queues the retry, so two processes recovering at once queue it once."""
    import optuna
    from optuna.trial import TrialState
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    root = trial.user_attrs.get("retry_of", trial.number)
    study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": root})
    return True


def recover_interrupted(study) -> list[int]:
    """Trials left RUNNING by a worker that died: marked failed (interrupted) and queued again."""
    from optuna.trial import TrialState
    host, now = socket.gethostname(), time.time()
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _is_orphan(trial, host, now) and requeue(study, trial):
            recovered.append(trial.number)
    return recovered


def trials_used(study) -> int:
    """Trials that count against the budget: finished or running, except those a dead worker interrupted."""
    from optuna.trial import TrialState
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get("interrupted"))


def has_waiting(study) -> bool:
    from optuna.trial import TrialState
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


@contextlib.contextmanager
def heartbeat(study, trial) -> Iterator[None]:
    """Stamp the trial every HEARTBEAT_S seconds, so workers elsewhere can tell it from a dead one."""
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):
                study._storage.set_trial_user_attr(trial._trial_id, "heartbeat", time.time())

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


# ── one worker ───────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class SweepJob:
    """What a worker process needs (picklable: workers are spawned, not forked)."""

    sweep_path: str
    specs_dir: str
    storage_url: str
    study_name: str
    data_dir: str
    runs_dir: str
    tracking_uri: str | None
    parent_run_id: str | None
    deadline: float | None  # time.time() after which no trial starts
    seed: int
    threads: int | None = None
    worker: int = 0


def _load_study(job: SweepJob, sweep: Sweep):
    import optuna
    return optuna.load_study(study_name=job.study_name, storage=open_storage(job.storage_url),
                             sampler=make_sampler(sweep, job.seed), pruner=make_pruner(sweep))


def _budget_left(study, sweep: Sweep, job: SweepJob) -> bool:
    if job.deadline is not None and time.time() >= job.deadline:
        return False
    if sweep.spec.sampler.name == "grid":
        return has_waiting(study) and (sweep.spec.budget.trials is None or trials_used(study) < sweep.spec.budget.trials)
    return sweep.spec.budget.trials is None or trials_used(study) < sweep.spec.budget.trials


def run_worker(job: SweepJob) -> int:
    """Ask, train and tell trials until the budget is spent. Returns the number of trials this worker ran."""
    import optuna
    from pipeline.data import load_prepared
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if job.threads:
        import torch
        torch.set_num_threads(job.threads)
    sweep = load_sweep(job.sweep_path, job.specs_dir)
    data = load_prepared(job.data_dir)
    study = _load_study(job, sweep)
    lock = lock_path(job.storage_url)
    host, pid = socket.gethostname(), os.getpid()
    ran = 0
    while True:
        with file_lock(lock):
            recover_interrupted(study)
            if not _budget_left(study, sweep, job):
                break
            trial = study.ask()
            # Set while still under the lock: from here on the trial is visibly owned by a live process.
            trial.set_user_attr("worker_host", host)
            trial.set_user_attr("worker_pid", pid)
        with heartbeat(study, trial):
            run_trial(study, trial, sweep, data, job)
        ran += 1
    return ran


def _worker_main(job: SweepJob) -> None:
    """Entry point of a spawned worker process: exit 2 on a user error, as the CLI does."""
    try:
        run_worker(job)
    except UserError as err:
        print(f"archlab: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


# ── one trial ────────────────────────────────────────────────────────────────
class TrialMonitor:
    """The per-epoch callback: reports the validation metric to Optuna and prunes."""

    def __init__(self, trial, metric: str, report: bool, prune: bool):
        self.trial, self.metric, self.report, self.prune = trial, metric, report, prune
        self.rows: list[dict] = []

    def __call__(self, epoch: int, row: dict) -> None:
        import optuna
        self.rows.append(row)
        value = row.get(self.metric)
        if self.report and value is not None and math.isfinite(value):
            self.trial.report(value, epoch)
            if self.prune and self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}: {self.metric}={value:.4g}")


def _replay_history(trial, run_dir: Path, spec: ExperimentSpec, metric: str) -> None:
    """A retried trial resumes its run's checkpoint: report the epochs it already has, so the pruner sees them."""
    import torch
    from pipeline.train import CHECKPOINT
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("spec_hash") != spec.spec_hash():
        return
    for row in ckpt["state"]["history"]:
        value = row.get(metric)
        if value is not None and math.isfinite(value):
            trial.report(value, int(row["epoch"]))


def _checkpoint_epoch(run_dir: Path) -> int:
    import torch
    from pipeline.train import CHECKPOINT
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True)["state"]["epoch"])


def mlflow_experiment(sweep_name: str) -> str:
    return f"sweeps/{sweep_name}"


def mlflow_params(obj: Any) -> dict[str, str]:
    """Flattened params with MLflow-legal keys: model.layers[0].channels → model.layers.0.channels."""
    from pipeline.tracking import flatten
    return {k.replace("[", ".").replace("]", ""): v for k, v in flatten(obj).items()}


class ChildRun:
    """The trial's nested MLflow run: found (training made it) or created (an invalid trial never trained)."""

    def __init__(self, job: SweepJob, sweep: Sweep, trial, candidate: str, name: str):
        self.job, self.sweep, self.trial, self.candidate, self.name = job, sweep, trial, candidate, name

    @property
    def enabled(self) -> bool:
        return self.job.tracking_uri is not None

    def tags(self, state: str) -> dict[str, str]:
        return {"sweep": self.sweep.name, "sweep.study": self.job.study_name, "sweep.trial": str(self.trial.number),
                "sweep.candidate": self.candidate, "candidate_kind": self.sweep.bases[self.candidate].model.kind,
                "state": state}

    def find(self) -> str | None:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=self.job.tracking_uri)
        exp = client.get_experiment_by_name(mlflow_experiment(self.sweep.name))
        if exp is None:
            return None
        runs = client.search_runs([exp.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                                  filter_string=f"tags.`sweep.study` = '{self.job.study_name}' and "
                                                f"tags.`sweep.trial` = '{self.trial.number}'")
        return runs[0].info.run_id if runs else None

    def finish(self, run_id: str | None, state: str, reason: str | None = None, rows: list[dict] | None = None,
               from_epoch: int = 0, values: dict[str, Any] | None = None) -> None:
        """Tag the run with its state; a pruned run gets the epochs its trainer had not flushed yet."""
        if not self.enabled:
            return
        from pipeline.tracking import Tracker
        tracker = Tracker(self.job.tracking_uri, mlflow_experiment(self.sweep.name), run_id=run_id,
                          run_name=self.name, parent_run_id=self.job.parent_run_id)
        tags = self.tags(state)
        if reason:
            tags["fail_reason"] = reason[:5000]
        tracker.set_tags(tags)
        if values is not None:
            tracker.log_params(mlflow_params(values))
        for row in rows or []:
            if row["epoch"] > from_epoch:
                tracker.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "step")}, step=row["epoch"])
        status = {"complete": "FINISHED", "pruned": "KILLED"}.get(state, "FAILED")
        tracker.end(status)


def _fail(study, trial, reason: str, child: ChildRun, run_id: str | None = None,
          values: dict[str, Any] | None = None) -> None:
    from optuna.trial import TrialState
    trial.set_user_attr("fail_reason", reason)
    print(f"[sweep {child.sweep.name}] trial {trial.number} ({child.candidate}) failed: {reason}", file=sys.stderr)
    child.finish(run_id, "failed", reason=reason, values=values)
    study.tell(trial, state=TrialState.FAIL)


def run_trial(study, trial, sweep: Sweep, data, job: SweepJob) -> None:
    """Sample, build, train and tell one trial. Whatever goes wrong inside a trial fails that trial only."""
    import optuna
    from optuna.trial import TrialState
    from pipeline.io import atomic_write_text
    from pipeline.spec import spec_to_yaml
    from pipeline.train import train_experiment

    candidate, values = sample_candidate(trial, sweep)
    root = int(trial.user_attrs.get("retry_of", trial.number))  # a retry resumes its original's run folder
    name = trial_name(sweep.name, root)
    run_dir = Path(job.runs_dir) / f"trial-{root:04d}"
    trial.set_user_attr("kind", sweep.bases[candidate].model.kind)
    trial.set_user_attr("run_dir", str(run_dir))
    child = ChildRun(job, sweep, trial, candidate, name)
    try:
        spec = build_trial_spec(sweep, candidate, values, name,
                                f"Sweep {sweep.name}, trial {root}: candidate {candidate}.")
        check_trial_buildable(spec, data.shape)
    except InvalidTrial as err:
        _fail(study, trial, str(err), child, values=values)
        return
    spec_file = run_dir / "spec.yaml"
    atomic_write_text(spec_file, spec_to_yaml(spec, os.path.relpath(Path(job.specs_dir) / "schema.json", run_dir)))

    metric = sweep.spec.objective.metric
    single = not sweep.multi_objective
    monitor = TrialMonitor(trial, metric, report=single, prune=single and sweep.spec.pruner.name != "none")
    if single:
        _replay_history(trial, run_dir, spec, metric)
    try:
        metrics = train_experiment(spec, spec_file, data, run_dir, job.tracking_uri, callbacks=[monitor],
                                   progress=False, parent_run_id=job.parent_run_id, extra_tags=child.tags("running"),
                                   experiment=mlflow_experiment(sweep.name))
    except optuna.TrialPruned as pruned:
        trial.set_user_attr("pruned_at_epoch", monitor.rows[-1]["epoch"] if monitor.rows else 0)
        if child.enabled:
            child.finish(child.find(), "pruned", reason=str(pruned), rows=monitor.rows,
                         from_epoch=_checkpoint_epoch(run_dir))
        study.tell(trial, state=TrialState.PRUNED)
        return
    except KeyboardInterrupt:
        if child.enabled:
            with contextlib.suppress(Exception):
                child.finish(child.find(), "interrupted")
        requeue(study, study._storage.get_trial(trial._trial_id))
        raise
    except UserError:
        raise  # the sweep itself is wrong (not this trial): stop, exit 2
    except Exception as err:  # noqa: BLE001 - a crash in one trial must not end the study
        traceback.print_exc()
        _fail(study, trial, f"training crashed: {type(err).__name__}: {err}", child,
              run_id=child.find() if child.enabled else None)
        return
    finish_trial(study, trial, sweep, metrics, run_dir, child)


def _cost_values(run_dir: Path) -> dict:
    path = run_dir / "cost.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def finish_trial(study, trial, sweep: Sweep, metrics: dict, run_dir: Path, child: ChildRun) -> None:
    metric = sweep.spec.objective.metric
    value = metrics["best"].get(metric, metrics["final"].get(metric))
    cost = _cost_values(run_dir)
    for key in COST_KEYS.values():
        if key in cost:
            trial.set_user_attr(key, cost[key])
    trial.set_user_attr("status", metrics["status"])
    trial.set_user_attr("epochs", metrics["epochs"])
    run_id = metrics.get("mlflow_run_id")
    if metrics["status"] == "diverged" or value is None or not math.isfinite(value):
        _fail(study, trial, f"diverged: {metric}={value} (NaN or Inf loss)" if metrics["status"] == "diverged"
              else f"no finite {metric} in the run's metrics", child, run_id=run_id)
        return
    values = [float(value)]
    for cost_name in sweep.spec.objective.costs:
        if COST_KEYS[cost_name] not in cost:
            _fail(study, trial, f"cost.json has no {COST_KEYS[cost_name]} (needed by the {cost_name} objective)",
                  child, run_id=run_id)
            return
        values.append(float(cost[COST_KEYS[cost_name]]))
    child.finish(run_id, "complete")
    study.tell(trial, values)


# ── the whole sweep (what `archlab sweep` calls) ─────────────────────────────
@dataclass
class SweepResult:
    study_name: str
    storage_url: str
    report_dir: Path
    trials: int  # finished trials in the study
    ran: int  # of which this command ran
    recovered: list[int]
    best: dict[str, Any]


def preflight(sweep: Sweep, data) -> None:
    """Before any trial: each candidate builds on the data, and reports the objective's metric."""
    from pipeline.cli import check_buildable
    from pipeline.tasks import make_task
    from pipeline.train import evaluate_split
    metric = sweep.spec.objective.metric
    for key, base in sweep.bases.items():
        model, _ = check_buildable(base, data.shape, sweep.base_paths[key])
        task = make_task(base.task, data.meta)
        t = data.tensors
        available = [f"val/{k}" for k in evaluate_split(model, task, t["val_x"][:8], t["val_y"][:8])]
        if metric not in available:
            raise UserError(sweep.path, f"{metric} is not a validation metric of candidate {key!r} (task "
                            f"{base.task} reports: {', '.join(available)})", field="objective.metric")


def open_study(sweep: Sweep, storage_url: str, seed: int):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=sweep.study_name, storage=open_storage(storage_url),
                                directions=sweep.directions, sampler=make_sampler(sweep, seed),
                                pruner=make_pruner(sweep), load_if_exists=True)
    if "sweep" not in study.user_attrs:
        study.set_user_attr("sweep", sweep.name)
        study.set_user_attr("objectives", [sweep.spec.objective.metric, *sweep.spec.objective.costs])
        study.set_user_attr("candidates", list(sweep.spec.candidates))
    return study


def _parent_run(sweep: Sweep, study, tracking_uri: str | None):
    if tracking_uri is None:
        return None
    from pipeline.tracking import Tracker, git_commit
    tracker = Tracker(tracking_uri, mlflow_experiment(sweep.name), run_id=study.user_attrs.get("mlflow_parent_run_id"),
                      run_name=study.study_name)
    if study.user_attrs.get("mlflow_parent_run_id") != tracker.run_id:
        study.set_user_attr("mlflow_parent_run_id", tracker.run_id)
    tracker.log_params(mlflow_params(sweep.spec.model_dump(mode="json")))
    tracker.set_tags({"sweep": sweep.name, "sweep.study": study.study_name, "git_commit": git_commit(),
                      "sweep.role": "parent"})
    tracker.log_artifact(sweep.path)
    return tracker


def _spawn_workers(jobs: list[SweepJob]) -> list[int]:
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")  # forking a process that holds torch threads is unsafe
    procs = [ctx.Process(target=_worker_main, args=(job,), name=f"sweep-worker-{job.worker}") for job in jobs]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:  # they got the same SIGINT from the terminal: let them queue their trials again
            p.join(timeout=30)
        raise
    return [p.exitcode for p in procs]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_sweep(sweep: Sweep, data_dir: str | Path, runs_dir: str | Path, report_dir: str | Path,
              storage_url: str, workers: int = 1, tracking_uri: str | None = None,
              specs_dir: str | Path = "specs") -> SweepResult:
    """Create or continue the study, run K workers until the budget is spent, then write the report."""
    from pipeline.data import load_prepared
    from pipeline.sweep_report import best_summary, write_report
    data = load_prepared(data_dir)
    preflight(sweep, data)
    study = open_study(sweep, storage_url, sweep.spec.seed)
    with file_lock(lock_path(storage_url)):
        recovered = recover_interrupted(study)
        if sweep.spec.sampler.name == "grid":
            for point in grid_points(sweep):
                study.enqueue_trial(point, skip_if_exists=True)
    before = trials_used(study)
    parent = _parent_run(sweep, study, tracking_uri)
    deadline = time.time() + sweep.spec.budget.timeout_s if sweep.spec.budget.timeout_s else None
    threads = max(1, available_cores() // workers)
    jobs = [SweepJob(sweep_path=str(sweep.path), specs_dir=str(specs_dir), storage_url=storage_url,
                     study_name=sweep.study_name, data_dir=str(data_dir), runs_dir=str(runs_dir),
                     tracking_uri=tracking_uri, parent_run_id=parent.run_id if parent else None, deadline=deadline,
                     seed=sweep.spec.seed + 1000 * k + before, threads=threads, worker=k) for k in range(workers)]
    try:
        if workers == 1:
            run_worker(SweepJob(**{**jobs[0].__dict__, "threads": None}))  # in-process: keep this process's threads
        else:
            codes = _spawn_workers(jobs)
            if any(code == 2 for code in codes):
                raise UserError(sweep.path, "a worker stopped on an error in the sweep (see above)")
            if any(code != 0 for code in codes):
                raise RuntimeError(f"sweep workers exited with {codes}")
    except BaseException:
        if parent is not None:
            parent.end("KILLED")
        raise
    study = open_study(sweep, storage_url, sweep.spec.seed)
    write_report(study, sweep, Path(report_dir), storage_url, specs_dir=Path(specs_dir))
    best = best_summary(study, sweep)
    if parent is not None:
        parent.log_metrics({k: v for k, v in best.items() if isinstance(v, (int, float))}, step=trials_used(study))
        parent.set_tags({"best_trial": str(best.get("trial", "")), "best_candidate": str(best.get("candidate", ""))})
        for path in sorted(Path(report_dir).iterdir()):
            if path.is_file():
                parent.log_artifact(path, "report")
        parent.end("FINISHED")
    return SweepResult(study.study_name, storage_url, Path(report_dir), trials_used(study),
                       trials_used(study) - before, recovered, best)

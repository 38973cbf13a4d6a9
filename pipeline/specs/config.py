"""params.yaml: the project's one place for paths, the tracking store, datasets, experiments and sweeps."""
from __future__ import annotations

import os
from pathlib import Path

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, ValidationError, field_validator, model_validator

from models.base import StrictModel
from pipeline.specs.datasets import BUILTIN_DATASETS, DATASET_SOURCES, DatasetSpec
from pipeline.specs.errors import UserError, from_validation_error
from pipeline.specs.experiment import Slug, read_yaml

PARAMS_FILE = "params.yaml"


class PathsConfig(StrictModel):
    data: Path = Field(default=Path("data/prepared"), description="Prepared datasets, one folder each.")
    runs: Path = Field(default=Path("runs"), description="Training runs, one folder per experiment.")
    reports: Path = Field(default=Path("reports"), description="Comparison reports.")
    specs: Path = Field(default=Path("specs"), description="Experiment specs, one YAML per experiment.")
    sweeps: Path = Field(default=Path("sweeps"), description="Optuna study storage.")
    claims: Path = Field(default=Path("claims"), description="The claims' training runs, one folder per claim (kept "
                         "apart from runs/, so that the compare stage does not depend on them).")


Vary = Literal["init", "split"]
VARY_MEANING = ("What a seed varies. init: the initialisation, the order of batches, dropout and augmentation. "
                "split: all of that and the train/validation split, re-drawn per seed from the pooled train and "
                "validation sets. The test split never changes, so every comparison pairs on the same test examples.")


class ExperimentEntry(StrictModel):
    dataset: Slug = Field(description="Dataset the experiment trains on.")
    seeds: PositiveInt | None = Field(default=None, description="Training runs over seeds 0..N-1 (shifted by the "
                                      "spec's train.seed); default: the project's `seeds`.")
    vary: Vary | None = Field(default=None, description=VARY_MEANING + " Default: the project's `vary`.")


class ProjectConfig(StrictModel):
    paths: PathsConfig = Field(default_factory=PathsConfig, description="Where things live.")
    tracking_uri: str = Field(default="sqlite:///mlflow.db", description="MLflow tracking URI; the environment "
                              "variable MLFLOW_TRACKING_URI wins over it.")
    datasets: dict[Slug, DatasetSpec] = Field(default_factory=dict, description="Datasets by name; built-ins "
                                              "(digits, mnist1d, diabetes) may be used without an entry.")
    experiments: dict[Slug, ExperimentEntry] = Field(default_factory=dict, description="Experiments that `dvc "
                                                     "repro` runs: spec name (specs/NAME.yaml) → `dataset` or "
                                                     "`{dataset: d, seeds: N, vary: split}`.")
    seeds: PositiveInt = Field(default=1, description="Seeds per experiment unless its entry says otherwise.")
    vary: Vary = Field(default="init", description=VARY_MEANING)
    comparisons: list[tuple[Slug, Slug]] = Field(default_factory=list, description="Pairs [A, B] of experiments "
                                                 "on the same dataset and task whose verdict is always reported, "
                                                 "besides each experiment against its group's best.")
    equivalence: dict[str, PositiveFloat] = Field(default_factory=dict, description="Practical-equivalence margin "
                                                  "per test metric (e.g. accuracy: 0.005): two experiments whose "
                                                  "paired difference lies wholly within ±margin are `equivalent`. "
                                                  "A metric without one is never judged equivalent.")
    sweeps: list[Slug] = Field(default_factory=list, description="Sweeps that `dvc repro` runs (specs/sweeps/NAME.yaml).")

    @field_validator("experiments", mode="before")
    @classmethod
    def _plain_entries(cls, value):
        """`name: dataset` is short for `name: {dataset: dataset}`."""
        if isinstance(value, dict):
            return {k: {"dataset": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _compared_experiments_exist(self):
        for i, pair in enumerate(self.comparisons):
            unknown = [name for name in pair if name not in self.experiments]
            if unknown:
                raise ValueError(f"comparisons[{i}] names {', '.join(unknown)}, not under `experiments`")
            if pair[0] == pair[1]:
                raise ValueError(f"comparisons[{i}] compares {pair[0]} with itself")
        return self

    def seed_list(self, name: str, base: int = 0) -> list[int]:
        """The seeds experiment `name` runs: base, base+1, ... (base is the spec's train.seed)."""
        entry = self.experiments.get(name)
        count = entry.seeds if entry and entry.seeds else self.seeds
        return [base + k for k in range(count)]

    def vary_of(self, name: str) -> Vary:
        entry = self.experiments.get(name)
        return entry.vary if entry and entry.vary else self.vary

    def dataset_of(self, name: str) -> str | None:
        entry = self.experiments.get(name)
        return entry.dataset if entry else None


def load_config(path: str | Path = PARAMS_FILE) -> ProjectConfig:
    """params.yaml validated; with no such file, the defaults (so `archlab` works outside a project too)."""
    path = Path(path)
    if not path.exists():
        return ProjectConfig()
    raw = read_yaml(path)
    # params.yaml may hold keys for DVC only (e.g. shrunk budgets); keep just ours.
    ours = {k: v for k, v in raw.items() if k in ProjectConfig.model_fields}
    try:
        return ProjectConfig.model_validate(ours)
    except ValidationError as err:
        tags = frozenset(cls.model_fields["source"].annotation.__args__[0] for cls in DATASET_SOURCES)
        raise from_validation_error(path, err, tags) from None


def knows_dataset(config: ProjectConfig, name: str) -> bool:
    return name in config.datasets or name in BUILTIN_DATASETS


def dataset_spec(config: ProjectConfig, name: str, source: str | Path = PARAMS_FILE):
    if name in config.datasets:
        return config.datasets[name]
    if name in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[name]
    known = sorted({*config.datasets, *BUILTIN_DATASETS})
    raise UserError(source, f"unknown dataset {name!r}; declare it under `datasets:` in params.yaml or use one of: "
                    f"{', '.join(known)}", field="data.dataset")


# What MLflow can open; anything else fails deep inside MLflow after a run folder was made.
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def tracking_uri(config: ProjectConfig, source: str | Path = PARAMS_FILE) -> str:
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    uri = from_env or config.tracking_uri
    scheme = uri.split(":", 1)[0].split("+", 1)[0] if "://" in uri else "file"
    if scheme not in TRACKING_SCHEMES:
        raise UserError("MLFLOW_TRACKING_URI" if from_env else source, f"unknown scheme {scheme!r} in {uri!r}; use one "
                        f"of: {', '.join(TRACKING_SCHEMES)}", field=None if from_env else "tracking_uri")
    return uri

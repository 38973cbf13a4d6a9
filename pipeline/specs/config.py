"""params.yaml: the project's one place for paths, the tracking store, datasets, experiments and sweeps."""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, ValidationError

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


class ProjectConfig(StrictModel):
    paths: PathsConfig = Field(default_factory=PathsConfig, description="Where things live.")
    tracking_uri: str = Field(default="sqlite:///mlflow.db", description="MLflow tracking URI; the environment "
                              "variable MLFLOW_TRACKING_URI wins over it.")
    datasets: dict[Slug, DatasetSpec] = Field(default_factory=dict, description="Datasets by name; built-ins "
                                              "(digits, mnist1d, diabetes) may be used without an entry.")
    experiments: dict[Slug, Slug] = Field(default_factory=dict, description="Experiments that `dvc repro` runs: "
                                          "spec name → dataset name (specs/NAME.yaml).")
    sweeps: list[Slug] = Field(default_factory=list, description="Sweeps that `dvc repro` runs (specs/sweeps/NAME.yaml).")


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

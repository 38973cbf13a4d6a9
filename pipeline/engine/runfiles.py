"""The run files of runs/NAME/seed-K/: metrics.json, eval.json, diagnostics.json, cost.json.

One typed record per file, the one place its keys are named. Every writer writes through `write_run_file`, every
reader reads through `read_run_file` (strict: a file that does not fit is a UserError naming the file and the key)
or `read_run_fields` (what the reports read: each key a file holds, checked against its type; a missing or broken
file, or a key that does not fit, reads as absent, since a half-finished run still gets a row). `archlab schema`
writes each record's JSON schema (`run_file_schemas`).

A key is written when its writer sets it (dumped with exclude_unset), so optional keys such as eval.json's
`records` stay out of a file rather than showing as null, and the files keep the content they always had.
"""
from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from pipeline.io import atomic_write_json
from pipeline.specs.errors import UserError, from_validation_error

Status = Literal["running", "finished", "early_stopped", "diverged"]
Number = float | int  # smart union: an int stays an int, a float a float (and NaN/Inf stay what they were)
EpochMetrics = dict[str, Number | None]  # 'train/loss', 'val/accuracy', ... → value


class RunMetrics(BaseModel):
    """metrics.json: how training went, written by the training engine at the end of a run."""

    model_config = ConfigDict(extra="forbid", title="metrics.json")
    name: str = Field(description="The experiment's name.")
    status: Status = Field(description="How the run ended.")
    task: str = Field(description="The task (classify, regress, ...).")
    kind: str = Field(description="The model family.")
    dataset: str = Field(description="The prepared dataset's name.")
    main_metric: str = Field(description="The task's main metric (without the split prefix).")
    epochs: int = Field(description="Epochs completed.")
    steps: int = Field(description="Optimisation steps completed.")
    best_epoch: int | None = Field(description="The epoch with the best monitored value (1-based); null if none.")
    final: EpochMetrics = Field(description="The last epoch's train/ and val/ metrics.")
    best: EpochMetrics = Field(description="The best epoch's train/ and val/ metrics.")
    train_time_s: float = Field(description="Seconds spent in training epochs (validation excluded).")
    train_samples_per_s: float = Field(description="Training examples per second over the run.")
    spec_hash: str = Field(description="Hash of the spec the run was trained from.")
    mlflow_run_id: str | None = Field(description="The MLflow run; null when not tracked.")


class Evaluation(BaseModel):
    """eval.json: the test-set metrics of a trained run, written by `archlab evaluate`."""

    model_config = ConfigDict(extra="forbid", title="eval.json")
    name: str = Field(description="The experiment's name.")
    status: Status = Field(description="How the evaluated training run ended.")
    main_metric: str = Field(description="The task's main metric.")
    seed: int = Field(description="The training seed of the evaluated run.")
    spec_hash: str = Field(description="Hash of the spec the evaluated run was trained from.")
    test: dict[str, Any] = Field(description="Test metrics: numbers, plus task-specific extras (confusion "
                                             "matrix, classes, samples).")
    records: str | None = Field(default=None, description="The per-example records file beside it; absent "
                                                          "when the task keeps none.")


FILES: dict[str, type[BaseModel]] = {"metrics.json": RunMetrics, "eval.json": Evaluation}
_FILE_OF = {model: name for name, model in FILES.items()}
R = TypeVar("R", bound=BaseModel)


def path_of(run_dir: str | Path, record: type[BaseModel]) -> Path:
    return Path(run_dir) / _FILE_OF[record]


def write_run_file(run_dir: str | Path, record: BaseModel) -> Path:
    """Write a record to its file in run_dir, atomically; → the path."""
    path = path_of(run_dir, type(record))
    atomic_write_json(path, record.model_dump(exclude_unset=True))
    return path


def read_run_file(run_dir: str | Path, record: type[R]) -> R:
    """A run file as its record; a missing, unreadable or ill-fitting file is a UserError naming it."""
    path = path_of(run_dir, record)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(path, "not found; train (or evaluate) the run first") from None
    except (OSError, ValueError) as exc:
        raise UserError(path, f"cannot be read as JSON ({exc})") from None
    try:
        return record.model_validate(data)
    except ValidationError as err:
        raise from_validation_error(path, err) from None


@cache
def _adapter(record: type[BaseModel], key: str) -> TypeAdapter:
    return TypeAdapter(record.model_fields[key].annotation)


def read_run_fields(run_dir: str | Path, record: type[BaseModel]) -> dict:
    """The keys a run file holds that fit its record, as a dict; {} for a missing or unreadable file.

    For readers that take what there is (the reports, the check whether a seed is done): a half-written file or
    one from a hand-made fixture gives what it has. A key that is unknown or of the wrong type is left out, with
    a warning naming the file and the key.
    """
    path = path_of(run_dir, record)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    fields = {}
    for key, value in data.items():
        if key not in record.model_fields:
            print(f"warning: {path}: {key}: not a key of {_FILE_OF[record]}; ignored", file=sys.stderr)
            continue
        try:
            fields[key] = _adapter(record, key).validate_python(value)
        except ValidationError as err:
            print(f"warning: {path}: {key}: {err.errors(include_url=False)[0]['msg']}; ignored", file=sys.stderr)
    return fields


SCHEMA_FOLDER = "runs"  # under specs/, beside the specs' own schemas


def schema_name(file: str) -> str:
    """'metrics.json' → 'runs/metrics.schema.json', relative to the folder `archlab schema` writes (specs/)."""
    return f"{SCHEMA_FOLDER}/{Path(file).stem}.schema.json"


def run_file_schemas() -> dict[str, dict]:
    """Schema path (relative to specs/) → the JSON schema of a run file's record, as `archlab schema` writes it."""
    return {schema_name(name): model.model_json_schema() for name, model in FILES.items()}

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
    best_epoch: int | None = Field(description="The epoch with the best monitored value (1-based); "
                                     "the last one where the data has no validation split; null if none.")
    final: EpochMetrics = Field(description="The last epoch's train/ and val/ metrics.")
    best: EpochMetrics = Field(description="The best epoch's train/ and val/ metrics.")
    train_time_s: float = Field(description="Seconds spent in training epochs (validation excluded).")
    train_samples_per_s: float = Field(description="Training examples per second over the run.")
    spec_hash: str = Field(description="Hash of the spec the run was trained from.")
    mlflow_run_id: str | None = Field(description="The MLflow run; null when not tracked.")
    init_hash: str | None = Field(default=None, description="Hash of the trained weights the run started from "
                                  "(train.init_from); absent for a run from random weights.")
    data_hash: str | None = Field(default=None, description="Content hash of the prepared dataset the run trained "
                                  "on (its meta.json's content_hash): a run of other data is not done.")


SHIFTED_ACCURACY = "shifted_accuracy"  # eval.json's test key: {shift: accuracy} (spec field evaluate.shifts)


class Evaluation(BaseModel):
    """eval.json: the test-set metrics of a trained run, written by `archlab evaluate`."""

    model_config = ConfigDict(extra="forbid", title="eval.json")
    name: str = Field(description="The experiment's name.")
    status: Status = Field(description="How the evaluated training run ended.")
    main_metric: str = Field(description="The task's main metric.")
    seed: int = Field(description="The training seed of the evaluated run.")
    spec_hash: str = Field(description="Hash of the spec the evaluated run was trained from.")
    test: dict[str, Any] = Field(description="Test metrics: numbers, plus task-specific extras (confusion "
                                             "matrix, classes, samples) and, for a spec with evaluate.shifts, "
                                             "shifted_accuracy: {shift: accuracy}.")
    records: str | None = Field(default=None, description="The per-example records file beside it; absent "
                                                          "when the task keeps none.")


Series = list[Number | None]  # one value per epoch; null where not measured or not finite
Matrix = list[list[Number | None] | None]  # epoch × layer (or × rank)


class Closed(BaseModel):
    """A part of a run file with a closed set of keys. Keys added after the first runs were written have defaults
    (their writers always set them), so the run folders written before them still read."""

    model_config = ConfigDict(extra="forbid")


class GradNorms(Closed):
    """Gradient norms per epoch: per layer (epoch × layer) and global (over all parameters)."""

    mean: Matrix = Field(description="Mean over the epoch's steps of each layer's gradient norm (epoch × layer).")
    min: Matrix = Field(description="Smallest step's gradient norm per layer (epoch × layer).")
    max: Matrix = Field(description="Largest step's gradient norm per layer (epoch × layer).")
    global_mean: Series = Field(description="Mean over the steps of the global gradient norm.")
    global_max: Series = Field(description="Largest step's global gradient norm.")
    global_clipped_mean: Series | None = Field(default=None, description="global_mean after clipping (runs "
                                                                         "with train.grad_clip only).")
    global_clipped_max: Series | None = Field(default=None, description="global_max after clipping.")
    per_rank_global_mean: Matrix | None = Field(default=None, description="Data-parallel runs: each rank's own "
                                                "global norm (its shard's, before averaging), epoch × rank.")
    scope: str | None = Field(default=None, description="What the norms cover.")


class Activations(Closed):
    """Activation statistics of each watched layer on a fixed probe batch, per epoch."""

    layers: list[str] = Field(description="The watched layers.")
    mean: Matrix = Field(description="Mean activation (epoch × layer).")
    std: Matrix = Field(description="Activation standard deviation (epoch × layer).")
    dead_fraction: Matrix = Field(description="Fraction of units never active on the probe (epoch × layer).")
    relu_family: list[bool] | None = Field(default=None, description="Per layer: a ReLU-like unit (dead units are meaningful).")
    error: str | None = Field(default=None, description="Why activations could not be recorded; null when they were.")


class Spike(Closed):
    """One step whose global gradient norm jumped over the running median."""

    epoch: int = Field(description="The epoch (1-based).")
    step_in_epoch: int = Field(description="The step within the epoch (0-based).")
    norm: Number | None = Field(description="The step's global gradient norm.")
    median: Number | None = Field(description="The running median it is compared with.")
    ratio: Number | None = Field(description="norm / median.")


class Overfitting(Closed):
    """Generalisation gaps, overfitting onset and the fit verdict (rules: pipeline/engine/verdicts.py)."""

    best_epoch: int | None = Field(description="The epoch judged (the best one).")
    onset_epoch: int | None = Field(description="Where overfitting set in; null if it did not.")
    gap_best: dict[str, Number | None] = Field(description="Validation minus training loss and metric, best epoch.")
    gap_final: dict[str, Number | None] = Field(description="The same at the final epoch.")
    verdict: str = Field(description="good fit, overfit, underfit, diverged or n/a.")
    metric: str | None = Field(default=None, description="The metric the gaps use.")
    min_val_loss_epoch: int | None = Field(default=None, description="The epoch of the lowest validation loss.")
    val_loss_rise: Number | None = Field(default=None, description="Relative rise of the validation loss after its minimum.")
    rule: str | None = Field(default=None, description="Which rule gave the verdict, in words.")


class Diagnostics(Closed):
    """diagnostics.json: gradient health, activations, flags and the overfitting verdict of a run."""

    model_config = ConfigDict(extra="forbid", title="diagnostics.json")
    enabled: bool = Field(description="Whether gradients and activations were measured (diagnostics on); "
                                      "without, only the flags the loss history gives.")
    layers: list[str] | None = Field(default=None, description="The layers, in order from the input.")
    layer_phase: list[str] | None = Field(default=None, description="Per layer: the phase that updates it.")
    epochs: list[int] | None = Field(default=None, description="The epochs measured.")
    grad_norm: GradNorms | None = Field(default=None, description="Gradient norms.")
    update_ratio: Matrix | None = Field(default=None, description="Update size over weight size (epoch × layer).")
    activations: Activations | None = Field(default=None, description="Activation statistics.")
    exploding_events: list[Spike] | None = Field(default=None, description="Steps whose norm spiked (at most 20).")
    largest_spike: Spike | None = Field(default=None, description="The largest spike, raised or not.")
    nonfinite_gradient_steps: int | None = Field(default=None, description="Steps with a NaN or Inf gradient.")
    flags: dict[str, bool] = Field(description="Each flag (vanishing, exploding, dead_units, unstable, "
                                               "diverged): raised or not.")
    flag_details: dict[str, str] | None = Field(default=None, description="Each flag's reason, in words.")
    overfitting: Overfitting | None = Field(default=None, description="Gaps, onset and fit verdict.")


class FlopsByKind(Closed):
    """Forward FLOPs per example, split by what does the work (the rules: pipeline/engine/flops.py). The kinds sum
    to flops_forward_per_sample."""

    attention: Number = Field(description="Attention itself: the scores QKᵀ and the weights × V (SDPA, or an RNN "
                                          "decoder's attention scores and context).")
    projection: Number = Field(description="The layers an attention module calls: its Q, K, V and output "
                                           "projections.")
    ffn: Number = Field(description="A Transformer layer's position-wise feed-forward network (W1 and W2).")
    convolution: Number = Field(description="Every convolution.")
    recurrence: Number = Field(description="RNN, LSTM and GRU layers: the input and recurrent products of the cells.")
    other: Number = Field(description="The rest: embeddings and input projections, output heads, and the layers of a "
                                      "plain MLP.")


class Cost(Closed):
    """cost.json: size, compute, speed and memory of a trained run; a figure that could not be measured is null,
    with its reason under `unavailable`."""

    model_config = ConfigDict(extra="forbid", title="cost.json")
    params_total: int | None = Field(description="Parameters.")
    params_trainable: int | None = Field(description="Trainable parameters.")
    flops_forward_per_sample: Number | None = Field(description="FLOPs of one forward pass, per example.")
    flops_train_step_per_sample: Number | None = Field(description="FLOPs of one training step, per example.")
    flops_by_kind: FlopsByKind | None = Field(default=None, description="flops_forward_per_sample split by kind "
                                              "of work (attention, projection, ffn, convolution, recurrence, other).")
    train_time_s: Number | None = Field(description="Seconds of training.")
    train_samples_per_s: Number | None = Field(description="Training examples per second (all ranks).")
    infer_samples_per_s: Number | None = Field(description="Inference examples per second.")
    latency_ms_p50: Number | None = Field(description="Median latency of one small batch, ms.")
    latency_ms_p95: Number | None = Field(description="95th percentile latency, ms.")
    peak_memory_mb: Number | None = Field(description="Peak memory (rank 0's), MB.")
    memory_kind: str | None = Field(description="What peak_memory_mb measures (cuda allocator, process rss).")
    peak_flops: Number | None = Field(description="The device's peak matmul FLOP/s.")
    mfu: Number | None = Field(description="Model FLOPs utilisation: achieved over peak FLOP/s.")
    device: str = Field(description="The device trained on.")
    device_name: str | None = Field(description="The device's model name.")
    unavailable: dict[str, str] | None = Field(default=None, description="Figure → why it could not be measured.")
    world_size: int | None = Field(default=None, description="Data-parallel runs: number of ranks.")
    train_samples_per_s_per_rank: Number | None = Field(default=None, description="Throughput per rank.")
    train_time_s_per_rank: list[Number] | None = Field(default=None, description="Each rank's training time.")
    peak_memory_mb_per_rank: list[Number] | None = Field(default=None, description="Each rank's peak memory, MB.")
    peak_memory_mb_total: Number | None = Field(default=None, description="Sum of the ranks' peak memory, MB.")


FILES: dict[str, type[BaseModel]] = {"metrics.json": RunMetrics, "eval.json": Evaluation,
                                     "diagnostics.json": Diagnostics, "cost.json": Cost}
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
            adapter = _adapter(record, key)
            fields[key] = adapter.dump_python(adapter.validate_python(value), exclude_unset=True)  # plain again
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

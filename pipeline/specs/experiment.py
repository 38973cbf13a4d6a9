"""ExperimentSpec: one YAML file per experiment, validated by Pydantic, loaded with clear errors."""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (Field, NonNegativeInt, PositiveFloat, PositiveInt, StringConstraints, ValidationError,
                      model_validator)

from models import MODEL_SPECS, ModelSpec
from models.registry import spec_kind
from models.base import StrictModel
from pipeline.specs.errors import UserError, from_validation_error
from pipeline.specs.metrics import Mode

# A name becomes a folder and an MLflow run name: no slashes, no dots, no leading dash.
Slug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
MAX_SEED = 2**32 - 1  # numpy's seed range: a larger seed validates as an int but crashes training
TaskName = Literal["classify", "regress", "seq2seq", "lm", "reconstruct", "generate", "mlm"]


class DataRef(StrictModel):
    dataset: Slug = Field(description="Dataset name: a built-in (digits, mnist1d, diabetes, ...) or one declared under "
                                      "`datasets:` in params.yaml.")
    train_subset: PositiveInt | None = Field(default=None, description="Use only the first N training samples "
                                             "(for overfitting studies); the validation and test sets stay whole.")
    split_seed: int | None = Field(default=None, ge=0, description="Re-draw the train/validation split with this "
                                   "seed (train and validation pooled, same sizes); the test split never changes. "
                                   "Set per seed by `vary: split` in params.yaml.")


class OptimizerSpec(StrictModel):
    name: Literal["sgd", "adam", "adamw"] = Field(default="adamw", description="Optimizer.")
    lr: PositiveFloat = Field(default=1e-3, description="Peak learning rate.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="L2 penalty (decoupled for adamw).")
    l1: float = Field(default=0.0, ge=0.0, description="L1 penalty: l1 · Σ|w| over the weight matrices of every "
                      "linear and convolutional layer is added to the loss that is optimised (not to the reported "
                      "loss). Biases, norm scales and embedding tables are left out, as their size says nothing "
                      "about how many connections the network uses. 0 (the default): no penalty.")
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="SGD momentum (sgd only).")
    nesterov: bool = Field(default=False, description="Nesterov momentum (sgd only).")
    betas: tuple[Beta, Beta] = Field(default=(0.9, 0.999), description="Adam betas (adam, adamw only), each in "
                                     "[0, 1).")


class ScheduleSpec(StrictModel):
    name: Literal["constant", "step", "cosine"] = Field(default="constant", description="Learning-rate schedule "
                                                        "after warmup.")
    warmup_epochs: float = Field(default=0.0, ge=0.0, description="Linear warmup from 0 to the peak rate over this "
                                 "many epochs.")
    step_epochs: PositiveInt = Field(default=10, description="Epochs between decays (step only).")
    gamma: float = Field(default=0.1, gt=0.0, le=1.0, description="Decay factor per step (step only).")
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0, description="Final rate as a fraction of the peak "
                                "(cosine only).")


class EarlyStoppingSpec(StrictModel):
    monitor: str = Field(default="val/loss", description="History column to watch, e.g. val/loss or val/accuracy.")
    mode: Mode = Field(default="min", description="Whether lower or higher is better.")
    patience: PositiveInt = Field(default=10, description="Epochs without improvement before stopping.")
    min_delta: float = Field(default=0.0, ge=0.0, description="Smallest change that counts as an improvement.")


class AugmentSpec(StrictModel):
    noise_std: float = Field(default=0.0, ge=0.0, description="Std of Gaussian noise added to training inputs "
                             "(in normalised units).")
    max_shift: int = Field(default=0, ge=0, description="Roll training inputs by up to this many steps/pixels along "
                           "each spatial axis.")


class TrainSpec(StrictModel):
    epochs: PositiveInt = Field(default=20, description="Epoch budget (default 20). With `max_steps` and no "
                                "`epochs`, the step budget alone decides: epochs is then set to max_steps, which "
                                "no run reaches first (an epoch has at least one step).")
    max_steps: PositiveInt | None = Field(default=None, description="Optional step budget; with `epochs` also "
                                          "given, training stops at whichever budget ends first.")
    batch_size: PositiveInt = Field(default=128, description="Samples per optimisation step.")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="Optimizer and its settings.")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="Learning-rate schedule.")
    grad_clip: PositiveFloat | None = Field(default=None, description="Clip the global gradient norm to this value.")
    early_stopping: EarlyStoppingSpec | None = Field(default=None, description="Stop when the monitored metric "
                                                     "stalls; the best epoch's weights are kept.")
    augment: AugmentSpec = Field(default_factory=AugmentSpec, description="Training-time data augmentation.")
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seed for initialisation, batching and dropout.")
    deterministic: bool = Field(default=False, description="Ask PyTorch for deterministic kernels (slower on GPU).")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: cuda when there is one, "
                                                   "else cpu.")
    checkpoint_every_s: float = Field(default=10.0, ge=0.0, description="Write a checkpoint at the end of an epoch "
                                      "at most this often (0: every epoch); the last epoch is always written.")
    init_from: Path | None = Field(default=None, description="Start the model's transferable part (a token "
                                   "encoder's body, not its head) from another run's trained weights: a run "
                                   "folder holding checkpoint.pt (runs/NAME/seed-K), or an experiment's folder "
                                   "(runs/NAME), whose seed-K this run's seed K starts from. That run must have "
                                   "finished, with the same architecture and vocabulary. Default: random weights.")
    freeze: bool = Field(default=False, description="Keep the transferable part as it starts (loaded, or random "
                         "without init_from) and train the head alone: a linear probe. false: fine-tune it all.")

    @model_validator(mode="before")
    @classmethod
    def _steps_alone_decide(cls, data: object) -> object:
        """max_steps without epochs is a step budget, not one silently capped by the default 20 epochs."""
        if isinstance(data, dict) and data.get("max_steps") is not None and "epochs" not in data:
            return {**data, "epochs": data["max_steps"]}
        return data


class DiagnosticsSpec(StrictModel):
    enabled: bool = Field(default=True, description="Record gradient-health diagnostics while training (off: only "
                          "the overfitting analysis of the history, which costs nothing).")
    grad_norms: bool = Field(default=True, description="Per-layer gradient norms at every step (one fused norm "
                             "call per step, read once per epoch).")
    update_ratio: bool = Field(default=True, description="Per-layer update-to-weight ratio |lr*update|/|w|, "
                               "measured on one step per epoch.")
    activation_stats: bool = Field(default=True, description="Activation mean, std and dead-unit fraction on a "
                                   "fixed probe batch at the end of each epoch.")
    vanishing_ratio: PositiveFloat = Field(default=1e-3, description="Flag `vanishing` when the earliest weight "
                                           "layers' gradient norm is below this fraction of the last layers' "
                                           "(median over epochs).")
    exploding_factor: PositiveFloat = Field(default=100.0, description="Flag `exploding` when a step's global "
                                            "gradient norm exceeds this multiple of the running median of the "
                                            "500 steps before it (or a gradient is Inf/NaN). Healthy default runs "
                                            "jump up to about 70x when they leave a plateau.")
    dead_fraction: float = Field(default=0.5, gt=0.0, le=1.0, description="Flag `dead_units` when, at the last "
                                 "epoch, at least this fraction of a ReLU-family layer's output units never fire "
                                 "on the probe batch.")
    unstable_ratio: PositiveFloat = Field(default=0.25, description="Flag `unstable` when the training loss "
                                          "climbs back above its best-so-far by more than this fraction of its "
                                          "whole fall (first epoch to lowest).")
    overfit_patience: PositiveInt = Field(default=3, description="Epochs after the validation-loss minimum, with "
                                          "training loss still falling, before overfitting can be called; also the "
                                          "window of the `underfit` rule.")
    overfit_tolerance: float = Field(default=0.1, ge=0.0, description="Overfitting sets in when the validation "
                                     "loss ends more than this fraction above its minimum (0.1 = 10%) while the "
                                     "training loss kept falling.")
    overfit_gap: float = Field(default=0.05, ge=0.0, description="Verdict `overfit` also needs the main metric's "
                               "validation-training gap at the final epoch to be at least this, in the metric's "
                               "units (0.05 = 5 accuracy points).")
    underfit_fall: float = Field(default=0.05, ge=0.0, description="Verdict `underfit` when more than this fraction "
                                 "of the training loss's whole fall came in the last `overfit_patience` epochs "
                                 "(still falling), or when it fell by less than 10% overall.")


class EvaluateSpec(StrictModel):
    shifts: list[NonNegativeInt] = Field(default=[], description="classify on signals and images only: also score "
                                         "the test set with each input translated by k steps (pixels, for images: "
                                         "along the last axis, i.e. horizontally), for each k listed; eval.json "
                                         "gets shifted_accuracy: {k: accuracy}. Each example is scored shifted by "
                                         "+k and by -k, and the two accuracies are averaged. The positions "
                                         "vacated are filled with 0, the training mean after the default "
                                         "standardisation; unlike the training augmentation `max_shift`, which "
                                         "rolls, nothing wraps around, so no content from one end appears at the "
                                         "other. 0 gives the plain accuracy. Default: none.")

    @model_validator(mode="after")
    def _distinct(self) -> "EvaluateSpec":
        if len(set(self.shifts)) != len(self.shifts):
            raise ValueError(f"shifts lists a shift twice: {self.shifts}")
        return self


class ExperimentSpec(StrictModel):
    """One experiment: which data, which task, which model, how to train it."""

    name: Slug = Field(description="Experiment name: lowercase letters, digits, '-' and '_'; becomes runs/NAME/ and "
                       "the MLflow run name.")
    description: str = Field(default="", description="Free text shown in reports.")
    data: DataRef = Field(description="Which dataset to train on.")
    task: TaskName = Field(description="What the model learns: classify, regress, seq2seq, lm, reconstruct, generate, "
                           "mlm (masked language modelling).")
    model: ModelSpec = Field(description="The architecture; `kind` picks the family.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Optimisation settings.")
    diagnostics: DiagnosticsSpec = Field(default_factory=DiagnosticsSpec, description="Gradient-health and "
                                         "overfitting diagnostics.")
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec, description="Extra test-set evaluations (they "
                                   "change nothing in training).")

    @model_validator(mode="after")
    def _model_serves_task(self) -> "ExperimentSpec":
        served = self.model.served_tasks()
        if self.task not in served:
            # A family whose tasks depend on its settings (a transformer's shape) says which it serves as configured.
            why = f" as configured (it serves {', '.join(sorted(served))})" if served != self.model.tasks else ""
            raise ValueError(f"model kind {self.model.kind!r} cannot serve task {self.task!r}{why}. "
                             f"Valid pairs: {valid_pairs()}")
        return self

    def spec_hash(self) -> str:
        """Content hash of everything that affects training (not the description, nor the extra evaluations:
        adding a shifted evaluation to a trained spec keeps its checkpoint, and every hash stays as it was)."""
        payload = self.model_dump(mode="json", exclude={"description", "evaluate"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def valid_pairs() -> str:
    """'kind: task, task; ...' for error messages, each family wording its own entry."""
    return "; ".join(f"{spec_kind(cls)}: {cls.describe_tasks()}" for cls in MODEL_SPECS)


def union_tags() -> frozenset[str]:
    """Discriminator values pydantic puts in error paths (model kinds, layer types), hidden from users."""
    tags: set[str] = set()
    tags.update(spec_kind(cls) for cls in MODEL_SPECS)
    from models.cnn import ConvLayer, DropoutLayer, NormLayer, PoolLayer
    for layer in (ConvLayer, PoolLayer, NormLayer, DropoutLayer):
        tags.add(layer.model_fields["type"].annotation.__args__[0])
    return frozenset(tags)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            with contextlib.suppress(TypeError):  # an unhashable key: the base class says so
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


MAX_SPEC_BYTES = 1_000_000  # a spec is a page of YAML; a bigger file is not one


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping safely; a missing, empty, binary, non-UTF-8 or malformed file, a key given twice and
    nesting too deep to parse are each a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(path, "file not found")
    data = path.read_bytes()
    if len(data) > MAX_SPEC_BYTES:
        raise UserError(path, f"{len(data):,} bytes: too big for a YAML spec (at most {MAX_SPEC_BYTES:,})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(path, f"not UTF-8 text (byte {exc.start}: {exc.reason}); save the file as UTF-8") from None
    if "\x00" in text:
        raise UserError(path, "a binary file (it holds NUL bytes), not a YAML spec")
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise UserError(path, f"invalid YAML: {where}{getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:
        raise UserError(path, "invalid YAML: nested too deeply to read") from None
    if raw is None:
        raise UserError(path, "the file is empty; an experiment spec needs at least name, data, task and model")
    if not isinstance(raw, dict):
        raise UserError(path, f"expected a mapping of fields at the top level, got {type(raw).__name__}")
    return raw


MAX_INT = 2**53  # past this no size, count or seed means anything, and torch overflows in C++


def check_int_sizes(raw, source: str | Path, path: str = "") -> None:
    """Refuse an integer too large to mean anything, naming its field, before any number reaches torch."""
    items = raw.items() if isinstance(raw, dict) else enumerate(raw) if isinstance(raw, list) else ()
    for key, value in items:
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            raise UserError(source, f"{value} is too large (at most {MAX_INT:,})", field=where)
        check_int_sizes(value, source, where)


def parse_spec(raw: dict, source: str | Path) -> ExperimentSpec:
    check_int_sizes(raw, source)
    try:
        return ExperimentSpec.model_validate(raw)
    except ValidationError as err:
        raise from_validation_error(source, err, union_tags(), model=ExperimentSpec) from None


def load_spec(path: str | Path) -> ExperimentSpec:
    """Load and validate one spec file; every mistake becomes a UserError naming the file and field."""
    return parse_spec(read_yaml(path), path)


def spec_to_yaml(spec: ExperimentSpec, schema_ref: str = "schema.json") -> str:
    header = f"# yaml-language-server: $schema={schema_ref}\n"
    return header + yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=False), sort_keys=False)


def json_schema() -> dict:
    schema = ExperimentSpec.model_json_schema()
    schema["title"] = "archlab experiment spec"
    return schema

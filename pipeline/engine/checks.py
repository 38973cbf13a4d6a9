"""Where a spec meets its data: the task can read the data and the model builds and runs on its shape."""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.io import why_not_replaceable
from pipeline.specs.errors import UserError, refuse_unless_ours

if TYPE_CHECKING:
    from pipeline.data.prepare import DataMeta


def ensure_prepared(config, spec, folder: Path, spec_path: str, check: Callable[[DataMeta], None] | None = None):
    """Load the spec's prepared dataset, preparing it first on a fresh checkout or when params.yaml now
    describes the dataset differently (stale data is never used silently).

    The model is checked against the data's shape (and `check`, the caller's own, against its meta) before
    anything is written, so an impossible architecture leaves no prepared folder behind. Only a folder
    archlab made is ever replaced.
    """
    from pipeline.data.prepare import build_arrays, load_prepared, write_prepared
    from pipeline.specs.config import dataset_spec
    dataset = spec.data.dataset
    if current_meta(config, folder, dataset, spec_path) is not None:
        data = load_prepared(folder)
        check_buildable(spec, data.meta, spec_path)
        if check is not None:
            check(data.meta)
        return data
    arrays, meta = build_arrays(dataset, dataset_spec(config, dataset, spec_path))
    check_buildable(spec, meta, spec_path)
    if check is not None:
        check(meta)
    print(f"preparing dataset {dataset!r} into {folder}", file=sys.stderr)
    write_prepared(arrays, meta, folder)
    return load_prepared(folder)


def current_meta(config, folder: Path, dataset: str, spec_path: str) -> DataMeta | None:
    """The folder's meta if it holds `dataset` prepared from the spec params.yaml gives it (or from any, for
    a dataset params.yaml does not know); None if it must be prepared (nothing there, or archlab's own
    folder prepared from another spec). Anything else is refused."""
    from pipeline.data.prepare import PREPARED_KIND, read_meta, spec_changes
    from pipeline.specs.config import dataset_spec, knows_dataset
    meta = read_meta(folder)
    if meta is None:
        refuse_unless_ours(folder, PREPARED_KIND)
        return None
    if meta.name != dataset:
        raise UserError(folder, f"holds dataset {meta.name!r} but the spec asks for {dataset!r}",
                        field="data.dataset")
    changes = spec_changes(meta, dataset_spec(config, dataset, spec_path)) if knows_dataset(config, dataset) else []
    if not changes:
        return meta
    reason = why_not_replaceable(folder, PREPARED_KIND)
    if reason is not None:
        raise UserError(folder, f"was prepared from another spec of {dataset!r} ({'; '.join(changes)}), and "
                        f"archlab cannot prepare it again there: it {reason}")
    print(f"dataset {dataset!r} changed since {folder} was prepared ({'; '.join(changes)}): preparing it again",
          file=sys.stderr)
    return None


def check_vary(config, spec, source) -> None:
    """`vary: split` re-draws each seed's train/validation split: refused, before anything is written, for a
    dataset declared without a validation split."""
    from pipeline.specs.config import dataset_spec, knows_dataset
    dataset = spec.data.dataset
    if config.vary_of(spec.name) != "split" or not knows_dataset(config, dataset):
        return  # an unknown dataset is named by ensure_prepared
    if dataset_spec(config, dataset, source).split.validates:
        return
    entry = config.experiments.get(spec.name)
    raise UserError(source, f"is split for {spec.name}, but dataset {dataset!r} has no validation split to re-draw "
                    "(its split.val_fraction is 0); use vary: init",
                    field=f"experiments.{spec.name}.vary" if entry and entry.vary else "vary")


def dataset_meta(config, dataset: str, folder: Path, spec_path: str) -> DataMeta:
    """The data's meta.json, from a prepared folder of the same dataset spec or, failing that, built in
    memory (nothing written)."""
    from pipeline.data.prepare import build_arrays, read_meta, spec_changes
    from pipeline.specs.config import dataset_spec, knows_dataset
    meta = read_meta(folder)
    if meta is not None and meta.name == dataset and (
            not knows_dataset(config, dataset) or not spec_changes(meta, dataset_spec(config, dataset, spec_path))):
        return meta
    _, meta = build_arrays(dataset, dataset_spec(config, dataset, spec_path))
    return meta


def check_buildable(spec, meta: DataMeta, source):
    """The spec fits the data that `meta` describes and this machine: its task can read the data (classify
    on text is a spec mistake), its device exists, its model fits in memory and builds and runs one tiny
    batch (an impossible architecture names its layer), and batch norm never meets a batch of one."""
    import torch

    from models import build_model
    from models.base import ArchitectureError
    from pipeline.data.prepare import shape_from_meta
    from pipeline.engine.tasks import task_data_mismatch
    reason = task_data_mismatch(spec.task, meta)
    if reason is not None:
        raise UserError(source, reason, field="task")
    _check_shifts(spec, meta, source)
    _check_needs_validation(spec, meta, source)
    if spec.train.device == "cuda" and not torch.cuda.is_available():
        raise UserError(source, "is 'cuda' but this machine has no CUDA device; use auto or cpu", field="train.device")
    shape = shape_from_meta(meta)
    try:
        check_fits_in_memory(spec, shape, source)
        model = build_model(spec.model, shape)
        model.eval()
        dtype = torch.long if shape.vocab_size else torch.float32
        x = torch.zeros((2, *shape.input_shape), dtype=dtype)
        with torch.no_grad():
            out = model.example_forward(x)
    except ArchitectureError as err:
        raise UserError(source, err.message, field=err.field) from None
    except (RuntimeError, OverflowError) as err:  # torch's own complaints about sizes
        raise UserError(source, f"the architecture does not fit the data ({shape.input_shape}): {err}",
                        field="model") from None
    _check_batch_norm_batches(spec, meta, model, source)
    _check_transferable(spec, model, source)
    return model, out


def _check_shifts(spec, meta: DataMeta, source) -> None:
    """evaluate.shifts moves inputs along their last axis: it means something for classifiers of signals and
    images only, and a shift must leave some of the input in place."""
    shifts = spec.evaluate.shifts
    if not shifts:
        return
    if spec.task != "classify":
        raise UserError(source, f"shifted evaluation scores classifiers; this spec's task is {spec.task}",
                        field="evaluate.shifts")
    if meta.source == "table" or len(meta.input_shape) not in (1, 2, 3):
        raise UserError(source, f"shifted evaluation moves signals and images along their last axis; dataset "
                        f"{meta.name!r} holds {'a table' if meta.source == 'table' else 'inputs'} of shape "
                        f"{tuple(meta.input_shape)}", field="evaluate.shifts")
    length = meta.input_shape[-1]
    if max(shifts) >= length:
        raise UserError(source, f"a shift of {max(shifts)} moves every value out of inputs whose last axis has "
                        f"{length} positions; use shifts below {length}", field="evaluate.shifts")


def _check_needs_validation(spec, meta: DataMeta, source) -> None:
    """Data without a validation split (split.val_fraction 0) has no val/ metrics to stop on and no split to
    re-draw: a spec that needs one is refused before anything is written."""
    from pipeline.data.prepare import has_validation
    if has_validation(meta):
        return
    why = f"dataset {meta.name!r} has no validation split (its split.val_fraction is 0)"
    es = spec.train.early_stopping
    if es is not None and not es.monitor.startswith("train/"):
        raise UserError(source, f"early stopping watches {es.monitor!r}, but {why}; watch a train/ metric, or "
                        "give the dataset a validation split", field="train.early_stopping.monitor")
    if spec.data.split_seed is not None:
        raise UserError(source, f"re-draws the train/validation split, but {why}", field="data.split_seed")


def _check_transferable(spec, model, source) -> None:
    """train.init_from and train.freeze need a model with a part to load or freeze (models.contract)."""
    if (spec.train.init_from is not None or spec.train.freeze) and model.transferable() is None:
        field = "train.init_from" if spec.train.init_from is not None else "train.freeze"
        raise UserError(source, f"model kind {spec.model.kind!r} has no part that can be loaded or frozen as "
                        "configured (a transformer with shape: encoder on token data has: its encoder)", field=field)


def _check_batch_norm_batches(spec, meta: DataMeta, model, source) -> None:
    """Batch norm cannot train on a batch of one sample: refuse a batch size that leaves one at an epoch's end."""
    from torch.nn.modules.batchnorm import _BatchNorm
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return
    train = int((meta.sizes or {}).get("train", 0))
    if spec.data.train_subset:
        train = min(train, spec.data.train_subset)
    size = spec.train.batch_size
    if train > 1 and train % size == 1:
        raise UserError(source, f"{train} training samples in batches of {size} leave a last batch of one "
                        f"sample, which batch norm cannot train on; use batch_size {size + 1} or {size - 1}",
                        field="train.batch_size")


BYTES_PER_VALUE = 4  # float32
# Training holds each parameter about four times (weights, gradient, two Adam moments) and each activation
# about twice (kept for the backward pass, and its gradient).
PARAM_COPIES, ACTIVATION_COPIES = 4, 2


def memory_estimate(spec, shape) -> tuple[int, int]:
    """(parameters, activation values per sample) of the spec's model, counted on PyTorch's meta device:
    nothing is allocated, so a model of a billion units is sized in a moment. Activations are the outputs of
    every leaf module on one sample; (params, 0) where the model cannot run on the meta device."""
    import torch

    from models import build_model
    with torch.device("meta"):
        model = build_model(spec.model, shape)
        params = sum(p.numel() for p in model.parameters())
        values: list[int] = []
        leaves = [m for m in model.modules() if not any(True for _ in m.children())]
        hooks = [m.register_forward_hook(lambda _m, _i, out: values.append(
            out.numel() if isinstance(out, torch.Tensor) else 0)) for m in leaves]
        try:
            model.eval()
            x = torch.zeros((1, *shape.input_shape), dtype=torch.long if shape.vocab_size else torch.float32)
            with torch.no_grad():
                model.example_forward(x)
        except Exception:  # noqa: BLE001 - a model the meta device cannot run: sized by its parameters only
            values = []
        finally:
            for hook in hooks:
                hook.remove()
    return params, sum(values)


def memory_available(device: str) -> int:
    import os

    import torch
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits_in_memory(spec, shape, source) -> None:
    """Refuse, before allocating anything, a model whose training would not fit in this machine's memory."""
    params, per_sample = memory_estimate(spec, shape)
    weights = params * BYTES_PER_VALUE * PARAM_COPIES
    activations = per_sample * spec.train.batch_size * BYTES_PER_VALUE * ACTIVATION_COPIES
    have = memory_available(spec.train.device)
    if weights + activations > have:
        raise UserError(source, f"training this model would need about {_gb(weights + activations)} "
                        f"({params:,} parameters: {_gb(weights)}; activations of a batch of "
                        f"{spec.train.batch_size}: {_gb(activations)}), but this machine has {_gb(have)}",
                        field="model")


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GB"

"""Where a spec meets its data: the task can read the data and the model builds and runs on its shape."""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.io import why_not_replaceable
from pipeline.specs.errors import UserError, refuse_unless_ours


def ensure_prepared(config, spec, folder: Path, spec_path: str):
    """Load the spec's prepared dataset, preparing it first on a fresh checkout or when params.yaml now
    describes the dataset differently (stale data is never used silently).

    The model is checked against the data's shape before anything is written, so an impossible
    architecture leaves no prepared folder behind. Only a folder archlab made is ever replaced.
    """
    from pipeline.data.prepare import build_arrays, load_prepared, write_prepared
    from pipeline.specs.config import dataset_spec
    dataset = spec.data.dataset
    wanted = dataset_spec(config, dataset, spec_path)
    if _current_meta(folder, dataset, wanted) is not None:
        data = load_prepared(folder)
        check_buildable(spec, data.meta, spec_path)
        return data
    arrays, meta = build_arrays(dataset, wanted)
    check_buildable(spec, meta, spec_path)
    print(f"preparing dataset {dataset!r} into {folder}", file=sys.stderr)
    write_prepared(arrays, meta, folder)
    return load_prepared(folder)


def _current_meta(folder: Path, dataset: str, wanted) -> dict | None:
    """The folder's meta if it holds `dataset` prepared from the spec `wanted`; None if it must be prepared
    (nothing there, or archlab's own folder prepared from another spec). Anything else is refused."""
    from pipeline.data.prepare import PREPARED_KIND, read_meta, spec_changes
    meta = read_meta(folder)
    if meta is None:
        refuse_unless_ours(folder, PREPARED_KIND)
        return None
    if meta["name"] != dataset:
        raise UserError(folder, f"holds dataset {meta['name']!r} but the spec asks for {dataset!r}",
                        field="data.dataset")
    changes = spec_changes(meta, wanted)
    if not changes:
        return meta
    reason = why_not_replaceable(folder, PREPARED_KIND)
    if reason is not None:
        raise UserError(folder, f"was prepared from another spec of {dataset!r} ({'; '.join(changes)}), and "
                        f"archlab cannot prepare it again there: it {reason}")
    print(f"dataset {dataset!r} changed since {folder} was prepared ({'; '.join(changes)}): preparing it again",
          file=sys.stderr)
    return None


def dataset_meta(config, dataset: str, folder: Path, spec_path: str) -> dict:
    """The data's meta.json, from a prepared folder of the same dataset spec or, failing that, built in
    memory (nothing written)."""
    from pipeline.data.prepare import build_arrays, read_meta, spec_changes
    from pipeline.specs.config import dataset_spec
    wanted = dataset_spec(config, dataset, spec_path)
    meta = read_meta(folder)
    if meta is not None and meta["name"] == dataset and not spec_changes(meta, wanted):
        return meta
    _, meta = build_arrays(dataset, wanted)
    return meta


def check_buildable(spec, meta: dict, source):
    """The spec fits the data that `meta` describes: its task can read them (classify on text is a spec
    mistake), and its model builds and runs one tiny batch (an impossible architecture names its layer)."""
    import torch
    from models import build_model
    from models.base import ArchitectureError
    from pipeline.data.prepare import shape_from_meta
    from pipeline.engine.tasks import task_data_mismatch
    reason = task_data_mismatch(spec.task, meta)
    if reason is not None:
        raise UserError(source, reason, field="task")
    shape = shape_from_meta(meta)
    try:
        model = build_model(spec.model, shape)
        model.eval()
        dtype = torch.long if shape.vocab_size else torch.float32
        x = torch.zeros((2, *shape.input_shape), dtype=dtype)
        with torch.no_grad():
            out = model.example_forward(x) if hasattr(model, "example_forward") else model(x)
    except ArchitectureError as err:
        raise UserError(source, err.message, field=err.field) from None
    except RuntimeError as err:
        raise UserError(source, f"the architecture does not fit the data ({shape.input_shape}): {err}",
                        field="model") from None
    return model, out

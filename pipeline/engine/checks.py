"""Where a spec meets its data: the task can read the data and the model builds and runs on its shape."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.specs.errors import UserError


def ensure_prepared(config, spec, folder: Path, spec_path: str):
    """Load the spec's prepared dataset, preparing it first on a fresh checkout.

    The model is checked against the data's shape before anything is written, so an impossible
    architecture leaves no prepared folder behind.
    """
    from pipeline.data.prepare import build_arrays, load_prepared, write_prepared
    from pipeline.specs.config import dataset_spec
    dataset = spec.data.dataset
    if (folder / "meta.json").is_file():
        data = load_prepared(folder)
        if data.meta["name"] != dataset:
            raise UserError(folder, f"holds dataset {data.meta['name']!r} but the spec asks for {dataset!r}",
                            field="data.dataset")
        check_buildable(spec, data.meta, spec_path)
        return data
    arrays, meta = build_arrays(dataset, dataset_spec(config, dataset, spec_path))
    check_buildable(spec, meta, spec_path)
    print(f"preparing dataset {dataset!r} into {folder}", file=sys.stderr)
    write_prepared(arrays, meta, folder)
    return load_prepared(folder)


def dataset_meta(config, dataset: str, folder: Path, spec_path: str) -> dict:
    """The data's meta.json, from a prepared folder or, failing that, built in memory (nothing written)."""
    from pipeline.data.prepare import build_arrays
    from pipeline.specs.config import dataset_spec
    if (folder / "meta.json").is_file():
        return json.loads((folder / "meta.json").read_text())
    _, meta = build_arrays(dataset, dataset_spec(config, dataset, spec_path))
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
            out = model.example_forward(x)
    except ArchitectureError as err:
        raise UserError(source, err.message, field=err.field) from None
    except RuntimeError as err:
        raise UserError(source, f"the architecture does not fit the data ({shape.input_shape}): {err}",
                        field="model") from None
    return model, out

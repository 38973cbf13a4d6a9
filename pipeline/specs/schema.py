"""JSON schemas for editors (yaml-language-server): specs/schema.json, written from the Pydantic models."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.io import atomic_write_text
from pipeline.specs.experiment import json_schema


def schema_files() -> dict[str, dict]:
    """File name (relative to specs/) → schema."""
    from pipeline.specs.sweep import json_schema as sweep_schema
    return {"schema.json": json_schema(), "sweeps/schema.json": sweep_schema()}


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_schemas(folder: Path) -> list[Path]:
    written = []
    for name, schema in schema_files().items():
        path = folder / name
        atomic_write_text(path, render(schema))
        written.append(path)
    return written

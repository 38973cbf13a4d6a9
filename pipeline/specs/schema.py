"""JSON schemas for editors (yaml-language-server): specs/schema.json, written from the Pydantic models.

`archlab schema` also writes the run files' schemas (specs/runs/, from pipeline/engine/runfiles.py), handed in by
the CLI: the engine sits above specs/ and is not imported here."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.io import atomic_write_text
from pipeline.specs.experiment import json_schema


def schema_files() -> dict[str, dict]:
    """File name (relative to specs/) → schema."""
    from pipeline.specs.claim import json_schema as claim_schema
    from pipeline.specs.sweep import json_schema as sweep_schema
    return {"schema.json": for_editors(json_schema()), "sweeps/schema.json": for_editors(sweep_schema()),
            "claims/schema.json": for_editors(claim_schema())}


def for_editors(node):
    """Every discriminated union rewritten so that plain JSON-Schema validators pick the member by its tag.

    Pydantic writes `oneOf` + `discriminator`; validators ignore `discriminator`, try every member and report
    the mismatches of all of them ("'dropout', 'hidden' were unexpected" for a mistyped activation). With one
    `if kind == tag then member` per tag, only the chosen family's schema applies, and an editor points at the
    field that is wrong; the tag itself must be one of the tags.
    """
    if isinstance(node, list):
        return [for_editors(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: for_editors(value) for key, value in node.items()}
    tagged = node.get("discriminator")
    if not (isinstance(tagged, dict) and "oneOf" in node and "mapping" in tagged):
        return node
    name, mapping = tagged["propertyName"], tagged["mapping"]
    rest = {k: v for k, v in node.items() if k not in ("discriminator", "oneOf")}
    return {**rest, "type": "object", "required": [name],
            "properties": {name: {"enum": list(mapping), "description": f"Which member; one of: {', '.join(mapping)}."}},
            "allOf": [{"if": {"properties": {name: {"const": tag, "description": f"{name} is {tag}."}},
                              "required": [name]}, "then": {"$ref": ref}}
                      for tag, ref in mapping.items()]}


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_schemas(folder: Path, more: dict[str, dict] | None = None) -> list[Path]:
    """The specs' schemas, and `more` (file name relative to `folder` → schema), into `folder`."""
    written = []
    for name, schema in {**schema_files(), **(more or {})}.items():
        path = folder / name
        atomic_write_text(path, render(schema))
        written.append(path)
    return written

"""User mistakes: one exception type, rendered by the CLI as `file: field: message` and exit status 2."""
from __future__ import annotations

import difflib
import re
from pathlib import Path

from pydantic import BaseModel, ValidationError

from pipeline.io import why_not_replaceable


class UserError(Exception):
    """A mistake in a spec, a data file or a command line. Never a bug of ours."""

    def __init__(self, source: str | Path | None, message: str, field: str | None = None):
        self.source = str(source) if source is not None else None
        self.field = field
        self.message = message
        super().__init__(str(self))

    def __reduce__(self):  # raised in a worker process, it crosses back whole
        return UserError, (self.source, self.message, self.field)

    def __str__(self) -> str:
        parts = [p for p in (self.source, self.field) if p]
        return ": ".join([*parts, self.message])


# Fields whose values are discriminated unions: pydantic names the chosen tag right after them.
_UNION_PARENTS = frozenset({"model", "candidates"})


def format_loc(loc: tuple, drop: frozenset[str] = frozenset()) -> str:
    """('model', 'cnn', 'layers', 0, 'conv', 'channels') → 'model.layers[0].channels'.

    Pydantic puts the discriminator tag of a union member in the path; users never wrote it, so drop it
    (after a union field, a list index, or a dataset's name under `datasets`).
    """
    out = ""
    seen: list = []
    for part in loc:
        prev = seen[-1] if seen else None
        after_union = prev in _UNION_PARENTS or isinstance(prev, int) or (len(seen) >= 2 and seen[-2] == "datasets")
        if isinstance(part, int):
            out += f"[{part}]"
        elif not (part in drop and after_union):
            out += ("." if out else "") + str(part)
        seen.append(part)
    return out or "(top level)"


def from_validation_error(source: str | Path, err: ValidationError, drop: frozenset[str] = frozenset(),
                          prefix: str = "", model: type[BaseModel] | None = None) -> UserError:
    """All of pydantic's complaints, one per line, each naming its field; with the validated `model`, an unknown
    key or value that is close to a known one gets a "did you mean" suggestion."""
    schema = model.model_json_schema() if model is not None else None
    lines = []
    for e in err.errors(include_url=False):
        field = format_loc((*([prefix] if prefix else []), *e["loc"]), drop)
        lines.append(f"{field}: {e['msg']}{did_you_mean(e, schema)}")
    first, rest = lines[0].split(": ", 1)
    message = rest if len(lines) == 1 else rest + "".join(f"\n  {source}: {line}" for line in lines[1:])
    return UserError(source, message, field=first)


def did_you_mean(error: dict, schema: dict | None) -> str:
    """' (did you mean 'relu'?)' for a near miss of an allowed key, literal value or union tag; else ''."""
    ctx = error.get("ctx") or {}
    if error["type"] == "extra_forbidden" and schema is not None:
        word, known = str(error["loc"][-1]), field_names(schema, error["loc"][:-1])
    elif error["type"] in ("literal_error", "enum"):
        word, known = str(error.get("input")), re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
    elif error["type"] == "union_tag_invalid":
        word, known = str(ctx.get("tag")), re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))
    else:
        return ""
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def field_names(schema: dict, loc: tuple) -> list[str]:
    """The keys allowed at `loc` (pydantic's path, union tags included) of a pydantic JSON schema."""
    defs = schema.get("$defs", {})

    def resolve(node: dict) -> dict:
        while True:
            if "$ref" in node:
                node = defs.get(node["$ref"].rsplit("/", 1)[-1], {})
            elif "anyOf" in node:  # an optional field: the member that is not null
                node = next((n for n in node["anyOf"] if n.get("type") != "null"), {})
            else:
                return node

    node = resolve(schema)
    for part in loc:
        mapping = (node.get("discriminator") or {}).get("mapping", {})
        if isinstance(part, int) and "items" in node:
            node = resolve(node["items"])
        elif part in mapping:
            node = defs.get(mapping[part].rsplit("/", 1)[-1], {})
        elif part in node.get("properties", {}):
            node = resolve(node["properties"][part])
        elif isinstance(node.get("additionalProperties"), dict):  # a mapping of names (datasets, candidates)
            node = resolve(node["additionalProperties"])
        else:
            return []
    return list(node.get("properties", {}))


def refuse_unless_ours(path: str | Path, kind: str, field: str | None = None) -> None:
    """A UserError naming `path` unless archlab may replace it with a folder of this kind (pipeline/io.py):
    archlab never deletes or replaces what it cannot prove it made."""
    reason = why_not_replaceable(path, kind)
    if reason is not None:
        raise UserError(path, reason, field=field)

"""User mistakes: one exception type, rendered by the CLI as `file: field: message` and exit status 2."""
from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from pipeline.io import why_not_replaceable


class UserError(Exception):
    """A mistake in a spec, a data file or a command line. Never a bug of ours."""

    def __init__(self, source: str | Path | None, message: str, field: str | None = None):
        self.source = str(source) if source is not None else None
        self.field = field
        self.message = message
        super().__init__(str(self))

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
                          prefix: str = "") -> UserError:
    """All of pydantic's complaints, one per line, each naming its field."""
    lines = []
    for e in err.errors(include_url=False):
        field = format_loc((*([prefix] if prefix else []), *e["loc"]), drop)
        lines.append(f"{field}: {e['msg']}")
    first, rest = lines[0].split(": ", 1)
    message = rest if len(lines) == 1 else rest + "".join(f"\n  {source}: {line}" for line in lines[1:])
    return UserError(source, message, field=first)


def refuse_unless_ours(path: str | Path, kind: str, field: str | None = None) -> None:
    """A UserError naming `path` unless archlab may replace it with a folder of this kind (pipeline/io.py):
    archlab never deletes or replaces what it cannot prove it made."""
    reason = why_not_replaceable(path, kind)
    if reason is not None:
        raise UserError(path, reason, field=field)

"""What every spec class shares: strictness, and one check that a field set means something. No model
behaviour: families do not inherit code."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A spec section: unknown fields are errors, never silently dropped; no number is Inf or NaN (a learning
    rate, a noise level or a warmup of .inf validates as a float but means nothing)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ArchitectureError(ValueError):
    """An architecture that cannot be built on the data's shape; `field` is the spec path to blame."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def reject_fields_set_in_vain(spec: BaseModel, only_for: dict[str, tuple[str, object]]) -> None:
    """A field set that means nothing in the spec's configuration is a mistake, not a silent no-op.

    `only_for` maps a field to (attribute, value) that gives it meaning, e.g. {"channels": ("arch", "conv")}, or to
    (attribute, (value, value, ...)) where several do.
    Judged by value: a field left at its default says nothing, so a spec written out in full (a sweep's trial
    spec, `spec_to_yaml`) loads again.
    """
    for name in sorted(spec.model_fields_set & only_for.keys()):
        attr, needed = only_for[name]
        allowed = needed if isinstance(needed, tuple) else (needed,)
        if getattr(spec, attr) not in allowed and getattr(spec, name) != type(spec).model_fields[name].default:
            raise ValueError(f"{name} applies to {attr} {' or '.join(map(str, allowed))} only (this one is {attr} "
                             f"{getattr(spec, attr)}); remove it")

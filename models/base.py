"""What every spec class shares: strictness. Not behaviour (families do not inherit code)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A spec section: unknown fields are errors, never silently dropped."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ArchitectureError(ValueError):
    """An architecture that cannot be built on the data's shape; `field` is the spec path to blame."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message

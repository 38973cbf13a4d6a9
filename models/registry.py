"""One registry of model builders, keyed by the spec's `kind` (after timm's register_model)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from torch import nn

from models.layers.init import initialise


@dataclass(frozen=True)
class DataShape:
    """What a builder needs to know about the data: per-sample shapes, not the data."""

    input_shape: tuple[int, ...]  # one sample, no batch dim: (F,), (L,), (C, L) or (C, H, W); (T,) for tokens
    output_size: int  # classes, regression targets, or vocabulary size for token tasks
    vocab_size: int | None = None  # token tasks only
    max_len: int | None = None  # longest sequence, token tasks only
    target_len: int | None = None  # longest target sequence, seq2seq only
    value_range: tuple[float, float] | None = None  # min, max of the (normalised) training inputs; real data only
    target: str | None = None  # what the targets are: class, value or tokens (None: not said)


class Builder(Protocol):
    def __call__(self, spec, shape: DataShape) -> nn.Module: ...


_BUILDERS: dict[str, Builder] = {}
_SPECS: dict[str, type] = {}  # kind → the family's spec class, in the order families were registered


def spec_kind(spec_cls: type) -> str:
    """The `kind` tag a family's spec class declares (its Literal)."""
    return spec_cls.model_fields["kind"].annotation.__args__[0]


def register(spec_cls: type) -> Callable[[Builder], Builder]:
    """Decorator: file a builder under its spec's `kind`; a second builder for the same kind is a bug."""
    kind = spec_kind(spec_cls)

    def add(builder: Builder) -> Builder:
        if kind in _BUILDERS:
            raise ValueError(f"model kind {kind!r} is registered twice")
        _BUILDERS[kind] = builder
        _SPECS[kind] = spec_cls
        return builder

    return add


def registered_kinds() -> frozenset[str]:
    return frozenset(_BUILDERS)


def registered_specs() -> tuple[type, ...]:
    """Every family's spec class, in registration order."""
    return tuple(_SPECS.values())


def build_model(spec, shape: DataShape) -> nn.Module:
    """Build the module for a model spec (any member of models.ModelSpec), then apply its `init`."""
    model = _BUILDERS[spec.kind](spec, shape)
    initialise(model, spec.init)
    return model

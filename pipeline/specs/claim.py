"""Claim specs: a textbook rule of thumb as a group of experiments and the expectations that test it.

A claim file (specs/claims/NAME.yaml) holds the claim in one sentence, a base experiment, its variants (dotted-path
overrides of the base, as in a sweep's space), how many seeds, and what the rule expects of the results, e.g.
"relu beats logistic on test accuracy". The verdict rules themselves live in pipeline/claims/rules.py.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PositiveInt, ValidationError, model_validator

from models.base import StrictModel
from pipeline.specs.errors import UserError
from pipeline.specs.experiment import ExperimentSpec, Slug, parse_spec, read_yaml
from pipeline.specs.sweep import set_path

# How a pair's verdict (better / worse / equivalent / inconclusive) must come out for the expectation to hold.
Expected = Literal["better", "worse", "not_worse", "not_better", "equivalent"]
Side = Literal["above", "below"]


class CompareExpectation(StrictModel):
    rule: Literal["compare"] = Field(description="A paired comparison of two variants on the same seeds.")
    a: Slug = Field(description="Variant A.")
    b: Slug = Field(description="Variant B.")
    measure: str = Field(default="test_metric", description="What is compared (pipeline/claims/measures.py): "
                         "test_metric (the task's main test metric, paired on test examples), test.KEY, "
                         "grad_ratio, max_grad_norm, gap, params, epochs_to:VALUE, ...")
    expect: Expected = Field(description="How A must compare with B: better, worse, not_worse (better or "
                             "equivalent), not_better (worse or equivalent), equivalent.")
    margin: float | None = Field(default=None, gt=0, description="Practical-equivalence margin on the measure "
                                 "(on its log10 scale for a log measure); default: params.yaml's `equivalence` for "
                                 "the test metric, none otherwise.")


class ThresholdExpectation(StrictModel):
    rule: Literal["threshold"] = Field(description="A variant's mean measure against a fixed value.")
    of: Slug = Field(description="The variant.")
    measure: str = Field(description="What is measured (see compare.measure).")
    expect: Side = Field(description="above or below `value`: the whole 95% interval of the mean must lie there.")
    value: float = Field(description="The threshold, in the measure's units.")


class TrendExpectation(StrictModel):
    rule: Literal["trend"] = Field(description="The log-log slope of a measure across variants, e.g. FLOPs against "
                                   "sequence length.")
    variants: list[Slug] = Field(min_length=3, description="The variants, in order of x.")
    x: list[float] = Field(min_length=3, description="The x value of each variant (e.g. sequence length).")
    x_name: str = Field(default="x", min_length=1, description="What x is, for the report (e.g. sequence length).")
    measure: str = Field(description="The measure on the y axis (see compare.measure).")
    low: float | None = Field(default=None, description="The slope's 95% interval must lie at or above this.")
    high: float | None = Field(default=None, description="The slope's 95% interval must lie at or below this.")

    @model_validator(mode="after")
    def _paired(self) -> TrendExpectation:
        if len(self.x) != len(self.variants) or min(self.x) <= 0:
            raise ValueError("x needs one positive value per variant")
        if self.low is None and self.high is None:
            raise ValueError("a trend needs `low`, `high` or both")
        return self


Expectation = Annotated[CompareExpectation | ThresholdExpectation | TrendExpectation, Field(discriminator="rule")]


class ClaimSpec(StrictModel):
    claim: str = Field(min_length=1, description="The textbook claim, in one sentence.")
    setup: str = Field(default="", description="What the experiments do, in a few words (shown in the report).")
    seeds: PositiveInt = Field(default=3, description="Seeds per variant (paired across variants).")
    base: dict[str, Any] = Field(description="The base experiment spec (name, data, task, model, train, ...); the "
                                 "name is set per variant.")
    variants: dict[Slug, dict[str, Any]] = Field(min_length=1, description="Variant name → dotted-path overrides "
                                                 "of the base, e.g. {model.activation: identity}; {} is the base.")
    expect: list[Expectation] = Field(min_length=1, description="What must hold for the claim to be supported: "
                                      "all of them. Any that fails makes it `not supported`.")
    show: list[str] = Field(default_factory=list, description="Measures shown for every variant beside those the "
                            "expectations use, without a verdict (e.g. the test metric's cost of a remedy).")
    quick: dict[str, Any] = Field(default_factory=dict, description="Extra overrides in the quick profile (tests).")


# The quick profile shrinks every budget: two seeds, one epoch, at most this many training examples.
QUICK_SEEDS = 2
QUICK_EPOCHS = 1
QUICK_TRAIN_SUBSET = 256


@dataclass
class Claim:
    """A validated claim with each variant's experiment spec built."""

    name: str
    path: Path
    spec: ClaimSpec
    variants: dict[str, ExperimentSpec]
    seeds: list[int]

    def variant_of(self, name: str) -> ExperimentSpec:
        return self.variants[name]


def _apply(dump: dict, overrides: dict[str, Any], source: Path, where: str) -> dict:
    out = copy.deepcopy(dump)
    for dotted, value in overrides.items():
        try:
            set_path(out, dotted, value)
        except ValueError as err:
            raise UserError(source, f"unknown path: {err}", field=f"{where}[{dotted}]") from None
    return out


def _quick(dump: dict, quick: dict[str, Any], source: Path) -> dict:
    train, data = dump["train"], dump["data"]
    train["epochs"] = min(train["epochs"], QUICK_EPOCHS)
    train["max_steps"] = None
    train["early_stopping"] = None
    data["train_subset"] = min(data.get("train_subset") or QUICK_TRAIN_SUBSET, QUICK_TRAIN_SUBSET)
    return _apply(dump, quick, source, "quick")


def _variant_spec(base: dict, name: str, overrides: dict, source: Path, quick: dict | None) -> ExperimentSpec:
    dump = _apply(base, overrides, source, f"variants.{name}")
    if quick is not None:
        dump = _quick(dump, quick, source)
    dump["name"] = f"{source.stem}-{name}"
    try:
        return parse_spec(dump, source)
    except UserError as err:  # name the variant: the field path alone would point at the base
        raise UserError(source, err.message, field=f"variants.{name}: {err.field}") from None


def _check_names(spec: ClaimSpec, source: Path) -> None:
    for i, e in enumerate(spec.expect):
        used = [e.a, e.b] if isinstance(e, CompareExpectation) else [e.of] if isinstance(e, ThresholdExpectation) \
            else e.variants
        for name in used:
            if name not in spec.variants:
                raise UserError(source, f"unknown variant {name!r} (variants: {', '.join(spec.variants)})",
                                field=f"expect[{i}]")


def load_claim(path: str | Path, quick: bool = False) -> Claim:
    """Load a claim and build every variant's spec; every mistake names the claim file and the field."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        spec = ClaimSpec.model_validate(raw)
    except ValidationError as err:
        e = err.errors(include_url=False)[0]
        field = ".".join(str(p) for p in e["loc"] if p not in ("compare", "threshold", "trend")) or "(top level)"
        raise UserError(path, e["msg"].removeprefix("Value error, "), field=field) from None
    _check_names(spec, path)
    try:
        base = parse_spec({**spec.base, "name": f"{path.stem}-base"}, path).model_dump(mode="json")
    except UserError as err:  # the field lies under `base`
        raise UserError(path, err.message, field=f"base.{err.field}") from None
    variants = {name: _variant_spec(base, name, overrides, path, spec.quick if quick else None)
                for name, overrides in spec.variants.items()}
    first = variants[next(iter(variants))].train.seed
    count = QUICK_SEEDS if quick else spec.seeds
    return Claim(path.stem, path, spec, variants, list(range(first, first + count)))


def claim_paths(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("*.yaml"))


def json_schema() -> dict:
    schema = ClaimSpec.model_json_schema()
    schema["title"] = "archlab claim spec"
    return schema

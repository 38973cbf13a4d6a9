"""Training the claims' experiments: every variant of every claim over its seeds, in one pool of workers.

Each variant's spec is written to claims/CLAIM/VARIANT/spec.yaml (so a run can be retrained or inspected
with `archlab train` like any other), and its seeds train into seed-K/ beside it. A seed already finished and
evaluated for the same spec is skipped, so after a change to one claim only that claim's changed variants train.
All claims share one pool: many small runs keep both cores busy, and each worker pays its imports once.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.claims.measures import known_measure, measure
from pipeline.engine.checks import ensure_prepared
from pipeline.engine.repeats import SeedJob, run_seeds, seed_jobs
from pipeline.io import atomic_write_text
from pipeline.specs.claim import Claim, CompareExpectation, claim_paths, load_claim
from pipeline.specs.errors import UserError
from pipeline.specs.experiment import spec_to_yaml

if TYPE_CHECKING:
    from pipeline.data.prepare import DataMeta

SPEC_FILE = "spec.yaml"


def named_measures(claim: Claim) -> list[tuple[str, str]]:
    """(field, measure) of every measure the claim names: its expectations', then those it shows."""
    named = [(f"expect[{i}].measure", e.measure) for i, e in enumerate(claim.spec.expect)]
    return [*named, *((f"show[{i}]", m) for i, m in enumerate(claim.spec.show))]


def check_measures(claim: Claim) -> None:
    """Every measure a claim names is one the claims know; else a UserError naming the claim's field."""
    for where, name in named_measures(claim):
        problem = known_measure(name)
        if problem:
            raise UserError(claim.path, problem, field=where)
    for i, e in enumerate(claim.spec.expect):
        if isinstance(e, CompareExpectation) and e.a == e.b:
            raise UserError(claim.path, f"compares {e.a!r} with itself", field=f"expect[{i}]")


def load_claims(folder: str | Path, quick: bool = False, only: list[str] | None = None) -> list[Claim]:
    """Every claim in the folder (or those named), validated before anything trains."""
    paths = claim_paths(folder)
    if only:
        known = {p.stem for p in paths}
        missing = [name for name in only if name not in known]
        if missing:
            raise UserError(folder, f"no claim named {', '.join(missing)} (claims: {', '.join(sorted(known))})")
        paths = [p for p in paths if p.stem in only]
    if not paths:
        raise UserError(folder, "no claim files (*.yaml) here")
    claims = [load_claim(p, quick) for p in paths]
    for claim in claims:
        check_measures(claim)
    return claims


def validation_check(claim: Claim) -> Callable[[DataMeta], None]:
    """The check of a variant's data: a claim measured on the validation metric (epochs_to:VALUE) needs data
    with a validation split; refused before the data is prepared or anything trains."""
    from pipeline.data.prepare import has_validation
    needing = [(where, name) for where, name in named_measures(claim) if measure(name).validation]

    def check(meta: DataMeta) -> None:
        if needing and not has_validation(meta):
            where, name = needing[0]
            raise UserError(claim.path, f"{name} is read from the validation metric, but dataset {meta.name!r} "
                            "has no validation split (its split.val_fraction is 0)", field=where)
    return check


def variant_dir(runs: Path, claim: str, variant: str) -> Path:
    return runs / claim / variant


def _write_spec(folder: Path, text: str) -> Path:
    path = folder / SPEC_FILE
    if not path.is_file() or path.read_text() != text:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    return path


def _resolve_warm_start(claim: Claim, spec, runs: Path):
    """A variant that starts from another variant of the same claim (`train.init_from: VARIANT`) reads that
    variant's runs, seed K from seed K."""
    source = spec.train.init_from
    if source is None or str(source) not in claim.variants:
        return spec
    train = spec.train.model_copy(update={"init_from": variant_dir(runs, claim.name, str(source))})
    return spec.model_copy(update={"train": train})


def claim_jobs(claim: Claim, config, data_root: Path, runs: Path, warm: bool) -> tuple[list[SeedJob], int]:
    """(seed jobs still to run, seeds already done) for one claim's variants that start from another variant's
    runs (warm) or for the others; their data is prepared first where missing."""
    jobs, done = [], 0
    for name, spec in claim.variants.items():
        spec = _resolve_warm_start(claim, spec, runs)
        if (spec.train.init_from is not None) != warm:
            continue
        data_dir = data_root / spec.data.dataset
        ensure_prepared(config, spec, data_dir, str(claim.path), check=validation_check(claim))
        folder = variant_dir(runs, claim.name, name)
        spec_path = _write_spec(folder, spec_to_yaml(spec, schema_ref="../../../specs/schema.json"))
        todo, finished = seed_jobs(spec, spec_path, claim.seeds, False, data_dir, folder, None, evaluate=True)
        jobs += todo
        done += len(finished)
    return jobs, done


def train_claims(claims: list[Claim], config, data_root: Path, runs: Path, workers: int | None = None) -> int:
    """Train and evaluate every claim's missing seeds; → how many ran. Variants that start from another
    variant's runs are planned only once those are trained: whether a seed of theirs is done depends on the
    weights it starts from (warm starts record their hash)."""
    # Every variant is checked against its data before anything trains: the first wave's variants as their jobs
    # are planned (all before the pool starts), the warm-started ones here.
    for claim in claims:
        for spec in claim.variants.values():
            if spec.train.init_from is not None:
                ensure_prepared(config, spec, data_root / spec.data.dataset, str(claim.path),
                                check=validation_check(claim))
    ran = 0
    for warm in (False, True):
        jobs, done = [], 0
        for claim in claims:
            todo, finished = claim_jobs(claim, config, data_root, runs, warm)
            jobs, done = jobs + todo, done + finished
        if done:
            print(f"claims: {done} runs already done for their specs, skipped")
        if jobs:
            print(f"claims: training {len(jobs)} runs")
            run_seeds(jobs, workers)
        ran += len(jobs)
    return ran

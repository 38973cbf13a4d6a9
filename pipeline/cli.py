"""`archlab`: each verb parses its arguments, calls one function, and writes outputs.

User mistakes end in `file: field: message` on stderr and exit status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.engine.checks import check_buildable, check_vary, current_meta, dataset_meta, ensure_prepared
from pipeline.engine.tracking import check_store
from pipeline.specs.errors import UserError, refuse_unless_ours

EXIT_USER_ERROR = 2
EXIT_DISK_FULL = 1  # not the user's input: a plain failure status, in one line


# ── shared steps ─────────────────────────────────────────────────────────────
def _config(args):
    from pipeline.specs.config import PARAMS_FILE, load_config
    if args.params is None:  # not given: params.yaml if there is one, else the defaults (outside a project)
        args.params = PARAMS_FILE
    elif not Path(args.params).is_file():  # given: a typo must not fall back to the defaults silently
        raise UserError(args.params, "no such file", field="--params")
    return load_config(args.params)


def _data_dir(args, config, dataset: str) -> Path:
    return Path(args.data) if args.data else config.paths.data / dataset


# ── verbs ────────────────────────────────────────────────────────────────────
def cmd_prepare(args) -> int:
    from pipeline.data.prepare import prepare
    from pipeline.specs.config import dataset_spec
    config = _config(args)
    names = args.datasets or sorted({*config.datasets, *(e.dataset for e in config.experiments.values())})
    if args.out and len(names) != 1:
        raise UserError(None, f"holds one dataset, but {len(names)} would be prepared "
                        f"({', '.join(names)}); name one dataset, or leave out --out", field="--out")
    for name in names:
        out = Path(args.out) if args.out else config.paths.data / name
        # Named, a dataset is prepared again; unnamed (all of them), only where missing or out of date.
        if not args.datasets and current_meta(config, out, name, args.params) is not None:
            print(f"{name}: up to date in {out}")
            continue
        meta = prepare(name, dataset_spec(config, name, args.params), out)
        print(f"{name}: {meta.sizes} input {tuple(meta.input_shape)} → {out}")
    return 0


def cmd_validate(args) -> int:
    from pipeline.data.prepare import shape_from_meta
    from pipeline.specs.experiment import load_spec
    config = _config(args)
    for path in args.specs:
        spec = load_spec(path)
        meta = dataset_meta(config, spec.data.dataset, config.paths.data / spec.data.dataset, path)
        model, out = check_buildable(spec, meta, path)
        shape = shape_from_meta(meta)
        params = sum(p.numel() for p in model.parameters())
        out_shape = tuple(out.shape[1:])
        print(f"{path}: ok — {spec.name}: {spec.model.kind} for {spec.task} on {spec.data.dataset}, "
              f"{params:,} parameters, input {shape.input_shape} → output {out_shape}")
    return 0


def _seeds(args, config, spec) -> list[int]:
    """--seed K, or the seeds params.yaml gives the experiment (its entry, else the project default)."""
    if args.seed is not None:
        if args.seed < 0:
            raise UserError(None, f"--seed must be at least 0, got {args.seed}")
        return [args.seed]
    return config.seed_list(spec.name, base=spec.train.seed)


def torchrun_command(args, seed: int) -> list[str]:
    """`archlab train ... --nproc N` is `torchrun --standalone --nproc-per-node N -m pipeline.cli train ...`."""
    rest = [flag for flag, value in (("--data", args.data), ("--out", args.out)) if value for flag in (flag, value)]
    switches = [flag for flag, on in (("--evaluate", args.evaluate), ("--no-track", args.no_track)) if on]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
            "-m", "pipeline.cli", "--params", args.params, "train", args.spec, "--seed", str(seed), *rest, *switches]


def launch_ranks(args, seed: int) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or "1"}  # the ranks share the cores
    return subprocess.call(torchrun_command(args, seed), env=env)


def train_as_rank(job) -> None:
    """Under torchrun: every rank trains the one seed in this process; rank 0 alone evaluates and reports."""
    from dataclasses import replace

    from pipeline.engine.distributed import is_main_process, stop
    from pipeline.engine.repeats import run_seed
    try:
        run_seed(replace(job, evaluate=job.evaluate and is_main_process()))
    finally:
        stop()  # leave the process group


def cmd_train(args) -> int:
    from pipeline.engine.distributed import is_main_process, launched_by_torchrun
    from pipeline.engine.repeats import run_seeds
    from pipeline.engine.train import mlflow_experiment_name
    from pipeline.specs.config import tracking_uri
    from pipeline.specs.experiment import load_spec
    if args.spec is None:
        return train_every_experiment(args)
    if args.nproc < 1:
        raise UserError(None, f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1 and launched_by_torchrun():
        raise UserError(None, "--nproc: this is already a torchrun rank; use torchrun's --nproc-per-node alone")
    _check_workers(args)
    config = _config(args)
    uri = None if args.no_track else tracking_uri(config, args.params)  # known good before anything is written
    spec = load_spec(args.spec)
    seeds = _seeds(args, config, spec)  # before preparing data: a mistake writes nothing
    check_vary(config, spec, args.params)
    data_parallel = args.nproc > 1 or launched_by_torchrun()
    if data_parallel and len(seeds) != 1:
        raise UserError(None, f"data-parallel training trains one seed at a time, and {spec.name} has seeds "
                        f"{seeds}; add --seed K")
    run_dir = Path(args.out) if args.out else config.paths.runs / spec.name
    check_store(uri)
    _check_run_dir(run_dir, "--out" if args.out else None)
    data_dir = _data_dir(args, config, spec.data.dataset)
    ensure_prepared(config, spec, data_dir, args.spec)  # once, before any rank or worker starts
    if args.nproc > 1:
        return launch_ranks(args, seeds[0])
    jobs = _seed_jobs(args, config, spec, args.spec, seeds, data_dir, run_dir, uri)
    if data_parallel:
        for job in jobs:
            train_as_rank(job)
        if not is_main_process():
            return 0  # rank 0 reports
    else:
        run_seeds(jobs, args.workers, experiments=[mlflow_experiment_name(spec)])
    for seed in seeds:
        print(_seed_line(spec.name, seed, run_dir))
    return 0


def train_every_experiment(args) -> int:
    """`archlab train` without a spec: every experiment in params.yaml over its seeds, into runs/NAME/seed-K/,
    all in one pool of workers. One pool, not one per experiment, so each worker pays its imports once and the
    cores stay busy from the first seed to the last (the pipeline's train stage).

    Experiments that start from another's runs (`train.init_from`) are planned only once the others have trained:
    whether their seeds are done depends on the weights they start from."""
    from pipeline.engine.repeats import run_seeds
    from pipeline.engine.train import mlflow_experiment_name
    from pipeline.specs.config import tracking_uri
    from pipeline.specs.experiment import load_spec
    given = [flag for flag, is_set in (("--data", args.data is not None), ("--out", args.out is not None),
                                       ("--seed", args.seed is not None), ("--restart", args.restart),
                                       ("--nproc", args.nproc != 1)) if is_set]
    if given:
        raise UserError(None, f"{given[0]} applies to one experiment; name its spec, or leave {given[0]} out to "
                        "train every experiment in params.yaml", field=given[0])
    _check_workers(args)
    config = _config(args)
    uri = None if args.no_track else tracking_uri(config, args.params)
    if not config.experiments:
        raise UserError(args.params, "lists no experiments to train; name a spec", field="experiments")
    spec_paths = {name: str(config.paths.specs / f"{name}.yaml") for name in config.experiments}
    specs = {name: load_spec(path) for name, path in spec_paths.items()}  # every spec read before anything runs
    seeds = {name: _seeds(args, config, spec) for name, spec in specs.items()}
    for spec in specs.values():
        check_vary(config, spec, args.params)
    check_store(uri)
    data_dirs = {name: config.paths.data / config.experiments[name].dataset for name in specs}
    for name, spec in specs.items():  # every model checked against its data before any seed trains
        _check_run_dir(config.paths.runs / name, None)
        ensure_prepared(config, spec, data_dirs[name], spec_paths[name])
    tracked_in = [mlflow_experiment_name(spec) for spec in specs.values()]
    for warm in (False, True):
        jobs = []
        for name, spec in specs.items():
            if (spec.train.init_from is not None) == warm:
                jobs += _seed_jobs(args, config, spec, spec_paths[name], seeds[name], data_dirs[name],
                                   config.paths.runs / name, uri)
        run_seeds(jobs, args.workers, experiments=tracked_in)
    for name in specs:
        for seed in seeds[name]:
            print(_seed_line(name, seed, config.paths.runs / name))
    return 0


def _check_workers(args) -> None:
    if args.workers is not None and args.workers < 1:
        raise UserError(None, f"--workers must be at least 1, got {args.workers}")


def _check_run_dir(run_dir: Path, field: str | None) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(run_dir, "is a file; a run needs a folder", field=field)


def _seed_jobs(args, config, spec, spec_path: str, seeds: list[int], data_dir: Path, run_dir: Path,
               uri: str | None) -> list:
    """The experiment's seeds still to train; says which are already done for this spec."""
    from pipeline.engine.repeats import seed_jobs
    jobs, done = seed_jobs(spec, spec_path, seeds, config.vary_of(spec.name) == "split", data_dir, run_dir, uri,
                           args.evaluate, restart=args.restart)
    if done:
        print(f"{spec.name}: seeds {done} already done for this spec, skipped")
    return jobs


def _seed_line(name: str, seed: int, run_dir: Path) -> str:
    from pipeline.engine.checkpoints import seed_dir
    from pipeline.engine.runfiles import Evaluation, RunMetrics, path_of, read_run_file
    folder = seed_dir(run_dir, seed)
    metrics = read_run_file(folder, RunMetrics)
    metric = metrics.main_metric
    final = metrics.final.get(f"val/{metric}")
    test = read_run_file(folder, Evaluation).test if path_of(folder, Evaluation).is_file() else {}
    shown = f", test/{metric}={round(test[metric], 4)}" if isinstance(test.get(metric), float) else ""
    validated = any(key.startswith("val/") for key in metrics.final) or not metrics.final
    val = f"val/{metric}={final if final is None else round(final, 4)}" if validated else "no validation split"
    return (f"{name} seed {seed}: {metrics.status} after {metrics.epochs} epochs, {val}{shown}, "
            f"{metrics.train_time_s:.1f}s → {folder}")


def cmd_evaluate(args) -> int:
    from pipeline.engine.checkpoints import seed_dir
    from pipeline.engine.evaluate import evaluate_run
    from pipeline.engine.repeats import seed_spec
    from pipeline.specs.config import tracking_uri
    from pipeline.specs.experiment import load_spec
    config = _config(args)
    uri = None if args.no_track else tracking_uri(config, args.params)  # known good before anything is written
    spec = load_spec(args.spec)
    run_dir = Path(args.run) if args.run else config.paths.runs / spec.name
    seeds = _seeds(args, config, spec)
    for seed in seeds:  # before preparing data: a mistake writes nothing
        if not (seed_dir(run_dir, seed) / "checkpoint.pt").is_file():
            raise UserError(seed_dir(run_dir, seed), "no checkpoint.pt; run `archlab train` first")
    check_store(uri)
    data = ensure_prepared(config, spec, _data_dir(args, config, spec.data.dataset), args.spec)
    vary_split = config.vary_of(spec.name) == "split"
    for seed in seeds:
        result = evaluate_run(seed_spec(spec, seed, vary_split), data, seed_dir(run_dir, seed), uri)
        scalars = {k: round(v, 4) for k, v in result["test"].items() if isinstance(v, float)}
        print(f"{spec.name} seed {seed}: test {scalars}")
    return 0


def cmd_compare(args) -> int:
    from pipeline.reports.compare import compare
    from pipeline.specs.config import tracking_uri
    config = _config(args)
    uri = None if args.no_track else tracking_uri(config, args.params)  # known good before anything is written
    names = args.experiments or list(config.experiments)
    runs = Path(args.runs) if args.runs else config.paths.runs
    out = Path(args.out) if args.out else config.paths.reports
    seeds = {name: config.seed_list(name, base=_base_seed(config, name)) for name in names}
    check_store(uri)
    table = compare(names, runs, out, uri, seeds=seeds, declared=config.comparisons, margins=config.equivalence,
                    source=args.params)
    print(f"compared {len(table)} experiments → {out}")
    return 0


def _base_seed(config, name: str) -> int:
    """The spec's train.seed, where the experiment's first seed starts (0 for runs without a spec here)."""
    from pipeline.specs.experiment import load_spec
    path = config.paths.specs / f"{name}.yaml"
    return load_spec(path).train.seed if path.is_file() else 0


def cmd_schema(args) -> int:
    from pipeline.engine.runfiles import run_file_schemas
    from pipeline.specs.schema import write_schemas
    config = _config(args)
    # The run files' schemas come from the engine (specs/ may not import it): written beside the specs' ones.
    for path in write_schemas(Path(args.out) if args.out else config.paths.specs, run_file_schemas()):
        print(f"wrote {path}")
    return 0


def cmd_sweep(args) -> int:
    from pipeline.specs.config import tracking_uri
    from pipeline.specs.sweep import load_sweep
    from pipeline.sweeps.report import REPORT_KIND
    from pipeline.sweeps.storage import default_storage_url
    from pipeline.sweeps.study import require_validation, run_sweep
    config = _config(args)
    uri = None if args.no_track else tracking_uri(config, args.params)  # known good before anything is written
    if args.workers < 1:
        raise UserError(None, f"--workers must be at least 1, got {args.workers}")
    sweep = load_sweep(args.sweep, config.paths.specs)
    report_dir = Path(args.out) if args.out else config.paths.reports / "sweeps" / sweep.name
    refuse_unless_ours(report_dir, REPORT_KIND)  # before the data is prepared: a refusal writes nothing
    check_store(uri)
    first = next(iter(sweep.bases))
    data_dir = _data_dir(args, config, sweep.dataset)
    ensure_prepared(config, sweep.bases[first], data_dir, str(sweep.base_paths[first]),
                    check=lambda meta: require_validation(sweep, meta))
    if args.write_inputs:
        from pipeline.data.prepare import load_prepared
        from pipeline.io import atomic_write_json
        from pipeline.sweeps.study import sweep_inputs
        atomic_write_json(Path(args.write_inputs), sweep_inputs(sweep, load_prepared(data_dir).meta))
        print(f"{sweep.name}: inputs → {args.write_inputs}")
        return 0
    storage = args.storage or default_storage_url(config.paths.sweeps, sweep.name)
    result = run_sweep(sweep, data_dir, config.paths.runs / "sweeps" / sweep.name, report_dir, storage,
                       workers=args.workers, tracking_uri=uri,
                       specs_dir=config.paths.specs)
    if result.recovered:
        print(f"requeued trials left running by a stopped worker: {result.recovered}")
    best = result.best
    metric = sweep.spec.objective.metric
    shown = (f", best {best['candidate']} (trial {best['trial']}, {metric} {best[f'best/{metric}']:.4g})"
             if "trial" in best else "")
    print(f"{sweep.name}: study {result.study_name}, {result.trials} trials ({result.ran} new){shown} → {report_dir}")
    print(f"best trial per architecture ({metric}):\n{result.per_architecture}")
    if not result.complete:
        print(f"archlab: the budget of {sweep.name} is not spent yet (a worker died); rerun the same command to "
              "finish it", file=sys.stderr)
        return 1
    return 0


def cmd_claims(args) -> int:
    from pipeline.claims.report import CLAIMS_CSV, log_claims, write_claims_report
    from pipeline.claims.run import load_claims, train_claims
    from pipeline.claims.verdicts import judge_claim
    from pipeline.specs.config import tracking_uri
    config = _config(args)
    out = Path(args.out) if args.out else config.paths.reports
    if args.readme:
        return _claims_readme(Path(args.readme), out / CLAIMS_CSV)
    if args.workers is not None and args.workers < 1:
        raise UserError(None, f"--workers must be at least 1, got {args.workers}")
    uri = None if args.no_track else tracking_uri(config, args.params)  # known good before anything is written
    claims = load_claims(Path(args.claims) if args.claims else config.paths.specs / "claims", args.quick, args.only)
    runs = Path(args.runs) if args.runs else config.paths.claims
    check_store(uri)
    train_claims(claims, config, Path(args.data) if args.data else config.paths.data, runs, args.workers)
    results = [judge_claim(claim, runs, config.equivalence) for claim in claims]
    write_claims_report(results, out)
    if uri:
        log_claims(uri, results)
    for r in results:
        print(f"{r.claim.name}: {r.verdict}  ({r.deciding.text}: {r.deciding.outcome})")
    return 0


def _claims_readme(readme: Path, csv: Path) -> int:
    import pandas as pd

    from pipeline.claims.report import update_readme
    if not csv.is_file():
        raise UserError(csv, "not found; run `archlab claims` first", field="--readme")
    if not readme.is_file():
        raise UserError(readme, "no such file", field="--readme")
    changed = update_readme(readme, pd.read_csv(csv))
    print(f"{readme}: claims list {'updated' if changed else 'already current'}")
    return 0


def cmd_ui(args) -> int:
    from pipeline.specs.config import tracking_uri
    from pipeline.ui import run_ui
    return run_ui(tracking_uri(_config(args)), port=args.port)


# ── argument parsing ─────────────────────────────────────────────────────────
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="archlab", description="Spec-driven experiments for deep neural networks.")
    parser.add_argument("--params", help="project settings (default: params.yaml, if there is one)")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("prepare", help="prepare datasets into data/prepared/NAME/")
    p.add_argument("datasets", nargs="*", help="dataset names, prepared again (default: every one params.yaml uses, "
                                               "where missing or prepared from other settings than params.yaml's)")
    p.add_argument("--out", help="output folder (one dataset only)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("validate", help="validate specs and build their models without training")
    p.add_argument("specs", nargs="+", help="spec files")
    p.set_defaults(func=cmd_validate)

    _add_train(sub)

    p = sub.add_parser("evaluate", help="evaluate an experiment's trained seeds on the test split")
    p.add_argument("spec", help="spec file")
    p.add_argument("--data", help="prepared dataset folder")
    p.add_argument("--run", help="run folder (default: runs/NAME)")
    p.add_argument("--seed", type=int, help="evaluate this seed only (default: the seeds params.yaml gives)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="write the comparison reports")
    p.add_argument("experiments", nargs="*", help="experiment names (default: params.yaml's experiments)")
    p.add_argument("--runs", help="runs folder")
    p.add_argument("--out", help="reports folder")
    p.add_argument("--no-track", action="store_true", help="do not log the report to MLflow")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("schema", help="write the JSON schemas of specs (for editors) and of the run files")
    p.add_argument("--out", help="folder (default: specs/)")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("sweep", help="search architectures and hyperparameters with Optuna (resumes the study)")
    p.add_argument("sweep", help="sweep spec, e.g. specs/sweeps/mnist1d_arch.yaml")
    p.add_argument("--workers", type=int, default=1, help="worker processes sharing the study and the cores")
    p.add_argument("--storage", help="Optuna storage: an RDB URL (sqlite:///x.db, postgresql://...) or a journal "
                                     "file path (default: sweeps/NAME.journal)")
    p.add_argument("--data", help="prepared dataset folder (default: data/prepared/DATASET, prepared if missing)")
    p.add_argument("--out", help="report folder (default: reports/sweeps/NAME)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--write-inputs", metavar="FILE", help="only write the content hashes of what the sweep reads "
                                                          "(its spec, its candidates' specs, its data) to FILE")
    p.set_defaults(func=cmd_sweep)

    _add_claims(sub)

    p = sub.add_parser("ui", help="open the MLflow UI on 127.0.0.1, light on memory")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
    return parser


def _add_claims(sub) -> None:
    p = sub.add_parser("claims", help="run the textbook claims (specs/claims/) and write their verdicts")
    p.add_argument("only", nargs="*", help="claim names (default: every claim)")
    p.add_argument("--claims", help="folder of claim files (default: specs/claims)")
    p.add_argument("--data", help="prepared datasets' folder (default: data/prepared; prepared where missing)")
    p.add_argument("--runs", help="the claims' runs folder (default: claims/)")
    p.add_argument("--out", help="reports folder (default: reports)")
    p.add_argument("--workers", type=int, help="runs trained side by side (default: one per core)")
    p.add_argument("--quick", action="store_true", help="the quick profile: every budget shrunk (for tests)")
    p.add_argument("--no-track", action="store_true", help="do not log the verdicts to MLflow")
    p.add_argument("--readme", metavar="FILE", help="only rewrite the claims list in FILE (between its markers) "
                                                    "from the reports folder's claims.csv")
    p.set_defaults(func=cmd_claims)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train an experiment over its seeds, each into runs/NAME/seed-K/ (resumes "
                                     "interrupted seeds, skips finished ones); without a spec, every experiment "
                                     "in params.yaml, side by side in one pool of workers")
    p.add_argument("spec", nargs="?", help="spec file, e.g. specs/digits_mlp.yaml (default: every experiment "
                                           "params.yaml lists)")
    p.add_argument("--data", help="prepared dataset folder (default: data/prepared/DATASET, prepared if missing)")
    p.add_argument("--out", help="run folder (default: runs/NAME)")
    p.add_argument("--seed", type=int, help="train this seed only (default: the seeds params.yaml gives)")
    p.add_argument("--workers", type=int, help="seeds trained side by side (default: one per core)")
    p.add_argument("--evaluate", action="store_true", help="evaluate each seed on the test split after training")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (runs torchrun; "
                                                       "several machines: torchrun -m pipeline.cli train ...)")
    p.add_argument("--restart", action="store_true", help="set the run's checkpoint aside (renamed, kept) and "
                   "train afresh, e.g. after a corrupt checkpoint")
    p.set_defaults(func=cmd_train)


def main(argv: list[str] | None = None) -> int:
    from pipeline.engine.distributed import launched_by_torchrun
    args = build_parser().parse_args(argv)
    try:
        if args.verb != "train" and launched_by_torchrun():
            raise UserError(None, f"only `archlab train` runs under torchrun; run `archlab {args.verb}` as one process")
        return args.func(args)
    except UserError as err:
        print(f"archlab: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("archlab: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        # Every file is written atomically: what was there before (the last good checkpoint) is still whole.
        print(f"archlab: error: {err.filename or 'a file'}: the disk is full; nothing was half-written and the "
              "files from before (the last checkpoint) are kept: free some space and rerun to resume", file=sys.stderr)
        return EXIT_DISK_FULL


if __name__ == "__main__":
    sys.exit(main())

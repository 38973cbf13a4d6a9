"""`archlab`: each verb parses its arguments, calls one function, and writes outputs.

User mistakes end in `file: field: message` on stderr and exit status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from pipeline.engine.checks import check_buildable, dataset_meta, ensure_prepared
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
    from pipeline.specs.config import dataset_spec
    from pipeline.data.prepare import prepare
    config = _config(args)
    names = args.datasets or sorted({*config.datasets, *config.experiments.values()})
    if args.out and len(names) != 1:
        raise UserError(None, f"holds one dataset, but {len(names)} would be prepared "
                        f"({', '.join(names)}); name one dataset, or leave out --out", field="--out")
    for name in names:
        out = Path(args.out) if args.out else config.paths.data / name
        meta = prepare(name, dataset_spec(config, name, args.params), out)
        print(f"{name}: {meta['sizes']} input {tuple(meta['input_shape'])} → {out}")
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
        out_shape = tuple(out.shape[1:]) if hasattr(out, "shape") else "(see model)"
        print(f"{path}: ok — {spec.name}: {spec.model.kind} for {spec.task} on {spec.data.dataset}, "
              f"{params:,} parameters, input {shape.input_shape} → output {out_shape}")
    return 0


def cmd_train(args) -> int:
    from pipeline.specs.config import tracking_uri
    from pipeline.specs.experiment import load_spec
    from pipeline.engine.train import train_experiment
    config = _config(args)
    uri = None if args.no_track else tracking_uri(config, args.params)  # known good before anything is written
    spec = load_spec(args.spec)
    run_dir = Path(args.out) if args.out else config.paths.runs / spec.name
    if run_dir.exists() and not run_dir.is_dir():  # before preparing data: a mistake writes nothing
        raise UserError(run_dir, "is a file; a run needs a folder", field="--out")
    check_store(uri)
    data = ensure_prepared(config, spec, _data_dir(args, config, spec.data.dataset), args.spec)
    metrics = train_experiment(spec, args.spec, data, run_dir, uri, restart=args.restart)
    final = metrics["final"].get(f"val/{metrics['main_metric']}")
    print(f"{spec.name}: {metrics['status']} after {metrics['epochs']} epochs, val/{metrics['main_metric']}="
          f"{final if final is None else round(final, 4)}, {metrics['train_time_s']:.1f}s → {run_dir}")
    return 0


def cmd_evaluate(args) -> int:
    from pipeline.specs.config import tracking_uri
    from pipeline.engine.evaluate import evaluate_run
    from pipeline.specs.experiment import load_spec
    config = _config(args)
    uri = None if args.no_track else tracking_uri(config, args.params)  # known good before anything is written
    spec = load_spec(args.spec)
    run_dir = Path(args.run) if args.run else config.paths.runs / spec.name
    if not (run_dir / "checkpoint.pt").is_file():  # before preparing data: a mistake writes nothing
        raise UserError(run_dir, "no checkpoint.pt; run `archlab train` first")
    check_store(uri)
    data = ensure_prepared(config, spec, _data_dir(args, config, spec.data.dataset), args.spec)
    result = evaluate_run(spec, data, run_dir, uri)
    scalars = {k: round(v, 4) for k, v in result["test"].items() if isinstance(v, float)}
    print(f"{spec.name}: test {scalars}")
    return 0


def cmd_compare(args) -> int:
    from pipeline.reports.compare import compare
    from pipeline.specs.config import tracking_uri
    config = _config(args)
    uri = None if args.no_track else tracking_uri(config, args.params)  # known good before anything is written
    names = args.experiments or list(config.experiments)
    runs = Path(args.runs) if args.runs else config.paths.runs
    out = Path(args.out) if args.out else config.paths.reports
    check_store(uri)
    table = compare(names, runs, out, uri)
    print(f"compared {len(table)} experiments → {out}")
    return 0


def cmd_schema(args) -> int:
    from pipeline.specs.schema import write_schemas
    config = _config(args)
    for path in write_schemas(Path(args.out) if args.out else config.paths.specs):
        print(f"wrote {path}")
    return 0


def cmd_sweep(args) -> int:
    from pipeline.specs.config import tracking_uri
    from pipeline.sweeps.report import REPORT_KIND
    from pipeline.sweeps.study import default_storage_url, run_sweep
    from pipeline.specs.sweep import load_sweep
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
    ensure_prepared(config, sweep.bases[first], data_dir, str(sweep.base_paths[first]))
    storage = args.storage or default_storage_url(config.paths.sweeps, sweep.name)
    result = run_sweep(sweep, data_dir, config.paths.runs / "sweeps" / sweep.name, report_dir, storage,
                       workers=args.workers, tracking_uri=uri,
                       specs_dir=config.paths.specs)
    if result.recovered:
        print(f"requeued trials left running by a stopped worker: {result.recovered}")
    best = result.best
    shown = f", best {best['candidate']} (trial {best['trial']})" if "trial" in best else ""
    print(f"{sweep.name}: study {result.study_name}, {result.trials} trials ({result.ran} new){shown} → {report_dir}")
    if not result.complete:
        print(f"archlab: the budget of {sweep.name} is not spent yet (a worker died); rerun the same command to "
              "finish it", file=sys.stderr)
        return 1
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
    p.add_argument("datasets", nargs="*", help="dataset names (default: every one params.yaml uses)")
    p.add_argument("--out", help="output folder (one dataset only)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("validate", help="validate specs and build their models without training")
    p.add_argument("specs", nargs="+", help="spec files")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="train one experiment (resumes an interrupted run)")
    p.add_argument("spec", help="spec file, e.g. specs/digits_mlp.yaml")
    p.add_argument("--data", help="prepared dataset folder (default: data/prepared/DATASET, prepared if missing)")
    p.add_argument("--out", help="run folder (default: runs/NAME)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--restart", action="store_true", help="set the run's checkpoint aside (renamed, kept) and "
                   "train afresh, e.g. after a corrupt checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a trained run on the test split")
    p.add_argument("spec", help="spec file")
    p.add_argument("--data", help="prepared dataset folder")
    p.add_argument("--run", help="run folder (default: runs/NAME)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="write the comparison reports")
    p.add_argument("experiments", nargs="*", help="experiment names (default: params.yaml's experiments)")
    p.add_argument("--runs", help="runs folder")
    p.add_argument("--out", help="reports folder")
    p.add_argument("--no-track", action="store_true", help="do not log the report to MLflow")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("schema", help="write the JSON schemas of specs for editors")
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
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("ui", help="open the MLflow UI on 127.0.0.1, light on memory")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
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

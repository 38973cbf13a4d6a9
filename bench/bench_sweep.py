"""Sweep efficiency: what pruning saves, what a second worker buys, and which local storage holds up.

Three measurements, each in a fresh temporary project (MNIST-1D prepared there, MLflow in a temporary
SQLite store, as `dvc repro` would track):

  pruning   the default sweep (specs/sweeps/mnist1d_arch.yaml) at a fixed number of trials, with its
            median pruner and with `pruner: none`, same seed: wall time, best value, trials pruned, the
            candidates left without a finished trial; then the median pruner, scope candidate and scope
            study, on exactly the trials `none` trained (pruning changes what TPE proposes next)
  workers   the same sweep without pruning on 1 worker (torch's default threads), on 1 worker with one
            thread (the share each of two workers gets on 2 cores: twice its rate is the most two workers
            can reach), and on 2 workers: trials per minute and the ratio to 1 worker, failed trials,
            storage errors
  storage   K processes hammering one study with empty trials (ask, 3 suggestions, 10 reports with
            a pruning check, tell): trials per second and storage errors, SQLite against a journal file

    python bench/bench_sweep.py                          # all three, 12 trials of 6 epochs
    python bench/bench_sweep.py --only storage --stress-procs 2 4
    python bench/bench_sweep.py --trials 16 --epochs 8 --only pruning

Results go to stdout as a table and, with --json FILE, as JSON. The machine is shared: repeat and
compare within one invocation only.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_project(root: Path) -> Path:
    """A project in `root`: the repo's specs and params, MNIST-1D prepared there."""
    import shutil

    from pipeline.cli import main
    shutil.copytree(REPO / "specs", root / "specs")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(["prepare", "mnist1d"])
    finally:
        os.chdir(cwd)
    return root


def sweep_variant(root: Path, name: str, trials: int, epochs: int, pruner: str, candidates: list[str] | None,
                  scope: str | None = None) -> Path:
    raw = yaml.safe_load((REPO / "specs/sweeps/mnist1d_arch.yaml").read_text())
    raw["name"] = name
    raw["budget"] = {"trials": trials, "epochs": epochs}
    raw["pruner"]["name"] = pruner
    if scope:
        raw["pruner"]["scope"] = scope
    if candidates:
        raw["candidates"] = {k: v for k, v in raw["candidates"].items() if k in candidates}
    path = root / "specs" / "sweeps" / f"{name}.yaml"
    path.write_text("# yaml-language-server: $schema=schema.json\n" + yaml.safe_dump(raw, sort_keys=False))
    return path


def run_variant(root: Path, path: Path, workers: int, storage: str, replay: list[dict] | None = None) -> dict:
    """One sweep, timed; counts of trial states and storage errors from the study. `replay`: trials' parameters
    queued before it starts, so that it trains exactly those (the sampler is not asked)."""
    import optuna
    from optuna.trial import TrialState

    from pipeline.specs.sweep import load_sweep
    from pipeline.sweeps.storage import default_storage_url, open_storage
    from pipeline.sweeps.study import open_study, run_sweep
    cwd = os.getcwd()
    os.chdir(root)
    try:
        sweep = load_sweep(path, "specs")
        url = default_storage_url("sweeps", sweep.name) if storage == "journal" else f"sqlite:///sweeps/{sweep.name}.db"
        if replay:
            study = open_study(sweep, url, sweep.spec.seed)
            for params in replay:
                study.enqueue_trial(params)
        start = time.perf_counter()
        error = None
        try:
            run_sweep(sweep, Path("data/prepared/mnist1d"), Path("runs/sweeps") / sweep.name,
                      Path("reports/sweeps") / sweep.name, url, workers=workers, tracking_uri="sqlite:///mlflow.db")
        except Exception as err:  # noqa: BLE001 - a bench reports failures, it does not stop on them
            error = f"{type(err).__name__}: {err}"
        wall = time.perf_counter() - start
        study = optuna.load_study(study_name=sweep.study_name, storage=open_storage(url))
        trials = study.get_trials()
        states = [t.state for t in trials]
        reasons = [t.user_attrs.get("fail_reason", "") for t in trials if t.state == TrialState.FAIL]
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = max((t.values[0] for t in complete), default=float("nan"))
        # From the first trial's start to the last one's end: the sweep's own start (checks, the MLflow parent
        # run) and its report are left out, so this is the rate at which the workers get trials done.
        ends = [(t.datetime_start, t.datetime_complete) for t in trials if t.datetime_complete]
        span = (max(e for _, e in ends) - min(s for s, _ in ends)).total_seconds() if ends else float("nan")
        # Candidates the sweep tried but never finished a trial of: its report ranks them on nothing.
        unfinished = {t.params.get("candidate") for t in trials} - {t.params.get("candidate") for t in complete}
        return {"params": [t.params for t in trials], "wall_s": round(wall, 1), "trials": len(trials),
                "unfinished": ",".join(sorted(unfinished)) or "-", "complete": states.count(TrialState.COMPLETE),
                "pruned": states.count(TrialState.PRUNED), "failed": states.count(TrialState.FAIL),
                "storage_errors": sum(("locked" in r or "OperationalError" in r or "storage" in r.lower())
                                      for r in reasons),
                "best": round(best, 4), "trials_per_min": round(len(trials) / wall * 60, 2),
                "trial_span_s": round(span, 1), "trials_per_min_working": round(len(ends) / span * 60, 2),
                "error": error}
    finally:
        os.chdir(cwd)


# ── storage stress: empty trials, many processes ─────────────────────────────
def _hammer(url: str, study_name: str, trials: int, steps: int, out) -> None:
    import optuna

    from pipeline.sweeps.storage import open_storage
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    errors, done, first_error = 0, 0, ""
    study = optuna.load_study(study_name=study_name, storage=open_storage(url),
                              pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    for _ in range(trials):
        try:
            trial = study.ask()
            x = trial.suggest_float("x", 1e-4, 1.0, log=True)
            trial.suggest_int("n", 1, 8)
            trial.suggest_categorical("c", ["a", "b"])
            for step in range(1, steps + 1):
                trial.report(x * step, step)
                trial.should_prune()
            study.tell(trial, x)
            done += 1
        except Exception as err:  # noqa: BLE001 - counted: this is what the measurement is about
            errors += 1
            first_error = first_error or f"{type(err).__name__}: {err}"[:200]
    out.put({"done": done, "errors": errors, "first_error": first_error})


def stress_storage(kind: str, procs: int, trials: int, steps: int, folder: Path) -> dict:
    url = str(folder / f"stress-{procs}.journal") if kind == "journal" else f"sqlite:///{folder}/stress-{procs}.db"
    return {"storage": kind, **stress_url(url, procs, trials, steps)}


def stress_url(url: str, procs: int, trials: int, steps: int) -> dict:
    """`procs` processes each run `trials` empty trials on one new study in `url`."""
    import optuna

    from pipeline.sweeps.storage import open_storage
    optuna.create_study(study_name="stress", storage=open_storage(url), direction="maximize")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_hammer, args=(url, "stress", trials, steps, queue)) for _ in range(procs)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    results = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name="stress", storage=open_storage(url))
    stored = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
    return {"procs": procs, "wall_s": round(wall, 1), "trials_done": sum(r["done"] for r in results),
            "trials_stored": stored, "errors": sum(r["errors"] for r in results),
            "trials_per_s": round(stored / wall, 1),
            "first_error": next((r["first_error"] for r in results if r["first_error"]), "")}


def show(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["pruning", "workers", "storage"], nargs="+",
                        default=["pruning", "workers", "storage"])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--candidates", nargs="*", help="subset of the default sweep's candidates")
    parser.add_argument("--storage", choices=["journal", "sqlite"], default="journal",
                        help="storage of the pruning and workers sweeps")
    parser.add_argument("--stress-procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--stress-trials", type=int, default=100)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results: dict[str, list[dict]] = {}
    load = os.getloadavg()
    print(f"cores: {len(os.sched_getaffinity(0))}, load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        root = make_project(Path(tmp))
        # Untimed: the first sweep in a process pays its imports and the MLflow store's creation (about 4 s),
        # which would otherwise fall on whichever row runs first.
        run_variant(root, sweep_variant(root, "warm_up", 1, 1, "none", ["mlp"]), 1, args.storage)
        columns = ["variant", "wall_s", "trials", "complete", "pruned", "failed", "storage_errors", "best",
                   "trials_per_min", "error"]
        if "pruning" in args.only:
            rows = []
            for pruner in ("median", "none"):
                path = sweep_variant(root, f"prune_{pruner}", args.trials, args.epochs, pruner, args.candidates)
                rows.append({"variant": f"pruner={pruner}", **run_variant(root, path, 1, args.storage)})
            # Pruned trials change what TPE proposes next, so the two sweeps above train other trials. Here
            # the median pruner cuts short exactly the trials the unpruned sweep trained: its own effect.
            # And with scope: study (each trial against every other, not only its own candidate's).
            for scope in ("candidate", "study"):
                path = sweep_variant(root, f"prune_median_same_{scope}", args.trials, args.epochs, "median",
                                     args.candidates, scope)
                rows.append({"variant": f"pruner=median, scope {scope}, none's trials",
                             **run_variant(root, path, 1, args.storage, replay=rows[1]["params"])})
            for row in rows:
                row["saved"] = f"{1 - row['wall_s'] / rows[1]['wall_s']:.0%}"
            print(f"pruning: {args.trials} trials of {args.epochs} epochs; saved: wall time against pruner=none")
            show(rows, [*columns[:-1], "saved", "unfinished", "error"])
            results["pruning"] = rows
        if "workers" in args.only:
            import torch
            # The sampler proposes other trials to two workers than to one (each worker seeds its own, and
            # running trials are guessed at), and trials differ in cost tenfold (an MLP against a Transformer):
            # so one untimed sweep samples the trials, and every row below trains exactly those.
            reference = run_variant(root, sweep_variant(root, "workers_sampled", args.trials, args.epochs, "none",
                                                        args.candidates), 1, args.storage)
            rows = []
            # workers=1 keeps torch's default threads (all cores); 1 worker × 1 thread is what each of two
            # workers gets on 2 cores, so twice its rate is what two workers could reach at best.
            for workers, threads in ((1, None), (1, 1), (2, None)):
                name = f"workers_{workers}" + (f"_{threads}t" if threads else "")
                path = sweep_variant(root, name, args.trials, args.epochs, "none", args.candidates)
                before = torch.get_num_threads()
                torch.set_num_threads(threads or before)
                row = run_variant(root, path, workers, args.storage, replay=reference["params"])
                torch.set_num_threads(before)
                rows.append({"variant": f"workers={workers}" + (f", {threads} thread" if threads else ""), **row})
            for row in rows:
                row["vs_1_worker"] = f"{row['trials_per_min'] / rows[0]['trials_per_min']:.2f}x"
                row["working_vs_1"] = f"{row['trials_per_min_working'] / rows[0]['trials_per_min_working']:.2f}x"
            ceiling = 2 * rows[1]["trials_per_min_working"] / rows[0]["trials_per_min_working"]
            print(f"workers: the same {args.trials} trials of {args.epochs} epochs in each row (sampled once by "
                  f"TPE), no pruning, storage {args.storage}; trials_per_min counts the whole call, _working from "
                  f"the first trial's start to the last one's end; at best two workers reach {ceiling:.2f}x "
                  f"(twice the one-thread working rate)")
            show(rows, [*columns[:-2], "trials_per_min", "vs_1_worker", "trial_span_s", "trials_per_min_working",
                        "working_vs_1", "error"])
            results["workers"] = rows
        if "storage" in args.only:
            rows = []
            for procs in args.stress_procs:
                for kind in ("sqlite", "journal"):
                    try:
                        rows.append(stress_storage(kind, procs, args.stress_trials, 10, root))
                    except Exception:  # noqa: BLE001
                        rows.append({"storage": kind, "procs": procs, "first_error": traceback.format_exc(limit=1)})
            print(f"storage stress: each process runs {args.stress_trials} empty trials (3 suggestions, 10 reports)")
            show(rows, ["storage", "procs", "wall_s", "trials_done", "trials_stored", "errors", "trials_per_s",
                        "first_error"])
            results["storage"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

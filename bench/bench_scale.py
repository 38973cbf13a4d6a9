"""Scaling out: sweep workers on PostgreSQL against the journal file, and data-parallel training against one process.

Three measurements, in a fresh temporary project (MNIST-1D prepared there) and a throwaway PostgreSQL server
(tests/pg.py: initdb + pg_ctl in a temporary folder, on a free loopback port):

  sweep     a small sweep (the default sweep's MLP only, no pruning, no MLflow) with 1, 2 and 4 workers, its
            study in a journal file and in PostgreSQL: trials per minute, failed trials, storage errors, budget
  storage   K processes hammering one study with empty trials (bench_sweep.py's stress): trials per second and
            storage errors, PostgreSQL against the journal file
  ddp       `archlab train SPEC` on 1 process (1 thread, then every core) and with `--nproc 2` (torchrun, gloo,
            1 thread per rank): training time per optimisation step, from metrics.json (no start-up counted)

    python bench/bench_scale.py                                    # everything, 12 trials of 2 epochs
    python bench/bench_scale.py --only ddp --ddp-specs mnist1d_cnn
    python bench/bench_scale.py --only sweep --trials 8 --workers 1 2

The machine is shared: compare within one invocation only, and read the load average printed first.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_sweep import make_project, show, stress_url, sweep_variant  # noqa: E402
from pipeline.engine.runfiles import RunMetrics, read_run_file


def run_sweep_variant(root: Path, path: Path, workers: int, url: str) -> dict:
    """One sweep into storage `url`, timed; trial states, storage errors and the budget from the study."""
    import optuna
    from optuna.trial import TrialState

    from pipeline.specs.sweep import load_sweep
    from pipeline.sweeps.storage import open_storage, trials_used
    from pipeline.sweeps.study import run_sweep
    cwd = os.getcwd()
    os.chdir(root)
    try:
        sweep = load_sweep(path, "specs")
        start, error = time.perf_counter(), ""
        try:
            run_sweep(sweep, Path("data/prepared/mnist1d"), Path("runs/sweeps") / sweep.name,
                      Path("reports/sweeps") / sweep.name, url, workers=workers, tracking_uri=None)
        except Exception as err:  # noqa: BLE001 - a bench reports failures, it does not stop on them
            error = f"{type(err).__name__}: {err}"[:120]
        wall = time.perf_counter() - start
        study = optuna.load_study(study_name=sweep.study_name, storage=open_storage(url))
        trials = study.get_trials()
        reasons = [t.user_attrs.get("fail_reason", "") for t in trials if t.state == TrialState.FAIL]
        return {"wall_s": round(wall, 1), "trials": len(trials), "budget_used": trials_used(study),
                "complete": sum(t.state == TrialState.COMPLETE for t in trials), "failed": len(reasons),
                "storage_errors": sum(("OperationalError" in r or "storage" in r.lower() or "lock" in r)
                                      for r in reasons) + bool(error),
                "trials_per_min": round(len(trials) / wall * 60, 1), "error": error}
    finally:
        os.chdir(cwd)


def ddp_step_time(root: Path, spec: str, epochs: int, nproc: int, threads: int) -> dict:
    """`archlab train` in a child process; seconds per optimisation step of its training loop."""
    import yaml
    raw = yaml.safe_load((root / "specs" / f"{spec}.yaml").read_text())
    raw["train"].update(epochs=epochs, device="cpu")
    bench_spec = root / "specs" / f"{spec}_bench.yaml"
    bench_spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = root / "runs" / f"{spec}-n{nproc}-t{threads}"
    cmd = [sys.executable, "-m", "pipeline.cli", "train", str(bench_spec), "--no-track", "--out", str(out),
           "--nproc", str(nproc)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"spec": spec, "processes": nproc, "threads_each": threads, "error": done.stderr[-300:]}
    metrics = read_run_file(out, RunMetrics)
    return {"spec": spec, "processes": nproc, "threads_each": threads, "steps": metrics.steps,
            "ms_per_step": round(1000 * metrics.train_time_s / metrics.steps, 2),
            "val_metric": round(metrics.final[f"val/{metrics.main_metric}"], 4)}


def bench_sweeps(root: Path, args, urls: dict[str, str]) -> list[dict]:
    rows = []
    for storage, url in urls.items():
        for workers in args.workers:
            path = sweep_variant(root, f"scale_{storage}_{workers}", args.trials, args.epochs, "none", ["mlp"])
            rows.append({"storage": storage, "workers": workers, **run_sweep_variant(root, path, workers, url(path))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["sweep", "storage", "ddp"], nargs="+", default=["sweep", "storage", "ddp"])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--stress-trials", type=int, default=50)
    parser.add_argument("--ddp-specs", nargs="+", default=["mnist1d_mlp", "mnist1d_cnn"])
    parser.add_argument("--ddp-epochs", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    from tests.pg import create_database, postgres_server
    load, cores = os.getloadavg(), len(os.sched_getaffinity(0))
    print(f"cores: {cores}, load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n", flush=True)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp, postgres_server() as server:
        root = make_project(Path(tmp))
        if "sweep" in args.only:
            urls = {"journal": lambda path: str(root / "sweeps" / f"{path.stem}.journal"),
                    "postgresql": lambda path: create_database(server, path.stem)}
            results["sweep"] = bench_sweeps(root, args, urls)
            print(f"sweep: {args.trials} trials of {args.epochs} epochs (MLP candidate, no pruning, no MLflow)")
            show(results["sweep"], ["storage", "workers", "wall_s", "trials", "budget_used", "complete", "failed",
                                    "storage_errors", "trials_per_min", "error"])
        if "storage" in args.only:
            rows = []
            for storage in ("journal", "postgresql"):
                for procs in args.workers:
                    url = (str(root / "sweeps" / f"stress-{procs}.journal") if storage == "journal"
                           else create_database(server, f"stress_{procs}"))
                    rows.append({"storage": storage, **stress_url(url, procs, args.stress_trials, 10)})
            print(f"storage: {args.stress_trials} empty trials per process (ask, 3 suggestions, 10 reports, tell)")
            show(rows, ["storage", "procs", "wall_s", "trials_stored", "errors", "trials_per_s", "first_error"])
            results["storage"] = rows
        if "ddp" in args.only:
            rows = []
            for spec in args.ddp_specs:
                for nproc, threads in ((1, 1), (1, cores), (2, 1)):
                    rows.append(ddp_step_time(root, spec, args.ddp_epochs, nproc, threads))
            print(f"ddp: {args.ddp_epochs} epochs, time per optimisation step of the training loop (gloo on CPU)")
            show(rows, ["spec", "processes", "threads_each", "steps", "ms_per_step", "val_metric", "error"])
            results["ddp"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Seeds side by side: throughput of a batch of small seed runs, serial against parallel workers.

One temporary project (digits prepared there, no MLflow). The same batch of seeds of one spec is trained
and evaluated three times, each into a fresh folder, in this order:

  serial        one seed after another in this process, torch's default threads (what a stage that loops
                over its seeds would do; DVC alone runs stages one at a time)
  serial-1t     the same with one torch thread (what each parallel worker gets on 2 cores)
  parallel      engine/repeats.run_seeds: one spawned worker per core, cores // workers threads each
                (worker start-up, imports and data loading included)

    python bench/bench_seeds.py                       # digits_alexnet, 6 seeds of 20 epochs (≈5 s a run)
    python bench/bench_seeds.py --spec digits_lenet5 --seeds 4 --epochs 20
    python bench/bench_seeds.py --pipeline            # one seed of every experiment in params.yaml instead

--pipeline measures the train stage's own batch: one seed of each of the default pipeline's experiments (MLPs,
CNNs, recurrent nets, Transformers, autoencoders, a GAN: a mix of models that a second torch thread speeds up
a lot, a little, or not at all), each with its spec's own epochs (--max-epochs caps them), trained, evaluated
and tracked to MLflow by `archlab train --evaluate` as `dvc repro` runs it, in a fresh process:

  serial        --workers 1: one process, torch's default threads
  parallel      the default: one worker per core, cores // workers threads each

Each worker pays its own start (spawn, torch and MLflow imports, data loading: a few seconds), so runs
of a second or two measure that start rather than the cores; the default runs are a few seconds each, as
the default pipeline's are.

Prints wall time, runs per minute and the ratio against `serial`. The machine is shared: compare within
one invocation only.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_project(root: Path, spec_name: str, epochs: int) -> Path:
    from pipeline.cli import main
    (root / "specs").mkdir()
    raw = yaml.safe_load((REPO / "specs" / f"{spec_name}.yaml").read_text())
    raw["train"]["epochs"] = epochs
    raw["train"].pop("early_stopping", None)
    spec = root / "specs" / f"{spec_name}.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    os.chdir(root)
    assert main(["prepare", raw["data"]["dataset"]]) == 0
    return spec


def run_batch(spec_path: Path, seeds: int, out: Path, workers: int, threads: int | None) -> float:
    import torch

    from pipeline.engine.repeats import run_seeds, seed_jobs
    from pipeline.specs.experiment import load_spec
    spec = load_spec(spec_path)
    jobs, _ = seed_jobs(spec, spec_path, list(range(seeds)), False, Path("data/prepared") / spec.data.dataset, out,
                        None, evaluate=True)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    run_seeds(jobs, workers)
    elapsed = time.perf_counter() - start
    torch.set_num_threads(before)
    return elapsed


def make_pipeline_project(root: Path, max_epochs: int | None) -> list[str]:
    """The repo's specs and params.yaml with one seed per experiment, its datasets prepared → the experiments."""
    shutil.copytree(REPO / "specs", root / "specs")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["seeds"] = 1
    for name, entry in params["experiments"].items():
        entry.pop("seeds", None)
        if max_epochs:
            path = root / "specs" / f"{name}.yaml"
            raw = yaml.safe_load(path.read_text())
            raw["train"]["epochs"] = min(raw["train"]["epochs"], max_epochs)
            path.write_text(yaml.safe_dump(raw, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_cli(["prepare"], root)
    import subprocess  # the MLflow store made once, untimed, as an earlier `dvc repro` would have
    make_store = f"from mlflow.tracking import MlflowClient; MlflowClient({params['tracking_uri']!r}).search_experiments()"
    subprocess.run([sys.executable, "-c", make_store], cwd=root, check=True, capture_output=True)
    return list(params["experiments"])


def run_cli(args: list[str], root: Path) -> float:
    """`archlab ARGS` in a fresh process in `root`, torch's threads left to archlab → wall seconds."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(REPO)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=root, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def train_pipeline(root: Path, workers: int | None) -> tuple[float, float]:
    """(wall, sum of training loops) of one `archlab train --evaluate` of every experiment from nothing."""
    from pipeline.engine.runfiles import RunMetrics, read_run_file
    shutil.rmtree(root / "runs", ignore_errors=True)
    wall = run_cli(["train", "--evaluate", *(["--workers", str(workers)] if workers else [])], root)
    loops = sum(read_run_file(folder, RunMetrics).train_time_s for folder in (root / "runs").glob("*/seed-0"))
    return wall, loops


def bench_pipeline(max_epochs: int | None, rounds: int) -> None:
    from pipeline.engine.repeats import available_cores, worker_plan
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        experiments = make_pipeline_project(root, max_epochs)
        processes, threads = worker_plan(len(experiments), None)
        import torch
        layouts = {"serial": f"1 process × {torch.get_num_threads()} threads",
                   "parallel": f"{processes} workers × {threads} threads"}
        results: dict[str, list[tuple[float, float]]] = {"serial": [], "parallel": []}
        for _ in range(rounds):  # interleaved: a slow spell on the shared machine hits both
            results["serial"].append(train_pipeline(root, 1))
            results["parallel"].append(train_pipeline(root, None))
    cap = f", epochs capped at {max_epochs}" if max_epochs else ", each spec's own epochs"
    print(f"one seed of each of {len(experiments)} experiments{cap}, trained, evaluated and tracked; "
          f"{available_cores()} cores; median of {rounds}")
    print(f"{'mode':<10} {'layout':<26} {'wall s':>8} {'loops s':>8} {'runs/min':>9} {'vs serial':>10}")
    base = sorted(w for w, _ in results["serial"])[rounds // 2]
    for name, rows in results.items():
        wall, loops = sorted(rows)[rounds // 2]
        print(f"{name:<10} {layouts[name]:<26} {wall:8.1f} {loops:8.1f} {60 * len(experiments) / wall:9.1f} "
              f"{base / wall:9.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="digits_alexnet")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--pipeline", action="store_true", help="one seed of every experiment in params.yaml")
    parser.add_argument("--max-epochs", type=int, help="with --pipeline: cap each spec's epochs")
    parser.add_argument("--rounds", type=int, default=1, help="with --pipeline: rounds, median reported")
    args = parser.parse_args()
    if args.pipeline:
        return bench_pipeline(args.max_epochs, args.rounds)
    from pipeline.engine.repeats import available_cores, worker_plan
    cores = available_cores()
    processes, threads = worker_plan(args.seeds, None)
    with tempfile.TemporaryDirectory() as tmp:
        spec = make_project(Path(tmp), args.spec, args.epochs)
        import torch
        default_threads = torch.get_num_threads()
        rows = [("serial", f"1 process × {default_threads} threads", run_batch(spec, args.seeds, Path("serial"), 1, None)),
                ("serial-1t", "1 process × 1 thread", run_batch(spec, args.seeds, Path("serial1"), 1, 1)),
                ("parallel", f"{processes} workers × {threads} threads",
                 run_batch(spec, args.seeds, Path("parallel"), processes, None))]
    print(f"{args.seeds} seeds of {args.spec}, {args.epochs} epochs each, trained and evaluated; {cores} cores")
    print(f"{'mode':<10} {'layout':<26} {'wall s':>8} {'runs/min':>9} {'vs serial':>10}")
    base = rows[0][2]
    for name, layout, wall in rows:
        print(f"{name:<10} {layout:<26} {wall:8.1f} {60 * args.seeds / wall:9.1f} {base / wall:9.2f}x")


if __name__ == "__main__":
    main()

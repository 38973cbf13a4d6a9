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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="digits_alexnet")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
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

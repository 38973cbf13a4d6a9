"""The cost around training: what one `archlab train SPEC --evaluate` pays outside its training loop.

One temporary project (digits prepared there), a one-epoch digits MLP, one seed. Each round runs, side by
side in fresh processes, one thread each:

  torch       python -c "import torch": the baseline
  floor       torch and torch._dynamo imported: the least a training process can cost (the first torch
              optimizer imports torch._dynamo, about a second, whatever the model)
  floor+mlflow  the same and mlflow: the least a tracked training process can cost
  untracked   archlab train SPEC --seed 0 --evaluate --no-track
  tracked     the same, logging to MLflow on SQLite (the store made by an earlier run, as in a pipeline)
  pooled untracked / pooled tracked
              what each experiment costs inside the pipeline's train stage: one `archlab train` (no spec)
              of POOLED copies of the same experiment, one process (--workers 1), divided by POOLED

Fixed cost = wall time − the training loop (metrics.json's train_time_s). Prints the median over the rounds
and each against `import torch`. Profile one run for the breakdown:

    python bench/bench_fixed_cost.py --rounds 5
    pyinstrument -m pipeline.cli train SPEC --data DATA --out OUT --seed 0 --evaluate

The machine is shared: compare within one invocation only.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.engine.runfiles import RunMetrics, read_run_file  # noqa: E402 - after the path above
SPEC = "digits_mlp"
POOLED = 8  # experiments in the pooled rows


def make_project(root: Path) -> Path:
    raw = yaml.safe_load((REPO / "specs" / f"{SPEC}.yaml").read_text())
    raw["train"]["epochs"] = 1
    raw["train"].pop("early_stopping", None)
    (root / "specs").mkdir()
    spec = root / "specs" / f"{SPEC}.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    run([sys.executable, "-m", "pipeline.cli", "prepare", raw["data"]["dataset"]], root)
    return spec


def make_pooled_project(root: Path, spec: Path) -> Path:
    """A project of POOLED experiments e0, e1, ..., each the one-epoch spec under its own name, one seed each."""
    raw = yaml.safe_load(spec.read_text())
    (root / "specs").mkdir(parents=True)
    for k in range(POOLED):
        (root / "specs" / f"e{k}.yaml").write_text(yaml.safe_dump({**raw, "name": f"e{k}"}, sort_keys=False))
    experiments = {f"e{k}": raw["data"]["dataset"] for k in range(POOLED)}
    (root / "params.yaml").write_text(yaml.safe_dump({"experiments": experiments, "seeds": 1}))
    return root


def train_pooled(root: Path, tracked: bool) -> tuple[float, float]:
    """(wall, training loops) of every experiment of the pooled project, trained and evaluated by one call."""
    shutil.rmtree(root / "runs", ignore_errors=True)
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "--evaluate", "--workers", "1"]
    wall = run(cmd + ([] if tracked else ["--no-track"]), root)
    return wall, sum(read_run_file(folder, RunMetrics).train_time_s for folder in (root / "runs").glob("*/seed-0"))


def run(cmd: list[str], cwd: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def train(root: Path, spec: Path, out: str, tracked: bool) -> tuple[float, float]:
    """(wall, training loop) of one train-and-evaluate of one seed into a fresh folder."""
    shutil.rmtree(root / out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipeline.cli", "train", str(spec), "--out", out, "--seed", "0", "--evaluate"]
    wall = run(cmd + ([] if tracked else ["--no-track"]), root)
    loop = read_run_file(root / out / "seed-0", RunMetrics).train_time_s
    return wall, loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = make_project(root)
        train(root, spec, "runs/warm", tracked=True)  # makes the MLflow store, as the first stage of a pipeline does
        pooled = make_pooled_project(root / "pooled", spec)
        train_pooled(pooled, tracked=True)  # prepares its data and makes its store
        rows: dict[str, list[float]] = {"torch": [], "floor": [], "floor+mlflow": [], "untracked": [], "tracked": [],
                                        "pooled untracked": [], "pooled tracked": []}
        loops: list[float] = []
        for _ in range(args.rounds):
            rows["torch"].append(run([sys.executable, "-c", "import torch"], root))
            rows["floor"].append(run([sys.executable, "-c", "import torch, torch._dynamo"], root))
            rows["floor+mlflow"].append(run([sys.executable, "-c", "import torch, torch._dynamo, mlflow"], root))
            for name in ("untracked", "tracked"):
                wall, loop = train(root, spec, f"runs/{name}", tracked=name == "tracked")
                rows[name].append(wall - loop)
                loops.append(loop)
            for name in ("pooled untracked", "pooled tracked"):
                wall, loop = train_pooled(pooled, tracked=name == "pooled tracked")
                rows[name].append((wall - loop) / POOLED)
    baseline = statistics.median(rows["torch"])
    print(f"{SPEC}, 1 epoch, 1 seed, train + evaluate; median of {args.rounds} rounds; training loop "
          f"{statistics.median(loops):.2f} s; pooled rows: per experiment of {POOLED} in one call")
    print(f"{'':18s}{'fixed s':>9s}{'× torch':>9s}")
    for name, values in rows.items():
        fixed = statistics.median(values)
        print(f"{name:18s}{fixed:9.2f}{fixed / baseline:9.2f}")


if __name__ == "__main__":
    main()

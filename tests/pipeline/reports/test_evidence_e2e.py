"""Repeats end to end through the CLI: seeds trained, evaluated and compared into verdicts; a killed seed resumes."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main

pytestmark = pytest.mark.slow

TRAIN = "train: {epochs: 4, batch_size: 64, optimizer: {lr: 0.01}, checkpoint_every_s: 0}"
SPECS = {
    # logistic regression: a linear model on the 40 raw values
    "tiny_logreg": "model: {kind: mlp, hidden: []}",
    "tiny_cnn": "model: {kind: cnn, layers: [{type: conv, channels: 16, kernel: 5}, {type: pool, kernel: 2}, "
                "{type: conv, channels: 16, kernel: 3}], head: [32]}",
}
PARAMS = """\
seeds: 3
experiments:
  tiny_logreg: {dataset: mnist1d}
  tiny_cnn: {dataset: mnist1d}
  tiny_cnn_twin: {dataset: mnist1d}
comparisons:
  - [tiny_cnn_twin, tiny_cnn]
  - [tiny_logreg, tiny_cnn]
equivalence: {accuracy: 0.005}
"""


def write_spec(folder: Path, name: str, model: str, dataset: str = "mnist1d", train: str = TRAIN) -> None:
    (folder / "specs" / f"{name}.yaml").write_text(
        f"name: {name}\ndata: {{dataset: {dataset}, train_subset: 1500}}\ntask: classify\n{model}\n{train}\n")


def test_verdicts_from_seeds_logistic_regression_loses_and_a_twin_never_wins(project, capsys):
    (project / "params.yaml").write_text(PARAMS)
    write_spec(project, "tiny_logreg", SPECS["tiny_logreg"])
    write_spec(project, "tiny_cnn", SPECS["tiny_cnn"])
    write_spec(project, "tiny_cnn_twin", SPECS["tiny_cnn"])  # the same spec under another name
    for name in ("tiny_logreg", "tiny_cnn", "tiny_cnn_twin"):
        assert main(["train", f"specs/{name}.yaml", "--evaluate", "--workers", "1", "--no-track"]) == 0
    assert main(["compare", "--no-track"]) == 0
    for seed in range(3):
        assert (project / f"runs/tiny_cnn/seed-{seed}/records.npz").is_file()
    rows = {(r["a"], r["b"]): r for r in csv.DictReader((project / "reports/comparisons.csv").open())}
    assert rows[("tiny_logreg", "tiny_cnn")]["verdict"] == "worse", rows[("tiny_logreg", "tiny_cnn")]
    assert rows[("tiny_logreg", "tiny_cnn")]["declared"] == "True"
    twin = rows.get(("tiny_cnn_twin", "tiny_cnn")) or rows[("tiny_cnn", "tiny_cnn_twin")]
    assert twin["verdict"] in ("equivalent", "inconclusive"), twin
    evidence = json.loads((project / "reports/evidence.json").read_text())
    assert evidence["tiny_cnn"]["n"] == 3
    assert evidence["tiny_cnn"]["low"] <= evidence["tiny_cnn"]["mean"] <= evidence["tiny_cnn"]["high"]
    md = (project / "reports/comparison.md").read_text()
    assert "Who beats whom" in md and "forest_mnist1d-classify.png" in md


def test_a_killed_seed_resumes_and_ends_as_an_uninterrupted_run(project):
    """SIGKILL the workers mid-training; the rerun skips nothing unfinished, resumes each seed from its
    checkpoint and ends with the numbers of a run never interrupted (same threads: one per worker)."""
    (project / "params.yaml").write_text("seeds: 2\nexperiments:\n  slow: {dataset: digits}\n")
    train = "train: {epochs: 50, batch_size: 32, checkpoint_every_s: 0}"
    write_spec(project, "slow", "model: {kind: mlp, hidden: [64]}", dataset="digits", train=train)
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "specs/slow.yaml", "--no-track", "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert main(["prepare", "digits"]) == 0
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not all((project / f"runs/slow/seed-{s}/checkpoint.pt").is_file() for s in (0, 1)):  # an epoch each
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not any((project / f"runs/slow/seed-{s}/metrics.json").is_file() for s in (0, 1)), "killed too late"
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    subprocess.run([*cmd, "--out", "reference"], env=env, check=True, capture_output=True)
    for seed in (0, 1):
        resumed = json.loads((project / f"runs/slow/seed-{seed}/metrics.json").read_text())
        reference = json.loads((project / f"reference/seed-{seed}/metrics.json").read_text())
        assert resumed["status"] == "finished" and resumed["epochs"] == 50
        assert resumed["final"] == reference["final"]

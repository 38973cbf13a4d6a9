"""Data-parallel training under torchrun (gloo on this CPU): two ranks sharing each global batch train the model
one process trains, and a two-rank run killed with SIGKILL resumes to the end a straight run reaches."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from pipeline.cli import main
from pipeline.engine.distributed import Ranks
from tests.conftest import REPO, tiny_project

# No dropout, no batch norm: two ranks then compute what one process computes, up to summation order.
SPEC = {"name": "dp_mlp", "data": {"dataset": "tiny"}, "task": "classify", "model": {"kind": "mlp", "hidden": [16]},
        "train": {"epochs": 40, "batch_size": 32, "seed": 3, "checkpoint_every_s": 0,
                  "optimizer": {"name": "adamw", "lr": 0.01}}}
ARGS = ["train", "specs/dp_mlp.yaml", "--seed", "3", "--no-track"]  # data-parallel: one seed at a time


def weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def losses(run_dir) -> pd.DataFrame:
    return pd.read_csv(run_dir / "history.csv")[["epoch", "train/loss", "val/loss", "val/accuracy"]]


def checkpointed_epoch(checkpoint) -> int:
    """The epoch a run's checkpoint holds; -1 before there is one (a run checkpoints epoch 0 as it starts)."""
    try:
        return torch.load(checkpoint, weights_only=True)["state"]["epoch"]
    except (OSError, RuntimeError, EOFError, KeyError):
        return -1


def kill_mid_run(cmd: list[str], checkpoint) -> None:
    """Start torchrun and its ranks, SIGKILL them all once a trained epoch is checkpointed."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and checkpointed_epoch(checkpoint) < 1 and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_two_ranks_train_like_one_process_and_resume_after_a_kill(tmp_path, monkeypatch):
    project = tiny_project(tmp_path, [SPEC], n=89)  # batches of 32, 32, 25: the last splits 12 / 13
    monkeypatch.chdir(project)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    assert main([*ARGS, "--out", "runs/one"]) == 0  # this process: 1 thread (tests/conftest.py)
    assert main([*ARGS, "--out", "runs/two", "--nproc", "2"]) == 0

    one, two = losses(project / "runs/one/seed-3"), losses(project / "runs/two/seed-3")
    assert len(one) == len(two) == 40
    assert (one - two).abs().max().max() <= 1e-5
    w1, w2 = weights(project / "runs/one/seed-3"), weights(project / "runs/two/seed-3")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4, rtol=0) for k in w1)
    cost = pd.read_json(project / "runs/two/seed-3/cost.json", typ="series")
    assert cost["world_size"] == 2 and cost["train_samples_per_s_per_rank"] * 2 == pytest.approx(
        cost["train_samples_per_s"], rel=1e-3)
    assert len(cost["train_time_s_per_rank"]) == 2 and cost["train_time_s_per_rank"][0] == pytest.approx(
        cost["train_time_s"], rel=1e-3)
    assert len(cost["peak_memory_mb_per_rank"]) == 2 and all(m > 0 for m in cost["peak_memory_mb_per_rank"])
    assert cost["peak_memory_mb_total"] == pytest.approx(sum(cost["peak_memory_mb_per_rank"]), rel=1e-3)  # rounded
    # diagnostics: each rank's own gradient norm per epoch beside the total (the averaged gradient's norm)
    grad = json.loads((project / "runs/two/seed-3/diagnostics.json").read_text())["grad_norm"]
    per_rank = grad["per_rank_global_mean"]
    assert len(per_rank) == 40 and all(len(epoch) == 2 for epoch in per_rank)
    assert all(r0 != r1 for r0, r1 in per_rank)  # two shards, two gradients
    # the norm of a mean is at most the mean of the norms (per step, so also over the epoch's mean)
    assert all(total <= (r0 + r1) / 2 * (1 + 1e-3) for total, (r0, r1) in zip(grad["global_mean"], per_rank))
    assert "per_rank_global_mean" not in json.loads(
        (project / "runs/one/seed-3/diagnostics.json").read_text())["grad_norm"]  # one process: no ranks

    killed = project / "runs/killed"
    kill_mid_run([sys.executable, "-m", "pipeline.cli", *ARGS, "--out", str(killed), "--nproc", "2"],
                 killed / "seed-3" / "checkpoint.pt")
    stopped_at = torch.load(killed / "seed-3" / "checkpoint.pt", weights_only=True)["state"]["epoch"]
    assert 1 <= stopped_at < 40, "the run was not stopped mid-way"
    assert main([*ARGS, "--out", str(killed), "--nproc", "2"]) == 0
    assert losses(killed / "seed-3").equals(two)
    resumed = weights(killed / "seed-3")
    assert all(torch.equal(resumed[k], w2[k]) for k in w2)


def test_every_sample_of_a_global_batch_goes_to_exactly_one_rank_with_its_share():
    x, y = torch.arange(25.0).reshape(25, 1), torch.arange(25)
    parts = [Ranks(rank, 2).shard(x, y) for rank in range(2)]
    assert torch.cat([p[1] for p in parts]).tolist() == list(range(25))
    assert [p[2] for p in parts] == [12 * 2 / 25, 13 * 2 / 25]  # weighted: the mean of the ranks = global mean
    lone = [Ranks(rank, 4).shard(x[:2], y[:2]) for rank in range(4)]
    assert [p[2] for p in lone] == [0.0, 1 * 4 / 2, 0.0, 1 * 4 / 2]  # an empty rank joins with weight 0


def test_only_train_runs_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["compare"]) == 2
    assert capsys.readouterr().err.strip() == ("archlab: error: only `archlab train` runs under torchrun; "
                                               "run `archlab compare` as one process")


def test_nproc_inside_a_torchrun_rank_is_refused(monkeypatch, project, capsys):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert main(["train", "specs/digits_mlp.yaml", "--nproc", "2", "--no-track"]) == 2
    assert "already a torchrun rank" in capsys.readouterr().err


def test_data_parallel_training_of_several_seeds_at_once_is_refused(monkeypatch, project, capsys):
    assert main(["train", "specs/digits_mlp.yaml", "--nproc", "2", "--no-track"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("archlab: error: data-parallel training trains one seed at a time") and "--seed K" in err
    assert not (project / "runs").exists()  # refused before anything is written

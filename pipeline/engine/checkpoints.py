"""A run's checkpoint file: its name, where each seed's lives, reading it, and the trained weights it holds.

On its own, below the trainer and the repeats, so that a warm start (engine/warmstart.py) reads another run's
checkpoint without an import loop.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.specs.errors import UserError

CHECKPOINT = "checkpoint.pt"
SEED_DIR = "seed-{}"


def seed_dir(run_dir: str | Path, seed: int) -> Path:
    return Path(run_dir) / SEED_DIR.format(seed)


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """A run's checkpoint; a truncated, empty or garbage file is a UserError that says how to go on."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(ckpt, dict) or not {"model", "state"} <= ckpt.keys():
            raise ValueError("not an archlab checkpoint")
    except Exception as exc:  # noqa: BLE001 - zip, pickle and EOF errors alike: the file is unusable
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(path, f"the checkpoint cannot be read ({reason}); `archlab train SPEC --restart` sets it "
                        "aside (kept, renamed) and trains afresh") from None
    return ckpt


def trained_weights(ckpt: dict) -> dict[str, torch.Tensor]:
    """A checkpoint's weights to use: the best epoch's under early stopping, else the last."""
    state = ckpt["state"]
    return state["best_weights"] if state.get("best_weights") and state["status"] != "diverged" else ckpt["model"]

"""Warm starts: a model's transferable part (a token encoder's body) loaded from another run's trained weights
(`train.init_from`), and optionally frozen (`train.freeze`: a linear probe trains the head alone).

The part is found by the model itself (models.contract.Model.transferable) and its weights by the name it has
in the model, so a classifier takes exactly the body an mlm run trained under that name, never its head.
A run that starts from another depends on it: its checkpoint and metrics.json keep a hash of the weights it
started from (`init_hash`), and a finished seed whose pretraining has changed since is neither skipped nor resumed.
(The claims stage trains such variants after the runs they start from; a DVC train stage does not know of the
dependency, see README.)
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from models.contract import Model
from pipeline.engine.checkpoints import CHECKPOINT, read_checkpoint, seed_dir, trained_weights
from pipeline.specs.errors import UserError
from pipeline.specs.experiment import ExperimentSpec

USABLE = ("finished", "early_stopped")  # a run still training, or diverged, starts nothing


def init_checkpoint(init_from: Path, seed: int) -> Path:
    """The checkpoint a run of `seed` starts from: init_from/checkpoint.pt (one run's folder), else
    init_from/seed-K/checkpoint.pt (an experiment's folder, K = this run's seed: seed K pairs with seed K)."""
    for path in (init_from / CHECKPOINT, seed_dir(init_from, seed) / CHECKPOINT):
        if path.is_file():
            return path
    raise UserError(init_from, f"holds no trained run: neither {CHECKPOINT} nor seed-{seed}/{CHECKPOINT}; train "
                    "the run it names first", field="train.init_from")


def weights_hash(weights: dict[str, torch.Tensor]) -> str:
    """A short content hash of a state dict (names and values)."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def init_hash(spec: ExperimentSpec) -> str | None:
    """The hash of the trained weights a run of `spec` starts from (None without init_from): what a finished
    run's `init_hash` must equal for it to count as done."""
    if spec.train.init_from is None:
        return None
    return weights_hash(trained_weights(read_checkpoint(init_checkpoint(spec.train.init_from, spec.train.seed))))


def _part_name(model: nn.Module, part: nn.Module) -> str:
    """The prefix of the part's keys in the model's state dict ('' for the whole model)."""
    return next(f"{name}." if name else "" for name, module in model.named_modules() if module is part)


def warm_start(model: Model, spec: ExperimentSpec) -> str | None:
    """Load and/or freeze the model's transferable part as `spec.train` says → the loaded weights' init_hash
    (None: nothing loaded); a model without such a part, or a checkpoint that does not fit, is a UserError
    naming the field."""
    train = spec.train
    if train.init_from is None and not train.freeze:
        return None
    part = model.transferable()
    if part is None:
        field = "train.init_from" if train.init_from is not None else "train.freeze"
        raise UserError(None, f"model kind {spec.model.kind!r} has no part that can be loaded or frozen as "
                        "configured (a transformer with shape: encoder on token data has: its encoder)", field=field)
    loaded = None
    if train.init_from is not None:
        loaded = _load_part(model, part, init_checkpoint(train.init_from, train.seed))
    if train.freeze:
        part.requires_grad_(False)  # the optimizer gets the head's parameters only (Model.training_phases)
    return loaded


def _load_part(model: Model, part: nn.Module, path: Path) -> str:
    """Load the part from the checkpoint at `path` → the hash of the checkpoint's trained weights."""
    ckpt = read_checkpoint(path)  # torch.load(weights_only=True); an unreadable file is a UserError
    status = ckpt["state"].get("status")
    if status not in USABLE:
        raise UserError(path, f"the run is {status}, not finished: nothing to start from", field="train.init_from")
    prefix = _part_name(model, part)
    trained = trained_weights(ckpt)
    weights = {k[len(prefix):]: v for k, v in trained.items() if k.startswith(prefix)}
    try:
        part.load_state_dict(weights)
    except RuntimeError as err:  # missing or unexpected keys, or sizes that differ
        detail = " ".join(str(err).split())[:400]
        raise UserError(path, f"its weights do not fit this model's {prefix.rstrip('.') or 'model'} (another "
                        f"architecture or vocabulary?): {detail}", field="train.init_from") from None
    return weights_hash(trained)

"""Compute cost of a model: parameters, FLOPs, time, memory. (Filled in by issue 4.)"""
from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module) -> dict[str, int]:
    return {"params_total": sum(p.numel() for p in model.parameters()),
            "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def measure_cost(trainer, metrics: dict) -> dict:
    return {**count_parameters(trainer.model), "train_time_s": metrics["train_time_s"],
            "train_samples_per_s": metrics["train_samples_per_s"]}

"""Gradient health and overfitting diagnostics. (Interface used by the engine; filled in by issue 4.)"""
from __future__ import annotations

import torch
from torch import nn


class NullMonitor:
    """Records nothing; used when diagnostics are off."""

    def after_backward(self, phase: str) -> None: ...

    def after_step(self) -> None: ...

    def end_epoch(self, epoch: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    def summary(self, history: list[dict], spec) -> dict:
        return {"enabled": False}

    def tags(self) -> dict[str, str]:
        return {}


def make_monitor(spec, model: nn.Module, probe_x: torch.Tensor, probe_y: torch.Tensor):
    return NullMonitor()

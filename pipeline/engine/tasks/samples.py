"""What the generative tasks (reconstruct, generate) share: the feature classifier that scores samples,
sample quality, and the per-epoch grid of samples."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from models.contract import Sampler
from pipeline.engine.tasks.base import seeded

if TYPE_CHECKING:
    from pipeline.data.prepare import DataMeta


@dataclass
class FeatureReference:
    """The data's feature classifier (engine/quality.py), loaded on first use; None where the data has none."""

    meta: DataMeta | None = None
    _loaded: object = field(default=None, repr=False)  # quality.Reference, False when there is none

    def attach(self, meta: DataMeta) -> None:
        self.meta = meta

    def load(self, device: torch.device):
        from pipeline.engine.quality import load_reference
        if self._loaded is None:
            self._loaded = load_reference(self.meta) or False
        return self._loaded.to(device) if self._loaded else None


def one_per_class(y: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of `count` samples, the first of each class first, so that a grid shows every class."""
    if y.dtype != torch.long or y.dim() != 1:
        return torch.arange(min(count, len(y)))
    firsts = [int((y == c).nonzero()[0]) for c in y.unique()]
    rest = [i for i in range(len(y)) if i not in set(firsts)]
    return torch.tensor((firsts + rest)[:count])


def sample_quality(reference, model: Sampler, real: torch.Tensor, meta: DataMeta) -> dict:
    """FID, its real-data floor and class coverage of as many samples as the training split holds (≤ 2000)."""
    from pipeline.engine.quality import sample_quality as quality
    from pipeline.engine.quality import training_samples
    if reference is None:
        return {}
    yardstick = training_samples(meta, 2000)
    generated = model.sample(len(yardstick), seeded(real.device, 0))
    return quality(reference, generated, real, yardstick)


def write_sample_grid(run_dir, epoch: int, rows: list[tuple[str, torch.Tensor]], data, columns: int,
                      title: str) -> None:
    """samples/epoch_NNN.png: titled rows of samples in the data's original units, on the training data's
    display range."""
    from pipeline.engine.grids import display_range, epoch_grid_path, original_units, write_grid
    panels = [(name, original_units(v, data.meta)) for name, v in rows]
    value_range = display_range(original_units(data.tensors["train_x"][:2000], data.meta))
    write_grid(epoch_grid_path(run_dir, epoch), panels, value_range, columns, title)

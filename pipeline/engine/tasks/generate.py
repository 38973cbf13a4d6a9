"""generate: a GAN trains itself in phases; per epoch its players' losses, FID and class coverage of its samples.

Contract: the model trains in phases (`training_phases()`: a GAN's discriminator, then its generator), draws
samples with sample(n, generator) (models.contract.Sampler), and reports its players' losses with
adversarial_stats.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from models.contract import Model, Phase, Stats
from pipeline.engine.tasks.base import TaskDefaults, seeded
from pipeline.engine.tasks.samples import FeatureReference, one_per_class, sample_quality, write_sample_grid

if TYPE_CHECKING:
    from pipeline.data.prepare import DataMeta


def _phases_required(model: Model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    raise TypeError(f"task generate needs a model that trains in its own phases; {type(model).__name__} has none")


@dataclass
class GenerateTask(TaskDefaults):
    """Per epoch: the players' losses (train/ and val/ d_loss, g_loss), FID and class coverage of
    validation-sized sample sets (val/fid, val/coverage, val/class_entropy_bits) and a grid of samples."""

    name: str = "generate"
    metric: str = "fid"
    reads: frozenset[str] = frozenset({"class", "value"})
    grid_columns: int = 8
    reference: FeatureReference = field(default_factory=FeatureReference)

    def attach(self, meta: DataMeta) -> None:
        self.reference.attach(meta)

    def phases(self, model: Model) -> list[Phase]:
        return model.training_phases(_phases_required)

    def eval_stats(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> Stats:
        """As many samples as the batch (the same z every epoch), judged by D and by the feature classifier."""
        from pipeline.engine.quality import feature_sums
        fake = model.sample(len(x), seeded(x.device, 0))
        stats = model.adversarial_stats(x, fake)
        ref = self.reference.load(x.device)
        if ref is not None:
            real_f, fake_f = ref.features(x), ref.features(fake)  # (B, F) each
            stats.update({**feature_sums(real_f, "real"), **feature_sums(fake_f, "fake")})
            classes = ref.classifier.head(fake_f).argmax(1)
            stats["fake_classes"] = torch.bincount(classes, minlength=ref.classifier.head.out_features).double()
        return stats

    def summarize(self, stats: dict) -> dict[str, float]:
        """Keys present decide what is reported: a phase's losses (train), or all of them plus quality (val)."""
        from pipeline.engine.quality import class_coverage, fid_from_stats
        n = max(stats.get("n", 1.0), 1.0)
        out = {}
        if "d_loss" in stats:
            out.update(d_loss=stats["d_loss"] / n, d_real=stats["d_real"] / n, d_fake=stats["d_fake"] / n)
        if "g_loss" in stats:
            out["g_loss"] = stats["g_loss"] / n
        if "real_sum" in stats:
            out["fid"] = fid_from_stats(stats, "real", "fake")
            out.update(class_coverage(stats["fake_classes"]))
        return out

    def end_epoch(self, model: Model, epoch: int, run_dir, data) -> dict[str, float]:
        """samples/epoch_NNN.png: samples from the same fixed z every epoch, under a row of real ones (validation
        examples, or training ones where there is no validation split)."""
        from pipeline.data.prepare import SPLIT_TITLES, shown_split
        device = next(model.parameters()).device
        t = data.tensors
        was_training = model.training
        model.eval()
        fake = model.sample(self.grid_columns ** 2, seeded(device, 0))
        model.train(was_training)
        part = shown_split(data)
        real = t[f"{part}_x"][one_per_class(t[f"{part}_y"], self.grid_columns)]
        write_sample_grid(run_dir, epoch, [(f"real ({SPLIT_TITLES[part]})", real), ("generated (fixed z)", fake)],
                          data, self.grid_columns, f"epoch {epoch}")
        return {}

    @torch.no_grad()
    def test_metrics(self, model: Model, x: torch.Tensor, y: torch.Tensor, meta: DataMeta) -> dict:
        """FID against the test split with its real-data floor, class coverage, and the players' test losses."""
        model.eval()
        stats = model.adversarial_stats(x, model.sample(len(x), seeded(x.device, 1)))
        out: dict = dict(self.summarize({k: v.item() for k, v in stats.items()}))
        out.update(sample_quality(self.reference.load(x.device), model, x, self.reference.meta))
        return out

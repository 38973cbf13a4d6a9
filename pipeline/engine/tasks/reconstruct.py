"""reconstruct: autoencoders give back their input; reconstruction error, and for a vae the ELBO and the
quality of its samples. What makes a variant itself (corruption, KL, β, likelihood) lives in
models/autoencoder.py behind models.contract.Reconstructor; the target is x itself, y is unused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from models.contract import Model, Phase, Stats
from pipeline.engine.tasks.base import TaskDefaults, add_stats, batches, predict, seeded
from pipeline.engine.tasks.samples import FeatureReference, one_per_class, sample_quality, write_sample_grid

if TYPE_CHECKING:
    from pipeline.data.prepare import DataMeta


def _reconstruct_loss(model: Model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    return model.reconstruction_terms(x, *model.reconstruct(x))


@dataclass
class ReconstructTask(TaskDefaults):
    name: str = "reconstruct"
    metric: str = "mse"  # every variant's reconstruction error (per entry, normalised units); a vae adds elbo
    reads: frozenset[str] = frozenset({"class", "value"})
    keeps_records = True
    records_ratio = ("sse", "elements")  # mse
    grid_columns: int = 10
    reference: FeatureReference = field(default_factory=FeatureReference)  # scores a vae's samples

    def attach(self, meta: DataMeta) -> None:
        self.reference.attach(meta)

    def phases(self, model: Model) -> list[Phase]:
        return model.training_phases(_reconstruct_loss)

    def eval_stats(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> Stats:
        """Reconstruction error of the clean input with z = μ; for a vae, the ELBO from one z ~ q(z | x)."""
        recon, mu, logvar = model.reconstruct(x)
        _, stats = model.reconstruction_terms(x, recon, mu, logvar)
        if logvar is not None:
            z = model.reparameterise(mu, logvar, seeded(x.device, 0))
            _, sampled = model.reconstruction_terms(x, model.decode(z), mu, logvar)
            stats.update(loss=sampled["loss"], nll=sampled["nll"], kl=sampled["kl"])
        return stats

    def summarize(self, stats: dict[str, float]) -> dict[str, float]:
        n = max(stats["n"], 1.0)
        out = {"loss": stats["loss"] / n, "mse": stats["sse"] / max(stats["elements"], 1.0)}
        if "kl" in stats:
            out["kl"] = stats["kl"] / n
            out["nll"] = stats["nll"] / n
            out["elbo"] = -(stats["nll"] + stats["kl"]) / n  # nats per sample, β = 1: a bound on log p(x)
        return out

    def end_epoch(self, model: Model, epoch: int, run_dir, data) -> dict[str, float]:
        """samples/epoch_NNN.png: validation inputs (training ones where there is no validation split) against
        their reconstructions (ae, dae: also from corrupted inputs; vae: also samples decoded from z ~ N(0, I)),
        in the data's original units."""
        from pipeline.data.prepare import SPLIT_TITLES, shown_split
        device = next(model.parameters()).device
        t, part = data.tensors, shown_split(data)
        x = t[f"{part}_x"][one_per_class(t[f"{part}_y"], self.grid_columns)].to(device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            rows = [(f"inputs ({SPLIT_TITLES[part]})", x), ("reconstructions", model(x))]
            corrupted = model.corrupted(x, seeded(device, epoch))
            if corrupted is not None:
                title, noisy = corrupted
                rows += [(title, noisy), ("reconstructed from corrupted", model(noisy))]
            if model.can_sample:
                rows.append(("samples, z ~ N(0, I)", model.sample(2 * self.grid_columns, seeded(device, 0))))
        model.train(was_training)
        write_sample_grid(run_dir, epoch, rows, data, self.grid_columns, f"{model.variant}, epoch {epoch}")
        return {}

    @torch.no_grad()
    def test_metrics(self, model: Model, x: torch.Tensor, y: torch.Tensor, meta: DataMeta,
                     batch_size: int = 1024) -> dict:
        """Reconstruction error; ae and dae: also from corrupted inputs (one seeded draw of the spec's `noise`,
        the same for both, so the two are compared on the very same inputs), against the corruption's own error;
        vae: ELBO, KL, and the quality of its samples (FID and class coverage, see engine/quality.py)."""
        model.eval()
        total: Stats = {}
        for i in range(0, len(x), batch_size):
            add_stats(total, self.eval_stats(model, x[i:i + batch_size], y[i:i + batch_size]))
        stats = self.summarize({k: v.item() for k, v in total.items()})
        out = {"mse": stats["mse"], "rmse": math.sqrt(stats["mse"])}
        corrupted = model.corrupted(x, seeded(x.device, 0))
        if corrupted is not None:
            noisy = corrupted[1]
            out["corrupted_mse"] = (noisy - x).pow(2).mean().item()  # the noise's own error, for scale
            out["denoised_mse"] = (predict(model, noisy) - x).pow(2).mean().item()
        if "elbo" in stats:
            out.update(elbo=stats["elbo"], kl=stats["kl"], nll=stats["nll"])
        if model.can_sample:
            out.update(sample_quality(self.reference.load(x.device), model, x, self.reference.meta))
        return out

    def example_records(self, model: Model, x: torch.Tensor, y: torch.Tensor, meta: DataMeta) -> dict[str, np.ndarray]:
        """Squared error of each example's reconstruction (z = μ for a vae, clean inputs for a dae)."""
        sse = []
        for xb, _ in batches(x, y):
            recon = model.reconstruct(xb)[0]
            sse.append((recon - xb).pow(2).flatten(1).sum(1))
        return {"sse": torch.cat(sse).cpu().numpy().astype(np.float64),
                "elements": np.full(len(x), x[0].numel(), dtype=np.int64)}

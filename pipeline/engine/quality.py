"""Sample quality for generative models: Fréchet distance and class coverage in a classifier's feature space.

FID (Heusel et al., 2017) compares two sets of samples by the Gaussians fitted to their features:
    d² = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½).
The features here are not Inception's: the pipeline trains its own small classifier on the prepared
dataset's training split (deterministic, a few seconds for digits) and caches it beside the prepared
folder, as data/prepared/NAME.feature_classifier.pt plus a .json with its accuracies. It is a sibling of
the prepared folder, not inside it: that folder is a DVC output, and writing into it would invalidate
every stage that depends on it. The cache is keyed by the data's content hash, so re-prepared data get a
new classifier. The same classifier labels the samples: the share of classes they cover and the entropy
of their class histogram expose mode collapse.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.io import atomic_torch_save, atomic_write_json

if TYPE_CHECKING:
    from pipeline.data.prepare import DataMeta

FEATURES = 64  # width of the feature layer: small, so covariances from a few hundred samples are sound
SEED = 0
COVERED_SHARE = 0.1  # a class is covered when it holds at least 10% of its fair share (n / K) of the samples


# ── the Fréchet distance ─────────────────────────────────────────────────────
def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition (negatives clipped)."""
    values, vectors = np.linalg.eigh((m + m.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2), in float64.

    tr((Σ₁Σ₂)^½) is computed as tr((Σ₁^½ Σ₂ Σ₁^½)^½): the same eigenvalues, but of a symmetric PSD matrix,
    so there is no complex round-off as with sqrtm of the non-symmetric product.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    root1 = _sqrt_psd(cov1)
    middle = root1 @ cov2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum()
    d2 = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2.0 * cross)
    return max(d2, 0.0)


def gaussian_from_sums(total: np.ndarray, outer: np.ndarray, n: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance from Σf (F,) and Σffᵀ (F, F) over n samples, in float64."""
    total, outer = np.asarray(total, np.float64), np.asarray(outer, np.float64)
    mu = total / n
    cov = (outer - n * np.outer(mu, mu)) / max(n - 1.0, 1.0)
    return mu, cov


def feature_sums(features: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """Summable statistics of a feature batch (B, F), in float64 on its device: Σf, Σffᵀ and the count."""
    f = features.double()
    return {f"{prefix}_sum": f.sum(0), f"{prefix}_outer": f.T @ f, f"{prefix}_n": f.new_tensor(len(f))}


def fid_from_stats(stats: dict, a: str, b: str) -> float:
    """FID between two feature sets given their summed statistics (keys `<a>_sum`, `<a>_outer`, `<a>_n`)."""
    mu1, cov1 = gaussian_from_sums(stats[f"{a}_sum"], stats[f"{a}_outer"], stats[f"{a}_n"])
    mu2, cov2 = gaussian_from_sums(stats[f"{b}_sum"], stats[f"{b}_outer"], stats[f"{b}_n"])
    return frechet_distance(mu1, cov1, mu2, cov2)


# ── class coverage ───────────────────────────────────────────────────────────
def class_coverage(counts) -> dict[str, float]:
    """How the classifier labels a set of samples: coverage and entropy of the class histogram.

    coverage: fraction of the K classes holding at least COVERED_SHARE of their fair share n / K;
    class_entropy_bits: entropy of the histogram, log2 K when every class is equally frequent, 0 when
    every sample lands in one class (mode collapse).
    """
    counts = np.asarray(counts, np.float64)
    n, k = counts.sum(), len(counts)
    if n <= 0:
        return {"coverage": 0.0, "class_entropy_bits": 0.0}
    p = counts / n
    entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    return {"coverage": float((counts >= COVERED_SHARE * n / k).mean()), "class_entropy_bits": entropy}


# ── the feature classifier ───────────────────────────────────────────────────
class FeatureClassifier(nn.Module):
    """A small classifier whose last hidden layer (FEATURES wide) is the feature space.

    Images (C, H, W): two 3x3 conv + ReLU layers, 2x2 max pooling, adaptive pooling to at most 4x4;
    anything else: two fully connected layers on the flattened sample.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 16):
        super().__init__()
        self.input_shape = tuple(input_shape)
        if len(self.input_shape) == 3:
            c, h, w = self.input_shape
            grid = (min(4, max(1, h // 2)), min(4, max(1, w // 2)))
            self.body = nn.Sequential(
                nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
                nn.MaxPool2d(2) if min(h, w) >= 2 else nn.Identity(), nn.AdaptiveAvgPool2d(grid), nn.Flatten(),
                nn.Linear(2 * width * grid[0] * grid[1], FEATURES), nn.ReLU())
        else:
            d = math.prod(self.input_shape)
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(d, 4 * width), nn.ReLU(),
                                      nn.Linear(4 * width, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(len(x), *self.input_shape))  # (B, ...) → (B, FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, K)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((torch.cat([model(x[i:i + 1024]) for i in range(0, len(x), 1024)]).argmax(1) == y)
                     .float().mean())


def train_feature_classifier(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int,
                             max_steps: int = 500, batch_size: int = 64, lr: float = 2e-3) -> FeatureClassifier:
    """Train the classifier deterministically (fixed seed, own RNG: the caller's random stream is untouched).

    Light augmentation (a shift of up to one pixel, small noise) makes its features less brittle on
    generated images, which are never quite like the training set.
    """
    # Own RNG (CPU only: torch.manual_seed would also reseed CUDA's stream); gradients on even when the
    # caller is an evaluation under no_grad (the classifier is trained the first time it is needed).
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.default_generator.manual_seed(SEED)
        model = FeatureClassifier(tuple(train_x.shape[1:]), num_classes)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        epochs = max(1, math.ceil(max_steps * batch_size / len(train_x)))
        steps = 0
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max_steps)
        image = train_x.dim() == 4
        for _ in range(epochs):
            for idx in torch.randperm(len(train_x)).split(batch_size):
                if steps >= max_steps:
                    break
                x = train_x[idx]
                if image:
                    shift = torch.randint(-1, 2, (2,))
                    x = torch.roll(x, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
                x = x + 0.1 * torch.randn_like(x)
                loss = F.cross_entropy(model(x), train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                steps += 1
    model.eval()
    return model


@dataclass
class Reference:
    """The feature classifier of a prepared dataset and what it says about that dataset."""

    classifier: FeatureClassifier
    report: dict  # accuracies, content hash, where it is cached

    def features(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.classifier.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])

    def to(self, device: torch.device) -> "Reference":
        self.classifier.to(device)
        return self


def cache_paths(prepared_dir: str | Path) -> tuple[Path, Path]:
    """data/prepared/NAME → (data/prepared/NAME.feature_classifier.pt, ….json): siblings, outside the DVC output."""
    folder = Path(prepared_dir)
    return (folder.with_name(folder.name + ".feature_classifier.pt"),
            folder.with_name(folder.name + ".feature_classifier.json"))


def load_reference(meta: DataMeta | None) -> Reference | None:
    """The feature classifier for a prepared class-labelled dataset: cached, or trained now and cached.

    None when the data have no classes or were not loaded from a prepared folder (meta has no prepared_dir).
    """
    if meta is None or meta.target != "class" or not meta.num_classes or not meta.prepared_dir:
        return None
    folder = meta.prepared_dir
    weights_path, report_path = cache_paths(folder)
    if weights_path.is_file() and report_path.is_file():
        report = json.loads(report_path.read_text())
        if report.get("content_hash") == meta.content_hash:
            # Its random initialisation, overwritten at once, must not move the caller's random stream either:
            # a run that loads the cached classifier mid-training draws what a run that trains it draws.
            with torch.random.fork_rng(devices=[]):
                model = FeatureClassifier(tuple(meta.input_shape), meta.num_classes)
            model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
            return Reference(model.eval(), report)
    return _train_and_cache(meta, Path(folder), weights_path, report_path)


def _train_and_cache(meta: DataMeta, folder: Path, weights_path: Path, report_path: Path) -> Reference:
    with np.load(folder / "arrays.npz", allow_pickle=False) as arrays:
        t = {k: torch.from_numpy(arrays[k]) for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")}
    start = time.perf_counter()
    model = train_feature_classifier(t["train_x"], t["train_y"], meta.num_classes)
    report = {"dataset": meta.name, "content_hash": meta.content_hash, "features": FEATURES,
              "train_seconds": round(time.perf_counter() - start, 2),
              "val_accuracy": round(_accuracy(model, t["val_x"], t["val_y"]), 4) if len(t["val_y"]) else None,
              "test_accuracy": round(_accuracy(model, t["test_x"], t["test_y"]), 4),
              "weights": weights_path.name}
    atomic_torch_save(weights_path, model.state_dict())
    atomic_write_json(report_path, report)  # written last: a report without its weights never exists
    return Reference(model, report)


def training_samples(meta: DataMeta | None, limit: int) -> torch.Tensor | None:
    """Up to `limit` samples of the prepared training split (the real-data yardstick for a FID)."""
    if meta is None or not meta.prepared_dir:
        return None
    with np.load(Path(meta.prepared_dir) / "arrays.npz", allow_pickle=False) as arrays:
        return torch.from_numpy(arrays["train_x"][:limit])


def _gaussian(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features.double().cpu().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


@torch.no_grad()
def sample_quality(reference: Reference, generated: torch.Tensor, real: torch.Tensor,
                   real_yardstick: torch.Tensor | None = None) -> dict:
    """FID of generated samples against real ones, class coverage and entropy of the samples.

    `real_yardstick`: as many real training samples as were generated; their FID to `real` is what a
    perfect generator would score with this many samples (FID is biased upwards at small sample sizes).
    """
    gen_features, real_features = reference.features(generated), reference.features(real)
    out = {"fid": frechet_distance(*_gaussian(real_features), *_gaussian(gen_features))}
    if real_yardstick is not None:
        yard = reference.features(real_yardstick.to(real.device))
        out["fid_real_floor"] = frechet_distance(*_gaussian(real_features), *_gaussian(yard))
    classes = reference.classifier.head(gen_features).argmax(1)
    counts = torch.bincount(classes, minlength=reference.classifier.head.out_features)
    out.update(class_coverage(counts.cpu().numpy()))
    out["class_counts"] = counts.tolist()
    out["samples"] = len(generated)
    out["feature_classifier_test_accuracy"] = reference.report.get("test_accuracy")
    return out

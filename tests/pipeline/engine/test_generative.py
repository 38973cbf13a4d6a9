"""Generative tasks: the Fréchet distance and class coverage (pipeline/quality.py), the cached feature
classifier, sample grids, and real tiny runs of a VAE (reconstruct) and a GAN (generate) on digits."""
from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy import linalg

from pipeline.specs.datasets import NpzSource
from pipeline.data.prepare import Prepared, build_arrays, load_prepared, write_prepared
from pipeline.engine.evaluate import evaluate_run
from pipeline.engine.grids import mosaic, original_units, write_grid
from pipeline.engine.quality import COVERED_SHARE, cache_paths, class_coverage, feature_sums, fid_from_stats, frechet_distance, gaussian_from_sums, load_reference
from pipeline.specs.experiment import load_spec
from pipeline.engine.tasks import ReconstructTask
from pipeline.engine.train import CHECKPOINT, Trainer, train_experiment
from tests.conftest import data_meta, tiny_classification
from tests.pipeline.engine.test_train import Interrupt, interrupt_after

PNG = b"\x89PNG\r\n\x1a\n"


def random_cov(dim: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


# ── the Fréchet distance ─────────────────────────────────────────────────────
def test_frechet_distance_of_identical_gaussians_is_zero():
    mu, cov = np.random.default_rng(0).normal(size=6), random_cov(6, 1)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_with_equal_covariances_is_the_squared_mean_gap():
    g = np.random.default_rng(2)
    mu1, mu2, cov = g.normal(size=5), g.normal(size=5), random_cov(5, 3)
    assert frechet_distance(mu1, cov, mu2, cov) == pytest.approx(((mu1 - mu2) ** 2).sum(), rel=1e-9)


def test_frechet_distance_of_diagonal_gaussians_has_a_closed_form():
    g = np.random.default_rng(4)
    mu1, mu2 = g.normal(size=7), g.normal(size=7)
    a, b = g.uniform(0.1, 3.0, size=7), g.uniform(0.0, 3.0, size=7)  # variances; one may be near 0
    b[0] = 0.0  # a degenerate direction
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(exact, rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_and_is_symmetric():
    g = np.random.default_rng(5)
    mu1, mu2, c1, c2 = g.normal(size=6), g.normal(size=6), random_cov(6, 6), random_cov(6, 7)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    d = frechet_distance(mu1, c1, mu2, c2)
    assert d == pytest.approx(reference, rel=1e-7)
    assert frechet_distance(mu2, c2, mu1, c1) == pytest.approx(d, rel=1e-9)


def test_summed_feature_statistics_give_numpys_mean_and_covariance():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0]), torch.randn(200, 4, generator=g) + 1
    # Summed batch by batch, as the engine does over a split.
    stats: dict = {}
    for part, prefix in ((a, "real"), (b, "fake")):
        for chunk in part.split(64):
            for k, v in feature_sums(chunk, prefix).items():
                stats[k] = stats[k] + v if k in stats else v
    host = {k: v.numpy() for k, v in stats.items()}
    assert host["real_n"] == 300 and host["fake_n"] == 200
    for part, prefix in ((a, "real"), (b, "fake")):
        mu, cov = gaussian_from_sums(host[f"{prefix}_sum"], host[f"{prefix}_outer"], host[f"{prefix}_n"])
        x = part.double().numpy()
        np.testing.assert_allclose(mu, x.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    x, y = a.double().numpy(), b.double().numpy()
    expected = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert fid_from_stats(host, "real", "fake") == pytest.approx(expected, rel=1e-9)
    assert fid_from_stats(host, "real", "real") == pytest.approx(0.0, abs=1e-9)


# ── class coverage ───────────────────────────────────────────────────────────
def test_even_classes_are_fully_covered_at_maximal_entropy():
    out = class_coverage([30] * 10)
    assert out == {"coverage": 1.0, "class_entropy_bits": pytest.approx(math.log2(10))}


def test_one_class_only_is_collapse():
    out = class_coverage([0, 0, 0, 200, 0, 0, 0, 0, 0, 0])
    assert out == {"coverage": 0.1, "class_entropy_bits": 0.0}


def test_a_class_needs_its_share_to_count_as_covered():
    fair = 100  # 1000 samples over 10 classes
    counts = [fair] * 8 + [int(COVERED_SHARE * fair), int(COVERED_SHARE * fair) - 1]
    counts[0] += 1000 - sum(counts)
    assert class_coverage(counts)["coverage"] == 0.9
    two = class_coverage([50, 50, 0, 0])
    assert two == {"coverage": 0.5, "class_entropy_bits": pytest.approx(1.0)}
    assert class_coverage([0, 0, 0]) == {"coverage": 0.0, "class_entropy_bits": 0.0}


# ── the reconstruct task's summary ───────────────────────────────────────────
def test_reconstruct_summary_reports_the_elbo_per_sample():
    stats = {"loss": 30.0, "sse": 12.0, "elements": 64.0 * 4, "n": 4.0, "nll": 20.0, "kl": 8.0}
    out = ReconstructTask().summarize(stats)
    assert out == {"loss": 7.5, "mse": 12.0 / 256, "kl": 2.0, "nll": 5.0, "elbo": -7.0}
    assert set(ReconstructTask().summarize({"loss": 1.0, "sse": 2.0, "elements": 8.0, "n": 2.0})) == {"loss", "mse"}


def test_reconstruct_test_metrics_per_variant():
    """Without a prepared folder there is no feature classifier: the VAE reports no FID, the rest still holds."""
    from models import build_model
    from models.autoencoder import AutoencoderSpec
    from models.registry import DataShape
    torch.manual_seed(0)
    shape = DataShape(input_shape=(1, 8, 8), output_size=10)
    x, y = torch.randn(300, 1, 8, 8), torch.zeros(300, dtype=torch.long)
    task = ReconstructTask()

    def model(**fields):
        return build_model(AutoencoderSpec(kind="autoencoder", latent=4, hidden=[16], **fields), shape)

    ae = model()
    out = task.test_metrics(ae, x, y, data_meta(), batch_size=128)  # several batches, summed
    assert set(out) == {"mse", "rmse", "corrupted_mse", "denoised_mse"}  # scored on the default noise too
    assert out["mse"] == pytest.approx((ae(x) - x).pow(2).mean().item(), rel=1e-5)

    dae = model(variant="dae", noise="gaussian", noise_level=0.5)
    out = task.test_metrics(dae, x, y, data_meta())
    assert set(out) == {"mse", "rmse", "corrupted_mse", "denoised_mse"}
    assert out["corrupted_mse"] == pytest.approx(0.25, rel=0.05)  # the noise's own error: level²

    vae = model(variant="vae", likelihood_std=0.5)
    out = task.test_metrics(vae, x, y, data_meta())
    assert set(out) == {"mse", "rmse", "elbo", "kl", "nll"}
    assert out["elbo"] == pytest.approx(-(out["nll"] + out["kl"])) and out["kl"] > 0


def test_a_plain_ae_is_scored_on_the_same_corrupted_inputs_as_a_dae():
    """The claim "a dae restores corrupted inputs better than a plain ae" compares both on one draw of noise."""
    from models import build_model
    from models.autoencoder import AutoencoderSpec, corrupt
    from models.registry import DataShape
    from pipeline.engine.tasks.base import seeded
    torch.manual_seed(0)
    shape = DataShape(input_shape=(1, 8, 8), output_size=10)
    x, y = torch.randn(200, 1, 8, 8), torch.zeros(200, dtype=torch.long)
    task = ReconstructTask()
    noise = {"noise": "masking", "noise_level": 0.25}
    ae = build_model(AutoencoderSpec(kind="autoencoder", latent=4, hidden=[16], variant="ae", **noise), shape)
    dae = build_model(AutoencoderSpec(kind="autoencoder", latent=4, hidden=[16], variant="dae", **noise), shape)
    out_ae, out_dae = task.test_metrics(ae, x, y, data_meta()), task.test_metrics(dae, x, y, data_meta())
    assert out_ae["corrupted_mse"] == out_dae["corrupted_mse"]  # the very same corrupted inputs
    noisy = corrupt(x, "masking", 0.25, seeded(x.device, 0))
    assert out_ae["corrupted_mse"] == pytest.approx((noisy - x).pow(2).mean().item())
    ae.eval()
    assert out_ae["denoised_mse"] == pytest.approx((ae(noisy) - x).pow(2).mean().item(), rel=1e-5)
    assert out_ae["denoised_mse"] != out_ae["mse"]  # scored from the corrupted inputs, not the clean ones


# ── sample grids ─────────────────────────────────────────────────────────────
def test_mosaic_places_images_row_by_row():
    images = np.arange(5, dtype=np.float32)[:, None, None, None] * np.ones((5, 1, 2, 3), np.float32)
    tile = mosaic(images, cols=2, pad=1, fill=-1.0)
    assert tile.shape == (3 * 3 - 1, 2 * 4 - 1, 1)
    assert (tile[0:2, 0:3] == 0).all() and (tile[0:2, 4:7] == 1).all() and (tile[3:5, 4:7] == 3).all()
    assert (tile[6:8, 0:3] == 4).all() and (tile[6:8, 4:7] == -1).all() and (tile[2, :] == -1).all()


def test_original_units_undo_the_per_channel_normalisation():
    x = torch.zeros(2, 3, 4, 4)
    x[:, 1] = 1.0
    meta = data_meta(normalisation={"x_mean": [10.0, 20.0, 30.0], "x_std": [1.0, 2.0, 3.0]})
    out = original_units(x, meta)
    assert (out[:, 0] == 10).all() and (out[:, 1] == 22).all() and (out[:, 2] == 30).all()
    assert np.array_equal(original_units(x, data_meta()), x.numpy())


def test_write_grid_writes_a_png_for_images_and_for_signals(tmp_path):
    images = np.random.default_rng(0).uniform(0, 16, size=(12, 1, 8, 8))
    write_grid(tmp_path / "a" / "img.png", [("real", images), ("fake", images[:6])], (0.0, 16.0), cols=6)
    write_grid(tmp_path / "sig.png", [("real", np.random.default_rng(1).normal(size=(4, 40)))], (-3.0, 3.0), cols=4)
    for name in ("a/img.png", "sig.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)


# ── the feature classifier and its cache ─────────────────────────────────────
def test_no_feature_classifier_without_classes_or_a_prepared_folder(tmp_path):
    assert load_reference(data_meta(target="value", prepared_dir=str(tmp_path))) is None
    assert load_reference(data_meta(target="class", num_classes=3)) is None


def test_the_feature_classifier_is_retrained_only_when_the_data_change(tmp_path):
    tiny = tiny_classification(n=120, features=8, classes=3)
    arrays = {k: v.numpy() for k, v in tiny.tensors.items()}
    folder = tmp_path / "data" / "prepared" / "tiny"
    write_prepared(arrays, tiny.meta.model_copy(update={"content_hash": "first"}), folder)
    meta = load_prepared(folder).meta
    weights, report = cache_paths(folder)
    assert weights == folder.parent / "tiny.feature_classifier.pt" and not weights.exists()

    torch.manual_seed(7)
    stream = torch.get_rng_state()
    first = load_reference(meta)
    assert first.report["content_hash"] == "first" and first.report["test_accuracy"] > 0.9  # separable blobs
    assert json.loads(report.read_text()) == first.report
    stamp = weights.stat().st_mtime_ns, report.stat().st_mtime_ns
    again = load_reference(meta)
    assert (weights.stat().st_mtime_ns, report.stat().st_mtime_ns) == stamp  # loaded, not retrained
    # Neither training nor loading moves the caller's random stream: a training run draws the same
    # numbers whether or not it found the classifier cached.
    assert torch.equal(torch.get_rng_state(), stream)
    for key, value in first.classifier.state_dict().items():
        assert torch.equal(again.classifier.state_dict()[key], value), key
    assert not any(folder.glob("*feature_classifier*")), "the cache must stay outside the prepared (DVC) folder"

    changed = load_reference(meta.model_copy(update={"content_hash": "second"}))  # re-prepared data: a new classifier
    assert changed.report["content_hash"] == "second"
    assert json.loads(report.read_text())["content_hash"] == "second"  # only a (re)training writes the report


# ── real tiny runs on digits ─────────────────────────────────────────────────
@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Prepared:
    """500 of scikit-learn's 8x8 digits, prepared as an npz dataset (split, normalised) in a temporary folder."""
    from sklearn.datasets import load_digits
    root = tmp_path_factory.mktemp("generative")
    d = load_digits()
    np.savez(root / "digits500.npz", x=d.images[:500, None].astype(np.float32), y=d.target[:500])
    arrays, meta = build_arrays("digits500", NpzSource(source="npz", path=root / "digits500.npz"))
    write_prepared(arrays, meta, root / "data" / "prepared" / "digits500")
    return load_prepared(root / "data" / "prepared" / "digits500")


def run_spec(folder, text: str):
    path = folder / "spec.yaml"
    path.write_text(text)
    return load_spec(path), path


def history_rows(run_dir) -> list[dict]:
    return list(csv.DictReader(io.StringIO((run_dir / "history.csv").read_text())))


def test_the_digits_feature_classifier_is_cached_and_reused(digits):
    weights, report = cache_paths(digits.meta.prepared_dir)
    first = load_reference(digits.meta)  # trained here, or by a run before (it is per prepared folder)
    assert first.report["content_hash"] == digits.meta.content_hash
    assert first.report["val_accuracy"] > 0.8, first.report
    stamp = weights.stat().st_mtime_ns
    second = load_reference(digits.meta)
    assert weights.stat().st_mtime_ns == stamp
    assert second.report == first.report == json.loads(report.read_text())
    x = digits.tensors["test_x"][:16]
    torch.testing.assert_close(second.features(x), first.features(x))


VAE_SPEC = """\
name: vae
data: {dataset: digits500}
task: reconstruct
model: {kind: autoencoder, variant: vae, arch: conv, latent: 4, channels: [8, 16], likelihood_std: 0.5}
train: {epochs: 3, batch_size: 32, optimizer: {name: adamw, lr: 0.005}, checkpoint_every_s: 0}
"""

GAN_SPEC = """\
name: gan
data: {dataset: digits500}
task: generate
model: {kind: gan, arch: dcgan, latent: 8, channels: [8, 16], g_lr: 0.001, d_lr: 0.001}
train: {epochs: 2, batch_size: 32, optimizer: {name: adam}, checkpoint_every_s: 0}
"""


@pytest.mark.slow
def test_a_vae_reconstructs_digits_end_to_end(digits, tmp_path):
    spec, path = run_spec(tmp_path, VAE_SPEC)
    run_dir = tmp_path / "runs" / "vae"
    metrics = train_experiment(spec, path, digits, run_dir, None, progress=False)
    assert metrics["status"] == "finished" and metrics["epochs"] == 3 and metrics["main_metric"] == "mse"
    for epoch in (1, 2, 3):
        assert (run_dir / "samples" / f"epoch_{epoch:03d}.png").read_bytes().startswith(PNG)
    rows = history_rows(run_dir)
    assert {"train/loss", "train/mse", "train/elbo", "train/kl", "val/mse", "val/elbo", "val/kl", "val/nll"} <= set(
        rows[0]), rows[0].keys()
    assert float(rows[-1]["val/mse"]) < float(rows[0]["val/mse"])
    assert float(rows[-1]["val/mse"]) < 0.9  # better than predicting the mean (1 in normalised units)

    result = evaluate_run(spec, digits, run_dir, None)
    assert json.loads((run_dir / "eval.json").read_text()) == result
    test = result["test"]
    assert {"mse", "rmse", "elbo", "kl", "nll", "fid", "fid_real_floor", "coverage", "class_entropy_bits",
            "class_counts", "samples"} <= set(test), test.keys()
    assert test["rmse"] == pytest.approx(math.sqrt(test["mse"]))
    assert test["kl"] > 0 and test["elbo"] == pytest.approx(-(test["nll"] + test["kl"]))
    assert test["fid"] >= 0 and 0 < test["coverage"] <= 1 and 0 <= test["class_entropy_bits"] <= math.log2(10)
    assert sum(test["class_counts"]) == test["samples"] == digits.meta.sizes["train"]


@pytest.mark.slow
def test_a_gan_generates_digits_end_to_end(digits, tmp_path):
    spec, path = run_spec(tmp_path, GAN_SPEC)
    run_dir = tmp_path / "runs" / "gan"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    metrics = train_experiment(spec, path, digits, run_dir, store, progress=False)
    assert metrics["status"] == "finished" and metrics["epochs"] == 2 and metrics["main_metric"] == "fid"
    for epoch in (1, 2):
        assert (run_dir / "samples" / f"epoch_{epoch:03d}.png").read_bytes().startswith(PNG)
    rows = history_rows(run_dir)
    assert {"train/d_loss", "train/d_real", "train/d_fake", "train/g_loss", "val/d_loss", "val/g_loss", "val/fid",
            "val/coverage", "val/class_entropy_bits"} <= set(rows[0]), rows[0].keys()
    assert all(math.isfinite(float(r["val/fid"])) and float(r["val/fid"]) >= 0 for r in rows)
    assert 0 < float(rows[-1]["val/coverage"]) <= 1

    test = evaluate_run(spec, digits, run_dir, store)["test"]
    assert {"fid", "fid_real_floor", "coverage", "class_entropy_bits", "d_loss", "g_loss"} <= set(test), test.keys()
    # The classifier that scored the samples travels with the run in MLflow.
    logged = {a.path for a in MlflowClient(store).list_artifacts(metrics["mlflow_run_id"], "feature_classifier")}
    assert logged == {f"feature_classifier/{p.name}" for p in cache_paths(digits.meta.prepared_dir)}
    assert test["fid"] >= 0 and test["fid_real_floor"] >= 0 and 0 < test["coverage"] <= 1
    assert sum(test["class_counts"]) == test["samples"] == digits.meta.sizes["train"]


@pytest.mark.slow
def test_an_interrupted_gan_resumes_to_the_numbers_of_a_straight_run(digits, tmp_path):
    """Two players, two optimizers, sampling noise: the checkpoint must hold all of it."""
    spec, _ = run_spec(tmp_path, GAN_SPEC.replace("epochs: 2", "epochs: 3"))
    straight = Trainer(spec, digits, tmp_path / "straight", progress=False).run()
    with pytest.raises(Interrupt):
        Trainer(spec, digits, tmp_path / "resumed", callbacks=[interrupt_after(2)], progress=False).run()
    resumed_trainer = Trainer(spec, digits, tmp_path / "resumed", progress=False)
    resumed = resumed_trainer.run()
    assert resumed["epochs"] == straight["epochs"] == 3
    assert resumed["final"] == straight["final"]  # d_loss, g_loss, fid, coverage: bit for bit
    straight_model = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=True)["model"]
    for key, value in resumed_trainer.model.state_dict().items():
        assert torch.equal(value, straight_model[key]), key

"""Tasks: what a model learns. Each task gives the engine its optimisation phases and its metrics.

The engine knows nothing of accuracy or R²: a task turns a batch into a loss plus summable statistics
(kept on the device, so no host sync per step), and turns summed statistics into metrics once per epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models.autoencoder import corrupt, gaussian_nll, kl_to_standard_normal
from models.tokens import BOS, EOS, PAD
from pipeline.io import atomic_write_text

Stats = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Stats]]


@dataclass
class Phase:
    """One optimisation step per batch: a loss over a set of parameters, with its own optimizer.

    Most models have one phase; a GAN has two (discriminator, generator) — the engine treats both alike.
    """

    name: str
    params: list[nn.Parameter]
    loss: LossFn
    lr: float | None = None  # overrides the spec's learning rate for this phase
    betas: tuple[float, float] | None = None  # overrides the spec's Adam betas for this phase


class Task(Protocol):
    name: str
    metric: str  # the main metric, a key of summarize()'s result
    mode: Literal["min", "max"]

    def phases(self, model: nn.Module) -> list[Phase]: ...

    def eval_stats(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Stats: ...

    def summarize(self, stats: dict[str, float]) -> dict[str, float]: ...

    def test_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, meta: dict) -> dict: ...

    # Optional: `end_epoch(model, epoch, run_dir, data) -> dict[str, float]`, called after validation each
    # epoch; generative tasks write sample grids / sampled text there and may return extra history columns.


def model_phases(model: nn.Module, default: LossFn) -> list[Phase]:
    """A model that trains in several phases (a GAN) says so with `training_phases()`; others get one."""
    custom = getattr(model, "training_phases", None)
    if custom is not None:
        return custom()
    return [Phase("main", [p for p in model.parameters() if p.requires_grad], default)]


# ── classify ─────────────────────────────────────────────────────────────────
def _classify_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    logits = model(x)  # (B, K)
    loss = F.cross_entropy(logits, y)
    n = y.new_tensor(len(y), dtype=torch.float32)
    return loss, {"loss": loss.detach() * n, "correct": (logits.argmax(1) == y).sum().float(), "n": n}


@dataclass
class ClassifyTask:
    name: str = "classify"
    metric: str = "accuracy"
    mode: Literal["min", "max"] = "max"

    def phases(self, model: nn.Module) -> list[Phase]:
        return model_phases(model, _classify_loss)

    def eval_stats(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Stats:
        return _classify_loss(model, x, y)[1]

    def summarize(self, stats: dict[str, float]) -> dict[str, float]:
        return {"loss": stats["loss"] / stats["n"], "accuracy": stats["correct"] / stats["n"]}

    def test_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, meta: dict) -> dict:
        logits = predict(model, x)
        k = meta["num_classes"]
        pred = logits.argmax(1)
        confusion = torch.bincount(y * k + pred, minlength=k * k).reshape(k, k)  # rows: true, cols: predicted
        tp = confusion.diag().float()
        precision = tp / confusion.sum(0).clamp(min=1)
        recall = tp / confusion.sum(1).clamp(min=1)
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
        present = confusion.sum(1) > 0  # macro-average over classes that occur in the test set
        return {"accuracy": (pred == y).float().mean().item(), "macro_f1": f1[present].mean().item(),
                "cross_entropy": F.cross_entropy(logits, y).item(), "confusion_matrix": confusion.tolist(),
                "classes": meta.get("classes")}


# ── regress ──────────────────────────────────────────────────────────────────
def _regress_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    pred = model(x)  # (B, D), in the standardised units of prepare
    loss = F.mse_loss(pred, y)
    n = y.new_tensor(len(y), dtype=torch.float32)
    err = (pred.detach() - y)
    # R² per epoch from sums: 1 - SSE / (Σy² - (Σy)²/n), over all target dims.
    return loss, {"loss": loss.detach() * n, "abs_err": err.abs().mean(1).sum(), "sse": (err ** 2).sum(),
                  "sum_y": y.sum(0), "sum_y2": (y ** 2).sum(0), "n": n}


@dataclass
class RegressTask:
    name: str = "regress"
    metric: str = "r2"
    mode: Literal["min", "max"] = "max"

    def phases(self, model: nn.Module) -> list[Phase]:
        return model_phases(model, _regress_loss)

    def eval_stats(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Stats:
        return _regress_loss(model, x, y)[1]

    def summarize(self, stats: dict) -> dict[str, float]:
        n = stats["n"]
        sst = float(sum(s2 - s * s / n for s, s2 in zip(_as_list(stats["sum_y"]), _as_list(stats["sum_y2"]))))
        return {"loss": stats["loss"] / n, "mae": stats["abs_err"] / n, "r2": 1.0 - stats["sse"] / max(sst, 1e-12)}

    def test_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, meta: dict) -> dict:
        """MSE and MAE in the target's original units (prepare standardised it), R² (unit-free)."""
        norm = meta["normalisation"]
        mean, std = (torch.tensor(norm[k], dtype=y.dtype, device=y.device) for k in ("y_mean", "y_std"))
        pred, true = predict(model, x) * std + mean, y * std + mean
        sse = ((pred - true) ** 2).sum(0)
        sst = ((true - true.mean(0)) ** 2).sum(0)
        return {"mse": ((pred - true) ** 2).mean().item(), "mae": (pred - true).abs().mean().item(),
                "r2": (1 - sse / sst.clamp(min=1e-12)).mean().item()}


def _as_list(v) -> list[float]:
    return v if isinstance(v, list) else [v]


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Model outputs over a whole split, in eval mode, batch by batch."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


# ── seq2seq ──────────────────────────────────────────────────────────────────
# Contract with the models (transformer encoder_decoder, seq2seq_rnn); ids from models/tokens.py:
#   x = source (B, S), PAD-padded; y = target (B, T), ending in EOS then PAD;
#   model(src, tgt_in) → logits (B, T, V) with tgt_in = [BOS] + y[:, :-1] (teacher forcing);
#   model.generate(src, max_len) → (B, max_len) greedy tokens, PAD after EOS.
def teacher_forcing_input(y: torch.Tensor) -> torch.Tensor:
    """The decoder's input: the target shifted right by one, starting with BOS. (B, T) → (B, T)."""
    return torch.cat([y.new_full((len(y), 1), BOS), y[:, :-1]], dim=1)


def _seq2seq_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """Cross-entropy per non-PAD target token, with the true previous tokens fed in (teacher forcing)."""
    logits = model(x, teacher_forcing_input(y))  # (B, T, V)
    real = y != PAD
    tokens = real.sum().float()
    loss_sum = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=PAD, reduction="sum")
    correct = ((logits.detach().argmax(-1) == y) & real).sum().float()
    return loss_sum / tokens.clamp(min=1), {"loss": loss_sum.detach(), "tokens": tokens, "tf_correct": correct,
                                            "n": y.new_tensor(len(y), dtype=torch.float32)}


def _greedy_stats(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """Greedy decoding, no teacher: per-token hits and whole sequences right (EOS in the right place included)."""
    pred = model.generate(x, y.shape[1])  # (B, T)
    real = y != PAD
    hits = (pred == y) & real
    exact = (hits | ~real).all(dim=1)  # (B,)
    return pred, {"greedy_correct": hits.sum().float(), "exact": exact.sum().float()}


@dataclass
class Seq2SeqTask:
    name: str = "seq2seq"
    metric: str = "exact_accuracy"
    mode: Literal["min", "max"] = "max"

    def phases(self, model: nn.Module) -> list[Phase]:
        return model_phases(model, _seq2seq_loss)

    def eval_stats(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Stats:
        return {**_seq2seq_loss(model, x, y)[1], **_greedy_stats(model, x, y)[1]}

    def summarize(self, stats: dict[str, float]) -> dict[str, float]:
        tokens = max(stats["tokens"], 1.0)
        out = {"loss": stats["loss"] / tokens, "teacher_forced_accuracy": stats["tf_correct"] / tokens}
        if "greedy_correct" in stats:  # validation and test: the model on its own
            out["token_accuracy"] = stats["greedy_correct"] / tokens
            out["exact_accuracy"] = stats["exact"] / max(stats["n"], 1.0)
        return out

    @torch.no_grad()
    def test_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, meta: dict,
                     batch_size: int = 1024, examples: int = 8) -> dict:
        """Token and exact-sequence accuracy by greedy decoding, exact accuracy per source length, examples."""
        model.eval()
        total: dict[str, torch.Tensor] = {}
        preds = []
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            pred, greedy = _greedy_stats(model, xb, yb)
            preds.append(pred)
            for k, v in {**_seq2seq_loss(model, xb, yb)[1], **greedy}.items():
                total[k] = total[k] + v if k in total else v
        pred = torch.cat(preds)
        stats = self.summarize({k: v.item() for k, v in total.items()})
        real = y != PAD
        exact = ((pred == y) | ~real).all(dim=1)
        lengths = (x != PAD).sum(dim=1)
        by_length = {int(n): round(exact[lengths == n].float().mean().item(), 4) for n in lengths.unique()}
        itos = meta.get("itos")
        shown = [{"source": decode_tokens(x[i], itos), "target": decode_tokens(y[i], itos),
                  "predicted": decode_tokens(pred[i], itos)} for i in range(min(examples, len(x)))]
        return {"token_accuracy": stats["token_accuracy"], "exact_accuracy": stats["exact_accuracy"],
                "cross_entropy": stats["loss"], "exact_accuracy_by_source_length": by_length, "examples": shown}


def decode_tokens(ids: torch.Tensor, itos: list[str] | None) -> str:
    """Token ids → text up to the first EOS, PAD and BOS dropped (ids themselves when there is no table)."""
    out = []
    for i in ids.tolist():
        if i == EOS:
            break
        if i in (PAD, BOS):
            continue
        out.append(itos[i] if itos and i < len(itos) else f"[{i}]")
    return ("" if all(len(s) == 1 for s in out) else " ").join(out)


# ── lm ───────────────────────────────────────────────────────────────────────
# Contract: x = tokens (B, T), y = x shifted by one (B, T); model(x) → logits (B, T, V), position t seeing
# x[:, :t+1] only; model.sample(prefix (1, P) long, n_tokens, temperature, generator) → (1, P + n).
def _lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """Mean of −log P(x_t | x_<t) over every position: the loss −Σ log P(x_t | x_<t), per token."""
    logits = model(x)  # (B, T, V)
    loss_sum = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
    tokens = y.new_tensor(y.numel(), dtype=torch.float32)
    return loss_sum / y.numel(), {"loss": loss_sum.detach(), "tokens": tokens}


def text_from_ids(ids: list[int], itos: list[str] | None) -> str:
    return "".join(itos[i] if itos and i < len(itos) else f"[{i}]" for i in ids)


@torch.no_grad()
def sample_text(model: nn.Module, prompt: torch.Tensor, itos: list[str] | None, n_tokens: int, seed: int,
                temperature: float = 1.0) -> str:
    """'prompt|continuation': the model's own text after a prompt from the data, drawn with a fixed seed.

    A dedicated generator, so sampling never moves the training RNG (a resumed run stays identical).
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    seq = model.sample(prompt[None].long(), n_tokens, temperature, generator)  # (1, P + n)
    model.train(was_training)
    ids = seq[0].tolist()
    return text_from_ids(ids[:len(prompt)], itos) + "|" + text_from_ids(ids[len(prompt):], itos)


@dataclass
class LMTask:
    name: str = "lm"
    metric: str = "bits_per_char"
    mode: Literal["min", "max"] = "min"
    prompt_len: int = 16
    sample_tokens: int = 200

    def phases(self, model: nn.Module) -> list[Phase]:
        return model_phases(model, _lm_loss)

    def eval_stats(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Stats:
        return _lm_loss(model, x, y)[1]

    def summarize(self, stats: dict[str, float]) -> dict[str, float]:
        nats = stats["loss"] / max(stats["tokens"], 1.0)  # cross-entropy per token, natural log
        return {"loss": nats, "bits_per_char": nats / math.log(2), "perplexity": math.exp(min(nats, 700.0))}

    def end_epoch(self, model: nn.Module, epoch: int, run_dir, data) -> dict[str, float]:
        """Append this epoch's sampled text to runs/NAME/samples.txt (a resumed run replaces later epochs)."""
        prompt = data.tensors["val_x"][0, :self.prompt_len].to(next(model.parameters()).device)
        text = sample_text(model, prompt, data.meta.get("itos"), self.sample_tokens, seed=epoch)
        path = Path(run_dir) / "samples.txt"
        sections = _epoch_sections(path.read_text() if path.is_file() else "")
        sections = [(e, body) for e, body in sections if e < epoch] + [(epoch, text)]
        atomic_write_text(path, "".join(f"=== epoch {e} ===\n{body}\n" for e, body in sections))
        return {}

    @torch.no_grad()
    def test_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, meta: dict,
                     batch_size: int = 256) -> dict:
        """Cross-entropy (nats), bits per character and perplexity on the test text, the grammar's entropy
        floor when known, and a sampled text."""
        model.eval()
        total: dict[str, torch.Tensor] = {}
        for i in range(0, len(x), batch_size):
            for k, v in _lm_loss(model, x[i:i + batch_size], y[i:i + batch_size])[1].items():
                total[k] = total[k] + v if k in total else v
        stats = self.summarize({k: v.item() for k, v in total.items()})
        out = {"cross_entropy": stats["loss"], "bits_per_char": stats["bits_per_char"],
               "perplexity": stats["perplexity"]}
        entropy = (meta.get("entropy") or {}).get("bits_per_char")
        if entropy is not None:
            out["entropy_bits_per_char"] = entropy  # the source's true entropy rate: no model can go below it
            out["excess_bits_per_char"] = stats["bits_per_char"] - entropy
        out["sample"] = sample_text(model, x[0, :self.prompt_len], meta.get("itos"), 4 * self.sample_tokens, seed=0)
        return out


def _epoch_sections(text: str) -> list[tuple[int, str]]:
    """samples.txt → [(epoch, sample)], parsed from its '=== epoch N ===' headers."""
    sections = []
    for chunk in text.split("=== epoch ")[1:]:
        header, _, body = chunk.partition(" ===\n")
        if header.isdigit():
            sections.append((int(header), body[:-1] if body.endswith("\n") else body))
    return sections


# ── reconstruct ──────────────────────────────────────────────────────────────
# Contract with models/autoencoder.py: model.reconstruct(x) → (x̂, code or μ, log σ² or None), corrupting
# (dae) and sampling z (vae) in train mode only; encode / decode / reparameterise; a vae carries `beta` and
# `likelihood_std` and can sample(n, generator). The target is x itself; y (a label, if any) is unused.
def _reconstruction_terms(model: nn.Module, x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor,
                          logvar: torch.Tensor | None) -> tuple[torch.Tensor, Stats]:
    """ae/dae: the mean squared error. vae: −log p(x | z) + β·KL(q(z | x) ‖ N(0, I)) per sample (nats)."""
    n = x.new_tensor(len(x))
    sse = (recon - x).pow(2).flatten(1).sum(dim=1)  # (B,)
    stats = {"sse": sse.detach().sum(), "elements": n * x[0].numel(), "n": n}
    if logvar is None:
        loss = sse.sum() / (len(x) * x[0].numel())
        stats["loss"] = loss.detach() * n
        return loss, stats
    nll = gaussian_nll(x, recon, model.likelihood_std)  # (B,)
    kl = kl_to_standard_normal(mu, logvar)  # (B,)
    per_sample = nll + model.beta * kl
    stats.update(loss=per_sample.detach().sum(), nll=nll.detach().sum(), kl=kl.detach().sum())
    return per_sample.mean(), stats


def _reconstruct_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    return _reconstruction_terms(model, x, *model.reconstruct(x))


def _seeded(device: torch.device, seed: int) -> torch.Generator:
    """A generator of its own for evaluation noise: the training's random stream is never moved."""
    return torch.Generator(device=device).manual_seed(seed)


def _one_per_class(y: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of `count` samples, the first of each class first, so that a grid shows every class."""
    if y.dtype != torch.long or y.dim() != 1:
        return torch.arange(min(count, len(y)))
    firsts = [int((y == c).nonzero()[0]) for c in y.unique()]
    rest = [i for i in range(len(y)) if i not in set(firsts)]
    return torch.tensor((firsts + rest)[:count])


def _reference(task, device: torch.device):
    """The data's feature classifier (pipeline/quality.py), loaded once per task; None without one."""
    from pipeline.engine.quality import load_reference
    if task._reference is None:
        task._reference = load_reference(task.meta) or False
    return task._reference.to(device) if task._reference else None


@dataclass
class ReconstructTask:
    name: str = "reconstruct"
    metric: str = "mse"  # every variant's reconstruction error (per entry, normalised units); a vae adds elbo
    mode: Literal["min", "max"] = "min"
    grid_columns: int = 10
    meta: dict = field(default_factory=dict)
    _reference: object = field(default=None, repr=False)  # quality.Reference, loaded on first use (vae only)

    def attach(self, meta: dict) -> None:
        self.meta = meta

    def phases(self, model: nn.Module) -> list[Phase]:
        return model_phases(model, _reconstruct_loss)

    def eval_stats(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Stats:
        """Reconstruction error of the clean input with z = μ; for a vae, the ELBO from one z ~ q(z | x)."""
        recon, mu, logvar = model.reconstruct(x)
        _, stats = _reconstruction_terms(model, x, recon, mu, logvar)
        if logvar is not None:
            z = model.reparameterise(mu, logvar, _seeded(x.device, 0))
            _, sampled = _reconstruction_terms(model, x, model.decode(z), mu, logvar)
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

    def end_epoch(self, model: nn.Module, epoch: int, run_dir, data) -> dict[str, float]:
        """samples/epoch_NNN.png: validation inputs against their reconstructions (dae: also from corrupted
        inputs; vae: also samples decoded from z ~ N(0, I)), in the data's original units."""
        from pipeline.engine.grids import display_range, epoch_grid_path, original_units, write_grid
        device = next(model.parameters()).device
        t = data.tensors
        x = t["val_x"][_one_per_class(t["val_y"], self.grid_columns)].to(device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            rows = [("inputs (validation)", x), ("reconstructions", model(x))]
            if model.variant == "dae":
                noisy = corrupt(x, model.noise, model.noise_level, _seeded(device, epoch))
                rows += [(f"corrupted ({model.noise}, {model.noise_level:g})", noisy),
                         ("reconstructed from corrupted", model(noisy))]
            if model.variant == "vae":
                rows.append(("samples, z ~ N(0, I)", model.sample(2 * self.grid_columns, _seeded(device, 0))))
        model.train(was_training)
        panels = [(title, original_units(v, data.meta)) for title, v in rows]
        value_range = display_range(original_units(t["train_x"][:2000], data.meta))
        write_grid(epoch_grid_path(run_dir, epoch), panels, value_range, self.grid_columns,
                   f"{model.variant}, epoch {epoch}")
        return {}

    @torch.no_grad()
    def test_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, meta: dict,
                     batch_size: int = 1024) -> dict:
        """Reconstruction error; dae: also from corrupted inputs, against the corruption's own error;
        vae: ELBO, KL, and the quality of its samples (FID and class coverage, see pipeline/quality.py)."""
        model.eval()
        total: dict[str, torch.Tensor] = {}
        for i in range(0, len(x), batch_size):
            for k, v in self.eval_stats(model, x[i:i + batch_size], y[i:i + batch_size]).items():
                total[k] = total[k] + v if k in total else v
        stats = self.summarize({k: v.item() for k, v in total.items()})
        out = {"mse": stats["mse"], "rmse": math.sqrt(stats["mse"])}
        if model.variant == "dae":
            noisy = corrupt(x, model.noise, model.noise_level, _seeded(x.device, 0))
            out["corrupted_mse"] = (noisy - x).pow(2).mean().item()  # the noise's own error, for scale
            out["denoised_mse"] = (predict(model, noisy) - x).pow(2).mean().item()
        if model.variant == "vae":
            out.update(elbo=stats["elbo"], kl=stats["kl"], nll=stats["nll"])
            out.update(_sample_quality(_reference(self, x.device), model, x, self.meta))
        return out


def _sample_quality(reference, model: nn.Module, real: torch.Tensor, meta: dict) -> dict:
    """FID, its real-data floor and class coverage of as many samples as the training split holds (≤ 2000)."""
    from pipeline.engine.quality import sample_quality, training_samples
    if reference is None:
        return {}
    yardstick = training_samples(meta, 2000)
    generated = model.sample(len(yardstick), _seeded(real.device, 0))
    return sample_quality(reference, generated, real, yardstick)


# ── generate ─────────────────────────────────────────────────────────────────
# Contract: the model trains itself in phases (`training_phases()`, a GAN's discriminator then generator),
# draws samples with sample(n, generator), and may report its players' losses with adversarial_stats.
def _phases_required(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    raise TypeError(f"task generate needs a model with training_phases(); {type(model).__name__} has none")


@dataclass
class GenerateTask:
    """Per epoch: the players' losses (train/ and val/ d_loss, g_loss), FID and class coverage of
    validation-sized sample sets (val/fid, val/coverage, val/class_entropy_bits) and a grid of samples."""

    name: str = "generate"
    metric: str = "fid"
    mode: Literal["min", "max"] = "min"
    grid_columns: int = 8
    meta: dict = field(default_factory=dict)
    _reference: object = field(default=None, repr=False)  # quality.Reference, loaded on first use

    def attach(self, meta: dict) -> None:
        self.meta = meta

    def phases(self, model: nn.Module) -> list[Phase]:
        return model_phases(model, _phases_required)

    def eval_stats(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Stats:
        """As many samples as the batch (the same z every epoch), judged by D and by the feature classifier."""
        from pipeline.engine.quality import feature_sums
        fake = model.sample(len(x), _seeded(x.device, 0))
        stats = model.adversarial_stats(x, fake) if hasattr(model, "adversarial_stats") else {}
        ref = _reference(self, x.device)
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

    def end_epoch(self, model: nn.Module, epoch: int, run_dir, data) -> dict[str, float]:
        """samples/epoch_NNN.png: samples from the same fixed z every epoch, under a row of real ones."""
        from pipeline.engine.grids import display_range, epoch_grid_path, original_units, write_grid
        device = next(model.parameters()).device
        t = data.tensors
        was_training = model.training
        model.eval()
        fake = model.sample(self.grid_columns ** 2, _seeded(device, 0))
        model.train(was_training)
        real = t["val_x"][_one_per_class(t["val_y"], self.grid_columns)]
        panels = [("real (validation)", original_units(real, data.meta)),
                  ("generated (fixed z)", original_units(fake, data.meta))]
        value_range = display_range(original_units(t["train_x"][:2000], data.meta))
        write_grid(epoch_grid_path(run_dir, epoch), panels, value_range, self.grid_columns, f"epoch {epoch}")
        return {}

    @torch.no_grad()
    def test_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, meta: dict) -> dict:
        """FID against the test split with its real-data floor, class coverage, and the players' test losses."""
        model.eval()
        out: dict = {}
        if hasattr(model, "adversarial_stats"):
            stats = model.adversarial_stats(x, model.sample(len(x), _seeded(x.device, 1)))
            out.update({k: v for k, v in self.summarize({k: v.item() for k, v in stats.items()}).items()})
        out.update(_sample_quality(_reference(self, x.device), model, x, self.meta))
        return out


# One entry per task name; the zoo adds seq2seq, lm, reconstruct and generate.
TASKS: dict[str, Callable[[], Task]] = {"classify": ClassifyTask, "regress": RegressTask, "seq2seq": Seq2SeqTask,
                                        "lm": LMTask, "reconstruct": ReconstructTask, "generate": GenerateTask}


# What data each task reads, by the kind of the prepared data (see data_kind).
TASK_DATA: dict[str, frozenset[str]] = {
    "classify": frozenset({"class"}), "regress": frozenset({"value"}), "seq2seq": frozenset({"token pairs"}),
    "lm": frozenset({"text"}), "reconstruct": frozenset({"class", "value"}), "generate": frozenset({"class", "value"}),
}


def data_kind(meta: dict) -> str:
    """class or value (inputs with labels or real targets), token pairs (seq2seq sources and targets) or text."""
    if meta.get("target") == "tokens":
        return "token pairs" if meta.get("target_len") else "text"
    return meta["target"]


def task_data_mismatch(task: str, meta: dict) -> str | None:
    """Why `task` cannot read the data that `meta` describes, or None when it can."""
    kind, wanted = data_kind(meta), TASK_DATA[task]
    if kind in wanted:
        return None
    return (f"{task} needs {' or '.join(sorted(wanted))} data, but dataset {meta.get('name')!r} holds "
            f"{kind} data; tasks for {kind} data: {', '.join(t for t, kinds in TASK_DATA.items() if kind in kinds)}")


def make_task(name: str, meta: dict | None = None) -> Task:
    """A task for data described by `meta`; a task that needs the data's facts (where its prepared folder
    is, for a feature classifier) takes them through `attach(meta)`."""
    task = TASKS[name]()
    attach = getattr(task, "attach", None)
    if attach is not None:
        attach(meta or {})
    return task

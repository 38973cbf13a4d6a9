"""lm: character-level language modelling; bits per character, perplexity, and sampled text each epoch.

Contract (models.contract.LanguageModel): x = tokens (B, T), y = x shifted by one (B, T); model(x) → logits
(B, T, V), position t seeing x[:, :t+1] only; model.sample(prefix (1, P) long, n_tokens, temperature,
generator) → (1, P + n).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from models.contract import Model, Phase, Stats
from pipeline.data.synthetic import word_validity
from pipeline.engine.tasks.base import TaskDefaults, add_stats, batches
from pipeline.io import atomic_write_text

if TYPE_CHECKING:
    from pipeline.data.prepare import DataMeta


def _lm_loss(model: Model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """Mean of −log P(x_t | x_<t) over every position: the loss −Σ log P(x_t | x_<t), per token."""
    logits = model(x)  # (B, T, V)
    loss_sum = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
    tokens = y.new_tensor(y.numel(), dtype=torch.float32)
    return loss_sum / y.numel(), {"loss": loss_sum.detach(), "tokens": tokens}


def text_from_ids(ids: list[int], itos: list[str] | None) -> str:
    return "".join(itos[i] if itos and i < len(itos) else f"[{i}]" for i in ids)


@torch.no_grad()
def sample_text(model: Model, prompt: torch.Tensor, itos: list[str] | None, n_tokens: int, seed: int,
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
class LMTask(TaskDefaults):
    name: str = "lm"
    metric: str = "bits_per_char"
    reads: frozenset[str] = frozenset({"text"})
    keeps_records = True
    records_ratio = ("loss_bits", "tokens")  # bits_per_char
    prompt_len: int = 16
    sample_tokens: int = 200

    def phases(self, model: Model) -> list[Phase]:
        return model.training_phases(_lm_loss)

    def eval_stats(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> Stats:
        return _lm_loss(model, x, y)[1]

    def summarize(self, stats: dict[str, float]) -> dict[str, float]:
        nats = stats["loss"] / max(stats["tokens"], 1.0)  # cross-entropy per token, natural log
        return {"loss": nats, "bits_per_char": nats / math.log(2), "perplexity": math.exp(min(nats, 700.0))}

    def end_epoch(self, model: Model, epoch: int, run_dir, data) -> dict[str, float]:
        """Append this epoch's sampled text to runs/NAME/samples.txt (a resumed run replaces later epochs); the
        prompt opens the first validation chunk (the first training one where there is no validation split)."""
        from pipeline.data.prepare import shown_split
        prompt = data.tensors[f"{shown_split(data)}_x"][0, :self.prompt_len].to(next(model.parameters()).device)
        text = sample_text(model, prompt, data.meta.itos, self.sample_tokens, seed=epoch)
        path = Path(run_dir) / "samples.txt"
        sections = _epoch_sections(path.read_text() if path.is_file() else "")
        sections = [(e, body) for e, body in sections if e < epoch] + [(epoch, text)]
        atomic_write_text(path, "".join(f"=== epoch {e} ===\n{body}\n" for e, body in sections))
        return {}

    @torch.no_grad()
    def test_metrics(self, model: Model, x: torch.Tensor, y: torch.Tensor, meta: DataMeta,
                     batch_size: int = 256) -> dict:
        """Cross-entropy (nats), bits per character and perplexity on the test text, the grammar's entropy
        floor when known, and a sampled text."""
        model.eval()
        total: Stats = {}
        for i in range(0, len(x), batch_size):
            add_stats(total, _lm_loss(model, x[i:i + batch_size], y[i:i + batch_size])[1])
        stats = self.summarize({k: v.item() for k, v in total.items()})
        out = {"cross_entropy": stats["loss"], "bits_per_char": stats["bits_per_char"],
               "perplexity": stats["perplexity"]}
        entropy = (meta.entropy or {}).get("bits_per_char")
        if entropy is not None:
            out["entropy_bits_per_char"] = entropy  # the source's true entropy rate: no model can go below it
            out["excess_bits_per_char"] = stats["bits_per_char"] - entropy
        out["sample"] = sample_text(model, x[0, :self.prompt_len], meta.itos, 4 * self.sample_tokens, seed=0)
        if entropy is not None:  # the project's grammar made the text: how much of the model's own text is words
            validity = word_validity(out["sample"].split("|", 1)[1])
            if validity is not None:
                out["sample_word_validity"] = validity
        return out

    def example_records(self, model: Model, x: torch.Tensor, y: torch.Tensor, meta: DataMeta) -> dict[str, np.ndarray]:
        """Per test sequence: −Σ log2 P(x_t | x_<t) and the number of tokens."""
        losses = []
        for xb, yb in batches(x, y):
            logits = model(xb)  # (B, T, V)
            losses.append(F.cross_entropy(logits.transpose(1, 2), yb, reduction="none").sum(1) / math.log(2))
        return {"loss_bits": torch.cat(losses).cpu().numpy().astype(np.float64),
                "tokens": np.full(len(x), y.shape[1], dtype=np.int64)}


def _epoch_sections(text: str) -> list[tuple[int, str]]:
    """samples.txt → [(epoch, sample)], parsed from its '=== epoch N ===' headers."""
    sections = []
    for chunk in text.split("=== epoch ")[1:]:
        header, _, body = chunk.partition(" ===\n")
        if header.isdigit():
            sections.append((int(header), body[:-1] if body.endswith("\n") else body))
    return sections

"""seq2seq: token sequences to token sequences, trained with teacher forcing, judged by greedy decoding.

Contract with the models (transformer encoder_decoder, seq2seq_rnn; models.contract.Seq2SeqModel), ids from
models/tokens.py: x = source (B, S), PAD-padded; y = target (B, T), ending in EOS then PAD;
model(src, tgt_in) → logits (B, T, V) with tgt_in = [BOS] + y[:, :-1]; model.generate(src, max_len) → (B, max_len)
greedy tokens, PAD after EOS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from models.contract import Model, Phase, Stats
from models.tokens import BOS, EOS, PAD
from pipeline.engine.tasks.base import TaskDefaults, add_stats, batches

if TYPE_CHECKING:
    from pipeline.data.prepare import DataMeta


def teacher_forcing_input(y: torch.Tensor) -> torch.Tensor:
    """The decoder's input: the target shifted right by one, starting with BOS. (B, T) → (B, T)."""
    return torch.cat([y.new_full((len(y), 1), BOS), y[:, :-1]], dim=1)


def _seq2seq_loss(model: Model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """Cross-entropy per non-PAD target token, with the true previous tokens fed in (teacher forcing)."""
    logits = model(x, teacher_forcing_input(y))  # (B, T, V)
    real = y != PAD
    tokens = real.sum().float()
    loss_sum = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=PAD, reduction="sum")
    correct = ((logits.detach().argmax(-1) == y) & real).sum().float()
    return loss_sum / tokens.clamp(min=1), {"loss": loss_sum.detach(), "tokens": tokens, "tf_correct": correct,
                                            "n": y.new_tensor(len(y), dtype=torch.float32)}


def _greedy_stats(model: Model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """Greedy decoding, no teacher: per-token hits and whole sequences right (EOS in the right place included)."""
    pred = model.generate(x, y.shape[1])  # (B, T)
    real = y != PAD
    hits = (pred == y) & real
    exact = (hits | ~real).all(dim=1)  # (B,)
    return pred, {"greedy_correct": hits.sum().float(), "exact": exact.sum().float()}


@dataclass
class Seq2SeqTask(TaskDefaults):
    name: str = "seq2seq"
    metric: str = "exact_accuracy"
    reads: frozenset[str] = frozenset({"token pairs"})
    keeps_records = True
    records_ratio = ("exact", None)  # exact_accuracy: the whole sequence right

    def phases(self, model: Model) -> list[Phase]:
        return model.training_phases(_seq2seq_loss)

    def eval_stats(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> Stats:
        return {**_seq2seq_loss(model, x, y)[1], **_greedy_stats(model, x, y)[1]}

    def summarize(self, stats: dict[str, float]) -> dict[str, float]:
        tokens = max(stats["tokens"], 1.0)
        out = {"loss": stats["loss"] / tokens, "teacher_forced_accuracy": stats["tf_correct"] / tokens}
        if "greedy_correct" in stats:  # validation and test: the model on its own
            out["token_accuracy"] = stats["greedy_correct"] / tokens
            out["exact_accuracy"] = stats["exact"] / max(stats["n"], 1.0)
        return out

    def inference_forward(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Inference cost is counted on the teacher-forced pass: one decoder step per target position."""
        return model(x, teacher_forcing_input(y))

    @torch.no_grad()
    def test_metrics(self, model: Model, x: torch.Tensor, y: torch.Tensor, meta: DataMeta,
                     batch_size: int = 1024, examples: int = 8) -> dict:
        """Token and exact-sequence accuracy by greedy decoding, exact accuracy per source length, examples."""
        model.eval()
        total: Stats = {}
        preds = []
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            pred, greedy = _greedy_stats(model, xb, yb)
            preds.append(pred)
            add_stats(total, {**_seq2seq_loss(model, xb, yb)[1], **greedy})
        pred = torch.cat(preds)
        stats = self.summarize({k: v.item() for k, v in total.items()})
        real = y != PAD
        exact = ((pred == y) | ~real).all(dim=1)
        lengths = (x != PAD).sum(dim=1)
        by_length = {int(n): round(exact[lengths == n].float().mean().item(), 4) for n in lengths.unique()}
        itos = meta.itos
        shown = [{"source": decode_tokens(x[i], itos), "target": decode_tokens(y[i], itos),
                  "predicted": decode_tokens(pred[i], itos)} for i in range(min(examples, len(x)))]
        return {"token_accuracy": stats["token_accuracy"], "exact_accuracy": stats["exact_accuracy"],
                "cross_entropy": stats["loss"], "exact_accuracy_by_source_length": by_length, "examples": shown}

    def example_records(self, model: Model, x: torch.Tensor, y: torch.Tensor, meta: DataMeta) -> dict[str, np.ndarray]:
        """Greedy decoding per sequence: whole sequence right, tokens right, tokens; teacher-forced loss."""
        parts: dict[str, list] = {"exact": [], "token_correct": [], "tokens": [], "loss": []}
        for xb, yb in batches(x, y):
            real = yb != PAD
            hits = (model.generate(xb, yb.shape[1]) == yb) & real  # (B, T)
            logits = model(xb, teacher_forcing_input(yb))  # (B, T, V)
            loss = F.cross_entropy(logits.transpose(1, 2), yb, ignore_index=PAD, reduction="none").sum(1)  # (B,)
            parts["exact"].append((hits | ~real).all(1))
            parts["token_correct"].append(hits.sum(1))
            parts["tokens"].append(real.sum(1))
            parts["loss"].append(loss)
        return {k: torch.cat(v).cpu().numpy() for k, v in parts.items()}


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

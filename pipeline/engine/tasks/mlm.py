"""mlm: masked language modelling (BERT, Devlin et al. 2019); masked-token accuracy and perplexity.

Each sequence has k = max(1, round(15% of its length)) positions chosen (a fixed count, as BERT's
create_pretraining_data does); of those, 80% become [MASK], 10% a random data token, 10% stay as they were.
The loss is the cross-entropy of the original tokens at the chosen positions only.

Training draws its masks from the global torch generator, which the training seed sets and the checkpoint
saves, so a run is reproducible and a resumed run identical. Evaluation masks are a seeded function of each
sequence's own tokens: every model, epoch, batching and device sees the same masks on validation and test.

Contract (models.contract.MaskedLanguageModel): x = tokens (B, T) (y, the corpus's next characters, is unused);
model(x) → logits (B, T, V + 1) over the data's V tokens and [MASK] = V (models/tokens.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from models.contract import Model, Phase, Stats
from models.tokens import mask_id
from pipeline.engine.tasks.base import TaskDefaults, add_stats, batches

if TYPE_CHECKING:
    from pipeline.data.prepare import DataMeta

MASK_RATE = 0.15  # share of positions chosen for prediction
TO_MASK, TO_RANDOM = 0.8, 0.1  # of the chosen: [MASK], a random token; the rest stay unchanged
EVAL_SEED = 0  # salts the evaluation masks
_PRIME = 2_147_483_647  # 2^31 - 1: products of two residues stay below 2^62, inside int64


def masked_count(length: int) -> int:
    """Positions chosen per sequence of `length` tokens: at least one."""
    return max(1, round(MASK_RATE * length))


def mask_tokens(x: torch.Tensor, uniforms: torch.Tensor, data_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption of x (B, T) from uniforms (3, B, T) in [0, 1) → (inputs (B, T), chosen (B, T) bool).

    The first uniform picks the k chosen positions of each row (its k smallest), the second what becomes of
    each (< 0.8 [MASK], < 0.9 a random token, else unchanged), the third the random token.
    """
    pick, fate, symbol = uniforms
    smallest = pick.topk(masked_count(x.shape[1]), dim=1, largest=False).indices  # (B, k)
    chosen = torch.zeros_like(x, dtype=torch.bool).scatter_(1, smallest, True)
    random_tokens = (symbol * data_vocab).long().clamp_(max=data_vocab - 1)  # uniform over the data's tokens
    inputs = torch.where(chosen & (fate < TO_MASK), torch.full_like(x, mask_id(data_vocab)), x)
    inputs = torch.where(chosen & (fate >= TO_MASK) & (fate < TO_MASK + TO_RANDOM), random_tokens, inputs)
    return inputs, chosen


def eval_uniforms(x: torch.Tensor, seed: int = EVAL_SEED) -> torch.Tensor:
    """Uniforms (3, B, T) that depend on each row's own tokens, its positions and `seed` alone (integer hashing,
    no generator): a split is masked the same way whatever the batch it sits in, the device or the model."""
    key = torch.zeros(len(x), dtype=torch.int64, device=x.device)
    for t in range(x.shape[1]):  # a polynomial hash of the row, mod the prime
        key = (key * 1_000_003 + x[:, t].long() + 1) % _PRIME
    positions = torch.arange(1, x.shape[1] + 1, device=x.device)[None]  # (1, T)
    draws = []
    for salt in range(1, 4):
        h = (key[:, None] * 48_271 + positions * 69_621 + (seed * 3 + salt) * 16_807) % _PRIME  # (B, T)
        for _ in range(3):  # xor-shift then multiply: mixes high bits into low ones, nonlinearly
            h = ((h ^ (h >> 13)) * 48_271) % _PRIME
        draws.append(h.double() / _PRIME)
    return torch.stack(draws).float().clamp_(max=1 - 1e-7)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                      Stats]:
    """Mean cross-entropy of the targets at the chosen positions only, and summable statistics."""
    picked = logits[chosen]  # (M, V + 1)
    wanted = targets[chosen]  # (M,)
    loss_sum = F.cross_entropy(picked, wanted, reduction="sum")
    masked = chosen.sum().float()
    correct = (picked.argmax(-1) == wanted).sum().float()
    return loss_sum / masked, {"loss": loss_sum.detach(), "correct": correct, "masked": masked}


@dataclass
class MLMTask(TaskDefaults):
    name: str = "mlm"
    metric: str = "masked_accuracy"
    reads: frozenset[str] = frozenset({"text"})
    keeps_records = True
    records_ratio = ("correct", "masked")  # masked_accuracy
    data_vocab: int | None = None

    def attach(self, meta: DataMeta) -> None:
        self.data_vocab = meta.vocab_size

    def _loss(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        """Training: a fresh mask each step, from the global generator (seeded, saved in checkpoints)."""
        uniforms = torch.rand((3, *x.shape), device=x.device)
        inputs, chosen = mask_tokens(x, uniforms, self.data_vocab)
        return masked_cross_entropy(model(inputs), x, chosen)

    def phases(self, model: Model) -> list[Phase]:
        return model.training_phases(self._loss)

    def eval_stats(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> Stats:
        inputs, chosen = mask_tokens(x, eval_uniforms(x), self.data_vocab)
        return masked_cross_entropy(model(inputs), x, chosen)[1]

    def summarize(self, stats: dict[str, float]) -> dict[str, float]:
        nats = stats["loss"] / max(stats["masked"], 1.0)
        return {"loss": nats, "masked_accuracy": stats["correct"] / max(stats["masked"], 1.0),
                "perplexity": math.exp(min(nats, 700.0))}

    @torch.no_grad()
    def test_metrics(self, model: Model, x: torch.Tensor, y: torch.Tensor, meta: DataMeta,
                     batch_size: int = 512) -> dict:
        """Masked-token accuracy, cross-entropy (nats) and perplexity on the test text's fixed masks, and the
        accuracy of always guessing the test text's most common token (the floor a model must beat)."""
        self.attach(meta)
        model.eval()
        total: Stats = {}
        for xb, yb in batches(x, y, batch_size):
            add_stats(total, self.eval_stats(model, xb, yb))
        stats = self.summarize({k: v.item() for k, v in total.items()})
        chosen = mask_tokens(x, eval_uniforms(x), meta.vocab_size)[1]
        common = x[chosen].bincount(minlength=meta.vocab_size).max().item() / max(int(chosen.sum()), 1)
        return {"masked_accuracy": stats["masked_accuracy"], "cross_entropy": stats["loss"],
                "perplexity": stats["perplexity"], "most_common_token_accuracy": common}

    def example_records(self, model: Model, x: torch.Tensor, y: torch.Tensor, meta: DataMeta) -> dict[str, np.ndarray]:
        """Per test sequence: masked positions predicted right, and masked positions."""
        correct = []
        for xb, _ in batches(x, y):
            inputs, chosen = mask_tokens(xb, eval_uniforms(xb), meta.vocab_size)
            hits = (model(inputs).argmax(-1) == xb) & chosen
            correct.append(hits.sum(1))
        return {"correct": torch.cat(correct).cpu().numpy().astype(np.int64),
                "masked": np.full(len(x), masked_count(x.shape[1]), dtype=np.int64)}

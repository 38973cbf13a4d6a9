"""Recurrent encoder-decoder (Sutskever et al. 2014; Cho et al. 2014) with optional attention (Luong et al. 2015):
the baseline the Transformer replaced.

- The encoder (an LSTM or GRU stack, cells from models/layers/recurrent.py) reads the source tokens; padding
  steps leave its state unchanged, so its final state is the state after the last real token.
- The decoder, a stack of the same shape, starts from the encoder's final states and reads the target shifted
  right ([BOS] + y[:-1]: teacher forcing during training, its own previous guess when generating).
- Attention (Luong's global attention): at each step t the decoder output s_t scores every encoder output h_j,
      dot:       score(s_t, h_j) = s_tᵀ h_j
      additive:  score(s_t, h_j) = vᵀ tanh(W_q s_t + W_k h_j)   (Bahdanau's score function)
  a_t = softmax_j(score) over the real source tokens, context c_t = Σ_j a_tj h_j, and the attentional state
  h̃_t = tanh(W_c [c_t; s_t]) feeds the output layer. Without attention, s_t feeds it directly and the whole
  source must pass through the encoder's final state.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, PositiveInt
from torch import nn

from models.base import ArchitectureError
from models.contract import Model, ModelSpecBase
from models.layers.recurrent import StackedRNN, State
from models.registry import DataShape, register
from models.tokens import BOS, EOS, PAD

AttentionName = Literal["none", "dot", "additive"]


# ── blocks ────────────────────────────────────────────────────────────────────
class GlobalAttention(nn.Module):
    """Luong global attention over the encoder outputs, with a dot or an additive score."""

    def __init__(self, hidden_size: int, score: Literal["dot", "additive"]):
        super().__init__()
        self.score = score
        if score == "additive":
            self.w_query = nn.Linear(hidden_size, hidden_size, bias=False)  # W_q
            self.w_key = nn.Linear(hidden_size, hidden_size, bias=True)  # W_k (its bias is the tanh's shift)
            self.v = nn.Linear(hidden_size, 1, bias=False)  # v
        self.combine = nn.Linear(2 * hidden_size, hidden_size)  # W_c

    def scores(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """queries (B, T, H), keys (B, S, H) → (B, T, S)."""
        if self.score == "dot":
            return queries @ keys.transpose(1, 2)
        q, k = self.w_query(queries), self.w_key(keys)  # (B, T, H), (B, S, H)
        return self.v(torch.tanh(q[:, :, None] + k[:, None])).squeeze(-1)  # (B, T, S, H) → (B, T, S)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Decoder outputs (B, T, H), encoder outputs (B, S, H), key_mask (B, S) True at real tokens → h̃ (B, T, H)."""
        scores = self.scores(queries, keys)
        # the most negative float rather than -inf: an all-padding source (an empty string) gives uniform
        # weights instead of NaN
        scores = scores.masked_fill(~key_mask[:, None], torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1)  # (B, T, S)
        context = weights @ keys  # (B, T, H)
        return torch.tanh(self.combine(torch.cat([context, queries], dim=-1)))


# ── module ────────────────────────────────────────────────────────────────────
class Seq2SeqRNN(Model):
    def __init__(self, vocab_size: int, embed_dim: int, cell: Literal["lstm", "gru"], hidden_size: int,
                 num_layers: int, dropout: float, attention: AttentionName, target_len: int):
        super().__init__()
        self.src_embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        self.tgt_embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        self.encoder = StackedRNN(cell, embed_dim, hidden_size, num_layers, dropout=dropout)
        self.decoder = StackedRNN(cell, embed_dim, hidden_size, num_layers, dropout=dropout)
        self.attention = None if attention == "none" else GlobalAttention(hidden_size, attention)
        self.out = nn.Linear(hidden_size, vocab_size)
        self.target_len = target_len

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, list[State], torch.Tensor]:
        """src (B, S) → encoder outputs (B, S, H), final states (one per layer), source mask (B, S)."""
        mask = src != PAD
        outputs, finals = self.encoder(self.src_embed(src), mask=mask)
        return outputs, finals, mask

    def decode(self, tgt_in: torch.Tensor, states: list[State], memory: torch.Tensor,
               mask: torch.Tensor) -> tuple[torch.Tensor, list[State]]:
        """Decoder inputs (B, T) from `states` → logits (B, T, V) and the states after them."""
        outputs, states = self.decoder(self.tgt_embed(tgt_in), states)  # (B, T, H)
        if self.attention is not None:
            outputs = self.attention(outputs, memory, mask)
        return self.out(outputs), states

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: src (B, S), tgt_in = [BOS] + y[:, :-1] (B, T) → logits (B, T, V)."""
        memory, states, mask = self.encode(src)
        return self.decode(tgt_in, states, memory, mask)[0]

    def example_forward(self, src: torch.Tensor) -> torch.Tensor:
        """A forward pass from the source alone (for `archlab validate`): one BOS as the decoder input."""
        return self(src, torch.full((src.shape[0], 1), BOS, dtype=torch.long, device=src.device))

    @torch.no_grad()
    def generate(self, src: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
        """Greedy decoding: src (B, S) → tokens (B, max_len); after a sequence's EOS, only PAD is written."""
        max_len = max_len or self.target_len
        was_training = self.training
        self.eval()
        memory, states, mask = self.encode(src)
        token = torch.full((src.shape[0], 1), BOS, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], 1, dtype=torch.bool, device=src.device)
        written = []
        for _ in range(max_len):
            logits, states = self.decode(token, states, memory, mask)  # (B, 1, V): one step, state carried
            token = logits.argmax(dim=-1).masked_fill(done, PAD)  # (B, 1)
            written.append(token)
            done = done | (token == EOS)
        self.train(was_training)
        return torch.cat(written, dim=1)


# ── spec ──────────────────────────────────────────────────────────────────────
class Seq2SeqRNNSpec(ModelSpecBase):
    """An LSTM or GRU encoder-decoder with optional attention, for sequence-to-sequence tasks."""

    tasks: ClassVar[frozenset[str]] = frozenset({"seq2seq"})
    kind: Literal["seq2seq_rnn"] = Field(description="Model family: recurrent encoder-decoder (LSTM or GRU).")
    cell: Literal["lstm", "gru"] = Field(default="lstm", description="Recurrent cell of encoder and decoder.")
    embed_dim: PositiveInt = Field(default=64, description="Token embedding size (source and target have their own).")
    hidden_size: PositiveInt = Field(default=128, description="Hidden state size of encoder and decoder.")
    layers: PositiveInt = Field(default=1, le=8, description="Stacked layers in the encoder and in the decoder.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout between stacked layers.")
    attention: AttentionName = Field(default="dot", description="none: the decoder sees only the encoder's final "
                                     "state; dot or additive: Luong global attention with that score function.")


# ── builder ───────────────────────────────────────────────────────────────────
@register(Seq2SeqRNNSpec)
def build_seq2seq_rnn(spec: Seq2SeqRNNSpec, shape: DataShape) -> Seq2SeqRNN:
    if not shape.vocab_size:
        raise ArchitectureError("data.dataset", "seq2seq_rnn needs token data (a dataset with a vocabulary, "
                                f"such as a `sequence` source); this one has inputs of shape {shape.input_shape}")
    return Seq2SeqRNN(vocab_size=shape.vocab_size, embed_dim=spec.embed_dim, cell=spec.cell,
                      hidden_size=spec.hidden_size, num_layers=spec.layers, dropout=spec.dropout,
                      attention=spec.attention, target_len=shape.target_len or shape.max_len or 1)

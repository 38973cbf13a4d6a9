"""The Transformer (Vaswani et al. 2017, "Attention Is All You Need") in its three shapes, from models/layers.

- encoder (BERT-like) for classify: the signal is cut into patches of `patch` steps (an image into rows),
  each patch is projected to d_model and becomes a token; a [CLS] token or the mean of all tokens is classified.
  On token data it is BERT's encoder (Devlin et al. 2019): token embedding (the data's vocabulary plus [MASK])
  + positions → encoder layers, no causal mask. On text it is a masked language model (mlm: vocabulary logits at
  every position, the output layer tied to the embedding); on labelled text a classifier (a [CLS] vector or
  the mean of the positions). Both keep the encoder as `body`, so a classifier can start from an mlm run's.
- encoder_decoder (the paper's shape) for seq2seq: the encoder reads the source; each decoder layer has masked
  self-attention over the target so far, cross-attention to the encoder's output, and an FFN.
  Training uses teacher forcing (`forward(src, tgt_in)`); `generate` decodes greedily, one token at a time.
- decoder (GPT-like) for lm: masked self-attention only; `sample` draws text one token at a time.

Token ids follow models/tokens.py: 0 PAD, 1 BOS, 2 EOS; [MASK] is the first id past the data's vocabulary.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator
from torch import nn

from models.base import ArchitectureError
from models.contract import Model, ModelSpecBase
from models.layers.activations import ActivationName
from models.layers.attention import heads_divide_width
from models.layers.positional import PositionalName, make_positions
from models.layers.transformer_layers import (
    FULL_PARTS,
    LayerParts,
    NormPlacement,
    TokenEmbedding,
    decoder_stack,
    encoder_stack,
)
from models.registry import DataShape, register
from models.tokens import BOS, EOS, PAD, with_mask

TransformerShape = Literal["encoder", "encoder_decoder", "decoder"]
TASKS_BY_SHAPE: dict[str, tuple[str, ...]] = {"encoder": ("classify", "mlm"), "encoder_decoder": ("seq2seq",),
                                              "decoder": ("lm",)}


# ── blocks ────────────────────────────────────────────────────────────────────
def signal_as_sequence(input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(steps, features per step): a signal (L,) is L steps of 1 value, (C, L) L steps of C, an image (C, H, W)
    H rows of C·W values."""
    if len(input_shape) == 1:
        return input_shape[0], 1
    if len(input_shape) == 2:
        return input_shape[1], input_shape[0]
    if len(input_shape) == 3:
        return input_shape[1], input_shape[0] * input_shape[2]
    raise ArchitectureError("data", f"an encoder transformer reads (L,), (C, L) or (C, H, W) inputs, got {input_shape}")


class PatchTokens(nn.Module):
    """Cut a signal into non-overlapping patches of `patch` steps and project each to d_model: (B, ...) → (B, N, D)."""

    def __init__(self, input_shape: tuple[int, ...], patch: int, d_model: int):
        super().__init__()
        steps, features = signal_as_sequence(input_shape)
        if steps % patch:
            raise ArchitectureError("model.patch", f"patch {patch} does not divide the sequence length {steps}; "
                                    f"pick a divisor of {steps}")
        self.input_shape, self.patch = input_shape, patch
        self.tokens = steps // patch
        self.proj = nn.Linear(features * patch, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if x.dim() == 2:  # (B, L): one channel
            x = x[:, None]
        if x.dim() == 3:  # (B, C, L) → (B, L, C): one step's channels side by side
            x = x.transpose(1, 2)
        else:  # (B, C, H, W) → (B, H, C·W): an image row is one step
            x = x.permute(0, 2, 1, 3).flatten(2)
        return self.proj(x.reshape(b, self.tokens, -1))  # (B, N, patch·features) → (B, N, D)


class OutputHead(nn.Module):
    """Hidden state → vocabulary logits; with `tied_to`, the matrix is the token embedding's (section 3.4)."""

    def __init__(self, d_model: int, vocab_size: int, tied_to: TokenEmbedding | None):
        super().__init__()
        self.proj = nn.Linear(d_model, vocab_size)
        if tied_to is not None:
            self.proj.weight = tied_to.weight  # one Parameter, two uses (PyTorch's usual weight tying)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, D) → (B, T, V)
        return self.proj(h)


class TokenEncoder(nn.Module):
    """Tokens → contextual vectors, every position seeing every other: embedding + positions → encoder layers."""

    def __init__(self, vocab_size: int, context: int, d_model: int, heads: int, layers: int, d_ff: int,
                 activation: ActivationName, dropout: float, attention_dropout: float, positional: PositionalName,
                 norm: NormPlacement, parts: LayerParts = FULL_PARTS):
        super().__init__()
        self.embed = TokenEmbedding(vocab_size, d_model)
        self.positions = make_positions(positional, context, d_model)
        self.drop = nn.Dropout(dropout)
        self.encoder = encoder_stack(layers, d_model, heads, d_ff, activation, dropout, attention_dropout, norm, parts)

    def forward(self, x: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T) → (B, T, D); a `prefix` (1, 1, D), such as a [CLS] vector, goes first: (B, 1 + T, D)."""
        h = self.drop(self.positions(self.embed(x)))
        if prefix is not None:
            h = torch.cat([prefix.expand(len(h), -1, -1), h], dim=1)
        return self.encoder(h)


# ── modules ───────────────────────────────────────────────────────────────────
class MaskedLM(Model):
    """BERT's pretraining model: the token encoder, then vocabulary logits at every position (models.contract
    .MaskedLanguageModel); the task scores the masked positions only."""

    def __init__(self, vocab_size: int, context: int, tie_embeddings: bool, **encoder):
        super().__init__()
        self.body = TokenEncoder(vocab_size, context, **encoder)
        self.head = OutputHead(self.body.embed.embed.embedding_dim, vocab_size,
                               self.body.embed if tie_embeddings else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T) → (B, T, V + 1)
        return self.head(self.body(x))

    def transferable(self) -> nn.Module:
        return self.body


class TokenClassifier(Model):
    """The token encoder, then one class per sequence: a [CLS] vector's output or the mean over positions."""

    def __init__(self, vocab_size: int, context: int, pooling: Literal["cls", "mean"], classes: int, **encoder):
        super().__init__()
        self.body = TokenEncoder(vocab_size, context, **encoder)
        d_model = self.body.embed.embed.embedding_dim
        # The [CLS] vector joins after the positions, unnumbered: its own learned value marks it. It is the
        # classifier's, not the body's, so a body pretrained without one loads unchanged.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model)) if pooling == "cls" else None
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T) → (B, K)
        h = self.body(x, self.cls_token)
        return self.head(h[:, 0] if self.cls_token is not None else h.mean(dim=1))

    def transferable(self) -> nn.Module:
        return self.body


class EncoderClassifier(Model):
    """Encoder-only: patches → tokens (+ [CLS]) → positions → N encoder layers → pool → linear classifier."""

    def __init__(self, input_shape: tuple[int, ...], patch: int, d_model: int, heads: int, layers: int, d_ff: int,
                 activation: ActivationName, dropout: float, attention_dropout: float, positional: PositionalName,
                 norm: NormPlacement, pooling: Literal["cls", "mean"], classes: int,
                 parts: LayerParts = FULL_PARTS):
        super().__init__()
        self.patches = PatchTokens(input_shape, patch, d_model)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model)) if pooling == "cls" else None
        self.positions = make_positions(positional, self.patches.tokens + (pooling == "cls"), d_model)
        self.drop = nn.Dropout(dropout)
        self.encoder = encoder_stack(layers, d_model, heads, d_ff, activation, dropout, attention_dropout, norm, parts)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patches(x)  # (B, N, D)
        if self.cls_token is not None:
            h = torch.cat([self.cls_token.expand(len(h), -1, -1), h], dim=1)  # (B, 1 + N, D)
        h = self.encoder(self.drop(self.positions(h)))
        pooled = h[:, 0] if self.cls_token is not None else h.mean(dim=1)  # (B, D)
        return self.head(pooled)  # (B, K)


class EncoderDecoder(Model):
    """The paper's model: encoder over the source, decoder over the shifted target with cross-attention."""

    def __init__(self, vocab_size: int, max_positions: int, d_model: int, heads: int, layers: int, d_ff: int,
                 activation: ActivationName, dropout: float, attention_dropout: float, positional: PositionalName,
                 norm: NormPlacement, tie_embeddings: bool, target_len: int, parts: LayerParts = FULL_PARTS,
                 causal: bool = True):
        super().__init__()
        self.embed = TokenEmbedding(vocab_size, d_model, padding_idx=PAD)  # one vocabulary for source and target
        self.positions = make_positions(positional, max_positions, d_model)
        self.drop = nn.Dropout(dropout)
        self.encoder = encoder_stack(layers, d_model, heads, d_ff, activation, dropout, attention_dropout, norm, parts)
        self.decoder = decoder_stack(layers, d_model, heads, d_ff, activation, dropout, attention_dropout, norm, parts,
                                     causal)
        self.head = OutputHead(d_model, vocab_size, self.embed if tie_embeddings else None)
        self.target_len = target_len

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S) → memory (B, S, D) and its padding mask (B, S), True at PAD."""
        pad = src == PAD
        return self.encoder(self.drop(self.positions(self.embed(src))), padding_mask=pad), pad

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, memory_pad: torch.Tensor) -> torch.Tensor:
        """tgt_in (B, T) = BOS + target so far → logits (B, T, V) for the next token at every position."""
        h = self.decoder(self.drop(self.positions(self.embed(tgt_in))), memory, memory_padding_mask=memory_pad)
        return self.head(h)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: every position sees the true previous tokens. (B, S), (B, T) → (B, T, V)."""
        memory, pad = self.encode(src)
        return self.decode(tgt_in, memory, pad)

    @torch.no_grad()
    def generate(self, src: torch.Tensor, max_len: int) -> torch.Tensor:
        """Greedy decoding: feed back the most likely token each step. (B, S) → (B, max_len), PAD after EOS.

        The loop always runs max_len steps (no data-dependent stop), so it never waits on the device.
        """
        memory, pad = self.encode(src)
        out = torch.full((len(src), max_len + 1), PAD, dtype=torch.long, device=src.device)
        out[:, 0] = BOS
        finished = torch.zeros(len(src), dtype=torch.bool, device=src.device)
        for t in range(max_len):
            next_token = self.decode(out[:, :t + 1], memory, pad)[:, -1].argmax(-1)  # (B,)
            next_token = next_token.masked_fill(finished, PAD)
            out[:, t + 1] = next_token
            finished |= next_token == EOS
        return out[:, 1:]

    def example_forward(self, x: torch.Tensor) -> torch.Tensor:
        """A dry run for `archlab validate`: a source batch and an all-BOS target of the data's target length."""
        return self(x, torch.full((len(x), self.target_len), BOS, dtype=torch.long, device=x.device))


class DecoderOnly(Model):
    """GPT-style: token + position → N masked self-attention layers → next-token logits at every position."""

    def __init__(self, vocab_size: int, context: int, d_model: int, heads: int, layers: int, d_ff: int,
                 activation: ActivationName, dropout: float, attention_dropout: float, positional: PositionalName,
                 norm: NormPlacement, tie_embeddings: bool, parts: LayerParts = FULL_PARTS, causal: bool = True):
        super().__init__()
        self.context, self.causal = context, causal
        self.embed = TokenEmbedding(vocab_size, d_model)
        self.positions = make_positions(positional, context, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = encoder_stack(layers, d_model, heads, d_ff, activation, dropout, attention_dropout, norm, parts)
        self.head = OutputHead(d_model, vocab_size, self.embed if tie_embeddings else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T) → (B, T, V); position t sees x[:, :t+1] only
        h = self.blocks(self.drop(self.positions(self.embed(x))), causal=self.causal)  # unless causal is off
        return self.head(h)

    @torch.no_grad()
    def sample(self, prefix: torch.Tensor, n_tokens: int, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue prefix (1, P) by n_tokens drawn from softmax(logits / temperature) → (1, P + n).

        The model sees at most its last `context` tokens (a sliding window).
        """
        seq = prefix
        for _ in range(n_tokens):
            logits = self(seq[:, -self.context:])[:, -1] / max(temperature, 1e-6)  # (1, V)
            probs = torch.softmax(logits.float(), dim=-1)
            next_token = torch.multinomial(probs.cpu(), 1, generator=generator).to(seq.device)  # (1, 1)
            seq = torch.cat([seq, next_token], dim=1)
        return seq


# ── spec ──────────────────────────────────────────────────────────────────────
class TransformerSpec(ModelSpecBase):
    """A Transformer built from our own attention, positional encodings, FFN and residual + LayerNorm layers."""

    tasks: ClassVar[frozenset[str]] = frozenset(t for tasks in TASKS_BY_SHAPE.values() for t in tasks)
    kind: Literal["transformer"] = Field(description="Model family: Transformer (encoder, encoder-decoder or "
                                         "decoder-only, chosen by `shape`).")
    shape: TransformerShape = Field(description="encoder: classify a signal or image (ViT-like), or on token "
                                    "data BERT's encoder: masked language modelling on text (mlm), classify "
                                    "labelled text; encoder_decoder: seq2seq, as in the original paper; decoder: "
                                    "language modelling, GPT-like.")
    d_model: PositiveInt = Field(default=64, description="Width of every token vector (the residual stream).")
    heads: PositiveInt = Field(default=4, description="Attention heads per layer; must divide d_model.")
    layers: PositiveInt = Field(default=2, description="Layers in the stack (for encoder_decoder: in the encoder "
                                "and in the decoder each).")
    ffn_ratio: PositiveFloat = Field(default=4.0, description="Hidden width of the position-wise FFN as a multiple "
                                     "of d_model (the paper: 2048 / 512 = 4).")
    ffn_dim: PositiveInt | None = Field(default=None, description="Hidden width of the FFN; overrides ffn_ratio.")
    activation: ActivationName = Field(default="relu", description="Non-linearity inside the FFN (the paper: relu; "
                                       "GPT and BERT: gelu).")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="Dropout on each sub-layer's output, inside the "
                           "FFN, and on the embeddings plus positions.")
    attention_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the attention weights.")
    positional: PositionalName = Field(default="sinusoidal", description="Positional encoding: fixed sinusoidal "
                                       "(the paper), learned, or none (an ablation: the model is blind to order).")
    causal: bool = Field(default=True, description="decoder and encoder_decoder only: the decoder's self-attention "
                         "sees only earlier positions (the paper); false is an ablation that lets each position "
                         "read the future, the tokens it is trained to predict included.")
    residual: bool = Field(default=True, description="Residual connection around every sub-layer (the paper); "
                           "false is an ablation.")
    layer_norm: bool = Field(default=True, description="LayerNorm around every sub-layer, and the final one under "
                             "pre-norm (the paper); false is an ablation.")
    norm: NormPlacement = Field(default="post", description="post: LayerNorm(x + SubLayer(x)), as in the paper; "
                                "pre: x + SubLayer(LayerNorm(x)) plus a final LayerNorm (GPT-2, ViT).")
    pooling: Literal["cls", "mean"] = Field(default="cls", description="encoder only, for classify: classify a "
                                            "prepended [CLS] token's output, or the mean over all tokens.")
    patch: PositiveInt = Field(default=1, description="encoder only, on signals: input steps (image rows) per "
                               "token; must divide the sequence length (token data: 1).")
    tie_embeddings: bool = Field(default=True, description="encoder_decoder, decoder and the mlm encoder: the "
                                 "output layer reuses the token embedding matrix (the paper's weight sharing).")

    _heads_divide_width = field_validator("heads")(heads_divide_width)

    @model_validator(mode="after")
    def _causal_needs_a_decoder(self) -> TransformerSpec:
        if not self.causal and self.shape == "encoder":  # by value: a dumped spec (causal: true) validates again
            raise ValueError("causal: false applies to shapes decoder and encoder_decoder only (an encoder "
                             "attends both ways already); remove it")
        return self

    def served_tasks(self) -> frozenset[str]:
        return frozenset(TASKS_BY_SHAPE[self.shape])

    @classmethod
    def describe_tasks(cls) -> str:
        return ", ".join(f"{task} (shape: {shape})" for shape, tasks in TASKS_BY_SHAPE.items() for task in tasks)

    def ffn_width(self) -> int:
        return self.ffn_dim or max(1, round(self.ffn_ratio * self.d_model))


# ── builder ───────────────────────────────────────────────────────────────────
def _needs_tokens(spec: TransformerSpec, shape: DataShape) -> None:
    if shape.vocab_size is None or shape.max_len is None:
        raise ArchitectureError("model.shape", f"a {spec.shape} transformer reads token data (a `sequence` or "
                                f"`corpus` dataset); this dataset holds inputs of shape {shape.input_shape}")


@register(TransformerSpec)
def build_transformer(spec: TransformerSpec, shape: DataShape) -> nn.Module:
    common = dict(d_model=spec.d_model, heads=spec.heads, layers=spec.layers, d_ff=spec.ffn_width(),
                  activation=spec.activation, dropout=spec.dropout, attention_dropout=spec.attention_dropout,
                  positional=spec.positional, norm=spec.norm,
                  parts=LayerParts(residual=spec.residual, layer_norm=spec.layer_norm))
    if spec.shape == "encoder":
        if shape.vocab_size is not None:
            return _token_encoder(spec, shape, common)
        return EncoderClassifier(input_shape=shape.input_shape, patch=spec.patch, pooling=spec.pooling,
                                 classes=shape.output_size, **common)
    _needs_tokens(spec, shape)
    if spec.shape == "encoder_decoder":
        if shape.target_len is None:
            raise ArchitectureError("model.shape", "an encoder_decoder transformer needs source/target pairs "
                                    "(a `sequence` dataset)")
        # One position table serves both sides; the decoder's input is BOS + target[:-1], as long as the target.
        return EncoderDecoder(vocab_size=shape.vocab_size, max_positions=max(shape.max_len, shape.target_len),
                              tie_embeddings=spec.tie_embeddings, target_len=shape.target_len, causal=spec.causal,
                              **common)
    return DecoderOnly(vocab_size=shape.vocab_size, context=shape.max_len, tie_embeddings=spec.tie_embeddings,
                       causal=spec.causal, **common)


def _token_encoder(spec: TransformerSpec, shape: DataShape, common: dict) -> Model:
    """BERT's encoder on token data, its vocabulary the data's plus [MASK]: a classifier on labelled text, else
    a masked language model."""
    if spec.patch != 1:
        raise ArchitectureError("model.patch", "token data has one token per position; patch applies to signals "
                                "and images only: remove it")
    vocab = with_mask(shape.vocab_size)
    if shape.target == "class":
        return TokenClassifier(vocab_size=vocab, context=shape.max_len, pooling=spec.pooling,
                               classes=shape.output_size, **common)
    return MaskedLM(vocab_size=vocab, context=shape.max_len, tie_embeddings=spec.tie_embeddings, **common)

"""Multi-head scaled dot-product attention (Vaswani et al. 2017, section 3.2), from our own projections.

    Attention(Q, K, V) = softmax(Q Kᵀ / √d_k) V
    MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W_O,   head_i = Attention(Q W_Q_i, K W_K_i, V W_V_i)

The h heads' projections are one d_model → d_model matrix each for Q, K and V, split into h slices of
d_k = d_model / h. The core softmax(QKᵀ/√d_k)V is `F.scaled_dot_product_attention` (one fused kernel).
Masks follow torch.nn.MultiheadAttention's convention: True in `key_padding_mask` means "padding, ignore".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def heads_divide_width(heads: int, info) -> int:
    """A spec's `heads` check (pydantic field validator, `d_model` declared before `heads`): each head gets
    d_model / heads dimensions, so heads must divide d_model."""
    d_model = info.data.get("d_model")
    if d_model is not None and d_model % heads:
        raise ValueError(f"d_model {d_model} must be divisible by heads {heads} (each head gets d_model / heads)")
    return heads


def causal_mask(t_query: int, t_key: int, device: torch.device | None = None) -> torch.Tensor:
    """(Tq, Tk) bool, True where query i may attend to key j, i.e. j <= i: no peeking at future tokens."""
    return torch.ones(t_query, t_key, dtype=torch.bool, device=device).tril()


def attention_mask(key_padding_mask: torch.Tensor | None, causal: bool, t_query: int, t_key: int,
                   device: torch.device) -> torch.Tensor | None:
    """One boolean mask for SDPA, True = may attend: (B, 1, Tq, Tk), (Tq, Tk) or None when nothing is masked."""
    mask = causal_mask(t_query, t_key, device) if causal else None
    if key_padding_mask is not None:
        # A row whose keys are all padding (an empty sequence) would softmax over nothing and give NaN;
        # let such rows see every key instead (their output is padding and is never used).
        keep = ~key_padding_mask | key_padding_mask.all(dim=1, keepdim=True)  # (B, Tk)
        keep = keep[:, None, None, :]  # (B, 1, 1, Tk): the same for every head and every query
        mask = keep if mask is None else keep & mask
    return mask


class MultiHeadAttention(nn.Module):
    """h parallel attention heads over d_model-wide inputs; queries may come from a different sequence (cross)."""

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by heads {heads}")
        self.heads, self.d_head = heads, d_model // heads
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)  # W_Q for all heads side by side
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)  # W_O
        self.dropout = dropout  # on the attention weights, in training only

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.d_head).transpose(1, 2)  # (B, T, D) → (B, H, T, d_k)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """query (B, Tq, D), key and value (B, Tk, D); key_padding_mask (B, Tk) True at padding → (B, Tq, D)."""
        q, k, v = self._split_heads(self.q_proj(query)), self._split_heads(self.k_proj(key)), \
            self._split_heads(self.v_proj(value))  # (B, H, T, d_k)
        dropout = self.dropout if self.training else 0.0
        if causal and key_padding_mask is None and q.shape[2] == k.shape[2]:
            # Plain causal self-attention: SDPA builds the triangle itself (a faster kernel than an explicit mask).
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)  # (B, H, Tq, d_k)
        else:
            mask = attention_mask(key_padding_mask, causal, q.shape[2], k.shape[2], q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B, H, Tq, d_k)
        b, _, t, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.d_head))  # concat heads, W_O

"""Shared Transformer blocks: attention against torch's reference, masks, positional encodings, norm placement."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.layers.attention import MultiHeadAttention, causal_mask
from models.layers.positional import LearnedPositions, SinusoidalPositions, sinusoidal_table
from models.layers.transformer_layers import DecoderLayer, EncoderLayer, FeedForward, Residual, TokenEmbedding


def reference_copy(ours: MultiHeadAttention, d_model: int, heads: int) -> nn.MultiheadAttention:
    """torch.nn.MultiheadAttention holding exactly our weights (its in_proj stacks W_Q, W_K, W_V)."""
    ref = nn.MultiheadAttention(d_model, heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    return ref.eval()


@pytest.mark.parametrize("d_model,heads", [(16, 1), (16, 4), (24, 3)])
def test_multi_head_attention_matches_torch_with_the_same_weights(d_model, heads):
    torch.manual_seed(0)
    ours = MultiHeadAttention(d_model, heads).eval()
    ref = reference_copy(ours, d_model, heads)
    query, memory = torch.randn(3, 5, d_model), torch.randn(3, 7, d_model)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 4:] = True  # the second sequence has 4 real keys
    padding[2, 6:] = True

    # self-attention, cross-attention with padding, causal self-attention
    torch.testing.assert_close(ours(query, query, query), ref(query, query, query, need_weights=False)[0])
    torch.testing.assert_close(ours(query, memory, memory, key_padding_mask=padding),
                               ref(query, memory, memory, key_padding_mask=padding, need_weights=False)[0])
    torch_causal = ~causal_mask(5, 5)  # torch's attn_mask: True = may NOT attend
    torch.testing.assert_close(ours(query, query, query, causal=True),
                               ref(query, query, query, attn_mask=torch_causal, need_weights=False)[0])


def test_padding_keys_are_ignored():
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, 2).eval()
    q, k = torch.randn(1, 3, 8), torch.randn(1, 6, 8)
    padding = torch.tensor([[False, False, False, False, True, True]])
    changed = k.clone()
    changed[:, 4:] = 100 * torch.randn(1, 2, 8)  # whatever sits at padded positions must not matter
    torch.testing.assert_close(attn(q, k, k, key_padding_mask=padding), attn(q, changed, changed, key_padding_mask=padding))


def test_an_all_padding_sequence_gives_finite_output_not_nan():
    attn = MultiHeadAttention(8, 2).eval()
    x = torch.randn(2, 4, 8)
    padding = torch.tensor([[True] * 4, [False, False, True, True]])
    assert torch.isfinite(attn(x, x, x, key_padding_mask=padding)).all()


def test_causal_attention_does_not_see_the_future():
    torch.manual_seed(0)
    layer = EncoderLayer(16, 4, 32, "relu", 0.0, 0.0, "post").eval()
    x = torch.randn(2, 8, 16)
    changed = x.clone()
    changed[:, 5] = torch.randn(2, 16)  # change position 5 only
    a, b = layer(x, causal=True), layer(changed, causal=True)
    torch.testing.assert_close(a[:, :5], b[:, :5])  # earlier positions: unchanged
    assert not torch.allclose(a[:, 5:], b[:, 5:])  # position 5 and later: changed
    # without the mask, everything sees everything
    assert not torch.allclose(layer(x)[:, :5], layer(changed)[:, :5])


def test_decoder_layer_is_causal_over_the_target_and_reads_the_memory():
    torch.manual_seed(0)
    layer = DecoderLayer(16, 4, 32, "relu", 0.0, 0.0, "pre").eval()
    y, memory = torch.randn(2, 6, 16), torch.randn(2, 4, 16)
    later = y.clone()
    later[:, 3:] = torch.randn(2, 3, 16)
    torch.testing.assert_close(layer(y, memory)[:, :3], layer(later, memory)[:, :3])
    assert not torch.allclose(layer(y, memory), layer(y, memory + 1.0))  # cross-attention uses the memory


def test_sinusoidal_encodings_follow_the_formula():
    d_model, positions = 10, 50
    table = sinusoidal_table(positions, d_model)
    for pos in range(positions):
        for i in range(d_model // 2):
            angle = pos / 10000 ** (2 * i / d_model)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_encodings_with_an_odd_width():
    table = sinusoidal_table(7, 5)
    assert table.shape == (7, 5)
    assert table[3, 4].item() == pytest.approx(math.sin(3 / 10000 ** (4 / 5)), abs=1e-6)


def test_positions_are_added_fixed_or_learned():
    x = torch.zeros(2, 6, 8)
    fixed = SinusoidalPositions(10, 8)
    torch.testing.assert_close(fixed(x)[0], sinusoidal_table(6, 8))
    assert not list(fixed.parameters()) and "table" not in fixed.state_dict()  # nothing to learn or store
    learned = LearnedPositions(10, 8)
    assert learned.table.requires_grad and learned(x).shape == (2, 6, 8)
    learned(x).sum().backward()
    assert learned.table.grad[:6].abs().sum() > 0 and learned.table.grad[6:].abs().sum() == 0


def test_post_norm_normalises_the_sum_and_pre_norm_adds_to_the_stream():
    torch.manual_seed(0)
    x = 5 + 3 * torch.randn(4, 7, 16)
    ffn = FeedForward(16, 32, "relu", 0.0)
    post = Residual(16, "post", 0.0)
    out = post(x, ffn)
    torch.testing.assert_close(out, nn.functional.layer_norm(x + ffn(x), (16,), post.norm.weight, post.norm.bias))
    assert out.mean(-1).abs().max() < 1e-5  # LayerNorm(x + SubLayer(x)): every position normalised
    pre = Residual(16, "pre", 0.0)
    torch.testing.assert_close(pre(x, ffn), x + ffn(pre.norm(x)))


def test_feed_forward_acts_on_each_position_alone():
    torch.manual_seed(0)
    ffn = FeedForward(8, 16, "gelu", 0.0)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(ffn(x)[:, 2], ffn(x[:, 2:3])[:, 0])


def test_token_embedding_is_scaled_to_unit_size():
    torch.manual_seed(0)
    embed = TokenEmbedding(1000, 64, padding_idx=0)
    vectors = embed(torch.arange(1, 1000))
    assert vectors.std().item() == pytest.approx(1.0, rel=0.05)
    assert embed(torch.tensor([0])).abs().sum() == 0  # PAD embeds to zeros

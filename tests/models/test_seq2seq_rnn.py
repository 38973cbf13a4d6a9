"""The recurrent encoder-decoder: shapes, attention by hand, padding and causality, greedy decoding on a hand-made
model, a few training steps, and spec checks."""
from __future__ import annotations

import math

import pytest
import torch

from models import build_model
from models.base import ArchitectureError
from models.registry import DataShape
from models.seq2seq_rnn import GlobalAttention, Seq2SeqRNN, Seq2SeqRNNSpec
from models.tokens import BOS, EOS, FIRST_SYMBOL, PAD
from pipeline.cli import main
from pipeline.engine.tasks import make_task
from pipeline.engine.tasks.seq2seq import teacher_forcing_input
from tests.conftest import fit_losses, reverse_batch, validate_error, write_spec as write_spec_file

SEQ2SEQ = DataShape(input_shape=(6,), output_size=9, vocab_size=9, max_len=6, target_len=7)
ATTENTIONS = ["none", "dot", "additive"]


def seq2seq(**fields) -> Seq2SeqRNN:
    torch.manual_seed(0)
    return build_model(Seq2SeqRNNSpec(kind="seq2seq_rnn", **{"embed_dim": 8, "hidden_size": 16, **fields}), SEQ2SEQ)


# ── shapes and parameters ────────────────────────────────────────────────────
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_output_shapes(attention, cell):
    model = seq2seq(attention=attention, cell=cell, layers=2).eval()
    src, tgt = reverse_batch(3)
    assert model(src, teacher_forcing_input(tgt)).shape == (3, 7, 9)
    assert model.generate(src, 5).shape == (3, 5)
    assert model.generate(src).shape == (3, 7)  # default length: the data's longest target
    assert model.example_forward(torch.zeros(2, 6, dtype=torch.long)).shape == (2, 1, 9)


def test_attention_parameters_counted_by_hand():
    h = 16
    count = {a: sum(p.numel() for p in seq2seq(attention=a).parameters()) for a in ATTENTIONS}
    combine = 2 * h * h + h  # W_c on [c_t; s_t], with bias
    assert seq2seq(attention="none").attention is None
    assert count["dot"] - count["none"] == combine
    assert count["additive"] - count["none"] == combine + h * h + (h * h + h) + h  # + W_q, W_k (bias), v


def test_seq2seq_rnn_needs_token_data():
    with pytest.raises(ArchitectureError) as err:
        build_model(Seq2SeqRNNSpec(kind="seq2seq_rnn"), DataShape(input_shape=(1, 8, 8), output_size=10))
    assert err.value.field == "data.dataset" and "needs token data" in err.value.message


# ── attention by hand ────────────────────────────────────────────────────────
def test_dot_attention_picks_the_aligned_key_and_skips_masked_ones():
    torch.manual_seed(0)
    att = GlobalAttention(2, "dot")
    query = torch.tensor([[[20.0, 0.0]]])  # (B=1, T=1, H=2)
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])  # scores 20, 0, -20
    both = torch.ones(1, 3, dtype=torch.bool)
    expected = torch.tanh(att.combine(torch.cat([keys[:, :1], query], dim=-1)))  # context = the first key
    torch.testing.assert_close(att(query, keys, both), expected)
    first_masked = torch.tensor([[False, True, True]])
    expected = torch.tanh(att.combine(torch.cat([keys[:, 1:2], query], dim=-1)))  # now the second wins
    torch.testing.assert_close(att(query, keys, first_masked), expected)


def test_additive_attention_by_hand():
    att = GlobalAttention(2, "additive")
    with torch.no_grad():  # W_q = W_k = I, no shift, v = (1, 0): score = tanh(q_0 + k_0)
        att.w_query.weight.copy_(torch.eye(2))
        att.w_key.weight.copy_(torch.eye(2))
        att.w_key.bias.zero_()
        att.v.weight.copy_(torch.tensor([[1.0, 0.0]]))
    query = torch.tensor([[[0.5, 7.0]]])
    keys = torch.tensor([[[1.0, 2.0], [-1.0, 4.0]]])
    a, b = math.tanh(1.5), math.tanh(-0.5)
    torch.testing.assert_close(att.scores(query, keys), torch.tensor([[[a, b]]]))
    w = torch.softmax(torch.tensor([a, b]), dim=0)
    context = w[0] * keys[0, 0] + w[1] * keys[0, 1]
    expected = torch.tanh(att.combine(torch.cat([context, query[0, 0]])))
    torch.testing.assert_close(att(query, keys, torch.ones(1, 2, dtype=torch.bool))[0, 0], expected)


@pytest.mark.parametrize("score", ["dot", "additive"])
def test_attention_ignores_what_masked_keys_hold_and_survives_an_empty_source(score):
    torch.manual_seed(0)
    att = GlobalAttention(4, score)
    queries, keys = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[True, True, True, False, False], [True, False, False, False, False]])
    other = keys.clone()
    other[~mask] = torch.randn(int((~mask).sum()), 4) * 10
    torch.testing.assert_close(att(queries, keys, mask), att(queries, other, mask))
    empty = att(queries, keys, torch.zeros(2, 5, dtype=torch.bool))
    assert torch.isfinite(empty).all()


# ── padding, causality and decoding ──────────────────────────────────────────
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_source_padding_is_ignored(attention):
    model = seq2seq(attention=attention, layers=2).eval()
    src, tgt = reverse_batch(4)
    short = src[:2]  # these end in two PADs
    more_pad = torch.cat([short, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    tgt_in = teacher_forcing_input(tgt[:2])
    torch.testing.assert_close(model(short, tgt_in), model(more_pad, tgt_in))
    trimmed = short[:, :4]  # and without the padding at all
    torch.testing.assert_close(model(short, tgt_in), model(trimmed, tgt_in))
    real = short.clone()
    real[:, 4:] = FIRST_SYMBOL  # a real token where the padding was does change the answer
    assert not torch.allclose(model(short, tgt_in), model(real, tgt_in))


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_decoder_output_at_t_ignores_later_target_tokens(attention):
    model = seq2seq(attention=attention, cell="gru", layers=2).eval()
    src, tgt = reverse_batch(4)
    tgt_in = teacher_forcing_input(tgt)
    later = tgt_in.clone()
    later[:, 4:] = FIRST_SYMBOL + 1
    torch.testing.assert_close(model(src, tgt_in)[:, :4], model(src, later)[:, :4])
    assert not torch.allclose(model(src, tgt_in)[:, 4:], model(src, later)[:, 4:])


class CountingSeq2Seq(Seq2SeqRNN):
    """A hand-made model: the next token is the previous one + 1 (FIRST_SYMBOL after BOS), and EOS once as many
    tokens as the source has have been written. Its state is (source length, tokens fed so far), so the count
    only advances if `generate` carries the state from step to step."""

    def encode(self, src):
        mask = src != PAD
        return src, [(mask.sum(1, keepdim=True), torch.zeros(len(src), 1, dtype=torch.long))], mask

    def decode(self, tgt_in, states, memory, mask):
        ((length, fed),) = states
        step = fed + torch.arange(1, tgt_in.shape[1] + 1)[None]  # (B, T): tokens fed up to and including this one
        nxt = torch.where(tgt_in == BOS, torch.full_like(tgt_in, FIRST_SYMBOL), tgt_in + 1)
        nxt = torch.where(step > length, torch.full_like(nxt, EOS), nxt)
        return torch.nn.functional.one_hot(nxt, 20).float(), [(length, fed + tgt_in.shape[1])]


def test_greedy_decoding_on_a_hand_made_model():
    model = CountingSeq2Seq(20, 4, "gru", 4, 1, 0.0, "none", 6)
    src = torch.tensor([[5, 5, 5, PAD, PAD], [5, PAD, PAD, PAD, PAD], [5, 5, 5, 5, 5]])
    s = FIRST_SYMBOL
    expected = [[s, s + 1, s + 2, EOS, PAD, PAD],  # three tokens, EOS, then only PAD
                [s, EOS, PAD, PAD, PAD, PAD],
                [s, s + 1, s + 2, s + 3, s + 4, EOS]]
    assert model.generate(src).tolist() == expected  # max_len defaults to target_len (6)
    assert model.generate(src, 3).tolist() == [row[:3] for row in expected]


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_greedy_output_is_what_teacher_forcing_on_it_predicts(attention):
    """generate steps one token at a time with the state carried; forward runs the whole target at once."""
    model = seq2seq(attention=attention, layers=2).train()
    src, _ = reverse_batch(6)
    out = model.generate(src, 7)
    assert model.training  # generate switches to eval and back
    model.eval()
    logits = model(src, teacher_forcing_input(out))
    alive = torch.cumsum((out == EOS).long(), dim=1) - (out == EOS).long() == 0  # up to and including EOS
    assert torch.equal(logits.argmax(-1)[alive], out[alive])
    after_eos = ~alive
    assert (out[after_eos] == PAD).all()


# ── training ─────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("cell,attention,layers", [("lstm", "none", 1), ("lstm", "dot", 2), ("gru", "additive", 1),
                                                   ("gru", "dot", 1)])
def test_seq2seq_rnn_trains_a_few_steps_and_its_loss_falls(cell, attention, layers):
    model = seq2seq(cell=cell, attention=attention, layers=layers, dropout=0.1 if layers > 1 else 0.0)
    (phase,) = make_task("seq2seq").phases(model)
    x, y = reverse_batch()
    losses = fit_losses(model, phase, x, y, steps=30, lr=3e-2)
    assert losses[-1] < 0.6 * losses[0], losses


# ── specs ────────────────────────────────────────────────────────────────────
MODEL = "kind: seq2seq_rnn, embed_dim: 4, hidden_size: 8"  # the smallest valid one; tests append fields


def write_spec(folder, dataset="reverse", task="seq2seq", extra=""):
    return write_spec_file(folder, MODEL + extra, dataset, task)


@pytest.mark.parametrize("extra", [", cell: gru, attention: additive", ", layers: 2, attention: none"])
def test_a_valid_seq2seq_rnn_spec(extra, project, capsys):
    assert main(["validate", write_spec(project, extra=extra)]) == 0
    assert "seq2seq_rnn for seq2seq on reverse" in capsys.readouterr().out


@pytest.mark.parametrize("dataset,extra,field,words", [
    ("reverse", ", cell: rnn", "model.cell", "'lstm' or 'gru'"),
    ("reverse", ", attention: luong", "model.attention", "'none', 'dot' or 'additive'"),
    ("reverse", ", layers: 9", "model.layers", "less than or equal to 8"),
    ("reverse", ", bidirectional: true", "model.bidirectional", "Extra inputs are not permitted"),
    ("digits", "", "task", "seq2seq needs token pairs data, but dataset 'digits' holds class data"),
])
def test_invalid_seq2seq_rnn_specs_name_the_field(dataset, extra, field, words, project, capsys):
    err = validate_error(write_spec(project, dataset, extra=extra), capsys)
    assert f"t.yaml: {field}: " in err and words in err, err


def test_a_seq2seq_rnn_cannot_classify(project, capsys):
    err = validate_error(write_spec(project, "digits", "classify"), capsys)
    assert "model kind 'seq2seq_rnn' cannot serve task 'classify'" in err, err
    assert "Valid pairs:" in err and "seq2seq_rnn: seq2seq;" in err and "resnet: classify, regress" in err, err

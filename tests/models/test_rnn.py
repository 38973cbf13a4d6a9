"""Recurrent networks: our cells against torch's, how data becomes a sequence, readouts, the language model's
sampling and causality, a few training steps, and spec checks."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models import build_model
from models.base import ArchitectureError
from models.layers.recurrent import STACKS, FusedRNN, StackedRNN
from models.registry import DataShape
from models.rnn import RecurrentLM, RecurrentNet, RNNSpec, SequenceView
from pipeline.cli import main
from pipeline.engine.tasks import make_task
from tests.conftest import fit_losses, validate_error, write_spec as write_spec_file

TORCH_RNN = {"rnn": lambda i, h, **kw: nn.RNN(i, h, nonlinearity="tanh", **kw), "lstm": nn.LSTM, "gru": nn.GRU}
SIGNAL = DataShape(input_shape=(12,), output_size=3)
IMAGE = DataShape(input_shape=(2, 5, 6), output_size=4)
TOKENS = DataShape(input_shape=(10,), output_size=7, vocab_size=7, max_len=10)


def spec(**fields) -> RNNSpec:
    return RNNSpec(kind="rnn", **{"hidden_size": 16, "embed_dim": 8, **fields})


def copy_torch_weights(ours: StackedRNN, ref: nn.RNNBase) -> None:
    """torch names its weights weight_ih_l{k}[_reverse] etc.; the gates are stacked in the same order as ours."""
    with torch.no_grad():
        for k, directions in enumerate(ours.layers):
            for d, layer in enumerate(directions):
                suffix = f"_l{k}" + ("_reverse" if d else "")
                layer.cell.input_proj.weight.copy_(getattr(ref, "weight_ih" + suffix))
                layer.cell.input_proj.bias.copy_(getattr(ref, "bias_ih" + suffix))
                layer.cell.hidden_proj.weight.copy_(getattr(ref, "weight_hh" + suffix))
                layer.cell.hidden_proj.bias.copy_(getattr(ref, "bias_hh" + suffix))


def twin(cell: str, input_size: int, hidden: int, layers: int, bidirectional: bool) -> tuple[StackedRNN, nn.RNNBase]:
    torch.manual_seed(0)
    ref = TORCH_RNN[cell](input_size, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=True)
    ours = StackedRNN(cell, input_size, hidden, layers, bidirectional)
    copy_torch_weights(ours, ref)
    return ours, ref


def stacked_finals(finals, which: int = 0) -> torch.Tensor:
    """Our final states (one tuple per layer and direction) in torch's h_n / c_n layout: (L·D, B, H)."""
    return torch.stack([state[which] for state in finals])


# ── parity with torch.nn.RNN / LSTM / GRU ────────────────────────────────────
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_our_cells_match_torch_with_the_same_weights(cell, layers, bidirectional):
    ours, ref = twin(cell, 4, 6, layers, bidirectional)
    x = torch.randn(3, 5, 4)
    out, finals = ours(x)
    ref_out, ref_state = ref(x)
    assert len(finals) == layers * (2 if bidirectional else 1)
    torch.testing.assert_close(out, ref_out)
    if cell == "lstm":
        h_n, c_n = ref_state
        torch.testing.assert_close(stacked_finals(finals, 1), c_n)
    else:
        h_n = ref_state
    torch.testing.assert_close(stacked_finals(finals), h_n)
    # and the gradients agree too
    out.square().sum().backward()
    ref_out.square().sum().backward()
    torch.testing.assert_close(ours.layers[0][0].cell.hidden_proj.weight.grad, ref.weight_hh_l0.grad)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_our_cells_match_torch_from_a_given_initial_state(cell):
    ours, ref = twin(cell, 4, 6, 2, True)
    x = torch.randn(3, 5, 4)
    h0 = torch.randn(4, 3, 6)  # (L·D, B, H)
    c0 = torch.randn(4, 3, 6)
    states = [(h0[i], c0[i]) if cell == "lstm" else (h0[i],) for i in range(4)]
    out, finals = ours(x, states)
    ref_out, ref_state = ref(x, (h0, c0) if cell == "lstm" else h0)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(stacked_finals(finals), ref_state[0] if cell == "lstm" else ref_state)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_masked_padding_matches_torch_packed_sequences(cell):
    """Our mask carries the state over padding; torch's packed sequences stop at each sequence's length."""
    ours, ref = twin(cell, 4, 6, 2, True)
    x = torch.randn(3, 5, 4)
    lengths = torch.tensor([5, 3, 1])
    mask = torch.arange(5)[None] < lengths[:, None]  # (B, T), True at real steps
    out, finals = ours(x, mask=mask)
    packed_out, ref_state = ref(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    ref_out, _ = pad_packed_sequence(packed_out, batch_first=True)
    torch.testing.assert_close(out[mask], ref_out[mask])
    torch.testing.assert_close(stacked_finals(finals), ref_state[0] if cell == "lstm" else ref_state)


def test_running_in_two_pieces_equals_one_run():
    """Passing the final states back in continues the sequence: what step-by-step decoding relies on."""
    ours, _ = twin("lstm", 4, 6, 2, False)
    x = torch.randn(2, 7, 4)
    whole, finals = ours(x)
    first, mid = ours(x[:, :4])
    second, finals2 = ours(x[:, 4:], mid)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)
    torch.testing.assert_close(stacked_finals(finals2), stacked_finals(finals))


def test_dropout_sits_between_layers_not_after_the_top_one():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4)
    one = StackedRNN("gru", 4, 6, num_layers=1, dropout=0.5).train()
    torch.testing.assert_close(one(x)[0], one(x)[0])
    two = StackedRNN("gru", 4, 6, num_layers=2, dropout=0.5).train()
    assert not torch.allclose(two(x)[0], two(x)[0])
    two.eval()
    torch.testing.assert_close(two(x)[0], two(x)[0])


# ── data as sequences ────────────────────────────────────────────────────────
def test_sequence_view_of_signals_and_images():
    signal = torch.randn(2, 12)
    torch.testing.assert_close(SequenceView((12,))(signal), signal[:, :, None])  # 12 steps of 1 feature
    channels = torch.randn(2, 3, 12)
    torch.testing.assert_close(SequenceView((3, 12))(channels), channels.transpose(1, 2))  # 12 steps of 3
    image = torch.randn(2, 2, 5, 6)
    rows = SequenceView((2, 5, 6))(image)
    assert rows.shape == (2, 5, 12)  # 5 rows, each the 2 channels' 6 pixels
    for t in range(5):
        torch.testing.assert_close(rows[:, t], image[:, :, t, :].reshape(2, 12))


@pytest.mark.parametrize("shape", [SIGNAL, IMAGE], ids=["signal", "image"])
def test_the_network_is_torch_lstm_over_the_steps_then_a_linear_head(shape):
    """End to end: a signal is L steps of one value, an image is H steps of one row; `last` reads h_T."""
    torch.manual_seed(0)
    model: RecurrentNet = build_model(spec(hidden_size=6, layers=2), shape).eval()
    x = torch.randn(3, *shape.input_shape)
    steps = x[:, :, None] if len(shape.input_shape) == 1 else x.permute(0, 2, 1, 3).flatten(2)  # (B, T, F)
    ref = nn.LSTM(steps.shape[2], 6, num_layers=2, batch_first=True)
    copy_torch_weights(model.rnn, ref)
    _, (h_n, _) = ref(steps)
    torch.testing.assert_close(model(x), model.head(h_n[-1]))


def test_an_image_is_read_row_by_row():
    torch.manual_seed(0)
    model: RecurrentNet = build_model(spec(cell="gru"), IMAGE).eval()
    assert model.rnn.layers[0][0].cell.input_proj.in_features == 2 * 6  # one step: a row of both channels
    x = torch.randn(3, 2, 5, 6)
    rows_swapped = x[:, :, [1, 0, 2, 3, 4]]
    assert model(rows_swapped).shape == model(x).shape == (3, 4)
    assert not torch.allclose(model(rows_swapped), model(x), atol=1e-5)  # the order of rows matters
    # the order of pixels within a row is only the order of the input weights' columns: permuting both is a no-op
    before = model(x)
    perm = torch.randperm(6)
    cols_shuffled = x[..., perm]
    assert not torch.allclose(model(cols_shuffled), before, atol=1e-5)
    w = model.rnn.layers[0][0].cell.input_proj.weight  # (3H, C·W), columns channel-major
    with torch.no_grad():
        w.copy_(w.reshape(-1, 2, 6)[..., perm].reshape(-1, 12))
    torch.testing.assert_close(model(cols_shuffled), before)


# ── readouts ─────────────────────────────────────────────────────────────────
def test_readout_last_and_mean_unidirectional():
    torch.manual_seed(0)
    last: RecurrentNet = build_model(spec(readout="last"), SIGNAL).eval()
    mean: RecurrentNet = build_model(spec(readout="mean"), SIGNAL).eval()
    mean.load_state_dict(last.state_dict())
    x = torch.randn(3, 12)
    outputs, _ = last.rnn(last.view(x))  # (B, T, H)
    torch.testing.assert_close(last(x), last.head(outputs[:, -1]))
    torch.testing.assert_close(mean(x), mean.head(outputs.mean(dim=1)))
    assert not torch.allclose(last(x), mean(x))


def test_bidirectional_doubles_the_readout_and_last_reads_each_direction_at_its_end():
    torch.manual_seed(0)
    uni: RecurrentNet = build_model(spec(hidden_size=16), SIGNAL)
    bi: RecurrentNet = build_model(spec(hidden_size=16, bidirectional=True), SIGNAL).eval()
    assert uni.head.in_features == 16 and bi.head.in_features == 32 and bi.rnn.output_size == 32
    x = torch.randn(3, 12)
    outputs, _ = bi.rnn(bi.view(x))  # (B, T, 2H): left-to-right halves first
    forward_end, backward_end = outputs[:, -1, :16], outputs[:, 0, 16:]  # after step T, after step 1
    torch.testing.assert_close(bi(x), bi.head(torch.cat([forward_end, backward_end], dim=1)))
    assert not torch.allclose(bi(x), bi.head(outputs[:, -1]))  # the backward direction's step T is its first
    bi_mean = build_model(spec(hidden_size=16, bidirectional=True, readout="mean"), SIGNAL).eval()
    bi_mean.load_state_dict(bi.state_dict())
    torch.testing.assert_close(bi_mean(x), bi.head(outputs.mean(dim=1)))


def test_readout_flatten_is_the_mnist1d_papers_480_to_10_head():
    """The MNIST-1D paper's GRU: bidirectional, hidden 6, all 40 steps' outputs side by side → 480 → 10."""
    torch.manual_seed(0)
    gru: RecurrentNet = build_model(spec(cell="gru", hidden_size=6, bidirectional=True, readout="flatten"),
                                    DataShape(input_shape=(40,), output_size=10)).eval()
    assert (gru.head.in_features, gru.head.out_features) == (480, 10)
    x = torch.randn(3, 40)
    outputs, _ = gru.rnn(gru.view(x))  # (B, 40, 12)
    torch.testing.assert_close(gru(x), gru.head(outputs.reshape(3, 480)))  # step by step, both directions per step


# ── the language model ───────────────────────────────────────────────────────
def lm(**fields) -> RecurrentLM:
    torch.manual_seed(0)
    return build_model(spec(**fields), TOKENS)


def test_tokens_build_a_language_model_with_logits_per_step():
    model = lm(layers=2)
    assert isinstance(model, RecurrentLM)
    assert model(torch.randint(0, 7, (2, 10))).shape == (2, 10, 7)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_lm_output_at_t_does_not_depend_on_later_tokens(cell):
    model = lm(cell=cell, layers=2).eval()
    x = torch.randint(0, 7, (2, 10), generator=torch.Generator().manual_seed(0))
    changed = x.clone()
    changed[:, 6:] = (x[:, 6:] + 1) % 7
    torch.testing.assert_close(model(x)[:, :6], model(changed)[:, :6])
    assert not torch.allclose(model(x)[:, 6:], model(changed)[:, 6:])


def test_sampling_keeps_the_prefix_and_is_seeded():
    model = lm(layers=2, dropout=0.3).train()
    prefix = torch.tensor([[3, 4, 5], [6, 0, 1]])
    a = model.sample(prefix, 20, 1.0, torch.Generator().manual_seed(7))
    b = model.sample(prefix, 20, 1.0, torch.Generator().manual_seed(7))
    c = model.sample(prefix, 20, 1.0, torch.Generator().manual_seed(8))
    assert a.shape == (2, 23) and a.dtype == torch.long
    assert torch.equal(a[:, :3], prefix) and torch.equal(a, b) and not torch.equal(a, c)
    assert ((a >= 0) & (a < 7)).all()
    assert model.training  # sampling switches to eval and back


def test_temperature_zero_is_greedy_argmax():
    """Greedy with the state carried step by step equals rerunning the whole text and taking each argmax."""
    model = lm(layers=2).eval()
    prefix = torch.tensor([[3, 4], [5, 6]])
    out = model.sample(prefix, 6, temperature=0.0, generator=torch.Generator().manual_seed(0))
    seq = prefix
    for _ in range(6):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(dim=1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    again = model.sample(prefix, 6, temperature=0.0, generator=torch.Generator().manual_seed(123))
    assert torch.equal(out, again)  # no randomness at temperature 0


def test_a_bidirectional_language_model_is_refused():
    with pytest.raises(ArchitectureError) as err:
        build_model(spec(bidirectional=True), TOKENS)
    assert err.value.field == "model.bidirectional"
    assert spec(bidirectional=True).served_tasks() == {"classify", "regress"}
    assert spec().served_tasks() == {"classify", "regress", "lm"}


# ── training ─────────────────────────────────────────────────────────────────
def batch_for(task: str, shape: DataShape) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if task == "lm":
        start, stride = torch.randint(0, 7, (8, 1), generator=g), torch.randint(1, 3, (8, 1), generator=g)
        text = (start + stride * torch.arange(11)) % 7  # counting by 1 or 2 modulo 7: learnable from context
        return text[:, :-1], text[:, 1:]
    return torch.randn(16, *shape.input_shape, generator=g), torch.randint(0, shape.output_size, (16,), generator=g)


CASES = {
    "rnn-signal": ("classify", SIGNAL, {"cell": "rnn"}),
    "lstm-image-2layers": ("classify", IMAGE, {"cell": "lstm", "layers": 2, "dropout": 0.1}),
    "gru-bidirectional-mean": ("classify", SIGNAL, {"cell": "gru", "bidirectional": True, "readout": "mean"}),
    "lstm-lm": ("lm", TOKENS, {"cell": "lstm"}),
    "gru-lm": ("lm", TOKENS, {"cell": "gru"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rnn_trains_a_few_steps_and_its_loss_falls(case):
    task_name, shape, fields = CASES[case]
    torch.manual_seed(0)
    model = build_model(spec(**fields), shape)
    (phase,) = make_task(task_name).phases(model)
    x, y = batch_for(task_name, shape)
    losses = fit_losses(model, phase, x, y, steps=25, lr=3e-2)
    assert losses[-1] < 0.6 * losses[0], losses


# ── specs ────────────────────────────────────────────────────────────────────
MODEL = "kind: rnn, hidden_size: 8, embed_dim: 4"  # the smallest valid one; tests append fields


def write_spec(folder, dataset="digits", task="classify", extra=""):
    return write_spec_file(folder, MODEL + extra, dataset, task)


@pytest.mark.parametrize("dataset,task,extra,words", [
    ("digits", "classify", ", cell: gru, bidirectional: true", "rnn for classify on digits"),
    ("corpus", "lm", ", cell: lstm, layers: 2", "rnn for lm on corpus"),
])
def test_a_valid_rnn_spec(dataset, task, extra, words, project, capsys):
    assert main(["validate", write_spec(project, dataset, task, extra)]) == 0
    assert words in capsys.readouterr().out


@pytest.mark.parametrize("extra,field,words", [
    (", cell: transformer", "model.cell", "'rnn', 'lstm' or 'gru'"),
    (", layers: 17", "model.layers", "less than or equal to 16"),
    (", readout: max", "model.readout", "'last', 'mean' or 'flatten'"),
    (", dropout: 1.0", "model.dropout", "less than 1"),
    (", hidden: 8", "model.hidden", "Extra inputs are not permitted"),
])
def test_invalid_rnn_specs_name_the_field(extra, field, words, project, capsys):
    err = validate_error(write_spec(project, extra=extra), capsys)
    assert f"t.yaml: {field}: " in err and words in err, err


def test_a_bidirectional_rnn_cannot_model_language(project, capsys):
    err = validate_error(write_spec(project, "corpus", "lm", ", bidirectional: true"), capsys)
    assert "model kind 'rnn' cannot serve task 'lm' as configured (it serves classify, regress)" in err, err
    assert "Valid pairs:" in err and "rnn: classify, regress, lm (lm unidirectional only)" in err, err


# ── impl: torch (the fused stack) ────────────────────────────────────────────
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_the_fused_stack_computes_what_the_cells_compute(cell, bidirectional):
    fused = FusedRNN(cell, 3, 5, num_layers=2, bidirectional=bidirectional)
    cells = StackedRNN(cell, 3, 5, 2, bidirectional)
    copy_torch_weights(cells, fused.rnn)
    x = torch.randn(4, 7, 3)
    out_f, finals_f = fused(x)
    out_c, finals_c = cells(x)
    torch.testing.assert_close(out_f, out_c, rtol=1e-5, atol=1e-6)
    assert len(finals_f) == len(finals_c) == 2 * (2 if bidirectional else 1)
    for f, c in zip(finals_f, finals_c):
        assert len(f) == len(c)  # (h,) or (h, c) per layer and direction, as the cells give them
        for a, b in zip(f, c):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_fused_stack_continues_from_given_states_like_the_cells():
    fused, cells = FusedRNN("lstm", 3, 5, num_layers=2), StackedRNN("lstm", 3, 5, 2)
    copy_torch_weights(cells, fused.rnn)
    x = torch.randn(2, 6, 3)
    _, states = cells(x[:, :4])
    torch.testing.assert_close(fused(x[:, 4:], states)[0], cells(x[:, 4:], states)[0], rtol=1e-5, atol=1e-6)


def test_the_fused_lstm_starts_with_its_forget_gate_open_as_the_cells_do():
    torch.manual_seed(0)
    fused = FusedRNN("lstm", 3, 64)
    bias = fused.rnn.bias_ih_l0.detach()
    bound = 1 / math.sqrt(64)
    assert (bias[64:128] >= 1 - bound).all() and (bias[64:128] <= 1 + bound).all()  # forget part shifted by +1
    assert bias[:64].abs().max() <= bound and bias[128:].abs().max() <= bound


def test_the_fused_stack_refuses_a_padding_mask():
    with pytest.raises(ValueError, match="no padding mask"):
        FusedRNN("gru", 3, 4)(torch.randn(2, 5, 3), mask=torch.ones(2, 5, dtype=torch.bool))


@pytest.mark.parametrize("impl", ["cells", "torch"])
def test_both_impls_build_from_a_spec_and_train(impl):
    model = build_model(spec(impl=impl, cell="lstm"), DataShape(input_shape=(12,), output_size=3))
    assert isinstance(model.rnn, STACKS[impl])
    (phase,) = make_task("classify").phases(model)
    losses = fit_losses(model, phase, torch.randn(32, 12), torch.randint(0, 3, (32,)), steps=20, lr=0.01)
    assert losses[-1] < losses[0]

"""The transformer family: its three shapes built, trained a few steps, decoding and sampling, and spec checks."""
from __future__ import annotations

import pytest
import torch

from models import build_model
from models.registry import DataShape
from models.tokens import BOS, EOS, FIRST_SYMBOL, PAD
from models.transformer import DecoderOnly, EncoderDecoder, TransformerSpec
from pipeline.cli import main
from pipeline.engine.tasks import make_task
from pipeline.engine.tasks.seq2seq import teacher_forcing_input
from tests.conftest import fit_losses, reverse_batch, validate_error, with_fields, write_spec as write_spec_file

SIGNAL = DataShape(input_shape=(40,), output_size=10)
SEQ2SEQ = DataShape(input_shape=(6,), output_size=9, vocab_size=9, max_len=6, target_len=7)
LM = DataShape(input_shape=(12,), output_size=7, vocab_size=7, max_len=12)


def spec(**fields) -> TransformerSpec:
    return TransformerSpec(kind="transformer", **{"d_model": 32, "heads": 4, "layers": 1, "dropout": 0.0, **fields})


def batch_for(task: str) -> tuple[torch.Tensor, torch.Tensor]:
    if task == "classify":
        g = torch.Generator().manual_seed(0)
        return torch.randn(16, 40, generator=g), torch.randint(0, 10, (16,), generator=g)
    if task == "seq2seq":
        return reverse_batch()
    text = torch.randint(0, 7, (8, 13), generator=torch.Generator().manual_seed(0))
    return text[:, :-1], text[:, 1:]


CASES = {  # shape → (task, data shape, extra spec fields)
    "encoder": ("classify", SIGNAL, {"patch": 4}),
    "encoder_mean_learned": ("classify", SIGNAL, {"patch": 1, "pooling": "mean", "positional": "learned"}),
    "encoder_decoder": ("seq2seq", SEQ2SEQ, {}),
    "encoder_decoder_pre_untied": ("seq2seq", SEQ2SEQ, {"norm": "pre", "tie_embeddings": False}),
    "decoder": ("lm", LM, {"norm": "pre", "positional": "learned"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_shape_trains_a_few_steps_and_its_loss_falls(case):
    task_name, shape, extra = CASES[case]
    torch.manual_seed(0)
    model = build_model(spec(shape=case.split("_mean")[0].split("_pre")[0], **extra), shape)
    task = make_task(task_name)
    (phase,) = task.phases(model)
    x, y = batch_for(task_name)
    losses = fit_losses(model, phase, x, y, steps=25, lr=3e-3, every_param=False)
    assert losses[-1] < 0.7 * losses[0], losses


def test_output_shapes_of_the_three_shapes():
    assert build_model(spec(shape="encoder", patch=8), SIGNAL)(torch.randn(3, 40)).shape == (3, 10)
    s2s = build_model(spec(shape="encoder_decoder"), SEQ2SEQ)
    src, tgt = reverse_batch(3)
    assert s2s(src, teacher_forcing_input(tgt)).shape == (3, 7, 9)
    assert s2s.generate(src, 7).shape == (3, 7)
    assert s2s.example_forward(torch.zeros(2, 6, dtype=torch.long)).shape == (2, 7, 9)
    assert build_model(spec(shape="decoder"), LM)(torch.zeros(2, 12, dtype=torch.long)).shape == (2, 12, 7)


def test_an_image_is_read_row_by_row():
    model = build_model(spec(shape="encoder", patch=2), DataShape(input_shape=(1, 8, 8), output_size=10))
    assert model.patches.tokens == 4 and model.patches.proj.in_features == 16  # 2 rows of 8 pixels per token
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_tied_embeddings_share_one_matrix():
    tied = build_model(spec(shape="decoder", tie_embeddings=True), LM)
    assert tied.head.proj.weight is tied.embed.weight
    untied = build_model(spec(shape="decoder", tie_embeddings=False), LM)
    assert untied.head.proj.weight is not untied.embed.weight
    assert sum(p.numel() for p in untied.parameters()) > sum(p.numel() for p in tied.parameters())


def test_decoder_only_output_at_t_ignores_later_tokens():
    torch.manual_seed(0)
    model = build_model(spec(shape="decoder", layers=2), LM).eval()
    x = torch.randint(0, 7, (2, 12))
    changed = x.clone()
    changed[:, 8:] = (x[:, 8:] + 1) % 7
    torch.testing.assert_close(model(x)[:, :8], model(changed)[:, :8])
    assert not torch.allclose(model(x)[:, 8:], model(changed)[:, 8:])


def test_encoder_decoder_ignores_source_padding_and_future_target_tokens():
    torch.manual_seed(0)
    model = build_model(spec(shape="encoder_decoder", layers=2), SEQ2SEQ).eval()
    src, tgt = reverse_batch(4)
    tgt_in = teacher_forcing_input(tgt)
    later = tgt_in.clone()
    later[:, 4:] = FIRST_SYMBOL
    torch.testing.assert_close(model(src, tgt_in)[:, :4], model(src, later)[:, :4])
    short = src[:2]  # these end in two PADs: what the pad positions would hold must not matter
    longer_pad = torch.cat([short, torch.zeros(2, 1, dtype=torch.long)], dim=1)  # one PAD more
    torch.testing.assert_close(model(short, tgt_in[:2]), model(longer_pad, tgt_in[:2]))


class CountingDecoder(EncoderDecoder):
    """A hand-made model: the next token is the previous one + 1, and EOS once it passes the source's length."""

    def encode(self, src):
        return src, src == PAD

    def decode(self, tgt_in, memory, memory_pad):
        length = (~memory_pad).sum(1, keepdim=True)  # (B, 1)
        step = torch.arange(1, tgt_in.shape[1] + 1)[None]  # (1, T): how many tokens were fed so far
        nxt = torch.where(tgt_in == BOS, torch.full_like(tgt_in, FIRST_SYMBOL), tgt_in + 1)
        nxt = torch.where(step > length, torch.full_like(nxt, EOS), nxt)
        return torch.nn.functional.one_hot(nxt, 20).float()  # logits with one clear winner per position


def test_greedy_decoding_on_a_hand_made_model():
    model = CountingDecoder(20, 10, 8, 2, 1, 16, "relu", 0.0, 0.0, "sinusoidal", "post", True, 6)
    src = torch.tensor([[5, 5, 5, PAD, PAD], [5, PAD, PAD, PAD, PAD], [5, 5, 5, 5, 5]])
    out = model.generate(src, 6)
    s = FIRST_SYMBOL
    assert out.tolist() == [[s, s + 1, s + 2, EOS, PAD, PAD],  # three tokens, EOS, then PAD
                            [s, EOS, PAD, PAD, PAD, PAD],
                            [s, s + 1, s + 2, s + 3, s + 4, EOS]]


def test_greedy_output_is_what_teacher_forcing_on_it_predicts():
    """generate feeds back its own argmax; fed the same tokens, forward must pick the same ones (masks agree)."""
    torch.manual_seed(1)
    model = build_model(spec(shape="encoder_decoder", layers=2), SEQ2SEQ).eval()
    src, _ = reverse_batch(6)
    out = model.generate(src, 7)
    logits = model(src, teacher_forcing_input(out))
    alive = torch.cumsum((out == EOS).long(), dim=1) - (out == EOS).long() == 0  # up to and including EOS
    assert torch.equal(logits.argmax(-1)[alive], out[alive])


def test_sampling_keeps_the_prefix_is_seeded_and_slides_past_the_context():
    torch.manual_seed(0)
    model: DecoderOnly = build_model(spec(shape="decoder"), LM).eval()
    prefix = torch.tensor([[1, 2, 3]])
    a = model.sample(prefix, 20, 1.0, torch.Generator().manual_seed(7))
    b = model.sample(prefix, 20, 1.0, torch.Generator().manual_seed(7))
    assert a.shape == (1, 23) and torch.equal(a[:, :3], prefix) and torch.equal(a, b)
    assert ((a >= 0) & (a < 7)).all()
    cold = model.sample(prefix, 5, 1e-4, torch.Generator().manual_seed(0))  # temperature → 0: greedy
    assert cold[0, 3].item() == model(prefix)[0, -1].argmax().item()


# ── specs ────────────────────────────────────────────────────────────────────
def test_heads_must_divide_the_width():
    with pytest.raises(ValueError, match="divisible by heads"):
        spec(shape="decoder", d_model=30, heads=4)


def test_served_tasks_follow_the_shape():
    assert spec(shape="encoder").served_tasks() == {"classify", "mlm"}
    assert spec(shape="encoder_decoder").served_tasks() == {"seq2seq"}
    assert spec(shape="decoder").served_tasks() == {"lm"}


def write_spec(folder, dataset, task, shape, extra=""):
    return write_spec_file(folder, with_fields(f"kind: transformer, shape: {shape}, d_model: 16, heads: 2, layers: 1",
                                               extra), dataset, task)


@pytest.mark.parametrize("dataset,task,shape", [("digits", "classify", "encoder"),
                                                ("reverse", "seq2seq", "encoder_decoder"),
                                                ("corpus", "lm", "decoder"), ("corpus", "mlm", "encoder"),
                                                ("corpus_labels", "classify", "encoder")])
def test_a_valid_spec_per_shape(dataset, task, shape, project, capsys):
    assert main(["validate", write_spec(project, dataset, task, shape)]) == 0
    assert "ok" in capsys.readouterr().out


def test_a_decoder_only_transformer_cannot_do_seq2seq(project, capsys):
    err = validate_error(write_spec(project, "reverse", "seq2seq", "decoder"), capsys)
    assert "cannot serve task 'seq2seq' as configured (it serves lm)" in err
    assert "Valid pairs:" in err and "mlp: classify, regress" in err
    assert "transformer: classify (shape: encoder), mlm (shape: encoder), seq2seq (shape: encoder_decoder), " \
           "lm (shape: decoder)" in err


@pytest.mark.parametrize("dataset,task,shape,extra,field,words", [
    ("digits", "classify", "encoder", ", patch: 3", "model.patch", "does not divide"),
    ("digits", "classify", "encoder", ", heads: 3", "model.heads", "divisible by heads"),
    ("digits", "lm", "decoder", "", "task", "lm needs text data, but dataset 'digits' holds class data"),
    ("digits", "classify", "encoder", ", causal: false", "model",
     "causal: false applies to shapes decoder and encoder_decoder only"),
    ("digits", "classify", "encoder", ", positional: off", "model.positional", "'sinusoidal', 'learned' or 'none'"),
    ("digits", "classify", "encoder", ", residual: maybe", "model.residual", "valid boolean"),
])
def test_invalid_transformer_specs_name_the_field(dataset, task, shape, extra, field, words, project, capsys):
    err = validate_error(write_spec(project, dataset, task, shape, extra), capsys)
    assert f"t.yaml: {field}: " in err and words in err, err


# ── ablation switches: causal, positional, residual, layer_norm ──────────────
def test_without_the_causal_mask_the_future_leaks_into_earlier_positions():
    x = torch.randint(0, 7, (2, 12), generator=torch.Generator().manual_seed(1))
    changed = x.clone()
    changed[:, 8:] = (x[:, 8:] + 1) % 7
    for causal in (True, False):
        torch.manual_seed(0)
        model = build_model(spec(shape="decoder", layers=2, causal=causal), LM).eval()
        leaks = not torch.allclose(model(x)[:, :8], model(changed)[:, :8])
        assert leaks == (not causal)


def test_the_encoder_decoder_can_turn_its_causal_mask_off_too():
    src, tgt = reverse_batch(4)
    tgt_in = teacher_forcing_input(tgt)
    later = tgt_in.clone()
    later[:, 4:] = FIRST_SYMBOL
    torch.manual_seed(0)
    model = build_model(spec(shape="encoder_decoder", causal=False), SEQ2SEQ).eval()
    assert not torch.allclose(model(src, tgt_in)[:, :4], model(src, later)[:, :4])


def test_positional_none_adds_nothing_so_an_encoder_is_blind_to_order():
    """With no positions, the embedding passes through untouched and mean pooling over a permutation-equivariant
    encoder is permutation-invariant: reversing the signal's steps leaves the class scores as they were."""
    torch.manual_seed(0)
    model = build_model(spec(shape="encoder", patch=1, pooling="mean", positional="none"), SIGNAL).eval()
    x = torch.randn(3, 40)
    tokens = model.patches(x)
    torch.testing.assert_close(model.positions(tokens), tokens)
    assert sum(p.numel() for p in model.positions.parameters()) == 0
    torch.testing.assert_close(model(x), model(x.flip(1)))
    torch.manual_seed(0)
    with_positions = build_model(spec(shape="encoder", patch=1, pooling="mean", positional="sinusoidal"), SIGNAL).eval()
    assert not torch.allclose(with_positions(x), with_positions(x.flip(1)), atol=1e-5)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_residual_and_layer_norm_can_each_be_removed(norm):
    torch.manual_seed(0)
    full = build_model(spec(shape="encoder", patch=4, norm=norm), SIGNAL).eval()
    no_norm = build_model(spec(shape="encoder", patch=4, norm=norm, layer_norm=False), SIGNAL).eval()
    assert any(isinstance(m, torch.nn.LayerNorm) for m in full.modules())
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in no_norm.modules())
    # without the residual, a sub-layer whose output is zero leaves zero behind instead of its input
    no_skip = build_model(spec(shape="encoder", patch=4, norm=norm, residual=False, layer_norm=False), SIGNAL).eval()
    layer = no_skip.encoder.layers[0]
    with torch.no_grad():
        layer.ffn.w2.weight.zero_()
        layer.ffn.w2.bias.zero_()
    h = torch.randn(2, 5, 32)
    assert torch.count_nonzero(layer(h)) == 0
    skip = build_model(spec(shape="encoder", patch=4, norm=norm, layer_norm=False), SIGNAL).eval()
    layer = skip.encoder.layers[0]
    with torch.no_grad():
        layer.ffn.w2.weight.zero_()
        layer.ffn.w2.bias.zero_()
    torch.testing.assert_close(layer(h), layer.attn_residual(h, lambda t: layer.self_attn(t, t, t)))


def test_a_dumped_encoder_spec_with_causal_true_validates_again():
    encoder = spec(shape="encoder")
    assert TransformerSpec.model_validate(encoder.model_dump()) == encoder

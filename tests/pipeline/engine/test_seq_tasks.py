"""Token data and tasks: the sequence generators, the grammar corpus and its entropy, seq2seq and lm metrics,
sampled text, and real tiny runs through the CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from models.contract import Model
from models.tokens import BOS, EOS, FIRST_SYMBOL, PAD
from pipeline.cli import main
from pipeline.data.prepare import build_arrays, load_prepared
from pipeline.data.synthetic import (
    GRAMMAR,
    addition_sequences,
    generate_corpus,
    grammar_entropy,
    sample_sentence,
    sentence_log2_prob,
    symbol_sequences,
)
from pipeline.engine.examples import example_records, metric_from_records
from pipeline.engine.tasks import LMTask, Seq2SeqTask
from pipeline.engine.tasks.seq2seq import decode_tokens, teacher_forcing_input
from pipeline.specs.datasets import CorpusSource, SequenceSource
from tests.conftest import data_meta


def body(row: np.ndarray) -> list[int]:
    """A source row up to its padding."""
    return [int(t) for t in row if t != PAD]


def target_body(row: np.ndarray) -> list[int]:
    """A target row: the tokens before EOS; checks that EOS comes once and only PAD follows it."""
    ids = row.tolist()
    end = ids.index(EOS)
    assert all(t == PAD for t in ids[end + 1:]), ids
    assert PAD not in ids[:end] and EOS not in ids[:end], ids
    return ids[:end]


# ── the generators ───────────────────────────────────────────────────────────
@pytest.mark.parametrize("task,rule", [("reverse", lambda s: s[::-1]), ("sort", sorted), ("copy", list)])
def test_symbol_tasks_produce_correct_targets(task, rule):
    data = symbol_sequences(task, symbols=7, min_len=2, max_len=9, samples=400, seed=3)
    assert data.source.shape == (400, 9) and data.target.shape == (400, 10)
    lengths = set()
    for src, tgt in zip(data.source, data.target):
        s = body(src)
        lengths.add(len(s))
        assert all(FIRST_SYMBOL <= t < FIRST_SYMBOL + 7 for t in s)
        assert target_body(tgt) == rule(s)
        assert all(t == PAD for t in src[len(s):])  # padding only at the end
    assert lengths == set(range(2, 10))


@pytest.mark.parametrize("base", [10, 2])
def test_addition_targets_are_the_sums(base):
    data = addition_sequences(base=base, min_digits=1, max_digits=4, samples=300, seed=0)
    plus = FIRST_SYMBOL + base

    def number(ids: list[int]) -> int:
        return int("".join(str(t - FIRST_SYMBOL) for t in ids), base)

    for src, tgt in zip(data.source, data.target):
        s = body(src)
        a, b = s[:s.index(plus)], s[s.index(plus) + 1:]
        assert 1 <= len(a) <= 4 and 1 <= len(b) <= 4
        assert number(target_body(tgt)) == number(a) + number(b)
    assert decode_tokens(torch.tensor(data.source[0]), data.itos).count("+") == 1


def test_addition_in_words():
    data = addition_sequences(base=10, min_digits=2, max_digits=2, samples=50, seed=1)
    for src, tgt in zip(data.source[:10], data.target[:10]):
        question, answer = decode_tokens(torch.tensor(src), data.itos), decode_tokens(torch.tensor(tgt), data.itos)
        a, b = question.split("+")
        assert int(a) + int(b) == int(answer)  # "12+34" → "46"


def test_generators_are_seeded():
    a = symbol_sequences("reverse", 10, 1, 10, 100, seed=5)
    b = symbol_sequences("reverse", 10, 1, 10, 100, seed=5)
    c = symbol_sequences("reverse", 10, 1, 10, 100, seed=6)
    assert np.array_equal(a.source, b.source) and not np.array_equal(a.source, c.source)


def test_a_sequence_dataset_is_prepared_as_tokens_with_its_vocabulary():
    arrays, meta = build_arrays("rev", SequenceSource(source="sequence", task="reverse", symbols=5, max_len=6,
                                                      samples=200))
    assert meta.target == "tokens" and meta.vocab_size == 8 and meta.output_size == 8
    assert meta.max_len == 6 and meta.target_len == 7 and meta.itos[:4] == ["<pad>", "<bos>", "<eos>", "a"]
    assert arrays["train_x"].dtype == np.int64 and arrays["train_y"].dtype == np.int64  # never normalised
    assert sum(meta.sizes.values()) == 200


def test_sequence_source_checks_its_lengths_and_base():
    with pytest.raises(ValueError, match="min_len 5 is larger than max_len 3"):
        SequenceSource(source="sequence", min_len=5, max_len=3)
    with pytest.raises(ValueError, match="base of 2 to 10"):
        SequenceSource(source="sequence", task="add", symbols=16)


# ── the grammar corpus ───────────────────────────────────────────────────────
def test_grammar_entropy_matches_the_sampled_sentences():
    """The closed form (expected rule choices × their entropies) against −mean log2 P(sentence) of samples."""
    exact = grammar_entropy()
    rng = np.random.default_rng(0)
    sentences = [sample_sentence(rng) for _ in range(4000)]
    bits = -np.mean([sentence_log2_prob(s) for s in sentences])
    chars = np.mean([len(s) for s in sentences])
    assert chars == pytest.approx(exact["chars_per_sentence"], rel=0.03)
    assert bits / chars == pytest.approx(exact["bits_per_char"], rel=0.03)
    assert 0.3 < exact["bits_per_char"] < 2.0


def test_grammar_parse_recovers_each_sentence_and_rejects_others():
    rng = np.random.default_rng(1)
    for _ in range(200):
        assert sentence_log2_prob(sample_sentence(rng)) < 0
    assert sentence_log2_prob("Alice slept.\n") == pytest.approx(math.log2(0.25 * _p("Name", "Alice") * 0.4
                                                                           * _p("IVerb", "slept") * 0.65))
    with pytest.raises(ValueError, match="not in the grammar"):
        sentence_log2_prob("slept Alice.\n")


def _p(category: str, word: str) -> float:
    return next(p for p, rhs in GRAMMAR[category] if rhs == [word])


def test_corpus_chunks_predict_the_next_character_and_test_is_the_tail():
    spec = CorpusSource(source="corpus", characters=5000, context=16, seed=2)
    arrays, meta = build_arrays("text", spec)
    text = generate_corpus(5000, 2)
    itos = meta.itos
    assert meta.vocab_size == len(set(text)) and meta.max_len == 16 and meta.target_len is None
    assert meta.entropy["bits_per_char"] == pytest.approx(grammar_entropy()["bits_per_char"])
    x, y = arrays["test_x"], arrays["test_y"]
    assert np.array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    decoded = "".join(itos[i] for i in np.concatenate([x.reshape(-1), y[-1, -1:]]))
    chunks = (len(text) - 1) // 16
    assert decoded == text[(chunks - len(x)) * 16:chunks * 16 + 1]  # the test set: the last chunks, in order


def test_a_user_text_file_becomes_a_corpus(project):
    path = project / "poem.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    arrays, meta = build_arrays("poem", CorpusSource(source="corpus", path=path, context=20))
    assert meta.entropy is None and meta.corpus == str(path)
    assert "".join(meta.itos[i] for i in arrays["train_x"][0]) in path.read_text()


@pytest.mark.parametrize("content,words", [("too short", "too short for 20 chunks"),
                                           (b"\xff\xfe\x00bad", "not UTF-8")])
def test_a_bad_text_file_exits_2(content, words, project, capsys):
    path = project / "bad.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    (project / "params.yaml").write_text("datasets:\n  mine: {source: corpus, path: bad.txt}\n")
    assert main(["prepare", "mine"]) == 2
    err = capsys.readouterr().err
    assert "bad.txt: path: " in err and words in err, err
    assert not (project / "data").exists()


# ── seq2seq metrics on hand-made models ──────────────────────────────────────
class ReverseOracle(Model):
    """Reverses the source exactly; `mistake` makes it get the first token of the first sequence wrong."""

    def __init__(self, vocab: int, mistake: bool = False):
        super().__init__()
        self.vocab, self.mistake = vocab, mistake
        self.dummy = nn.Parameter(torch.zeros(()))

    def answer(self, src: torch.Tensor, width: int) -> torch.Tensor:
        out = torch.full((len(src), width), PAD)
        for i, row in enumerate(src):
            s = row[row != PAD].flip(0)
            out[i, :len(s)] = s
            out[i, len(s)] = EOS
        if self.mistake:
            out[0, 0] = FIRST_SYMBOL if out[0, 0] != FIRST_SYMBOL else FIRST_SYMBOL + 1
        return out

    def forward(self, src, tgt_in):
        return 10 * nn.functional.one_hot(self.answer(src, tgt_in.shape[1]), self.vocab).float() + self.dummy

    def generate(self, src, max_len):
        return self.answer(src, max_len)


def reverse_pairs():
    data = symbol_sequences("reverse", 6, 1, 5, 50, seed=0)
    return torch.from_numpy(data.source), torch.from_numpy(data.target), data.itos


def test_seq2seq_metrics_of_a_perfect_and_a_nearly_perfect_model():
    x, y, itos = reverse_pairs()
    task = Seq2SeqTask()
    perfect = task.test_metrics(ReverseOracle(9), x, y, data_meta(itos=itos))
    assert perfect["exact_accuracy"] == 1.0 and perfect["token_accuracy"] == 1.0
    assert perfect["examples"][0]["predicted"] == perfect["examples"][0]["target"]
    assert perfect["examples"][0]["source"][::-1] == perfect["examples"][0]["target"]
    flawed = task.test_metrics(ReverseOracle(9, mistake=True), x, y, data_meta(itos=itos))
    tokens = (y != PAD).sum().item()  # symbols and EOS count, PAD does not
    assert flawed["exact_accuracy"] == pytest.approx(49 / 50)
    assert flawed["token_accuracy"] == pytest.approx((tokens - 1) / tokens)
    assert set(flawed["exact_accuracy_by_source_length"]) <= {1, 2, 3, 4, 5}


def test_seq2seq_keeps_per_example_records_that_add_up_to_its_exact_accuracy():
    x, y, itos = reverse_pairs()
    records = example_records("seq2seq", ReverseOracle(9, mistake=True), x, y, data_meta(itos=itos))
    assert records["exact"].tolist() == [False] + [True] * 49  # the one mistake, in sequence 0
    every = np.arange(len(x))[None]
    assert metric_from_records("seq2seq", records, every)[0] == pytest.approx(49 / 50)


def test_seq2seq_loss_ignores_padding_and_uses_teacher_forcing():
    x, y, _ = reverse_pairs()
    seen = {}

    class Recorder(ReverseOracle):
        def forward(self, src, tgt_in):
            seen["tgt_in"] = tgt_in
            logits = super().forward(src, tgt_in)
            return logits + 50 * torch.rand_like(logits) * (tgt_in == PAD)[..., None]  # noise where y is PAD

    (phase,) = Seq2SeqTask().phases(Recorder(9))
    loss, stats = phase.loss(Recorder(9), x, y)
    assert torch.equal(seen["tgt_in"], teacher_forcing_input(y))
    assert torch.equal(seen["tgt_in"][:, 0], torch.full((len(y),), BOS)) and torch.equal(seen["tgt_in"][:, 1:], y[:, :-1])
    clean, _ = phase.loss(ReverseOracle(9), x, y)
    # Positions whose input is PAD hold PAD targets too (past EOS): their noisy logits change nothing.
    torch.testing.assert_close(loss, clean)
    assert stats["tokens"].item() == (y != PAD).sum().item()


# ── lm metrics and sampled text ──────────────────────────────────────────────
class UniformLM(Model):
    """Every character equally likely: cross-entropy ln V, log2 V bits, perplexity V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, x):
        return self.bias.expand(*x.shape, self.vocab)

    def sample(self, prefix, n_tokens, temperature, generator):
        draws = torch.randint(0, self.vocab, (1, n_tokens), generator=generator)
        return torch.cat([prefix, draws], dim=1)


def test_lm_metrics_of_a_uniform_model():
    x = torch.randint(0, 8, (5, 12))
    y = torch.randint(0, 8, (5, 12))
    out = LMTask().test_metrics(UniformLM(8), x, y, data_meta(itos=list("abcdefgh"),
                                                                     entropy={"bits_per_char": 1.0}))
    assert out["cross_entropy"] == pytest.approx(math.log(8), rel=1e-5)
    assert out["bits_per_char"] == pytest.approx(3.0, rel=1e-5)
    assert out["perplexity"] == pytest.approx(8.0, rel=1e-4)
    assert out["excess_bits_per_char"] == pytest.approx(2.0, rel=1e-4)
    assert isinstance(out["sample"], str) and set(out["sample"]) <= set("abcdefgh|") and len(out["sample"]) > 100


def test_samples_file_gets_one_section_per_epoch_and_a_rerun_epoch_replaces_its_own(tmp_path):
    from pipeline.data.prepare import Prepared
    data = Prepared(meta={"name": "t", "input_shape": [20], "output_size": 4, "itos": list("abcd")},
                    tensors={"val_x": torch.randint(0, 4, (3, 20))})
    task, model = LMTask(sample_tokens=30), UniformLM(4)
    for epoch in (1, 2, 3):
        task.end_epoch(model, epoch, tmp_path, data)
    first = (tmp_path / "samples.txt").read_text()
    task.end_epoch(model, 2, tmp_path, data)  # a resumed run redoing epoch 2
    text = (tmp_path / "samples.txt").read_text()
    assert [line for line in text.splitlines() if line.startswith("===")] == ["=== epoch 1 ===", "=== epoch 2 ==="]
    assert text == first[:first.index("=== epoch 3")]  # same seed per epoch: the same text


# ── real tiny runs through the CLI ───────────────────────────────────────────
PARAMS = """\
datasets:
  tinyrev: {source: sequence, task: reverse, symbols: 4, min_len: 1, max_len: 4, samples: 1000}
  tinytext: {source: corpus, characters: 6000, context: 16}
"""
SEQ_SPEC = """\
name: rev
data: {dataset: tinyrev}
task: seq2seq
model: {kind: transformer, shape: encoder_decoder, d_model: 32, heads: 4, layers: 1, dropout: 0.0}
train: {epochs: 8, batch_size: 32, optimizer: {lr: 0.003}, schedule: {name: cosine, warmup_epochs: 1},
        grad_clip: 1.0}
"""
LM_SPEC = """\
name: lm
data: {dataset: tinytext}
task: lm
model: {kind: transformer, shape: decoder, d_model: 32, heads: 2, layers: 1, dropout: 0.0, norm: pre}
train: {epochs: 3, batch_size: 32, optimizer: {lr: 0.005}}
"""


@pytest.mark.slow
def test_seq2seq_transformer_learns_tiny_reversal_end_to_end(project, capsys):
    (project / "params.yaml").write_text(PARAMS)
    (project / "rev.yaml").write_text(SEQ_SPEC)
    assert main(["train", "rev.yaml", "--no-track"]) == 0
    assert main(["evaluate", "rev.yaml", "--no-track"]) == 0
    history = (project / "runs/rev/seed-0/history.csv").read_text().splitlines()
    assert "val/exact_accuracy" in history[0] and "val/token_accuracy" in history[0]
    result = json.loads((project / "runs/rev/seed-0/eval.json").read_text())
    assert result["main_metric"] == "exact_accuracy"
    assert result["test"]["exact_accuracy"] > 0.8, result["test"]  # short strings, 8 small epochs
    assert result["test"]["examples"][0]["source"] and "predicted" in result["test"]["examples"][0]


@pytest.mark.slow
def test_decoder_only_lm_end_to_end_writes_samples(project, capsys):
    (project / "params.yaml").write_text(PARAMS)
    (project / "lm.yaml").write_text(LM_SPEC)
    assert main(["train", "lm.yaml", "--no-track"]) == 0
    assert main(["evaluate", "lm.yaml", "--no-track"]) == 0
    metrics = json.loads((project / "runs/lm/seed-0/metrics.json").read_text())
    history = metrics["final"]
    assert history["val/bits_per_char"] < math.log2(load_prepared(project / "data/prepared/tinytext")
                                                    .meta.vocab_size)  # better than uniform
    samples = (project / "runs/lm/seed-0/samples.txt").read_text()
    assert samples.count("=== epoch ") == 3
    test = json.loads((project / "runs/lm/seed-0/eval.json").read_text())["test"]
    assert test["entropy_bits_per_char"] < test["bits_per_char"] and "|" in test["sample"]


def test_lm_keeps_per_example_records_that_add_up_to_its_bits_per_char():
    x, y = torch.randint(0, 8, (5, 12)), torch.randint(0, 8, (5, 12))
    records = example_records("lm", UniformLM(8), x, y, data_meta(itos=list("abcdefgh")))
    assert records["tokens"].tolist() == [12] * 5
    every = np.arange(len(x))[None]
    assert metric_from_records("lm", records, every)[0] == pytest.approx(3.0, rel=1e-5)  # log2 8 bits a token


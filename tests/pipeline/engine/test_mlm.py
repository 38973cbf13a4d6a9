"""Masked language modelling and warm starts: BERT's masking, its loss, a tiny pretraining run, the labelled
text it transfers to, and a classifier that starts from (and may freeze) the pretrained encoder."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from models.tokens import mask_id
from pipeline.cli import main
from pipeline.data.prepare import Prepared, build_arrays, load_prepared
from pipeline.data.synthetic import (
    GRAMMAR,
    MAIN_VERB_CLASSES,
    generate_corpus,
    grammar_alphabet,
    main_verb_chunks,
    sample_main_clause,
    sample_sentence,
)
from pipeline.engine.checkpoints import CHECKPOINT, read_checkpoint
from pipeline.engine.tasks import make_task
from pipeline.engine.tasks.mlm import eval_uniforms, mask_tokens, masked_count, masked_cross_entropy
from pipeline.engine.train import Trainer, train_experiment
from pipeline.specs.datasets import CorpusLabelsSource, CorpusSource
from pipeline.specs.experiment import parse_spec
from tests.conftest import validate_error

V = 32  # data tokens; [MASK] is 32


# ── masking ──────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("draw", ["train", "eval"])
def test_15_percent_of_positions_are_chosen_and_split_80_10_10(draw):
    x = torch.randint(0, V, (4000, 64), generator=torch.Generator().manual_seed(0))
    uniforms = torch.rand((3, *x.shape), generator=torch.Generator().manual_seed(1)) if draw == "train" \
        else eval_uniforms(x)
    inputs, chosen = mask_tokens(x, uniforms, V)
    assert (chosen.sum(1) == masked_count(64)).all() and masked_count(64) == round(0.15 * 64)
    assert torch.equal(inputs[~chosen], x[~chosen])  # only chosen positions ever change
    n = chosen.sum().item()
    masked = (inputs == mask_id(V)) & chosen
    swapped = (inputs != x) & chosen & ~masked
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    assert abs(swapped.sum().item() / n - 0.1 * (V - 1) / V) < 0.01  # a random token may be the original one
    assert abs(((inputs == x) & chosen).sum().item() / n - (0.1 + 0.1 / V)) < 0.01
    assert inputs.max() <= mask_id(V) and (inputs[swapped] < V).all()  # random tokens are data tokens
    # The chosen positions spread evenly over the sequence (no position favoured by the mask's hash).
    assert (chosen.float().mean(0) - 0.15625).abs().max() < 0.03


def test_every_sequence_has_at_least_one_masked_position():
    x = torch.randint(0, V, (50, 3))
    assert masked_count(3) == 1 and (mask_tokens(x, torch.rand((3, 50, 3)), V)[1].sum(1) == 1).all()


def test_the_loss_counts_masked_positions_only():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(4, 16, V + 1, generator=g), torch.randint(0, V, (4, 16), generator=g)
    chosen = mask_tokens(targets, torch.rand((3, 4, 16), generator=g), V)[1]
    loss, stats = masked_cross_entropy(logits, targets, chosen)
    other = targets.clone()
    other[~chosen] = (other[~chosen] + 1) % V  # every unmasked target changed
    assert torch.equal(masked_cross_entropy(logits, other, chosen)[0], loss)
    other[chosen] = (other[chosen] + 1) % V  # a masked one changed
    assert not torch.equal(masked_cross_entropy(logits, other, chosen)[0], loss)
    assert stats["masked"].item() == chosen.sum().item()


def test_evaluation_masks_are_fixed_whatever_the_batching():
    x = torch.randint(0, V, (300, 16), generator=torch.Generator().manual_seed(0))
    whole = mask_tokens(x, eval_uniforms(x), V)[0]
    parts = torch.cat([mask_tokens(b, eval_uniforms(b), V)[0] for b in x.split(77)])
    assert torch.equal(whole, parts) and torch.equal(whole, mask_tokens(x, eval_uniforms(x), V)[0])


def test_training_masks_follow_the_global_seed():
    from models import build_model
    data = tiny_corpus()
    task, model = make_task("mlm", data.meta), build_model(spec_of("m", "tiny", "mlm").model, data.shape)
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    x = data.tensors["train_x"][:32]
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        task.phases(model)[0].loss(model, x, x)
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])


# ── data ─────────────────────────────────────────────────────────────────────
def tiny_corpus() -> Prepared:
    arrays, meta = build_arrays("tiny", CorpusSource(source="corpus", characters=8000, context=16))
    return Prepared(meta=meta, tensors={k: torch.from_numpy(v) for k, v in arrays.items()})


def tiny_labels(samples: int = 300) -> Prepared:
    arrays, meta = build_arrays("labels", CorpusLabelsSource(source="corpus_labels", samples=samples, context=16))
    return Prepared(meta=meta, tensors={k: torch.from_numpy(v) for k, v in arrays.items()})


def test_labelled_sentences_are_the_corpus_sentences_and_their_label_is_the_main_verb():
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    classes = {i: {w for _, (w,) in GRAMMAR[rule]} for i, rule in enumerate(("IVerb", "TVerb", "SVerb"))}
    for _ in range(500):
        sentence, rule, verb_end = sample_main_clause(a)
        assert sentence == sample_sentence(b)  # the very same draws: the corpus's text is unchanged
        assert sentence[:verb_end].split(" ")[-1] in classes[rule]
    assert sample_main_clause(np.random.default_rng(0))[0] == generate_corpus(1, 0)  # the corpus's first sentence


def test_corpus_labels_number_characters_as_the_corpus_and_keep_the_label_readable():
    texts, labels = main_verb_chunks(400, 16, seed=1)
    assert all(len(t) == 16 for t in texts) and set(labels.tolist()) == {0, 1, 2}
    data = tiny_labels()
    assert data.meta.itos == grammar_alphabet() == sorted(set(generate_corpus(300_000, 0)))
    assert data.meta.target == "class" and data.meta.classes == MAIN_VERB_CLASSES and data.meta.max_len == 16
    assert data.tensors["train_x"].dtype == torch.int64  # token ids, never standardised


# ── training ─────────────────────────────────────────────────────────────────
MODEL = {"kind": "transformer", "shape": "encoder", "d_model": 32, "heads": 2, "layers": 1, "dropout": 0.0,
         "pooling": "mean"}


def spec_of(name: str, dataset: str, task: str, model: dict | None = None, **train):
    return parse_spec({"name": name, "data": {"dataset": dataset}, "task": task, "model": {**MODEL, **(model or {})},
                       "train": {"epochs": 20, "batch_size": 16, "optimizer": {"lr": 0.003}, **train},
                       "diagnostics": {"enabled": False}}, "t.yaml")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A finished tiny mlm run's folder (about 3 s)."""
    folder = tmp_path_factory.mktemp("mlm") / "seed-0"
    train_experiment(spec_of("m", "tiny", "mlm"), "t.yaml", tiny_corpus(), folder, None, progress=False)
    return folder


def test_an_mlm_run_learns_to_fill_in_masked_characters(pretrained):
    from pipeline.engine.train import load_checkpoint_model
    data = tiny_corpus()
    model, state = load_checkpoint_model(spec_of("m", "tiny", "mlm"), data, pretrained)
    test = make_task("mlm", data.meta).test_metrics(model, data.tensors["test_x"], data.tensors["test_y"], data.meta)
    assert state["status"] == "finished" and state["history"][-1]["val/masked_accuracy"] > 0.3
    # Far above chance (1/32) and above always guessing the most common character (the space).
    assert test["masked_accuracy"] > test["most_common_token_accuracy"] + 0.1
    assert test["perplexity"] == pytest.approx(math.exp(test["cross_entropy"]))


def test_a_classifier_starts_from_the_pretrained_encoder_and_a_frozen_one_stays_put(pretrained, tmp_path):
    weights = read_checkpoint(pretrained / CHECKPOINT)["model"]
    trainer = Trainer(spec_of("p", "labels", "classify", init_from=str(pretrained), freeze=True), tiny_labels(),
                      tmp_path, progress=False)
    body = trainer.model.body.state_dict()
    assert body.keys() == {k[len("body."):] for k in weights if k.startswith("body.")}
    assert all(torch.equal(v, weights[f"body.{k}"]) for k, v in body.items())
    head = {k: v.clone() for k, v in trainer.model.head.state_dict().items()}
    trainer.train_epoch()
    assert all(torch.equal(v, weights[f"body.{k}"]) for k, v in trainer.model.body.state_dict().items())
    assert not all(torch.equal(v, trainer.model.head.state_dict()[k]) for k, v in head.items())
    tuned = Trainer(spec_of("p", "labels", "classify", init_from=str(pretrained.parent)), tiny_labels(),
                    tmp_path / "tuned", progress=False)  # an experiment's folder: seed 0 reads seed-0
    tuned.train_epoch()
    assert not torch.equal(tuned.model.body.embed.weight, weights["body.embed.embed.weight"])  # fine-tuned


def test_with_the_same_seed_pretrained_and_random_encoders_share_the_head_they_start_with(pretrained, tmp_path):
    start = [Trainer(spec_of("p", "labels", "classify", **extra), tiny_labels(), tmp_path / str(i), progress=False)
             for i, extra in enumerate(({}, {"init_from": str(pretrained)}))]
    assert all(torch.equal(a, b) for a, b in zip(start[0].model.head.parameters(), start[1].model.head.parameters()))
    assert not torch.equal(start[0].model.body.embed.weight, start[1].model.body.embed.weight)


# ── mistakes ─────────────────────────────────────────────────────────────────
@pytest.fixture
def tiny_project(tmp_path, monkeypatch, pretrained) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"datasets": {
        "labels": {"source": "corpus_labels", "samples": 300, "context": 16}}, "seeds": 1}))
    return tmp_path


def write(folder: Path, spec) -> str:
    path = folder / "p.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True)))
    return str(path)


@pytest.mark.parametrize("init_from,model,words", [
    ("nowhere", {}, "holds no trained run"),
    ("PRETRAINED", {"d_model": 16}, "do not fit this model's body"),
])
def test_a_bad_init_from_exits_2_naming_the_field(init_from, model, words, tiny_project, pretrained, capsys):
    spec = spec_of("p", "labels", "classify", model, init_from=init_from.replace("PRETRAINED", str(pretrained)))
    assert main(["train", write(tiny_project, spec), "--no-track"]) == 2
    err = capsys.readouterr().err
    assert "train.init_from" in err and words in err and "Traceback" not in err, err
    assert not (tiny_project / "runs" / "p" / "seed-0" / CHECKPOINT).exists()


def test_a_run_still_training_starts_nothing(tiny_project, pretrained, capsys):
    unfinished = tiny_project / "unfinished"
    unfinished.mkdir()
    ckpt = read_checkpoint(pretrained / CHECKPOINT)
    ckpt["state"]["status"] = "running"
    torch.save(ckpt, unfinished / CHECKPOINT)
    spec = spec_of("p", "labels", "classify", init_from=str(unfinished))
    assert main(["train", write(tiny_project, spec), "--no-track"]) == 2
    assert "the run is running, not finished" in capsys.readouterr().err


def test_freezing_a_model_without_an_encoder_to_freeze_exits_2(tiny_project, capsys):
    path = tiny_project / "f.yaml"
    path.write_text("name: p\ndata: {dataset: digits}\ntask: classify\nmodel: {kind: mlp, hidden: [8]}\n"
                    "train: {freeze: true}\n")
    err = validate_error(str(path), capsys)
    assert "f.yaml: train.freeze: model kind 'mlp' has no part" in err


def test_the_labelled_text_prepares_on_disk_and_reads_back(tiny_project):
    assert main(["prepare", "labels", "--out", "data/labels"]) == 0
    data = load_prepared(tiny_project / "data" / "labels")
    assert data.meta.num_classes == 3 and data.tensors["test_x"].shape[1] == 16


def test_a_finished_probe_is_trained_again_once_its_pretraining_changes(pretrained, tmp_path):
    """A warm-started seed counts as done (skipped, or resumed as finished) only for the weights it started from."""
    import shutil

    from pipeline.engine.repeats import is_done
    source = tmp_path / "bert"
    shutil.copytree(pretrained, source)
    spec = spec_of("p", "labels", "classify", init_from=str(source), epochs=1)
    labels_hash = tiny_labels().meta.content_hash
    metrics = train_experiment(spec, "t.yaml", tiny_labels(), tmp_path / "probe", None, progress=False)
    assert len(metrics["init_hash"]) == 16
    assert is_done(spec, tmp_path / "probe", evaluate=False, data_hash=labels_hash)
    assert Trainer(spec, tiny_labels(), tmp_path / "probe", progress=False).try_resume()
    ckpt = read_checkpoint(source / CHECKPOINT)
    ckpt["model"]["body.embed.embed.weight"] += 0.01  # pretrained again, differently
    torch.save(ckpt, source / CHECKPOINT)
    assert not is_done(spec, tmp_path / "probe", evaluate=False, data_hash=labels_hash)
    assert not Trainer(spec, tiny_labels(), tmp_path / "probe", progress=False).try_resume()


def test_training_every_experiment_trains_a_probe_after_its_pretraining_and_again_when_that_changes(
        tiny_project, capsys):
    """`archlab train` without a spec plans a warm-started experiment only once the runs it starts from have
    trained: on a fresh project the probe's pretraining does not exist yet when the pool starts."""
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    params["datasets"]["text"] = {"source": "corpus", "characters": 8000, "context": 16}
    params["experiments"] = {"p": "labels", "m": "text"}  # the probe first: the order must not matter
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    (tiny_project / "specs").mkdir()
    pretraining = spec_of("m", "text", "mlm", epochs=1)
    probe = spec_of("p", "labels", "classify", init_from="runs/m", epochs=1)
    for spec in (pretraining, probe):
        (tiny_project / "specs" / f"{spec.name}.yaml").write_text(
            yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True)))
    assert main(["train", "--no-track"]) == 0, capsys.readouterr().err
    probe_metrics = tiny_project / "runs" / "p" / "seed-0" / "metrics.json"
    first = json.loads(probe_metrics.read_text())["init_hash"]
    assert first is not None
    changed = pretraining.model_copy(update={"train": pretraining.train.model_copy(update={"epochs": 2})})
    (tiny_project / "specs" / "m.yaml").write_text(yaml.safe_dump(changed.model_dump(mode="json",
                                                                                     exclude_defaults=True)))
    capsys.readouterr()
    assert main(["train", "--no-track"]) == 0
    assert "already done" not in capsys.readouterr().out  # both trained again, in one call
    assert json.loads(probe_metrics.read_text())["init_hash"] != first

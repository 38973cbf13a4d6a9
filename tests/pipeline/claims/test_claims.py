"""Claims end to end: bad claim files are refused before anything trains, every claim of specs/claims/ runs on the
quick profile and gets a verdict, and README's list of claims is the one claims.csv gives."""
from __future__ import annotations

import pandas as pd
import pytest

from pipeline.claims.report import CSV_COLUMNS, README_BEGIN, README_END, readme_block, update_readme
from pipeline.claims.rules import OUTCOMES
from pipeline.cli import main
from pipeline.specs.claim import claim_paths, load_claim
from tests.conftest import REPO, files_under

CLAIM = """\
claim: ReLU beats logistic regression.
seeds: 2
base:
  data: {dataset: digits}
  task: classify
  model: {kind: mlp, hidden: [16], activation: relu}
  train: {epochs: 2, batch_size: 64}
variants:
  logistic: {model.hidden: []}
  relu: {}
expect:
  - {rule: compare, a: relu, b: logistic, expect: better}
"""


def run_claims(tmp_path, *args: str) -> int:
    return main(["--params", str(REPO / "params.yaml"), "claims", "--claims", str(tmp_path / "claims"),
                 "--data", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"), "--out",
                 str(tmp_path / "reports"), "--no-track", *args])


def write_claim(tmp_path, text: str, name: str = "relu_beats_logistic"):
    folder = tmp_path / "claims"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(text)
    return folder / f"{name}.yaml"


@pytest.mark.parametrize("change, field, message", [
    (("a: relu, b: logistic", "a: relu, b: linear"), "expect[0]", "unknown variant 'linear'"),
    (("expect: better}", "expect: better, measure: accuracy}"), "expect[0].measure", "unknown measure 'accuracy'"),
    (("logistic: {model.hidden: []}", "logistic: {model.width: 3}"), "variants.logistic[model.width]",
     "has no field 'width'"),
    (("relu: {}", "relu: {model.activation: relux}"), "variants.relu: model.activation", "Input should be"),
    (("expect: better}", "expect: best}"), "expect.0.expect", "Input should be"),
    (("seeds: 2", "seeds: 0"), "seeds", "greater than 0"),
    (("activation: relu}", "activation: relux}"), "base.model.activation", "Input should be"),
    (("a: relu, b: logistic", "a: relu, b: relu"), "expect[0]", "compares 'relu' with itself"),
])
def test_a_bad_claim_exits_2_naming_file_and_field_and_trains_nothing(tmp_path, capsys, change, field, message):
    path = write_claim(tmp_path, CLAIM.replace(*change))
    assert run_claims(tmp_path) == 2
    err = capsys.readouterr().err
    assert f"{path}: {field}: " in err and message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "reports").exists()


def test_an_empty_claims_folder_or_an_unknown_name_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "claims").mkdir()
    assert run_claims(tmp_path) == 2
    assert "no claim files" in capsys.readouterr().err
    write_claim(tmp_path, CLAIM)
    assert run_claims(tmp_path, "nonesuch") == 2
    assert "no claim named nonesuch" in capsys.readouterr().err


def test_a_claim_trains_once_and_a_rerun_only_rebuilds_the_report(tmp_path, capsys):
    write_claim(tmp_path, CLAIM)
    assert run_claims(tmp_path) == 0
    out = capsys.readouterr().out
    assert "training 4 runs" in out and "relu_beats_logistic: " in out
    frame = pd.read_csv(tmp_path / "reports" / "claims.csv")
    assert list(frame.columns) == CSV_COLUMNS and frame.verdict[0] in OUTCOMES and frame.n_seeds[0] == 2
    runs = files_under(tmp_path / "runs")
    assert run_claims(tmp_path) == 0
    assert "4 runs already done" in capsys.readouterr().out and "training" not in capsys.readouterr().out
    assert files_under(tmp_path / "runs") == runs
    html = (tmp_path / "reports" / "claims.html").read_text()
    assert "relu_beats_logistic" in html and "data:image/png;base64," in html


def test_every_claim_in_specs_loads_on_both_profiles():
    paths = claim_paths(REPO / "specs" / "claims")
    assert len(paths) >= 10
    for path in paths:
        full, quick = load_claim(path), load_claim(path, quick=True)
        assert len(quick.seeds) == 2 and len(full.seeds) >= 3
        assert all(s.train.epochs == 1 for s in quick.variants.values())
        assert all((s.data.train_subset or 0) <= 256 for s in quick.variants.values())


@pytest.mark.slow
def test_a_warm_started_variant_trains_again_when_the_run_it_starts_from_does(tmp_path, capsys):
    folder = tmp_path / "claims"
    folder.mkdir()
    source = (REPO / "specs" / "claims" / "17_masked_lm_pretraining.yaml").read_text()
    (folder / "pretraining.yaml").write_text(source)
    assert run_claims(tmp_path, "--quick") == 0
    out = capsys.readouterr().out
    assert out.count("training 2 runs") == 1 and "training 4 runs" in out  # pretraining + random, then pretrained
    (folder / "pretraining.yaml").write_text(source.replace("lr: 0.003", "lr: 0.002"))  # only the pretraining's
    assert run_claims(tmp_path, "--quick") == 0
    out = capsys.readouterr().out
    assert out.count("training 2 runs") == 2, out  # the pretraining again, then what starts from it


@pytest.mark.slow
def test_every_claim_runs_end_to_end_on_the_quick_profile_and_gets_a_verdict(tmp_path, capsys):
    folder = REPO / "specs" / "claims"
    code = main(["--params", str(REPO / "params.yaml"), "claims", "--quick", "--claims", str(folder), "--data",
                 str(tmp_path / "data"), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "reports"),
                 "--no-track"])
    assert code == 0
    frame = pd.read_csv(tmp_path / "reports" / "claims.csv")
    assert list(frame.id) == [p.stem for p in claim_paths(folder)]
    assert set(frame.verdict) <= set(OUTCOMES)
    md = (tmp_path / "reports" / "claims.md").read_text()
    assert all(f"## {name}: " in md for name in frame.id)


def test_readme_lists_the_claims_with_the_verdicts_of_the_committed_claims_csv():
    frame = pd.read_csv(REPO / "reports" / "claims.csv")
    readme = (REPO / "README.md").read_text()
    assert readme_block(frame) in readme, "README's claims list is stale: run `archlab claims --readme README.md`"


def test_the_readme_block_is_rewritten_only_between_its_markers(tmp_path):
    frame = pd.DataFrame([{"id": "x", "claim": "A claim.", "verdict": "supported", "deciding": "a vs b",
                           "statistic": 1.0, "low": 0.5, "high": 1.5, "n_seeds": 3}])
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold\n{README_END}\noutro\n")
    assert update_readme(readme, frame) is True
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "| A claim. | **supported** |" in text
    assert update_readme(readme, frame) is False
    plain = tmp_path / "OTHER.md"
    plain.write_text("no markers\n")
    with pytest.raises(Exception, match="has no claims block"):
        update_readme(plain, frame)
    assert plain.read_text() == "no markers\n"

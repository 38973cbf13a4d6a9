"""A real `dvc repro` of the project's own dvc.yaml in a temporary git clone, with shrunk budgets; then the
clients users compare with: `dvc metrics show/diff`, `dvc exp run/show`, `dvc plots show` in headless Chromium,
MLflow pyfunc and the Model Registry."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO

pytestmark = pytest.mark.slow

EXPERIMENTS = {"digits_mlp": "digits", "digits_lenet5": "digits", "diabetes_mlp": "diabetes"}
SEEDS = 2  # the project default here; digits_lenet5 says 1 in its entry, and a test adds one
# A two-trial sweep: its trials train under runs/, which must not make `compare` stale.
SWEEP = {"name": "tiny", "candidates": {"mlp": {"spec": "digits_mlp", "space": {
    "train.optimizer.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}}},
    "objective": {"metric": "val/accuracy", "direction": "maximize"}, "sampler": {"name": "random"},
    "pruner": {"name": "none"}, "budget": {"trials": 2, "epochs": 1}}
# One tiny claim: the claims stage runs with the rest of the pipeline.
CLAIM = {"claim": "ReLU beats logistic regression.", "seeds": 2,
         "base": {"data": {"dataset": "digits"}, "task": "classify", "model": {"kind": "mlp", "hidden": [16]},
                  "train": {"epochs": 2}},
         "variants": {"logistic": {"model.hidden": []}, "relu": {}},
         "expect": [{"rule": "compare", "a": "relu", "b": "logistic", "expect": "better"}]}


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


def shrink_spec(path: Path, epochs: int = 2) -> None:
    raw = yaml.safe_load(path.read_text())
    raw["train"]["epochs"] = epochs
    raw["train"].pop("early_stopping", None)
    header = path.read_text().splitlines()[0]
    path.write_text(header + "\n" + yaml.safe_dump(raw, sort_keys=False))


def write_dvc_yaml_for(root: Path, experiments) -> None:
    """The project's dvc.yaml, its train stage listing these experiments' specs as params (as a project with
    these experiments would: see the comment at that list)."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = dvc["stages"]["train"]["params"]
    specs = [p for p in params if isinstance(p, dict)]
    assert specs, "the train stage lists no spec files as params"
    keep = {f"${{paths.specs}}/{name}.yaml" for name in experiments}
    dvc["stages"]["train"]["params"] = [p for p in params if not isinstance(p, dict) or set(p) <= keep]
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clone")
    for name in ("params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    write_dvc_yaml_for(root, EXPERIMENTS)
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    (root / "specs").mkdir()
    for name in EXPERIMENTS:
        shutil.copy(REPO / "specs" / f"{name}.yaml", root / "specs" / f"{name}.yaml")
        shrink_spec(root / "specs" / f"{name}.yaml")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["experiments"] = {name: {"dataset": dataset} for name, dataset in EXPERIMENTS.items()}
    params["experiments"]["digits_lenet5"]["seeds"] = 1
    params["seeds"] = SEEDS
    params["comparisons"] = [["digits_lenet5", "digits_mlp"]]
    params["datasets"] = {k: v for k, v in params["datasets"].items() if k in EXPERIMENTS.values()}
    (root / "specs" / "sweeps").mkdir()
    (root / "specs" / "sweeps" / "tiny.yaml").write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    params["sweeps"] = ["tiny"]
    (root / "specs" / "claims").mkdir()
    (root / "specs" / "claims" / "tiny_claim.yaml").write_text(yaml.safe_dump(CLAIM, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "init"], root)
    run([sys.executable, "-m", "dvc", "repro"], root)
    return root


def test_repro_trains_evaluates_and_compares_every_experiment(clone):
    rows = list(csv.DictReader((clone / "reports" / "leaderboard.csv").open()))
    assert sorted(r["experiment"] for r in rows) == sorted(EXPERIMENTS)
    assert all(r["status"] == "finished" for r in rows)
    for row in rows:
        seeds = 1 if row["experiment"] == "digits_lenet5" else SEEDS
        values = [json.loads((clone / "runs" / row["experiment"] / f"seed-{s}" / "eval.json").read_text())["test"]
                  [row["metric"]] for s in range(seeds)]
        assert int(row["n_seeds"]) == seeds
        assert float(row["test_metric"]) == pytest.approx(sum(values) / seeds)  # the mean over the seeds
    verdicts = list(csv.DictReader((clone / "reports" / "comparisons.csv").open()))
    declared = next(r for r in verdicts if r["a"] == "digits_lenet5")
    assert declared["verdict"] == "inconclusive" and "single seed" in declared["reason"]
    md = (clone / "reports" / "comparison.md").read_text()
    assert all(name in md for name in EXPERIMENTS)
    summary = __import__("json").loads((clone / "reports" / "sweeps" / "tiny" / "summary.json").read_text())
    assert summary["best"]["trials/complete"] == 2


def test_repro_runs_the_claims_and_logs_each_verdict(clone):
    rows = list(csv.DictReader((clone / "reports" / "claims.csv").open()))
    assert [r["id"] for r in rows] == ["tiny_claim"] and rows[0]["n_seeds"] == "2"
    assert rows[0]["verdict"] in ("supported", "not supported", "inconclusive")
    assert sorted(p.name for p in (clone / "claims" / "tiny_claim").iterdir()) == ["logistic", "relu"]
    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("archlab/claims")
    (claim_run,) = client.search_runs([experiment.experiment_id])
    assert claim_run.data.tags["verdict"] == rows[0]["verdict"] and claim_run.info.status == "FINISHED"


def test_every_run_is_in_the_mlflow_store_with_curves_and_test_metrics(clone):
    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.kind != ''")
    by_name = {r.info.run_name: r for r in runs}
    assert {f"{name}/seed-0" for name in EXPERIMENTS} <= set(by_name)
    for name in EXPERIMENTS:
        r = by_name[f"{name}/seed-0"]
        assert r.data.tags["archlab.experiment"] == name and r.data.tags["archlab.seed"] == "0"
        assert len(client.get_metric_history(r.info.run_id, "val/loss")) == 2
        assert any(k.startswith("test/") for k in r.data.metrics)
        # each run carries its own figures, logged by compare without reopening it
        figures = {a.path for a in client.list_artifacts(r.info.run_id, "figures")}
        group = "digits-classify" if name.startswith("digits") else "diabetes-regress"
        assert {f"figures/grad_{name}.png", f"figures/curves_{group}.png"} <= figures
        assert r.info.status == "FINISHED"
    # the seeds of an experiment share its tag, and a summary run beside them holds the aggregates
    mlp = client.search_runs([e.experiment_id for e in client.search_experiments()],
                             filter_string="tags.`archlab.experiment` = 'digits_mlp'")
    summary = [r for r in mlp if r.data.tags.get("archlab.summary") == "true"]
    assert len(mlp) == SEEDS + 1 and len(summary) == 1
    assert summary[-1].data.metrics["n_seeds"] == SEEDS and "test/accuracy/mean" in summary[-1].data.metrics


def test_a_second_repro_changes_nothing(clone):
    out = run([sys.executable, "-m", "dvc", "repro"], clone).stdout
    assert "didn't change, skipping" in out or "up to date" in out
    assert "Running stage" not in out


def checkpoint_times(clone: Path) -> dict[str, int]:
    return {str(p.relative_to(clone)): p.stat().st_mtime_ns for p in (clone / "runs").glob("*/seed-*/checkpoint.pt")}


def test_changing_one_spec_retrains_only_that_experiment_then_compares(clone):
    before = checkpoint_times(clone)
    spec = clone / "specs" / "digits_mlp.yaml"
    spec.write_text(spec.read_text().replace("dropout: 0.2", "dropout: 0.3"))
    status = run([sys.executable, "-m", "dvc", "status"], clone).stdout
    assert "specs/digits_mlp.yaml" in status  # the spec, as a changed param of the train stage
    out = run([sys.executable, "-m", "dvc", "repro"], clone).stdout
    assert "Running stage 'train'" in out and "Running stage 'compare'" in out
    assert "diabetes_mlp: seeds [0, 1] already done for this spec, skipped" in out
    after = checkpoint_times(clone)
    changed = {path for path in after if after[path] != before.get(path)}
    assert changed == {f"runs/digits_mlp/seed-{k}/checkpoint.pt" for k in range(SEEDS)}


def test_the_train_stage_lists_every_experiment_spec_as_params_and_nothing_else():
    """dvc.yaml cannot read the experiments from params.yaml, so this keeps its list of spec params equal to it."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    listed = [next(iter(p)) for p in dvc["stages"]["train"]["params"] if isinstance(p, dict)]
    experiments = yaml.safe_load((REPO / "params.yaml").read_text())["experiments"]
    assert listed == [f"${{paths.specs}}/{name}.yaml" for name in experiments], (
        "dvc.yaml's train stage must list specs/NAME.yaml for each experiment in params.yaml, in its order")


SCORE_KEYS = {"test_metric", "val_metric", "gap_metric", "gap_loss", "params", "flops", "train_time_s", "epochs",
              "best_epoch"}


def dvc_json(clone: Path, *args: str):
    return json.loads(run([sys.executable, "-m", "dvc", *args, "--json"], clone).stdout)


def test_dvc_metrics_show_is_numbers_only_one_file_per_experiment(clone):
    shown = dvc_json(clone, "metrics", "show")[""]["data"]
    assert set(shown) == {f"reports/scores/{name}.json" for name in EXPERIMENTS} | {"reports/evidence.json"}
    for name in EXPERIMENTS:
        scores = shown[f"reports/scores/{name}.json"]["data"]
        assert set(scores) == SCORE_KEYS
        assert all(isinstance(v, (int, float)) for v in scores.values())
        evals = [json.loads(p.read_text()) for p in sorted((clone / "runs" / name).glob("seed-*/eval.json"))]
        seed_values = [e["test"][e["main_metric"]] for e in evals]
        assert scores["test_metric"] == pytest.approx(sum(seed_values) / len(seed_values))  # the mean over seeds


SERVE = """
import json, sys, numpy as np, mlflow
mlflow.set_tracking_uri(sys.argv[1])
arrays = np.load(sys.argv[3])
predicted = mlflow.pyfunc.load_model(f"runs:/{sys.argv[2]}/model").predict(arrays["test_x"]).argmax(1)
print(json.dumps({"accuracy": float((predicted == arrays["test_y"]).mean())}))
"""


@pytest.mark.parametrize("name", ["digits_mlp", "digits_lenet5"])
def test_a_logged_model_loads_through_pyfunc_in_a_fresh_process_and_scores_its_test_metric(clone, name):
    run_id = json.loads((clone / "runs" / name / "seed-0" / "metrics.json").read_text())["mlflow_run_id"]
    out = run([sys.executable, "-c", SERVE, f"sqlite:///{clone / 'mlflow.db'}", run_id,
               str(clone / "data" / "prepared" / "digits" / "arrays.npz")], clone)
    served = json.loads(out.stdout.strip().splitlines()[-1])
    tested = json.loads((clone / "runs" / name / "seed-0" / "eval.json").read_text())["test"]["accuracy"]
    assert served["accuracy"] == pytest.approx(tested)


def test_the_model_registry_holds_the_best_model_of_each_group_as_champion(clone):
    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    rows = list(csv.DictReader((clone / "reports" / "leaderboard.csv").open()))  # ranked within each group
    best = {}
    for row in rows:
        best.setdefault(f"archlab-{row['dataset']}-{row['task']}", row["mlflow_run_id"])
    assert set(best) == {"archlab-digits-classify", "archlab-diabetes-regress"}
    for name, run_id in best.items():
        assert client.get_model_version_by_alias(name, "champion").run_id == run_id
    # what the verdicts say of it: digits_lenet5 has one seed here, and a single seed is never a win
    evidence = {name: client.get_model_version_by_alias(name, "champion").tags["archlab.evidence"] for name in best}
    assert evidence["archlab-diabetes-regress"] == "the only experiment of its group"
    assert evidence["archlab-digits-classify"] in ("not shown better than: digits_lenet5 (inconclusive)",
                                                   "not shown better than: digits_mlp (inconclusive)")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no Chromium (apt-get install chromium)")
def test_dvc_plots_show_draws_in_headless_chromium_with_no_request_leaving_the_machine(clone):
    sys.path.insert(0, str(REPO / "bench"))
    from check_report_html import check_vega
    run([sys.executable, "-m", "dvc", "plots", "show"], clone)
    page = clone / "dvc_plots" / "index.html"
    seen = check_vega(page, "chromium")
    assert seen == {"charts": 2, "drawn": 2, "requests": []}
    # the check can fail: DVC's default page fetches Vega from a CDN, which the blocked network refuses
    online = clone / "dvc_plots" / "cdn.html"
    online.write_text(page.read_text().replace("</head>", '<script src="https://cdn.jsdelivr.net/npm/vega@5">'
                                                          "</script></head>"))
    assert check_vega(online, "chromium")["requests"] == ["https://cdn.jsdelivr.net/npm/vega@5"]


def test_an_experiment_holds_its_metrics_in_dvc_exp_show_and_metrics_diff_compares_commits(clone):
    run(["git", "add", "-A"], clone)
    run(["git", "commit", "-qm", "results"], clone)
    out = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "specs/digits_lenet5.yaml:train.optimizer.lr=0.01"],
              clone).stdout
    assert "Running stage 'train'" in out
    assert "Running stage 'sweep@tiny'" not in out  # the sweep does not use digits_lenet5
    [experiment] = [e["revs"][0] for rev in dvc_json(clone, "exp", "show") for e in rev.get("experiments") or []]
    params = experiment["data"]["params"]["specs/digits_lenet5.yaml"]["data"]
    assert params["train"]["optimizer"]["lr"] == 0.01
    scores = experiment["data"]["metrics"]["reports/scores/digits_lenet5.json"]["data"]
    assert set(scores) == SCORE_KEYS
    run(["git", "add", "-A"], clone)
    run(["git", "commit", "-qm", "lr 0.01"], clone)
    diff = dvc_json(clone, "metrics", "diff", "HEAD~1")
    changed = diff["reports/scores/digits_lenet5.json"]
    assert changed["test_metric"]["new"] == scores["test_metric"]
    assert "reports/scores/digits_mlp.json" not in diff  # untouched experiments do not differ
def test_adding_a_seed_trains_only_the_new_seed(clone):
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["experiments"]["digits_lenet5"]["seeds"] = 2
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    first = clone / "runs" / "digits_lenet5" / "seed-0" / "checkpoint.pt"
    before = first.stat().st_mtime_ns
    status = run([sys.executable, "-m", "dvc", "status"], clone).stdout
    stale = {line.strip().rstrip(":") for line in status.splitlines() if line and not line.startswith("\t")}
    assert "train" in stale
    out = run([sys.executable, "-m", "dvc", "repro"], clone).stdout
    assert "digits_lenet5: seeds [0] already done for this spec, skipped" in out
    assert "digits_mlp: seeds [0, 1] already done for this spec, skipped" in out
    assert first.stat().st_mtime_ns == before  # seed 0 untouched
    assert json.loads((clone / "runs/digits_lenet5/seed-1/eval.json").read_text())["seed"] == 1
    verdicts = list(csv.DictReader((clone / "reports" / "comparisons.csv").open()))
    assert next(r for r in verdicts if r["a"] == "digits_lenet5")["n"] == "2"
    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    summaries = client.search_runs([e.experiment_id for e in client.search_experiments()], filter_string=(
        "tags.`archlab.experiment` = 'digits_lenet5' and tags.`archlab.summary` = 'true'"))
    assert len(summaries) == 1 and summaries[0].data.metrics["n_seeds"] == 2  # updated, not repeated


def test_metrics_are_declared_for_dvc(clone):
    out = run([sys.executable, "-m", "dvc", "metrics", "show"], clone).stdout
    assert "reports/evidence.json" in out and "digits_mlp.mean" in out


def test_going_back_to_an_earlier_commit_restores_its_runs_from_the_dvc_cache_and_trains_nothing(clone):
    run(["git", "add", "-A"], clone)
    run(["git", "commit", "-qm", "before", "--allow-empty"], clone)
    earlier = (clone / "runs/diabetes_mlp/seed-0/eval.json").read_bytes()
    spec = clone / "specs" / "diabetes_mlp.yaml"
    raw = yaml.safe_load(spec.read_text())
    raw["train"]["optimizer"]["lr"] = raw["train"]["optimizer"]["lr"] / 2
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert "Running stage 'train'" in run([sys.executable, "-m", "dvc", "repro"], clone).stdout
    run(["git", "add", "-A"], clone)
    run(["git", "commit", "-qm", "after"], clone)
    assert (clone / "runs/diabetes_mlp/seed-0/eval.json").read_bytes() != earlier

    run(["git", "checkout", "-q", "HEAD~1"], clone)
    run([sys.executable, "-m", "dvc", "checkout"], clone)  # as DVC users do after a git checkout
    assert (clone / "runs/diabetes_mlp/seed-0/eval.json").read_bytes() == earlier
    out = run([sys.executable, "-m", "dvc", "repro"], clone).stdout
    assert "Running stage 'train'" not in out, out
    run(["git", "checkout", "-q", "-"], clone)
    run([sys.executable, "-m", "dvc", "checkout"], clone)

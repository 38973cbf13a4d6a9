"""A corpus of bad inputs, grouped as specs, data files, command lines and faults. Each case must get what
the user is promised: exit status 2, one line `archlab: error: FILE: [FIELD: ]message` naming the file (and
the field where there is one), no traceback, and nothing written or changed: the project tree (MLflow's
store included) is the same byte for byte before and after."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.cli import main
from tests.conftest import REPO

BASE = yaml.safe_load((REPO / "specs" / "digits_mlp.yaml").read_text())


def spec_with(**changes) -> str:
    """digits_mlp with dotted-path changes: spec_with(**{"train.optimizer.lr": ".inf"})."""
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return yaml.safe_dump(raw).replace("'.inf'", ".inf").replace("'.nan'", ".nan")


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def corrupt_member_npz() -> bytes:
    """A valid zip whose `x` member's compressed bytes are damaged (its CRC no longer matches)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for key, a in (("x", np.ones((20, 4), np.float32)), ("y", np.arange(20) % 2)):
            member = io.BytesIO()
            np.save(member, a)
            z.writestr(f"{key}.npy", member.getvalue())
    data = bytearray(buffer.getvalue())
    data[60:80] = b"\xff" * 20
    return bytes(data)


def idx_header(dims: tuple[int, ...], body: bytes = b"") -> bytes:
    return b"\x00\x00\x08" + bytes([len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + body


MINE_SPEC = "name: m\ndata: {dataset: mine}\ntask: classify\nmodel: {kind: mlp, hidden: [8]}\ntrain: {epochs: 1}\n"
REGRESS_SPEC = MINE_SPEC.replace("task: classify", "task: regress")


def params_with(dataset: dict) -> str:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw.setdefault("datasets", {})["mine"] = dataset
    return yaml.safe_dump(raw)


@dataclass
class Case:
    id: str
    argv: list[str]
    says: list[str]  # fragments the one error line must hold: the file, the field, the gist
    files: dict[str, bytes | str] = field(default_factory=dict)  # written before the snapshot
    prepared: bool = False  # digits prepared (by archlab) before the snapshot
    needs_no_cuda: bool = False


SPECS = [
    Case("binary-file", ["validate", "bad.yaml"], ["bad.yaml", "not UTF-8"],
         {"bad.yaml": b"\x7fELF\x02\x01\x01\x00\xff\xfe\x00\x00"}),
    Case("latin-1-file", ["validate", "bad.yaml"], ["bad.yaml", "not UTF-8"], {"bad.yaml": "name: café\n".encode("latin-1")}),
    Case("nul-bytes", ["validate", "bad.yaml"], ["bad.yaml", "binary"], {"bad.yaml": b"name: a\x00\n"}),
    Case("deeply-nested", ["validate", "bad.yaml"], ["bad.yaml", "nested too deeply"], {"bad.yaml": "[" * 5000}),
    Case("duplicate-key", ["validate", "bad.yaml"], ["bad.yaml", "duplicate key 'epochs'"],
         {"bad.yaml": (REPO / "specs/digits_mlp.yaml").read_text().replace("epochs: 40", "epochs: 40\n  epochs: 3")}),
    Case("huge-int", ["validate", "bad.yaml"], ["bad.yaml", "model.hidden[0]", "too large"],
         {"bad.yaml": spec_with(**{"model.hidden": [10**20]})}),
    Case("beta-above-1", ["validate", "bad.yaml"], ["bad.yaml", "train.optimizer.betas[0]"],
         {"bad.yaml": spec_with(**{"train.optimizer.betas": [1.5, 0.9]})}),
    Case("beta-nan", ["validate", "bad.yaml"], ["bad.yaml", "train.optimizer.betas[1]", "finite"],
         {"bad.yaml": spec_with(**{"train.optimizer.betas": [0.9, ".nan"]})}),
    Case("lr-inf", ["validate", "bad.yaml"], ["bad.yaml", "train.optimizer.lr", "finite"],
         {"bad.yaml": spec_with(**{"train.optimizer.lr": ".inf"})}),
    Case("weight-decay-inf", ["validate", "bad.yaml"], ["bad.yaml", "train.optimizer.weight_decay", "finite"],
         {"bad.yaml": spec_with(**{"train.optimizer.weight_decay": ".inf"})}),
    Case("warmup-inf", ["validate", "bad.yaml"], ["bad.yaml", "train.schedule.warmup_epochs", "finite"],
         {"bad.yaml": spec_with(**{"train.schedule.warmup_epochs": ".inf"})}),
    Case("noise-std-inf", ["validate", "bad.yaml"], ["bad.yaml", "train.augment.noise_std", "finite"],
         {"bad.yaml": spec_with(**{"train.augment": {"noise_std": ".inf"}})}),
    Case("seed-2-32", ["validate", "bad.yaml"], ["bad.yaml", "train.seed"],
         {"bad.yaml": spec_with(**{"train.seed": 2**32})}),
    Case("cuda-without-gpu", ["validate", "bad.yaml"], ["bad.yaml", "train.device", "no CUDA"],
         {"bad.yaml": spec_with(**{"train.device": "cuda"})}, needs_no_cuda=True),
    Case("batch-norm-batch-of-one", ["validate", "bad.yaml"], ["bad.yaml", "train.batch_size", "batch of one"],
         {"bad.yaml": spec_with(**{"model.batch_norm": True, "train.batch_size": 1296})}),  # 1297 training samples
    Case("model-too-big", ["validate", "bad.yaml"], ["bad.yaml", "model", "would need about"],
         {"bad.yaml": spec_with(**{"model.hidden": [1_000_000_000]})}),
    Case("unknown-field", ["validate", "bad.yaml"], ["bad.yaml", "model.hiden"],
         {"bad.yaml": spec_with(**{"model.hiden": [8]})}),
    Case("empty-file", ["validate", "bad.yaml"], ["bad.yaml", "empty"], {"bad.yaml": ""}),
    Case("top-level-list", ["validate", "bad.yaml"], ["bad.yaml", "mapping"], {"bad.yaml": "- a\n- b\n"}),
    Case("missing-file", ["validate", "nope.yaml"], ["nope.yaml", "not found"]),
    Case("monitor-not-a-metric", ["train", "bad.yaml", "--no-track"],
         ["bad.yaml", "train.early_stopping.monitor", "val/acc"],
         {"bad.yaml": spec_with(**{"train.early_stopping": {"monitor": "val/acc", "mode": "max"}})}, prepared=True),
]

DATA = [
    Case("npz-corrupt-member", ["validate", "m.yaml"], ["bad.npz", "x"],
         {"m.yaml": MINE_SPEC, "params.yaml": params_with({"source": "npz", "path": "bad.npz"}),
          "bad.npz": corrupt_member_npz()}),
    Case("npz-string-labels", ["validate", "m.yaml"], ["bad.npz", "y", "must be numbers"],
         {"m.yaml": MINE_SPEC, "params.yaml": params_with({"source": "npz", "path": "bad.npz"}),
          "bad.npz": npz_bytes(x=np.ones((20, 4), np.float32), y=np.array(["a", "b"] * 10))}),
    Case("npz-object-labels", ["validate", "m.yaml"], ["bad.npz", "y"],
         {"m.yaml": MINE_SPEC, "params.yaml": params_with({"source": "npz", "path": "bad.npz"}),
          "bad.npz": npz_bytes(x=np.ones((20, 4), np.float32), y=np.array([1, "a"] * 10, dtype=object))}),
    Case("npz-string-features", ["validate", "m.yaml"], ["bad.npz", "x", "must be numbers"],
         {"m.yaml": MINE_SPEC, "params.yaml": params_with({"source": "npz", "path": "bad.npz"}),
          "bad.npz": npz_bytes(x=np.array([["a"] * 4] * 20), y=np.arange(20) % 2)}),
    Case("npz-zero-samples", ["validate", "m.yaml"], ["bad.npz", "empty"],
         {"m.yaml": MINE_SPEC, "params.yaml": params_with({"source": "npz", "path": "bad.npz"}),
          "bad.npz": npz_bytes(x=np.ones((0, 4), np.float32), y=np.zeros(0, np.int64))}),
    Case("npz-nan-class-label", ["validate", "m.yaml"], ["bad.npz", "y", "NaN"],
         {"m.yaml": MINE_SPEC, "params.yaml": params_with({"source": "npz", "path": "bad.npz", "target": "class"}),
          "bad.npz": npz_bytes(x=np.ones((20, 4), np.float32), y=np.array([0.0, np.nan] * 10))}),
    Case("npz-not-a-zip", ["validate", "m.yaml"], ["bad.npz", "cannot read"],
         {"m.yaml": MINE_SPEC, "params.yaml": params_with({"source": "npz", "path": "bad.npz"}),
          "bad.npz": b"hello, not an archive"}),
    Case("npz-missing", ["validate", "m.yaml"], ["gone.npz", "path", "not found"],
         {"m.yaml": MINE_SPEC, "params.yaml": params_with({"source": "npz", "path": "gone.npz"})}),
    Case("csv-text-regression-target", ["validate", "m.yaml"], ["t.csv", "y", "must be numbers"],
         {"m.yaml": REGRESS_SPEC, "params.yaml": params_with({"source": "table", "path": "t.csv",
                                                               "target_column": "v", "target": "value"}),
          "t.csv": "a,b,v\n" + "".join(f"{i},{i % 3},x{i}\n" for i in range(30))}),
    Case("idx-truncated-header", ["validate", "m.yaml"], ["train-images-idx3-ubyte", "truncated IDX header"],
         {"m.yaml": MINE_SPEC, "params.yaml": params_with({"source": "idx", "path": "idx"}),
          "idx/train-images-idx3-ubyte": idx_header((20,))[:6], "idx/train-labels-idx1-ubyte": idx_header((20,), bytes(20)),
          "idx/t10k-images-idx3-ubyte": idx_header((20,)), "idx/t10k-labels-idx1-ubyte": idx_header((20,))}),
    Case("gz-not-gzip", ["validate", "m.yaml"], ["train-images-idx3-ubyte.gz", "cannot read"],
         {"m.yaml": MINE_SPEC, "params.yaml": params_with({"source": "idx", "path": "idx"}),
          "idx/train-images-idx3-ubyte.gz": b"plain bytes", "idx/train-labels-idx1-ubyte.gz": gzip.compress(b"x"),
          "idx/t10k-images-idx3-ubyte": idx_header((20,)), "idx/t10k-labels-idx1-ubyte": idx_header((20,))}),
]

USER_FOLDER = {"data/raw/mytable.csv": "a,b\n1,2\n", "data/raw/notes.txt": "mine\n"}
COMMAND_LINES = [
    Case("train-data-user-folder", ["train", "specs/digits_mlp.yaml", "--data", "data/raw", "--no-track"],
         ["data/raw", "did not make"], USER_FOLDER),
    Case("train-data-a-file", ["train", "specs/digits_mlp.yaml", "--data", "params.yaml", "--no-track"],
         ["params.yaml", "is a file"]),
    Case("evaluate-data-a-spec", ["evaluate", "specs/digits_mlp.yaml", "--seed", "0", "--data",
                                  "specs/digits_lenet5.yaml", "--no-track"], ["specs/digits_lenet5.yaml", "is a file"],
         {"runs/digits_mlp/seed-0/checkpoint.pt": b"not read before the data"}),
    Case("prepare-two-into-one-out", ["prepare", "digits", "diabetes", "--out", "data/prepared/two"],
         ["--out", "2 would be prepared"]),
    Case("prepare-out-a-file", ["prepare", "digits", "--out", "params.yaml"], ["params.yaml", "is a file"]),
    Case("prepare-out-user-folder", ["prepare", "digits", "--out", "data/raw"], ["data/raw", "did not make"],
         USER_FOLDER),
    Case("prepare-into-archlab-folder-with-user-file", ["prepare", "digits", "--out", "data/prepared/digits"],
         ["data/prepared/digits", "mine.txt"], {"data/prepared/digits/mine.txt": "mine\n"}, prepared=True),
    Case("params-missing", ["--params", "nope.yaml", "validate", "specs/digits_mlp.yaml"], ["nope.yaml", "--params"]),
    Case("compare-out-a-file", ["compare", "--out", "params.yaml", "--no-track"], ["params.yaml", "is a file"]),
    Case("compare-figures-user-folder", ["compare", "--out", "out", "--no-track"], ["out/figures", "did not make"],
         {"out/figures/holiday.png": b"png"}),
    Case("sweep-out-user-folder", ["sweep", "specs/sweeps/mnist1d_arch.yaml", "--out", "data/raw", "--no-track"],
         ["data/raw", "did not make"], USER_FOLDER),
    Case("train-out-a-file", ["train", "specs/digits_mlp.yaml", "--out", "params.yaml", "--no-track"],
         ["params.yaml", "--out", "is a file"]),
    Case("tracking-uri-unknown-scheme", ["train", "specs/digits_mlp.yaml"], ["params.yaml", "tracking_uri", "foo"],
         {"params.yaml": yaml.safe_dump({**yaml.safe_load((REPO / "params.yaml").read_text()),
                                         "tracking_uri": "foo://nowhere"})}),
    Case("stale-data-not-ours", ["train", "specs/digits_mlp.yaml", "--no-track"],
         ["data/prepared/digits", "another spec", "split.seed"],
         {"params.yaml": params_with({}).replace("  mine: {}\n", "") + "", "data/prepared/digits/meta.json":
          '{"name": "digits", "input_shape": [1, 8, 8], "output_size": 10, "spec": {"source": "digits", '
          '"split": {"seed": 7}}}'}),
]

FAULTS = [
    Case("train-corrupt-checkpoint", ["train", "specs/digits_mlp.yaml", "--seed", "0", "--no-track"],
         ["runs/digits_mlp/seed-0/checkpoint.pt", "cannot be read", "--restart"],
         {"runs/digits_mlp/seed-0/checkpoint.pt": b"PK\x03\x04 truncated"}, prepared=True),
    Case("corrupt-mlflow-db", ["train", "specs/digits_mlp.yaml"], ["sqlite:///mlflow.db", "cannot be opened"],
         {"mlflow.db": b"SQLite format 2\x00" + bytes(range(256)) * 8}, prepared=True),
    Case("evaluate-empty-checkpoint", ["evaluate", "specs/digits_mlp.yaml", "--seed", "0", "--no-track"],
         ["runs/digits_mlp/seed-0/checkpoint.pt", "cannot be read"], {"runs/digits_mlp/seed-0/checkpoint.pt": b""},
         prepared=True),
]

CORPUS = [*SPECS, *DATA, *COMMAND_LINES, *FAULTS]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with a hash of its bytes (folders as 'dir'): what 'nothing changed' compares."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.id)
def test_a_bad_input_is_one_line_exit_2_and_changes_nothing(case: Case, project, capsys):
    if case.needs_no_cuda and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    if case.prepared:
        assert main(["prepare", "digits"]) == 0
    for name, content in case.files.items():
        path = project / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert_refused(project, capsys, case.argv, case.says)


def assert_refused(project: Path, capsys, argv: list[str], says: list[str]) -> None:
    """The promise: exit 2, one line holding every fragment of `says`, no traceback, the tree unchanged."""
    capsys.readouterr()
    before = snapshot(project)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("archlab: error: ")]
    assert len(errors) == 1 and len(lines) == 1, err
    for fragment in says:
        assert fragment in errors[0], (fragment, errors[0])
    assert snapshot(project) == before  # nothing written, nothing changed, no MLflow run


def test_a_second_training_of_a_run_in_progress_names_the_holder(project, capsys):
    """A real process holds runs/digits_mlp (as a training would); `archlab train` of the same run stops."""
    assert main(["prepare", "digits"]) == 0
    code = ("import sys, time; from pathlib import Path; from pipeline.engine.train import run_lock\n"
            "with run_lock(Path('runs/digits_mlp/seed-0')):\n    print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=project, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert_refused(project, capsys, ["train", "specs/digits_mlp.yaml", "--seed", "0", "--no-track"],
                       ["runs/digits_mlp/seed-0", f"is being trained by pid {holder.pid}"])
    finally:
        holder.kill()
        holder.wait()


def test_the_corpus_covers_each_group():
    assert len(SPECS) >= 20 and len(DATA) >= 10 and len(COMMAND_LINES) >= 12 and len(FAULTS) >= 2
    assert len({c.id for c in CORPUS}) == len(CORPUS)

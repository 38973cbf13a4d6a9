"""Shared fixtures and helpers: tiny real data, a temporary project folder, spec files and their CLI errors,
a few training steps, a seq2seq batch, and servers started and asked in tests."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from models.tokens import EOS, FIRST_SYMBOL, PAD
from pipeline.data.prepare import DataMeta, Prepared

REPO = Path(__file__).resolve().parent.parent

torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI has 2 cores


def data_meta(**facts) -> DataMeta:
    """A prepared dataset's meta with just the facts a test needs (name and shapes filled in when not given)."""
    return DataMeta.model_validate({"name": "t", "input_shape": [1], "output_size": 1, **facts})


def tiny_classification(n: int = 96, features: int = 8, classes: int = 3, seed: int = 0,
                        input_shape: tuple[int, ...] | None = None) -> Prepared:
    """Separable blobs: a real (if easy) classification problem, in memory."""
    g = np.random.default_rng(seed)
    centers = g.normal(0, 3, size=(classes, features))
    tensors = {}
    for part, count in (("train", n), ("val", n // 3), ("test", n // 3)):
        y = g.integers(0, classes, size=count)
        x = centers[y] + g.normal(0, 1, size=(count, features))
        if input_shape:
            x = x.reshape(count, *input_shape)
        tensors[f"{part}_x"] = torch.tensor(x, dtype=torch.float32)
        tensors[f"{part}_y"] = torch.tensor(y, dtype=torch.int64)
    meta = {"name": "tiny", "target": "class", "input_shape": list(input_shape or (features,)),
            "output_size": classes, "num_classes": classes, "classes": [str(i) for i in range(classes)],
            "sizes": {p: len(tensors[f"{p}_x"]) for p in ("train", "val", "test")}, "normalisation": {}}
    return Prepared(meta=meta, tensors=tensors)


def tiny_project(folder: Path, specs: list[dict], n: int = 96) -> Path:
    """A project folder: tiny prepared data (dataset `tiny`), the given experiment specs in specs/, the
    repo's params.yaml and schema. What one machine of a multi-machine test holds."""
    import yaml

    from pipeline.data.prepare import write_prepared
    data = tiny_classification(n=n, features=8)
    write_prepared({k: v.numpy() for k, v in data.tensors.items()}, data.meta, folder / "data" / "prepared" / "tiny")
    (folder / "specs" / "sweeps").mkdir(parents=True)
    shutil.copy(REPO / "specs" / "schema.json", folder / "specs" / "schema.json")
    for spec in specs:
        (folder / "specs" / f"{spec['name']}.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(REPO / "params.yaml", folder / "params.yaml")
    return folder


@pytest.fixture
def tiny_data() -> Prepared:
    return tiny_classification()


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A temporary project folder holding the repo's params.yaml and specs/, as the working directory."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "specs", tmp_path / "specs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def write_spec(folder: Path, model: str, dataset: str, task: str) -> str:
    """A one-epoch spec `t.yaml` in folder; `model` is the inside of its flow-style model mapping."""
    path = folder / "t.yaml"
    path.write_text(f"name: t\ndata: {{dataset: {dataset}}}\ntask: {task}\nmodel: {{{model}}}\n"
                    "train: {epochs: 1}\n")
    return str(path)


def with_fields(model: str, extra: str) -> str:
    """The inside of a flow mapping with `extra` (', key: value, ...') merged in, a key in both taking extra's
    value: spec loading refuses a key given twice, so tests cannot just append."""
    merged = {**yaml.safe_load(f"{{{model}}}"), **yaml.safe_load(f"{{{extra.lstrip(', ')}}}")}
    return yaml.safe_dump(merged, default_flow_style=True, width=10**6).strip()[1:-1]


def reverse_batch(n: int = 16, length: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A `reverse` seq2seq batch: sources (n, length), half of them two tokens shorter, and their reversals
    followed by EOS, (n, length + 1), PAD-filled."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(FIRST_SYMBOL, 9, (n, length), generator=g)
    src[: n // 2, length - 2:] = PAD  # half the batch is shorter
    lengths = (src != PAD).sum(1)
    tgt = torch.full((n, length + 1), PAD)
    for i, n_i in enumerate(lengths.tolist()):
        tgt[i, :n_i] = src[i, :n_i].flip(0)
        tgt[i, n_i] = EOS
    return src, tgt


def fit_losses(model, phase, x, y, steps: int, lr: float, every_param: bool = True) -> list[float]:
    """`steps` Adam steps on one batch → the loss before each. Every gradient must be finite; with
    `every_param`, every parameter of the phase must also get one (none left out of the graph)."""
    opt = torch.optim.Adam(phase.params, lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss, _ = phase.loss(model, x, y)
        loss.backward()
        grads = [p.grad for p in phase.params]
        assert all(g is not None for g in grads) or not every_param, "a parameter got no gradient"
        assert all(torch.isfinite(g).all() for g in grads if g is not None)
        opt.step()
        losses.append(loss.item())
    return losses


def validate_error(spec_path: str, capsys) -> str:
    """`archlab validate` on a bad spec must exit 2 without a traceback; → what it said on stderr."""
    from pipeline.cli import main
    assert main(["validate", spec_path]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


@contextlib.contextmanager
def serving(cmd: list[str], **popen) -> Iterator[Callable[[str], object]]:
    """Start a server process (its own session, so all its workers stop together); yield `ask(url)`, which
    returns the JSON at url once the server answers, waiting up to 60 s for it to come up."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            **popen)

    def ask(url: str):
        deadline = time.monotonic() + 60
        while True:
            try:
                return json.loads(urllib.request.urlopen(url, timeout=2).read())
            except OSError:
                assert proc.poll() is None, f"{cmd[0]} exited with status {proc.returncode}"
                assert time.monotonic() < deadline, f"{url} did not answer within 60 s"
                time.sleep(0.5)
    try:
        yield ask
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """One throwaway PostgreSQL server for the session (tests/pg.py); skips, saying why, if none can start."""
    from tests.pg import NoPostgres, postgres_server
    try:
        with postgres_server() as url:
            yield url
    except NoPostgres as why:
        pytest.skip(f"no PostgreSQL server could be started: {why}")


@pytest.fixture
def postgres_db(postgres_server_url, request) -> str:
    """A fresh database of its own for this test → its URL (postgresql+psycopg://...)."""
    from tests.pg import create_database
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:40]
    return create_database(postgres_server_url, f"{name}_{os.getpid()}")


@pytest.fixture(scope="session")
def tracking_server(postgres_server_url, tmp_path_factory) -> Iterator[str]:
    """A real `mlflow server` on loopback for the session: PostgreSQL backend store, artifact proxy onto a
    temporary folder, one worker, no job runner → its http:// URL (what MLFLOW_TRACKING_URI takes)."""
    from tests.pg import create_database
    store = create_database(postgres_server_url, f"mlflow_{os.getpid()}")
    artifacts, port = tmp_path_factory.mktemp("mlartifacts"), free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--artifacts-destination",
           str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    url = f"http://127.0.0.1:{port}"
    with serving(cmd, env=env) as ask:
        ask(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default")
        yield url

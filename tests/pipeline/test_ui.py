"""`archlab ui` serves the MLflow UI on 127.0.0.1 over the project's store."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.train import train_experiment
from pipeline.ui import ui_command
from tests.conftest import tiny_classification
from tests.pipeline.test_tracking import spec

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_binds_loopback_with_one_worker():
    cmd = ui_command("sqlite:///x.db", 5000)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--workers") + 1] == "1"


def test_ui_shows_the_runs_of_the_store(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "s.yaml").write_text("name: tracked\n")
    run_id = train_experiment(spec(2), tmp_path / "s.yaml", tiny_classification(), tmp_path / "run", store,
                              progress=False)["mlflow_run_id"]
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ui", "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        body = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and body is None:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={run_id}")
                body = json.loads(urllib.request.urlopen(request, timeout=2).read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, "the UI did not answer within 60 s"
        assert body["run"]["info"]["run_name"] == "tracked"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=20)

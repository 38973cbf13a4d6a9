"""`archlab ui` serves the MLflow UI on 127.0.0.1 over the project's store."""
from __future__ import annotations

import os
import sys

import pytest

from pipeline.engine.train import train_experiment
from pipeline.ui import run_ui, ui_command
from tests.conftest import free_port, serving, tiny_classification
from tests.pipeline.engine.test_tracking import spec

pytestmark = pytest.mark.slow


def test_ui_binds_loopback_with_one_worker():
    cmd = ui_command("sqlite:///x.db", 5000)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--workers") + 1] == "1"


def test_ui_points_at_a_tracking_server_instead_of_serving_it_again(capsys):
    assert run_ui("http://10.0.0.5:5000") == 0
    assert "open http://10.0.0.5:5000" in capsys.readouterr().err


def test_ui_shows_the_runs_of_the_store(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "s.yaml").write_text("name: tracked\n")
    run_id = train_experiment(spec(2), tmp_path / "s.yaml", tiny_classification(), tmp_path / "run", store,
                              progress=False)["mlflow_run_id"]
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    with serving([sys.executable, "-m", "pipeline.cli", "ui", "--port", str(port)], cwd=tmp_path, env=env) as ask:
        body = ask(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={run_id}")
    assert body["run"]["info"]["run_name"] == "tracked"

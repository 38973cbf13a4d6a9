"""`archlab ui`: the MLflow UI on 127.0.0.1, one worker, no job runner (about 0.5 GB instead of 3 GB)."""
from __future__ import annotations

import os
import subprocess
import sys


def ui_command(uri: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1"]


# The UI's sidebar defaults to its GenAI view; this query parameter selects model training instead.
TRAINING_VIEW = "workflowType=machine_learning"


def training_runs_urls(uri: str, port: int) -> list[str]:
    """The address of the training-runs view, then one per experiment of the store (each opens on its runs)."""
    from mlflow.tracking import MlflowClient
    base = f"http://127.0.0.1:{port}/#/experiments"
    lines = [f"{base}?{TRAINING_VIEW}"]
    try:
        experiments = MlflowClient(tracking_uri=uri).search_experiments()
    except Exception:  # noqa: BLE001 - an empty or new store: the server creates it
        experiments = []
    lines += [f"  {e.name}: {base}/{e.experiment_id}/runs?{TRAINING_VIEW}" for e in experiments
              if e.name != "Default"]
    return lines


def run_ui(uri: str, port: int = 5000) -> int:
    if uri.startswith(("http://", "https://")):  # a shared tracking server serves its own UI
        print(f"the tracking URI is a server: open {uri} (archlab ui serves a local store)", file=sys.stderr)
        return 0
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    print(f"MLflow UI (store: {uri}); Ctrl-C stops it. Training runs:", file=sys.stderr)
    print("\n".join(training_runs_urls(uri, port)), flush=True)
    try:
        return subprocess.call(ui_command(uri, port), env=env)
    except KeyboardInterrupt:
        return 0

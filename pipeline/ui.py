"""`archlab ui`: the MLflow UI on 127.0.0.1, one worker, no job runner (about 0.5 GB instead of 3 GB)."""
from __future__ import annotations

import os
import subprocess
import sys


def ui_command(uri: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1"]


def run_ui(uri: str, port: int = 5000) -> int:
    if uri.startswith(("http://", "https://")):  # a shared tracking server serves its own UI
        print(f"the tracking URI is a server: open {uri} (archlab ui serves a local store)", file=sys.stderr)
        return 0
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    print(f"MLflow UI on http://127.0.0.1:{port} (store: {uri}); Ctrl-C stops it", file=sys.stderr)
    try:
        return subprocess.call(ui_command(uri, port), env=env)
    except KeyboardInterrupt:
        return 0

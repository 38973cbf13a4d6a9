"""MLflow: one run per experiment, per-epoch metrics logged in batches, resumable by run id.

MLflow is imported lazily: `archlab validate` and the tests that do not track should not pay for it.
"""
from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.data.prepare import DataMeta


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested spec → {'model.hidden': '[128, 128]', 'model.layers.0.channels': '16', ...} for MLflow params.

    A list of mappings (a CNN's layers) is spread over indexed keys, so a sampled channel count is a short
    param of its own, comparable across runs, not a fragment of one long string.
    """
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(obj, list) and any(isinstance(item, dict) for item in obj):
        for index, item in enumerate(obj):
            out.update(flatten(item, f"{prefix}.{index}"))
    else:
        text = str(obj)
        out[prefix] = text if len(text) <= 6000 else text[:5997] + "..."
    return out


def git_commit(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def spec_params(spec: dict) -> dict[str, str]:
    """A spec's MLflow params: every field but the description (prose is the run's note, not a param)."""
    return flatten({k: v for k, v in spec.items() if k != "description"})


def number_text(value: Any) -> str:
    """A short, exact-enough text for a number logged as a param: 4 significant digits for floats."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def source_tags(source: str | Path, description: str | None = None) -> dict[str, str]:
    """MLflow's standard fields: the Source and User columns, the git commit, and the run's description."""
    import getpass

    from mlflow.utils.mlflow_tags import (MLFLOW_GIT_COMMIT, MLFLOW_RUN_NOTE, MLFLOW_SOURCE_NAME,
                                          MLFLOW_SOURCE_TYPE, MLFLOW_USER)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        user = "unknown"
    tags = {MLFLOW_SOURCE_NAME: str(source), MLFLOW_SOURCE_TYPE: "LOCAL", MLFLOW_USER: user,
            MLFLOW_GIT_COMMIT: git_commit()}
    if description:
        tags[MLFLOW_RUN_NOTE] = description
    return tags


def check_store(uri: str | None) -> None:
    """Read a local MLflow store's file once before anything is written: a corrupt mlflow.db is one clear line,
    not a SQLAlchemy traceback after a run folder was made. A missing file is fine (MLflow makes one); a
    server is not probed (MLflow retries a dead one for minutes)."""
    if uri is None or not uri.startswith("sqlite:///"):
        return
    import sqlite3

    from pipeline.specs.errors import UserError
    path = Path(uri.removeprefix("sqlite:///"))
    if not path.is_file():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:  # read-only
            db.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.Error as exc:
        raise UserError(uri, f"the MLflow store cannot be opened ({exc}); move {path} aside (MLflow makes a "
                        "new one) or set tracking_uri") from None


def metric_key(name: str) -> str:
    """MLflow keys allow letters, digits, _ - . space / : only; module paths may carry others."""
    return "".join(c if c.isalnum() or c in "_-./ :" else "_" for c in name)


def _lost_insert_race(err: Exception) -> bool:
    """A write that failed on a unique constraint: another process inserted the same row first (SQLite and
    PostgreSQL through SQLAlchemy, or the message a tracking server passes on)."""
    cause = err.__cause__
    if cause is not None and type(cause).__name__ == "IntegrityError":
        return True
    return "unique constraint" in str(err).lower()


class Tracker:
    """A thin handle on one MLflow run. Metrics are buffered and sent in one batch per flush."""

    def __init__(self, uri: str, experiment: str, run_id: str | None = None, run_name: str | None = None,
                 tags: dict[str, str] | None = None, parent_run_id: str | None = None, reopen: bool = True):
        """Continue run_id when it exists (marked RUNNING again if `reopen`), else start a new run.

        `reopen=False` adds to a finished run without touching its status or times (evaluation)."""
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        self._pending: list = []
        if run_id is not None and self._exists(run_id):
            self.run_id = run_id
            if reopen:
                self.client.update_run(run_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(experiment)
        # Classic model training, not a GenAI app: the UI opens the experiment on its training runs.
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment, tags=EXPERIMENT_KIND)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(exp_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id

    def _exists(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:  # noqa: BLE001 - a deleted store or foreign id: start a new run
            return False

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param
        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=fresh[i:i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics; nothing is sent until flush()."""
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self._pending += [Metric(metric_key(k), float(v), now, step) for k, v in metrics.items()
                          if v is not None and isinstance(v, (int, float))]

    def flush(self) -> None:
        for i in range(0, len(self._pending), 1000):  # MLflow caps a batch at 1000 metrics
            self.client.log_batch(self.run_id, metrics=self._pending[i:i + 1000])
        self._pending = []

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    @property
    def experiment_id(self) -> str:
        return self.client.get_run(self.run_id).info.experiment_id

    def log_dataset(self, meta: DataMeta, context: str = "training") -> None:
        """The prepared dataset as the run's dataset input: name, content hash, split shapes."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
        profile = {"input_shape": meta.input_shape, "sizes": meta.sizes, "num_classes": meta.num_classes,
                   "target": meta.target}
        dataset = Dataset(name=meta.name, digest=(meta.content_hash or "")[:36], source_type="local",
                          source=json.dumps({"uri": meta.prepared_dir or ""}),
                          profile=json.dumps({k: v for k, v in profile.items() if v is not None}))
        inputs = [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])]
        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except Exception as err:  # noqa: BLE001 - narrowed just below
            if not _lost_insert_race(err):
                raise
            # Seeds trained side by side log the same dataset at the same moment: MLflow's store looks the row up,
            # finds none, and both insert it; the loser's unique constraint fails. Now the row is there, and a
            # second call only links this run to it.
            self.client.log_inputs(self.run_id, datasets=inputs)

    def end(self, status: str = "FINISHED", flush: bool = True) -> None:
        """Close the run; `flush=False` drops metrics not yet sent (an interrupted epoch is trained again)."""
        if flush:
            self.flush()
        self._pending = []
        self.client.set_terminated(self.run_id, status=status)

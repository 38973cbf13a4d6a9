"""Test-set evaluation of a trained run: eval.json and the per-example records.npz beside it, added to the
run's MLflow run."""
from __future__ import annotations

import math
from pathlib import Path

from pipeline.data.prepare import Prepared
from pipeline.specs.experiment import ExperimentSpec
from pipeline.engine.runfiles import SHIFTED_ACCURACY, Evaluation, path_of, write_run_file
from pipeline.engine.examples import RECORDS, example_records, write_records
from pipeline.engine.tasks import make_task
from pipeline.engine.tasks.classify import shifted_accuracy
from pipeline.engine.train import load_checkpoint_model


def evaluate_run(spec: ExperimentSpec, data: Prepared, run_dir: str | Path, tracking_uri: str | None) -> dict:
    run_dir = Path(run_dir)
    model, state = load_checkpoint_model(spec, data, run_dir)
    task = make_task(spec.task, data.meta)
    device = next(model.parameters()).device
    x, y = data.tensors["test_x"].to(device), data.tensors["test_y"].to(device)
    test = task.test_metrics(model, x, y, data.meta)
    if spec.evaluate.shifts:  # classify only: check_buildable refuses shifts anywhere else
        test[SHIFTED_ACCURACY] = shifted_accuracy(model, x, y, spec.evaluate.shifts)
    evaluation = Evaluation(name=spec.name, status=state["status"], main_metric=task.metric, seed=spec.train.seed,
                            spec_hash=spec.spec_hash(), test=test)
    records = example_records(spec.task, model, x, y, data.meta)
    if records:  # records first: an eval.json never points at a missing or older records file
        write_records(run_dir / RECORDS, records)
        evaluation.records = RECORDS
    write_run_file(run_dir, evaluation)
    result = evaluation.model_dump(exclude_unset=True)
    run_id = state.get("run_id")
    if tracking_uri and run_id:
        log_evaluation(tracking_uri, run_id, run_dir, result, state["epoch"], data)
    return result


def log_evaluation(tracking_uri: str, run_id: str, run_dir: Path, result: dict, epoch: int, data: Prepared) -> None:
    """Test metrics and eval.json into the training run, which stays as training left it: its status, start
    and end time describe the training (the Duration column), not when the evaluation happened."""
    from pipeline.engine.tracking import Tracker
    tracker = Tracker(tracking_uri, "", run_id=run_id, reopen=False)
    test = result["test"]
    scalars = {f"test/{k}": v for k, v in test.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    scalars.update({f"test/{SHIFTED_ACCURACY}/{k}": v for k, v in test.get(SHIFTED_ACCURACY, {}).items()})
    tracker.log_metrics(scalars, step=epoch)
    tracker.flush()
    tracker.log_artifact(path_of(run_dir, Evaluation))
    if "fid" in result["test"] and data.meta.prepared_dir:
        from pipeline.engine.quality import cache_paths
        for path in cache_paths(data.meta.prepared_dir):  # the yardstick the FID was measured with
            tracker.log_artifact(path, "feature_classifier")


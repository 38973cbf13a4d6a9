"""What logging a run's MLflow model costs, and which format loads: pickle (archlab's choice) against pt2.

For each spec it builds the model on its prepared data (untrained: the cost does not depend on the weights),
then, in one process against a temporary SQLite store, per format: the seconds `mlflow.pytorch.log_model`
takes (signature, input example, pip_requirements given), whether `mlflow.pyfunc.load_model("runs:/ID/model")`
loads it, the seconds that load takes, and whether its predictions equal the module's own.

    python bench/bench_model_logging.py                      # the default specs below
    python bench/bench_model_logging.py --specs digits_mlp mnist1d_gru
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_model  # noqa: E402
from pipeline.data.prepare import load_prepared, prepare  # noqa: E402
from pipeline.engine.serving import servable  # noqa: E402
from pipeline.specs.config import dataset_spec, load_config  # noqa: E402
from pipeline.specs.experiment import load_spec  # noqa: E402

DEFAULT = ["digits_mlp", "digits_lenet5", "digits_vit", "mnist1d_gru", "reverse_transformer", "corpus_gpt",
           "digits_vae", "digits_gan"]


def one_format(fmt: str, module, example, expected, store: str) -> dict:
    import mlflow
    from mlflow.models import infer_signature
    client = mlflow.MlflowClient(store)
    run = client.create_run(client.get_experiment_by_name("bench").experiment_id)
    start = time.perf_counter()
    try:
        mlflow.pytorch.log_model(module, name="model", run_id=run.info.run_id, input_example=example,
                                 signature=infer_signature(example, expected), pip_requirements=["torch"],
                                 serialization_format=fmt)
    except Exception as err:  # noqa: BLE001 - a format that cannot save this model is a result
        return {"log_s": None, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"}
    logged = time.perf_counter() - start
    start = time.perf_counter()
    try:
        loaded = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
        got = loaded.predict(example)
    except Exception as err:  # noqa: BLE001
        return {"log_s": logged, "error": f"load: {type(err).__name__}: {str(err).splitlines()[0][:80]}"}
    return {"log_s": logged, "load_s": time.perf_counter() - start,
            "same": bool(np.allclose(np.asarray(got), expected, atol=1e-5))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", nargs="+", default=DEFAULT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import mlflow
    repo = Path(__file__).resolve().parents[1]
    config = load_config(repo / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{tmp}/mlflow.db"
        mlflow.set_tracking_uri(store)
        mlflow.set_experiment("bench")
        print(f"{'spec':22} {'format':7} {'log s':>6} {'load s':>7}  result")
        for name in args.specs:
            spec = load_spec(repo / "specs" / f"{name}.yaml")
            folder = Path(tmp) / spec.data.dataset
            if not folder.exists():
                prepare(spec.data.dataset, dataset_spec(config, spec.data.dataset), folder)
            data = load_prepared(folder)
            module, example = servable(build_model(spec.model, data.shape), spec.task, data)
            with torch.no_grad():
                expected = module(torch.from_numpy(example)).numpy()
            for fmt in ("pickle", "pt2"):
                r = one_format(fmt, module, example, expected, store)
                log = f"{r['log_s']:6.2f}" if r.get("log_s") is not None else "     —"
                load = f"{r['load_s']:7.2f}" if r.get("load_s") is not None else "      —"
                result = r.get("error") or ("predictions equal" if r["same"] else "PREDICTIONS DIFFER")
                print(f"{name:22} {fmt:7} {log} {load}  {result}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

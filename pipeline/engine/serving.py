"""The servable form of a trained model, logged as an MLflow pytorch-flavor model and loaded by pyfunc.

`mlflow.pyfunc.load_model("runs:/<id>/model").predict(array)` calls the module's forward on one array:
  classify / regress  inputs (B, ...) → logits / predictions (B, out), in prepare's standardised units
  reconstruct         inputs (B, ...) → reconstructions
  lm                  tokens (B, T) → next-token logits (B, T, V)
  seq2seq             source tokens (B, S) → greedy decodings (B, target_len): one array in, one out
  generate            noise z (B, latent) → samples (B, *input shape)
The model is saved in MLflow's pickle format, not the default pt2 (torch.export): a greedy decoding loop and
the recurrent cells do not export, and pickle logs in about 0.7 s instead of 3 s (see the issue-12 note).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from pipeline.data.prepare import Prepared

EXAMPLE_ROWS = 4


class _PickleChosen(logging.Filter):
    """MLflow warns on every pickle-format save; the choice is deliberate (see above), so once is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Pickle or CloudPickle" not in record.getMessage()


logging.getLogger("mlflow.pytorch").addFilter(_PickleChosen())


class GreedyDecoder(nn.Module):
    """A seq2seq model as one-array-in, one-array-out: source tokens (B, S) → greedy output tokens (B, T)."""

    def __init__(self, model: nn.Module, target_len: int):
        super().__init__()
        self.model, self.target_len = model, target_len

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        return self.model.generate(src.long(), self.target_len)


def servable(model: nn.Module, task: str, data: Prepared) -> tuple[nn.Module, np.ndarray]:
    """The module pyfunc will call, on the CPU in eval mode, and an input example of a few rows."""
    model = model.to("cpu").eval()
    if task == "generate":
        return model, model.noise(EXAMPLE_ROWS, torch.device("cpu"), torch.Generator().manual_seed(0)).numpy()
    example = data.tensors["test_x"][:EXAMPLE_ROWS].cpu().numpy()
    if task == "seq2seq":
        return GreedyDecoder(model, int(data.tensors["test_y"].shape[1])).eval(), example
    return model, example


def log_served_model(tracking_uri: str, experiment_id: str, run_id: str, model: nn.Module, task: str,
                     data: Prepared) -> float:
    """Log the model under the run as `model` (pytorch flavor, signature, input example); returns the seconds it
    took. The run's status and end time are not touched."""
    import mlflow
    from mlflow.models import infer_signature

    start = time.perf_counter()
    module, example = servable(model, task, data)
    with torch.no_grad():
        output = module(torch.from_numpy(example)).numpy()
    mlflow.set_tracking_uri(tracking_uri)
    # runs:/<id>/model resolves through the logged models of the run's own experiment.
    mlflow.set_experiment(experiment_id=experiment_id)
    mlflow.pytorch.log_model(module, name="model", run_id=run_id, signature=infer_signature(example, output),
                             input_example=example, pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                             serialization_format="pickle")
    return time.perf_counter() - start

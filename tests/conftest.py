"""Shared fixtures: tiny real data, a temporary project folder, and CLI runs in-process."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import Prepared

REPO = Path(__file__).resolve().parent.parent

torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI has 2 cores


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


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}

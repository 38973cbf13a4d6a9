"""The Vision Transformer: patches, pooling, positions, a few training steps, and spec checks."""
from __future__ import annotations

import pytest
import torch

from models import build_model
from models.layers.transformer_layers import Residual
from models.registry import DataShape
from models.vit import ViTSpec
from pipeline.cli import main
from pipeline.engine.tasks import make_task
from tests.conftest import fit_losses, validate_error, with_fields, write_spec as write_spec_file

DIGITS = DataShape(input_shape=(1, 8, 8), output_size=10)


def vit(**fields):
    return build_model(ViTSpec(kind="vit", **{"d_model": 32, "depth": 2, "heads": 4, "dropout": 0.0, **fields}),
                       DIGITS)


def test_patch_embedding_is_one_linear_map_per_patch():
    torch.manual_seed(0)
    model = vit(patch=2)
    images = torch.randn(3, 1, 8, 8)
    tokens = model.patches(images)
    assert tokens.shape == (3, 16, 32)  # 8x8 with 2x2 patches: 16 tokens
    conv = model.patches.proj
    weight = conv.weight.reshape(32, 4)  # the convolution is a (D, P·P) matrix
    patch_row1_col2 = images[:, 0, 2:4, 4:6].reshape(3, 4)  # patches are numbered row by row: index 1·4 + 2 = 6
    torch.testing.assert_close(tokens[:, 6], patch_row1_col2 @ weight.T + conv.bias)


@pytest.mark.parametrize("fields", [{"pooling": "cls", "positional": "learned"},
                                    {"pooling": "mean", "positional": "sinusoidal", "norm": "post"},
                                    {"patch": 4, "mlp_ratio": 4.0}],
                         ids=["cls-learned", "mean-sinusoidal-post", "patch4"])
def test_vit_trains_a_few_steps_and_its_loss_falls(fields):
    torch.manual_seed(0)
    model = vit(**fields)
    (phase,) = make_task("classify").phases(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    losses = fit_losses(model, phase, x, y, steps=20, lr=3e-3, every_param=False)
    assert losses[-1] < 0.5 * losses[0], losses


def test_class_token_and_positions_count():
    with_cls = vit(pooling="cls")
    assert with_cls.cls_token is not None and with_cls.positions.table.shape == (17, 32)
    mean = vit(pooling="mean")
    assert mean.cls_token is None and mean.positions.table.shape == (16, 32)


def test_only_the_positions_tell_the_patches_apart():
    """Attention and mean pooling are blind to order: swapping two patches changes the output only through
    the position embeddings."""
    torch.manual_seed(0)
    model = vit(pooling="mean", positional="learned").eval()
    images = torch.randn(2, 1, 8, 8)
    swapped = images.clone()
    swapped[..., 0:2, 0:2], swapped[..., 6:8, 6:8] = images[..., 6:8, 6:8], images[..., 0:2, 0:2]
    assert not torch.allclose(model(images), model(swapped), atol=1e-5)
    with torch.no_grad():
        model.positions.table.zero_()
    torch.testing.assert_close(model(images), model(swapped))


def test_positional_none_adds_nothing_so_swapped_patches_give_the_same_output():
    torch.manual_seed(0)
    model = vit(pooling="mean", positional="none").eval()
    assert sum(p.numel() for p in model.positions.parameters()) == 0
    images = torch.randn(2, 1, 8, 8)
    swapped = images.clone()
    swapped[..., 0:2, 0:2], swapped[..., 6:8, 6:8] = images[..., 6:8, 6:8], images[..., 0:2, 0:2]
    torch.testing.assert_close(model(images), model(swapped))


def test_residual_and_layer_norm_switches_reach_every_layer():
    full, ablated = vit(), vit(residual=False, layer_norm=False)
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in full.modules()) == 2 * 2 + 1  # two per layer + final
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in ablated.modules())
    assert all(not r.residual for r in ablated.modules() if isinstance(r, Residual))
    assert all(r.residual for r in full.modules() if isinstance(r, Residual))


MODEL = "kind: vit, d_model: 16, heads: 2, depth: 1"  # the smallest valid one; tests append fields


def write_spec(folder, dataset="digits", task="classify", extra=""):
    return write_spec_file(folder, with_fields(MODEL, extra), dataset, task)


def test_a_valid_vit_spec(project, capsys):
    assert main(["validate", write_spec(project)]) == 0
    assert "vit for classify on digits" in capsys.readouterr().out


@pytest.mark.parametrize("dataset,task,extra,field,words", [
    ("digits", "classify", ", patch: 3", "model.patch", "does not divide the 8x8 image"),
    ("digits", "classify", ", heads: 3", "model.heads", "divisible by heads"),
    ("mnist1d", "classify", "", "model", "reads images"),  # 1-D signals: the task fits, the model does not
    ("digits", "generate", "", None, "cannot serve task 'generate'"),
])
def test_invalid_vit_specs(dataset, task, extra, field, words, project, capsys):
    err = validate_error(write_spec(project, dataset, task, extra), capsys)
    assert words in err, err
    if field:
        assert f"t.yaml: {field}: " in err, err

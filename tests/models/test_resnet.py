"""The residual network: shapes, parameter counts by hand, what `skip` switches off, training, and spec checks."""
from __future__ import annotations

import pytest
import torch

from models import build_model
from models.registry import DataShape
from models.resnet import ResidualBlock, ResNetSpec
from pipeline.cli import main
from pipeline.engine.tasks import make_task
from tests.conftest import fit_losses, validate_error, with_fields, write_spec as write_spec_file

DIGITS = DataShape(input_shape=(1, 8, 8), output_size=10)
SIGNAL = DataShape(input_shape=(40,), output_size=3)
CHANNELS_SIGNAL = DataShape(input_shape=(2, 12), output_size=1)


def resnet(shape: DataShape = DIGITS, **fields):
    stages = [{"width": 8, "blocks": 1, "stride": 1}, {"width": 16, "blocks": 1, "stride": 2}]
    return build_model(ResNetSpec(kind="resnet", **{"stem_channels": 8, "stages": stages, **fields}), shape)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ── shapes and parameter counts ──────────────────────────────────────────────
@pytest.mark.parametrize("shape", [DIGITS, SIGNAL, CHANNELS_SIGNAL], ids=["image", "signal", "channels"])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_output_shape_for_1d_and_2d_inputs(shape, block):
    model = resnet(shape, block=block).eval()
    assert model(torch.randn(3, *shape.input_shape)).shape == (3, shape.output_size)
    conv = torch.nn.Conv2d if len(shape.input_shape) == 3 else torch.nn.Conv1d
    assert isinstance(model.stem[0][0], conv)


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_a_stride_2_block_halves_the_resolution_and_sets_the_width(block):
    b = ResidualBlock(2, 4, 8, 2, block, 4, "relu", skip=True).eval()
    assert b(torch.randn(2, 4, 8, 6)).shape == (2, 8, 4, 3)
    b1 = ResidualBlock(1, 4, 8, 2, block, 4, "relu", skip=True).eval()
    assert b1(torch.randn(2, 4, 9)).shape == (2, 8, 5)  # 'same' padding, stride 2: ceil(9 / 2)


def test_parameter_counts_of_a_basic_resnet_by_hand():
    # input (1, 8, 8), stem 4 channels, one stage of one basic block 4 → 8 with stride 2, 10 classes
    model = resnet(stem_channels=4, stages=[{"width": 8, "blocks": 1, "stride": 2}], block="basic")
    stem = 1 * 4 * 3 * 3 + 2 * 4  # conv without bias + batch norm (scale, shift)
    body = (4 * 8 * 9 + 2 * 8) + (8 * 8 * 9 + 2 * 8)  # 3x3 4→8, BN; 3x3 8→8, BN
    projection = 4 * 8 * 1 + 2 * 8  # 1x1 4→8 with BN: width and resolution change
    head = 8 * 10 + 10
    assert count(model.stem) == stem == 44
    assert count(model.blocks[0].body) == body == 896
    assert count(model.blocks[0].shortcut) == projection == 48
    assert count(model) == stem + body + projection + head == 1078  # what `archlab validate` prints for it
    plain = resnet(stem_channels=4, stages=[{"width": 8, "blocks": 1, "stride": 2}], block="basic", skip=False)
    assert count(plain) == stem + body + head  # no projection without skip connections


def test_parameter_counts_of_a_bottleneck_resnet_by_hand():
    # signal (40,): 1-D, kernels of 3 not 3x3. stem 8 → stage (8, 2 blocks, stride 1) → stage (16, 1, stride 2)
    model = resnet(SIGNAL, block="bottleneck", bottleneck_ratio=4)
    stem = 1 * 8 * 3 + 2 * 8

    def bottleneck(c_in, c_out):
        inner = c_out // 4
        return (c_in * inner + 2 * inner) + (inner * inner * 3 + 2 * inner) + (inner * c_out + 2 * c_out)

    first = bottleneck(8, 8)  # 8 → 2 → 2 → 8, identity shortcut
    second = bottleneck(8, 16) + (8 * 16 + 2 * 16)  # 8 → 4 → 4 → 16, projection
    head = 16 * 3 + 3
    assert first == 16 + 4 + 12 + 4 + 16 + 16
    assert [count(b) for b in model.blocks] == [first, second]
    assert isinstance(model.blocks[0].shortcut, torch.nn.Identity)
    assert count(model) == stem + first + second + head


def test_depth_counts_weighted_layers_like_the_paper():
    resnet20 = ResNetSpec(kind="resnet", stages=[{"width": w, "blocks": 3} for w in (16, 32, 64)])
    assert resnet20.depth() == 20
    assert ResNetSpec(kind="resnet", block="bottleneck", stages=[{"width": 64, "blocks": 2}]).depth() == 8


# ── the skip switch ──────────────────────────────────────────────────────────
def silence_residual_branch(block: ResidualBlock) -> None:
    """Zero the last batch norm of F, so F(x) = 0 whatever x is (and in train or eval mode alike)."""
    last_bn = block.body[-1][1]
    with torch.no_grad():
        last_bn.weight.zero_()
        last_bn.bias.zero_()


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_with_skip_a_silenced_block_passes_its_input_through(block):
    torch.manual_seed(0)
    b = ResidualBlock(2, 8, 8, 1, block, 4, "relu", skip=True)
    silence_residual_branch(b)
    x = torch.relu(torch.randn(2, 8, 5, 5))  # what a block sees: the output of a ReLU
    torch.testing.assert_close(b(x), x)  # y = relu(0 + x) = x


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_with_skip_a_silenced_projection_block_is_the_projection(block):
    torch.manual_seed(0)
    b = ResidualBlock(2, 4, 8, 2, block, 4, "relu", skip=True).eval()
    silence_residual_branch(b)
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(b(x), torch.relu(b.shortcut(x)))
    assert b(x).abs().sum() > 0


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_without_skip_a_silenced_block_outputs_nothing_of_its_input(block):
    torch.manual_seed(0)
    b = ResidualBlock(2, 8, 8, 1, block, 4, "relu", skip=False)
    assert b.shortcut is None
    silence_residual_branch(b)
    x = torch.relu(torch.randn(2, 8, 5, 5))
    out = b(x)
    assert not torch.allclose(out, x)
    assert torch.equal(out, torch.zeros_like(x))  # y = relu(F(x)) = relu(0): no path from the input


def test_skip_off_removes_every_shortcut_and_cuts_the_network_off_its_input():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    with_skip, plain = resnet(skip=True).eval(), resnet(skip=False).eval()
    assert all(b.shortcut is not None for b in with_skip.blocks)
    assert all(b.shortcut is None for b in plain.blocks)
    for model in (with_skip, plain):
        for b in model.blocks:
            silence_residual_branch(b)
    # with skips, the features still depend on the image; without, every block outputs 0 and only the head's
    # bias is left
    out = with_skip(x)
    assert out.std(dim=0).max() > 1e-3
    torch.testing.assert_close(plain(x), plain.head.bias.expand(4, -1))


def test_norm_none_removes_every_batch_norm_and_gives_convolutions_a_bias():
    torch.manual_seed(0)
    plain = resnet(skip=False, norm="none", stages=[{"width": 8, "blocks": 1, "stride": 2}]).train()
    bn = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)
    assert not any(isinstance(m, bn) for m in plain.modules())
    assert any(isinstance(m, bn) for m in resnet(skip=False).modules())  # the control: norm batch keeps them
    convs = [m for m in plain.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.bias is not None for c in convs)
    # without batch statistics an example's output in training mode no longer depends on its batch-mates
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(plain(x)[:2], plain(x[:2]))


# ── training ─────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("shape,fields", [
    (DIGITS, {"block": "basic"}),
    (DIGITS, {"block": "basic", "skip": False}),
    (DIGITS, {"block": "basic", "skip": False, "norm": "none"}),
    (SIGNAL, {"block": "bottleneck", "bottleneck_ratio": 2, "activation": "gelu", "head_dropout": 0.1}),
], ids=["basic-2d", "plain-2d", "plain-no-norm-2d", "bottleneck-1d"])
def test_resnet_trains_a_few_steps_and_its_loss_falls(shape, fields):
    torch.manual_seed(0)
    model = resnet(shape, **fields)
    (phase,) = make_task("classify").phases(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, *shape.input_shape, generator=g)
    y = torch.randint(0, shape.output_size, (16,), generator=g)
    losses = fit_losses(model, phase, x, y, steps=30, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0], losses


def test_resnet_regresses_several_channels():
    torch.manual_seed(0)
    model = resnet(CHANNELS_SIGNAL)
    (phase,) = make_task("regress").phases(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 12, generator=g)
    y = x.mean(dim=(1, 2))[:, None] * 3
    losses = fit_losses(model, phase, x, y, steps=30, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0], losses


# ── specs ────────────────────────────────────────────────────────────────────
def test_bottleneck_width_must_be_a_multiple_of_the_ratio():
    with pytest.raises(ValueError, match=r"stages\[1\].width 6 must be a multiple of bottleneck_ratio 4"):
        ResNetSpec(kind="resnet", block="bottleneck", stages=[{"width": 8}, {"width": 6}])
    ResNetSpec(kind="resnet", block="basic", stages=[{"width": 6}])  # basic blocks have no inner width


MODEL = "kind: resnet, stem_channels: 4, stages: [{width: 8, blocks: 1, stride: 2}]"  # the smallest valid one; tests append fields


def write_spec(folder, dataset="digits", task="classify", extra=""):
    return write_spec_file(folder, with_fields(MODEL, extra), dataset, task)


def test_a_valid_resnet_spec(project, capsys):
    assert main(["validate", write_spec(project)]) == 0
    out = capsys.readouterr().out
    assert "resnet for classify on digits, 1,078 parameters" in out, out  # the count by hand above


@pytest.mark.parametrize("extra,field,words", [
    (", block: bottleneck, stages: [{width: 6}]", "model", "stages[0].width 6 must be a multiple of bottleneck_ratio"),
    (", stages: []", "model.stages", "at least 1 item"),
    (", stages: [{width: 8, stride: 5}]", "model.stages[0].stride", "less than or equal to 4"),
    (", block: wide", "model.block", "'basic' or 'bottleneck'"),
    (", skip: maybe", "model.skip", "valid boolean"),
    (", norm: layer", "model.norm", "'batch' or 'none'"),
    (", shortcut: true", "model.shortcut", "Extra inputs are not permitted"),
])
def test_invalid_resnet_specs_name_the_field(extra, field, words, project, capsys):
    err = validate_error(write_spec(project, extra=extra), capsys)
    assert f"t.yaml: {field}: " in err and words in err, err


def test_a_resnet_cannot_model_language(project, capsys):
    err = validate_error(write_spec(project, "corpus", "lm"), capsys)
    assert "model kind 'resnet' cannot serve task 'lm'" in err, err
    assert "Valid pairs:" in err and "resnet: classify, regress" in err and "rnn: classify, regress, lm" in err

"""`activation: identity` and `model.init`: a linear net is one matrix, each scheme draws what it says,
and the default draws nothing (a spec without `init` gets the weights it always got)."""
from __future__ import annotations

import math

import pytest
import torch

from models import build_model
from models.layers.init import InitSpec
from models.layers.recurrent import GRUCell, LSTMCell, RNNCell
from models.mlp import MLP, MLPSpec
from models.registry import DataShape
from models.rnn import RNNSpec
from pipeline.cli import main
from pipeline.engine.train import Trainer
from pipeline.specs.experiment import ExperimentSpec
from tests.conftest import tiny_classification, validate_error, write_spec as write_spec_file

FLAT = DataShape(input_shape=(6,), output_size=3)
WIDE = DataShape(input_shape=(1000,), output_size=3)
SIGNAL = DataShape(input_shape=(2, 12), output_size=3)


def mlp(shape: DataShape = FLAT, **fields):
    return build_model(MLPSpec(kind="mlp", **{"hidden": [16, 16, 16], **fields}), shape)


def test_an_mlp_with_identity_activations_is_one_linear_map():
    torch.manual_seed(0)
    model = mlp(activation="identity").eval()
    with torch.no_grad():
        bias = model(torch.zeros(1, 6))  # the composed biases: f(x) = W x + b
        matrix = model(torch.eye(6)) - bias  # row i: W e_i
        x, y = torch.randn(5, 6), torch.randn(5, 6)
        torch.testing.assert_close(model(x), x @ matrix + bias)
        torch.testing.assert_close(model(2 * x - 3 * y) - bias, 2 * (model(x) - bias) - 3 * (model(y) - bias))
    with torch.no_grad():  # the control: the same net with relu is not linear
        relu = mlp(activation="relu").eval()
        assert not torch.allclose(relu(x), x @ (relu(torch.eye(6)) - relu(torch.zeros(1, 6))) + relu(torch.zeros(1, 6)))


def test_an_mlp_without_hidden_layers_is_logistic_regression(tmp_path):
    model = mlp(hidden=[])
    assert [type(m) for m in model.modules() if not isinstance(m, (MLP, torch.nn.Sequential))] == [torch.nn.Linear]
    assert sum(p.numel() for p in model.parameters()) == 6 * 3 + 3
    spec = ExperimentSpec.model_validate({"name": "logreg", "data": {"dataset": "tiny"}, "task": "classify",
                                          "model": {"kind": "mlp", "hidden": []},
                                          "train": {"epochs": 5, "batch_size": 16, "checkpoint_every_s": 0}})
    metrics = Trainer(spec, tiny_classification(), tmp_path, progress=False).run()  # diagnostics included
    assert metrics["status"] == "finished" and metrics["final"]["val/accuracy"] > 0.8, metrics["final"]


def test_the_default_init_draws_nothing_so_default_weights_are_unchanged():
    """build_model with no `init` (and with `init: {scheme: default}`) gives exactly the module's own weights
    under the same seed, and leaves the random stream where the constructor left it."""
    torch.manual_seed(3)
    direct = MLP(6, [16, 16], 3, "relu", 0.0, False, False)
    after_direct = torch.rand(1)
    for spec in (MLPSpec(kind="mlp", hidden=[16, 16]), MLPSpec(kind="mlp", hidden=[16, 16], init={"scheme": "default"})):
        torch.manual_seed(3)
        built = build_model(spec, FLAT)
        assert torch.equal(torch.rand(1), after_direct)
        for (name, a), (_, b) in zip(direct.state_dict().items(), built.state_dict().items()):
            assert torch.equal(a, b), name


def weights(model: torch.nn.Module) -> torch.Tensor:
    return model.blocks[0].linear.weight.detach()  # (1000 fan-in → 512 fan-out)


@pytest.mark.parametrize("scheme,gain,expected_std", [
    ("he", 1.0, math.sqrt(2 / 1000)),
    ("he", 2.0, 2 * math.sqrt(2 / 1000)),
    ("xavier", 1.0, math.sqrt(2 / (1000 + 512))),
    ("xavier", 0.5, 0.5 * math.sqrt(2 / (1000 + 512))),
])
def test_each_scheme_draws_weights_with_its_std(scheme, gain, expected_std):
    torch.manual_seed(0)
    w = weights(mlp(WIDE, hidden=[512], init={"scheme": scheme, "gain": gain}))
    assert abs(w.mean().item()) < 0.05 * expected_std
    assert w.std().item() == pytest.approx(expected_std, rel=0.02)  # 512 000 draws: the sample std is within 0.2 %


def test_normal_draws_the_given_std_and_leaves_biases_alone():
    torch.manual_seed(0)
    default = mlp(WIDE, hidden=[512])
    torch.manual_seed(0)
    model = mlp(WIDE, hidden=[512], init={"scheme": "normal", "std": 0.3})
    assert weights(model).std().item() == pytest.approx(0.3, rel=0.02)
    assert torch.equal(model.blocks[0].linear.bias, default.blocks[0].linear.bias)  # drawn before init: the same


def test_orthogonal_weights_are_orthogonal():
    torch.manual_seed(0)
    model = mlp(DataShape(input_shape=(16,), output_size=3), init={"scheme": "orthogonal", "gain": 2.0})
    w = model.blocks[1].linear.weight.detach()  # (16, 16)
    torch.testing.assert_close(w @ w.T, 4.0 * torch.eye(16), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell,gates", [("rnn", 1), ("lstm", 4), ("gru", 3)])
def test_recurrent_orthogonal_makes_every_gate_block_orthogonal(cell, gates):
    torch.manual_seed(0)
    default = build_model(RNNSpec(kind="rnn", cell=cell, hidden_size=8), SIGNAL)
    torch.manual_seed(0)
    model = build_model(RNNSpec(kind="rnn", cell=cell, hidden_size=8, init={"recurrent": "orthogonal"}), SIGNAL)
    cells = [m for m in model.modules() if isinstance(m, (RNNCell, LSTMCell, GRUCell))]
    assert cells
    for c in cells:
        blocks = c.hidden_proj.weight.detach().split(8, dim=0)
        assert len(blocks) == gates
        for block in blocks:
            torch.testing.assert_close(block @ block.T, torch.eye(8), atol=1e-5, rtol=0)
    # only the hidden-to-hidden weights were redrawn; input weights and every bias are the family's own
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, default.state_dict()[k])}
    assert changed and all(k.endswith("hidden_proj.weight") for k in changed), changed


def test_tied_embeddings_are_left_alone():
    from models.transformer import TransformerSpec
    lm = DataShape(input_shape=(12,), output_size=7, vocab_size=7, max_len=12)
    fields = {"kind": "transformer", "shape": "decoder", "d_model": 16, "heads": 2, "layers": 1}
    torch.manual_seed(0)
    default = build_model(TransformerSpec(**fields), lm)
    torch.manual_seed(0)
    xavier = build_model(TransformerSpec(**fields, init={"scheme": "xavier"}), lm)
    assert torch.equal(default.embed.weight, xavier.embed.weight)
    assert xavier.head.proj.weight is xavier.embed.weight
    assert not torch.equal(default.blocks.layers[0].ffn.w1.weight, xavier.blocks.layers[0].ffn.w1.weight)


@pytest.mark.parametrize("fields,words", [
    ({"scheme": "normal"}, "scheme normal needs `std`"),
    ({"scheme": "he", "std": 0.1}, "std applies to scheme normal only"),
    ({"gain": 2.0}, "gain applies to schemes xavier, he and orthogonal"),
    ({"scheme": "normal", "std": 0.1, "gain": 2.0}, "gain applies to schemes xavier, he and orthogonal"),
])
def test_init_fields_that_mean_nothing_are_errors(fields, words):
    with pytest.raises(ValueError, match=words):
        InitSpec(**fields)


def test_a_recurrent_gain_alone_is_fine_and_a_dumped_init_validates_again():
    assert InitSpec(recurrent="orthogonal", gain=1.5).gain == 1.5
    for spec in (InitSpec(), InitSpec(scheme="normal", std=0.1), InitSpec(scheme="he", gain=2.0)):
        assert InitSpec.model_validate(spec.model_dump()) == spec


def write_spec(folder, model: str):
    return write_spec_file(folder, model, "digits", "classify")


@pytest.mark.parametrize("model,field,words", [
    ("kind: mlp, init: {scheme: kaiming}", "model.init.scheme", "'default', 'xavier', 'he', 'normal' or 'orthogonal'"),
    ("kind: mlp, init: {scheme: normal}", "model.init", "scheme normal needs `std`"),
    ("kind: mlp, init: {scheme: he, std: 0.1}", "model.init", "std applies to scheme normal only"),
    ("kind: mlp, init: {scheme: he, gain: -1}", "model.init.gain", "greater than 0"),
    ("kind: mlp, init: {recurrent: orthogonal}", "model.init.recurrent", "this model has none"),
    ("kind: mlp, activation: linear", "model.activation", "'identity'"),
])
def test_invalid_init_specs_name_the_field(model, field, words, project, capsys):
    err = validate_error(write_spec(project, model), capsys)
    assert f"t.yaml: {field}: " in err and words in err, err


def test_a_valid_init_spec(project, capsys):
    assert main(["validate", write_spec(project, "kind: mlp, activation: identity, init: {scheme: he, gain: 1.5}")]) == 0
    assert "ok" in capsys.readouterr().out

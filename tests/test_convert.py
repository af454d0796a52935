"""convert.py: PyTorch models to the normal form (from_torch): every supported layer, BatchNorm folding,
skips, unsupported layers and shapes rejected with clear errors, parameters tracked, models untouched."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import polytope_lab as pl
from polytope_lab.network import Conv2dOp, LinearOp

from conftest import make_convnet, make_mlp

DT = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)



class Flatten(nn.Module):
    """A parameter-free module named Flatten, as in the reference implementation's model zoo."""

    def forward(self, x):
        return x.view(x.size(0), -1)


def _bn(n, two_d=False, seed=0):
    torch.manual_seed(seed)
    bn = (nn.BatchNorm2d if two_d else nn.BatchNorm1d)(n)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn


def _models():
    """{name: (model factory, input shape)}: every supported layer pattern."""
    def seq(*layers):
        torch.manual_seed(0)
        return nn.Sequential(*layers)

    return {
        "mlp": (lambda: make_mlp([4, 8, 8, 3]), (4,)),
        "convnet": (lambda: make_convnet((1, 6, 6)), (1, 6, 6)),
        "paper convnet on 28x28": (lambda: seq(nn.Conv2d(1, 4, 4, stride=2, padding=1), nn.ReLU(),
                                               nn.Conv2d(4, 8, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                                               nn.Linear(8 * 7 * 7, 10), nn.ReLU(), nn.Linear(10, 10)), (1, 28, 28)),
        "batchnorm1d after linear": (lambda: seq(nn.Linear(4, 6), _bn(6), nn.ReLU(), nn.Linear(6, 3)), (4,)),
        "batchnorm2d after conv": (lambda: seq(nn.Conv2d(2, 3, 3), _bn(3, True), nn.ReLU(), nn.Flatten(),
                                               nn.Linear(3 * 3 * 3, 2)), (2, 5, 5)),
        "conv flatten batchnorm1d": (lambda: seq(nn.Conv2d(1, 2, 3), nn.Flatten(), _bn(2 * 4 * 4), nn.ReLU(),
                                                 nn.Linear(2 * 4 * 4, 2)), (1, 6, 6)),
        "batchnorm first": (lambda: seq(_bn(4), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)), (4,)),
        "batchnorm2d first": (lambda: seq(_bn(2, True), nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(),
                                          nn.Linear(27, 2)), (2, 5, 5)),
        "batchnorm after relu": (lambda: seq(nn.Linear(4, 5), nn.ReLU(), _bn(5), nn.Linear(5, 2)), (4,)),
        "batchnorm without affine": (lambda: seq(nn.Linear(4, 5), _bn_noaffine(5), nn.ReLU(), nn.Linear(5, 2)),
                                     (4,)),
        "leading relu": (lambda: seq(nn.ReLU(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)), (4,)),
        "trailing relu": (lambda: seq(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2), nn.ReLU()), (4,)),
        "leading and trailing relu": (lambda: seq(nn.ReLU(), nn.Linear(4, 2), nn.ReLU()), (4,)),
        "two affines without relu": (lambda: seq(nn.Linear(4, 6), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)),
                                     (4,)),
        "conv conv without relu": (lambda: seq(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3), nn.ReLU(), nn.Flatten(),
                                               nn.Linear(2 * 2 * 2, 3)), (1, 6, 6)),
        "double relu": (lambda: seq(nn.Linear(4, 5), nn.ReLU(), nn.ReLU(), nn.Linear(5, 2)), (4,)),
        "dropout eval": (lambda: seq(nn.Linear(4, 5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 2)).eval(), (4,)),
        "identity": (lambda: seq(nn.Identity(), nn.Linear(4, 5), nn.Identity(), nn.ReLU(), nn.Linear(5, 2)), (4,)),
        "custom Flatten": (lambda: seq(nn.Conv2d(1, 2, 3), nn.ReLU(), Flatten(), nn.Linear(2 * 4 * 4, 3)), (1, 6, 6)),
        "flatten then linear on image": (lambda: seq(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 2)),
                                         (3, 2, 2)),
        "linear only": (lambda: seq(nn.Linear(4, 3)), (4,)),
        "conv with padding='same'": (lambda: seq(nn.Conv2d(1, 2, 3, padding="same"), nn.ReLU(), nn.Flatten(),
                                                 nn.Linear(2 * 5 * 5, 2)), (1, 5, 5)),
        "conv with padding='valid', no bias": (lambda: seq(nn.Conv2d(1, 2, 3, padding="valid", bias=False), nn.ReLU(),
                                                           nn.Flatten(), nn.Linear(2 * 3 * 3, 2)), (1, 5, 5)),
        "dilated strided conv": (lambda: seq(nn.Conv2d(2, 3, 3, stride=2, padding=2, dilation=2), nn.ReLU(),
                                             nn.Flatten(), nn.Linear(3 * 4 * 4, 2)), (2, 8, 8)),
    }


def _bn_noaffine(n):
    bn = nn.BatchNorm1d(n, affine=False)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return bn


MODELS = _models()
model_params = pytest.mark.parametrize("name", list(MODELS))


def _build(name):
    factory, shape = MODELS[name]
    return factory().double().eval(), shape


@model_params
def test_from_torch_matches_the_model(name):
    model, shape = _build(name)
    net = pl.from_torch(model, shape)
    assert isinstance(net, pl.Network)
    assert net.input_shape == tuple(shape)
    x = torch.randn(5, *shape, generator=_g(11), dtype=DT)
    with torch.no_grad():
        ref = model(x).reshape(5, -1)
        out = net(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@model_params
def test_from_torch_does_not_modify_the_model(name):
    model, shape = _build(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = [(n, p) for n, p in model.named_parameters()]
    buffers = [(n, b) for n, b in model.named_buffers()]
    children = list(model)
    modes = [m.training for m in model.modules()]
    pl.from_torch(model, shape)
    assert [(n, p) for n, p in model.named_parameters()] == params  # the same objects
    assert [(n, b) for n, b in model.named_buffers()] == buffers
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert list(model) == children
    assert [m.training for m in model.modules()] == modes


@model_params
def test_from_torch_normal_form(name):
    """Affines alternate with ReLUs: k affines, k − 1 ReLU layers; shapes chain up."""
    model, shape = _build(name)
    net = pl.from_torch(model, shape)
    assert net.n_relu_layers == len(net.affines) - 1
    assert net.affines[0].in_features == int(np.prod(shape))
    for a, b in zip(net.affines, net.affines[1:]):
        assert a.out_features == b.in_features
    x = torch.randn(2, *shape, generator=_g(12), dtype=DT)
    pre = net.pre_activations(x)
    assert len(pre) == len(net.affines)


def test_relu_count_matches_model_structure():
    assert pl.from_torch(_build("mlp")[0], (4,)).n_relu_layers == 2
    assert pl.from_torch(_build("two affines without relu")[0], (4,)).n_relu_layers == 1
    assert pl.from_torch(_build("double relu")[0], (4,)).n_relu_layers == 1
    assert pl.from_torch(_build("leading relu")[0], (4,)).n_relu_layers == 2
    assert pl.from_torch(_build("trailing relu")[0], (4,)).n_relu_layers == 2
    assert pl.from_torch(_build("linear only")[0], (4,)).n_relu_layers == 0


def test_batchnorm_after_linear_is_folded():
    """Eval BatchNorm right after a Linear/Conv2d is folded into it (one LinearOp, not a composition)."""
    net = pl.from_torch(_build("batchnorm1d after linear")[0], (4,))
    assert isinstance(net.affines[0], LinearOp)
    net = pl.from_torch(_build("batchnorm2d after conv")[0], (2, 5, 5))
    assert isinstance(net.affines[0], Conv2dOp)


def test_network_is_differentiable_in_the_parameters():
    """Operators reference the model's parameters: gradients of the normal form reach them."""
    model, shape = _build("batchnorm1d after linear")
    net = pl.from_torch(model, shape)
    net(torch.randn(3, *shape, dtype=DT)).sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    assert model[1].weight.grad is not None


def test_from_torch_accepts_a_network():
    model, shape = _build("mlp")
    net = pl.from_torch(model, shape)
    assert pl.from_torch(net, shape) is net


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)


def _conv_groups():
    return nn.Conv2d(2, 2, 3, groups=2)


def _bn_training():
    bn = nn.BatchNorm1d(5)
    bn.train()
    return bn


UNSUPPORTED = {
    "MaxPool2d": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                        nn.Linear(8, 2)), (1, 6, 6), 2, "MaxPool2d"),
    "Sigmoid": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 2)), (4,), 1, "Sigmoid"),
    "Tanh last": (lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2), nn.Tanh()), (4,), 3, "Tanh"),
    "BatchNorm1d training": (lambda: nn.Sequential(nn.Linear(4, 5), _bn_training(), nn.ReLU(), nn.Linear(5, 2)),
                             (4,), 1, "BatchNorm1d"),
    "Conv2d groups=2": (lambda: nn.Sequential(_conv_groups(), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)),
                        (2, 4, 4), 0, "Conv2d"),
    "Conv2d reflect padding": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"),
                                                     nn.ReLU(), nn.Flatten(), nn.Linear(32, 2)), (1, 4, 4), 0,
                               "Conv2d"),
    "Dropout training": (lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 2)).train(),
                         (4,), 2, "Dropout"),
    "Flatten(start_dim=2)": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(start_dim=2), nn.Linear(4, 2)),
                             (1, 4, 4), 1, "Flatten"),
    "Conv2d padding='same' with an even kernel": (
        lambda: nn.Sequential(nn.Conv2d(1, 2, 4, padding="same"), nn.ReLU(), nn.Flatten(), nn.Linear(50, 2)),
        (1, 5, 5), 0, "Conv2d"),
    "LeakyReLU": (lambda: nn.Sequential(nn.Linear(4, 5), nn.LeakyReLU(), nn.Linear(5, 2)), (4,), 1, "LeakyReLU"),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_layers_raise(name):
    factory, shape, position, cls = UNSUPPORTED[name]
    model = factory()
    with pytest.raises(ValueError) as info:
        pl.from_torch(model, shape)
    msg = str(info.value)
    assert cls in msg, msg
    assert re.search(rf"\blayer {position}\b", msg), msg
    assert "Supported" in msg or "supported" in msg, msg


def test_non_sequential_model_raises():
    with pytest.raises(ValueError, match=r"nn\.Sequential.*_Net|_Net.*nn\.Sequential"):
        pl.from_torch(_Net(), (4,))


def test_bounding_an_unsupported_model_raises():
    model = UNSUPPORTED["Sigmoid"][0]()
    with pytest.raises(ValueError, match="Sigmoid"):
        pl.Bounder.create("dual").bound(model, pl.LinfBall(torch.zeros(1, 4), 0.1))


def test_model_without_affine_layers_raises():
    with pytest.raises(ValueError):
        pl.from_torch(nn.Sequential(nn.ReLU()), (4,))
    with pytest.raises(ValueError):
        pl.from_torch(nn.Sequential(nn.Flatten()), (2, 2))


def test_wrong_input_shape_raises():
    with pytest.raises(ValueError, match="layer 0"):
        pl.from_torch(make_mlp([4, 5, 2]), (5,))
    with pytest.raises(ValueError, match="layer 0"):
        pl.from_torch(make_convnet((1, 6, 6)), (36,))
    with pytest.raises(ValueError, match="BatchNorm1d"):
        pl.from_torch(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(6).eval()), (4,))


@pytest.mark.parametrize("name", ["mlp", "convnet", "batchnorm1d after linear", "batchnorm2d after conv",
                                  "batchnorm first", "two affines without relu"])
def test_network_tracks_in_place_parameter_updates(name):
    """A Network built once keeps following the model (e.g. across optimizer steps): its operators
    reference the parameters, so an in-place update of the model shows in the Network's output."""
    model, shape = _build(name)
    net = pl.from_torch(model, shape)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5).add_(0.1)
    x = torch.randn(3, *shape, generator=_g(13), dtype=DT)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x).reshape(3, -1), rtol=1e-10, atol=1e-10)

"""Cases whose bounds are known in closed form or by hand from the formulas in DESIGN.md."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import polytope_lab as pl

from conftest import make_mlp, random_inputs


DUAL_CONFIGS = {
    "dual-auto": dict(),
    "dual-forward": dict(strategy="forward"),
    "dual-backward": dict(strategy="backward"),
    "dual-optimized": dict(alpha="optimized", steps=5),
}
dual_params = pytest.mark.parametrize("options", list(DUAL_CONFIGS.values()), ids=list(DUAL_CONFIGS))


def _dense(network):
    """The whole (ReLU-free) network as (W, b) with W dense float64 (n_out, n_in)."""
    assert network.n_relu_layers == 0
    A = network.affines[0]
    W = torch.as_tensor(A.as_matrix().toarray())
    b = A.bias().detach().reshape(-1).double()
    return W, b


def _linear_nets():
    torch.manual_seed(0)
    single = nn.Sequential(nn.Linear(5, 4)).double()
    torch.manual_seed(1)
    composed = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 4)).double()
    torch.manual_seed(2)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)).double()
    return {"linear": (single, (5,)), "linear-linear": (composed, (5,)), "conv-flatten-linear": (conv, (2, 5, 5))}


LINEAR_NETS = _linear_nets()
linear_params = pytest.mark.parametrize("name", list(LINEAR_NETS))


def _closed_form(model, shape, x, eps, C, norm):
    W, b = _dense(pl.from_torch(model, shape))
    # cross-check W, b against the model itself
    x_flat = x.reshape(x.shape[0], -1)
    torch.testing.assert_close(x_flat @ W.t() + b, model(x).detach().reshape(x.shape[0], -1))
    CW = C @ W                                                   # (m, n_in)
    centre = (x_flat @ W.t() + b) @ C.t()                        # (B, m)
    dev = eps * (CW.abs().sum(1) if norm == "linf" else CW.norm(dim=1))
    return centre - dev, centre + dev


@dual_params
@linear_params
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_no_relu_network_dual_is_closed_form(name, options, norm):
    model, shape = LINEAR_NETS[name]
    x = random_inputs(shape, batch=2, seed=3)
    C = torch.randn(3, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eps = 0.13
    region = pl.LinfBall(x, eps) if norm == "linf" else pl.L2Ball(x, eps)
    b = pl.Bounder.create("dual", **options).bound(model, region, C=C)
    lo, up = _closed_form(model, shape, x, eps, C, norm)
    torch.testing.assert_close(b.lower, lo, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b.upper, up, rtol=1e-9, atol=1e-9)
    assert len(b.intermediate) == 0


@dual_params
@linear_params
def test_no_relu_network_with_clip_box(name, options):
    """Box input term: C(W mid + b) ∓ |CW| rad with mid/rad of the clipped box."""
    model, shape = LINEAR_NETS[name]
    x = random_inputs(shape, batch=2, seed=3)
    C = torch.randn(3, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    region = pl.LinfBall(x, 0.3, clip=(0.0, 1.0))
    W, b0 = _dense(pl.from_torch(model, shape))
    lo, hi = (t.reshape(2, -1) for t in region.box())
    mid, rad = (lo + hi) / 2, (hi - lo) / 2
    centre = (mid @ W.t() + b0) @ C.t()
    dev = rad @ (C @ W).abs().t()
    bd = pl.Bounder.create("dual", **options).bound(model, region, C=C)
    torch.testing.assert_close(bd.lower, centre - dev, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(bd.upper, centre + dev, rtol=1e-9, atol=1e-9)


def test_single_linear_layer_interval_identity_C():
    """With C = I interval arithmetic is exact for one affine map: W x + b ± eps |W| 1 (L∞)."""
    model, shape = LINEAR_NETS["linear"]
    x = random_inputs(shape, batch=2, seed=3)
    W, b0 = _dense(pl.from_torch(model, shape))
    b = pl.Bounder.create("interval").bound(model, pl.LinfBall(x, 0.2))
    centre = x.reshape(2, -1) @ W.t() + b0
    torch.testing.assert_close(b.lower, centre - 0.2 * W.abs().sum(1))
    torch.testing.assert_close(b.upper, centre + 0.2 * W.abs().sum(1))


def _scalar_net(w1, b1, w2, b2):
    """x -> w2 · relu(w1 x + b1) + b2 with 1-d input and hidden layer of len(w1) units."""
    w1 = torch.as_tensor(w1, dtype=torch.float64).reshape(-1, 1) if torch.as_tensor(w1).dim() <= 1 else \
        torch.as_tensor(w1, dtype=torch.float64)
    l1 = nn.Linear(w1.shape[1], w1.shape[0]).double()
    l2 = nn.Linear(w1.shape[0], 1).double()
    with torch.no_grad():
        l1.weight.copy_(w1)
        l1.bias.copy_(torch.as_tensor(b1, dtype=torch.float64).reshape(-1))
        l2.weight.copy_(torch.as_tensor(w2, dtype=torch.float64).reshape(1, -1))
        l2.bias.copy_(torch.as_tensor(b2, dtype=torch.float64).reshape(-1))
    return nn.Sequential(l1, nn.ReLU(), l2)


def _bound(model, x, eps, **options):
    x = torch.tensor(x, dtype=torch.float64).reshape(1, -1)
    return pl.Bounder.create(**options).bound(model, pl.LinfBall(x, eps))


def test_one_neuron_identity_relu():
    """z = relu(x), x ∈ [-1, 1]: l = -1, u = 1, d = 1/2.

    Lower (c = 1): ν̂_2 = -1, ν_2 = -α[1] = -1/2, ν̂_1 = -1/2, J = -ε|ν̂_1| = -1/2.
    Upper (c = -1): ν̂_2 = 1, ν_2 = d = 1/2, ν̂_1 = 1/2, J = -1/2 + l·1/2 = -1, upper = 1.
    Interval: [0, 1]. Optimised α (lower: J = -α, best α = 0): [0, 1], the true range.
    """
    model = _scalar_net([1.0], [0.0], [1.0], [0.0])
    d = _bound(model, [0.0], 1.0, name="dual")
    assert d.lower.item() == pytest.approx(-0.5, abs=1e-12)
    assert d.upper.item() == pytest.approx(1.0, abs=1e-12)
    (l, u), = d.intermediate
    assert l.item() == pytest.approx(-1.0) and u.item() == pytest.approx(1.0)
    for strategy in ("forward", "backward"):
        s = _bound(model, [0.0], 1.0, name="dual", strategy=strategy)
        assert s.lower.item() == pytest.approx(-0.5, abs=1e-12) and s.upper.item() == pytest.approx(1.0, abs=1e-12)
    i = _bound(model, [0.0], 1.0, name="interval")
    assert i.lower.item() == pytest.approx(0.0, abs=1e-12)
    assert i.upper.item() == pytest.approx(1.0, abs=1e-12)
    o = _bound(model, [0.0], 1.0, name="dual", alpha="optimized", steps=30)
    assert o.lower.item() == pytest.approx(0.0, abs=1e-6)
    assert o.lower.item() <= 1e-12  # still sound: the true minimum is 0
    assert o.upper.item() == pytest.approx(1.0, abs=1e-9)


def test_one_neuron_off_centre():
    """z = relu(x), x ∈ [-0.5, 1.5]: d = 3/4; lower = α(x - ε) = -3/8, upper = 2εd = 1.5 = u."""
    model = _scalar_net([1.0], [0.0], [1.0], [0.0])
    d = _bound(model, [0.5], 1.0, name="dual")
    assert d.lower.item() == pytest.approx(-0.375, abs=1e-12)
    assert d.upper.item() == pytest.approx(1.5, abs=1e-12)


def test_one_neuron_with_biases_and_negative_output_weight():
    """f = 0.5 - relu(2x - 1), x ∈ [0, 2]: ẑ ∈ [-1, 3], d = 3/4, true range [-2.5, 0.5].

    Lower (c = 1): ν_3 = -1, ν̂_2 = W_2ᵀν_3 = 1, ν_2 = d = 3/4, ν̂_1 = 3/2,
      J = -ν_3 b_2 - ν_2 b_1 - x ν̂_1 - ε|ν̂_1| + l[ν_2]_+ = 0.5 + 0.75 - 1.5 - 1.5 - 0.75 = -2.5 (exact).
    Upper (c = -1): ν_3 = 1, ν̂_2 = -1, ν_2 = -α = -3/4, ν̂_1 = -3/2,
      J = -0.5 - 0.75 + 1.5 - 1.5 + 0 = -1.25, upper = 1.25; with optimised α (J = -0.5 - α): 0.5.
    Interval: [-2.5, 0.5].
    """
    model = _scalar_net([2.0], [-1.0], [-1.0], [0.5])
    d = _bound(model, [1.0], 1.0, name="dual")
    assert d.lower.item() == pytest.approx(-2.5, abs=1e-12)
    assert d.upper.item() == pytest.approx(1.25, abs=1e-12)
    i = _bound(model, [1.0], 1.0, name="interval")
    assert (i.lower.item(), i.upper.item()) == pytest.approx((-2.5, 0.5), abs=1e-12)
    o = _bound(model, [1.0], 1.0, name="dual", alpha="optimized", steps=30)
    assert o.lower.item() == pytest.approx(-2.5, abs=1e-9)
    assert o.upper.item() == pytest.approx(0.5, abs=1e-6)
    assert o.upper.item() >= 0.5 - 1e-12


def test_two_neurons():
    """f = relu(x1 + x2) + relu(x1 - x2), x ∈ [-1, 1]²: l = (-2, -2), u = (2, 2), d = 1/2; true range [0, 2].

    Lower (c = 1): ν̂_2 = (-1, -1), ν_2 = (-1/2, -1/2), ν̂_1 = W_1ᵀν_2 = (-1, 0), J = -‖ν̂_1‖₁ = -1.
    Upper (c = -1): ν̂_2 = (1, 1), ν_2 = (1/2, 1/2), ν̂_1 = (1, 0), J = -1 + (-2)(1/2)·2 = -3, upper = 3.
    Interval: ẑ ∈ [-2, 2]², z ∈ [0, 2]², f ∈ [0, 4].
    """
    model = _scalar_net([[1.0, 1.0], [1.0, -1.0]], [0.0, 0.0], [1.0, 1.0], [0.0])
    for strategy in ("auto", "forward", "backward"):
        d = _bound(model, [0.0, 0.0], 1.0, name="dual", strategy=strategy)
        assert d.lower.item() == pytest.approx(-1.0, abs=1e-12)
        assert d.upper.item() == pytest.approx(3.0, abs=1e-12)
        (l, u), = d.intermediate
        torch.testing.assert_close(l, torch.tensor([[-2.0, -2.0]], dtype=torch.float64))
        torch.testing.assert_close(u, torch.tensor([[2.0, 2.0]], dtype=torch.float64))
    i = _bound(model, [0.0, 0.0], 1.0, name="interval")
    assert (i.lower.item(), i.upper.item()) == pytest.approx((0.0, 4.0), abs=1e-12)


def test_two_neurons_l2():
    """Same network, L2 ball of radius 1 at 0: ẑ_j ∈ [-√2, √2], d = 1/2, ν̂_1 = ∓(1, 0) as above.

    Lower: J = -ε‖ν̂_1‖₂ = -1. Upper: J = -1 + (-√2)(1/2)·2 = -1 - √2, upper = 1 + √2.
    """
    model = _scalar_net([[1.0, 1.0], [1.0, -1.0]], [0.0, 0.0], [1.0, 1.0], [0.0])
    x = torch.zeros(1, 2, dtype=torch.float64)
    d = pl.Bounder.create("dual").bound(model, pl.L2Ball(x, 1.0))
    assert d.lower.item() == pytest.approx(-1.0, abs=1e-12)
    assert d.upper.item() == pytest.approx(1.0 + 2 ** 0.5, abs=1e-12)
    (l, u), = d.intermediate
    torch.testing.assert_close(u, torch.full((1, 2), 2 ** 0.5, dtype=torch.float64))
    torch.testing.assert_close(l, -u)


def test_second_layer_intermediate_bound_by_hand():
    """Three layers: x ∈ [-1, 1], ẑ_2 = x (d = 1/2, l = -1), ẑ_3 = relu(ẑ_2) - 0.25.

    Bounds of ẑ_3 (Algorithm 1, fixed α): lower = -0.5 - 0.25 = -0.75, upper = 1 - 0.25 = 0.75
    (the one-neuron case shifted by the bias). Output f = relu(ẑ_3): l_3 = -0.75, u_3 = 0.75, d_3 = 1/2.
    Lower of f (c = 1): ν_4 = -1, ν̂_3 = -1, ν_3 = -1/2, ν̂_2 = -1/2, ν_2 = d_2 ν̂_2 = -1/4, ν̂_1 = -1/4,
      J = -ν_3 b_3 - ε|ν̂_1| + l_2[ν_2]_+ + l_3[ν_3]_+ = -(−1/2)(−1/4) - 1/4 = -0.375.
    Upper (c = -1): ν̂_3 = 1, ν_3 = 1/2, ν̂_2 = 1/2, ν_2 = 1/4, ν̂_1 = 1/4,
      J = -(1/2)(-1/4) - 1/4 + (-1)(1/4) + (-0.75)(1/2) = 0.125 - 0.25 - 0.25 - 0.375 = -0.75, upper 0.75.
    """
    # trailing ReLU: the output is relu(ẑ_3)
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1), nn.ReLU()).double()
    with torch.no_grad():
        for lin, b in ((model[0], 0.0), (model[2], -0.25)):
            lin.weight.fill_(1.0)
            lin.bias.fill_(b)
    for strategy in ("auto", "forward", "backward"):
        d = _bound(model, [0.0], 1.0, name="dual", strategy=strategy)
        (a1, b1), (a2, b2) = d.intermediate
        assert (a1.item(), b1.item()) == pytest.approx((-1.0, 1.0), abs=1e-12)
        assert (a2.item(), b2.item()) == pytest.approx((-0.75, 0.75), abs=1e-12)
        assert d.lower.item() == pytest.approx(-0.375, abs=1e-12)
        assert d.upper.item() == pytest.approx(0.75, abs=1e-12)


@pytest.mark.parametrize("options", list(DUAL_CONFIGS.values()), ids=list(DUAL_CONFIGS))
def test_stable_active_hidden_layer_is_exact(options):
    """All hidden pre-activations positive over the region: the network is affine there and the dual is
    exactly the linear closed form C(W₂(W₁x + b₁) + b₂) ∓ ε‖(C W₂ W₁)ᵀ‖₁."""
    model = make_mlp([4, 6, 3], seed=3)
    with torch.no_grad():
        model[0].bias.fill_(10.0)
    x = random_inputs((4,), batch=2, seed=3)
    C = torch.randn(2, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    eps = 0.1
    b = pl.Bounder.create("dual", **options).bound(model, pl.LinfBall(x, eps), C=C)
    (l, u), = b.intermediate
    assert (l > 0).all(), "test set-up: the hidden layer should be stable"
    W1, b1, W2, b2 = (t.detach() for t in (model[0].weight, model[0].bias, model[2].weight, model[2].bias))
    centre = ((x @ W1.t() + b1) @ W2.t() + b2) @ C.t()
    dev = eps * (C @ W2 @ W1).abs().sum(1)
    torch.testing.assert_close(b.lower, centre - dev, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b.upper, centre + dev, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["interval", "dual"])
def test_dead_hidden_layer_gives_the_output_bias(name):
    """All hidden pre-activations negative: f ≡ b₂, exactly, for interval and dual alike."""
    model = make_mlp([4, 6, 3], seed=3)
    with torch.no_grad():
        model[0].bias.fill_(-10.0)
    x = random_inputs((4,), batch=2, seed=3)
    b = pl.Bounder.create(name).bound(model, pl.LinfBall(x, 0.1))
    expected = model[2].bias.detach().expand(2, 3)
    torch.testing.assert_close(b.lower, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.upper, expected, rtol=0, atol=1e-12)

"""Skip connections (Wong et al. 2018b's dense form): the normal form of a DenseSequential, and the dual
and interval bounds through it (the LP and MILP in depth: test_skip_lp_milp.py; every backend on random
residual nets here and in test_contract.py).

Exact references: a residual net whose ReLUs are all stably active is affine, so its L∞ range is the
closed form ``C f(x) ∓ ε ‖(C J)ᵀ‖₁`` with J its Jacobian; a skip net whose skip map is zero equals the
sequential net without it; and sampling plus PGD give inner bounds that every sound bound must contain.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polytope_lab as pl
from polytope_lab import models
from polytope_lab.bounds import EstimatedBounds
from polytope_lab.dual import intermediate, intermediate_bounds, skips
from polytope_lab.network import IdentityOp, LinearOp, Network

from conftest import (RESNET_KINDS, assert_within, make_resnet, output_of, pgd_extremes, random_inputs,
                      sampled_values)

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True, max_examples=15)


def _regions(x):
    return {"linf": pl.LinfBall(x, 0.1), "linf-clip": pl.LinfBall(x, 0.2, clip=(0.0, 1.0)), "l2": pl.L2Ball(x, 0.3)}


# --------------------------------------------------------------------------------------------------
# normal form
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", RESNET_KINDS)
def test_normal_form_computes_the_model(kind):
    model, shape = make_resnet(kind)
    network = pl.from_torch(model, shape)
    assert network.has_skips
    x = random_inputs(shape, batch=5, seed=2, low=-1.0)
    assert torch.allclose(network(x), output_of(model, x), atol=1e-12)


def test_residual_mlp_structure():
    """Two blocks: each closing ReLU's affine reads the block's input through an identity skip."""
    model = models.residual_mlp(4, 2, 3, 2).double().eval()
    network = pl.from_torch(model, (3,))
    assert len(network.affines) == 6
    assert sorted(network.skips) == [2, 4]
    for i, j in ((2, 1), (4, 3)):
        (src, S), = network.skips_into(i)
        assert src == j and isinstance(S, IdentityOp)


def test_dense_sequential_without_dense_is_sequential():
    torch.manual_seed(0)
    layers = [nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)]
    network = pl.from_torch(models.DenseSequential(*layers).double(), (3,))
    assert not network.has_skips and len(network.affines) == 2


def test_dense_reads_the_right_outputs():
    """Dense(a, None, b) adds a(output three back) and b(latest): check against a hand computation."""
    torch.manual_seed(1)
    a, b, first = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(3, 4)
    model = models.DenseSequential(first, nn.ReLU(), models.Dense(a, None, b)).double()
    x = random_inputs((3,), batch=4, seed=3, low=-1.0)
    with torch.no_grad():
        expected = a(x) + b(torch.relu(first(x)))
        assert torch.allclose(model(x), expected)
        assert torch.allclose(pl.from_torch(model, (3,))(x), expected)


def test_affine_layer_after_a_sum_adds_its_bias_once():
    """Dense output (two terms) straight into a Linear, and a Linear after the input skip: no ReLU between."""
    torch.manual_seed(7)
    model = models.DenseSequential(nn.Linear(3, 4), nn.ReLU(), models.Dense(nn.Linear(3, 4), None, nn.Linear(4, 4)),
                                   nn.Linear(4, 4), nn.Linear(4, 2)).double().eval()
    x = random_inputs((3,), batch=4, seed=3, low=-1.0)
    network = pl.from_torch(model, (3,))
    assert network.has_skips
    assert torch.allclose(network(x), output_of(model, x), atol=1e-12)
    region = pl.LinfBall(x, 0.2)
    values = sampled_values(model, region, None)
    for name in ("interval", "dual"):
        b = pl.Bounder.create(name).bound(model, region)
        assert_within(values, b.lower, b.upper, what=name)


def test_zero_skip_equals_the_sequential_net():
    """A skip whose map is zero changes nothing: every bound equals the sequential net's."""
    torch.manual_seed(4)
    l1, l2, l3 = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 2)
    zero = nn.Linear(3, 5)
    with torch.no_grad():
        zero.weight.zero_()
        zero.bias.zero_()
    seq = nn.Sequential(l1, nn.ReLU(), l2, nn.ReLU(), l3).double().eval()
    dense = models.DenseSequential(l1, nn.ReLU(), models.Dense(zero, None, l2), nn.ReLU(), l3).double().eval()
    assert pl.from_torch(dense, (3,)).has_skips
    region = pl.LinfBall(random_inputs((3,), batch=3, seed=5), 0.3)
    for name, options in (("interval", {}), ("dual", {}), ("dual", {"alpha": "optimized", "steps": 5})):
        a, b = (pl.Bounder.create(name, **options).bound(m, region) for m in (seq, dense))
        assert torch.allclose(a.lower, b.lower, atol=1e-12) and torch.allclose(a.upper, b.upper, atol=1e-12)


@pytest.mark.parametrize("make, match", [
    (lambda: nn.Sequential(nn.Linear(3, 3), models.Dense(nn.Linear(3, 3))), "needs a DenseSequential"),
    (lambda: models.DenseSequential(nn.Linear(3, 3), models.Dense(nn.Linear(3, 3), None, None, nn.Linear(3, 3))),
     "only 2 earlier outputs"),
    (lambda: models.DenseSequential(nn.Linear(3, 4), models.Dense(nn.Identity(), nn.Identity())),
     "different shapes"),
    (lambda: models.DenseSequential(nn.Linear(3, 3), models.Dense(nn.Tanh(), nn.Linear(3, 3))), "Tanh"),
])
def test_bad_dense_models_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        pl.from_torch(make().double(), (3,))


def test_relu_inside_a_dense_branch():
    """A branch with its own ReLU (Dense(Sequential(Linear, ReLU, Linear), None, None, Linear)) from the
    input normalises exactly."""
    torch.manual_seed(6)
    model = models.DenseSequential(
        nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4),
        models.Dense(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4)), None, None, nn.Linear(4, 4)),
        nn.ReLU(), nn.Linear(4, 2)).double().eval()
    x = random_inputs((3,), batch=4, seed=2, low=-1.0)
    assert torch.allclose(pl.from_torch(model, (3,))(x), output_of(model, x), atol=1e-12)
    region = pl.LinfBall(x, 0.2)
    b = pl.Bounder.create("dual").bound(model, region)
    assert_within(sampled_values(model, region, None), b.lower, b.upper)


def test_dense_needs_a_module():
    with pytest.raises(ValueError, match="at least one module"):
        models.Dense(None, None)


def test_network_validates_skips():
    ops = [LinearOp(torch.randn(4, 3), None), LinearOp(torch.randn(4, 4), None), LinearOp(torch.randn(2, 4), None)]
    with pytest.raises(ValueError, match="only read earlier layers"):
        Network(ops, (3,), {1: [(1, LinearOp(torch.randn(4, 4), None))]})
    with pytest.raises(ValueError, match="z_0 has 3 units"):
        Network(ops, (3,), {2: [(0, LinearOp(torch.randn(2, 4), None))]})
    with pytest.raises(ValueError, match="affines 1..2"):
        Network(ops, (3,), {0: [(0, LinearOp(torch.randn(4, 3), None))]})


# --------------------------------------------------------------------------------------------------
# bounds: sandwich, closed form, routes
# --------------------------------------------------------------------------------------------------

BOUNDERS = {"interval": ("interval", {}), "dual": ("dual", {}),
            "dual-optimized": ("dual", {"alpha": "optimized", "steps": 10}),
            "dual-column-chunk": ("dual", {"column_chunk": 3})}


@pytest.mark.parametrize("kind", RESNET_KINDS)
@pytest.mark.parametrize("norm", ["linf", "linf-clip", "l2"])
def test_sandwich_on_residual_nets(kind, norm):
    """Sampled and PGD values lie inside every bound; dual-optimized ⊆ dual ⊆ interval (up to rounding)."""
    model, shape = make_resnet(kind)
    region = _regions(random_inputs(shape, batch=3, seed=1))[norm]
    lo, hi = pgd_extremes(model, region)
    values = torch.cat([sampled_values(model, region, None), lo[None], hi[None]])
    b = {k: pl.Bounder.create(n, **o).bound(model, region) for k, (n, o) in BOUNDERS.items()}
    for name, bounds in b.items():
        assert_within(values, bounds.lower, bounds.upper, what=f"{name} on {kind}/{norm}")
    for inner, outer in (("dual", "interval"), ("dual-optimized", "dual")):
        assert (b[inner].lower >= b[outer].lower - 1e-9).all() and (b[inner].upper <= b[outer].upper + 1e-9).all()


@given(seed=st.integers(0, 10_000), width=st.integers(2, 6), blocks=st.integers(1, 3),
       eps=st.floats(0.01, 0.5))
@settings(**SETTINGS)
def test_sandwich_on_random_residual_mlps(seed, width, blocks, eps):
    torch.manual_seed(seed)
    model = models.residual_mlp(width, blocks, 2, 3).double().eval()
    region = pl.LinfBall(random_inputs((2,), batch=2, seed=seed, low=-1.0), eps)
    values = sampled_values(model, region, None, n=300, seed=seed)
    exact = {"lp": ("lp", {}), "milp": ("milp", {"threads": 1})}
    for name, (n, o) in {**BOUNDERS, **exact}.items():
        bounds = pl.Bounder.create(n, **o).bound(model, region)
        assert_within(values, bounds.lower, bounds.upper, what=name)


def _stably_active(kind):
    """A residual net with every ReLU stably active at small ε: positive weights and large biases."""
    model, shape = make_resnet(kind)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(p.abs() * 0.5)
            else:
                p.fill_(3.0)
    return model, shape


@pytest.mark.parametrize("kind", RESNET_KINDS)
def test_affine_residual_net_is_closed_form(kind):
    """No unstable ReLU: the dual (any α) is exact, ``C f(x) ∓ ε‖(C J)ᵀ‖₁``; interval is no tighter."""
    model, shape = _stably_active(kind)
    x = random_inputs(shape, batch=2, seed=7)
    eps = 0.01
    region = pl.LinfBall(x, eps)
    C = torch.randn(4, output_of(model, x).shape[1], generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    b = pl.Bounder.create("dual").bound(model, region, C)
    assert all((l > 0).all() for l, _ in b.intermediate), "test net is not stably active"
    for k in range(2):
        J = torch.autograd.functional.jacobian(lambda v: model(v.reshape(1, *shape)).reshape(-1), x[k])
        CJ = C @ J.reshape(J.shape[0], -1)                                     # (m, n0)
        centre = C @ output_of(model, x[k:k + 1])[0]
        radius = eps * CJ.abs().sum(1)
        assert torch.allclose(b.lower[k], centre - radius, atol=1e-10)
        assert torch.allclose(b.upper[k], centre + radius, atol=1e-10)
    iv = pl.Bounder.create("interval").bound(model, region, C)
    assert (iv.lower <= b.lower + 1e-10).all() and (iv.upper >= b.upper - 1e-10).all()


@pytest.mark.parametrize("kind", RESNET_KINDS)
def test_routes_agree(kind):
    """Forward columns through the skips ("auto", "forward"), backward rows ("backward"), row chunks and
    example chunks all give the same bounds."""
    model, shape = make_resnet(kind)
    region = pl.LinfBall(random_inputs(shape, batch=3, seed=1), 0.15)
    ref = pl.Bounder.create("dual", strategy="backward").bound(model, region)
    for options in ({}, {"strategy": "forward"}, {"column_chunk": 1}, {"column_chunk": 4, "devices": ["cpu", "cpu"]},
                    {"max_memory": 1}):
        b = pl.Bounder.create("dual", **options).bound(model, region)
        assert torch.allclose(b.lower, ref.lower, atol=1e-12) and torch.allclose(b.upper, ref.upper, atol=1e-12)
        for (l, u), (l0, u0) in zip(b.intermediate, ref.intermediate):
            assert torch.allclose(l, l0, atol=1e-12) and torch.allclose(u, u0, atol=1e-12)


def _zero_skip_pair(n0=40, width=30):
    """(sequential net, the same net with a zero skip from the input into the second affine)."""
    torch.manual_seed(4)
    l1, l2, l3, l4 = nn.Linear(n0, width), nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, 3)
    zero = nn.Linear(n0, width)
    with torch.no_grad():
        zero.weight.zero_()
        zero.bias.zero_()
    seq = nn.Sequential(l1, nn.ReLU(), l2, nn.ReLU(), l3, nn.ReLU(), l4).double().eval()
    dense = models.DenseSequential(l1, nn.ReLU(), models.Dense(zero, None, l2), nn.ReLU(), l3, nn.ReLU(),
                                   l4).double().eval()
    return seq, dense


@pytest.mark.parametrize("norm", ["linf", "linf-clip", "l2"])
def test_projections_through_a_zero_skip_equal_the_sequential_estimate(norm):
    """Same draws, same estimator: the skip frontier's sketches give the sequential frontier's estimates
    (whose convergence test_dual_projections.py checks), whether the input, a ReLU layer, or nothing is projected."""
    seq, dense = _zero_skip_pair()
    region = _regions(random_inputs((40,), batch=3, seed=2))[norm]
    for k, estimated in ((5, True), (25, True), (1000, False)):  # 40 inputs, up to 30 unstable units
        a, b = (pl.Bounder.create("dual", proj=k, strategy="forward", seed=3).bound(m, region) for m in (seq, dense))
        assert isinstance(b, EstimatedBounds) == estimated and b.method == a.method
        assert torch.allclose(a.lower, b.lower, atol=1e-12) and torch.allclose(a.upper, b.upper, atol=1e-12)
        for (l, u), (l0, u0) in zip(b.intermediate, a.intermediate):
            assert torch.allclose(l, l0, atol=1e-12) and torch.allclose(u, u0, atol=1e-12)
    y = torch.tensor([0, 1, 2])
    losses = [pl.robust_loss(m, 0.1, region.x, y, region=region, proj=5, generator=torch.Generator().manual_seed(1))[0]
              for m in (seq, dense)]
    assert torch.allclose(*losses, atol=1e-12)


def _wide_input_skip_net(n0, width):
    """Input → Linear → ReLU → [Linear of the input + Linear] → ReLU → Linear: a skip from the input into a
    hidden layer, so the (ε-scaled) input sketch reaches a later layer through the skip."""
    return models.DenseSequential(nn.Linear(n0, width), nn.ReLU(),
                                  models.Dense(nn.Linear(n0, width), None, nn.Linear(width, width)), nn.ReLU(),
                                  nn.Linear(width, 5))


@pytest.mark.parametrize("kind", ["residual", "input-skip"])
@pytest.mark.parametrize("norm", ["linf", "linf-clip", "l2"])
def test_projections_on_skip_nets_converge(norm, kind):
    """2100 inputs, 60 units per hidden layer (almost all unstable): with k = 21 the input and every ReLU
    layer are sketched, with k = 2001 the input only; the error of the intermediate bounds (relative to
    the exact width) falls about √(2001/21) ≈ 10× (measured 14–26× over three seeds on the residual MLP)."""
    torch.manual_seed(0)
    model = models.residual_mlp(60, 2, 2100, 5) if kind == "residual" else _wide_input_skip_net(2100, 60)
    net = pl.from_torch(model.double().eval(), (2100,))
    x = random_inputs((2100,), batch=2)
    region = {"linf": pl.LinfBall(x, 0.05), "linf-clip": pl.LinfBall(x, 0.05, clip=(0, 1)),
              "l2": pl.L2Ball(x, 1.0)}[norm]
    exact = intermediate_bounds(net, region)
    errors = {}
    for k in (21, 2001):
        est, frontier = intermediate_bounds(net, region, proj=k, generator=torch.Generator().manual_seed(0),
                                            return_frontier=True)
        assert frontier.estimated
        errors[k] = max(((a[0] - b[0]).abs() / (b[1] - b[0])).mean().item() for a, b in zip(est, exact))
    assert errors[2001] < 0.05 and errors[2001] < errors[21] / 4, errors


def test_projections_on_skip_nets_are_labelled_and_train():
    """A residual conv net: estimated bounds refuse to certify; backward rows stay exact; the projected
    robust loss is differentiable and close to the exact one."""
    model, shape = make_resnet("conv")
    x = random_inputs(shape, batch=4, seed=3)
    region = pl.LinfBall(x, 0.05)
    est = pl.Bounder.create("dual", proj=5).bound(model, region)
    assert isinstance(est, EstimatedBounds) and est.method == "dual-proj5"
    assert not est.certified.any()
    exact = pl.Bounder.create("dual", strategy="backward").bound(model, region)
    rows = pl.Bounder.create("dual", proj=5, strategy="backward").bound(model, region)
    assert type(rows) is pl.Bounds and torch.equal(rows.lower, exact.lower)
    y = output_of(model, x).argmax(1)
    loss, _ = pl.robust_loss(model, 0.05, x, y, proj=5, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    exact_loss, _ = pl.robust_loss(model, 0.05, x, y)
    assert abs(loss.item() - exact_loss.item()) < 0.5 * exact_loss.item()


# --------------------------------------------------------------------------------------------------
# training through the skips
# --------------------------------------------------------------------------------------------------


def test_robust_loss_differentiates_through_skips():
    """The robust loss bounds the clean loss, and its gradient reaches every layer (skip targets too)."""
    model, shape = make_resnet("conv")
    x = random_inputs(shape, batch=4, seed=3)
    y = output_of(model, x).argmax(1)
    loss, err = pl.robust_loss(model, 0.05, x, y)
    clean = nn.functional.cross_entropy(output_of(model, x), y)
    assert loss >= clean - 1e-12 and 0.0 <= float(err) <= 1.0
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_robust_training_of_a_residual_net_lowers_the_bound():
    torch.manual_seed(0)
    X = torch.rand(64, 2, dtype=torch.float64)
    y = (X[:, 0] > X[:, 1]).long()
    model = models.residual_mlp(8, 1, 2, 2).double()
    region = pl.LinfBall(X, 0.02)
    C = pl.margin_matrix(y, 2).double()
    before = pl.Bounder.create("dual").bound(model, region, C).lower.mean()
    pl.train(model, X, y, mode="robust", eps=0.02, epochs=15, batch_size=16, lr=1e-2, progress=False)
    after = pl.Bounder.create("dual").bound(model.eval(), region, C).lower.mean()
    assert after > before + 0.5


def test_auto_falls_back_to_backward_rows_when_columns_would_not_fit(monkeypatch):
    """"auto" on a skip net takes backward rows once the forward columns would exceed SKIP_FORWARD_BYTES."""
    model, shape = make_resnet("conv")
    region = pl.LinfBall(random_inputs(shape, batch=2, seed=1), 0.15)
    forward = pl.Bounder.create("dual").bound(model, region)
    monkeypatch.setattr(intermediate, "SKIP_FORWARD_BYTES", 0)
    monkeypatch.setattr(skips.SkipFrontier, "__init__", _boom)
    backward = pl.Bounder.create("dual").bound(model, region)
    assert torch.allclose(forward.lower, backward.lower, atol=1e-12)
    with pytest.raises(AssertionError, match="forward columns"):
        pl.Bounder.create("dual", strategy="forward").bound(model, region)


def _boom(*args, **kwargs):
    raise AssertionError("forward columns were built")

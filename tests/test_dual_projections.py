"""Random projections (``proj=k``, Wong et al. 2018b): the estimated dual bounds converge to the exact ones
as k grows, at the rate the estimators promise; estimated bounds are labelled and refuse to certify; they are
used only where they save work; robust training with them runs and lowers the loss."""
from __future__ import annotations

import math

import pytest
import torch

import polytope_lab as pl
from polytope_lab import models, training
from polytope_lab.bounds import EstimatedBounds
from polytope_lab.dual import intermediate_bounds
from polytope_lab.dual.projections import l1_estimate, l2_estimate
from polytope_lab.convert import as_network

from conftest import make_convnet, make_mlp, random_inputs

WIDE = [2100, 60, 60, 5]  # more inputs than the largest k below, so the input term is always projected


def radius_errors(estimated, exact):
    """Per unit of the first ReLU layer: relative error of the estimated radius (u − l)/2."""
    (l_es, u_es), (l_ex, u_ex) = estimated[0], exact[0]
    return ((u_es - l_es) - (u_ex - l_ex)) / (u_ex - l_ex)


def bound_errors(estimated, exact):
    """Largest, over layers, mean |l_est − l_exact| relative to the exact width u − l."""
    return max(((a[0] - b[0]).abs() / (b[1] - b[0])).mean().item() for a, b in zip(estimated, exact))


@pytest.mark.parametrize("region_kind", ["linf", "linf-clip", "box", "l2"])
def test_estimate_converges_at_the_estimators_rate(region_kind):
    """Relative radius errors shrink like 1/√k: median of |Cauchy| (std π/(2√k)) for L∞,
    root mean square of Gaussians (std 1/√(2k)) for L2; intermediate bounds follow."""
    net = as_network(make_mlp(WIDE), (WIDE[0],))
    x = random_inputs((WIDE[0],), batch=2)
    region = {"linf": pl.LinfBall(x, 0.05), "linf-clip": pl.LinfBall(x, 0.05, clip=(0, 1)),
              "box": pl.Box(x - 0.1 * x, x + 0.05 * (1 - x)), "l2": pl.L2Ball(x, 1.0)}[region_kind]
    exact = intermediate_bounds(net, region)
    scale = math.pi / 2 if region_kind != "l2" else math.sqrt(0.5)  # std of the relative error × √k
    rel, z, layers = {}, {}, {}
    for k in (21, 2001):
        est = intermediate_bounds(net, region, proj=k, generator=torch.Generator().manual_seed(0))
        r = radius_errors(est, exact)
        rel[k], z[k], layers[k] = r.abs().mean().item(), (r.abs() * math.sqrt(k) / scale).mean().item(), \
            bound_errors(est, exact)
    assert rel[2001] < 0.06 and rel[2001] < rel[21] / 4, rel
    assert layers[2001] < layers[21] / 4, layers
    # calibrated: |z| averages E|N(0, 1)| = 0.80 (the 120 units share the projections, hence the slack)
    assert 0.4 < z[2001] < 1.4 and 0.3 < z[21] < 1.6, z


def test_estimators_on_known_norms():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 40, generator=g, dtype=torch.float64)
    k = 20001
    cauchy = torch.empty(40, k, dtype=torch.float64).cauchy_(generator=g)
    gauss = torch.randn(40, k, generator=g, dtype=torch.float64)
    assert torch.allclose(l1_estimate(v @ cauchy), v.abs().sum(1), rtol=0.05)
    assert torch.allclose(l2_estimate(v @ gauss), v.norm(dim=1), rtol=0.03)
    # even k: the mean of the two middle values
    assert l1_estimate(torch.tensor([[4.0, -1.0, 2.0, -3.0]])).item() == 2.5


def test_final_bounds_converge_on_a_convnet():
    net = make_convnet((1, 10, 10), (4, 6))
    x = random_inputs((1, 10, 10), batch=2)
    region = pl.LinfBall(x, 0.05, clip=(0, 1))
    exact = pl.Bounder.create("dual").bound(net, region)
    width = exact.upper - exact.lower
    errors = {}
    for k in (9, 91):  # 100 inputs: both projected
        est = pl.Bounder.create("dual", proj=k, seed=1).bound(net, region)
        errors[k] = ((est.lower - exact.lower).abs() / width).mean().item()
    assert errors[91] < errors[9] / 2 and errors[91] < 0.1, errors


def test_estimated_bounds_are_flagged_and_refuse_to_certify():
    """Generic code sees ``sound`` False without an exception: estimates never certify, even where the
    estimate itself is positive, and ``certify`` says "unknown"."""
    net = make_mlp([30, 40, 3])
    x = random_inputs((30,), batch=2)
    y = net(x).argmax(1)
    region = pl.LinfBall(x, 1e-4)
    C = pl.margin_matrix(y, 3)
    est = pl.Bounder.create("dual", proj=10).bound(net, region, C)
    assert isinstance(est, EstimatedBounds) and est.sound is False
    assert est.method == "dual-proj10"
    assert (est.lower > 0).all() and not est.certified.any()
    assert pl.Bounder.create("dual", proj=10).certify(net, region, y).status == ["unknown"] * 2
    assert pl.Bounder.create("dual").certify(net, region, y).status == ["certified"] * 2
    region = pl.LinfBall(x, 0.05)
    C = pl.margin_matrix(torch.tensor([0, 1]), 3)
    opt = pl.Bounder.create("dual", proj=10, alpha="optimized", steps=3).bound(net, region, C)
    assert isinstance(opt, EstimatedBounds) and opt.method == "dual-optimized-proj10"
    # exact bounds keep certifying
    assert pl.Bounder.create("dual").bound(net, region, C).certified.shape == (2,)


def test_projections_only_where_they_save_work():
    """k ≥ every block's number of columns: nothing is estimated, the result is the exact one, unlabelled."""
    net = make_mlp([30, 40, 40, 3])
    x = random_inputs((30,), batch=2)
    region = pl.LinfBall(x, 0.05)
    exact = pl.Bounder.create("dual").bound(net, region)
    big = pl.Bounder.create("dual", proj=40).bound(net, region)
    assert type(big) is pl.Bounds and big.method == "dual"
    assert torch.equal(big.lower, exact.lower) and torch.equal(big.upper, exact.upper)
    loss_exact, _ = pl.robust_loss(net, 0.05, x, torch.tensor([0, 1]))
    loss_big, _ = pl.robust_loss(net, 0.05, x, torch.tensor([0, 1]), proj=40)
    assert loss_big.item() == loss_exact.item()


def test_seed_makes_bounds_reproducible():
    net = make_mlp([50, 40, 40, 3])
    region = pl.LinfBall(random_inputs((50,), batch=2), 0.05)
    a, b = (pl.Bounder.create("dual", proj=8, seed=3).bound(net, region) for _ in range(2))
    c = pl.Bounder.create("dual", proj=8, seed=4).bound(net, region)
    assert torch.equal(a.lower, b.lower) and not torch.equal(a.lower, c.lower)
    X, y = random_inputs((50,), batch=2), torch.tensor([0, 2])
    l1, _ = pl.robust_loss(net, 0.05, X, y, proj=8, generator=torch.Generator().manual_seed(0))
    l2, _ = pl.robust_loss(net, 0.05, X, y, proj=8, generator=torch.Generator().manual_seed(0))
    assert l1.item() == l2.item()


def test_robust_loss_with_projections_is_differentiable():
    net = make_convnet((1, 8, 8), (4, 6))
    X, y = random_inputs((1, 8, 8), batch=3), torch.tensor([0, 1, 2])
    loss, err = pl.robust_loss(net, 0.05, X, y, proj=10, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert 0.0 <= err <= 1.0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_bad_proj_is_rejected(bad):
    with pytest.raises(ValueError, match="proj"):
        pl.Bounder.create("dual", proj=bad)
    net = make_mlp([4, 5, 2])
    with pytest.raises(ValueError, match="proj"):
        pl.robust_loss(net, 0.1, random_inputs((4,), batch=1), torch.tensor([0]), proj=bad)


def test_robust_training_with_projections_lowers_the_loss():
    """train(mode="robust", proj=20) on a small problem where both the input (64 > 20) and the hidden
    units are projected: the estimated loss falls and so does the exact robust loss; runs are reproducible."""
    g = torch.Generator().manual_seed(0)
    X = torch.rand(40, 64, generator=g)
    y = (X[:, :32].sum(1) > X[:, 32:].sum(1)).long()
    logs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = models.mlp([64, 64, 64, 2])
        with torch.no_grad():
            exact_before = training.robust_loss(model, 0.02, X, y)[0].item()
        logs.append(training.train(model, X, y, mode="robust", eps=0.02, epochs=8, batch_size=20, lr=1e-2,
                                   proj=20, progress=False))
        with torch.no_grad():
            assert training.robust_loss(model, 0.02, X, y)[0].item() < exact_before - 0.05
    log = logs[0]
    assert log["robust_loss"].iloc[-1] < log["robust_loss"].iloc[0] - 0.05, log
    assert logs[0].drop(columns="seconds").equals(logs[1].drop(columns="seconds"))


def test_pretrained_convnet_estimates_converge(pretrained_model, mnist_test):
    X, y = mnist_test
    region = pl.LinfBall(X[:6], 0.1)
    C = pl.margin_matrix(y[:6], 10)
    net = as_network(pretrained_model, (1, 28, 28))
    with torch.no_grad():
        exact = intermediate_bounds(net, region)
        exact_final = pl.Bounder.create("dual").bound(net, region, C)
        rel, margins = {}, {}
        for k in (20, 700):  # 784 inputs: both projected
            est = intermediate_bounds(net, region, proj=k, generator=torch.Generator().manual_seed(0))
            rel[k] = radius_errors(est, exact).abs().mean().item()
            final = pl.Bounder.create("dual", proj=k).bound(net, region, C)
            margins[k] = ((final.lower - exact_final.lower).abs()).mean().item()
    assert rel[700] < 0.1 and rel[700] < rel[20] / 3, rel
    assert margins[700] < margins[20] / 2, margins


@pytest.mark.parametrize("backend", ["lp", "milp"])
def test_referees_refuse_estimated_intermediate_bounds(backend):
    """An LP or MILP built on projected (unsound) pre-activation bounds would lose soundness silently."""
    net = make_mlp(WIDE)
    region = pl.LinfBall(random_inputs((WIDE[0],), batch=1), 0.05)
    referee = pl.Bounder.create(backend, intermediate=pl.Bounder.create("dual", proj=10))
    with pytest.raises(ValueError, match="sound intermediate bounds"):
        referee.bound(net, region)
    assert pl.Bounder.create("dual").bound(net, region).sound

"""The LP and MILP backends on networks with skip connections (``models.DenseSequential``).

Each affine's output adds its skip terms ``S(z_j) + b_S``; an encoding that drops them bounds a different
function, so every check here compares with the network itself: sampled points and PGD (soundness), the
MILP's witnesses run through the torch model (exactness), a closed form where every ReLU is stably active
(the network is then affine), a dense grid on a 2-d input, and the sandwich MILP ⊆ LP-ALL ⊆ LP ⊆ dual.
The big-M / triangle bounds come from "interval" (independent of the dual) and from the default "dual".

Tolerances as in test_lp.py / test_milp.py: LP optima 1e-5 (plus 1e-5 relative), MILP optima 1e-6 (HiGHS's MIP
feasibility tolerance, relaxation.SOLVER_TOLERANCE).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import polytope_lab as pl
from polytope_lab import models

from conftest import (RESNET_KINDS, apply_C, assert_within, make_resnet, output_of, pgd_extremes, random_inputs,
                      sample_region, sampled_values)

LP_TOL = 1e-5
MILP_TOL = 1e-6
INTERMEDIATE = ("interval", "dual")
#: per kind: an L∞ radius at which the region crosses ReLU boundaries and the MILP stays fast
EPS = {"mlp": 0.3, "conv": 0.15, "input-skip": 0.3}


def _milp(**options):
    return pl.Bounder.create("milp", threads=1, **options)


def _tol(tol, *bounds):
    return tol * (1.0 + max(b.abs().max().item() for b in bounds))


def _inside(inner, outer, tol, what):
    """[inner.lower, inner.upper] ⊆ [outer.lower, outer.upper] up to ``tol``."""
    t = _tol(tol, inner.lower, outer.lower, inner.upper, outer.upper)
    assert (inner.lower >= outer.lower - t).all(), f"{what}: lower by {(outer.lower - inner.lower).max():.3g}"
    assert (inner.upper <= outer.upper + t).all(), f"{what}: upper by {(inner.upper - outer.upper).max():.3g}"


def _objective(model, shape, seed=7):
    n_out = output_of(model, torch.zeros(1, *shape, dtype=torch.float64)).shape[1]
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.eye(n_out, dtype=torch.float64)[:2], torch.randn(2, n_out, generator=g,
                                                                             dtype=torch.float64)])


def _setup(kind, clip=None, batch=2):
    model, shape = make_resnet(kind)
    x = random_inputs(shape, batch=batch, seed=1)
    return model, shape, pl.LinfBall(x, EPS[kind], clip=clip), _objective(model, shape)


def _unstable(bounds) -> int:
    return sum(int(((l < 0) & (u > 0)).sum()) for l, u in bounds.intermediate)


def _contains_pre_activations(model, shape, region, layers, what):
    """Every sampled pre-activation of every layer lies in that layer's [l, u]."""
    pts = sample_region(region, 300)
    N, B = pts.shape[:2]
    pre = pl.from_torch(model, shape).pre_activations(pts.reshape(N * B, *shape))
    for i, (l, u) in enumerate(layers):
        assert_within(pre[i].reshape(N, B, -1), l.reshape(B, -1), u.reshape(B, -1), tol=LP_TOL,
                      what=f"{what} layer {i} pre-activations")


def test_fixtures_have_skips():
    for kind in RESNET_KINDS:
        model, shape = make_resnet(kind)
        assert pl.from_torch(model, shape).has_skips, kind


# --------------------------------------------------------------------------------------------------
# MILP: sound and exact
# --------------------------------------------------------------------------------------------------


#: the default, and interval big-M bounds with no primal heuristic (whose points, run through the network,
#: could hide a wrong encoding: the reported bound is the smaller of the solver's and theirs)
MILP_OPTIONS = {"dual": {}, "interval-no-heuristic": {"intermediate": "interval", "heuristic_steps": 0}}


@pytest.mark.parametrize("options", list(MILP_OPTIONS))
@pytest.mark.parametrize("clip", [None, (0.0, 1.0)])
@pytest.mark.parametrize("kind", RESNET_KINDS)
def test_milp_is_sound_and_exact(kind, clip, options):
    """Sampled and PGD values lie in [lower, upper], and the witnesses, run through the torch model,
    attain both ends: the bounds are the exact extremes."""
    model, shape, region, C = _setup(kind, clip)
    b = _milp(**MILP_OPTIONS[options]).bound(model, region, C)
    assert b.status == ["optimal"] * 2, b.status
    assert _unstable(b) > 0, "the region should cross ReLU boundaries"
    assert_within(sampled_values(model, region, C, n=300), b.lower, b.upper, tol=MILP_TOL)
    lo, hi = pgd_extremes(model, region, C)
    assert_within(torch.stack([lo, hi]), b.lower, b.upper, tol=MILP_TOL, what="PGD")
    B, m = region.batch_size, C.shape[0]
    for arg, bound in ((b.argmin, b.lower), (b.argmax, b.upper)):
        pts = arg.reshape(B * m, *shape)
        assert region.select(torch.arange(B).repeat_interleave(m)).contains(pts, tol=1e-9).all()
        value = (output_of(model, pts).reshape(B, m, -1) * C).sum(-1)
        torch.testing.assert_close(value, bound, rtol=0, atol=MILP_TOL)
    if kind == "mlp":  # tiny and smooth enough that PGD finds the extremes too
        torch.testing.assert_close(lo, b.lower, rtol=0, atol=1e-3)
        torch.testing.assert_close(hi, b.upper, rtol=0, atol=1e-3)


@pytest.mark.parametrize("kind", ["mlp", "input-skip"])
def test_progressive_intermediate_bounds(kind):
    """``intermediate="progressive"`` (per-neuron LPs on the relaxed encoding, skip terms included): its
    layer bounds contain every sampled pre-activation, and the MILP bounds stay exact."""
    model, shape, region, C = _setup(kind)
    prog = _milp(intermediate="progressive").bound(model, region, C)
    ref = _milp(intermediate="interval").bound(model, region, C)
    assert prog.status == ref.status == ["optimal"] * 2
    torch.testing.assert_close(prog.lower, ref.lower, rtol=0, atol=MILP_TOL)
    torch.testing.assert_close(prog.upper, ref.upper, rtol=0, atol=MILP_TOL)
    _contains_pre_activations(model, shape, region, prog.intermediate, "progressive")


# --------------------------------------------------------------------------------------------------
# LP: the sandwich
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [None, (0.0, 1.0)])
@pytest.mark.parametrize("kind", RESNET_KINDS)
def test_lp_sandwich_linf(kind, clip):
    """sampled, PGD ⊆ MILP ⊆ LP-ALL ⊆ LP ⊆ dual (the LPs on the dual's l, u; the MILP, exact whatever its
    big-M bounds, on interval's), and LP-ALL's layer bounds contain the sampled pre-activations."""
    model, shape, region, C = _setup(kind, clip)
    dual = pl.Bounder.create("dual").bound(model, region, C)
    lp = pl.Bounder.create("lp").bound(model, region, C)
    lp_all = pl.Bounder.create("lp", intermediate="lp").bound(model, region, C)
    milp = _milp(intermediate="interval").bound(model, region, C)
    assert lp.status == lp_all.status == milp.status == ["optimal"] * 2
    _inside(lp, dual, LP_TOL, "LP ⊆ dual")
    _inside(lp_all, lp, LP_TOL, "LP-ALL ⊆ LP")
    _inside(milp, lp_all, LP_TOL, "MILP ⊆ LP-ALL")
    assert_within(sampled_values(model, region, C, n=300), milp.lower, milp.upper, tol=MILP_TOL)
    assert_within(torch.stack(pgd_extremes(model, region, C)), milp.lower, milp.upper, tol=MILP_TOL, what="PGD")
    _contains_pre_activations(model, shape, region, lp_all.intermediate, "LP-ALL")


@pytest.mark.parametrize("intermediate", INTERMEDIATE)
@pytest.mark.parametrize("kind", RESNET_KINDS)
def test_lp_sandwich_l2(kind, intermediate):
    """L2 ball (an SOCP): sampled and PGD values ⊆ LP, and LP ⊆ dual with the dual's own l, u."""
    model, shape = make_resnet(kind)
    x = random_inputs(shape, batch=2, seed=1)
    region = pl.L2Ball(x, 2 * EPS[kind])
    C = _objective(model, shape)
    lp = pl.Bounder.create("lp", intermediate=intermediate).bound(model, region, C)
    assert lp.status == ["optimal"] * 2
    assert _unstable(lp) > 0, "the region should cross ReLU boundaries"
    assert_within(sampled_values(model, region, C, n=300), lp.lower, lp.upper, tol=LP_TOL)
    assert_within(torch.stack(pgd_extremes(model, region, C)), lp.lower, lp.upper, tol=LP_TOL, what="PGD")
    if intermediate == "dual":
        _inside(lp, pl.Bounder.create("dual").bound(model, region, C), LP_TOL, "LP ⊆ dual")


# --------------------------------------------------------------------------------------------------
# closed form: every ReLU stably active, so the network is affine
# --------------------------------------------------------------------------------------------------


def _all_active(kind):
    """make_resnet(kind) with non-negative weights and biases ≥ 0.5: on non-negative inputs every
    pre-activation is ≥ 0.5, so f is affine with Jacobian J."""
    model, shape = make_resnet(kind, seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.abs_()
            if name.endswith("bias"):
                p.add_(0.5)
    return model, shape


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("kind", RESNET_KINDS)
def test_closed_form_when_every_relu_is_active(kind, norm):
    """LP and MILP bounds equal ``C f(x) ∓ eps‖(C J)ᵀ‖₁`` (L∞), the LP ``∓ eps‖(C J)ᵀ‖₂`` (L2)."""
    model, shape = _all_active(kind)
    x = random_inputs(shape, batch=2, seed=5, low=0.2, high=0.8)
    eps = 0.05
    region = pl.LinfBall(x, eps) if norm == "linf" else pl.L2Ball(x, eps)
    C = _objective(model, shape)
    ib = pl.Bounder.create("interval").bound(model, region, C)
    assert all((l > 0).all() for l, _ in ib.intermediate), "every ReLU should be stably active"
    centre = apply_C(C, output_of(model, x))
    dev = []
    for b in range(2):
        J = torch.autograd.functional.jacobian(lambda z: model(z.unsqueeze(0)).reshape(-1), x[b])
        CJ = C @ J.reshape(J.shape[0], -1)
        dev.append(eps * (CJ.abs().sum(1) if norm == "linf" else CJ.norm(dim=1)))
    dev = torch.stack(dev)
    backends = [pl.Bounder.create("lp"), pl.Bounder.create("lp", intermediate="interval")]
    if norm == "linf":
        backends += [_milp(), _milp(intermediate="interval")]
    for bounder in backends:
        b = bounder.bound(model, region, C)
        assert b.status == ["optimal"] * 2, (bounder.name, b.status)
        torch.testing.assert_close(b.lower, centre - dev, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b.upper, centre + dev, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# brute force: a dense grid on a 2-d input
# --------------------------------------------------------------------------------------------------


def _tiny_resnet():
    """2 -> 6 -> 6 -> residual block -> 2, plus a skip from the input to the output layer."""
    torch.manual_seed(11)
    return models.DenseSequential(
        nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(),
        models.Dense(nn.Identity(), None, nn.Linear(6, 6)), nn.ReLU(),
        models.Dense(nn.Linear(2, 2), None, None, None, None, None, nn.Linear(6, 2))).double().eval()


def _lipschitz(network, C) -> torch.Tensor:
    """Per row of C, an L∞ Lipschitz constant of ``c f``: ``|c| A 1`` with ``A`` bounding |∂f/∂x|
    elementwise (|W| over every path, skip terms included)."""
    A = [np.eye(network.input_size)]
    for i, a in enumerate(network.affines):
        Ai = abs(a.as_matrix().toarray()) @ A[i]
        for j, S in network.skips_into(i):
            Ai = Ai + abs(S.as_matrix().toarray()) @ A[j]
        A.append(Ai)
    return torch.from_numpy(np.abs(C.numpy()) @ A[-1].sum(1))


@pytest.mark.parametrize("intermediate", INTERMEDIATE)
def test_milp_against_dense_grid_2d(intermediate):
    model = _tiny_resnet()
    network = pl.from_torch(model, (2,))
    assert network.has_skips and 0 in [j for terms in network.skips.values() for j, _ in terms]
    x = random_inputs((2,), batch=1, seed=12)
    eps, n = 0.4, 301
    C = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    region = pl.LinfBall(x, eps)
    b = _milp(intermediate=intermediate).bound(model, region, C)
    lp = pl.Bounder.create("lp", intermediate=intermediate).bound(model, region, C)
    assert b.status == ["optimal"] and _unstable(b) >= 3
    t = torch.linspace(-eps, eps, n, dtype=torch.float64)
    grid = x[0] + torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    values = output_of(model, grid) @ C.t()  # (n², m)
    slack = _lipschitz(network, C) * (eps / (n - 1)) + MILP_TOL  # any point is within h/2 of the grid
    low, high = values.min(0).values, values.max(0).values
    assert_within(values, b.lower[0], b.upper[0], tol=MILP_TOL, what="grid values")
    assert (low - b.lower[0] <= slack).all(), (low - b.lower[0], slack)
    assert (b.upper[0] - high <= slack).all(), (b.upper[0] - high, slack)
    _inside(b, lp, LP_TOL, "MILP ⊆ LP")


# --------------------------------------------------------------------------------------------------
# robustness queries
# --------------------------------------------------------------------------------------------------


def _margins(model, pts, y):
    f = output_of(model, pts)
    other = f.clone()
    other[torch.arange(len(y)), y] = -math.inf
    return f[torch.arange(len(y)), y] - other.max(1).values


@pytest.mark.parametrize("intermediate", INTERMEDIATE)
def test_certify_agrees_with_pgd_and_the_exact_margin(intermediate):
    """Every verdict is backed: a certified example is not broken by PGD and its exact minimum margin
    (MILP bound) is > 0; a counterexample's witness lies in the region and is misclassified."""
    model, shape = make_resnet("input-skip")
    x = random_inputs(shape, batch=6, seed=21)
    y = output_of(model, x).argmax(1)
    region = pl.LinfBall(x, torch.linspace(0.02, 0.4, 6, dtype=torch.float64), clip=(0.0, 1.0))
    C = pl.margin_matrix(y, 3)
    milp = _milp(intermediate=intermediate)
    cert = milp.certify(model, region, y, trust_dual=False)
    exact = milp.bound(model, region, C).lower.min(1).values
    pgd_min = pgd_extremes(model, region, C)[0].min(1).values
    assert set(cert.status) == {"certified", "counterexample"}, cert.status
    for i, s in enumerate(cert.status):
        assert (s == "certified") == bool(exact[i] > 0), (i, s, exact[i])
        if s == "certified":
            assert pgd_min[i] > 0 and 0 < cert.margin[i] <= exact[i] + MILP_TOL
        else:
            w = cert.counterexample[i:i + 1]
            assert region.select([i]).contains(w, tol=1e-9).all()
            assert _margins(model, w, y[i:i + 1]).item() <= 0


@pytest.mark.parametrize("intermediate", INTERMEDIATE)
@pytest.mark.parametrize("kind,eps_max", [("mlp", 3.0), ("input-skip", 1.0)])
def test_minimum_adversarial_distance_on_a_skip_net(kind, eps_max, intermediate):
    """The exact radius r: its witness is misclassified at distance r; PGD finds nothing at 0.99 r, where
    the MILP certifies; just above r the MILP finds a counterexample."""
    model, shape = make_resnet(kind)
    x = random_inputs(shape, batch=2, seed=23)
    y = output_of(model, x).argmax(1)
    n_out = output_of(model, x).shape[1]
    results = pl.minimum_adversarial_distance(model, x, y, eps_max=eps_max, threads=1, intermediate=intermediate)
    milp = _milp(intermediate=intermediate)
    for i, res in enumerate(results):
        assert res.status == "optimal", res
        r = res.radius
        assert 0 < r < eps_max and res.upper - res.lower < 1e-5
        w = res.witness.unsqueeze(0)
        assert (w - x[i]).abs().max() <= r + 1e-9
        assert _margins(model, w, y[i:i + 1]).item() <= 1e-5
        inner = pl.LinfBall(x[i:i + 1], 0.99 * r)
        assert pgd_extremes(model, inner, pl.margin_matrix(y[i:i + 1], n_out))[0].min() > 0
        assert milp.certify(model, inner, y[i:i + 1]).status == ["certified"]
        above = milp.certify(model, pl.LinfBall(x[i:i + 1], 1.01 * r), y[i:i + 1])
        assert above.status == ["counterexample"]
        assert _margins(model, above.counterexample, y[i:i + 1]).item() <= 0

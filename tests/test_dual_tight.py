"""Tighter dual bounds (polytope_lab.dual.tight): intermediate slopes fixed/adaptive/best and the tight mode
(optimised intermediate and final α). Every option must be sound (sampling, PGD, the exact MILP, on MLPs,
ConvNets and residual nets, every region); optimised never looser than its start; "fixed" unchanged."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polytope_lab as pl
from polytope_lab.dual import intermediate_bounds, optimize_alpha
from polytope_lab.dual.intermediate import first_layer_bounds
from polytope_lab.dual.relu import adaptive_slopes
from polytope_lab.interval import interval_step
from polytope_lab.dual.tight import (ascend, optimized_bounds, optimized_layers, slope_bounds,
                                     start_alpha, unit_transpose)

from conftest import (assert_within, make_convnet, make_mlp, make_resnet, n_examples, pgd_extremes,
                      pretrained_path, random_inputs, real_mnist_dir, sample_region, sampled_values)

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
OPTIONS = {
    "adaptive": dict(slopes="adaptive"),
    "best": dict(slopes="best"),
    "optimized-final-only": dict(alpha="optimized", slopes="fixed", optimize_intermediate=False, steps=5),
    "optimized-best-final": dict(alpha="optimized", optimize_intermediate=False, steps=5),
    "tight": dict(alpha="optimized", steps=5),
}
TOL = 1e-6


def _regions(x):
    lo, hi = x - 0.15, x + 0.1
    return {"linf": pl.LinfBall(x, 0.15), "linf-clip": pl.LinfBall(x, 0.25, clip=(0.0, 1.0)),
            "l2": pl.L2Ball(x, 0.4), "box": pl.Box(lo, hi)}


@st.composite
def problems(draw):
    """(model, region, C): a random MLP, ConvNet or residual net and a random region of every kind."""
    seed = draw(st.integers(0, 2 ** 12))
    kind = draw(st.sampled_from(["mlp", "conv", "resnet"]))
    if kind == "mlp":
        sizes = [draw(st.integers(2, 4))] + draw(st.lists(st.integers(4, 10), min_size=2, max_size=3)) + [3]
        model, shape = make_mlp(sizes, seed=seed), (sizes[0],)
    elif kind == "conv":
        model, shape = make_convnet((1, 5, 5), channels=(2, 3), n_out=3, seed=seed), (1, 5, 5)
    else:
        model, shape = make_resnet(draw(st.sampled_from(["mlp", "conv", "input-skip"])), seed=seed)
    x = random_inputs(shape, batch=2, seed=seed + 1)
    region = _regions(x)[draw(st.sampled_from(["linf", "linf-clip", "l2", "box"]))]
    n_out = pl.from_torch(model, shape).affines[-1].out_features
    C = torch.randn(2, n_out, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return model, region, C


@settings(max_examples=n_examples(10), **SETTINGS)
@given(problems())
def test_every_option_is_sound_and_inside_the_fixed_dual(problem):
    """Sampled points and PGD inside every option's bounds; its intermediate bounds contain sampled
    pre-activations and lie inside the fixed-slope ones; the final bound is never looser than fixed (except
    "adaptive": CROWN's chain alone)."""
    model, region, C = problem
    fixed = pl.Bounder.create("dual").bound(model, region, C=C)
    values = sampled_values(model, region, C, n=200)
    lo, hi = pgd_extremes(model, region, C, steps=15, restarts=1)
    network = pl.from_torch(model, region.input_shape)
    pts = sample_region(region, 100)
    N, B = pts.shape[:2]
    pre = network.pre_activations(pts.reshape(N * B, *pts.shape[2:]))[:-1]
    for name, opts in OPTIONS.items():
        b = pl.Bounder.create("dual", **opts).bound(model, region, C=C)
        assert_within(values, b.lower, b.upper, tol=1e-6, what=f"{name}: sampled C f(x')")
        assert (lo >= b.lower - 1e-6).all() and (hi <= b.upper + 1e-6).all(), f"{name}: PGD beats the bound"
        if name != "adaptive":  # CROWN's chain alone may be looser than the fixed dual on a row
            assert (b.lower >= fixed.lower - TOL).all() and (b.upper <= fixed.upper + TOL).all(), name
        for (l, u), (l0, u0), z in zip(b.intermediate, fixed.intermediate, pre):
            assert_within(z.detach().reshape(N, *l.shape), l, u, tol=1e-6, what=f"{name}: pre-activation")
            if name not in ("adaptive", "optimized-final-only"):  # pure CROWN bounds need not lie inside
                assert (l >= l0 - TOL).all() and (u <= u0 + TOL).all(), name


@pytest.mark.parametrize("seed", [0, 1])
def test_sound_against_the_milp(seed):
    """On a tiny net every option's bounds contain the exact range (MILP)."""
    model = make_mlp([3, 6, 6, 2], seed=seed)
    region = pl.LinfBall(random_inputs((3,), batch=2, seed=seed), 0.3)
    exact = pl.Bounder.create("milp", threads=1).bound(model, region)
    assert exact.status == ["optimal"] * 2
    for name, opts in OPTIONS.items():
        b = pl.Bounder.create("dual", **opts).bound(model, region)
        assert (b.lower <= exact.lower + 1e-6).all() and (b.upper >= exact.upper - 1e-6).all(), name


def test_fixed_slopes_unchanged():
    """slopes="fixed" is the paper's dual; the final-only optimiser is optimize_alpha unchanged."""
    model = make_mlp([4, 10, 10, 3], seed=4)
    region = pl.LinfBall(random_inputs((4,), batch=2, seed=5), 0.3)
    C = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a = pl.Bounder.create("dual").bound(model, region, C=C)
    b = pl.Bounder.create("dual", slopes="fixed").bound(model, region, C=C)
    assert torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper)
    network = pl.from_torch(model, (4,))
    bounds = intermediate_bounds(network, region)
    old = optimize_alpha(network, region, bounds, torch.cat([C, -C], 1), 20, 0.2)
    new = pl.Bounder.create("dual", alpha="optimized", slopes="fixed", optimize_intermediate=False).bound(
        model, region, C=C)
    torch.testing.assert_close(new.lower, old[:, :3], rtol=0, atol=1e-12)
    torch.testing.assert_close(new.upper, -old[:, 3:], rtol=0, atol=1e-12)
    assert slope_bounds(network, region, bounds, "fixed") == bounds


def test_adaptive_slope_and_start():
    """CROWN's slope: 1 where u ≥ −l on I; the start is the per-row better of fixed and adaptive α."""
    l = torch.tensor([[-1.0, -3.0, 0.5, -2.0]])
    u = torch.tensor([[2.0, 1.0, 1.0, -1.0]])
    assert adaptive_slopes(l, u).tolist() == [[1.0, 0.0, 1.0, 0.0]]
    model = make_mlp([3, 8, 8, 2], seed=2)
    region = pl.LinfBall(random_inputs((3,), batch=2, seed=2), 0.4)
    network = pl.from_torch(model, (3,))
    bounds = intermediate_bounds(network, region)
    rows = torch.cat([torch.eye(2), -torch.eye(2)]).double().unsqueeze(0).expand(2, 4, 2)
    _, J = start_alpha(network, region, bounds, rows, 2)
    fixed = pl.Bounder.create("dual").bound(model, region)
    assert (J[:, :2] >= fixed.lower - 1e-9).all() and (-J[:, 2:] <= fixed.upper + 1e-9).all()


def crown_unit_bounds(weights, biases, x, eps, below):
    """Reference CROWN (dense, every unit) for an MLP over the L∞ ball: (l, u) of pre-activation layer
    len(below) given the bounds ``below`` of the layers under it, from an explicit backward pass with
    the adaptive lower slope where the row's coefficient is ≥ 0 and the upper chord where it is < 0."""
    i = len(below)
    n = weights[i].shape[0]
    out = []
    for sign in (1.0, -1.0):
        omega, J = sign * torch.eye(n, dtype=x.dtype), torch.zeros(n, dtype=x.dtype)
        for m in range(i, 0, -1):
            J = J + omega @ biases[m]
            hat = omega @ weights[m]                                   # over relu(ẑ_{m-1})
            l, u = below[m - 1]
            on, off = l >= 0, u <= 0
            unstable = ~on & ~off
            chord = torch.where(unstable, u / torch.where(unstable, u - l, torch.ones_like(u)), on.to(x.dtype))
            alpha = torch.where(unstable, (u >= -l).to(x.dtype), on.to(x.dtype))
            slope = torch.where(hat >= 0, alpha, chord)
            J = J + (torch.where((hat < 0) & unstable, hat, torch.zeros_like(hat)) * (-chord * l)).sum(1)
            omega = hat * slope
        J = J + omega @ biases[0]
        hat = omega @ weights[0]
        out.append(sign * (J + hat @ x - eps * hat.abs().sum(1)))
    return out[0], out[1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adaptive_is_crown_from_the_interval_step(seed):
    """slopes="adaptive" is CROWN's chain with sparse rows: per layer, where the one interval step over the
    adaptive bounds below leaves a unit unstable, its bound is the reference CROWN bound (every unit, dense)
    intersected with that step; elsewhere it is the step itself."""
    model = make_mlp([3, 12, 12, 12, 2], seed=seed)
    x = random_inputs((3,), batch=1, seed=seed)
    region = pl.LinfBall(x, 0.3)
    network = pl.from_torch(model, (3,))
    bounds = slope_bounds(network, region, intermediate_bounds(network, region), "adaptive")
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    weights, biases = [m.weight.detach() for m in linears], [m.bias.detach() for m in linears]
    checked = 0
    for i in range(1, len(bounds)):
        step_l, step_u = interval_step(network, region, bounds, i)
        crown_l, crown_u = crown_unit_bounds(weights, biases, x[0], 0.3, [(l[0], u[0]) for l, u in bounds[:i]])
        want_l, want_u = torch.maximum(step_l[0], crown_l), torch.minimum(step_u[0], crown_u)
        open_ = (step_l[0] < 0) & (step_u[0] > 0)
        l, u = bounds[i][0][0], bounds[i][1][0]
        torch.testing.assert_close(l[open_], want_l[open_], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(u[open_], want_u[open_], rtol=1e-10, atol=1e-10)
        assert torch.equal(l[~open_], step_l[0][~open_]) and torch.equal(u[~open_], step_u[0][~open_])
        checked += int(open_.sum())
    assert checked > 0, "no unit needed a CROWN row: the test checks nothing"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_adaptive_bounder_is_crown(seed):
    """DualBounder(slopes="adaptive") takes only layer 0 from Algorithm 1 (first_layer_bounds) and then runs
    CROWN's chain (with gathered unit rows): its intermediate bounds are slope_bounds' over the full fixed
    chain (slope_bounds is checked against a dense reference CROWN above), and its final bound is CROWN's
    over them or tighter (the per-row better of the two α starts)."""
    model = make_mlp([3, 12, 12, 12, 2], seed=seed)
    x = random_inputs((3,), batch=2, seed=seed)
    region = pl.LinfBall(x, 0.3)
    network = pl.from_torch(model, (3,))
    fixed = intermediate_bounds(network, region)
    want = slope_bounds(network, region, fixed, "adaptive")
    torch.testing.assert_close(first_layer_bounds(network, region)[0], fixed[0], rtol=1e-12, atol=1e-12)
    b = pl.Bounder.create("dual", slopes="adaptive").bound(model, region)
    for (l, u), (wl, wu) in zip(b.intermediate, want):
        torch.testing.assert_close(l, wl, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(u, wu, rtol=1e-10, atol=1e-10)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    weights, biases = [m.weight.detach() for m in linears], [m.bias.detach() for m in linears]
    for k in range(2):
        crown_l, crown_u = crown_unit_bounds(weights, biases, x[k], 0.3, [(l[k], u[k]) for l, u in want])
        assert (b.lower[k] >= crown_l - 1e-10).all() and (b.upper[k] <= crown_u + 1e-10).all()


def test_unit_transpose_is_the_transpose_of_the_unit_rows():
    """Gathered rows of a dense layer and the generic path (a conv layer) equal ``Aᵀ e_j`` by the layer's
    own transpose."""
    for model, shape in ((make_mlp([4, 7, 3], seed=1), (4,)), (make_convnet((1, 5, 5), channels=(2, 3), n_out=3,
                                                                          seed=2), (1, 5, 5))):
        for A in pl.from_torch(model, shape).affines[:2]:
            order = torch.randint(0, A.out_features, (2, 3), generator=torch.Generator().manual_seed(0))
            one_hot = torch.zeros(6, A.out_features, dtype=A.bias().dtype)
            one_hot[torch.arange(6), order.reshape(-1)] = 1.0
            want = A.transpose(one_hot.reshape(6, *A.out_shape)).reshape(2, 3, *A.in_shape)
            torch.testing.assert_close(unit_transpose(A, order), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 10])
def test_optimized_never_looser_than_its_start(steps):
    model = make_convnet((1, 6, 6), channels=(3, 4), n_out=3, seed=3)
    region = pl.LinfBall(random_inputs((1, 6, 6), batch=2, seed=3), 0.2)
    network = pl.from_torch(model, (1, 6, 6))
    bounds = slope_bounds(network, region, intermediate_bounds(network, region), "best")
    rows = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    start = ascend(network, region, bounds, rows, 2, steps=0)
    opt = ascend(network, region, bounds, rows, 2, steps=steps)
    assert (opt >= start - 1e-12).all()
    assert optimized_layers(network, region, bounds, None) == [1] and optimized_layers(network, region, bounds, 1) == [1]
    tight = optimized_bounds(network, region, bounds, steps=steps)
    for (l, u), (l0, u0) in zip(tight, bounds):
        assert (l >= l0).all() and (u <= u0).all()


def test_tight_mode_goes_past_the_lp_and_stays_above_the_milp():
    """The LP over the fixed-slope bounds is the best final-only α can do; tight mode passes it (it
    tightens the intermediate bounds) and stays a bound of the exact range; the LP over tight mode's own
    intermediate bounds is tighter still (dual ≤ LP of the same bounds)."""
    model = make_mlp([2, 12, 12, 12, 2], seed=7)
    region = pl.LinfBall(random_inputs((2,), batch=2, seed=7), 0.4)
    lp = pl.Bounder.create("lp").bound(model, region)
    tight_bounder = pl.Bounder.create("dual", alpha="optimized")
    tight = tight_bounder.bound(model, region)
    exact = pl.Bounder.create("milp", threads=1).bound(model, region)
    same = pl.Bounder.create("lp", intermediate=tight_bounder).bound(model, region)
    width = lambda b: float((b.upper - b.lower).mean())
    assert width(tight) < width(lp)
    assert (tight.lower <= same.lower + 1e-6).all() and (tight.upper >= same.upper - 1e-6).all()
    assert (tight.lower <= exact.lower + 1e-6).all() and (tight.upper >= exact.upper - 1e-6).all()


def test_chunking_and_options():
    """max_memory chunks rows and examples without changing results much; bad options are refused."""
    model = make_mlp([3, 10, 10, 2], seed=8)
    region = pl.LinfBall(random_inputs((3,), batch=3, seed=8), 0.3)
    a = pl.Bounder.create("dual", alpha="optimized", steps=5).bound(model, region)
    b = pl.Bounder.create("dual", alpha="optimized", steps=5, max_memory=4000).bound(model, region)
    torch.testing.assert_close(a.lower, b.lower, rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="slopes"):
        pl.Bounder.create("dual", slopes="crown")
    with pytest.raises(ValueError, match="intermediate_layers"):
        pl.Bounder.create("dual", alpha="optimized", intermediate_layers="last")
    with pytest.raises(ValueError, match="optimize_intermediate"):
        pl.Bounder.create("dual", optimize_intermediate=True)


def test_tight_mode_sound_on_the_pretrained_convnet():
    """The paper's pretrained MNIST ConvNet (real data and weights), ε = 0.1 ∩ [0, 1], first 4 test images:
    the tight mode (its conv layers' rows as patches) and the adaptive and best slopes bound every margin below
    what PGD reaches, and their intermediate bounds contain every pre-activation at 200 sampled points; the
    tight mode is tighter than the fixed dual."""
    from polytope_lab import data, models
    X, y = data.mnist("test", root=real_mnist_dir().parent, download=False)
    model = models.load_state(models.mnist_convnet(), pretrained_path()).double()
    region = pl.LinfBall(X[:4].double(), 0.1, clip=(0, 1))
    C = pl.margin_matrix(y[:4], 10).double()
    low, high = pgd_extremes(model, region, C, steps=30, restarts=2)
    network = pl.from_torch(model, (1, 28, 28))
    points = sample_region(region, 200, seed=0)                                  # (N, B, …)
    pre = [network.pre_activations(points[n]) for n in range(points.shape[0])]
    results = {}
    for name, opts in {"tight": dict(alpha="optimized"), "adaptive": dict(slopes="adaptive"),
                       "best": dict(slopes="best")}.items():
        b = results[name] = pl.Bounder.create("dual", **opts).bound(model, region, C)
        assert (b.lower <= low + 1e-6).all() and (b.upper >= high - 1e-6).all(), name
        for zs in pre:
            for (l, u), z in zip(b.intermediate, zs):
                assert (z >= l.reshape(z.shape) - 1e-6).all() and (z <= u.reshape(z.shape) + 1e-6).all(), name
    tight = results["tight"]
    fixed = pl.Bounder.create("dual").bound(model, region, C)
    assert (tight.lower >= fixed.lower - 1e-9).all() and (tight.lower > fixed.lower + 1e-6).any()


def test_time_limit_is_a_status_with_a_sound_bound():
    """A time limit cuts the ascents: status "time_limit", and the bound is still sound (inside the exact
    range) and never looser than the fixed dual; without a limit the status is "ok"; bad limits are refused."""
    model = make_mlp([3, 16, 16, 16, 2], seed=5)
    region = pl.LinfBall(random_inputs((3,), batch=3, seed=5), 0.3)
    exact = pl.Bounder.create("milp", threads=1).bound(model, region)
    fixed = pl.Bounder.create("dual").bound(model, region)
    cut = pl.Bounder.create("dual", alpha="optimized", time_limit=1e-6).bound(model, region)
    full = pl.Bounder.create("dual", alpha="optimized").bound(model, region)
    assert cut.status == ["time_limit"] * 3 and full.status == ["ok"] * 3
    for b in (cut, full):
        assert (b.lower <= exact.lower + 1e-6).all() and (b.upper >= exact.upper - 1e-6).all()
        assert (b.lower >= fixed.lower - TOL).all() and (b.upper <= fixed.upper + TOL).all()
    assert float((full.upper - full.lower).sum()) < float((cut.upper - cut.lower).sum()), "the cut ascent did as much"
    for bad in (0, -1.0, "soon", True, float("nan")):
        with pytest.raises(ValueError, match="time_limit"):
            pl.Bounder.create("dual", time_limit=bad)

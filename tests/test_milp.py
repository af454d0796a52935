"""The MILP backend (paper eq. 4): exact bounds, soundness, time limits, witnesses, options.

Exactness is checked against references that share no code with the MILP: enumeration of activation
patterns (one LP per pattern with scipy's linprog) and, for 2-d inputs, a dense grid. Soundness against
the other backends, sampling and PGD; time limits; witnesses. (Verdicts and eq. 6: test_verify.py.)

Tolerances from the solvers' (``relaxation.SOLVER_TOLERANCE``): one MILP optimum against an exact
reference within HiGHS's MIP feasibility tolerance (``TOL`` = 1e-6; the values are O(1)); two independent
solves (CBC vs HiGHS, two big-M choices) within ``solver_slack`` (10 tolerances, relative to max(1, |v|)).
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.optimize import linprog

import polytope_lab as pl
from polytope_lab import milp as milp_module
from polytope_lab import solvers
from polytope_lab.relaxation import SOLVER_TOLERANCE, solver_slack

from conftest import make_convnet, make_mlp, output_of, pgd_extremes, random_inputs, sampled_values

TOL = SOLVER_TOLERANCE["mip_feasibility"]


def _agree(a, b):
    torch.testing.assert_close(a, b, atol=solver_slack(b), rtol=0)


def _milp(**options):
    options.setdefault("threads", 1)
    return pl.Bounder.create("milp", **options)


# --------------------------------------------------------------------------------------------------
# reference: enumerate activation patterns, one LP each
# --------------------------------------------------------------------------------------------------


def _linear_layers(model):
    return [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy())
            for m in model if isinstance(m, nn.Linear)]


def enumerate_extremes(model, lo, hi, C):
    """(min, max) of every row of ``C f(x')`` over the box [lo, hi] for an MLP, exactly: walk the
    activation patterns unit by unit, keeping a sign only where it is feasible (an LP), then minimise
    and maximise each row over every feasible pattern's polytope (where f is affine). Also returns
    the number of patterns."""
    layers = _linear_layers(model)
    box = list(zip(lo.tolist(), hi.tolist()))
    C = np.asarray(C, dtype=np.float64)
    mins, maxs = np.full(len(C), np.inf), np.full(len(C), -np.inf)
    patterns = [0]

    def lp_min(cost, G, h):
        res = linprog(cost, A_ub=np.array(G) if G else None, b_ub=np.array(h) if h else None, bounds=box,
                      method="highs")
        return res.fun if res.status == 0 else None

    def layer(i, A, a, G, h):
        W, b = layers[i]
        P, p = W @ A, W @ a + b  # this layer's pre-activations: P x + p on the current pattern
        if i == len(layers) - 1:
            patterns[0] += 1
            for r, c in enumerate(C):
                lo_, hi_ = lp_min(c @ P, G, h), lp_min(-(c @ P), G, h)
                if lo_ is None or hi_ is None:
                    continue
                mins[r] = min(mins[r], lo_ + c @ p)
                maxs[r] = max(maxs[r], -hi_ + c @ p)
            return

        def unit(k, rows, consts, G, h):
            if k == len(p):
                layer(i + 1, np.array(rows), np.array(consts), G, h)
                return
            lo_, hi_ = lp_min(P[k], G, h), lp_min(-P[k], G, h)
            if lo_ is None or hi_ is None:
                return
            mn, mx = lo_ + p[k], -hi_ + p[k]
            if mx > 1e-9:   # active somewhere: z = ẑ, with ẑ ≥ 0
                unit(k + 1, rows + [P[k]], consts + [p[k]], G + ([list(-P[k])] if mn < 0 else []),
                     h + ([p[k]] if mn < 0 else []))
            if mn < -1e-9 or mx <= 1e-9:  # inactive somewhere: z = 0, with ẑ ≤ 0
                unit(k + 1, rows + [np.zeros_like(P[k])], consts + [0.0], G + ([list(P[k])] if mx > 0 else []),
                     h + ([-p[k]] if mx > 0 else []))

        unit(0, [], [], G, h)

    n = len(lo)
    layer(0, np.eye(n), np.zeros(n), [], [])
    return mins, maxs, patterns[0]


NETS = {"2-6-6-2": ([2, 6, 6, 2], 1.0), "3-5-5-5-2": ([3, 5, 5, 5, 2], 1.0)}


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("clip", [None, (0.0, 1.0)])
def test_exact_against_pattern_enumeration(name, clip):
    sizes, eps = NETS[name]
    model = make_mlp(sizes, seed=3)
    x = random_inputs((sizes[0],), batch=2, seed=4)
    C = torch.cat([torch.eye(2), torch.tensor([[1.0, -1.0], [0.3, 0.8]])]).double()
    region = pl.LinfBall(x, eps, clip=clip)
    b = _milp().bound(model, region, C)
    assert b.status == ["optimal"] * 2 and b.method == "milp"
    lo, hi = (t.numpy() for t in region.box())
    for i in range(2):
        mins, maxs, n_patterns = enumerate_extremes(model, lo[i], hi[i], C.numpy())
        assert n_patterns >= 4, "the region should cross several ReLU boundaries"
        np.testing.assert_allclose(b.lower[i].numpy(), mins, atol=TOL, rtol=0)
        np.testing.assert_allclose(b.upper[i].numpy(), maxs, atol=TOL, rtol=0)
        # the witnesses attain the optimum
        np.testing.assert_allclose(b.min_value[i].numpy(), mins, atol=TOL, rtol=0)
        np.testing.assert_allclose(b.max_value[i].numpy(), maxs, atol=TOL, rtol=0)


def test_exact_against_dense_grid_2d():
    model = make_mlp([2, 6, 6, 2], seed=5)
    x = random_inputs((2,), batch=1, seed=6)
    eps = 0.3
    C = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = _milp().bound(model, pl.LinfBall(x, eps), C)
    n = 401
    t = torch.linspace(-eps, eps, n, dtype=torch.float64)
    grid = x[0] + torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    values = output_of(model, grid) @ C.t()
    gmin, gmax = values.min(0).values, values.max(0).values
    assert (gmin >= b.lower[0] - TOL).all() and (gmax <= b.upper[0] + TOL).all()
    # the grid gets close: spacing 1.5e-3, small Lipschitz constant
    assert (gmin - b.lower[0]).max() < 5e-3 and (b.upper[0] - gmax).max() < 5e-3


def test_cbc_and_highs_agree():
    model = make_mlp([3, 5, 5, 5, 2], seed=7)
    x = random_inputs((3,), batch=2, seed=8)
    region = pl.LinfBall(x, 0.25, clip=(0.0, 1.0))
    C = torch.tensor([[1.0, -1.0], [0.5, 1.0]], dtype=torch.float64)
    h = _milp(solver="HIGHS").bound(model, region, C)
    c = _milp(solver="CBC").bound(model, region, C)
    assert h.status == c.status == ["optimal"] * 2
    _agree(h.lower, c.lower)
    _agree(h.upper, c.upper)


def test_progressive_bounds_are_tighter_and_the_optimum_is_the_same():
    model = make_mlp([3, 8, 8, 8, 2], seed=9)
    x = random_inputs((3,), batch=2, seed=10)
    region = pl.LinfBall(x, 0.3)
    C = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    prog = _milp(intermediate="progressive").bound(model, region, C)
    plain = _milp().bound(model, region, C)
    dual = pl.Bounder.create("dual").bound(model, region, C)
    tighter = 0
    for (l, u), (ld, ud) in zip(prog.intermediate, dual.intermediate):
        assert (l >= ld - 1e-9).all() and (u <= ud + 1e-9).all()
        tighter += int(((l > ld + 1e-6) | (u < ud - 1e-6)).sum())
    assert tighter > 0, "the LP stage should tighten some unstable neuron"
    _agree(prog.lower, plain.lower)
    _agree(prog.upper, plain.upper)
    # a Bounder instance as the intermediate bounder
    inst = _milp(intermediate=pl.Bounder.create("interval")).bound(model, region, C)
    _agree(inst.lower, plain.lower)


# --------------------------------------------------------------------------------------------------
# the sandwich
# --------------------------------------------------------------------------------------------------


SANDWICH = [
    ("mlp", lambda: (make_mlp([4, 8, 8, 3], seed=11), (4,)), 0.15, None),
    ("mlp-clip", lambda: (make_mlp([5, 7, 6, 3], seed=12), (5,)), 0.2, (0.0, 1.0)),
    ("conv", lambda: (make_convnet((1, 4, 4), channels=(2, 2), n_out=3, seed=13), (1, 4, 4)), 0.08, (0.0, 1.0)),
]


@pytest.mark.parametrize("name,factory,eps,clip", SANDWICH, ids=[s[0] for s in SANDWICH])
def test_sandwich(name, factory, eps, clip):
    model, shape = factory()
    x = random_inputs(shape, batch=2, seed=14)
    region = pl.LinfBall(x, eps, clip=clip)
    C = torch.randn(4, 3, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    b = _milp().bound(model, region, C)
    assert b.status == ["optimal"] * 2
    for other in [pl.Bounder.create("interval"), pl.Bounder.create("dual"),
                  pl.Bounder.create("dual", alpha="optimized", steps=10)]:
        o = other.bound(model, region, C)
        assert (o.lower <= b.lower + TOL).all(), f"{o.method} lower bound above the exact minimum"
        assert (o.upper >= b.upper - TOL).all(), f"{o.method} upper bound below the exact maximum"
    values = sampled_values(model, region, C, n=400)
    assert (values >= b.lower - TOL).all() and (values <= b.upper + TOL).all()
    found_min, found_max = pgd_extremes(model, region, C, steps=30, restarts=1)
    assert (found_min >= b.lower - TOL).all() and (found_max <= b.upper + TOL).all()
    # the witnesses: inside the region, and the network attains the reported values there
    for arg, value in ((b.argmin, b.min_value), (b.argmax, b.max_value)):
        B, m = value.shape
        pts = arg.reshape(B * m, *shape)
        assert region.select(torch.arange(B).repeat_interleave(m)).contains(pts, tol=1e-9).all()
        f = output_of(model, pts).reshape(B, m, -1)
        torch.testing.assert_close(torch.einsum("mn,bmn->bm", C, f), value, atol=1e-9, rtol=0)
    assert (b.min_value >= b.lower - 1e-12).all() and (b.min_value <= b.lower + TOL).all()
    assert (b.max_value <= b.upper + 1e-12).all() and (b.max_value >= b.upper - TOL).all()


# --------------------------------------------------------------------------------------------------
# time limits, failures, options
# --------------------------------------------------------------------------------------------------


def _hard_problem():
    model = make_convnet((1, 6, 6), channels=(3, 4), n_out=3, seed=0)
    x = random_inputs((1, 6, 6), batch=1, seed=1)
    return model, pl.LinfBall(x, 0.1), torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64)


@pytest.mark.parametrize("solver", ["HIGHS", "CBC"])
def test_time_limit_is_a_status_with_sound_bounds(solver):
    model, region, C = _hard_problem()
    exact = _milp().bound(model, region, C)
    assert exact.status == ["optimal"]
    limited = _milp(solver=solver, time_limit=1e-3).bound(model, region, C)
    assert limited.status == ["time_limit"]
    assert limited.lower_status == [["time_limit"]] and limited.upper_status == [["time_limit"]]
    assert (limited.lower <= exact.lower + TOL).all() and (limited.upper >= exact.upper - TOL).all()
    # an incumbent (here from the primal heuristic) is attained, so it lies between the bounds
    assert (limited.min_value >= exact.lower - TOL).all() and (limited.max_value <= exact.upper + TOL).all()
    dual = pl.Bounder.create("dual").bound(model, region, C)
    assert (limited.lower >= dual.lower - 1e-9).all(), "the fallback is at least the intermediate bounder's"


def test_time_limit_mid_search_keeps_the_solvers_bound():
    model, region, C = _hard_problem()
    exact = _milp(heuristic_steps=0).bound(model, region, C)
    limited = _milp(time_limit=0.05, heuristic_steps=0).bound(model, region, C)
    assert limited.status[0] in ("time_limit", "optimal")
    assert (limited.lower <= exact.lower + TOL).all() and (limited.upper >= exact.upper - TOL).all()
    found = ~torch.isnan(limited.min_value)
    assert (limited.min_value[found] >= exact.lower[found] - TOL).all()


def test_witness_outside_the_region_is_a_status(monkeypatch):
    model = make_mlp([3, 6, 2], seed=16)
    x = random_inputs((3,), batch=1, seed=17)
    region = pl.LinfBall(x, 0.2)
    real = solvers.HighsAdapter.solve

    def corrupt(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if out.x is not None:
            out.x = out.x + 1.0  # far outside the box
        return out

    monkeypatch.setattr(solvers.HighsAdapter, "solve", corrupt)
    b = _milp(heuristic_steps=0).bound(model, region)
    assert b.status == ["error: witness outside the region"]
    assert b.lower_status == [["error: witness outside the region"] * 2]
    dual = pl.Bounder.create("dual").bound(model, region)
    torch.testing.assert_close(b.lower, dual.lower)  # the sound fallback, not the solver's claim
    torch.testing.assert_close(b.upper, dual.upper)
    assert torch.isnan(b.min_value).all()


def test_l2_ball_is_rejected():
    model = make_mlp([3, 4, 2], seed=0)
    with pytest.raises(ValueError, match="'milp' backend does not support L2Ball.*LinfBall"):
        _milp().bound(model, pl.L2Ball(random_inputs((3,), batch=1), 0.1))


def test_bad_options():
    with pytest.raises(ValueError, match="available: .*HIGHS"):
        pl.Bounder.create("milp", solver="gurobi")
    with pytest.raises(ValueError):
        pl.Bounder.create("milp", intermediate="nonsense")
    with pytest.raises(ValueError):
        pl.Bounder.create("milp", time_limit=0)
    assert "HIGHS" in milp_module.available_solvers() and "CBC" in milp_module.available_solvers()


def test_float32_model():
    model = make_mlp([3, 6, 6, 2], seed=18, dtype=torch.float32)
    x = random_inputs((3,), batch=2, seed=19, dtype=torch.float32)
    region = pl.LinfBall(x, 0.2, clip=(0.0, 1.0))
    b = _milp().bound(model, region)
    assert b.lower.dtype == torch.float32 and b.status == ["optimal"] * 2
    values = sampled_values(model, region, None, n=300)
    assert (values >= b.lower - 1e-5).all() and (values <= b.upper + 1e-5).all()


def test_estimated_intermediate_bounds_are_refused():
    model = make_mlp([3, 6, 2], seed=16)
    region = pl.LinfBall(random_inputs((3,), batch=1, seed=17), 0.2)
    with pytest.raises(ValueError, match="estimates"):
        _milp(intermediate=pl.Bounder.create("dual", proj=2)).bound(model, region)


# ---------------------------------------------------------------- numerical honesty of every certify

def constant_margin_net(delta, dtype=torch.float64, n_in=3):
    """A ReLU net whose margin ``f_0 − f_1`` is ``delta`` on every input (zero last weights, bias (δ, 0)),
    with unstable hidden units: every backend's bound of that margin is δ."""
    net = make_mlp([n_in, 6, 2], seed=3, dtype=dtype)
    with torch.no_grad():
        net[-1].weight.zero_()
        net[-1].bias.copy_(torch.tensor([delta, 0.0], dtype=dtype))
    return net


@pytest.mark.parametrize("name, options", [("interval", {}), ("dual", {"alpha": "fixed"}), ("lp", {}),
                                           ("milp", {"threads": 1}), ("milp", {"threads": 1, "trust_dual": False}),
                                           ("bab", {"split": "relu", "time_limit": 5})])
def test_a_margin_within_the_tolerance_is_unknown_not_certified(name, options):
    """A margin positive by less than the backend's stated tolerance gives "unknown"; clear of it, "certified"."""
    from polytope_lab.bab.bounder import CERTIFY_TOL as BAB_TOL
    from polytope_lab.bounds import CERTIFY_TOL
    certify_options = {k: options.pop(k) for k in ("trust_dual",) if k in options}
    bounder = pl.Bounder.create(name, **options)
    tol = {"milp": milp_module.DECIDE, "bab": BAB_TOL}.get(name, bounder.certify_tol)
    x = random_inputs((3,), batch=1)
    for delta, expected in ((tol / 2, "unknown"), (1e-3, "certified")):
        cert = bounder.certify(constant_margin_net(delta), pl.LinfBall(x, 0.2), torch.tensor([0]), **certify_options)
        assert cert.status == [expected], (name, delta, cert.status)
    assert milp_module.DECIDE == pytest.approx(1e-5) and CERTIFY_TOL == 1e-9


def test_a_float32_bound_is_rechecked_in_float64():
    """A float32 net whose float32 dual bound is positive by 1e-10 (< CERTIFY_TOL): the float64 recheck
    leaves it "unknown"; a clear margin stays "certified" (verdicts of float32 nets otherwise unchanged)."""
    x = random_inputs((3,), batch=1, dtype=torch.float32)
    dual = pl.Bounder.create("dual", alpha="fixed")
    for delta, expected in ((1e-10, "unknown"), (1e-3, "certified")):
        net = constant_margin_net(delta, dtype=torch.float32)
        assert dual.bound(net, pl.LinfBall(x, 0.2), [[1.0, -1.0]]).lower.item() > 0
        assert dual.certify(net, pl.LinfBall(x, 0.2), torch.tensor([0])).status == [expected]
    net = make_mlp([3, 16, 16, 3], seed=4, dtype=torch.float32)
    xs = random_inputs((3,), batch=6, dtype=torch.float32)
    for eps in (0.01, 0.05):
        region = pl.LinfBall(xs, eps)
        b = dual.bound(net, region, pl.margin_matrix(net(xs).argmax(1), 3))
        assert dual.certify(net, region).certified.tolist() == b.certified.tolist()

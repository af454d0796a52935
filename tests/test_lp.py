"""The LP backend (eq. 15): closed forms, the sandwich with the dual network, solvers, options, failures.

Tolerance: HIGHS (simplex) and CLARABEL (interior point) stop at feasibility/optimality tolerances of
about 1e-8; the values here are O(1), so comparisons of an LP optimum with another bound use
``TOL = 1e-5`` absolute plus 1e-5 relative to the value's scale.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polytope_lab as pl

from conftest import (assert_within, make_convnet, make_mlp, n_examples, pgd_extremes, random_inputs,
                      sample_region, sampled_values)

TOL = 1e-5
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

#: the final-objective-only optimiser over the fixed-slope intermediate bounds (tight mode passes the LP)
FINAL_ONLY = dict(slopes="fixed", optimize_intermediate=False)


def _tol(*bounds):
    return TOL * (1.0 + max(b.abs().max().item() for b in bounds))


def _le(a, b, what):
    """a ≤ b + tol elementwise."""
    tol = _tol(a, b)
    assert (a <= b + tol).all(), f"{what}: violated by {(a - b).max().item():.3g} (tol {tol:.2g})"


# --------------------------------------------------------------------------------------------------
# closed forms: with no ReLU the LP is exact
# --------------------------------------------------------------------------------------------------

def _linear_nets():
    torch.manual_seed(0)
    single = nn.Sequential(nn.Linear(5, 4)).double()
    torch.manual_seed(2)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(27, 4)).double()
    return {"linear": (single, (5,)), "conv-flatten-linear": (conv, (2, 5, 5))}


LINEAR_NETS = _linear_nets()


@pytest.mark.parametrize("name", list(LINEAR_NETS))
@pytest.mark.parametrize("norm", ["linf", "linf-clip", "l2"])
def test_no_relu_network_is_closed_form(name, norm):
    """C(Wx + b) ∓ eps‖(CW)ᵀ‖₁ (L∞), ∓ eps‖(CW)ᵀ‖₂ (L2, an SOCP: CLARABEL), ∓ |CW| rad around the
    clipped box's midpoint."""
    model, shape = LINEAR_NETS[name]
    x = random_inputs(shape, batch=2, seed=3)
    C = torch.randn(3, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eps = 0.13
    region = {"linf": lambda: pl.LinfBall(x, eps), "linf-clip": lambda: pl.LinfBall(x, 0.3, clip=(0.0, 1.0)),
              "l2": lambda: pl.L2Ball(x, eps)}[norm]()
    A = pl.from_torch(model, shape).affines[0]
    W, b0 = torch.as_tensor(A.as_matrix().toarray()), A.bias().detach().reshape(-1)
    CW = C @ W
    lo, hi = (t.reshape(2, -1) for t in region.box())
    mid = (lo + hi) / 2
    centre = (mid @ W.t() + b0) @ C.t()
    dev = {"linf": eps * CW.abs().sum(1), "l2": eps * CW.norm(dim=1),
           "linf-clip": ((hi - lo) / 2) @ CW.abs().t()}[norm]
    b = pl.Bounder.create("lp").bound(model, region, C=C)
    torch.testing.assert_close(b.lower, centre - dev, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.upper, centre + dev, rtol=1e-6, atol=1e-6)
    assert b.status == ["optimal"] * 2 and b.method == "lp" and b.intermediate == []


# --------------------------------------------------------------------------------------------------
# the sandwich: dual (fixed α) ≤ dual (optimised α) ≤ LP ≤ LP-ALL ≤ attack ≤ sampled points
# --------------------------------------------------------------------------------------------------

@st.composite
def problems(draw):
    """(model, region, C): a random small MLP or tiny convnet, an L∞ / L∞∩[0,1] / L2 region."""
    seed = draw(st.integers(0, 2 ** 16))
    if draw(st.booleans()):
        sizes = [draw(st.integers(2, 5)), *draw(st.lists(st.integers(3, 8), min_size=1, max_size=3)), 3]
        model, shape = make_mlp(sizes, seed=seed), (sizes[0],)
    else:
        side = draw(st.integers(4, 6))
        model, shape = make_convnet((1, side, side), channels=(2, 3), n_out=3, seed=seed), (1, side, side)
    x = random_inputs(shape, batch=2, seed=seed + 1)
    eps = draw(st.floats(0.02, 0.4))
    region = draw(st.sampled_from([lambda: pl.LinfBall(x, eps), lambda: pl.LinfBall(x, eps, clip=(0.0, 1.0)),
                                   lambda: pl.L2Ball(x, 3 * eps)]))()
    C = torch.randn(2, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return model, region, C


@settings(max_examples=n_examples(20), **SETTINGS)
@given(problems())
def test_sandwich(problem):
    model, region, C = problem
    dual = pl.Bounder.create("dual")
    fixed = dual.bound(model, region, C=C)
    opt = pl.Bounder.create("dual", alpha="optimized", steps=20, **FINAL_ONLY).bound(model, region, C=C)
    lp = pl.Bounder.create("lp", intermediate=dual).bound(model, region, C=C)
    lp_all = pl.Bounder.create("lp", intermediate="lp").bound(model, region, C=C)
    lp_interval = pl.Bounder.create("lp", intermediate="interval").bound(model, region, C=C)
    for b in (lp, lp_all, lp_interval):
        assert b.status == ["optimal"] * 2
    assert (lp.method, lp_all.method) == ("lp", "lp-all")
    # the LP uses exactly the dual's intermediate bounds ...
    for (l, u), (l0, u0) in zip(lp.intermediate, fixed.intermediate):
        assert torch.equal(l, l0) and torch.equal(u, u0)
    # ... so every α is a dual feasible point: the dual never beats the LP
    for d, what in ((fixed, "fixed α"), (opt, "optimised α")):
        _le(d.lower, lp.lower, f"dual {what} lower ≤ LP lower")
        _le(lp.upper, d.upper, f"LP upper ≤ dual {what} upper")
    # tighter intermediate bounds, tighter LP: dual ⊇ LP-ALL (interval ⊇ dual is no theorem: the fixed
    # slope's lower line dẑ dips below 0, so an interval bound can be the tighter one on some unit)
    _le(lp.lower, lp_all.lower, "LP lower ≤ LP-ALL lower")
    _le(lp_all.upper, lp.upper, "LP-ALL upper ≤ LP upper")
    for (l, u), (l0, u0) in zip(lp_all.intermediate, fixed.intermediate):
        assert (l >= l0).all() and (u <= u0).all()
    # and all of it is sound: sampled points and a PGD attack stay inside the tightest bounds
    assert_within(sampled_values(model, region, C, n=200), lp_all.lower, lp_all.upper, tol=1e-6)
    lo, hi = pgd_extremes(model, region, C, steps=20, restarts=1)
    _le(lp_all.lower, lo, "LP-ALL lower ≤ PGD minimum")
    _le(hi, lp_all.upper, "PGD maximum ≤ LP-ALL upper")
    pts = sample_region(region, 100)
    N, B = pts.shape[:2]
    pre = pl.from_torch(model, region.input_shape).pre_activations(pts.reshape(N * B, *pts.shape[2:]))[:-1]
    for (l, u), z in zip(lp_all.intermediate, pre):
        assert_within(z.detach().reshape(N, *l.shape), l, u, tol=1e-6, what="pre-activation")


def test_lp_matches_well_optimised_dual():
    """With fixed intermediate bounds the LP optimum is the maximum over α of the final-layer dual.
    Here fixed α is 0.065 below the LP; 300 steps of projected gradient ascent get within 1e-3
    (observed 1e-4; over 18 seeds/nets the worst was 7e-4)."""
    model = make_mlp([4, 10, 10, 3], seed=4)
    region = pl.LinfBall(random_inputs((4,), batch=2, seed=5), 0.3)
    C = torch.randn(2, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    lp = pl.Bounder.create("lp").bound(model, region, C=C)
    opt = pl.Bounder.create("dual", alpha="optimized", steps=300, **FINAL_ONLY).bound(model, region, C=C)
    fixed = pl.Bounder.create("dual").bound(model, region, C=C)
    assert (lp.lower - fixed.lower).max() > 0.03, "test net too easy: fixed α already (nearly) optimal"
    torch.testing.assert_close(opt.lower, lp.lower, rtol=0, atol=1e-3)
    torch.testing.assert_close(opt.upper, lp.upper, rtol=0, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# solvers, options and failures
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_highs_and_clarabel_agree(kind):
    model, shape = (make_mlp([4, 8, 8, 3], seed=1), (4,)) if kind == "mlp" else (make_convnet(seed=1), (1, 6, 6))
    region = pl.LinfBall(random_inputs(shape, batch=2, seed=2), 0.1, clip=(0.0, 1.0))
    a = pl.Bounder.create("lp", solver="HIGHS").bound(model, region)
    b = pl.Bounder.create("lp", solver="clarabel").bound(model, region)
    assert a.status == b.status == ["optimal"] * 2
    torch.testing.assert_close(a.lower, b.lower, rtol=TOL, atol=TOL)
    torch.testing.assert_close(a.upper, b.upper, rtol=TOL, atol=TOL)


def test_l2_defaults_to_a_conic_solver_and_agrees_with_scs():
    model = make_mlp([4, 8, 3], seed=2)
    region = pl.L2Ball(random_inputs((4,), batch=2, seed=3), 0.3)
    a = pl.Bounder.create("lp").bound(model, region)
    b = pl.Bounder.create("lp", solver="SCS", solver_options={"eps": 1e-9, "max_iters": 100000}).bound(model, region)
    assert a.status == ["optimal"] * 2
    torch.testing.assert_close(a.lower, b.lower, rtol=1e-4, atol=1e-4)


def test_unknown_solver_is_a_value_error():
    with pytest.raises(ValueError, match="installed solvers.*HIGHS"):
        pl.Bounder.create("lp", solver="NO_SUCH_SOLVER")


def test_lp_only_solver_with_l2_ball_is_a_value_error():
    model = make_mlp([4, 5, 3])
    region = pl.L2Ball(random_inputs((4,), batch=1), 0.1)
    with pytest.raises(ValueError, match="second-order-cone.*HIGHS.*CLARABEL"):
        pl.Bounder.create("lp", solver="HIGHS").bound(model, region)


def test_unknown_intermediate_is_a_value_error():
    with pytest.raises(ValueError, match="intermediate"):
        pl.Bounder.create("lp", intermediate="nope")


def test_failed_solves_fall_back_to_the_intermediate_bounder():
    """A solve stopped by the solver (here an iteration limit of 0) never raises: the status says so
    and those rows get the intermediate bounder's own (sound, looser) bounds."""
    model = make_mlp([4, 8, 8, 3], seed=3)
    region = pl.LinfBall(random_inputs((4,), batch=2, seed=4), 0.2)
    dual = pl.Bounder.create("dual").bound(model, region)
    for options in ({"simplex_iteration_limit": 0}, {"time_limit": 0.0}):
        b = pl.Bounder.create("lp", solver_options=options).bound(model, region)
        assert b.status == ["time_limit"] * 2
        assert torch.equal(b.lower, dual.lower) and torch.equal(b.upper, dual.upper)
    b = pl.Bounder.create("lp", solver="CLARABEL", solver_options={"max_iter": 1}).bound(model, region)
    assert all(s != "optimal" for s in b.status)
    assert torch.equal(b.lower, dual.lower) and torch.equal(b.upper, dual.upper)


def test_a_failed_warm_start_is_retried_cold(monkeypatch):
    """HiGHS warm-started from the previous row's basis can fail ("excessive dual values", seen on the
    pretrained MNIST ConvNet): the row is solved again from scratch before falling back."""
    import cvxpy as cp

    model = make_mlp([4, 8, 8, 3], seed=3)
    region = pl.LinfBall(random_inputs((4,), batch=2, seed=4), 0.2)
    ref = pl.Bounder.create("lp").bound(model, region)
    solve = cp.Problem.solve

    def warm_fails(self, *args, **kwargs):
        if kwargs.get("warm_start", True):
            raise cp.SolverError("warm start failed")
        return solve(self, *args, **kwargs)

    monkeypatch.setattr(cp.Problem, "solve", warm_fails)
    b = pl.Bounder.create("lp").bound(model, region)
    assert b.status == ["optimal"] * 2
    torch.testing.assert_close(b.lower, ref.lower, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b.upper, ref.upper, rtol=1e-9, atol=1e-9)


def test_time_limit_is_per_example_and_a_status():
    """``time_limit`` seconds per example, all rows together: far too little leaves every row with the
    intermediate bounder's bound and the status "time_limit", never an exception; enough solves all."""
    model = make_mlp([4, 8, 8, 3], seed=3)
    region = pl.LinfBall(random_inputs((4,), batch=2, seed=4), 0.2)
    C = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dual = pl.Bounder.create("dual").bound(model, region, C)
    tight = pl.Bounder.create("lp", time_limit=1e-4).bound(model, region, C)
    assert tight.status == ["time_limit"] * 2
    assert (tight.lower >= dual.lower).all() and (tight.upper <= dual.upper).all()
    assert tight.seconds < 5.0
    ample = pl.Bounder.create("lp", time_limit=60).bound(model, region, C)
    assert ample.status == ["optimal"] * 2
    with pytest.raises(ValueError, match="time_limit"):
        pl.Bounder.create("lp", time_limit=0)


@pytest.mark.parametrize("cvxpy_status,expected", [("optimal_inaccurate", "ok"), ("solver_error", "error: HIGHS status solver_error"),
                                                   ("user_limit", "time_limit"), ("infeasible", "infeasible")])
def test_solver_statuses_map_into_the_vocabulary_with_sound_fallbacks(monkeypatch, cvxpy_status, expected):
    """Whatever CVXPY reports other than "optimal", the row keeps the intermediate bounder's sound bound and
    the example's status is the contract's word for it."""
    from polytope_lab import solvers

    model = make_mlp([4, 8, 3], seed=3)
    region = pl.LinfBall(random_inputs((4,), batch=2, seed=4), 0.2)
    monkeypatch.setattr(solvers.CvxpyAdapter, "_run", lambda self, options: cvxpy_status)
    b = pl.Bounder.create("lp").bound(model, region)
    dual = pl.Bounder.create("dual").bound(model, region)
    assert b.status == [expected] * 2
    assert torch.equal(b.lower, dual.lower) and torch.equal(b.upper, dual.upper)


def test_estimated_intermediate_bounds_are_refused():
    model = make_mlp([4, 8, 8, 3], seed=3)
    region = pl.LinfBall(random_inputs((4,), batch=1, seed=4), 0.2)
    with pytest.raises(ValueError, match="estimates"):
        pl.Bounder.create("lp", intermediate=pl.Bounder.create("dual", proj=2)).bound(model, region)

"""The constraint system of eq. 15 / eq. 4 (polytope_lab.relaxation) and its solver adapters (solvers.py).

References that share no code with the adapters: scipy's ``linprog`` / ``milp`` on the exported matrices,
enumeration of every activation pattern (one LP each) on a 2-4-4-2 net, closed forms for linear nets and
for eq. 6's ε on a linear classifier, and the network itself at a point (the ``assignment``).

Tolerances (``relaxation.SOLVER_TOLERANCE``): two independent solves agree within ``solver_slack``
(10 tolerances relative to max(1, |v|): 1e-6 for LPs, 1e-5 for MILPs); a point's own assignment is exact
arithmetic (1e-12).
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize as so
import torch
import torch.nn as nn

import polytope_lab as pl
from polytope_lab import relaxation, solvers
from polytope_lab.relaxation import SOLVER_TOLERANCE, build, solver_slack, widen

from conftest import make_convnet, make_mlp, make_resnet, output_of, random_inputs


def _problem(kind, eps=0.25, seed=1):
    """(network, flat lo, hi, flat (l, u) per ReLU layer from the dual, x) for one example."""
    model, shape = {"mlp": lambda: (make_mlp([3, 6, 5, 3], seed=seed), (3,)),
                    "conv": lambda: (make_convnet((1, 4, 4), channels=(2, 2), n_out=3, seed=seed), (1, 4, 4)),
                    "skip": lambda: make_resnet("input-skip")}[kind]()
    x = random_inputs(shape, batch=1, seed=seed + 1)
    region = pl.LinfBall(x, eps)
    network = pl.from_torch(model, shape)
    d = pl.Bounder.create("dual").bound(network, region)
    lo, hi = (t.reshape(-1).numpy() for t in region.box())
    layers = [(l.reshape(-1).numpy(), u.reshape(-1).numpy()) for l, u in d.intermediate]
    return network, lo, hi, layers, x


def _linprog(system, cost, integral=False):
    """min costᵀv over the exported matrices, by scipy (HiGHS inside scipy, none of our adapter code)."""
    if integral:
        cons = [so.LinearConstraint(system.A_eq, system.b_eq, system.b_eq)]
        if system.A_ub.shape[0]:
            cons.append(so.LinearConstraint(system.A_ub, -np.inf, system.b_ub))
        res = so.milp(cost, constraints=cons, integrality=system.integrality.astype(int),
                      bounds=so.Bounds(system.lb, system.ub), options={"mip_rel_gap": 0})
        assert res.status == 0, res.message
        return res.fun
    res = so.linprog(cost, A_ub=system.A_ub, b_ub=system.b_ub, A_eq=system.A_eq, b_eq=system.b_eq,
                     bounds=list(zip(system.lb, system.ub)), method="highs")
    assert res.status == 0, res.message
    return res.fun


@pytest.mark.parametrize("kind", ["mlp", "conv", "skip"])
def test_lp_over_the_exported_matrices_equals_the_adapters(kind):
    network, lo, hi, layers, _ = _problem(kind)
    system = build(network.matrices(), lo, hi, layers, exact=False)
    assert system.n_binaries == 0 and system.depth == network.n_relu_layers
    cvx, highs = solvers.CvxpyAdapter(system, "HIGHS"), solvers.HighsAdapter(system, mip=False)
    for j in range(network.output_size):
        for sign in (1, -1):
            cost, const = system.cost(sign * np.eye(network.output_size)[j])
            ref = _linprog(system, cost) + const
            for out in (cvx.solve(cost, const), highs.solve(cost, const)):
                assert out.status == "optimal"
                assert abs(out.bound - ref) <= solver_slack(ref, exact=False), (out.bound, ref)


@pytest.mark.parametrize("kind", ["mlp", "skip"])
def test_milp_over_the_exported_matrices_equals_the_adapters(kind):
    network, lo, hi, layers, _ = _problem(kind)
    system = build(network.matrices(), lo, hi, [widen(l, u) for l, u in layers], exact=True)
    assert system.n_binaries == sum(int(((l < 0) & (u > 0)).sum()) for l, u in map(lambda lu: widen(*lu), layers))
    adapters = [solvers.HighsAdapter(system, threads=1), solvers.CbcAdapter(system, threads=1)]
    for j in range(network.output_size):
        cost, const = system.cost(np.eye(network.output_size)[j])
        ref = _linprog(system, cost, integral=True) + const
        for a in adapters:
            out = a.solve(cost, const)
            assert out.status == "optimal" and abs(out.bound - ref) <= solver_slack(ref), (a.name, out.bound, ref)


def _pattern_extremes(model, lo, hi, c):
    """(min, max) of ``c f(x')`` over the box by enumerating every activation pattern of a 2-hidden-layer
    MLP: on each pattern f is affine and the pattern a polytope (one LP per pattern and side)."""
    (W1, b1), (W2, b2), (W3, b3) = [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy())
                                    for m in model if isinstance(m, nn.Linear)]
    best = [np.inf, -np.inf]
    for s1 in itertools.product((0, 1), repeat=len(b1)):
        D1 = np.diag(s1)
        A2, a2 = W2 @ D1 @ W1, W2 @ D1 @ b1 + b2
        for s2 in itertools.product((0, 1), repeat=len(b2)):
            D2 = np.diag(s2)
            g, g0 = c @ W3 @ D2 @ A2, c @ (W3 @ D2 @ a2 + b3)
            # the pattern: sign(ẑ) as chosen on both layers, (1 − 2s)·ẑ ≤ 0
            G = np.vstack([(1 - 2 * np.array(s1))[:, None] * W1, (1 - 2 * np.array(s2))[:, None] * A2])
            h = np.concatenate([-(1 - 2 * np.array(s1)) * b1, -(1 - 2 * np.array(s2)) * a2])
            for side, sign in ((0, 1), (1, -1)):
                res = so.linprog(sign * g, A_ub=G, b_ub=h, bounds=list(zip(lo, hi)), method="highs")
                if res.status == 0:
                    value = sign * res.fun + g0
                    best[side] = min(best[side], value) if side == 0 else max(best[side], value)
    return best


def test_milp_equals_enumeration_of_activation_patterns():
    model = make_mlp([2, 4, 4, 2], seed=5)
    network = pl.from_torch(model, (2,))
    x = random_inputs((2,), batch=1, seed=6)
    region = pl.LinfBall(x, 0.8)
    d = pl.Bounder.create("dual").bound(network, region)
    lo, hi = (t.reshape(-1).numpy() for t in region.box())
    layers = [widen(l.reshape(-1).numpy(), u.reshape(-1).numpy()) for l, u in d.intermediate]
    system = build(network.matrices(), lo, hi, layers, exact=True)
    assert system.n_binaries >= 4, "the region should cross several ReLU boundaries"
    highs = solvers.HighsAdapter(system, threads=1)
    for c in (np.array([1.0, 0.0]), np.array([1.0, -1.0])):
        mn, mx = _pattern_extremes(model, lo, hi, c)
        low = highs.solve(*system.cost(c))
        high = highs.solve(*system.cost(-c))
        assert abs(low.bound - mn) <= solver_slack(mn) and abs(-high.bound - mx) <= solver_slack(mx)
        # the relaxation is looser, never tighter
        lp = build(network.matrices(), lo, hi, layers, exact=False)
        relaxed = solvers.HighsAdapter(lp, mip=False).solve(*lp.cost(c))
        assert relaxed.bound <= mn + solver_slack(mn, exact=False)


@pytest.mark.parametrize("kind", ["mlp", "conv", "skip"])
@pytest.mark.parametrize("exact", [True, False])
def test_the_assignment_of_a_point_is_feasible_and_attains_the_network(kind, exact):
    network, lo, hi, layers, x = _problem(kind)
    if exact:
        layers = [widen(l, u) for l, u in layers]
    system = build(network.matrices(), lo, hi, layers, exact=exact)
    g = np.random.default_rng(0)
    for point in (x.reshape(-1).numpy(), lo + g.random(len(lo)) * (hi - lo)):
        v = system.assignment(point)
        assert np.abs(system.A_eq @ v - system.b_eq).max() <= 1e-12
        assert (system.A_ub @ v - system.b_ub).max() <= 1e-12
        assert (v >= system.lb - 1e-12).all() and (v <= system.ub + 1e-12).all()
        f = output_of(network, torch.from_numpy(point).reshape(1, *network.input_shape))[0].numpy()
        for c in np.eye(len(f)):
            cost, const = system.cost(c)
            assert abs(cost @ v + const - c @ f) <= 1e-12


def test_linear_net_closed_form():
    """No ReLU: the LP is exact, ``c(Wx + b) − eps‖Wᵀc‖₁``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).double()
    network = pl.from_torch(model, (5,))
    x = random_inputs((5,), batch=1, seed=2)[0].numpy()
    eps = 0.2
    system = build(network.matrices(), x - eps, x + eps, [], exact=False)
    W, b = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    adapter = solvers.HighsAdapter(system, mip=False)
    for c in np.eye(3):
        out = adapter.solve(*system.cost(c))
        assert abs(out.bound - (c @ (W @ x + b) - eps * np.abs(W.T @ c).sum())) <= solver_slack(1.0, exact=False)


def test_epsilon_variable_and_disjunction_give_the_closed_form_distance():
    """Eq. 6 on a linear two-class net: the margin ``(w₀ − w₁)x' + (b₀ − b₁)`` reaches 0 at L∞ distance
    ``margin(x) / ‖w₀ − w₁‖₁``."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 2)).double()
    network = pl.from_torch(model, (4,))
    W, b = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    x = random_inputs((4,), batch=1, seed=4)[0].numpy()
    y = int(np.argmax(W @ x + b))
    w, margin = W[y] - W[1 - y], (W[y] - W[1 - y]) @ x + b[y] - b[1 - y]
    eps_max = 10.0
    system = build(network.matrices(), x - eps_max, x + eps_max, [], exact=True, center=x, eps_max=eps_max)
    C = np.eye(2)[[y]] - np.eye(2)[[1 - y]]
    system.add_disjunction(C, [margin + eps_max * np.abs(w).sum()])
    cost = np.zeros(system.n_vars)
    cost[system.eps] = 1.0
    for adapter in (solvers.HighsAdapter(system), solvers.CbcAdapter(system)):
        out = adapter.solve(cost)
        assert out.status == "optimal"
        assert abs(out.eps - margin / np.abs(w).sum()) <= solver_slack(1.0), adapter.name


def test_split_rows_partition_the_exact_problem():
    """``s·ẑ ≥ 0`` for s = ±1 on an unstable unit: the MILP's minimum is the smaller of the two halves', and
    each half's LP relaxation is at least the unsplit one's (the split block tightens, never cuts the
    other half's points)."""
    network, lo, hi, layers, _ = _problem("mlp", eps=0.4)
    layers = [widen(l, u) for l, u in layers]
    layer, unit = next((i, int(j)) for i, (l, u) in enumerate(layers) for j in np.flatnonzero((l < 0) & (u > 0)))
    c = np.array([1.0, -1.0, 0.5])
    whole = build(network.matrices(), lo, hi, layers, exact=True)
    cost, const = whole.cost(c)
    ref = solvers.HighsAdapter(whole).solve(cost, const).bound
    halves, relaxed = [], []
    for sign in (1, -1):
        for exact, out in ((True, halves), (False, relaxed)):
            part = build(network.matrices(), lo, hi, layers, exact=exact)
            part.add_split(layer, unit, sign)
            out.append(solvers.HighsAdapter(part, mip=exact).solve(*part.cost(c)).bound)
        assert part.splits == [(layer, unit, sign)]
    assert abs(min(halves) - ref) <= solver_slack(ref)
    lp = build(network.matrices(), lo, hi, layers, exact=False)
    unsplit = solvers.HighsAdapter(lp, mip=False).solve(*lp.cost(c)).bound
    assert min(relaxed) >= unsplit - solver_slack(unsplit, exact=False)
    with pytest.raises(ValueError, match="sign"):
        whole.add_split(layer, unit, 0)


def test_adapter_registry_and_errors():
    assert set(solvers.available_solvers()) == {"HIGHS", "CBC"}
    with pytest.raises(ValueError, match=r"'gurobi'.*available: \['HIGHS', 'CBC'\]"):
        solvers.milp_adapter("gurobi")
    with pytest.raises(TypeError):
        solvers.SolverAdapter(None)  # abstract: a new solver implements solve
    network, lo, hi, layers, x = _problem("mlp")
    system = build(network.matrices(), lo, hi, layers, exact=False, ball=(x.reshape(-1).numpy(), 0.1))
    with pytest.raises(ValueError, match="cone"):
        solvers.HighsAdapter(system, mip=False)
    assert solvers.CvxpyAdapter(system, "CLARABEL").solve(*system.cost(np.eye(3)[0])).status == "optimal"


def test_solver_slack_follows_the_documented_tolerances():
    assert SOLVER_TOLERANCE["primal_feasibility"] == 1e-7 and SOLVER_TOLERANCE["mip_feasibility"] == 1e-6
    assert solver_slack(0.5) == pytest.approx(1e-5) and solver_slack(-300.0) == pytest.approx(3e-3)
    assert solver_slack(torch.tensor([0.1, -2.0]), exact=False) == pytest.approx(2e-6)
    assert relaxation.WITNESS_TOL == SOLVER_TOLERANCE["mip_feasibility"]


def test_solvers_print_nothing_in_a_fresh_process():
    """HiGHS prints a banner to stdout from C++ on its first construction in a process: the adapters
    (and CVXPY's HiGHS, once ours ran) must not let it through."""
    code = ("import numpy as np; from polytope_lab import relaxation as r, solvers as s; import scipy.sparse as sp\n"
            "ops = [(np.zeros(2), [(0, sp.csr_matrix(np.eye(2)))]), (np.zeros(1), [(1, sp.csr_matrix(np.ones((1, 2))))])]\n"
            "sy = r.build(ops, -np.ones(2), np.ones(2), [(-np.ones(2), np.ones(2))], exact=True)\n"
            "for a in (s.HighsAdapter(sy), s.CbcAdapter(sy), s.CvxpyAdapter(sy, 'HIGHS')): a.solve(*sy.cost(np.ones(1)))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "", done.stdout

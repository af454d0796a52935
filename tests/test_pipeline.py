"""verify_property: the staged pipeline (attack → dual → optimised dual → exact) on tiny torch networks.

Soundness is the point: a "sat" comes with a counterexample that lies in its box and satisfies a
disjunct on the network; an "unsat" is never given where a dense grid finds an unsafe point; a
conjunction whose rows hold separately but never together is refuted jointly by the exact backend.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import polytope_lab as pl
from polytope_lab import solvers
from conftest import n_examples
from polytope_lab import pipeline
from polytope_lab.milp import MILPBounder, PointSearch
from polytope_lab.pipeline import check_counterexample, exact_backend, verify_property
from polytope_lab.vnnlib import Case, Disjunct, Property


@pytest.fixture(autouse=True)
def _milp_is_the_exact_backend(monkeypatch):
    """These tests hold the pipeline to the MILP's answers (several replace its find_point); the branch and
    bound backend, preferred when registered, is run through the same properties in tests/test_bab.py."""
    monkeypatch.delitem(pl.Bounder.registry, "bab", raising=False)

LO, HI = np.zeros(2), np.ones(2)


def tiny_net(seed=0, width=8):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 2)).double()


def prop(*disjuncts, lo=LO, hi=HI):
    """One case over [lo, hi] with the disjuncts (A, b)."""
    ds = [Disjunct(np.array(A, dtype=np.float64).reshape(len(b), 2), np.array(b, dtype=np.float64))
          for A, b in disjuncts]
    return Property([Case(np.asarray(lo, float), np.asarray(hi, float), ds)], 2, 2)


def exact_range(net, lo=LO, hi=HI):
    """(exact min, exact max) of each output over the box (MILP), and the fixed-α dual's lower bound."""
    box = pl.Box(torch.tensor(lo)[None], torch.tensor(hi)[None])
    m = pl.Bounder.create("milp", threads=1).bound(net, box)
    d = pl.Bounder.create("dual").bound(net, box)
    return m.lower[0].numpy(), m.upper[0].numpy(), d.lower[0].numpy()


def grid_outputs(net, lo=LO, hi=HI, n=201):
    g = np.stack(np.meshgrid(np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n)), -1).reshape(-1, 2)
    with torch.no_grad():
        return g, net(torch.from_numpy(g)).numpy()


def assert_valid_counterexample(net, p, result):
    cx = result.counterexample
    assert cx is not None
    case = p[cx.case]
    assert np.all(cx.x >= case.lo) and np.all(cx.x <= case.hi)
    with torch.no_grad():
        y = net(torch.from_numpy(cx.x)[None])[0].numpy()
    np.testing.assert_allclose(cx.y, y, rtol=0, atol=1e-12)
    A, b = case.disjuncts[cx.disjunct]
    assert np.all(A @ y <= b + 1e-12 * (1 + np.abs(b)))   # numpy's dot may round differently from torch's


def test_a_known_counterexample_is_found_by_the_attack_and_checked():
    net = tiny_net()
    x0 = torch.tensor([[0.3, 0.8]], dtype=torch.float64)
    with torch.no_grad():
        y0 = net(x0)[0].numpy()
    p = prop(([[0, 1.0]], [y0[1] + 1e-3]), ([[1.0, 0]], [-100.0]))   # the second disjunct is impossible
    r = verify_property(net, p, 10, threads=1)
    assert r.verdict == "sat" and r.stage == "attack"
    assert_valid_counterexample(net, p, r)
    assert r.cases[0].status[1] != "sat"


def test_the_dual_certifies_what_is_far_from_reachable():
    net = tiny_net()
    _, _, dual_lo = exact_range(net)
    p = prop(([[1.0, 0]], [dual_lo[0] - 0.05]), ([[0, 1.0]], [dual_lo[1] - 0.05]))
    r = verify_property(net, p, 10, threads=1)
    assert r.verdict == "unsat" and r.stage == "dual" and r.counterexample is None
    assert r.cases[0].status == ["refuted", "refuted"] and min(r.cases[0].margin) > 0


def test_the_milp_decides_unsat_and_sat_where_the_dual_cannot():
    net = tiny_net()
    lower, _, dual_lo = exact_range(net)
    assert dual_lo[0] < lower[0] - 1e-3, "the test needs a net on which the dual is loose"
    b = (dual_lo[0] + lower[0]) / 2     # below the exact minimum, above the dual's bound
    r = verify_property(net, prop(([[1.0, 0]], [b])), 10, stages=("attack", "dual", "exact"), threads=1)
    assert r.verdict == "unsat" and r.stage == "milp" and r.cases[0].stage == ["milp"]
    full = verify_property(net, prop(([[1.0, 0]], [b])), 10, threads=1)
    assert full.verdict == "unsat" and full.stage in ("dual-optimized", "milp")
    p = prop(([[1.0, 0]], [lower[0] + 1e-4]))   # reachable only near the minimiser; no attack
    r = verify_property(net, p, 10, stages=("dual", "exact"), threads=1)
    assert r.verdict == "sat" and r.stage == "milp"
    assert_valid_counterexample(net, p, r)


def test_a_conjunction_satisfiable_row_by_row_but_not_jointly_is_unsat():
    net = tiny_net()
    lower, upper, _ = exact_range(net)
    c = (lower[0] + upper[0]) / 2
    p = prop(([[1.0, 0], [-1.0, 0]], [c, -(c + 1e-3)]))   # y0 ≤ c and y0 ≥ c + 0.001
    _, ys = grid_outputs(net)
    assert (ys[:, 0] <= c).any() and (ys[:, 0] >= c + 1e-3).any()   # each row holds somewhere
    for stages in (pipeline.STAGES, ("dual", "exact"), ("exact",)):
        r = verify_property(net, p, 10, stages=stages, threads=1)
        assert r.verdict == "unsat" and r.stage == "milp", (stages, r)
    bounds_only = verify_property(net, p, 10, stages=("attack", "dual", "dual-optimized"), threads=1)
    assert bounds_only.verdict == "unknown"   # the single-row test cannot refute it: left open, not answered


def test_rows_on_two_outputs_are_refuted_jointly():
    net = tiny_net(seed=3)
    g, ys = grid_outputs(net)
    a, b = np.quantile(ys[:, 0], 0.3), np.quantile(ys[:, 1], 0.3)
    jointly = ((ys[:, 0] <= a) & (ys[:, 1] <= b)).any()
    for stages in (pipeline.STAGES, ("exact",)):
        p = prop(([[1.0, 0], [0, 1.0]], [a, b]))
        r = verify_property(net, p, 10, stages=stages, threads=1)
        assert r.verdict in ("sat", "unsat")
        if jointly:
            assert r.verdict == "sat"
        if r.verdict == "sat":
            assert_valid_counterexample(net, p, r)


def test_a_tiny_time_limit_gives_timeout_or_a_correct_verdict():
    net = tiny_net()
    lower, upper, dual_lo = exact_range(net)
    unsafe_free = prop(([[1.0, 0]], [(dual_lo[0] + lower[0]) / 2]))
    unsafe = prop(([[1.0, 0]], [lower[0] + 1e-4]))
    for limit in (1e-4, 1e-2, 0.05):
        r = verify_property(net, unsafe_free, limit, stages=("dual", "exact"), threads=1)
        assert r.verdict in ("timeout", "unsat"), r
        assert r.seconds < limit + 0.5
        r = verify_property(net, unsafe, limit, stages=("dual", "exact"), threads=1)
        assert r.verdict in ("timeout", "sat"), r
        if r.verdict == "sat":
            assert_valid_counterexample(net, unsafe, r)
    assert verify_property(net, unsafe_free, 1e-4, threads=1).verdict == "timeout"


def random_property(rng, ys):
    """1-2 disjuncts of 1-2 random rows with right-hand sides inside the outputs' sampled range."""
    out = []
    for _ in range(rng.integers(1, 3)):
        A = rng.normal(size=(rng.integers(1, 3), 2))
        vals = ys @ A.T
        b = np.array([np.quantile(vals[:, k], rng.uniform(0.0, 0.35)) for k in range(len(A))])
        out.append((A, b - rng.uniform(0, 0.02)))
    return out


@pytest.mark.parametrize("seed", range(n_examples(8)))   # POLYTOPE_LAB_TEST_SCALE=20: 160 nets
def test_verdicts_agree_with_dense_grid_sampling(seed):
    rng = np.random.default_rng(seed)
    net = tiny_net(seed=100 + seed, width=6)
    lo = rng.uniform(-1, 0, size=2)
    hi = lo + rng.uniform(0.2, 1.5, size=2)
    g, ys = grid_outputs(net, lo, hi)
    for stages in (pipeline.STAGES, ("exact",), ("dual", "dual-optimized")):
        p = prop(*random_property(rng, ys), lo=lo, hi=hi)
        found = any(np.all(ys @ np.asarray(d.A).T <= d.b, axis=1).any() for d in p[0].disjuncts)
        r = verify_property(net, p, 20, stages=stages, threads=1)
        if r.verdict == "sat":
            assert_valid_counterexample(net, p, r)
        if r.verdict == "unsat":
            assert not found, (stages, p)
        if "exact" in stages:
            assert r.verdict in ("sat", "unsat"), r
            assert r.verdict == "sat" or not found
        if found:
            assert r.verdict != "unsat"


def test_several_cases_the_unsafe_one_is_reported():
    net = tiny_net()
    _, _, dual_lo = exact_range(net)
    lower, _, _ = exact_range(net, np.array([0.0, 0.0]), np.array([0.5, 0.5]))
    with torch.no_grad():
        y = net(torch.tensor([[0.75, 0.75]], dtype=torch.float64))[0].numpy()
    safe = Case(np.zeros(2), np.full(2, 0.5), [Disjunct(np.array([[1.0, 0]]), np.array([lower[0] - 0.1]))])
    unsafe = Case(np.full(2, 0.5), np.ones(2), [Disjunct(np.array([[1.0, 0]]), np.array([y[0]]))])
    p = Property([safe, unsafe], 2, 2)
    r = verify_property(net, p, 10, threads=1)
    assert r.verdict == "sat" and r.counterexample.case == 1
    assert_valid_counterexample(net, p, r)
    assert verify_property(net, Property([safe], 2, 2), 10, threads=1).verdict == "unsat"


def test_a_disjunct_without_rows_is_sat_at_the_centre():
    net = tiny_net()
    p = Property([Case(LO, HI, [Disjunct(np.zeros((0, 2)), np.zeros(0))])], 2, 2)
    for stages in (pipeline.STAGES, ("exact",)):
        r = verify_property(net, p, 5, stages=stages, threads=1)
        assert r.verdict == "sat"
        np.testing.assert_allclose(r.counterexample.x, [0.5, 0.5])


def test_check_counterexample_needs_the_box_and_a_satisfied_disjunct():
    net = tiny_net().double()
    from polytope_lab.convert import as_network
    net64 = as_network(net, (2,))
    with torch.no_grad():
        y = net(torch.tensor([[1.0, 1.0]], dtype=torch.float64))[0].numpy()
    case = Case(LO, HI, [Disjunct(np.array([[1.0, 0]]), np.array([y[0]]))])
    x, fx, d = check_counterexample(net64, case, np.array([1.0 + 5e-7, 1.0]))   # within 1e-6: clamped
    assert np.array_equal(x, [1.0, 1.0]) and d == 0 and fx[0] == y[0]
    assert check_counterexample(net64, case, np.array([1.0 + 1e-5, 1.0])) is None      # outside the box
    tight = Case(LO, HI, [Disjunct(np.array([[1.0, 0]]), np.array([np.nextafter(y[0], -1)]))])
    assert check_counterexample(net64, tight, np.array([1.0, 1.0])) is None           # no tolerance on rows
    assert check_counterexample(net64, case, np.array([math.nan, 1.0])) is None


def test_bad_input_raises_value_error():
    net = tiny_net()
    p = prop(([[1.0, 0]], [0.0]))
    with pytest.raises(ValueError):
        verify_property(net, p, 0)
    with pytest.raises(ValueError):
        verify_property(net, p, 1, stages=("attack", "magic"))
    with pytest.raises(ValueError):
        verify_property(net, Property([Case(np.zeros(3), np.ones(3), [])], 3, 2), 1)
    with pytest.raises(ValueError):
        verify_property(net, Property([Case(LO, HI, [Disjunct(np.ones((1, 3)), np.zeros(1))])], 2, 3), 1)
    with pytest.raises(ValueError):
        verify_property(net, Property([], 2, 2), 1)
    with pytest.raises(ValueError):
        verify_property(net, p, 1, exact="lp")   # not an exact backend


def test_solver_failures_become_error_verdicts_never_wrong_answers(monkeypatch):
    net = tiny_net()
    lower, _, dual_lo = exact_range(net)
    p = prop(([[1.0, 0]], [(dual_lo[0] + lower[0]) / 2]))

    def broken(self, *args, **kwargs):
        raise RuntimeError("solver crashed")
    monkeypatch.setattr(MILPBounder, "find_point", broken)
    r = verify_property(net, p, 5, stages=("dual", "exact"), threads=1)
    assert r.verdict == "error" and "solver crashed" in r.message

    def liar(self, model, region, A, b, time_limit=None):   # claims a point that is not unsafe
        return PointSearch("found", 0.0, np.array([0.5, 0.5]), -1.0)
    monkeypatch.setattr(MILPBounder, "find_point", liar)
    r = verify_property(net, p, 5, stages=("dual", "exact"), threads=1)
    assert r.verdict == "error" and r.counterexample is None


def test_the_exact_backend_comes_from_the_registry(monkeypatch):
    assert exact_backend() == "milp"

    class FakeBab(MILPBounder):   # no name: not registered by subclassing
        def find_point(self, model, region, A, b, time_limit=None):
            return PointSearch("refuted", 1.0)
    monkeypatch.setitem(pl.Bounder.registry, "bab", FakeBab)
    assert exact_backend() == "bab"
    r = verify_property(tiny_net(), prop(([[1.0, 0]], [-1e9 + 1.0])), 5, stages=("exact",), threads=1)
    assert r.verdict == "unsat" and r.stage == "bab"


def test_find_point_decides_conjunctions_and_boundary_cases():
    net = tiny_net()
    box = pl.Box(torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))
    m = pl.Bounder.create("milp", threads=1).bound(net, box)
    lower, upper = m.lower[0].numpy(), m.upper[0].numpy()
    milp = MILPBounder(threads=1)
    c = (lower[0] + upper[0]) / 2
    out = milp.find_point(net, box, [[1.0, 0], [-1.0, 0]], [c, -(c + 1e-3)])
    assert out.status == "refuted" and out.bound > 1e-6
    out = milp.find_point(net, box, [[1.0, 0], [-1.0, 0]], [c + 1e-3, -c])
    with torch.no_grad():
        y0 = float(net(torch.from_numpy(out.point)[None])[0, 0])
    assert out.status == "found" and c <= y0 <= c + 1e-3
    edge = float(m.min_value[0, 0])   # attained exactly at the MILP's minimiser: the boundary is unsafe
    for b in (edge, np.nextafter(edge, np.inf)):
        out = milp.find_point(net, box, [[1.0, 0]], [b])
        assert out.status in ("found", "unknown"), out
        r = verify_property(net, prop(([[1.0, 0]], [b])), 10, stages=("exact",), threads=1)
        assert r.verdict in ("sat", "unknown")
    with pytest.raises(ValueError):
        milp.find_point(net, box, np.zeros((0, 2)), np.zeros(0))


def test_a_solver_bound_within_its_tolerance_never_refutes(monkeypatch):
    """Refuting needs a proven bound clear of the solver's tolerance (> decide_margin, 1e-5 · max(1, scale)):
    a solver that reports an "optimal" bound of 5e-6 with no point, or any bound it does not vouch for, leaves the
    disjunct open, never refuted."""
    net = tiny_net()
    box = pl.Box(torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))
    m = pl.Bounder.create("milp", threads=1).bound(net, box)
    b = [float(m.lower[0, 0]) + 1e-3]   # the dual cannot refute it: the solver must decide
    for outcome in (solvers.Outcome("optimal", bound=5e-6), solvers.Outcome("inaccurate", bound=1.0),
                    solvers.Outcome("stopped", bound=1e-7)):
        monkeypatch.setattr(solvers.HighsAdapter, "solve", lambda self, *a, _o=outcome, **k: _o)
        out = MILPBounder(threads=1).find_point(net, box, [[1.0, 0]], b)
        assert out.status != "refuted", (outcome, out)
    monkeypatch.setattr(solvers.HighsAdapter, "solve", lambda self, *a, **k: solvers.Outcome("optimal", bound=1e-3))
    assert MILPBounder(threads=1).find_point(net, box, [[1.0, 0]], b).status == "refuted"


def test_the_time_limit_holds_on_a_net_the_milp_cannot_finish():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(10, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                        nn.Linear(48, 1)).double()
    lo, hi = -np.ones(10), np.ones(10)
    box = pl.Box(torch.tensor(lo)[None], torch.tensor(hi)[None])
    dual_lo = float(pl.Bounder.create("dual").bound(net, box).lower[0, 0])
    attacked = float(pl.pgd_minimize(net, box, torch.eye(1, dtype=torch.float64), steps=50, restarts=5)[0][0, 0])
    p = Property([Case(lo, hi, [Disjunct(np.array([[1.0]]), np.array([(dual_lo + attacked) / 2]))])], 10, 1)
    r = verify_property(net, p, 1.5, threads=1)
    assert r.seconds < 1.5 + 0.5, r
    assert r.verdict in ("sat", "unsat", "timeout"), r
    if r.verdict == "sat":
        assert_valid_counterexample(net, p, r)


def test_float32_models_networks_and_shaped_inputs():
    net = tiny_net()
    x0 = torch.tensor([[0.3, 0.8]], dtype=torch.float64)
    with torch.no_grad():
        y0 = net(x0)[0].numpy()
    p = prop(([[0, 1.0]], [y0[1] + 1e-3]))
    shaped = nn.Sequential(nn.Flatten(), *tiny_net()).float()   # inputs (2, 1), as ONNX's [1, n, 1] after the batch
    for model, shape in ((net.float(), None), (pl.from_torch(tiny_net(), (2,)), None), (shaped, (2, 1))):
        r = verify_property(model, p, 10, input_shape=shape, threads=1)
        assert r.verdict == "sat"
        cx = r.counterexample
        assert cx.x.shape == (2,) and cx.x.dtype == np.float64 and np.all(A_le_b(p, cx))
    with pytest.raises(ValueError):
        verify_property(shaped, p, 10, input_shape=(3, 1))


def A_le_b(p, cx):
    A, b = p[cx.case].disjuncts[cx.disjunct]
    return A @ cx.y <= b


@pytest.fixture(scope="module")
def mnistfc():
    """(folder, Network) of the shared VNN-COMP 2021 mnistfc 256x2 net (skipped without the benchmarks)."""
    from conftest import real_path
    folder = real_path("POLYTOPE_LAB_BENCHMARKS", "vnncomp2021", "mnistfc", what="vnncomp2021/mnistfc/")
    return folder, pl.load_onnx(folder / "mnist-net_256x2.onnx")


def test_mnistfc_end_to_end(mnistfc):
    """Real instances: a sat one (its counterexample checked by onnxruntime, as the competition does), one
    the dual certifies, and a tiny time limit."""
    ort = pytest.importorskip("onnxruntime")
    folder, net = mnistfc
    sess = ort.InferenceSession(str(folder / "mnist-net_256x2.onnx"))
    p = pl.read_vnnlib(folder / "prop_12_0.05.vnnlib", 784, 10)
    r = verify_property(net, p, 60, threads=1)
    assert r.verdict == "sat", r.message
    x = r.counterexample.x
    assert np.all(x >= p[0].lo) and np.all(x <= p[0].hi)
    y = sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32).reshape(1, 784, 1)})[0].reshape(-1)
    assert np.abs(y - r.counterexample.y).max() < 1e-4
    A, b = p[0].disjuncts[r.counterexample.disjunct]
    assert np.all(A @ r.counterexample.y <= b)
    p = pl.read_vnnlib(folder / "prop_2_0.03.vnnlib", 784, 10)
    r = verify_property(net, p, 60, threads=1)
    assert r.verdict == "unsat" and r.stage == "dual"
    hard = pl.read_vnnlib(folder / "prop_0_0.05.vnnlib", 784, 10)
    r = verify_property(net, hard, 0.5, threads=1)
    assert r.verdict == "timeout" and r.seconds < 0.5 + 1.0


def test_an_exact_incumbent_that_fails_by_a_hair_is_polished_into_a_checked_point(monkeypatch):
    net = tiny_net()
    x0 = torch.tensor([[0.4, 0.6]], dtype=torch.float64)
    with torch.no_grad():
        y0 = float(net(x0)[0, 0])
    p = prop(([[1.0, 0]], [y0]))
    x0.requires_grad_(True)
    grad, = torch.autograd.grad(net(x0)[0, 0], x0)
    near = (x0 + 1e-7 * grad.sign()).detach()[0].numpy()   # just outside: f0 > y0 there

    def hair(self, model, region, A, b, time_limit=None):
        return PointSearch("unknown", -1e-7, near, 1e-7)
    monkeypatch.setattr(MILPBounder, "find_point", hair)
    r = verify_property(net, p, 5, stages=("exact",), threads=1)
    assert r.verdict == "sat" and r.stage == "milp" and r.cases[0].stage == ["milp"]
    assert_valid_counterexample(net, p, r)
    assert np.abs(r.counterexample.x - near).max() < 1e-2

"""Branch and bound (polytope_lab.bab): exact minima equal the MILP's and a dense grid's on small nets,
certify verdicts equal the MILP's, a time limit gives a sound bound with its status, find_point through
the pipeline."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

import polytope_lab as pl
from polytope_lab.vnnlib import Case, Disjunct

from conftest import (make_convnet, make_mlp, make_resnet, n_examples, pgd_extremes, pretrained_path, random_inputs,
                      real_mnist_dir)

NETS = {
    "mlp": lambda: (make_mlp([3, 10, 10, 3], seed=0), (3,)),
    "conv": lambda: (make_convnet((1, 4, 4), channels=(2, 2), n_out=3, seed=0), (1, 4, 4)),
    "resnet": lambda: make_resnet("mlp"),
}


def _bab(**options):
    return pl.Bounder.create("bab", attack_steps=20, **options)


def _probing_every_step(bounder):
    """``bounder`` with the LP probes run at every step (no stall needed): the probe path always taken."""
    bounder.settings = dataclasses.replace(bounder.settings, stall_steps=0)
    return bounder


@settings(max_examples=n_examples(4), deadline=None)
@given(kind=st.sampled_from(list(NETS)), seed=st.integers(0, 1000), clip=st.booleans(),
       tighten=st.sampled_from([0, 8, 30]), probe=st.booleans())
def test_bab_minima_equal_the_milp(kind, seed, clip, tighten, probe):
    model, shape = NETS[kind]()
    x = random_inputs(shape, batch=1, seed=seed)
    region = pl.LinfBall(x, 0.3, clip=(0.0, 1.0) if clip else None)
    n_out = model(x).shape[1]
    C = torch.randn(2, n_out, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    bab = _bab(split="relu", tighten_steps=tighten)
    b = (_probing_every_step(bab) if probe else bab).bound(model, region, C)
    m = pl.Bounder.create("milp", threads=1).bound(model, region, C)
    assert b.status == ["optimal"] and m.status == ["optimal"]
    torch.testing.assert_close(b.lower, m.lower, rtol=3e-5, atol=3e-5)
    torch.testing.assert_close(b.upper, m.upper, rtol=3e-5, atol=3e-5)
    lo, hi = pgd_extremes(model, region, C)                  # attained values: never passed
    assert (b.lower <= lo + 1e-9).all() and (b.upper >= hi - 1e-9).all()


def test_bab_equals_a_dense_grid_on_a_2d_net():
    """2 inputs: input bisection (split="auto") and ReLU splits both give the grid's minimum (the grid
    misses it by at most its Lipschitz slack)."""
    model = make_mlp([2, 12, 12, 2], seed=3)
    x = torch.tensor([[0.2, -0.1]], dtype=torch.float64)
    region = pl.LinfBall(x, 0.5)
    g = torch.linspace(-0.5, 0.5, 401, dtype=torch.float64)
    grid = torch.cartesian_prod(g, g) + x
    with torch.no_grad():
        values = model(grid)
    for split in ("auto", "relu"):
        b = _bab(split=split).bound(model, region)
        assert b.status == ["optimal"]
        assert (b.lower[0] <= values.min(0).values + 1e-9).all()
        assert (b.lower[0] >= values.min(0).values - 2e-2).all()
        assert (b.upper[0] >= values.max(0).values - 1e-9).all()


@pytest.mark.parametrize("probe", [False, True])
def test_certify_verdicts_equal_the_milp(probe):
    model, shape = NETS["mlp"]()
    x = random_inputs(shape, batch=6, seed=5)
    for eps in (0.05, 0.2):
        region = pl.LinfBall(x, eps)
        b = (_probing_every_step(_bab()) if probe else _bab()).certify(model, region)
        m = pl.Bounder.create("milp", threads=1).certify(model, region)
        assert b.status == m.status
        for i, s in enumerate(b.status):
            if s == "counterexample":       # the witness: in the region, misclassified on the network
                point = b.counterexample[i:i + 1]
                assert region.select([i]).contains(point).all()
                assert model(point).argmax(1).item() != b.y[i].item() or b.counterexample_margin[i] <= 0


@pytest.mark.parametrize("backend", ["bab", "milp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_counterexample_lies_in_the_asked_region_exactly(dtype, backend):
    """A float64 ball on a float32 net is searched in its (wider, outward-rounded) float32 cast; a float32
    ball's edge x ± eps is not always a float32 number. Every reported counterexample (BaB's and the
    MILP's) still lies in the ball asked for (its exact float64 box), with no tolerance, in the caller's
    dtype, and violates there."""
    model = make_mlp([6, 30, 30, 3], seed=4).float()
    x = random_inputs((6,), batch=4, seed=4).to(dtype)
    region = pl.LinfBall(x, 0.47)
    cert = (_bab() if backend == "bab" else pl.Bounder.create("milp", threads=1)).certify(model, region)
    found = [i for i, s in enumerate(cert.status) if s == "counterexample"]
    assert found, "the test needs counterexamples"
    assert cert.counterexample.dtype == dtype
    lo, hi = region.to(dtype=torch.float64).box()
    for i in found:
        point = cert.counterexample[i:i + 1].double()
        assert (point >= lo[i:i + 1]).all() and (point <= hi[i:i + 1]).all()
        assert cert.counterexample_margin[i] <= 0


def test_representable_point_rounds_towards_the_inside():
    """The edge x ± eps of a float32 ball is often not a float32 number: the nearest one can lie outside
    (a witness off by half an ulp); ``Box.representable_point`` takes the neighbour inside instead."""
    x = torch.linspace(0.01, 0.99, 97, dtype=torch.float32).reshape(1, -1)
    region = pl.LinfBall(x, 0.1).to(dtype=torch.float64)
    lo, hi = region.box()
    corners = torch.cat([lo, hi])
    assert (corners.to(torch.float32).double() > hi).any() or (corners.to(torch.float32).double() < lo).any()
    for corner in corners:
        y = region.representable_point(corner.reshape(1, -1), torch.float32)
        assert (y >= lo).all() and (y <= hi).all() and torch.equal(y, y.float().double())


def test_a_time_limit_gives_a_sound_bound_and_its_status():
    model = make_mlp([20, 60, 60, 5], seed=1)
    x = random_inputs((20,), batch=1, seed=2)
    region = pl.LinfBall(x, 0.5)
    b = _bab(time_limit=0.3, split="relu").bound(model, region)
    assert b.status == ["time_limit"]
    lo, hi = pgd_extremes(model, region)
    assert (b.lower <= lo + 1e-9).all() and (b.upper >= hi - 1e-9).all()
    d = pl.Bounder.create("dual").bound(model, region)
    assert (b.lower >= d.lower - 1e-9).all()



def test_the_time_limit_binds_on_a_conv_net_root():
    """The root stages (optimised bound, tightened intermediate bounds over every conv unit) stop at the
    time limit: a random MNIST ConvNet, whose tightening alone takes minutes, ends near a 1 s limit."""
    import time
    from polytope_lab import models
    torch.manual_seed(0)
    model = models.mnist_convnet()
    region = pl.LinfBall(torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(1)), 0.02, clip=(0, 1))
    start = time.perf_counter()
    c = _bab(time_limit=1.0).certify(model, region)
    assert c.status == ["time_limit"]
    assert time.perf_counter() - start < 30   # minutes without the budget checks; generous for a loaded CI


def test_find_point_through_the_pipeline():
    """A conjunction satisfiable row by row but not jointly is unsat; a reachable one is sat, with a
    counterexample that the pipeline re-checked on the float64 network."""
    model = make_mlp([2, 8, 2], seed=0)
    box = pl.Box(torch.full((1, 2), -1.0, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))
    m = pl.Bounder.create("milp", threads=1).bound(model, box)
    lo, hi = m.lower[0, 0].item(), m.upper[0, 0].item()
    c = (lo + hi) / 2
    case = lambda A, b: [Case(-torch.ones(2).double().numpy(), torch.ones(2).double().numpy(),  # noqa: E731
                              [Disjunct(torch.tensor(A).double().numpy(), torch.tensor(b).double().numpy())])]
    r = pl.verify_property(model, case([[1.0, 0], [-1.0, 0]], [c, -(c + 1e-3)]), 10, stages=("exact",), exact="bab")
    assert r.verdict == "unsat" and r.stage == "bab"
    r = pl.verify_property(model, case([[1.0, 0]], [lo + 1e-4]), 10, stages=("exact",), exact="bab")
    assert r.verdict == "sat" and r.stage == "bab"
    with torch.no_grad():
        assert model(torch.from_numpy(r.counterexample.x).reshape(1, 2))[0, 0] <= lo + 1e-4


@pytest.mark.parametrize("option", [{"branching": "x"}, {"split": "y"}, {"batch": 1}, {"time_limit": 0},
                                    {"tighten_steps": -1}, {"lp_probes": -1}])
def test_bad_options_are_value_errors(option):
    with pytest.raises(ValueError):
        pl.Bounder.create("bab", **option)


def test_find_points_shares_one_search_and_equals_the_milp(monkeypatch):
    """Several disjuncts (different row counts) over one box: one search (one root), and per disjunct the
    MILP's answer; through verify_property a multi-disjunct property costs one search per case."""
    from polytope_lab.bab import bounder as bab_bounder
    model = make_mlp([2, 8, 8, 2], seed=1)
    box = pl.Box(torch.full((1, 2), -1.0, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))
    m = pl.Bounder.create("milp", threads=1).bound(model, box)
    lo, hi = m.lower[0, 0].item(), m.upper[0, 0].item()
    c = (lo + hi) / 2
    disjuncts = [(torch.tensor([[1.0, 0], [-1.0, 0]]).double(), torch.tensor([c, -(c + 1e-3)]).double()),  # unsat
                 (torch.tensor([[1.0, 0]]).double(), torch.tensor([lo - 1e-3]).double()),              # unsat
                 (torch.tensor([[1.0, 0]]).double(), torch.tensor([lo + 1e-2]).double())]              # sat
    searches = []
    real = bab_bounder.Search

    def counting(*a, **k):
        searches.append(1)
        return real(*a, **k)

    monkeypatch.setattr(bab_bounder, "Search", counting)
    bab = _bab(split="relu")
    joint = bab.find_points(model, box, disjuncts[:2])
    assert len(searches) == 1 and [p.status for p in joint] == ["refuted", "refuted"]
    milp = pl.Bounder.create("milp", threads=1)
    for (A, b), p in zip(disjuncts[:2], joint):
        assert milp.find_point(model, box, A, b).status == "refuted"
        assert p.bound > 0
    found = bab.find_points(model, box, disjuncts)
    assert found[2].status == "found" and found[2].value <= 0
    with torch.no_grad():
        f = model(torch.from_numpy(found[2].point).reshape(1, 2))[0]
    assert float((disjuncts[2][0] @ f
                  - disjuncts[2][1]).max()) <= 1e-5
    assert all(p.status in ("refuted", "unknown") for p in found[:2])
    searches.clear()
    case = Case(-torch.ones(2).double().numpy(), torch.ones(2).double().numpy(),
                [Disjunct(A.numpy(), b.numpy()) for A, b in disjuncts[:2]])
    r = pl.verify_property(model, [case], 10, stages=("exact",), exact="bab")
    assert r.verdict == "unsat" and r.stage == "bab" and len(searches) == 1


def test_pretrained_convnet_first_20_images_same_verdicts_as_the_milp():
    """The paper's pretrained MNIST ConvNet at ε = 0.1 ∩ [0, 1], first 20 test images (needs the real data):
    bab's certify reaches the MILP's verdict on every image (both decide all 20)."""
    from polytope_lab import data, models
    X, y = data.mnist("test", root=real_mnist_dir().parent, download=False)
    model = models.load_state(models.mnist_convnet(), pretrained_path())
    region = pl.LinfBall(X[:20], 0.1, clip=(0, 1))
    milp = pl.Bounder.create("milp", threads=1).certify(model, region, y[:20])
    bab = pl.Bounder.create("bab", time_limit=60).certify(model, region, y[:20])
    assert set(milp.status) <= {"certified", "counterexample"}
    assert bab.status == milp.status


def test_lp_probes_unblock_a_stalled_search_on_the_pretrained_convnet():
    """Test image 3384 at ε = 0.1 ∩ [0, 1] (needs the real data): its lowest bound stalls at −0.011 over
    split patterns that the dual's few β steps cannot expose as infeasible (still open after 60 s without
    the probes); the LP probes prune them and find a counterexample, in the region and misclassified."""
    from polytope_lab import data, models
    X, y = data.mnist("test", root=real_mnist_dir().parent, download=False)
    model = models.load_state(models.mnist_convnet(), pretrained_path())
    region = pl.LinfBall(X[3384:3385], 0.1, clip=(0, 1))
    c = pl.Bounder.create("bab", time_limit=600).certify(model, region, y[3384:3385])
    assert c.status == ["counterexample"]
    point = c.counterexample
    assert region.contains(point).all()
    with torch.no_grad():
        logits = model.double()(point.double())[0]
    label = int(y[3384])
    assert float(logits[label] - torch.cat([logits[:label], logits[label + 1:]]).max()) <= 0


def test_the_local_attack_starts_only_from_subdomains_left_open(monkeypatch):
    """A root the new bound closes starts no local PGD (it cannot hold a counterexample); an open one does,
    from its relaxation minimiser."""
    from polytope_lab.bab import search as bab_search
    from polytope_lab.solvers import Budget
    from polytope_lab.convert import as_network
    model = make_mlp([3, 10, 10, 3], seed=2).double()
    net, region = as_network(model, (3,)), pl.LinfBall(torch.zeros(1, 3, dtype=torch.float64), 0.5)
    C = torch.tensor([[[1.0, -1.0, 0.0]], [[1.0, 0.0, -1.0]]], dtype=torch.float64)
    low = pl.Bounder.create("dual").bound(model, region, C[:, 0][None]).lower[0]
    exact = pl.Bounder.create("milp", threads=1).bound(model, region, C[:, 0][None]).lower[0]
    assert float(exact[1] - low[1]) > 2e-3                   # the dual is loose on row 1: its root stays open
    offset = torch.stack([low[0] - 1.0, exact[1] - 1e-3]).reshape(2, 1)   # row 0 closes at its root
    calls = []
    real = bab_search.attack

    def recording(net_, lo, hi, C_, offset_, steps, restarts=4, seed=0, **kw):
        calls.append(C_.clone())
        return real(net_, lo, hi, C_, offset_, steps, restarts, seed, **kw)

    monkeypatch.setattr(bab_search, "attack", recording)
    search = bab_search.Search(net, region, C, offset, True, bab_search.Settings(), Budget(None))
    roots = [bab_search.Node(p, -float("inf"), signs=torch.zeros(sum(search.sizes), dtype=torch.int8)) for p in range(2)]
    search.bound(roots, 0)
    assert len(calls) == 1 and torch.equal(calls[0], C[1:])
    assert [node.p for _, _, node in search.heap] == [1] and not search.found
    calls.clear()
    search.bound([bab_search.Node(0, -float("inf"), signs=torch.zeros(sum(search.sizes), dtype=torch.int8))], 0)
    assert calls == []


def test_a_probe_cut_short_by_the_time_limit_keeps_every_subdomain():
    """Probes past the deadline leave their subdomains open, untouched: the minimum over the open ones, the
    time-limit bound, does not rise; probes in time only raise bounds the MILP confirms."""
    from polytope_lab.bab import search as bab_search
    from polytope_lab.convert import as_network
    from polytope_lab.solvers import Budget
    model = make_mlp([3, 12, 12, 2], seed=4).double()
    net, region = as_network(model, (3,)), pl.LinfBall(torch.zeros(1, 3, dtype=torch.float64), 0.6)
    C = torch.tensor([[[1.0, -1.0]]], dtype=torch.float64)
    search = bab_search.Search(net, region, C, torch.zeros(1, 1, dtype=torch.float64), False,
                               bab_search.Settings(attack_steps=0), Budget(None))
    search.bound([bab_search.Node(0, -float("inf"), signs=torch.zeros(sum(search.sizes), dtype=torch.int8))], 0)
    search.step()
    held, lower = len(search.heap), search.lower().clone()
    assert held > 1
    search.budget = Budget(0.0)
    search.probe()
    assert len(search.heap) == held and torch.equal(search.lower(), lower)
    search.budget = Budget(None)
    search.probe()
    exact = pl.Bounder.create("milp", threads=1).bound(model, region, C[:, 0][None]).lower[0, 0]
    assert lower[0] <= search.lower()[0] <= exact + 1e-6

"""Verification (polytope_lab.verify and the certify methods): MILP verdicts against the exact margin,
the time limit per example, the minimum adversarial distance (eq. 6) and the certified radius of any
bounder.

Tolerances: the exact margin comes from one MILP solve (HiGHS's MIP feasibility tolerance ``TOL``).
"""
from __future__ import annotations

import math

import pytest
import torch

import polytope_lab as pl
from polytope_lab import verify
from polytope_lab.relaxation import SOLVER_TOLERANCE

from conftest import make_convnet, make_mlp, output_of, random_inputs

TOL = SOLVER_TOLERANCE["mip_feasibility"]


def _milp(**options):
    options.setdefault("threads", 1)
    return pl.Bounder.create("milp", **options)


# --------------------------------------------------------------------------------------------------
# robustness verdicts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver,trust_dual", [("HIGHS", True), ("HIGHS", False), ("CBC", False)])
def test_certify_matches_the_exact_margin(solver, trust_dual):
    model = make_mlp([4, 10, 10, 3], seed=20)
    x = random_inputs((4,), batch=8, seed=21)
    y = output_of(model, x).argmax(1)
    y[0] = (y[0] + 1) % 3  # one misclassified centre
    region = pl.LinfBall(x, torch.linspace(0.01, 0.2, 8, dtype=torch.float64), clip=(0.0, 1.0))
    C = pl.margin_matrix(y, 3)
    exact = _milp().bound(model, region, C).lower.min(1).values
    cert = _milp(solver=solver).certify(model, region, y, trust_dual=trust_dual)
    assert cert.status[0] == "counterexample"
    assert set(cert.status) <= {"certified", "counterexample"}
    for i, s in enumerate(cert.status):
        assert (s == "certified") == bool(exact[i] > 0), (i, s, exact[i])
        if s == "counterexample":
            w = cert.counterexample[i:i + 1]
            assert region.select([i]).contains(w, tol=1e-9).all()
            f = output_of(model, w)[0]
            margin = (f[y[i]] - torch.cat([f[:y[i]], f[y[i] + 1:]]).max()).item()
            assert margin <= 0 and math.isclose(margin, cert.counterexample_margin[i].item(), abs_tol=1e-9)
        else:
            assert cert.margin[i] > 0 and cert.margin[i] <= exact[i] + TOL
    assert cert.certified.any() and len(cert.seconds) == 8


# --------------------------------------------------------------------------------------------------
# minimum adversarial distance (eq. 6) and the dual's certified radius
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [None, (0.0, 1.0)])
def test_minimum_adversarial_distance(clip):
    model = make_mlp([4, 8, 8, 3], seed=22)
    x = random_inputs((4,), batch=3, seed=23)
    y = output_of(model, x).argmax(1)
    eps_max = 1.0
    results = pl.minimum_adversarial_distance(model, x, y, eps_max=eps_max, clip=clip, threads=1)
    radii = pl.certified_radius(model, x, y, eps_max=eps_max, clip=clip, tol=1e-4)
    assert len(results) == len(radii) == 3
    milp = _milp()
    for i, (res, r_dual) in enumerate(zip(results, radii)):
        assert res.status == "optimal" and res.exact, res
        r = res.radius
        assert 0 < r < eps_max
        assert r >= r_dual - 1e-9, "the dual's certified radius is sound, so at most the exact one"
        assert res.lower <= r + 1e-9 and res.upper >= r - 1e-9 and res.upper - res.lower < 1e-5
        # the witness: at distance r (inside the clip box), and class y no longer strictly wins
        w = res.witness.unsqueeze(0)
        assert (w - x[i]).abs().max() <= r + 1e-9
        if clip is not None:
            assert (w >= clip[0]).all() and (w <= clip[1]).all()
        f = output_of(model, w)[0]
        assert f[res.witness_class] >= f[y[i]] - 1e-5 and res.witness_class != y[i]
        # just above r a counterexample exists (verified by running the network), just below none does
        above = milp.certify(model, pl.LinfBall(x[i:i + 1], r + 1e-3, clip=clip), y[i:i + 1])
        assert above.status == ["counterexample"]
        assert output_of(model, above.counterexample)[0].argmax() != y[i]
        below = milp.certify(model, pl.LinfBall(x[i:i + 1], r - 1e-3, clip=clip), y[i:i + 1])
        assert below.status == ["certified"]
        # the dual certifies at its radius, and not much beyond
        dual = pl.Bounder.create("dual")
        C = pl.margin_matrix(y[i:i + 1], 3)
        assert dual.bound(model, pl.LinfBall(x[i:i + 1], r_dual, clip=clip), C).certified.all()
        if r_dual + 3e-4 < eps_max:
            assert not dual.bound(model, pl.LinfBall(x[i:i + 1], r_dual + 3e-4, clip=clip), C).certified.any()


def test_minimum_adversarial_distance_edge_cases():
    model = make_mlp([4, 8, 8, 3], seed=22)
    x = random_inputs((4,), batch=2, seed=23)
    y = output_of(model, x).argmax(1)
    # beyond a small eps_max: reported as "≥ eps_max"
    small = pl.minimum_adversarial_distance(model, x, y, eps_max=1e-3, threads=1)
    assert all(r.status == "beyond_eps_max" and r.radius == r.lower == 1e-3 for r in small)
    # a misclassified centre is at distance 0, and so is its certified radius
    wrong = (y + 1) % 3
    zero = pl.minimum_adversarial_distance(model, x, wrong, eps_max=0.5, threads=1)
    assert all(r.radius == 0.0 and r.status == "optimal" for r in zero)
    assert pl.certified_radius(model, x, wrong, eps_max=0.5) == [0.0, 0.0]
    with pytest.raises(ValueError):
        pl.minimum_adversarial_distance(model, x, y, eps_max=0.0)


# --------------------------------------------------------------------------------------------------
# the pretrained MNIST ConvNet
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pretrained_mnist_images_settled(mnist_test, pretrained_model):
    """ε = 0.1 ∩ [0, 1], test images 0, 1, 2, 8 and 18: every one certified or given a verified
    counterexample, the MILP checking every margin row itself (``trust_dual=False``), agreeing with the
    dual where it certifies. Images 8 and 18 are two of the 4 among the first 100 that the exact MILP
    refutes (benchmark part e, HiGHS and CBC alike); the others are certified."""
    X, y = mnist_test
    images = [0, 1, 2, 8, 18]
    X, y = X[images], y[images]
    region = pl.LinfBall(X, 0.1, clip=(0.0, 1.0))
    cert = pl.Bounder.create("milp").certify(pretrained_model, region, y, trust_dual=False)
    assert cert.status == ["certified"] * 3 + ["counterexample"] * 2, cert.status
    dual = pl.Bounder.create("dual").bound(pretrained_model, region, pl.margin_matrix(y, 10))
    assert cert.certified[dual.certified].all()
    for i in torch.nonzero(cert.refuted).flatten().tolist():
        w = cert.counterexample[i:i + 1]
        assert region.select([i]).contains(w).all()
        with torch.no_grad():
            f = pretrained_model(w)[0]
        others = torch.cat([f[:y[i]], f[y[i] + 1:]])
        assert others.max() >= f[y[i]]


def test_certify_without_labels_certifies_the_prediction():
    model = make_mlp([4, 10, 10, 3], seed=20)
    x = random_inputs((4,), batch=3, seed=21)
    region = pl.LinfBall(x, 0.02, clip=(0.0, 1.0))
    cert = _milp().certify(model, region)
    assert torch.equal(cert.y, output_of(model, x).argmax(1))
    assert isinstance(cert, pl.Certification) and cert.method == "milp"
    labelled = _milp().certify(model, region, cert.y)
    assert cert.status == labelled.status
    assert verify.certify(model, region, method="milp", threads=1).status == cert.status


def test_certify_time_limit_is_per_example_and_a_verdict():
    """A budget far below what the MILP needs: the verdict is "time_limit", never an exception, the
    margin the intermediate bounder's (sound), and each example stops near its budget (all its rows
    together, not per solve). With time to spare the same examples are decided."""
    model = make_convnet((1, 6, 6), channels=(3, 4), n_out=3, seed=0)
    x = random_inputs((1, 6, 6), batch=2, seed=1)
    region = pl.LinfBall(x, 0.1)
    y = output_of(model, x).argmax(1)
    cert = _milp(time_limit=1e-4, heuristic_steps=0).certify(model, region, y, trust_dual=False)
    assert cert.status == ["time_limit"] * 2
    assert all(s < 0.5 for s in cert.seconds), cert.seconds
    dual = pl.Bounder.create("dual").bound(model, region, pl.margin_matrix(y, 3))
    torch.testing.assert_close(cert.margin, dual.lower.min(1).values)
    decided = _milp(time_limit=60).certify(model, region, y, trust_dual=False)
    assert set(decided.status) <= {"certified", "counterexample"}
    bounds = _milp(time_limit=1e-4, heuristic_steps=0).bound(model, region, torch.randn(6, 3, dtype=torch.float64))
    assert bounds.status == ["time_limit"] * 2 and all(s < 0.5 for s in bounds.example_seconds)


def test_a_witness_outside_the_region_is_an_error_verdict(monkeypatch):
    from polytope_lab import solvers

    model = make_mlp([3, 6, 2], seed=16)
    x = random_inputs((3,), batch=1, seed=17)
    real = solvers.HighsAdapter.solve

    def corrupt(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if out.x is not None:
            out.x = out.x + 1.0
        return out

    monkeypatch.setattr(solvers.HighsAdapter, "solve", corrupt)
    cert = _milp(heuristic_steps=0).certify(model, pl.LinfBall(x, 0.5), trust_dual=False)
    assert cert.status == ["error: witness outside the region"]
    assert torch.isnan(cert.counterexample).all()


def test_certified_radius_works_with_any_bounder():
    """Bisection on any bounder's verdicts: interval ≤ dual ≤ MILP (exact) radius, each certified at its
    radius; the MILP's agrees with the exact minimum distance."""
    model = make_mlp([4, 8, 8, 3], seed=22)
    x = random_inputs((4,), batch=2, seed=23)
    y = output_of(model, x).argmax(1)
    radii = {name: verify.certified_radius(model, x, y, eps_max=3.0, tol=1e-3, bounder=b)
             for name, b in (("interval", "interval"), ("dual", "dual"), ("milp", _milp()))}
    exact = verify.minimum_adversarial_distance(model, x, y, eps_max=3.0, threads=1)
    for i in range(2):
        assert radii["interval"][i] <= radii["dual"][i] + 1e-9 <= radii["milp"][i] + 2e-9
        assert exact[i].exact and radii["milp"][i] <= exact[i].radius + 1e-9
        assert exact[i].radius - radii["milp"][i] <= 2e-3
    l2 = verify.certified_radius(model, x, y, eps_max=3.0, tol=1e-3, norm="l2")
    assert all(r > 0 for r in l2)
    with pytest.raises(ValueError):
        verify.certified_radius(model, x, y, norm="l1")


def test_certify_needs_a_bound_clear_of_the_solver_tolerance(monkeypatch):
    """A margin row certified by the MILP needs a proven bound > decide_margin (DECIDE = 1e-5 · max(1, scale)):
    an "optimal" or "stopped" bound within the solver's tolerance of 0 leaves the example undecided."""
    from polytope_lab import solvers
    from polytope_lab.milp import MILPBounder
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()
    x = torch.rand(1, 2, dtype=torch.float64)
    y = net(x).argmax(1)
    region = pl.LinfBall(x, 0.5)
    for outcome in (solvers.Outcome("optimal", bound=0.5e-6), solvers.Outcome("stopped", bound=5e-6)):
        monkeypatch.setattr(solvers.HighsAdapter, "solve", lambda self, *a, _o=outcome, **k: _o)
        cert = MILPBounder(threads=1, heuristic_steps=0).certify(net, region, y, trust_dual=False)
        assert cert.status != ["certified"], (outcome, cert.status)
    monkeypatch.setattr(solvers.HighsAdapter, "solve", lambda self, *a, **k: solvers.Outcome("optimal", bound=1e-3))
    assert MILPBounder(threads=1, heuristic_steps=0).certify(net, region, y, trust_dual=False).status == ["certified"]

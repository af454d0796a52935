"""polytope_lab.checks: the tolerance rule, "same bounds", and cross_check (every backend and an attack on
one problem, with a sandwich verdict)."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

import polytope_lab as pl
from conftest import make_mlp, random_inputs
from polytope_lab import checks


def test_slack_is_relative_to_max_one_abs_reference():
    assert checks.slack(0.0, 1e-5) == 1e-5 and checks.slack(-0.5, 1e-5) == 1e-5
    assert checks.slack(-200.0, 1e-5) == pytest.approx(2e-3)
    ref = [0.1, -3.0, 50.0]
    expected = [1e-5, 3e-5, 5e-4]
    torch.testing.assert_close(checks.slack(torch.tensor(ref, dtype=torch.float64), 1e-5),
                               torch.tensor(expected, dtype=torch.float64))
    np.testing.assert_allclose(checks.slack(np.array(ref), 1e-5), expected)
    np.testing.assert_allclose(checks.slack(pd.Series(ref), 1e-5).to_numpy(), expected)


def test_above_below_and_containment():
    assert checks.above(1.0 + 5e-6, 1.0, 1e-5) < 0 < checks.above(1.0 + 2e-5, 1.0, 1e-5)
    assert checks.below(100.0 - 5e-4, 100.0, 1e-5) < 0 < checks.below(100.0 - 2e-3, 100.0, 1e-5)
    assert checks.containment_gap(-1.0, 1.0, -0.5, 0.5, 1e-5) < 0
    assert checks.containment_gap(0.0, 1.0, -0.5, 0.5, 1e-5) == pytest.approx(0.5 - 1e-5)
    assert checks.containment_gap(math.nan, 1.0, -0.5, 0.5, 1e-5) < 0          # a side not computed
    assert checks.containment_gap(math.nan, math.nan, 0.0, 0.0, 1e-5) == -math.inf


def test_same_bounds_per_dtype():
    assert checks.same_tolerance(torch.float64) == 1e-6 and checks.same_tolerance(torch.float32) == 1e-5
    a = torch.tensor([0.0, 10.0, -math.inf], dtype=torch.float64)
    assert checks.same_bounds(a, a + torch.tensor([5e-7, 5e-6, 0.0], dtype=torch.float64))
    assert not checks.same_bounds(a, a + torch.tensor([2e-6, 0.0, 0.0], dtype=torch.float64))
    assert checks.same_bounds(a.float(), (a + 5e-6).float())                # float32: 1e-5
    assert not checks.same_bounds(a, torch.tensor([0.0, 10.0, math.inf], dtype=torch.float64))
    assert not checks.same_bounds(a, a[:2])


def test_cross_check_rows_and_verdicts():
    net = make_mlp([3, 8, 8, 2], seed=0)
    region = pl.LinfBall(random_inputs((3,), batch=2), 0.1)
    df = pl.cross_check(net, region, exclude=("lp", "milp"))
    methods = set(df["method"])
    assert {"interval", "dual", "dual-optimized", "pgd attack"} <= methods
    assert len(df) == len(methods) * 2 * 2
    assert (df.loc[df["method"] != "pgd attack", "verdict"] == "ok").all()
    attack = df[df["method"] == "pgd attack"].set_index(["example", "row"])
    for label in ("interval", "dual", "dual-optimized"):
        rows = df[df["method"] == label].set_index(["example", "row"])
        assert (rows["lower"] <= attack["lower"] + 1e-9).all()
        assert (rows["upper"] >= attack["upper"] - 1e-9).all()


def test_cross_check_flags_an_unsound_bounder():
    class Broken(pl.Bounder):
        """Claims the interval's bounds shifted inward: must be caught by the attack."""
        name = "broken-for-test"

        def _bound(self, network, region, C):
            b = pl.Bounder.create("interval")._bound(network, region, C)
            mid = (b.lower + b.upper) / 2
            return pl.Bounds(mid, mid, b.intermediate, b.status)

    try:
        pl.checks.CROSS_CHECK_METHODS["broken"] = ("broken-for-test", {})
        net = make_mlp([3, 8, 2], seed=1)
        df = pl.cross_check(net, pl.LinfBall(random_inputs((3,), batch=1), 0.3), methods=["broken", "dual"])
        verdict = df.loc[df["method"] == "broken", "verdict"]
        assert (verdict != "ok").all() and verdict.str.contains("attack").all()
        assert (df.loc[df["method"] == "dual", "verdict"] == "ok").all()
    finally:
        pl.checks.CROSS_CHECK_METHODS.pop("broken", None)
        pl.Bounder.registry.pop("broken-for-test", None)


def test_cross_check_rejects_unknown_methods():
    net = make_mlp([3, 4, 2])
    with pytest.raises(ValueError, match="unknown cross_check method"):
        pl.cross_check(net, pl.LinfBall(torch.zeros(1, 3, dtype=torch.float64), 0.1), methods=["nope"])


def test_cross_check_has_a_bab_row_equal_to_the_milp():
    net = make_mlp([3, 6, 6, 2], seed=2)
    region = pl.LinfBall(random_inputs((3,), batch=1, seed=3), 0.3)
    df = pl.cross_check(net, region, methods=["dual", "lp", "milp", "bab"], attack_steps=20)
    assert {"bab", "milp"} <= set(df["method"])
    assert (df.loc[df["method"] != "pgd attack", "verdict"] == "ok").all(), df
    exact = df[df["method"].isin(["milp", "bab"])]
    assert (exact["status"] == "optimal").all()
    milp, bab = (df[df["method"] == k].set_index(["example", "row"]) for k in ("milp", "bab"))
    np.testing.assert_allclose(bab[["lower", "upper"]], milp[["lower", "upper"]], atol=1e-4)


def test_cross_check_flags_a_bab_that_disagrees_with_the_milp():
    """An "optimal" exact backend off the MILP by more than the tolerance is named in the verdict."""
    class Shifted(pl.Bounder):
        name = "shifted-exact-for-test"

        def _bound(self, network, region, C):
            b = pl.Bounder.create("milp", threads=1)._bound(network, region, C)
            return pl.Bounds(b.lower - 0.01, b.upper + 0.01, b.intermediate, b.status)   # sound, not exact

    saved = pl.checks.CROSS_CHECK_METHODS["bab"]
    try:
        pl.checks.CROSS_CHECK_METHODS["bab"] = ("shifted-exact-for-test", {})
        net = make_mlp([3, 8, 2], seed=1)
        df = pl.cross_check(net, pl.LinfBall(random_inputs((3,), batch=1), 0.1), methods=["milp", "bab"])
        for label in ("milp", "bab"):
            verdict = df.loc[df["method"] == label, "verdict"]
            assert verdict.str.contains("both optimal").all(), verdict
    finally:
        pl.checks.CROSS_CHECK_METHODS["bab"] = saved
        pl.Bounder.registry.pop("shifted-exact-for-test", None)


@pytest.mark.parametrize("seed", [0, 1])
def test_looseness_parts_are_nonnegative_and_sum_to_the_gap(seed):
    """dual → LP (α) → LP-ALL (intermediate bounds) → exact (relaxation): each part ≥ −tol, sum = gap;
    the exact value from bab and from the MILP agree."""
    net = make_mlp([3, 8, 8, 2], seed=seed)
    region = pl.LinfBall(random_inputs((3,), batch=1, seed=seed + 5), 0.6)
    C = torch.tensor([[1.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    tab = checks.looseness(net, region, C, exact="bab")
    assert len(tab) == 2 * 2 and (tab["exact_status"] == "optimal").all()
    parts = tab[["alpha", "intermediate", "relaxation"]]
    tol = checks.slack(tab["exact"], 1e-5)
    assert (parts.ge(-tol, axis=0)).all().all(), tab
    np.testing.assert_allclose(parts.sum(axis=1), tab["gap"], atol=1e-9)
    assert (parts > 1e-4).all().all()    # at ε = 0.6 every step tightens: the decomposition is not vacuous
    milp = checks.looseness(net, region, C, exact="milp", exact_options={"threads": 1})
    np.testing.assert_allclose(milp["exact"], tab["exact"], atol=1e-4)
    lower = tab[tab["side"] == "lower"]
    np.testing.assert_allclose(lower["dual"], pl.Bounder.create("dual", alpha="fixed").bound(net, region, C)
                               .lower.reshape(-1).numpy(), rtol=1e-9)


def test_cross_check_reports_looseness_on_request():
    net = make_mlp([3, 8, 2], seed=4)
    region = pl.LinfBall(random_inputs((3,), batch=1), 0.2)
    df = pl.cross_check(net, region, methods=["dual", "milp"], looseness=True)
    tab = df.attrs["looseness"]
    assert set(tab["side"]) == {"lower", "upper"} and len(tab) == 2 * 2
    np.testing.assert_allclose(tab[["alpha", "intermediate", "relaxation"]].sum(axis=1), tab["gap"], atol=1e-9)
    with pytest.raises(ValueError, match="exact must be"):
        checks.looseness(net, region, exact="grid")

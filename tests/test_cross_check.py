"""cross_check: every backend and an attack on one problem, with a sandwich verdict."""
import pytest
import torch

import polytope_lab as pl
from conftest import make_mlp, random_inputs


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
        pl.bounds.CROSS_CHECK_METHODS["broken"] = ("broken-for-test", {})
        net = make_mlp([3, 8, 2], seed=1)
        df = pl.cross_check(net, pl.LinfBall(random_inputs((3,), batch=1), 0.3), methods=["broken", "dual"])
        verdict = df.loc[df["method"] == "broken", "verdict"]
        assert (verdict != "ok").all() and verdict.str.contains("attack").all()
        assert (df.loc[df["method"] == "dual", "verdict"] == "ok").all()
    finally:
        pl.bounds.CROSS_CHECK_METHODS.pop("broken", None)
        pl.Bounder.registry.pop("broken-for-test", None)


def test_cross_check_rejects_unknown_methods():
    net = make_mlp([3, 4, 2])
    with pytest.raises(ValueError, match="unknown cross_check method"):
        pl.cross_check(net, pl.LinfBall(torch.zeros(1, 3, dtype=torch.float64), 0.1), methods=["nope"])

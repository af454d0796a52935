"""polytope_lab.evaluation: batched clean / attack / certified error flags and the resumable certify loop."""
import math

import pytest
import torch

import polytope_lab as pl
from conftest import make_mlp
from polytope_lab import evaluation
from polytope_lab.store import ResultStore


@pytest.fixture(scope="module")
def problem():
    net = make_mlp([4, 16, 16, 3], seed=0)
    X = torch.rand(7, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        y = net(X).argmax(1)
    y[0] = (y[0] + 1) % 3                                            # one misclassified example
    return net, X, y


def test_batches_cover_in_order():
    assert evaluation.batches(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert evaluation.batches(5, None) == [slice(0, 5)] and evaluation.batches(0, 3) == []
    with pytest.raises(ValueError):
        evaluation.batches(3, 0)


def test_error_flags_are_ordered_and_batch_independent(problem):
    net, X, y = problem
    eps = 0.05
    clean = evaluation.clean_errors(net, X, y, batch_size=3)
    assert clean.dtype == torch.bool and clean.shape == (7,) and bool(clean[0])
    fgsm = evaluation.attack_errors(net, X, y, eps, "fgsm", batch_size=3)
    pgd = evaluation.attack_errors(net, X, y, eps, "pgd", steps=20, random_start=False)
    bound = evaluation.robust_errors(net, X, y, eps, batch_size=2)
    assert not (clean & ~fgsm).any() and not (clean & ~pgd).any()          # the image lies in the ball
    assert not (pgd & ~bound).any() and not (fgsm & ~bound).any()          # sound: an attacked image is open
    assert torch.equal(bound, evaluation.robust_errors(net, X, y, eps, bounder=pl.Bounder.create("dual")))
    interval = evaluation.robust_errors(net, X, y, eps, bounder="interval", n_classes=3)
    assert not (bound & ~interval).any()
    with pytest.raises(ValueError, match="attack"):
        evaluation.attack_errors(net, X, y, eps, "cw")


def test_robust_errors_match_the_bound(problem):
    net, X, y = problem
    b = pl.Bounder.create("dual").bound(net, pl.LinfBall(X, 0.1, clip=(0, 1)), pl.margin_matrix(y, 3))
    assert torch.equal(evaluation.robust_errors(net, X, y, 0.1, clip=(0, 1), batch_size=4), ~b.certified)


class FakeCertifier:
    """Stands in for a bounder with ``certify``: certified iff the label is 0; counts its calls."""

    def __init__(self):
        self.calls = 0

    def certify(self, model, region, y):
        self.calls += 1
        ok = int(y[0]) == 0
        return type("C", (), {
            "status": ["certified" if ok else "counterexample"],
            "margin": torch.tensor([0.5 if ok else -math.inf]),
            "counterexample_margin": torch.tensor([math.nan if ok else -0.2])})()


def test_certify_each_stores_and_resumes(problem, tmp_path):
    net, X, _ = problem
    y = torch.tensor([0, 1, 0, 2, 0, 1, 0])
    fake = FakeCertifier()
    with ResultStore(tmp_path / "r.sqlite", "milp") as store:
        records = evaluation.certify_each(fake, net, X, y, 0.1, store=store, prefix=("net", "k"),
                                          known={3: {"by": "pgd"}})
    assert fake.calls == 6 and [r["image"] for r in records] == list(range(7))
    assert [r["status"] for r in records] == ["certified", "counterexample"] * 3 + ["certified"]
    known = records[3]
    assert (known["label"], known["status"], known["seconds"], known["by"]) == (2, "counterexample", 0.0, "pgd")
    assert math.isnan(known["margin"]) and math.isnan(known["counterexample_margin"])
    assert records[1]["counterexample_margin"] == pytest.approx(-0.2) and records[0]["margin"] == 0.5
    again = FakeCertifier()
    with ResultStore(tmp_path / "r.sqlite", "milp") as store:
        resumed = evaluation.certify_each(again, net, X, y, 0.1, store=store, prefix=("net", "k"))
        assert len(store) == 7 and ("net", "k", 6) in store
    assert again.calls == 0 and [r["status"] for r in resumed] == [r["status"] for r in records]

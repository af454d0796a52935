"""FGSM / PGD: they stay in the region, raise the loss, and never beat a sound bound."""
import pytest
import torch
import torch.nn.functional as F

import polytope_lab as pl
from conftest import make_convnet, make_mlp, random_inputs


@pytest.fixture
def mlp():
    return make_mlp([6, 16, 16, 4], seed=3)


def _labels(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


@pytest.mark.parametrize("clip", [None, (0.0, 1.0)])
@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_linf_attacks_stay_in_the_region_and_raise_the_loss(mlp, attack, clip):
    x = random_inputs((6,), batch=8, seed=2)
    y = _labels(mlp, x)
    eps = 0.3
    if attack == "fgsm":
        x_adv, success = pl.fgsm(mlp, x, y, eps, clip=clip)
    else:
        x_adv, success = pl.pgd(mlp, x, y, eps, steps=30, clip=clip, seed=0)
    region = pl.LinfBall(x, eps, clip=clip)
    assert region.contains(x_adv, tol=1e-12).all()
    assert (x_adv - x).abs().max() <= eps + 1e-12
    with torch.no_grad():
        before = F.cross_entropy(mlp(x), y, reduction="none")
        after = F.cross_entropy(mlp(x_adv), y, reduction="none")
        assert (after >= before - 1e-9).all() and (after > before).any()
        assert torch.equal(success, mlp(x_adv).argmax(1) != y)


def test_l2_pgd_stays_in_the_ball(mlp):
    x = random_inputs((6,), batch=5, seed=4)
    y = _labels(mlp, x)
    x_adv, _ = pl.pgd(mlp, x, y, 0.5, steps=20, norm="l2", seed=1)
    assert ((x_adv - x).norm(dim=1) <= 0.5 + 1e-9).all()


def test_targeted_pgd_moves_towards_the_target(mlp):
    x = random_inputs((6,), batch=6, seed=5)
    y = _labels(mlp, x)
    target = (y + 1) % 4
    x_adv, success = pl.pgd(mlp, x, y, 1.0, steps=60, targeted=target, seed=0)
    with torch.no_grad():
        before = F.cross_entropy(mlp(x), target, reduction="none")
        after = F.cross_entropy(mlp(x_adv), target, reduction="none")
    assert (after <= before + 1e-9).all() and (after < before).any()
    assert torch.equal(success, mlp(x_adv).argmax(1) == target)


def test_pgd_finds_counterexamples_on_a_nonrobust_net():
    net = make_mlp([2, 32, 32, 2], seed=0)
    x = random_inputs((2,), batch=20, seed=0)
    y = _labels(net, x)
    _, success = pl.pgd(net, x, y, 0.5, steps=40, seed=0)
    assert success.any()


def test_attack_never_beats_the_dual_bound_on_a_convnet():
    net = make_convnet(seed=1)
    x = random_inputs((1, 6, 6), batch=4, seed=3)
    region = pl.LinfBall(x, 0.1, clip=(0.0, 1.0))
    C = torch.randn(3, 3, dtype=x.dtype)
    b = pl.Bounder.create("dual").bound(net, region, C)
    low, points = pl.pgd_minimize(net, region, C, steps=40)
    high, _ = pl.pgd_minimize(net, region, -C, steps=40)
    assert (b.lower <= low + 1e-9).all() and (b.upper >= -high - 1e-9).all()
    flat = points.reshape(-1, 1, 6, 6)
    assert region.select(torch.arange(4).repeat_interleave(3)).contains(flat, tol=1e-12).all()
    values = torch.einsum("bmn,bmn->bm", C.expand(4, 3, 3), net(flat).reshape(4, 3, 3))
    assert torch.allclose(values, low)


def test_attacks_leave_the_model_grad_alone(mlp):
    x = random_inputs((6,), batch=3)
    pl.pgd(mlp, x, _labels(mlp, x), 0.1, steps=3)
    assert all(p.grad is None for p in mlp.parameters())


def test_bad_attack_options(mlp):
    x = random_inputs((6,), batch=2)
    y = _labels(mlp, x)
    with pytest.raises(ValueError, match="norm"):
        pl.pgd(mlp, x, y, 0.1, norm="l1")
    with pytest.raises(ValueError, match="eps"):
        pl.pgd(mlp, x, y, -0.1)


def test_attacks_take_a_region_or_say_why_not():
    model = make_mlp([4, 8, 3], seed=0)
    x = random_inputs((4,), batch=5)
    y = model(x).argmax(1)
    region = pl.LinfBall(x, 0.3, clip=(0.0, 1.0))
    a, sa = pl.pgd(model, region, y, seed=1)
    b, sb = pl.pgd(model, x, y, 0.3, clip=(0.0, 1.0), seed=1)
    torch.testing.assert_close(a, b)
    assert torch.equal(sa, sb)
    f_region, _ = pl.fgsm(model, region, y)
    f_tensor, _ = pl.fgsm(model, x, y, 0.3, clip=(0.0, 1.0))
    torch.testing.assert_close(f_region, f_tensor)
    with pytest.raises(ValueError, match="either a Region or X with eps"):
        pl.pgd(model, region, y, 0.3)
    with pytest.raises(ValueError, match="eps is required"):
        pl.pgd(model, x, y)
    with pytest.raises(ValueError, match="FGSM takes a sign step"):
        pl.fgsm(model, pl.L2Ball(x, 0.3), y)


def test_attacks_over_a_non_cubic_box_stay_inside_and_find_its_extremes():
    """pgd, fgsm and pgd_minimize over a Box with per-coordinate widths (one of them 0): every point lies
    in the box, and on a linear model pgd_minimize reaches the vertex that minimises each row."""
    g = torch.Generator().manual_seed(0)
    lo = torch.rand(3, 4, generator=g, dtype=torch.float64)
    hi = lo + torch.tensor([0.5, 0.0, 0.05, 0.2], dtype=torch.float64)
    box = pl.Box(lo, hi)
    model = make_mlp([4, 8, 3], seed=0)
    y = _labels(model, box.x)
    for x_adv in (pl.pgd(model, box, y, seed=1)[0], pl.fgsm(model, box, y)[0]):
        assert box.contains(x_adv, tol=1e-12).all()
    linear = torch.nn.Linear(4, 2).double()
    C = torch.eye(2, dtype=torch.float64)
    values, points = pl.pgd_minimize(linear, box, C, steps=30)
    assert ((points >= lo[:, None] - 1e-12) & (points <= hi[:, None] + 1e-12)).all()
    with torch.no_grad():
        w, b0 = linear.weight, linear.bias
        best = torch.where(w > 0, lo[:, None], hi[:, None])        # (3, 2, 4): the minimising vertex
        exact = (best * w).sum(-1) + b0
    torch.testing.assert_close(values, exact, rtol=0, atol=1e-9)

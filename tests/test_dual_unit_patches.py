"""Backward rows of conv units as receptive-field patches (polytope_lab.dual.unit_patches): the same J as the
dense backward pass for the same α, on conv chains of several shapes and every region the patches take."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import polytope_lab as pl
from polytope_lab.dual import intermediate_bounds
from polytope_lab.dual.backward import backward
from polytope_lab.dual.relu import adaptive_slopes, lower_slope_step, relu_slopes
from polytope_lab.dual.tight import per_row, slope_bounds, unit_rows, unstable
from polytope_lab.dual.unit_patches import UnitPatches, patch_chain, patch_floats

from conftest import make_convnet, make_mlp, make_resnet, random_inputs


def conv_chain(seed, in_shape=(2, 11, 11)):
    """Three convolutions (k3 s1 p1, k4 s2 p1, k3 s2 p0) then Linear: windows that cross the borders."""
    torch.manual_seed(seed)
    c = in_shape[0]
    model = nn.Sequential(nn.Conv2d(c, 3, 3, 1, 1), nn.ReLU(), nn.Conv2d(3, 4, 4, 2, 1), nn.ReLU(),
                          nn.Conv2d(4, 3, 3, 2, 0), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, *in_shape))
    return model.double().eval()


def regions(x):
    return {"linf": pl.LinfBall(x, 0.15), "linf-clip": pl.LinfBall(x, 0.3, clip=(0.0, 1.0)),
            "l2": pl.L2Ball(x, 0.5), "box": pl.Box(x - 0.1 * torch.rand_like(x), x + 0.2)}


def dense_rows(network, order, top, dtype):
    """The rows +e_j, −e_j of ``order`` (B, q) at affine ``top``, dense."""
    ok = torch.ones_like(order, dtype=torch.bool)
    return unit_rows(order, ok, network.affines[top].out_shape, dtype)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", ["linf", "linf-clip", "l2", "box"])
def test_patch_rows_equal_dense_rows(seed, kind):
    """For the fixed, the adaptive and a random α shared by the rows, J of the patch rows equals the dense
    backward pass's J on every conv layer above the first."""
    model = conv_chain(seed)
    x = random_inputs((2, 11, 11), batch=2, seed=seed).clamp(0, 1)
    region = regions(x)[kind]
    network = pl.from_torch(model, (2, 11, 11))
    bounds = slope_bounds(network, region, intermediate_bounds(network, region), "best")
    gen = torch.Generator().manual_seed(seed)
    for top in (1, 2):
        assert patch_chain(network, region, top)
        mask = unstable(*bounds[top])
        n = mask.shape[1]
        order = torch.randperm(n, generator=gen)[:7].expand(2, min(7, n)).contiguous()
        rows = UnitPatches(network, region, bounds, top, order)
        dense = dense_rows(network, order, top, x.dtype)
        m = dense.shape[1]
        shared = [torch.rand(l.shape, generator=gen, dtype=l.dtype) for l, _ in bounds[:top]]
        choices = [
            (rows.fixed, [per_row(relu_slopes(l, u)[0], m) for l, u in bounds[:top]]),
            (rows.adaptive, [per_row(adaptive_slopes(l, u), m) for l, u in bounds[:top]]),
            ([rows.gather(a, top - 1 - j) for j, a in enumerate(shared)], [per_row(a, m) for a in shared]),
        ]
        for patch_alpha, dense_alpha in choices:
            want = backward(network, region, bounds, dense, top, dense_alpha)[0]
            torch.testing.assert_close(rows.lower(patch_alpha), want, rtol=1e-9, atol=1e-9)


def test_patch_rows_gradient_reaches_alpha():
    """The patch J is differentiable in α (the tight mode ascends it) and its gradient is the dense one's
    restricted to the windows: the same directional derivative for a shared direction."""
    model = conv_chain(3)
    x = random_inputs((2, 11, 11), batch=1, seed=3)
    region = pl.LinfBall(x, 0.2)
    network = pl.from_torch(model, (2, 11, 11))
    bounds = intermediate_bounds(network, region)
    order = torch.arange(5).reshape(1, 5)
    rows = UnitPatches(network, region, bounds, 2, order)
    shared = [torch.full(l.shape, 0.5, dtype=l.dtype, requires_grad=True) for l, _ in bounds[:2]]
    J = rows.lower([rows.gather(a, 1 - j) for j, a in enumerate(shared)]).sum()
    grads = torch.autograd.grad(J, shared)
    dense = dense_rows(network, order, 2, x.dtype)
    shared2 = [a.detach().clone().requires_grad_(True) for a in shared]
    J2 = backward(network, region, bounds, dense, 2, [per_row(a, dense.shape[1]) for a in shared2])[0].sum()
    grads2 = torch.autograd.grad(J2, shared2)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g, g2, rtol=1e-9, atol=1e-9)
    assert any(g.abs().sum() > 0 for g in grads)


def test_patch_chain_only_where_it_applies():
    """Patches need a conv chain below the layer, no skips, and a box or L2 ball."""
    x = random_inputs((1, 6, 6), batch=1, seed=0)
    conv = pl.from_torch(make_convnet((1, 6, 6)), (1, 6, 6))
    region = pl.LinfBall(x, 0.1)
    assert patch_chain(conv, region, 1) and not patch_chain(conv, region, 0) and not patch_chain(conv, region, 2)
    assert patch_floats(conv, 1) == 3 * 3 * 3 + 1 * 5 * 5
    mlp = pl.from_torch(make_mlp([4, 5, 5, 2]), (4,))
    assert not patch_chain(mlp, pl.LinfBall(random_inputs((4,), batch=1), 0.1), 1)
    resnet, shape = make_resnet("conv")
    assert not patch_chain(pl.from_torch(resnet, shape), pl.LinfBall(random_inputs(shape, batch=1), 0.1), 1)


def test_tight_mode_on_conv_layers_matches_dense_rows():
    """The tight mode with every intermediate layer optimised (patches on the conv layers) is sound against
    sampling and no looser than the best-slopes bound."""
    model = conv_chain(4)
    x = random_inputs((2, 11, 11), batch=2, seed=4)
    region = pl.LinfBall(x, 0.1)
    tight = pl.Bounder.create("dual", alpha="optimized", intermediate_layers=None, steps=10).bound(model, region)
    best = pl.Bounder.create("dual", slopes="best").bound(model, region)
    assert (tight.lower >= best.lower - 1e-9).all() and (tight.upper <= best.upper + 1e-9).all()
    points = x.unsqueeze(1) + 0.1 * (2 * torch.rand(2, 400, *x.shape[1:], dtype=x.dtype) - 1)
    with torch.no_grad():
        out = model(points.reshape(-1, *x.shape[1:])).reshape(2, 400, -1)
    assert (out >= tight.lower.unsqueeze(1) - 1e-9).all() and (out <= tight.upper.unsqueeze(1) + 1e-9).all()
    for (l, u), (l0, u0) in zip(tight.intermediate, best.intermediate):
        assert (l >= l0 - 1e-9).all() and (u <= u0 + 1e-9).all()


def test_lower_slope_step_gradient():
    """The fused ReLU step equals α[ω̂]₊ + d[ω̂]₋ on I (d ω̂ elsewhere) and passes gradcheck in ω̂ and α."""
    gen = torch.Generator().manual_seed(0)
    omega_hat = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    alpha = torch.rand(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    d = torch.rand(2, 1, 5, generator=gen, dtype=torch.float64)
    unstable = torch.rand(2, 1, 5, generator=gen) > 0.4
    want = torch.where(unstable, alpha * omega_hat.clamp(min=0) + d * omega_hat.clamp(max=0), d * omega_hat)
    torch.testing.assert_close(lower_slope_step(omega_hat, alpha, d, unstable), want)
    assert torch.autograd.gradcheck(lambda w, a: lower_slope_step(w, a, d, unstable), (omega_hat, alpha))
    # α = 0 on I with ω̂ > 0 gives ω exactly 0 (a rounding error of either sign there would mislead the
    # gradient of the kinks above it, and the ascent from CROWN's 0/1 slopes would stall)
    zero = lower_slope_step(omega_hat.detach().abs(), torch.zeros_like(alpha), d, unstable)
    assert (zero[unstable.expand_as(zero)] == 0).all()

"""The β-split dual (polytope_lab.dual.splits): sound for every α ∈ [0,1], β ≥ 0 on its subdomain (sampled
points of the region that satisfy the split signs on the real network), equal to the plain dual with β = 0
and no splits, and tightened by its own optimisation."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import polytope_lab as pl
from polytope_lab.convert import as_network
from polytope_lab.dual.intermediate import intermediate_bounds
from polytope_lab.dual.splits import split_bounds, split_dual, tightened_bounds

from conftest import make_convnet, make_mlp, make_resnet, n_examples, random_inputs, sample_region

NETS = {
    "mlp": lambda: (make_mlp([3, 8, 8, 3], seed=0), (3,)),
    "conv": lambda: (make_convnet((1, 4, 4), channels=(2, 2), n_out=3, seed=0), (1, 4, 4)),
    "resnet": lambda: make_resnet("mlp"),
}


def _setup(kind, eps=0.3, batch=2, clip=None):
    model, shape = NETS[kind]()
    net = as_network(model, shape)
    x = random_inputs(shape, batch=batch, seed=1)
    region = pl.LinfBall(x, eps, clip=clip)
    with torch.no_grad():
        bounds = intermediate_bounds(net, region)
    return net, region, bounds


def _random_signs(net, region, bounds, seed, p=0.5):
    """Splits on a random share ``p`` of the unstable units (as branch and bound makes them), with the signs
    of a random point of the region (so the subdomain is not empty)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = region.box()
    with torch.no_grad():
        pre = net.pre_activations(lo + (hi - lo) * torch.rand(lo.shape, generator=g, dtype=lo.dtype))
    out = []
    for (l, u), z in zip(bounds, pre):
        pick = (torch.rand(l.shape, generator=g) < p) & (l < 0) & (u > 0)
        out.append(torch.where(pick, torch.where(z.reshape(l.shape) >= 0, 1, -1), 0).to(torch.int8))
    return out


@pytest.mark.parametrize("kind", list(NETS))
def test_no_splits_beta_zero_is_the_dual_bound(kind):
    net, region, bounds = _setup(kind)
    C = torch.randn(2, 4, net.output_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    signs = [torch.zeros(l.shape, dtype=torch.int8) for l, _ in bounds]
    out = split_dual(net, region, bounds, signs, C, steps=0)
    ref = pl.Bounder.create("dual").bound(net, region, C)
    torch.testing.assert_close(out.lower, ref.lower, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(NETS))
def test_split_bounds_clip_at_zero(kind):
    net, region, bounds = _setup(kind)
    signs = _random_signs(net, region, bounds, 0)
    for (l, u), (lc, uc), s in zip(bounds, split_bounds(bounds, signs), signs):
        assert (lc[s > 0] >= 0).all() and (uc[s < 0] <= 0).all()
        assert torch.equal(lc[s == 0], l[s == 0]) and torch.equal(uc[s == 0], u[s == 0])


@settings(max_examples=n_examples(6), deadline=None)
@given(kind=st.sampled_from(list(NETS)), seed=st.integers(0, 10 ** 6), clip=st.booleans())
def test_every_alpha_beta_is_sound_on_its_subdomain(kind, seed, clip):
    """Random α ∈ [0,1] and β ≥ 0 (large too): every bound lies below the objective at every sampled point
    of the region whose activation signs agree with the splits."""
    net, region, bounds = _setup(kind, eps=0.4, clip=(0.0, 1.0) if clip else None)
    signs = _random_signs(net, region, bounds, seed)
    g = torch.Generator().manual_seed(seed)
    B, K = region.batch_size, 3
    C = torch.randn(B, K, net.output_size, dtype=torch.float64, generator=g)
    alpha = [torch.rand(B, K, *l.shape[1:], dtype=torch.float64, generator=g) for l, _ in bounds]
    beta = [torch.rand(B, K, *l.shape[1:], dtype=torch.float64, generator=g) * 5 for l, _ in bounds]
    lower = split_dual(net, region, bounds, signs, C, alpha, beta, steps=0).lower
    optimised = split_dual(net, region, bounds, signs, C, alpha, beta, steps=5).lower
    assert (optimised >= lower - 1e-12).all()           # the best iterate is kept
    points = sample_region(region, 3000, seed=seed)      # (n, B, *shape)
    n = points.shape[0]
    flat = points.reshape(n * B, *region.input_shape)
    with torch.no_grad():
        pre = net.pre_activations(flat)
    inside = torch.ones(n * B, dtype=torch.bool)
    for z, s in zip(pre[:-1], signs):
        s = s.unsqueeze(0).expand(n, *s.shape).reshape(n * B, -1).to(z.dtype)
        inside &= ((s * z.reshape(n * B, -1)) >= 0).all(1)
    values = torch.einsum("bkm,nbm->nbk", C, pre[-1].reshape(n, B, -1))
    inside = inside.reshape(n, B)
    assert inside.any()
    for bound in (lower, optimised):
        gap = (bound.unsqueeze(0) - values)[inside]
        assert (gap <= 1e-9).all(), float(gap.max())


def test_beta_tightens_a_split_subdomain():
    """On a subdomain with splits, optimising β (and α) gives a bound at least the α-only bound's."""
    net, region, bounds = _setup("mlp", eps=0.5)
    signs = _random_signs(net, region, bounds, 3, p=0.7)
    C = torch.randn(2, 3, net.output_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    start = split_dual(net, region, bounds, signs, C, steps=0).lower
    out = split_dual(net, region, bounds, signs, C, steps=30)
    assert (out.lower >= start - 1e-12).all() and (out.lower > start + 1e-6).any()
    assert all((b >= 0).all() for b in out.beta)
    assert all(((b != 0) <= (s != 0).unsqueeze(1)).all() for b, s in zip(out.beta, signs))


@pytest.mark.parametrize("kind", list(NETS))
@pytest.mark.parametrize("clip", [False, True])
def test_tightened_root_bounds_are_sound_and_inside_the_root(kind, clip):
    """The root bounds tightened by optimised α lie inside the fixed-slope ones and contain the
    pre-activations of every sampled point of the region (uniform points and box vertices), on MLP, conv
    and residual nets."""
    net, region, bounds = _setup(kind, eps=0.4, clip=(0.0, 1.0) if clip else None)
    tight = tightened_bounds(net, region, bounds, steps=10, lr=0.1)
    points = sample_region(region, 300, seed=2)                          # (n, B, *shape)
    with torch.no_grad():
        pre = net.pre_activations(points.reshape(-1, *points.shape[2:]))
    narrower = 0.0
    for (l, u), (lt, ut), z in zip(bounds, tight, pre):
        assert (lt >= l).all() and (ut <= u).all()
        z = z.reshape(points.shape[0], *l.shape)
        assert (z >= lt - 1e-9).all() and (z <= ut + 1e-9).all()
        narrower += float(((u - l) - (ut - lt)).sum())
    assert narrower > 0  # the optimisation did tighten something (else this test checks nothing new)

"""The dual bounder's options: optimised α never looser than fixed α; intermediate bounds per layer."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import polytope_lab as pl

from conftest import make_convnet, make_mlp, random_inputs, sample_region

NETS = {
    "mlp 5-10-10-10-4": (lambda: make_mlp([5, 10, 10, 10, 4], seed=1), (5,)),
    "convnet 2x7x7": (lambda: make_convnet((2, 7, 7), channels=(3, 4), n_out=4, seed=2), (2, 7, 7)),
    "paper-like convnet 1x8x8": (lambda: _paper_like(), (1, 8, 8)),
}


def _paper_like():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 3, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 4, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).double().eval()


@pytest.fixture(params=list(NETS))
def net(request):
    factory, shape = NETS[request.param]
    return factory(), shape


REGIONS = {
    "linf": lambda x: pl.LinfBall(x, 0.1),
    "linf-clip": lambda x: pl.LinfBall(x, 0.2, clip=(0.0, 1.0)),
    "l2": lambda x: pl.L2Ball(x, 0.5),
    "linf per-example eps": lambda x: pl.LinfBall(x, torch.linspace(0.0, 0.2, x.shape[0], dtype=x.dtype)),
}


@pytest.mark.parametrize("region_kind", list(REGIONS))
@pytest.mark.parametrize("steps", [0, 1, 10])
def test_optimized_never_looser_than_fixed(net, region_kind, steps):
    model, shape = net
    x = random_inputs(shape, batch=3, seed=4)
    region = REGIONS[region_kind](x)
    C = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    fixed = pl.Bounder.create("dual").bound(model, region, C=C)
    opt = pl.Bounder.create("dual", alpha="optimized", steps=steps, slopes="fixed",
                            optimize_intermediate=False).bound(model, region, C=C)
    assert (opt.lower >= fixed.lower - 1e-6).all()
    assert (opt.upper <= fixed.upper + 1e-6).all()
    if steps == 0:  # no step taken: the starting point is the fixed choice α = u/(u − l)
        torch.testing.assert_close(opt.lower, fixed.lower, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(opt.upper, fixed.upper, rtol=1e-9, atol=1e-9)
    assert opt.method != fixed.method


def test_optimization_actually_tightens():
    """On a net with many unstable units the optimised bound is strictly tighter somewhere."""
    model = make_mlp([5, 20, 20, 3], seed=6)
    x = random_inputs((5,), batch=4, seed=6)
    region = pl.LinfBall(x, 0.3)
    fixed = pl.Bounder.create("dual").bound(model, region)
    opt = pl.Bounder.create("dual", alpha="optimized", steps=20).bound(model, region)
    assert (opt.lower > fixed.lower + 1e-4).any()
    assert (opt.upper < fixed.upper - 1e-4).any()


def test_more_steps_never_hurt():
    """The best iterate is kept, and the first `s` iterates are the same for any step budget >= s."""
    model = make_mlp([5, 12, 12, 3], seed=7)
    x = random_inputs((5,), batch=3, seed=7)
    region = pl.LinfBall(x, 0.2)
    prev = None
    for steps in (0, 2, 5, 15):
        b = pl.Bounder.create("dual", alpha="optimized", steps=steps, slopes="fixed",
                              optimize_intermediate=False).bound(model, region)  # final-only optimiser
        if prev is not None:
            assert (b.lower >= prev.lower - 1e-9).all()
            assert (b.upper <= prev.upper + 1e-9).all()
        prev = b


def test_optimized_bounds_are_sound():
    model = make_mlp([3, 10, 10, 2], seed=8)
    x = random_inputs((3,), batch=2, seed=8)
    region = pl.LinfBall(x, 0.3)
    b = pl.Bounder.create("dual", alpha="optimized", steps=50, lr=0.3).bound(model, region)
    pts = sample_region(region, 2000)
    with torch.no_grad():
        f = model(pts.reshape(-1, 3)).reshape(pts.shape[0], 2, -1)
    assert (f >= b.lower - 1e-7).all() and (f <= b.upper + 1e-7).all()


@pytest.mark.parametrize("options", [dict(), dict(alpha="optimized", steps=5, slopes="fixed", optimize_intermediate=False),
                                     dict(strategy="forward"),
                                     dict(strategy="backward")], ids=["fixed", "optimized", "forward", "backward"])
def test_intermediate_bounds_per_layer(net, options):
    model, shape = net
    x = random_inputs(shape, batch=3, seed=9)
    region = pl.LinfBall(x, 0.05)
    network = pl.from_torch(model, shape)
    b = pl.Bounder.create("dual", **options).bound(model, region)
    assert isinstance(b.intermediate, list) and len(b.intermediate) == network.n_relu_layers
    pre = network.pre_activations(x)
    for (l, u), a, z in zip(b.intermediate, network.affines, pre):
        assert l.shape == (3, *a.out_shape) and u.shape == (3, *a.out_shape)
        assert l.dtype == x.dtype and u.dtype == x.dtype
        assert (l <= z.detach() + 1e-9).all() and (z.detach() <= u + 1e-9).all()
    # the intermediate bounds do not depend on C or on the α option
    other = pl.Bounder.create("dual").bound(model, region, C=torch.randn(2, 4, dtype=torch.float64))
    for (l, u), (l2, u2) in zip(b.intermediate, other.intermediate):
        torch.testing.assert_close(l, l2, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(u, u2, rtol=1e-6, atol=1e-8)


def test_first_layer_intermediate_bounds_equal_interval(net):
    """On the first layer both are exact (W x + b ± eps|W|1). (Deeper layers: the dual with fixed α is
    NOT always tighter than interval arithmetic, so nothing is asserted there.)"""
    model, shape = net
    x = random_inputs(shape, batch=2, seed=10)
    region = pl.LinfBall(x, 0.05)
    d = pl.Bounder.create("dual").bound(model, region)
    i = pl.Bounder.create("interval").bound(model, region)
    (dl, du), (il, iu) = d.intermediate[0], i.intermediate[0]
    torch.testing.assert_close(dl, il, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(du, iu, rtol=1e-9, atol=1e-9)


def test_chunking_by_max_memory_gives_identical_results(net):
    model, shape = net
    x = random_inputs(shape, batch=5, seed=12)
    region = pl.LinfBall(x, 0.05)
    whole = pl.Bounder.create("dual").bound(model, region)
    for max_memory in (1, 20_000):
        chunked = pl.Bounder.create("dual", max_memory=max_memory).bound(model, region)
        torch.testing.assert_close(chunked.lower, whole.lower, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(chunked.upper, whole.upper, rtol=1e-9, atol=1e-9)
        for (l, u), (l2, u2) in zip(chunked.intermediate, whole.intermediate):
            torch.testing.assert_close(l, l2, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(u, u2, rtol=1e-9, atol=1e-9)


def test_explicit_cpu_device():
    model = make_mlp([4, 6, 3], seed=13)
    x = random_inputs((4,), batch=2, seed=13)
    a = pl.Bounder.create("dual", device="cpu").bound(model, pl.LinfBall(x, 0.1))
    b = pl.Bounder.create("dual").bound(model, pl.LinfBall(x, 0.1))
    assert a.lower.device == x.device
    torch.testing.assert_close(a.lower, b.lower)


@pytest.mark.parametrize("layers", ["batchnorm", "plain"])
def test_optimized_alpha_on_a_model_with_batchnorm(layers):
    """Optimised α must work whatever the layers (eval BatchNorm is folded into the operators)."""
    torch.manual_seed(14)
    mid = [nn.BatchNorm1d(6)] if layers == "batchnorm" else []
    model = nn.Sequential(nn.Linear(4, 6), *mid, nn.ReLU(), nn.Linear(6, 3)).double().eval()
    x = random_inputs((4,), batch=2, seed=14)
    region = pl.LinfBall(x, 0.1)
    fixed = pl.Bounder.create("dual").bound(model, region)
    opt = pl.Bounder.create("dual", alpha="optimized", steps=5).bound(model, region)
    assert (opt.lower >= fixed.lower - 1e-9).all() and (opt.upper <= fixed.upper + 1e-9).all()


def test_optimized_alpha_without_relu():
    """A ReLU-free network has no α: the optimised bounder must return the (exact) fixed result."""
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x = random_inputs((4,), batch=2, seed=15)
    region = pl.LinfBall(x, 0.1)
    fixed = pl.Bounder.create("dual").bound(model, region)
    opt = pl.Bounder.create("dual", alpha="optimized", steps=5).bound(model, region)
    torch.testing.assert_close(opt.lower, fixed.lower)
    torch.testing.assert_close(opt.upper, fixed.upper)

"""Column-chunked exact bounds (``column_chunk``, optionally over several ``devices``): the same bounds as
the unchunked dual, to float64 rounding, on MLPs and conv nets, L∞ (with and without clip) and L2 balls."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import polytope_lab as pl
from polytope_lab.dual.chunked import column_chunked_bounds
from polytope_lab.dual import intermediate_bounds
from polytope_lab.convert import as_network

from conftest import make_convnet, make_mlp, random_inputs

NETS = {
    "mlp": (lambda: make_mlp([12, 20, 16, 4]), (12,)),
    "deep-mlp": (lambda: make_mlp([10, 14, 14, 14, 3], seed=2), (10,)),
    "convnet": (lambda: make_convnet((1, 6, 6), (3, 4)), (1, 6, 6)),
    "convnet-2ch": (lambda: make_convnet((2, 7, 7), (4, 3), seed=3), (2, 7, 7)),
}
REGIONS = {
    "linf": lambda x: pl.LinfBall(x, 0.15),
    "linf-clip": lambda x: pl.LinfBall(x, 0.15, clip=(0, 1)),
    "l2": lambda x: pl.L2Ball(x, 0.4),
}


def assert_same(a, b, tol=1e-10):
    scale = max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() <= tol * scale, (a - b).abs().max().item()


@pytest.mark.parametrize("net_name", list(NETS))
@pytest.mark.parametrize("region_name", list(REGIONS))
@pytest.mark.parametrize("chunk", [1, 5, 10_000])
def test_chunked_bounds_equal_unchunked(net_name, region_name, chunk):
    build, shape = NETS[net_name]
    net = build()
    region = REGIONS[region_name](random_inputs(shape, batch=1, seed=4))
    C = torch.randn(2, net(region.x).shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = pl.Bounder.create("dual").bound(net, region, C)
    chunked = pl.Bounder.create("dual", column_chunk=chunk, devices=["cpu", "cpu"]).bound(net, region, C)
    assert type(chunked) is pl.Bounds and chunked.method == "dual"
    assert_same(chunked.lower, exact.lower)
    assert_same(chunked.upper, exact.upper)
    for (l, u), (l0, u0) in zip(chunked.intermediate, exact.intermediate):
        assert_same(l, l0)
        assert_same(u, u0)
    assert (chunked.intermediate[-1][0] < 0).any() and (chunked.intermediate[-1][1] > 0).any()  # unstable units


@pytest.mark.parametrize("strategy", ["forward", "backward"])
def test_chunked_intermediate_bounds_match_every_strategy_on_a_batch(strategy):
    net = as_network(make_convnet((1, 6, 6), (3, 4), seed=1), (1, 6, 6))
    region = pl.LinfBall(random_inputs((1, 6, 6), batch=3, seed=2), 0.1, clip=(0, 1))
    ref = intermediate_bounds(net, region, strategy)
    got = column_chunked_bounds(net, region, 7)
    for (l, u), (l0, u0) in zip(got, ref):
        assert_same(l, l0)
        assert_same(u, u0)


def test_chunked_with_optimized_alpha_and_a_batchnorm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(),
                        nn.Linear(10, 3)).double()
    net[1].running_mean.uniform_(-0.2, 0.2)
    net.eval()
    region = pl.LinfBall(random_inputs((8,), batch=2), 0.2)
    a = pl.Bounder.create("dual", alpha="optimized", steps=5).bound(net, region)
    b = pl.Bounder.create("dual", alpha="optimized", steps=5, column_chunk=3).bound(net, region)
    assert_same(b.lower, a.lower, 1e-9)
    assert_same(b.upper, a.upper, 1e-9)


def test_bad_column_options_are_rejected():
    with pytest.raises(ValueError, match="column_chunk"):
        pl.Bounder.create("dual", column_chunk=0)
    with pytest.raises(ValueError, match="devices"):
        pl.Bounder.create("dual", devices=["cpu"])
    with pytest.raises(ValueError, match="devices"):
        pl.Bounder.create("dual", column_chunk=4, devices="cpu")
    with pytest.raises(ValueError, match="exclude"):
        pl.Bounder.create("dual", column_chunk=4, proj=10)
    net = as_network(make_mlp([4, 5, 2]), (4,))
    with pytest.raises(ValueError, match="column_chunk"):
        column_chunked_bounds(net, pl.LinfBall(random_inputs((4,), batch=1), 0.1), 0)

"""``dual/patches.py``: conv-chain Jacobians ``W_k D_{k−1} … D_1 W_1`` kept as receptive-field patches,
checked against the dense Jacobian (autograd through the chain's linear parts), and the methods the
dual's forward frontier uses on them (dense rows, left products, region deviations)."""
from __future__ import annotations

import pytest
import torch

import polytope_lab as pl
from polytope_lab.dual import patches
from polytope_lab.network import Conv2dOp

# (input shape, [(C_out, kernel, stride, padding), ...]): square chains the patch arithmetic takes
CHAINS = {
    "k3s1-k3s2": ((1, 6, 6), [(3, 3, 1, 1), (4, 3, 2, 1)]),
    "2ch-k3s2p0-k3s1": ((2, 7, 7), [(3, 3, 2, 0), (2, 3, 1, 1)]),
    "three-convs": ((1, 8, 8), [(3, 3, 1, 1), (4, 4, 2, 1), (2, 3, 2, 0)]),
    "k4s3p2-k2": ((1, 5, 5), [(2, 4, 3, 2), (2, 2, 1, 0)]),
    "k1-k3s3": ((1, 9, 9), [(2, 1, 1, 0), (3, 3, 3, 0)]),
}


def conv_chain(in_shape, specs, seed=0, dilation=1, rect=False):
    g = torch.Generator().manual_seed(seed)
    ops, shape = [], tuple(in_shape)
    for c_out, k, s, p in specs:
        w = torch.randn(c_out, shape[0], k, k + int(rect), generator=g, dtype=torch.float64)
        op = Conv2dOp(w, torch.randn(c_out, generator=g, dtype=torch.float64), shape, (s, s), (p, p),
                      (dilation, dilation))
        ops.append(op)
        shape = op.out_shape
    return ops


def random_slopes(ops, B=2, seed=1):
    """D after every conv but the last, in [0, 1] with exact zeros and ones (I⁻, I⁺) among them."""
    g = torch.Generator().manual_seed(seed)
    slopes = []
    for op in ops[:-1]:
        d = torch.rand(B, *op.out_shape, generator=g, dtype=torch.float64)
        slopes.append(torch.where(d < 0.2, 0.0, torch.where(d > 0.8, 1.0, d)))
    return slopes


def dense_jacobian(ops, slopes):
    """(B, n_top, n_0) by autograd through x ↦ W_k D_{k−1} … D_1 W_1 x, one example at a time."""
    rows = []
    for b in range(slopes[0].shape[0]):
        def f(x, b=b):
            for t, op in enumerate(ops):
                x = op.linear(x.reshape(1, *op.in_shape))
                if t < len(ops) - 1:
                    x = x * slopes[t][b:b + 1]
            return x.reshape(-1)
        rows.append(torch.autograd.functional.jacobian(f, torch.zeros(ops[0].in_features, dtype=torch.float64)))
    return torch.stack(rows)


@pytest.mark.parametrize("name", list(CHAINS))
def test_patches_equal_the_dense_jacobian(name):
    ops = conv_chain(*CHAINS[name])
    slopes = random_slopes(ops)
    assert patches.eligible(ops) and patches.cost(ops) > 0
    rows = patches.conv_jacobian(ops, slopes)
    J = dense_jacobian(ops, slopes)
    assert rows.shape == J.shape
    assert J.abs().max() > 0
    torch.testing.assert_close(rows.dense(), J, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(CHAINS))
def test_left_multiply_equals_the_dense_product(name):
    ops = conv_chain(*CHAINS[name])
    slopes = random_slopes(ops)
    rows = patches.conv_jacobian(ops, slopes)
    J = dense_jacobian(ops, slopes)
    M = torch.randn(2, 3, J.shape[1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert rows.foldable
    torch.testing.assert_close(rows.left_multiply(M), M @ J, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(CHAINS))
def test_deviation_equals_the_regions_on_dense_rows(name):
    """``ε‖row‖₁``, ``Σ rad |row|`` (clipped ball) and ``ε‖row‖₂`` from the patches, entries outside the
    input dropped, equal the region's own deviation of the dense rows."""
    in_shape, specs = CHAINS[name]
    ops = conv_chain(in_shape, specs)
    slopes = random_slopes(ops)
    rows = patches.conv_jacobian(ops, slopes)
    J = dense_jacobian(ops, slopes)
    x = torch.rand(2, *in_shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    eps = torch.tensor([0.1, 0.3], dtype=torch.float64)
    for region in (pl.LinfBall(x, eps), pl.LinfBall(x, eps, clip=(0.0, 1.0)), pl.L2Ball(x, eps)):
        torch.testing.assert_close(rows.deviation(region), region.deviation(J), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(CHAINS))
def test_one_convolution_as_patches_is_its_matrix(name):
    """The first frontier's patches (one conv, shared by the batch) equal the conv's matrix, and their
    products and deviations broadcast over a batch of two."""
    in_shape, specs = CHAINS[name]
    op = conv_chain(in_shape, specs)[0]
    rows = patches.conv_jacobian([op], [])
    n = op.in_features
    W = op.linear(torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)).reshape(n, -1).t()
    assert rows.shape == (1, *W.shape)
    torch.testing.assert_close(rows.dense()[0], W, rtol=0, atol=1e-12)
    x = torch.rand(2, *in_shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eps = torch.tensor([0.1, 0.3], dtype=torch.float64)
    for region in (pl.LinfBall(x, eps), pl.LinfBall(x, eps, clip=(0.0, 1.0)), pl.L2Ball(x, eps)):
        torch.testing.assert_close(rows.deviation(region), region.deviation(W.unsqueeze(0)), rtol=0, atol=1e-12)
    if rows.foldable:
        M = torch.randn(2, 3, W.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        torch.testing.assert_close(rows.left_multiply(M), M @ W, rtol=0, atol=1e-12)


def test_chains_the_arithmetic_does_not_cover_are_not_eligible():
    square = CHAINS["k3s1-k3s2"]
    assert patches.cost(conv_chain(*square)[:1]) == 0                        # one conv: nothing to chain
    assert not patches.eligible(conv_chain(*square, dilation=2))
    assert not patches.eligible(conv_chain(*square, rect=True))
    assert patches.cost(conv_chain(*square, rect=True)) == 0
    assert not patches.eligible(conv_chain((1, 6, 7), square[1]))             # non-square input


def test_the_frontier_takes_the_patch_route_on_a_conv_chain(monkeypatch):
    """The dual's intermediate bounds on a conv chain build the input columns from patches, and agree with
    backward rows (which never use them)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, 1, 1), torch.nn.ReLU(), torch.nn.Conv2d(3, 4, 3, 2, 1),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(36, 3)).double()
    region = pl.LinfBall(torch.rand(2, 1, 6, 6, dtype=torch.float64), 0.1)
    calls = []
    real = patches.conv_jacobian
    monkeypatch.setattr(patches, "conv_jacobian", lambda *a: calls.append(1) or real(*a))
    forward = pl.Bounder.create("dual", strategy="forward").bound(model, region)
    assert calls
    backward = pl.Bounder.create("dual", strategy="backward").bound(model, region)
    for (l, u), (l0, u0) in zip(forward.intermediate, backward.intermediate):
        torch.testing.assert_close(l, l0, rtol=0, atol=1e-12)
        torch.testing.assert_close(u, u0, rtol=0, atol=1e-12)

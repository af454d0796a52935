"""network.py: the affine operators (adjoint, dense matrix, interval image) and the Network normal form."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import polytope_lab as pl
from polytope_lab.composite import ComposedOp
from polytope_lab.network import ChannelAffineOp, Conv2dOp, IdentityOp, LinearOp

DT = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


# (in_shape, c_out, kernel, stride, padding, dilation)
CONV_CASES = {
    "7x7-k4-s2-p1 (output_padding 1)": ((2, 7, 7), 3, 4, 2, 1, 1),
    "8x8-k4-s2-p1": ((1, 8, 8), 2, 4, 2, 1, 1),
    "6x6-k3-s1-p0": ((3, 6, 6), 2, 3, 1, 0, 1),
    "6x6-k3-s1-p1": ((1, 6, 6), 2, 3, 1, 1, 1),
    "9x7-k3-s3-p2-d2": ((2, 9, 7), 2, 3, 3, 2, 2),
    "6x5-k(2,3)-s(2,1)-p(1,0)-d(1,2)": ((2, 6, 5), 3, (2, 3), (2, 1), (1, 0), (1, 2)),
    "10x10-k5-s3-p2 (output_padding 2)": ((1, 10, 10), 2, 5, 3, 2, 1),
    "5x5-k1-s2-p0": ((2, 5, 5), 3, 1, 2, 0, 1),
    "4x4-k4-s1-p0 (1x1 output)": ((2, 4, 4), 3, 4, 1, 0, 1),
}


def _conv_op(case, seed=0):
    in_shape, c_out, k, s, p, d = CONV_CASES[case]
    k, s, p, d = (v if isinstance(v, tuple) else (v, v) for v in (k, s, p, d))
    g = _g(seed)
    w = torch.randn(c_out, in_shape[0], *k, generator=g, dtype=DT)
    b = torch.randn(c_out, generator=g, dtype=DT)
    return Conv2dOp(w, b, in_shape, s, p, d), (w, b, s, p, d)


def _operators():
    """{name: Affine} covering every operator type."""
    g = _g(1)
    ops = {f"conv {name}": _conv_op(name)[0] for name in CONV_CASES}
    ops["linear"] = LinearOp(torch.randn(4, 6, generator=g, dtype=DT), torch.randn(4, generator=g, dtype=DT))
    ops["linear on (2,3) input"] = LinearOp(torch.randn(4, 6, generator=g, dtype=DT),
                                            torch.randn(4, generator=g, dtype=DT), in_shape=(2, 3))
    ops["linear no bias"] = LinearOp(torch.randn(3, 5, generator=g, dtype=DT), None)
    ops["channel-affine (C,H,W)"] = ChannelAffineOp(torch.randn(3, generator=g, dtype=DT),
                                                    torch.randn(3, generator=g, dtype=DT), (3, 2, 2))
    ops["channel-affine (C,)"] = ChannelAffineOp(torch.randn(5, generator=g, dtype=DT),
                                                 torch.randn(5, generator=g, dtype=DT), (5,))
    ops["identity"] = IdentityOp((2, 3, 3), torch.zeros((), dtype=DT))
    conv = _conv_op("7x7-k4-s2-p1 (output_padding 1)")[0]
    bn = ChannelAffineOp(torch.randn(3, generator=g, dtype=DT), torch.randn(3, generator=g, dtype=DT), conv.out_shape)
    lin = LinearOp(torch.randn(4, conv.out_features, generator=g, dtype=DT), torch.randn(4, generator=g, dtype=DT),
                   in_shape=conv.out_shape)
    ops["composed conv-bn-linear"] = ComposedOp([conv, bn, lin])
    ops["composed linear-linear"] = ComposedOp([
        LinearOp(torch.randn(5, 3, generator=g, dtype=DT), torch.randn(5, generator=g, dtype=DT)),
        LinearOp(torch.randn(2, 5, generator=g, dtype=DT), torch.randn(2, generator=g, dtype=DT))])
    return ops


OPS = _operators()
op_params = pytest.mark.parametrize("name", list(OPS))


def _dense_from_linear(op):
    n = op.in_features
    eye = torch.eye(n, dtype=DT).reshape(n, *op.in_shape)
    return op.linear(eye).reshape(n, -1).t()  # column j = W e_j


@op_params
def test_shapes(name):
    op = OPS[name]
    x = torch.randn(3, *op.in_shape, generator=_g(2), dtype=DT)
    assert op.linear(x).shape == (3, *op.out_shape)
    assert op.forward(x).shape == (3, *op.out_shape)
    assert op.transpose(torch.randn(3, *op.out_shape, dtype=DT)).shape == (3, *op.in_shape)
    assert tuple(op.bias().shape) == tuple(op.out_shape)
    assert op.in_features == int(np.prod(op.in_shape)) and op.out_features == int(np.prod(op.out_shape))
    assert op.cost > 0


@op_params
def test_transpose_is_the_adjoint(name):
    op = OPS[name]
    g = _g(3)
    x = torch.randn(4, *op.in_shape, generator=g, dtype=DT)
    y = torch.randn(4, *op.out_shape, generator=g, dtype=DT)
    lhs = (op.linear(x) * y).reshape(4, -1).sum(1)
    rhs = (x * op.transpose(y)).reshape(4, -1).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)


@op_params
def test_transpose_single_example(name):
    """Batch of one (Conv2dOp takes a different memory-format path for N > 1)."""
    op = OPS[name]
    y = torch.randn(2, *op.out_shape, generator=_g(4), dtype=DT)
    torch.testing.assert_close(op.transpose(y[:1]), op.transpose(y)[:1], rtol=1e-12, atol=1e-12)


@op_params
def test_as_matrix_matches_linear(name):
    op = OPS[name]
    M = op.as_matrix()
    assert M.shape == (op.out_features, op.in_features)
    assert M.dtype == np.float64
    torch.testing.assert_close(torch.as_tensor(M.toarray()), _dense_from_linear(op), rtol=1e-12, atol=1e-12)
    y = torch.randn(2, *op.out_shape, generator=_g(5), dtype=DT)
    torch.testing.assert_close(op.transpose(y).reshape(2, -1), torch.as_tensor(M.T @ y.reshape(2, -1).numpy().T).T,
                               rtol=1e-10, atol=1e-10)


@op_params
def test_forward_is_linear_plus_bias(name):
    op = OPS[name]
    x = torch.randn(2, *op.in_shape, generator=_g(6), dtype=DT)
    W = torch.as_tensor(op.as_matrix().toarray())
    expected = x.reshape(2, -1) @ W.t() + op.bias().reshape(-1)
    torch.testing.assert_close(op.forward(x).reshape(2, -1), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.as_tensor(op.bias_vector()), op.bias().reshape(-1).detach())


@op_params
def test_interval_image(name):
    op = OPS[name]
    g = _g(7)
    c = torch.randn(2, *op.in_shape, generator=g, dtype=DT)
    r = torch.rand(2, *op.in_shape, generator=g, dtype=DT)
    W = torch.as_tensor(op.as_matrix().toarray())
    oc, orad = op.interval(c, r)
    torch.testing.assert_close(oc.reshape(2, -1), c.reshape(2, -1) @ W.t() + op.bias().reshape(-1))
    if isinstance(op, ComposedOp):  # interval arithmetic layer by layer: an over-approximation of |W| r
        assert (orad.reshape(2, -1) >= r.reshape(2, -1) @ W.abs().t() - 1e-10).all()
    else:
        torch.testing.assert_close(orad.reshape(2, -1), r.reshape(2, -1) @ W.abs().t())


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_op_matches_torch(case):
    op, (w, b, s, p, d) = _conv_op(case)
    x = torch.randn(2, *op.in_shape, generator=_g(8), dtype=DT)
    ref = F.conv2d(x, w, b, s, p, d)
    assert tuple(ref.shape[1:]) == op.out_shape
    torch.testing.assert_close(op.forward(x), ref)


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_transpose_matches_autograd(case):
    """``Wᵀy`` equals the gradient of ``⟨W x, y⟩`` with respect to x."""
    op, (w, b, s, p, d) = _conv_op(case)
    y = torch.randn(3, *op.out_shape, generator=_g(9), dtype=DT)
    x = torch.zeros(3, *op.in_shape, dtype=DT, requires_grad=True)
    (grad,) = torch.autograd.grad((F.conv2d(x, w, None, s, p, d) * y).sum(), x)
    torch.testing.assert_close(op.transpose(y), grad, rtol=1e-10, atol=1e-10)


@op_params
def test_columns_are_the_matrix_columns(name):
    """``columns`` at any units, repeats included, is the dense matrix's columns there: written down (conv,
    linear, a BatchNorm folded into a conv) or through ``linear`` (the default)."""
    op = OPS[name]
    order = torch.randint(0, op.in_features, (3, 7), generator=_g(11))
    expected = _dense_from_linear(op)[:, order].permute(1, 0, 2)                  # (B, n_out, q)
    torch.testing.assert_close(op.columns(order), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_columns_carry_the_weights_gradient(case):
    """Written-down columns are differentiable in the kernel (robust training bounds through them)."""
    op, (w, b, s, p, d) = _conv_op(case)
    w = w.clone().requires_grad_(True)
    op = Conv2dOp(w, b, op.in_shape, s, p, d,
                  post=ChannelAffineOp(torch.rand(w.shape[0], dtype=DT) + 0.5, torch.zeros(w.shape[0], dtype=DT),
                                       op.out_shape))
    order = torch.randint(0, op.in_features, (2, 5), generator=_g(12))
    weights = torch.randn(2, op.out_features, 5, generator=_g(13), dtype=DT)
    (direct,) = torch.autograd.grad((op.columns(order) * weights).sum(), w)
    (through_linear,) = torch.autograd.grad((pl.network.Affine.columns(op, order) * weights).sum(), w)
    assert direct.abs().max() > 0
    torch.testing.assert_close(direct, through_linear, rtol=0, atol=1e-12)


@op_params
def test_to_dtype_keeps_values(name):
    op = OPS[name]
    op32 = op.to(dtype=torch.float32)
    x = torch.randn(2, *op.in_shape, generator=_g(10), dtype=DT)
    assert op32.forward(x.float()).dtype == torch.float32
    torch.testing.assert_close(op32.forward(x.float()).double(), op.forward(x), rtol=1e-4, atol=1e-4)


def test_conv_op_rejects_mismatched_input():
    w = torch.randn(2, 3, 3, 3, dtype=DT)
    with pytest.raises(ValueError, match="channels"):
        Conv2dOp(w, None, (2, 5, 5))
    with pytest.raises(ValueError, match="does not fit"):
        Conv2dOp(w, None, (3, 2, 2))


def test_linear_op_rejects_mismatched_input():
    with pytest.raises(ValueError, match="expects 6 inputs"):
        LinearOp(torch.randn(4, 6, dtype=DT), None, in_shape=(5,))


def test_network_rejects_mismatched_affines():
    a = LinearOp(torch.randn(4, 3, dtype=DT), None)
    b = LinearOp(torch.randn(2, 5, dtype=DT), None)
    with pytest.raises(ValueError, match="affine 0"):
        pl.Network([a, b], (3,))
    with pytest.raises(ValueError, match="input shape"):
        pl.Network([a], (4,))
    with pytest.raises(ValueError):
        pl.Network([], (3,))

"""Affine operators the ONNX converter needs beyond :mod:`polytope_lab.network`, and the folding of
consecutive operators into one (normalisation into the next layer, a permutation into a dense layer).

* :class:`ElementwiseOp`: ``x -> s ⊙ x + t`` with constant ``s``, ``t`` of the full shape (Add/Sub/Mul/Div
  by constants, BatchNormalization);
* :class:`IndexOp`: ``out[k] = in[src[k]]`` (Transpose, Slice, Gather with constant indices);
* :class:`ScatterOp`: ``out[dst[k]] = in[k]``, zero elsewhere (one input of a Concat);
* :func:`simplify`: an operator with its parts merged where that is exact (e.g. ``Elementwise → Linear``
  becomes one ``LinearOp``), so the backends see as few operators as possible.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from .composite import ComposedOp, LinearPartOp, SumOp
from .network import Affine, Conv2dOp, IdentityOp, LinearOp, numel


class ElementwiseOp(Affine):
    """``x -> scale ⊙ x + shift``; ``scale`` and ``shift`` are tensors of shape ``shape``."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, shape):
        self.in_shape = self.out_shape = tuple(shape)
        self.scale = scale.reshape(self.in_shape)
        self.shift = shift.reshape(self.in_shape)

    def linear(self, x):
        return x.reshape(x.shape[0], *self.in_shape) * self.scale

    def transpose(self, y):
        return y.reshape(y.shape[0], *self.out_shape) * self.scale

    def bias(self):
        return self.shift

    def interval(self, center, radius):
        return self.forward(center), radius.reshape(radius.shape[0], *self.in_shape) * self.scale.abs()

    def as_matrix(self):
        return sp.diags(self.scale.detach().double().cpu().reshape(-1).numpy()).tocsr()

    def to(self, device=None, dtype=None):
        return ElementwiseOp(self.scale.to(device=device, dtype=dtype), self.shift.to(device=device, dtype=dtype),
                             self.in_shape)

    @property
    def cost(self):
        return self.in_features


class IndexOp(Affine):
    """``out.flat[k] = in.flat[src[k]]``: a rearrangement (permutation, slice, gather) of the input."""

    def __init__(self, src, in_shape, out_shape, reference: torch.Tensor):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.src = torch.as_tensor(np.asarray(src).reshape(-1), dtype=torch.long, device=reference.device)
        if self.src.numel() != numel(self.out_shape):
            raise ValueError(f"IndexOp: {self.src.numel()} indices for output shape {self.out_shape}")
        self._zero = reference.new_zeros(self.out_shape)

    def linear(self, x):
        return x.reshape(x.shape[0], -1)[:, self.src].reshape(x.shape[0], *self.out_shape)

    def transpose(self, y):
        out = y.new_zeros(y.shape[0], self.in_features)
        out.index_add_(1, self.src, y.reshape(y.shape[0], -1))
        return out.reshape(y.shape[0], *self.in_shape)

    def bias(self):
        return self._zero

    def interval(self, center, radius):
        return self.linear(center), self.linear(radius)

    def as_matrix(self):
        n = self.out_features
        return sp.csr_matrix((np.ones(n), (np.arange(n), self.src.cpu().numpy())), shape=(n, self.in_features))

    def to(self, device=None, dtype=None):
        ref = self._zero.to(device=device, dtype=dtype)
        return IndexOp(self.src.cpu().numpy(), self.in_shape, self.out_shape, ref)

    @property
    def cost(self):
        return self.out_features


class ScatterOp(Affine):
    """``out.flat[dst[k]] = in.flat[k]``, zero elsewhere: one input's place in a Concat (distinct ``dst``)."""

    def __init__(self, dst, in_shape, out_shape, reference: torch.Tensor):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.dst = torch.as_tensor(np.asarray(dst).reshape(-1), dtype=torch.long, device=reference.device)
        if self.dst.numel() != numel(self.in_shape) or self.dst.unique().numel() != self.dst.numel():
            raise ValueError(f"ScatterOp: needs {numel(self.in_shape)} distinct positions")
        self._zero = reference.new_zeros(self.out_shape)

    def linear(self, x):
        out = x.new_zeros(x.shape[0], self.out_features)
        out[:, self.dst] = x.reshape(x.shape[0], -1)
        return out.reshape(x.shape[0], *self.out_shape)

    def transpose(self, y):
        return y.reshape(y.shape[0], -1)[:, self.dst].reshape(y.shape[0], *self.in_shape)

    def bias(self):
        return self._zero

    def interval(self, center, radius):
        return self.linear(center), self.linear(radius)

    def as_matrix(self):
        n = self.in_features
        return sp.csr_matrix((np.ones(n), (self.dst.cpu().numpy(), np.arange(n))), shape=(self.out_features, n))

    def to(self, device=None, dtype=None):
        ref = self._zero.to(device=device, dtype=dtype)
        return ScatterOp(self.dst.cpu().numpy(), self.in_shape, self.out_shape, ref)

    @property
    def cost(self):
        return self.in_features


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def _per_channel(t: torch.Tensor):
    """The per-channel values of a (C, H, W) tensor constant over H, W, else None."""
    if t.dim() != 3:
        return None
    first = t[:, :1, :1]
    return first.reshape(-1) if torch.equal(t, first.expand_as(t)) else None


def _linear_then_linear(a: LinearOp, b: LinearOp):
    m, n = a.weight.shape
    p = b.weight.shape[0]
    if p * n > m * n + p * m:  # the product would be larger than the two factors
        return None
    return LinearOp(b.weight @ a.weight, b.weight @ a.bias() + b.bias(), a.in_shape)


def _elementwise_then_conv(a: ElementwiseOp, b: Conv2dOp):
    s, t = _per_channel(a.scale), _per_channel(a.shift)
    if s is None or t is None or a.in_shape != b.in_shape:
        return None
    if any(b.padding) and bool((t != 0).any()):  # the padded zeros would not be shifted
        return None
    w = b.weight * s.reshape(1, -1, 1, 1)
    bias = b.channel_bias + (b.weight * t.reshape(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    return Conv2dOp(w, bias, b.in_shape, b.stride, b.padding, b.dilation)


def _conv_then_elementwise(a: Conv2dOp, b: ElementwiseOp):
    s, t = _per_channel(b.scale), _per_channel(b.shift)
    if s is None or t is None or a.out_shape != b.in_shape:
        return None
    return Conv2dOp(a.weight * s.reshape(-1, 1, 1, 1), a.channel_bias * s + t, a.in_shape, a.stride, a.padding,
                    a.dilation)


def merge(a: Affine, b: Affine):
    """One operator equal to ``b ∘ a``, or None when there is no exact cheaper one."""
    if isinstance(b, LinearPartOp) and isinstance(b.op, LinearOp):  # a dense layer whose bias is added elsewhere
        b = LinearOp(b.op.weight, None, b.op.in_shape)
    if isinstance(a, ElementwiseOp) and isinstance(b, ElementwiseOp):
        return ElementwiseOp(_flat(a.scale) * _flat(b.scale), _flat(a.shift) * _flat(b.scale) + _flat(b.shift),
                             a.in_shape)
    if isinstance(a, ElementwiseOp) and isinstance(b, LinearOp):
        return LinearOp(b.weight * _flat(a.scale)[None, :], b.bias() + b.weight @ _flat(a.shift), a.in_shape)
    if isinstance(a, LinearOp) and isinstance(b, ElementwiseOp):
        s = _flat(b.scale)
        return LinearOp(a.weight * s[:, None], a.bias() * s + _flat(b.shift), a.in_shape)
    if isinstance(a, IndexOp) and isinstance(b, LinearOp):
        w = b.weight.new_zeros(b.weight.shape[0], a.in_features)
        w.index_add_(1, a.src, b.weight)
        return LinearOp(w, b.bias(), a.in_shape)
    if isinstance(a, ScatterOp) and isinstance(b, LinearOp):
        return LinearOp(b.weight[:, a.dst], b.bias(), a.in_shape)
    if isinstance(a, IndexOp) and isinstance(b, IndexOp):
        return IndexOp(a.src[b.src].cpu().numpy(), a.in_shape, b.out_shape, a.bias())
    if isinstance(a, LinearOp) and isinstance(b, LinearOp):
        return _linear_then_linear(a, b)
    if isinstance(a, ElementwiseOp) and isinstance(b, Conv2dOp):
        return _elementwise_then_conv(a, b)
    if isinstance(a, Conv2dOp) and isinstance(b, ElementwiseOp):
        return _conv_then_elementwise(a, b)
    return None


def simplify(op: Affine) -> Affine:
    """``op`` with consecutive parts merged (:func:`merge`) wherever that is exact; same map."""
    if isinstance(op, SumOp):
        return SumOp([simplify(p) for p in op.parts])
    if isinstance(op, LinearPartOp):
        return LinearPartOp(simplify(op.op))
    if not isinstance(op, ComposedOp):
        return op
    out = []
    for part in op.parts:
        part = simplify(part)
        out.extend(part.parts if isinstance(part, ComposedOp) else [part])
        while len(out) >= 2:
            merged = merge(out[-2], out[-1])
            if merged is None:
                break
            out[-2:] = [merged]
    if len(out) > 1:
        out = [p for p in out if not isinstance(p, IdentityOp)] or out[:1]
    return out[0] if len(out) == 1 else ComposedOp(out)


__all__ = ["ElementwiseOp", "IndexOp", "ScatterOp", "merge", "simplify"]

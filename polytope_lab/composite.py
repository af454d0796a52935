"""Operators built from others: consecutive affine maps (``ComposedOp``), a sum of maps of one input
(``SumOp``) and a map without its bias (``LinearPartOp``), for the converters (PyTorch, ONNX)."""
from __future__ import annotations

import torch

from .network import Affine


class ComposedOp(Affine):
    """Consecutive affine maps with no ReLU between them, applied in order."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.in_shape, self.out_shape = self.parts[0].in_shape, self.parts[-1].out_shape

    def linear(self, x):
        for p in self.parts:
            x = p.linear(x)
        return x

    def transpose(self, y):
        for p in reversed(self.parts):
            y = p.transpose(y)
        return y

    def bias(self):
        b = self.parts[0].bias()
        for p in self.parts[1:]:
            b = p.forward(b.unsqueeze(0))[0]
        return b

    def interval(self, center, radius):
        for p in self.parts:
            center, radius = p.interval(center, radius)
        return center, radius

    def as_matrix(self):
        m = self.parts[0].as_matrix()
        for p in self.parts[1:]:
            m = p.as_matrix() @ m
        return m.tocsr()

    def to(self, device=None, dtype=None):
        return ComposedOp([p.to(device, dtype) for p in self.parts])

    @property
    def cost(self):
        return sum(p.cost for p in self.parts)


class SumOp(Affine):
    """Affine maps of the same input added: ``x -> Σ_p (W_p x + b_p)`` (paths that meet again).
    Its interval image adds the parts' images: sound, and exact unless the parts' signs cancel."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.in_shape, self.out_shape = self.parts[0].in_shape, self.parts[0].out_shape
        for p in self.parts[1:]:
            if p.in_features != self.in_features or p.out_features != self.out_features:
                raise ValueError(f"cannot add affine maps {p.in_shape}->{p.out_shape} and "
                                 f"{self.in_shape}->{self.out_shape}")

    def linear(self, x):
        return sum(p.linear(x).reshape(x.shape[0], *self.out_shape) for p in self.parts)

    def transpose(self, y):
        return sum(p.transpose(y).reshape(y.shape[0], *self.in_shape) for p in self.parts)

    def bias(self):
        return sum(p.bias().reshape(self.out_shape) for p in self.parts)

    def interval(self, center, radius):
        images = [p.interval(center, radius) for p in self.parts]
        B = center.shape[0]
        return (sum(c.reshape(B, *self.out_shape) for c, _ in images),
                sum(r.reshape(B, *self.out_shape) for _, r in images))

    def as_matrix(self):
        return sum(p.as_matrix() for p in self.parts).tocsr()

    def to(self, device=None, dtype=None):
        return SumOp([p.to(device, dtype) for p in self.parts])

    @property
    def cost(self):
        return sum(p.cost for p in self.parts)


class LinearPartOp(Affine):
    """``x -> W x``: an operator without its bias (an affine map applied to a sum adds its bias once)."""

    def __init__(self, op: Affine):
        self.op = op
        self.in_shape, self.out_shape = op.in_shape, op.out_shape

    def linear(self, x):
        return self.op.linear(x)

    def transpose(self, y):
        return self.op.transpose(y)

    def bias(self):
        return torch.zeros_like(self.op.bias())

    def interval(self, center, radius):
        c, r = self.op.interval(center, radius)
        return c - self.op.bias(), r

    def as_matrix(self):
        return self.op.as_matrix()

    def to(self, device=None, dtype=None):
        return LinearPartOp(self.op.to(device, dtype))

    @property
    def cost(self):
        return self.op.cost


__all__ = ["ComposedOp", "SumOp", "LinearPartOp"]

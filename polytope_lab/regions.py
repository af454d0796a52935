"""Input regions: boxes, L∞ balls (optionally intersected with a clip box; a box too) and L2 balls, batched.

A region answers two questions the backends ask: its bounding box (interval, big-M, LP variable
bounds) and its support function ``max_{x' in region} vᵀx'`` (the dual's input term).
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch


def _as_eps(eps, batch: int, like: torch.Tensor) -> torch.Tensor:
    """``eps`` (float, 0-d tensor, numpy scalar or (B,) tensor) as a (B,) tensor; checks finiteness and sign."""
    if isinstance(eps, torch.Tensor):
        e = eps.detach().to(device=like.device, dtype=like.dtype)
    elif isinstance(eps, (numbers.Real, np.generic)) or (isinstance(eps, np.ndarray) and eps.ndim == 0):
        e = torch.tensor(float(eps), device=like.device, dtype=like.dtype)
    elif isinstance(eps, np.ndarray):
        e = torch.as_tensor(eps, device=like.device, dtype=like.dtype)
    else:
        raise ValueError(f"eps must be a float, a 0-d tensor, a numpy scalar or a (B,) tensor, got {type(eps).__name__}")
    if e.dim() == 0:
        e = e.expand(batch)
    if e.shape != (batch,):
        raise ValueError(f"eps has shape {tuple(e.shape)}; expected a scalar or one value per example, shape ({batch},)")
    if not torch.isfinite(e).all():
        raise ValueError("eps contains NaN or inf")
    if (e < 0).any():
        raise ValueError(f"eps must be >= 0, got min {e.min().item():g}")
    return e


def _check_x(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x), dtype=torch.get_default_dtype())
    if x.dim() < 2:
        raise ValueError(f"x must be batched, shape (B, *input_shape); got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf")
    return x.detach().clone()  # the region must not change when the caller's x does


class Region:
    """Base class: a batch of B convex input sets around ``x`` (shape (B, *input_shape))."""

    x: torch.Tensor
    eps: torch.Tensor  # (B,)

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x.shape[1:])

    def box(self):
        """(lo, hi), each (B, *input_shape): the tightest box containing the region."""
        raise NotImplementedError

    def support(self, v: torch.Tensor) -> torch.Tensor:
        """``max_{x' in region_b} v[b, j]ᵀ x'`` for v of shape (B or 1, m, *input_shape) -> (B, m)."""
        raise NotImplementedError

    def deviation(self, v: torch.Tensor) -> torch.Tensor:
        """``support(v) - v·center`` (how far the region moves ``vᵀx'``), from v of shape (B or 1, m, n)."""
        raise NotImplementedError

    @property
    def center(self) -> torch.Tensor:
        """Point ``c`` with ``support(v) = vᵀc + deviation(v)``, shape (B, *input_shape)."""
        raise NotImplementedError

    def select(self, index) -> "Region":
        """The sub-batch ``index`` (a slice or index tensor)."""
        raise NotImplementedError

    def to(self, device=None, dtype=None) -> "Region":
        raise NotImplementedError

    def contains(self, points: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
        """Whether each ``points[b]`` lies in region b, shape (B,)."""
        raise NotImplementedError

    def project(self, points: torch.Tensor) -> torch.Tensor:
        """Euclidean projection (L∞: exact clamp) of ``points`` (B, *input_shape) onto the region."""
        raise NotImplementedError

    def _flat(self, v):
        return v.reshape(v.shape[0], v.shape[1], -1)


def _as_bound(t, like=None) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        t = t.detach()
    else:
        dtype = like.dtype if isinstance(like, torch.Tensor) and like.is_floating_point() else None
        t = torch.as_tensor(np.asarray(t, dtype=np.float64), dtype=dtype or torch.get_default_dtype())
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _check_bounds(lo, hi):
    """``(lo, hi)`` as finite tensors of one broadcast shape (B, *input_shape) with ``lo <= hi``."""
    lo, hi = _as_bound(lo, hi), _as_bound(hi, lo)
    dtype = torch.promote_types(lo.dtype, hi.dtype)
    try:
        lo, hi = torch.broadcast_tensors(lo.to(dtype), hi.to(dtype))
    except RuntimeError:
        raise ValueError(f"lo {tuple(lo.shape)} and hi {tuple(hi.shape)} do not broadcast to one shape") from None
    if lo.dim() < 2:
        raise ValueError(f"lo and hi must be batched, shape (B, *input_shape); got shape {tuple(lo.shape)}")
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("lo or hi contains NaN or inf: a Box must be bounded in every coordinate")
    if (lo > hi).any():
        where = tuple(int(i) for i in torch.nonzero(lo > hi)[0])
        raise ValueError(f"empty box: lo > hi at index {where} ({lo[where].item():g} > {hi[where].item():g})")
    return lo.clone(), hi.clone()  # the region must not change when the caller's tensors do


def _widened_eps(x: torch.Tensor, eps: torch.Tensor, dtype, ord) -> tuple:
    """(x, eps) cast to ``dtype`` with eps grown by how far the cast moved x (its ``ord`` norm) and rounded
    up, so that the cast ball contains the original one (a cast to a wider dtype changes nothing)."""
    x_new = x.to(dtype)
    if x_new.dtype == x.dtype or not x_new.is_floating_point():
        return x_new, eps.to(dtype)
    wider = torch.promote_types(dtype, x.dtype)
    moved = (x_new.to(wider) - x.to(wider)).reshape(len(x), -1)
    gap = torch.linalg.vector_norm(moved, ord=ord, dim=1) if moved.shape[1] else moved.new_zeros(len(x))
    total = torch.nextafter(eps.to(wider) + gap, torch.full_like(gap, math.inf))  # the sum rounded up
    return x_new, _outward(total, dtype, False)


def _outward(t: torch.Tensor, dtype, down: bool) -> torch.Tensor:
    """``t`` cast to ``dtype``, rounded outward (down for lower, up for upper bounds) so the cast box
    contains the original one."""
    c = t.to(dtype)
    if dtype == t.dtype or not c.is_floating_point():
        return c
    wider = torch.promote_types(dtype, t.dtype)
    bad = c.to(wider) > t.to(wider) if down else c.to(wider) < t.to(wider)
    inf = torch.full_like(c, -math.inf if down else math.inf)
    return torch.where(bad, torch.nextafter(c, inf), c)


class Box(Region):
    """``{x' : lo ≤ x' ≤ hi}`` per coordinate; ``lo``, ``hi`` (B, *input_shape) or broadcastable to it.

    ``x`` is the centre ``(lo + hi)/2``, ``radius`` the per-coordinate half-width and ``eps`` (B,) the
    largest half-width (the box lies in the L∞ ball of radius ``eps`` around ``x``). An L∞ ball ∩ a clip
    box is a Box (:class:`LinfBall`). ``to(dtype)`` rounds the bounds outward: the cast box contains the
    original one.
    """

    def __init__(self, lo, hi):
        self._set_box(*_check_bounds(lo, hi))
        self.x = (self._lo + self._hi) / 2

    def _set_box(self, lo, hi):
        self._lo, self._hi = lo, hi
        n = int(np.prod(lo.shape[1:]))
        self.eps = self.radius.reshape(lo.shape[0], n).amax(1) if n and lo.shape[0] else lo.new_zeros(lo.shape[0])

    @property
    def cubic(self) -> bool:
        """Whether the half-width is ``eps`` in every coordinate (an L∞ ball without clip): the dual's input
        term is then ``eps‖ν̂‖₁``."""
        return False

    def box(self):
        return self._lo, self._hi

    @property
    def center(self):
        return self.x

    @property
    def radius(self) -> torch.Tensor:
        """Per-coordinate half-width of the box, (B, *input_shape)."""
        return (self._hi - self._lo) / 2

    def deviation(self, v):
        rad = self.radius.reshape(self.batch_size, 1, -1)
        return (self._flat(v).abs() * rad).sum(-1)

    def support(self, v):
        c = self.center.reshape(self.batch_size, 1, -1)
        return (self._flat(v) * c).sum(-1) + self.deviation(v)

    def select(self, index):
        return Box(self._lo[index], self._hi[index])

    def to(self, device=None, dtype=None):
        dtype = dtype or self._lo.dtype
        lo, hi = _outward(self._lo, dtype, True), _outward(self._hi, dtype, False)
        return Box(lo.to(device=device), hi.to(device=device))

    def contains(self, points, tol=1e-6):
        p = points.reshape(points.shape[0], -1)
        return ((p >= self._lo.reshape(p.shape) - tol) & (p <= self._hi.reshape(p.shape) + tol)).all(1)

    def project(self, points):
        return torch.max(torch.min(points, self._hi), self._lo)

    def representable_point(self, points: torch.Tensor, dtype) -> torch.Tensor:
        """``points`` projected onto the box, then rounded to ``dtype`` values that still lie in it (one
        step towards the inside where the nearest one falls outside: the edge x ± eps of a float32 ball is
        often no float32 number), returned in the box's dtype. For reporting a witness in the caller's
        precision that the box contains exactly."""
        lo, hi = self.box()
        y = self.project(points).to(dtype)
        y = torch.where(y.to(lo.dtype) > hi, torch.nextafter(y, torch.full_like(y, -math.inf)), y)
        y = torch.where(y.to(lo.dtype) < lo, torch.nextafter(y, torch.full_like(y, math.inf)), y)
        return y.to(lo.dtype)

    def __repr__(self):
        return f"Box(B={self.batch_size}, shape={self.input_shape}, max radius={self.eps.tolist()[:4]})"


class LinfBall(Box):
    """``{x' : ‖x' − x‖∞ ≤ eps}``, intersected with ``[lo, hi]`` when ``clip=(lo, hi)`` is given: a
    :class:`Box` that keeps its centre ``x`` and ``eps`` (the given ones, also when clipped)."""

    def __init__(self, x, eps, clip=None):
        self.x = _check_x(x)
        eps = _as_eps(eps, self.x.shape[0], self.x)
        if clip is not None:
            lo, hi = (float(c) for c in clip)
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
                raise ValueError(f"clip must be a finite (lo, hi) with lo <= hi, got {clip}")
            if ((self.x < lo - 1e-12) | (self.x > hi + 1e-12)).any():
                raise ValueError(f"x lies outside the clip box {clip}")
            clip = (lo, hi)
            self.x = self.x.clamp(lo, hi)  # x up to 1e-12 outside (rounding) moves in: the box is never empty
        self.clip = clip
        e = eps.reshape(-1, *([1] * (self.x.dim() - 1)))
        lo_, hi_ = self.x - e, self.x + e
        if clip is not None:
            lo_, hi_ = lo_.clamp(min=clip[0]), hi_.clamp(max=clip[1])
        self._set_box(lo_, hi_)
        self.eps = eps

    @property
    def cubic(self) -> bool:
        return self.clip is None

    @property
    def center(self):
        return self.x if self.clip is None else (self._lo + self._hi) / 2

    def deviation(self, v):
        if self.clip is None:
            return self.eps[:, None] * torch.linalg.vector_norm(self._flat(v), ord=1, dim=-1)
        return super().deviation(v)

    def select(self, index):
        return LinfBall(self.x[index], self.eps[index], self.clip)

    def to(self, device=None, dtype=None):
        """On ``device`` in ``dtype``; a narrowing cast grows eps so the cast ball contains this one."""
        x, eps = _widened_eps(self.x, self.eps, dtype or self.x.dtype, math.inf)
        return LinfBall(x.to(device=device), eps.to(device=device), self.clip)

    def __repr__(self):
        return f"LinfBall(B={self.batch_size}, shape={self.input_shape}, eps={self.eps.tolist()[:4]}, clip={self.clip})"


class L2Ball(Region):
    """``{x' : ‖x' − x‖₂ ≤ eps}``."""

    def __init__(self, x, eps):
        self.x = _check_x(x)
        self.eps = _as_eps(eps, self.x.shape[0], self.x)
        self.clip = None

    def box(self):
        e = self.eps.reshape(-1, *([1] * (self.x.dim() - 1)))
        return self.x - e, self.x + e

    @property
    def center(self):
        return self.x

    def deviation(self, v):
        return self.eps[:, None] * self._flat(v).norm(dim=-1)

    def support(self, v):
        c = self.x.reshape(self.batch_size, 1, -1)
        return (self._flat(v) * c).sum(-1) + self.deviation(v)

    def select(self, index):
        return L2Ball(self.x[index], self.eps[index])

    def to(self, device=None, dtype=None):
        """On ``device`` in ``dtype``; a narrowing cast grows eps so the cast ball contains this one."""
        x, eps = _widened_eps(self.x, self.eps, dtype or self.x.dtype, 2)
        return L2Ball(x.to(device=device), eps.to(device=device))

    def contains(self, points, tol=1e-6):
        d = (points - self.x).reshape(points.shape[0], -1).norm(dim=1)
        return d <= self.eps + tol

    def project(self, points):
        d = (points - self.x).reshape(points.shape[0], -1)
        n = d.norm(dim=1, keepdim=True).clamp(min=1e-30)
        scale = torch.clamp(self.eps[:, None] / n, max=1.0)
        return self.x + (d * scale).reshape(points.shape)

    def __repr__(self):
        return f"L2Ball(B={self.batch_size}, shape={self.input_shape}, eps={self.eps.tolist()[:4]})"

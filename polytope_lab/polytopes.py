"""Two-dimensional adversarial polytopes: the true output set of a 2-D input box, and convex outer bounds.

For a network with 2 inputs and 2 outputs (the paper's §4.1 toy domain) everything can be drawn:

* the true set ``{f(x') : x' in box}``: the image of a triangulated grid of the box (:func:`input_grid`,
  :func:`image_of_box`); its area is that of the union of the image triangles, rasterised
  (:func:`coverage`) — exact on every linear piece of ``f`` the grid resolves;
* a convex outer bound: any bounder's lower/upper bounds of ``C f(x')`` give half-planes
  ``c_jᵀz ≥ lower_j`` and ``c_jᵀz ≤ upper_j``; :func:`outer_polygon` intersects them
  (``scipy.spatial.HalfspaceIntersection``). With ``C = unit_directions(k)`` that is 2k evenly spread
  directions, so the polygon approaches the bounder's convex set as k grows.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linprog
from scipy.spatial import ConvexHull, HalfspaceIntersection

from .convert import as_network
from .regions import Region

#: pairs (triangle, pixel) tested at once by :func:`coverage` (bounds its memory)
_CHUNK = 2_000_000


def unit_directions(k: int, scale=None, dtype=torch.float64) -> torch.Tensor:
    """(k, 2) unit vectors at angles ``π·j/k``, j = 0..k−1: with both lower and upper bounds of each row
    they give 2k directions spaced ``π/k`` apart around the circle (j = 0 and, for even k, j = k/2 are the
    axes, so the polygon lies in the bounder's own bounding box).

    ``scale`` (s₁, s₂), e.g. the set's widths: the angles are evenly spaced after dividing the axes by
    ``scale`` (rows ∝ (cos θ/s₁, sin θ/s₂)), so a set 1000× longer than wide still gets directions
    where its boundary turns instead of 2k nearly parallel ones.
    """
    if int(k) < 2:
        raise ValueError(f"need at least 2 directions, got k={k!r}")
    angles = torch.arange(int(k), dtype=torch.float64) * math.pi / int(k)
    C = torch.stack([angles.cos(), angles.sin()], dim=1)
    if scale is not None:
        s = torch.as_tensor(scale, dtype=torch.float64).reshape(-1)
        if s.shape != (2,) or not (torch.isfinite(s).all() and (s > 0).all()):
            raise ValueError(f"scale must be two finite positive numbers, got {scale!r}")
        C = C / s
        C = C / C.norm(dim=1, keepdim=True)
    return C.to(dtype)


def _halfspaces(C, lower, upper=None) -> np.ndarray:
    """Rows ``[a, b]`` meaning ``aᵀz + b ≤ 0``, from ``cᵀz ≥ lower`` (and ``cᵀz ≤ upper``)."""
    C = np.asarray(torch.as_tensor(C, dtype=torch.float64).cpu(), dtype=float)
    lower = np.asarray(torch.as_tensor(lower, dtype=torch.float64).cpu(), dtype=float).reshape(-1)
    if C.ndim != 2 or C.shape[1] != 2 or C.shape[0] != lower.shape[0]:
        raise ValueError(f"C must be (m, 2) with one lower bound per row; got C {C.shape}, lower {lower.shape}")
    rows = [np.column_stack([-C, lower])]                       # −cᵀz + lower ≤ 0
    if upper is not None:
        upper = np.asarray(torch.as_tensor(upper, dtype=torch.float64).cpu(), dtype=float).reshape(-1)
        if upper.shape != lower.shape:
            raise ValueError(f"upper has shape {upper.shape}, lower {lower.shape}")
        rows.append(np.column_stack([C, -upper]))               # cᵀz − upper ≤ 0
    H = np.concatenate(rows)
    if not np.isfinite(H).all():
        raise ValueError("C and the bounds must be finite")
    return H


def outer_polygon(C, lower, upper=None) -> np.ndarray:
    """Vertices (V, 2), counter-clockwise, of ``{z : C z ≥ lower, C z ≤ upper}`` (``upper`` optional).

    C: (m, 2) directions, lower/upper: (m,). The set must be bounded with a non-empty interior (it
    contains the true output set, so sound bounds always give one); ValueError otherwise.
    """
    H = _halfspaces(C, lower, upper)
    A, b = H[:, :2], H[:, 2]
    norms = np.linalg.norm(A, axis=1)
    if (norms == 0).any():
        raise ValueError("C has a zero row")
    # Chebyshev centre: max r s.t. aᵀz + r‖a‖ ≤ −b (a strictly interior point for HalfspaceIntersection)
    res = linprog([0, 0, -1], A_ub=np.column_stack([A, norms]), b_ub=-b,
                  bounds=[(None, None), (None, None), (0, None)], method="highs")
    if res.status == 3:
        raise ValueError("the half-planes do not bound a polygon (add directions on every side)")
    if res.status != 0 or res.x[2] <= 1e-12 * max(1.0, np.abs(b).max()):
        raise ValueError("the half-planes have no common interior: empty or degenerate set")
    points = HalfspaceIntersection(H, res.x[:2]).intersections
    hull = ConvexHull(points)
    return points[hull.vertices]                                # ConvexHull lists 2-D vertices CCW


def polygon_area(vertices) -> float:
    """Area of a simple polygon with vertices (V, 2) in order (shoelace formula)."""
    v = np.asarray(vertices, dtype=float)
    if v.ndim != 2 or v.shape[1] != 2:
        raise ValueError(f"vertices must be (V, 2), got {v.shape}")
    if len(v) < 3:
        return 0.0
    x, y = v[:, 0], v[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def hull_area(points) -> float:
    """Area of the convex hull of points (N, 2): a lower bound on the area of any convex outer bound."""
    p = np.asarray(points, dtype=float)
    try:
        return float(ConvexHull(p).volume)
    except Exception:  # fewer than 3 points or all collinear (Qhull error): a set of zero area
        return 0.0


def _points(points) -> np.ndarray:
    p = np.asarray(torch.as_tensor(points, dtype=torch.float64).cpu(), dtype=float)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"points must be (N, 2), got {p.shape}")
    return p


def inside(points, C, lower, upper=None, tol: float = 0.0) -> np.ndarray:
    """Per point (N, 2): whether ``C z ≥ lower − tol`` (and ``C z ≤ upper + tol``) — membership in the
    outer polygon, read off the half-planes directly."""
    H = _halfspaces(C, lower, upper)
    return (_points(points) @ H[:, :2].T + H[:, 2] <= tol).all(axis=1)


def slack(points, C, lower, upper=None) -> np.ndarray:
    """Per half-plane, ``min_z (cᵀz − lower)`` over the points (N, 2) — then ``min_z (upper − cᵀz)``:
    (m,) or (2m,). Negative: some point violates the bound (unsound); near 0: the bound touches the set."""
    H = _halfspaces(C, lower, upper)
    return -(_points(points) @ H[:, :2].T + H[:, 2]).max(axis=0)


def input_grid(lo, hi, n: int):
    """A triangulated n×n grid of the 2-D box [lo, hi]: points (n², 2) float64 and triangles (2(n−1)², 3)."""
    lo, hi = (np.asarray(torch.as_tensor(t, dtype=torch.float64).cpu(), dtype=float).reshape(-1) for t in (lo, hi))
    if lo.shape != (2,) or hi.shape != (2,):
        raise ValueError(f"the box must be 2-D, got lo {lo.shape}, hi {hi.shape}")
    if int(n) < 2 or (hi < lo).any():
        raise ValueError(f"need n ≥ 2 and lo ≤ hi, got n={n}, lo={lo}, hi={hi}")
    n = int(n)
    xs, ys = np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n)
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    points = np.column_stack([gx.ravel(), gy.ravel()])
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, 1:].ravel()
    triangles = np.concatenate([np.column_stack([a, b, d]), np.column_stack([a, d, c])])
    return points, triangles


def image_of_box(model, region: Region, n: int = 200):
    """The network's outputs on a triangulated n×n grid of the region's box (one example, 2-D input).

    Returns ``(inputs (n², 2), outputs (n², m), triangles (2(n−1)², 3))`` as float64 arrays; the outputs
    are evaluated in the network's own precision, i.e. exactly the function the bounders bound.
    """
    if region.batch_size != 1 or int(np.prod(region.input_shape)) != 2:
        raise ValueError(f"need one example with a 2-D input, got batch {region.batch_size}, "
                         f"input shape {region.input_shape}")
    network = as_network(model, region.input_shape)
    lo, hi = (t[0].reshape(-1) for t in region.box())
    inputs, triangles = input_grid(lo, hi, n)
    x = torch.as_tensor(inputs, dtype=network.dtype, device=region.x.device).reshape(-1, *region.input_shape)
    with torch.no_grad():
        outputs = network(x).reshape(len(inputs), -1)
    return inputs, outputs.double().cpu().numpy(), triangles


def coverage(points, triangles, resolution: int = 400):
    """Rasterised union of the triangles ``points[triangles]`` (points (N, 2), triangles (T, 3)).

    Pixels of an R×R grid over the points' bounding box count as covered when their centre lies in
    some triangle (either orientation: a ReLU network can fold the plane). Returns
    ``(mask (R, R) bool, indexed [x, y], extent (xmin, xmax, ymin, ymax), area)``.
    """
    p = np.asarray(points, dtype=float)
    t = np.asarray(triangles, dtype=np.int64)
    if p.ndim != 2 or p.shape[1] != 2 or t.ndim != 2 or t.shape[1] != 3:
        raise ValueError(f"points must be (N, 2) and triangles (T, 3), got {p.shape} and {t.shape}")
    R = int(resolution)
    if R < 1:
        raise ValueError(f"resolution must be ≥ 1, got {resolution}")
    lo, hi = p.min(axis=0), p.max(axis=0)
    extent = (lo[0], hi[0], lo[1], hi[1])
    mask = np.zeros((R, R), dtype=bool)
    h = (hi - lo) / R
    if (h <= 0).any():                                        # a segment or a point: zero area
        return mask, extent, 0.0
    P = p[t]                                                  # (T, 3, 2)
    e, f = P[:, 1] - P[:, 0], P[:, 2] - P[:, 0]
    P = P[e[:, 0] * f[:, 1] - e[:, 1] * f[:, 0] != 0]         # flat triangles cover nothing
    # pixel i has centre lo + (i + ½)h; a triangle's bounding box holds the centres i0..i1
    i0 = np.clip(np.ceil((P.min(axis=1) - lo) / h - 0.5), 0, R - 1).astype(np.int64)   # (T, 2)
    i1 = np.clip(np.floor((P.max(axis=1) - lo) / h - 0.5), 0, R - 1).astype(np.int64)
    n = np.maximum(i1 - i0 + 1, 0)                            # (T, 2)
    counts = n[:, 0] * n[:, 1]
    ends = np.cumsum(counts)
    start = 0
    while start < len(P):                                     # chunks of at most _CHUNK (triangle, pixel) pairs
        stop = max(start + 1, int(np.searchsorted(ends, ends[start] - counts[start] + _CHUNK, side="right")))
        _cover(mask, P[start:stop], i0[start:stop], n[start:stop], counts[start:stop], lo, h)
        start = stop
    return mask, extent, float(mask.sum() * h[0] * h[1])


def _cover(mask, P, i0, n, counts, lo, h):
    """Mark the pixels of ``mask`` whose centres lie in the triangles P (T, 3, 2) (bounding boxes i0, n)."""
    tri = np.repeat(np.arange(len(P)), counts)
    k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    ix = i0[tri, 0] + k % np.maximum(n[tri, 0], 1)
    iy = i0[tri, 1] + k // np.maximum(n[tri, 0], 1)
    c = lo + (np.column_stack([ix, iy]) + 0.5) * h            # (pairs, 2) pixel centres
    a, b, d = P[tri, 0], P[tri, 1], P[tri, 2]

    def edge(u, v):                                           # sign of the cross product (v − u) × (c − u)
        return (v[:, 0] - u[:, 0]) * (c[:, 1] - u[:, 1]) - (v[:, 1] - u[:, 1]) * (c[:, 0] - u[:, 0])

    e1, e2, e3 = edge(a, b), edge(b, d), edge(d, a)
    hit = ((e1 >= 0) & (e2 >= 0) & (e3 >= 0)) | ((e1 <= 0) & (e2 <= 0) & (e3 <= 0))
    mask[ix[hit], iy[hit]] = True


__all__ = ["unit_directions", "outer_polygon", "polygon_area", "hull_area", "inside", "slack", "input_grid",
           "image_of_box", "coverage"]

"""Tighter dual bounds: the intermediate bounds' lower slopes as a choice, and α optimised for every
bounded layer (tight mode). Equations and measurements: docs/tight.md.

On an unstable unit (l < 0 < u) the dual step is ``ω = α[ω̂]₊ + d[ω̂]₋`` with the upper slope
``d = u/(u−l)`` (the chord, the only one of the triangle relaxation) and any lower slope ``α ∈ [0, 1]``
(``z ≥ α ẑ`` holds for every such α): every α gives a dual feasible point, so J(α) (eq. 23) is a sound
lower bound, whichever α, and whatever sound bounds l, u of the layers below are used. Choices of α:
- "fixed": Algorithm 1's ``α = d`` (the paper; ``backward(..., alpha=None)``);
- "adaptive": CROWN's ``α = 1`` where ``u ≥ −l``, else 0 (the lower line of smaller area);
- "best": both, and per unit the larger lower / smaller upper bound (both sound, so their intersection is);
- optimised: projected gradient ascent (Adam, α clamped to [0, 1]) from the better of fixed and adaptive
  per row, the best iterate kept per row (:func:`ascend`).
"""
from __future__ import annotations

import torch

from .backward import backward
from .intermediate import FLOAT_BYTES
from .relu import relu_slopes, unstable_units
from ..network import Network
from ..regions import Region

SLOPES = ("fixed", "adaptive", "best")
AUTO_WORK = 2 ** 25  # floats per step of one layer's rows that intermediate_layers="auto" optimises
WORK_FACTOR = 8  # tensors of a row's size alive per layer in one ascent step (α, grad, Adam's 2, ω, ω̂, …)


def adaptive_slopes(l: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """CROWN's lower slope: 1 on I where ``u ≥ −l`` (else 0), 1 on I⁺, 0 on I⁻; same shape as l."""
    unstable = (l < 0) & (u > 0)
    return torch.where(unstable, (u >= -l).to(l.dtype), (l >= 0).to(l.dtype))


def per_row(slopes: torch.Tensor, m: int) -> torch.Tensor:
    """One slope tensor (B, *shape) as m rows (B, m, *shape) (a view)."""
    return slopes.unsqueeze(1).expand(slopes.shape[0], m, *slopes.shape[1:])


def start_alpha(network: Network, region: Region, bounds: list, rows: torch.Tensor, top: int):
    """The better of the fixed and the adaptive α per row: (α per ReLU layer below ``top`` (B, m, *shape),
    J (B, m) at that α). Both are sound; so is their per-row maximum."""
    m = rows.shape[1]
    fixed = [per_row(relu_slopes(l, u)[0], m) for l, u in bounds[:top]]
    adaptive = [per_row(adaptive_slopes(l, u), m) for l, u in bounds[:top]]
    J0 = backward(network, region, bounds, rows, top, fixed)[0]
    J1 = backward(network, region, bounds, rows, top, adaptive)[0]
    pick = J1 > J0
    alpha = [torch.where(pick.reshape(*pick.shape, *([1] * (a.dim() - 2))), b, a) for a, b in zip(fixed, adaptive)]
    return alpha, torch.maximum(J0, J1)


def ascend(network: Network, region: Region, bounds: list, rows: torch.Tensor, top: int, steps: int = 20,
           lr: float = 0.5, decay: float = 0.98, tol: float = 1e-6, patience: int = 5) -> torch.Tensor:
    """Sound lower bounds (B, m) of ``rowsᵀ ẑ`` at the output of affine ``top``, rows (B, m, *out_shape),
    maximised over α ∈ [0, 1] (one α per row and ReLU layer below ``top``).

    Starts at :func:`start_alpha`; then projected Adam (lr ``lr``, times ``decay`` per step) for at most
    ``steps`` steps, stopping early once the batch's summed best bound gained less than ``tol`` (relative)
    for ``patience`` steps in a row. Every iterate is a sound bound and the best per row is kept.
    Memory: about ``WORK_FACTOR`` tensors of B·m·n_j floats per layer j below ``top``; time per step: a
    backward pass of the m rows and its gradient (about 3 backward passes).
    """
    bounds = [(l.detach(), u.detach()) for l, u in bounds[:top]]
    with torch.no_grad():
        alpha, best = start_alpha(network, region, bounds, rows, top)
    if steps == 0 or not bounds:
        return best
    alpha = [a.clone().requires_grad_(True) for a in alpha]
    opt = torch.optim.Adam(alpha, lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, decay)
    stalled = 0
    for step in range(steps):
        with torch.enable_grad():
            J = backward(network, region, bounds, rows, top, alpha)[0]
            grads = torch.autograd.grad(-J.sum(), alpha)  # α only: never touches the model's .grad
        new = torch.maximum(best, J.detach())
        gain = float((new - best).sum()) / (float(new.abs().sum()) + 1e-12)
        best = new
        stalled = stalled + 1 if step and gain < tol else 0
        if stalled >= patience:
            return best
        for a, g in zip(alpha, grads):
            a.grad = g
        opt.step()
        sched.step()
        with torch.no_grad():
            for a in alpha:
                a.clamp_(0.0, 1.0)
    with torch.no_grad():
        return torch.maximum(best, backward(network, region, bounds, rows, top, alpha)[0])


def row_chunk(network: Network, B: int, top: int, max_memory: float) -> int:
    """Rows per :func:`ascend` call so that its tensors stay under ``max_memory`` bytes."""
    per_row = WORK_FACTOR * FLOAT_BYTES * B * sum(network.affines[j].out_features for j in range(top + 1))
    return max(1, int(max_memory // max(per_row, 1)))


def unit_rows(order: torch.Tensor, valid: torch.Tensor, shape, dtype) -> torch.Tensor:
    """Rows ``+e_q`` then ``−e_q`` for the units ``order`` (B, q) (0 rows where not ``valid``): (B, 2q, *shape)."""
    B, q = order.shape
    n = 1
    for s in shape:
        n *= s
    E = torch.zeros(B, q, n, dtype=dtype, device=order.device).scatter(2, order.unsqueeze(2), valid.unsqueeze(2).to(dtype))
    return torch.cat([E, -E], 1).reshape(B, 2 * q, *shape)


def bound_units(network: Network, region: Region, bounds: list, i: int, select: torch.Tensor, steps: int,
                lr: float, decay: float, max_memory: float, adaptive: bool = False):
    """(l, u) of layer i (B, *shape) with the units ``select`` (B, n) re-bounded by :func:`ascend` (``steps``
    = 0: the better of fixed and adaptive α; ``adaptive``: the adaptive α only) over ``bounds`` of the
    layers below, in chunks of units; the elementwise best of the old and new bounds is kept."""
    l, u = bounds[i]
    B, shape = l.shape[0], l.shape[1:]
    l, u = l.reshape(B, -1).clone(), u.reshape(B, -1).clone()
    units = unstable_units(select.to(l.dtype), select, l)
    q = units.order.shape[1]
    valid = torch.arange(q, device=l.device)[None, :] < select.sum(1)[:, None]
    step = max(1, row_chunk(network, B, i, max_memory) // 2)
    for start in range(0, q, step):
        order, ok = units.order[:, start:start + step], valid[:, start:start + step]
        rows = unit_rows(order, ok, shape, l.dtype)
        if adaptive:
            alpha = [per_row(adaptive_slopes(*lu), rows.shape[1]) for lu in bounds[:i]]
            J = backward(network, region, bounds, rows, i, alpha)[0]
        else:
            J = ascend(network, region, bounds, rows, i, steps, lr, decay)
        c = order.shape[1]
        lo, up = J[:, :c], -J[:, c:]
        l.scatter_(1, order, torch.where(ok, torch.maximum(l.gather(1, order), lo), l.gather(1, order)))
        u.scatter_(1, order, torch.where(ok, torch.minimum(u.gather(1, order), up), u.gather(1, order)))
    return l.reshape(B, *shape), u.reshape(B, *shape)


def unstable(l: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The mask of I (B, n)."""
    return ((l < 0) & (u > 0)).reshape(l.shape[0], -1)


def slope_bounds(network: Network, region: Region, fixed: list, slopes: str, max_memory: float = 2 ** 32) -> list:
    """Intermediate bounds with the chosen lower slopes, from Algorithm 1's fixed-slope bounds ``fixed``.

    "fixed": ``fixed`` unchanged. "adaptive": CROWN's chain, layer by layer, every unit of layer i ≥ 1
    bounded by rows ±e_j with the adaptive α over the adaptive bounds below (layer 0 does not depend on
    slopes). "best": per layer, the units still unstable under the fixed bounds re-bounded with the
    adaptive α over the best bounds below, and the elementwise best of both kept (both sound).
    Cost: one backward pass of 2·(units) rows per layer i, through layers i … 1.
    """
    if slopes not in SLOPES:
        raise ValueError(f"slopes must be one of {SLOPES}, got {slopes!r}")
    if slopes == "fixed":
        return list(fixed)
    out = [fixed[0]] if fixed else []
    for i in range(1, len(fixed)):
        l, u = fixed[i]
        select = None if slopes == "adaptive" else unstable(l, u)
        out.append(adaptive_layer(network, region, out, i, fixed[i], max_memory, select))
    return out


def adaptive_layer(network: Network, region: Region, below: list, i: int, given, max_memory: float, select=None):
    """(l, u) of layer i from rows ±e_j with the adaptive α over ``below``: of every unit (``select``
    None), or of the units ``select`` (B, n) only, intersected with the sound bounds ``given``."""
    l0, u0 = given
    B = l0.shape[0]
    if select is None:
        select = torch.ones(B, l0[0].numel(), dtype=torch.bool, device=l0.device)
        l, u = torch.full_like(l0, -float("inf")), torch.full_like(u0, float("inf"))
    else:
        l, u = l0, u0
    with torch.no_grad():
        return bound_units(network, region, below + [(l, u)], i, select, 0, 0.0, 1.0, max_memory, adaptive=True)


def optimized_layers(network: Network, bounds: list, layers="auto") -> list:
    """The ReLU layers i ≥ 1 whose α :func:`optimized_bounds` optimises: all (``layers`` None), the last k
    (an int), or ("auto") those whose rows cost at most ``AUTO_WORK`` floats per step:
    ``B · 2q_i · Σ_{j<i} n_j ≤ AUTO_WORK`` (q_i the batch's most unstable units); on the others the best
    of fixed and adaptive slopes stays (cheap, a fraction of the gain: the last layers matter most)."""
    n = len(bounds)
    if layers is None:
        return list(range(1, n))
    if isinstance(layers, int) and not isinstance(layers, bool):
        return list(range(max(1, n - layers), n))
    if layers != "auto":
        raise ValueError(f"intermediate_layers must be None, an int or 'auto', got {layers!r}")
    chosen = []
    for i in range(1, n):
        l, u = bounds[i]
        q = int(unstable(l, u).sum(1).max()) if l.shape[0] else 0
        below = sum(network.affines[j].out_features for j in range(i))
        if l.shape[0] * 2 * q * below <= AUTO_WORK:
            chosen.append(i)
    return chosen


def optimized_bounds(network: Network, region: Region, bounds: list, steps: int = 20, lr: float = 0.5,
                     decay: float = 0.98, max_memory: float = 2 ** 32, layers=None) -> list:
    """Intermediate bounds tightened layer by layer by optimised α: for each ReLU layer i ≥ 1 (or those in
    ``layers``, e.g. from :func:`optimized_layers`), bottom up, the rows ±e_j of its unstable units (per example, padded to the batch maximum
    q_i) maximised by :func:`ascend` over the already tightened layers below; the elementwise best of old
    and new bounds is kept (both sound).

    Memory per layer i: about ``WORK_FACTOR · 4 · B · 2q_i · Σ_{j≤i} n_j`` bytes, chunked over units to stay
    under ``max_memory``; time per layer: ``steps`` (or fewer, early stop) forward+backward passes of
    2q_i rows through layers 1 … i.
    """
    out = list(bounds)
    for i in range(1, len(out)):
        if layers is not None and i not in layers:
            continue
        mask = unstable(*out[i])
        if mask.any():
            out[i] = bound_units(network, region, out, i, mask, steps, lr, decay, max_memory)
    return out


__all__ = ["SLOPES", "adaptive_slopes", "per_row", "start_alpha", "ascend", "unit_rows", "bound_units",
           "slope_bounds", "adaptive_layer", "optimized_layers", "optimized_bounds", "row_chunk", "AUTO_WORK"]

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
from .relu import adaptive_slopes, relu_slopes, unstable_units
from .unit_patches import UnitPatches, patch_chain, patch_floats
from ..interval import interval_step
from ..network import LinearOp, Network
from ..regions import Region

SLOPES = ("fixed", "adaptive", "best")
AUTO_WORK = 2 ** 25  # floats per step of one layer's rows that intermediate_layers="auto" optimises
TIGHT_DECAY = 0.98  # the tight mode's lr factor per step
WORKING_FLOATS = 2 ** 22  # floats per tensor of one ascent chunk (see row_chunk)
WORK_FACTOR = 8  # tensors of a row's size alive per layer in one ascent step (α, grad, Adam's 2, ω, ω̂, …)


def per_row(slopes: torch.Tensor, m: int) -> torch.Tensor:
    """One slope tensor (B, *shape) as m rows (B, m, *shape) (a view)."""
    return slopes.unsqueeze(1).expand(slopes.shape[0], m, *slopes.shape[1:])


def pick_better(fixed: list, adaptive: list, J0: torch.Tensor, J1: torch.Tensor):
    """Per row the better of two α lists, given their bounds J0 and J1 (B, m): (α, max(J0, J1)); α tensors
    are (B, m, …). Both are sound; so is their per-row maximum."""
    pick = J1 > J0
    alpha = [torch.where(pick.reshape(*pick.shape, *([1] * (a.dim() - 2))), b, a) for a, b in zip(fixed, adaptive)]
    return alpha, torch.maximum(J0, J1)


def better_start(objective, fixed: list, adaptive: list):
    """:func:`pick_better` for ``objective`` (α list → J (B, m))."""
    return pick_better(fixed, adaptive, objective(fixed), objective(adaptive))


def start_alpha(network: Network, region: Region, bounds: list, rows, top: int, first=None):
    """The better of the fixed and the adaptive α per row: (α per ReLU layer below ``top`` (B, m, *shape),
    J (B, m) at that α). Both are evaluated in one backward pass of the rows twice over. ``first``: the
    rows' step through affine ``top`` already taken (:func:`unit_start`; ``rows`` None)."""
    m = (rows if first is None else first[1]).shape[1]
    fixed = [per_row(relu_slopes(l, u)[0], m) for l, u in bounds[:top]]
    adaptive = [per_row(adaptive_slopes(l, u), m) for l, u in bounds[:top]]
    both = [torch.cat([f, a], 1) for f, a in zip(fixed, adaptive)]
    twice = None if first is None else tuple(torch.cat([t, t], 1) for t in first)
    J = backward(network, region, bounds, None if rows is None else torch.cat([rows, rows], 1), top, both,
                 first=twice)[0]
    return pick_better(fixed, adaptive, J[:, :m], J[:, m:])


def ascend(network: Network, region: Region, bounds: list, rows, top: int, steps: int = 20,
           lr: float = 0.5, decay: float = 0.98, budget=None, first=None) -> torch.Tensor:
    """Sound lower bounds (B, m) of ``rowsᵀ ẑ`` at the output of affine ``top``, rows (B, m, *out_shape)
    (or None with ``first``, their step through affine ``top``: :func:`unit_start`), maximised over
    α ∈ [0, 1] (one α per row and ReLU layer below ``top``) by :func:`ascend_alpha` from
    :func:`start_alpha`. Memory: about ``WORK_FACTOR`` tensors of B·m·n_j floats per layer j below ``top``;
    time per step: a backward pass of the m rows and its gradient (about 3 backward passes)."""
    bounds = [(l.detach(), u.detach()) for l, u in bounds[:top]]
    with torch.no_grad():
        alpha, best = start_alpha(network, region, bounds, rows, top, first)
    if not bounds:
        return best
    return ascend_alpha(lambda a: backward(network, region, bounds, rows, top, a, first=first)[0], alpha, best,
                        steps, lr, decay, budget=budget)


def ascend_alpha(objective, alpha: list, best: torch.Tensor, steps: int = 20, lr: float = 0.5,
                 decay: float = 0.98, tol: float = 1e-6, patience: int = 20, budget=None) -> torch.Tensor:
    """``max(best, objective(α))`` (B, m) over the iterates of projected Adam on α ∈ [0, 1], from ``alpha``
    (``best``: the bound there): lr ``lr``, times ``decay`` per step, at most ``steps`` steps. A row stops
    (its best is frozen) once it gained less than ``tol`` (relative) for ``patience`` steps in a row, and
    the ascent ends when every row has stopped. Adam is elementwise and the stop is per row, so a row's
    bound does not depend on the other rows of its batch or chunk. With lr 0.5 a row often loses ground for
    several steps before it gains (Adam overshoots from the 0/1 slopes), hence the long patience: with 5
    the toy bench net's width rose 0.1–0.8%. ``budget`` (``.expired``) ends it early. Every iterate is a
    sound bound."""
    if steps == 0:
        return best
    alpha = [a.detach().clone().requires_grad_(True) for a in alpha]
    opt = torch.optim.Adam(alpha, lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, decay)
    stalled = torch.zeros(best.shape, dtype=torch.int64, device=best.device)
    for step in range(steps + 1):
        with torch.enable_grad() if step < steps else torch.no_grad():   # the last iterate: its value only
            J = objective(alpha)
            grads = torch.autograd.grad(-J.sum(), alpha) if step < steps else None  # α only, not the model
        J = J.detach()
        running = stalled < patience
        new = torch.where(running, torch.maximum(best, J), best)
        if step:
            flat = new - best <= tol * new.abs()
            stalled = torch.where(running, torch.where(flat, stalled + 1, torch.zeros_like(stalled)), stalled)
        best = new
        if grads is None or not bool((stalled < patience).any()) or (budget is not None and budget.expired):
            return best
        for a, g in zip(alpha, grads):
            a.grad = g
        opt.step()
        sched.step()
        with torch.no_grad():
            for a in alpha:
                a.clamp_(0.0, 1.0)
    return best


def row_floats(network: Network, region: Region, top: int) -> int:
    """Floats of one row ±e_j of layer ``top`` on the layers below it and the input: its receptive-field
    patches when the layers below are a conv chain (:mod:`.unit_patches`), else the layers' sizes."""
    if patch_chain(network, region, top):
        return patch_floats(network, top)
    return sum(network.affines[j].in_features for j in range(top + 1))


def row_chunk(network: Network, region: Region, top: int, max_memory: float) -> int:
    """Rows per :func:`ascend` call so that its tensors stay under ``max_memory`` bytes, and each of them
    under ``WORKING_FLOATS`` (larger ones are mapped fresh by the allocator on every elementwise pass, whose
    page faults then cost more than the pass: 2–4× on the bench ConvNet)."""
    floats = region.batch_size * row_floats(network, region, top)
    by_memory = max_memory // max(WORK_FACTOR * FLOAT_BYTES * floats, 1)
    return max(1, int(min(by_memory, WORKING_FLOATS // max(floats, 1))))


def unit_rows(order: torch.Tensor, valid: torch.Tensor, shape, dtype) -> torch.Tensor:
    """Rows ``+e_q`` then ``−e_q`` for the units ``order`` (B, q) (0 rows where not ``valid``): (B, 2q, *shape)."""
    B, q = order.shape
    n = 1
    for s in shape:
        n *= s
    E = torch.zeros(B, q, n, dtype=dtype, device=order.device).scatter(2, order.unsqueeze(2), valid.unsqueeze(2).to(dtype))
    return torch.cat([E, -E], 1).reshape(B, 2 * q, *shape)


def unit_transpose(A, order: torch.Tensor) -> torch.Tensor:
    """``Aᵀ e_j`` for the output units ``order`` (B, q): (B, q, *in_shape). A dense layer's rows of W are
    gathered; any other layer transposes the one-hot rows."""
    if isinstance(A, LinearOp):
        return A.weight[order].reshape(*order.shape, *A.in_shape)
    rows = torch.nn.functional.one_hot(order.reshape(-1), A.out_features).to(A.bias().dtype)
    return A.transpose(rows.reshape(-1, *A.out_shape)).reshape(*order.shape, *A.in_shape)


def unit_start(network: Network, i: int, order: torch.Tensor, valid: torch.Tensor):
    """(J, ω̂) of the rows ``+e_q`` then ``−e_q`` (q in ``order`` (B, q); 0 rows where not ``valid``) after
    their step through affine i: ``±b_q`` (B, 2q) and ``±W_iᵀ e_q`` (B, 2q, *in_shape), gathered rather than
    multiplied (:func:`~.backward.backward`'s ``first``; the step costs a product of the whole layer)."""
    A = network.affines[i]
    keep = valid.to(A.bias().dtype)
    b = A.bias().reshape(-1)[order] * keep
    w = unit_transpose(A, order) * keep.reshape(*keep.shape, *([1] * len(A.in_shape)))
    return torch.cat([b, -b], 1), torch.cat([w, -w], 1)


def bound_units(network: Network, region: Region, bounds: list, i: int, select: torch.Tensor, steps: int,
                lr: float, decay: float, max_memory: float, adaptive: bool = False, budget=None):
    """(l, u) of layer i (B, *shape) with the units ``select`` (B, n) re-bounded by :func:`ascend` (``steps``
    = 0: the better of fixed and adaptive α; ``adaptive``: the adaptive α only) over ``bounds`` of the
    layers below, in chunks of units; the elementwise best of the old and new bounds is kept. Below a
    conv chain the rows run as receptive-field patches (:class:`~.unit_patches.UnitPatches`). ``budget``
    (``.expired``) stops the ascent and the chunks early; the units not reached keep their bounds."""
    l, u = bounds[i]
    B, shape = l.shape[0], l.shape[1:]
    l, u = l.reshape(B, -1).clone(), u.reshape(B, -1).clone()
    units = unstable_units(select.to(l.dtype), select, l)
    q = units.order.shape[1]
    valid = torch.arange(q, device=l.device)[None, :] < select.sum(1)[:, None]
    step = max(1, row_chunk(network, region, i, max_memory) // 2)
    patches = patch_chain(network, region, i)
    for start in range(0, q, step):
        if budget is not None and budget.expired:
            break
        order, ok = units.order[:, start:start + step], valid[:, start:start + step]
        if patches:
            rows = UnitPatches(network, region, bounds, i, order)
            with torch.no_grad():
                first = rows.lower(rows.adaptive) if adaptive else better_start(rows.lower, rows.fixed, rows.adaptive)
            J = first if adaptive else ascend_alpha(rows.lower, *first, steps, lr, decay, budget=budget)
        else:
            gather = not network.skips_into(i)   # skip terms need the rows themselves
            rows = None if gather else unit_rows(order, ok, shape, l.dtype)
            first = unit_start(network, i, order, ok) if gather else None
            if adaptive:
                alpha = [adaptive_slopes(*lu).unsqueeze(1) for lu in bounds[:i]]          # shared by the rows
                J = backward(network, region, bounds, rows, i, alpha, first=first)[0]
            else:
                J = ascend(network, region, bounds, rows, i, steps, lr, decay, budget, first=first)
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

    "fixed": ``fixed`` unchanged. "adaptive": CROWN's chain, layer by layer: each layer i ≥ 1 starts from
    one interval step over the adaptive bounds below (:func:`~polytope_lab.interval.interval_step`), and
    the units it leaves unstable are bounded by rows ±e_j with the adaptive α over those bounds, the
    intersection kept (CROWN's sparse intermediate bounds, as auto_LiRPA computes them: a unit the
    interval step proves stable needs no row). "best": the same from the intersection of the fixed bounds
    and the interval step over the best bounds below (all are sound, so their intersection is). Layer 0
    does not depend on slopes: "adaptive" reads only ``fixed[0]`` (:func:`~.intermediate.first_layer_bounds`
    is enough). Cost: one backward pass of 2·(units left unstable) rows per layer i, through layers i … 1.
    """
    if slopes not in SLOPES:
        raise ValueError(f"slopes must be one of {SLOPES}, got {slopes!r}")
    if slopes == "fixed":
        return list(fixed)
    out = list(fixed[:1])
    for i in range(1, network.n_relu_layers):
        l, u = interval_step(network, region, out, i)
        if slopes == "best":
            l, u = torch.maximum(l, fixed[i][0]), torch.minimum(u, fixed[i][1])
        out.append(adaptive_layer(network, region, out, i, (l, u), max_memory))
    return out


def adaptive_layer(network: Network, region: Region, below: list, i: int, given, max_memory: float):
    """(l, u) of layer i: the sound bounds ``given`` with the units they leave unstable re-bounded by rows
    ±e_j with the adaptive α over ``below``, the intersection kept."""
    with torch.no_grad():
        return bound_units(network, region, below + [given], i, unstable(*given), 0, 0.0, 1.0, max_memory,
                           adaptive=True)


def optimized_layers(network: Network, region: Region, bounds: list, layers="auto") -> list:
    """The ReLU layers i ≥ 1 whose α :func:`optimized_bounds` optimises: all (``layers`` None), the last k
    (an int), or ("auto") those whose rows cost at most ``AUTO_WORK`` floats per step:
    ``B · 2q_i · r_i ≤ AUTO_WORK`` (q_i the batch's most unstable units, r_i a row's floats below layer i,
    :func:`row_floats`: its patches below a conv chain, else ``Σ_{j<i} n_j``); on the others the best
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
        if l.shape[0] * 2 * q * row_floats(network, region, i) <= AUTO_WORK:
            chosen.append(i)
    return chosen


def optimized_bounds(network: Network, region: Region, bounds: list, steps: int = 20, lr: float = 0.5,
                     decay: float = 0.98, max_memory: float = 2 ** 32, layers=None, budget=None) -> list:
    """Intermediate bounds tightened layer by layer by optimised α: for each ReLU layer i ≥ 1 (or those in
    ``layers``, e.g. from :func:`optimized_layers`), bottom up, the rows ±e_j of its unstable units (per example, padded to the batch maximum
    q_i) maximised by :func:`ascend` over the already tightened layers below; the elementwise best of old
    and new bounds is kept (both sound).

    Memory per layer i: about ``WORK_FACTOR · 4 · B · 2q_i · r_i`` bytes (r_i = :func:`row_floats`: the rows'
    receptive-field patches below a conv chain, else ``Σ_{j<i} n_j``), chunked over units to stay under
    ``max_memory`` and ``WORKING_FLOATS`` per tensor; time per layer: ``steps`` (or fewer, early stop) forward+backward passes of
    2q_i rows through layers 1 … i. ``budget`` (``.expired``) ends the ascent early: the units and layers
    not reached keep their bounds.
    """
    out = list(bounds)
    for i in range(1, len(out)):
        if layers is not None and i not in layers:
            continue
        mask = unstable(*out[i])
        if mask.any():
            out[i] = bound_units(network, region, out, i, mask, steps, lr, decay, max_memory, budget=budget)
    return out


__all__ = ["SLOPES", "per_row", "start_alpha", "pick_better", "better_start", "ascend", "ascend_alpha", "row_floats", "unit_rows", "unit_transpose", "unit_start", "bound_units",
           "slope_bounds", "adaptive_layer", "optimized_layers", "optimized_bounds", "row_chunk", "AUTO_WORK", "TIGHT_DECAY", "unstable"]

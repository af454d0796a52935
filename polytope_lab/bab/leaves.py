"""What the search checks on the real network: a PGD attack on ``max_k (A_k f − b_k)`` and the leaves.

A leaf is a subdomain with every unstable unit split: one linear region of the network. Its problem is
an LP (:func:`polytope_lab.relaxation.build` with the clipped bounds, every unit stable, plus the split
rows ``s·ẑ ≥ 0``, :meth:`Relaxation.add_split`), solved by HiGHS: the LP's feasible set is exactly the
inputs of the box with that activation pattern (a root-stable unit's sign holds on the whole box), so
the leaf is decided exactly, up to the LP's tolerance (:func:`leaf_slack`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..relaxation import build, solver_slack
from ..solvers import HighsAdapter


def leaf_slack(value: float) -> float:
    """How far a leaf LP's optimum may lie above the true minimum (HiGHS's primal feasibility 1e-7, ×10,
    relative to max(1, |value|): :func:`relaxation.solver_slack`)."""
    return solver_slack(value, exact=False)


def row_maximum(net, x: torch.Tensor, C: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``max_k (C_k f(x) − offset_k)`` per point: x (N, *shape), C (N, K, n_out), offset (N, K) -> (N,)."""
    with torch.no_grad():
        return (torch.einsum("nkm,nm->nk", C, net(x).reshape(len(x), -1)) - offset).amax(1)


def attack(net, lo: torch.Tensor, hi: torch.Tensor, C: torch.Tensor, offset: torch.Tensor, steps: int = 50,
           restarts: int = 4, seed: int = 0, starts=None):
    """Sign-gradient PGD on ``max_k (C_p,k f − offset_p,k)`` over the box [lo, hi] (one example, flat
    (n0,)) for each problem p, from the centre and ``restarts − 1`` random starts (or from ``starts``
    (P, n0), one each), step shrinking linearly: (values (P,), points (P, n0)), every value attained on
    ``net``."""
    P, R = C.shape[0], 1 if starts is not None else max(1, int(restarts))
    Cr, offr = C.repeat_interleave(R, 0), offset.repeat_interleave(R, 0)
    if starts is not None:
        x = starts.detach().clone()
    else:
        gen = torch.Generator().manual_seed(seed)
        x = lo + torch.rand((P * R, lo.numel()), generator=gen, dtype=lo.dtype) * (hi - lo)
        x[::R] = (lo + hi) / 2
    best_v = torch.full((P * R,), math.inf, dtype=lo.dtype)
    best_x = x.clone()
    shape = net.input_shape
    for step in range(steps + 1):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            g = (torch.einsum("nkm,nm->nk", Cr, net(x.reshape(-1, *shape)).reshape(len(x), -1)) - offr).amax(1)
            grad, = torch.autograd.grad(g.sum(), x)
        better = g.detach() < best_v
        best_v, best_x = torch.where(better, g.detach(), best_v), torch.where(better[:, None], x.detach(), best_x)
        if step == steps:
            break
        eta = (hi - lo) * (2.0 / max(steps, 1)) * (1.0 - step / (steps + 1))
        x = torch.minimum(torch.maximum(x.detach() - eta * grad.sign(), lo), hi)
    best_v, best_x = best_v.reshape(P, R), best_x.reshape(P, R, -1)
    k = best_v.argmin(1)
    return best_v[torch.arange(P), k], best_x[torch.arange(P), k]


@dataclass
class LeafResult:
    """A leaf LP: ``status`` "optimal" | "empty" (HiGHS: infeasible; its tolerances only widen the feasible
    set, so no point has this pattern) | "time_limit" | "error: …"; ``value`` its optimum (inf when
    empty) and ``point`` the minimiser's input (flat, float64, or None)."""

    status: str
    value: float = -math.inf
    point: np.ndarray | None = None


def solve_leaf(ops, lo, hi, clipped: list, signs: list, C: np.ndarray, offset: np.ndarray,
               time_limit=None) -> LeafResult:
    """``min max_k (C_k f − offset_k)`` over the leaf's linear region (float64 numpy inputs: ``clipped``
    flat (l, u) per ReLU layer, each unit stable; ``signs`` flat per layer; C (K, n_out)). With unstable
    units left, the same LP over the subdomain's relaxation (eq. 15): a lower bound, and a point of the box."""
    system = build(ops, lo, hi, clipped, exact=False)
    for layer, s in enumerate(signs):
        for unit in np.flatnonzero(s):
            system.add_split(layer, int(unit), int(s[unit]))
    if len(C) == 1:
        cost, const = system.cost(C[0])
        const -= float(offset[0])
    else:
        t = system.add_row_maximum(C, offset, -np.inf, np.inf)
        cost, const = np.zeros(system.n_vars), 0.0
        cost[t] = 1.0
    out = HighsAdapter(system, mip=False, threads=1).solve(cost, const, time_limit=time_limit)
    if out.status == "optimal" and out.x is not None:
        return LeafResult("optimal", float(out.value), np.clip(out.x, lo, hi))
    if out.status == "infeasible":
        return LeafResult("empty", math.inf)
    return LeafResult("time_limit" if out.status == "time_limit" else f"error: leaf LP {out.status}")


__all__ = ["attack", "row_maximum", "solve_leaf", "LeafResult", "leaf_slack"]

"""Verification on top of the bounders: certify, minimum adversarial distance (eq. 6), certified radius.

``certify`` is a :class:`Bounder` method (generic in the base class, a faster decision in the MILP);
here are the functions built on it: :func:`certify` by backend name, :func:`certified_radius` (any
bounder, by bisection on its verdicts) and :func:`minimum_adversarial_distance` (exact, by the MILP of
eq. 6 on the relaxation module's system with the ε variable and the misclassification disjunction).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .bounds import Bounder, Certification, certified_labels, check_objective, error_status, margin_matrix
from .convert import as_network
from .milp import MILPBounder, witness
from .regions import L2Ball, LinfBall
from .relaxation import WIDEN

__all__ = ["AdversarialDistance", "certify", "certified_radius", "minimum_adversarial_distance"]


@dataclass
class AdversarialDistance:
    """Minimum L∞ distance from ``x`` to an input (in the clip box) where some class ``j ≠ y`` scores at
    least as high as ``y`` (paper eq. 6), for one example.

    ``status`` "optimal": ``radius`` is exact (``lower ≤ radius``, within solver tolerance, and ``radius``
    is the distance of the verified ``witness``); "beyond_eps_max": no such input within ``eps_max``
    (``radius = lower = eps_max``, read "≥ eps_max"); "time_limit": ``lower ≤`` exact ``≤ upper``;
    "error: …": the solver failed or its witness did not check out (``lower`` still holds).
    ``witness_margin``: ``f_y − max_{j≠y} f_j`` at the witness (≤ 0 up to solver tolerance).
    """

    radius: float
    lower: float
    upper: float
    status: str
    witness: torch.Tensor | None = None
    witness_class: int | None = None
    witness_margin: float = math.nan
    seconds: float = 0.0

    @property
    def exact(self) -> bool:
        return self.status == "optimal"


def certify(model, region, y=None, method: str = "milp", **options) -> Certification:
    """``Bounder.create(method, **options).certify(model, region, y)``: one verdict per example."""
    return Bounder.create(method, **options).certify(model, region, y)


def minimum_adversarial_distance(model, x, y=None, eps_max: float = 1.0, clip=None, bounder=None,
                                 **options) -> list:
    """Exact minimum L∞ adversarial distance per example (paper eq. 6), searched up to ``eps_max``.

    ``x`` (B, *input_shape), ``y`` (B,) (None: the predictions at ``x``); ``bounder`` a
    :class:`MILPBounder` (default: one built with ``options``). The big-M bounds come from its
    intermediate bounder on ``LinfBall(x, eps_max, clip)``, valid for every smaller ε; classes that bounder
    already rules out at ``eps_max`` get no binary. ε becomes a variable, ``|x' − x| ≤ ε ≤ eps_max``
    componentwise inside the clip box, and misclassification a disjunction over the classes ``j ≠ y``
    (one binary each: ``f_y − f_j ≤ M_j (1 − s_j)``, ``Σ s_j = 1``, ``M_j`` an upper bound of
    ``f_y − f_j`` over the ``eps_max`` ball). One :class:`AdversarialDistance` per example.
    """
    eps_max = float(eps_max)
    if not eps_max > 0:
        raise ValueError(f"eps_max must be > 0, got {eps_max}")
    milp = bounder if bounder is not None else MILPBounder(**options)
    network, region = milp.prepare(model, LinfBall(x, eps_max, clip))
    y = certified_labels(network, region, y)
    if region.batch_size == 0:
        return []
    C = check_objective(margin_matrix(y, network.output_size), network, region)
    prob = milp.exact_problem(network, region, C)
    others = [[j for j in range(network.output_size) if j != int(y[b])] for b in range(region.batch_size)]
    return [_distance(milp, prob, b, others[b], eps_max, region.x.dtype) for b in range(region.batch_size)]


def _distance(milp: MILPBounder, prob, b: int, others: list, eps_max: float, dtype) -> AdversarialDistance:
    """Example b's eq. 6."""
    start = time.perf_counter()
    seconds = lambda: time.perf_counter() - start  # noqa: E731
    x64 = prob.reg64.x[b].reshape(-1).numpy()
    margins = milp.value_at(prob, prob.C64[b], x64)
    if margins.min() <= 0:  # x itself is not classified as y
        return AdversarialDistance(0.0, 0.0, 0.0, "optimal", prob.reg64.x[b].clone().to(dtype),
                                   others[int(torch.argmin(margins))], float(margins.min()), seconds())
    rows = [r for r in range(prob.C64.shape[1]) if prob.lower[b, r] <= 0]
    if not rows:  # certified at eps_max by the intermediate bounder
        return AdversarialDistance(eps_max, eps_max, math.inf, "beyond_eps_max", seconds=seconds())
    system = prob.system(b, center=x64, eps_max=eps_max)
    big_m = [max(float(prob.upper[b, r]), 0.0) * (1 + WIDEN) + WIDEN for r in rows]
    system.add_disjunction(prob.C64[b, rows].numpy(), big_m)
    cost = np.zeros(system.n_vars)
    cost[system.eps] = 1.0
    out = milp.adapter(system).solve(cost, 0.0, time_limit=milp.time_limit)
    if out.status == "infeasible":
        return AdversarialDistance(eps_max, eps_max, math.inf, "beyond_eps_max", seconds=seconds())
    lower = max(out.bound, 0.0) if math.isfinite(out.bound) else 0.0
    if out.x is None:
        status = out.status if out.status in ("time_limit",) or out.status.startswith("error") else \
            error_status(f"no solution ({out.status})")
        return AdversarialDistance(math.nan, lower, math.inf, status, seconds=seconds())
    lo, hi = prob.box(b)
    point, inside = witness(out.x, lo, hi)
    with torch.no_grad():
        f = prob.net64(torch.from_numpy(point).reshape(1, *prob.net64.input_shape))[0]
    wm = prob.C64[b] @ f
    dist = float(np.max(np.abs(point - x64))) if len(point) else 0.0
    verified = inside and float(wm.min()) <= 1e-5 * (1.0 + float(f.abs().max()))
    if not verified:
        return AdversarialDistance(math.nan, lower, math.inf, error_status("witness outside the region or not "
                                                                            "misclassified"), seconds=seconds())
    status = "time_limit" if out.status in ("stopped", "time_limit") else out.status
    return AdversarialDistance(dist, min(lower, dist), dist, status,
                               torch.from_numpy(point).reshape(prob.net64.input_shape).to(dtype),
                               others[int(torch.argmin(wm))], float(wm.min()), seconds())


def certified_radius(model, x, y=None, eps_max: float = 1.0, clip=None, tol: float = 1e-4, bounder="dual",
                     norm: str = "linf") -> list:
    """Largest ε (to ``tol``, by bisection) at which ``bounder`` (any backend: an instance or registered
    name) certifies the ball of radius ε around ``x`` for the labels ``y`` (None: the predictions at
    ``x``): a sound lower bound of the minimum adversarial distance, per example.

    ``norm`` "linf" (``LinfBall(x, ε, clip)``) or "l2" (``L2Ball(x, ε)``). Returns a list of B floats
    (``eps_max`` if certified there, 0.0 if not even at ε = 0). Assumes certification is monotone in ε
    (bounds widen with ε).
    """
    if norm not in ("linf", "l2") or (norm == "l2" and clip is not None):
        raise ValueError(f"norm must be 'linf' or 'l2' (without clip), got {norm!r} with clip={clip}")
    b_ = Bounder.create(bounder) if isinstance(bounder, str) else bounder
    x = torch.as_tensor(x)
    if x.shape[0] == 0:
        return []
    network = as_network(model, tuple(x.shape[1:]))
    y = certified_labels(network, LinfBall(x, 0.0), y)
    B = x.shape[0]

    def ok(eps):
        eps = eps.to(x.dtype)
        region = LinfBall(x, eps, clip) if norm == "linf" else L2Ball(x, eps)
        with torch.no_grad():
            return b_.certify(network, region, y).certified

    lo = torch.zeros(B, dtype=torch.float64)
    hi = torch.full((B,), float(eps_max), dtype=torch.float64)
    at_max, at_zero = ok(hi), ok(lo)
    lo = torch.where(at_max, hi, lo)
    for _ in range(max(1, int(math.ceil(math.log2(max(eps_max / tol, 2.0)))))):
        mid = (lo + hi) / 2
        good = ok(mid) & ~at_max & at_zero
        lo = torch.where(good, mid, lo)
        hi = torch.where(good | at_max, hi, mid)
    lo = torch.where(at_zero | at_max, lo, torch.zeros_like(lo))
    return [float(v) for v in lo]

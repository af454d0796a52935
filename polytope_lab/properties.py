"""Properties as objectives: a case's disjuncts ``A_d y ≤ b_d`` become rows of ``C`` for any Bounder.

A disjunct (a conjunction of rows) is **refuted** when some single row has ``min_x (A_k f(x) − b_k) > 0``
over the case's box: that row cannot hold anywhere in the box, so neither can the conjunction. A case is
verified when every disjunct is refuted; a property when every case is.

This test is *sufficient, not necessary*: rows that are each satisfiable somewhere in the box but never
together leave the disjunct unrefuted here. An exact backend must refute a multi-row conjunction
*jointly* (the MILP with all its rows as constraints; branch and bound on ``max_k (A_k f(x) − b_k)``);
that is the verification pipeline's job. A disjunct with no rows is "true" and is never refuted.
"""
from __future__ import annotations

import torch

from .bounds import Bounds, require_sound
from .vnnlib import Case, Disjunct

__all__ = ["objective", "case_objective", "refuted", "verified", "satisfied"]


def objective(disjunct: Disjunct, dtype=torch.float64, device=None):
    """``(C, offset)``: C = A (k, n_outputs), offset = b (k,); ``lower(C f) − offset > 0`` in any row over
    the box refutes the disjunct."""
    C = torch.as_tensor(disjunct.A, dtype=dtype, device=device)
    return C, torch.as_tensor(disjunct.b, dtype=dtype, device=device)


def case_objective(case: Case, dtype=torch.float64, device=None):
    """All disjuncts' rows stacked for one bound call: ``(C (K, n_outputs), offset (K,), groups)``, where
    ``groups[d]`` is the slice of disjunct d's rows."""
    parts = [objective(d, dtype, device) for d in case.disjuncts]
    groups, start = [], 0
    for C, _ in parts:
        groups.append(slice(start, start + C.shape[0]))
        start += C.shape[0]
    n_out = case.disjuncts[0].A.shape[1] if case.disjuncts else 0
    C = torch.cat([C for C, _ in parts]) if parts else torch.zeros(0, n_out, dtype=dtype, device=device)
    offset = torch.cat([b for _, b in parts]) if parts else torch.zeros(0, dtype=dtype, device=device)
    return C, offset, groups


def refuted(case: Case, bounds: Bounds, tol: float = 0.0) -> torch.Tensor:
    """(n_disjuncts,) bool: disjunct d is refuted — some row has ``lower − b > tol`` — by ``bounds``, the
    sound bounds of ``case_objective(case)``'s C over the case's box (one example). Estimated bounds
    (random projections) are refused."""
    require_sound(bounds, "refuting a property")
    C, offset, groups = case_objective(case)
    lower = bounds.lower
    if lower.dim() != 2 or lower.shape[0] != 1 or lower.shape[1] != C.shape[0]:
        raise ValueError(f"bounds.lower has shape {tuple(lower.shape)}; expected (1, {C.shape[0]}): the bounds of "
                         f"case_objective(case) over the case's box")
    margin = lower[0].detach().cpu().double() - offset
    ok = torch.isfinite(margin) & (margin > tol)  # NaN never refutes
    return torch.tensor([bool(ok[g].any()) for g in groups], dtype=torch.bool)


def verified(case: Case, bounds: Bounds, tol: float = 0.0) -> bool:
    """Every disjunct of ``case`` is refuted by ``bounds`` (see :func:`refuted`): the case is safe."""
    return bool(refuted(case, bounds, tol).all())


def satisfied(case: Case, y: torch.Tensor, tol: float = 0.0, strict: bool = False) -> torch.Tensor:
    """(N, n_disjuncts) bool: output ``y[n]`` ((N, n_outputs)) satisfies disjunct d, ``A_d y ≤ b_d + tol``
    in every row (an unsafe output when its input lies in the case's box). ``strict``: ``<`` instead, for
    a counterexample that must hold whether the file wrote ``<`` or ``<=`` (the parser reads both as ≤)."""
    y = torch.as_tensor(y).double().reshape(len(y), -1)
    cols = []
    for d in case.disjuncts:
        C, b = objective(d)
        values = y @ C.t()
        cols.append((values < b + tol if strict else values <= b + tol).all(1))
    return torch.stack(cols, 1) if cols else torch.zeros(len(y), 0, dtype=torch.bool)

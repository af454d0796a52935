"""Checks the backends are held to: the sandwich tolerance rule, "same bounds", and ``cross_check``.

One rule for every comparison of a bound with a reference value (a tighter bound, an exact optimum, an
attained value): ``bound`` may pass ``reference`` by at most :func:`slack` ``= tol · max(1, |reference|)``
— relative for large values, absolute near 0. "Same bounds" (two computations of one bound) means equal
to :func:`same_tolerance` relative to ``max(1, |value|)``: 1e-6 in float64, 1e-5 in float32.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from .bab.search import Settings
from .bounds import Bounder, check_objective
from .convert import as_network
from .dual.bounder import FINAL_ALPHA_ONLY
from .regions import Region

#: "same bounds": tolerance relative to max(1, |value|), per dtype
SAME_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-5}


def slack(reference, tol: float):
    """``tol · max(1, |reference|)``: how far a bound may pass ``reference`` and still count as on its side.

    ``reference``: a number, a tensor, a numpy array or a pandas Series (elementwise; NaN stays NaN for
    arrays and gives ``tol`` for a Python float).
    """
    if isinstance(reference, torch.Tensor):
        return tol * reference.abs().clamp(min=1.0)
    if isinstance(reference, (int, float)):
        return tol * max(1.0, abs(reference))
    return tol * np.maximum(1.0, np.abs(reference))


def above(lower, reference, tol: float):
    """How far the lower bound ``lower`` lies above ``reference`` beyond :func:`slack` (> 0: a violation)."""
    return lower - reference - slack(reference, tol)


def below(upper, reference, tol: float):
    """How far the upper bound ``upper`` lies below ``reference`` beyond :func:`slack` (> 0: a violation)."""
    return reference - upper - slack(reference, tol)


def containment_gap(outer_lo, outer_hi, inner_lo, inner_hi, tol: float) -> float:
    """How far ``[outer_lo, outer_hi]`` fails to contain ``[inner_lo, inner_hi]`` beyond :func:`slack` of
    the inner ends (≤ 0: it contains it). A NaN end (a side not computed) is ignored; −inf if both are."""
    gaps = [above(outer_lo, inner_lo, tol), below(outer_hi, inner_hi, tol)]
    gaps = [float(g) for g in gaps if not math.isnan(g)]
    return max(gaps) if gaps else -math.inf


def same_tolerance(dtype=torch.float64) -> float:
    """The "same bounds" tolerance of ``dtype``: 1e-6 for float64, 1e-5 for float32 (and lower precisions)."""
    return SAME_TOLERANCE.get(dtype, SAME_TOLERANCE[torch.float32])


def same_bounds(a, b, tol: float | None = None) -> bool:
    """Whether ``a`` and ``b`` are the same bounds: ``|a − b| ≤ tol · max(1, |b|)`` everywhere (NaN and
    infinite entries must match exactly). ``tol`` defaults to :func:`same_tolerance` of the coarser dtype."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if tol is None:
        tol = max(same_tolerance(a.dtype), same_tolerance(b.dtype))
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        return False
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not torch.equal(a[~finite].nan_to_num(nan=0.5), b[~finite].nan_to_num(nan=0.5)):
        return False
    return bool(((a - b)[finite].abs() <= slack(b[finite], tol)).all())


#: cross_check's backends: label -> (registered name, options)
CROSS_CHECK_METHODS = {
    "interval": ("interval", {}),
    "dual": ("dual", {"alpha": "fixed"}),
    "dual-optimized": ("dual", FINAL_ALPHA_ONLY),  # ≤ the LP over the same (fixed-slope) bounds
    "lp": ("lp", {}),
    "milp": ("milp", {}),
    "bab": ("bab", {"split": "relu"}),   # ReLU splits: exact bounds fast on small nets (input splits are not)
}
#: the exact backends, in the order cross_check takes its "exact" reference from
EXACT_METHODS = ("milp", "bab")
#: looseness's parts: (column, from, to) — each the change of the bound from one method to the next
LOOSENESS_PARTS = (("alpha", "dual", "lp"), ("intermediate", "lp", "lp_all"), ("relaxation", "lp_all", "exact"))


def exact_source(results: dict, b: int):
    """The label of the first exact backend (:data:`EXACT_METHODS`) that is optimal on example b, or None."""
    return next((e for e in EXACT_METHODS if e in results and results[e].status[b] == "optimal"), None)


def exact_agreement(results: dict, label: str, b: int, j: int, tol: float) -> list:
    """Problems of ``label`` (an exact backend) against the other exact backends optimal on (b, j): their
    bounds must be equal within :func:`slack` ``(other, tol + bab's tolerance)``."""
    if label not in EXACT_METHODS or results[label].status[b] != "optimal":
        return []
    problems = []
    for other in EXACT_METHODS:
        if other == label or other not in results or results[other].status[b] != "optimal":
            continue
        for side in ("lower", "upper"):
            mine, theirs = getattr(results[label], side)[b, j].item(), getattr(results[other], side)[b, j].item()
            if abs(mine - theirs) > slack(theirs, tol + BAB_TOLERANCE):
                problems.append(f"{side} {mine:.6g} ≠ {other} {theirs:.6g} (both optimal)")
    return problems


#: how far the bab backend's "optimal" may lie below the minimum (its default ``tolerance``)
BAB_TOLERANCE = Settings.tolerance


def cross_check(model, region: Region, C=None, methods=None, exclude=(), tol: float = 1e-5, attack_steps: int = 50,
                options: dict | None = None, looseness: bool = False):
    """Run every backend and a PGD attack on one problem and check the sandwich; a pandas DataFrame.

    One row per (backend, example, objective row) — for a single example and objective, one row per
    backend — with ``lower``, ``upper``, ``seconds``, ``status`` and a ``verdict``: "ok", or which of
    ``lower ≤ exact ≤ attack`` (exact = the MILP's optimum when it is optimal, else branch and bound's;
    attack = the best PGD value, a real point), ``dual ≤ lp`` (the LP uses the dual's intermediate bounds)
    and ``milp = bab`` (where both are optimal, within ``tol`` + bab's tolerance) fails, beyond
    :func:`slack` ``(reference, tol)``. ``methods``: labels from :data:`CROSS_CHECK_METHODS` (default: all
    whose backend is registered); ``exclude`` drops some; ``options``: per-label extra options.
    ``looseness=True``: also :func:`looseness` of the problem, in ``df.attrs["looseness"]`` (its exact
    backend: bab if it is among the methods, else milp).
    """
    import pandas as pd

    from .attacks import pgd_minimize

    network = as_network(model, region.input_shape)
    C = check_objective(C, network, region)
    labels = [m for m in (methods or CROSS_CHECK_METHODS) if m not in exclude]
    unknown = [m for m in labels if m not in CROSS_CHECK_METHODS]
    if unknown:
        raise ValueError(f"unknown cross_check method(s) {unknown}; choose from {list(CROSS_CHECK_METHODS)}")
    if methods is None:
        labels = [m for m in labels if CROSS_CHECK_METHODS[m][0] in Bounder.registry]
    results = {}
    for label in labels:
        name, opts = CROSS_CHECK_METHODS[label]
        results[label] = Bounder.create(name, **{**opts, **(options or {}).get(label, {})}).bound(network, region, C)
    start = time.perf_counter()
    attack_lo, _ = pgd_minimize(network, region, C, steps=attack_steps)
    attack_hi, _ = pgd_minimize(network, region, -C, steps=attack_steps)
    attack_hi = -attack_hi
    attack_seconds = time.perf_counter() - start

    rows = []
    B, m = C.shape[:2]
    for b in range(B):
        source = exact_source(results, b)
        for j in range(m):
            refs = {"attack": (attack_lo[b, j].item(), attack_hi[b, j].item())}
            if source is not None:
                refs["exact"] = (results[source].lower[b, j].item(), results[source].upper[b, j].item())
            for label, res in results.items():
                lo, up = res.lower[b, j].item(), res.upper[b, j].item()
                checks = dict(refs)
                if label in ("dual", "dual-optimized") and "lp" in results:
                    checks["lp"] = (results["lp"].lower[b, j].item(), results["lp"].upper[b, j].item())
                if label == source:
                    checks.pop("exact", None)
                problems = [f"lower {lo:.6g} > {ref} {r_lo:.6g}" for ref, (r_lo, _) in checks.items()
                            if above(lo, r_lo, tol) > 0]
                problems += [f"upper {up:.6g} < {ref} {r_up:.6g}" for ref, (_, r_up) in checks.items()
                             if below(up, r_up, tol) > 0]
                problems += exact_agreement(results, label, b, j, tol)
                rows.append({"method": label, "example": b, "row": j, "lower": lo, "upper": up,
                             "seconds": res.seconds, "status": res.status[b],
                             "verdict": "; ".join(problems) or "ok", "tolerance": tol})
            rows.append({"method": "pgd attack", "example": b, "row": j, "lower": refs["attack"][0],
                         "upper": refs["attack"][1], "seconds": attack_seconds, "status": "attack",
                         "verdict": "reference (values attained by real inputs)", "tolerance": tol})
    df = pd.DataFrame(rows)
    if looseness:
        exact = "bab" if "bab" in results else "milp"
        df.attrs["looseness"] = looseness_table(network, region, C, exact=exact,
                                                exact_options=(options or {}).get(exact))
    return df


def looseness_bounders(exact: str = "bab", exact_options: dict | None = None) -> dict:
    """The four bounders of :func:`looseness`: "dual" (α = u/(u−l), Algorithm 1), "lp" (the LP over the
    relaxation with that dual's intermediate bounds), "lp_all" (LP-ALL: every intermediate bound by LP),
    "exact" (``exact``: "bab" or "milp"). Options are pinned (no backend default is relied on)."""
    if exact not in EXACT_METHODS:
        raise ValueError(f"exact must be one of {EXACT_METHODS}, got {exact!r}")
    dual = Bounder.create("dual", alpha="fixed")
    return {"dual": dual, "lp": Bounder.create("lp", intermediate=dual),
            "lp_all": Bounder.create("lp", intermediate="lp"),
            "exact": Bounder.create(exact, **{**CROSS_CHECK_METHODS[exact][1], **(exact_options or {})})}


def looseness_table(model, region: Region, C=None, exact: str = "bab", exact_options: dict | None = None):
    """Where the dual bound's looseness comes from; a pandas DataFrame, one row per (example, objective
    row, side).

    For the lower side (the upper: the same with the signs flipped, ``gap = dual_upper − exact_upper``),
    ``gap = exact − dual`` splits as ``alpha = lp − dual`` (the fixed α of the dual against the LP
    optimum over the same relaxation: the same intermediate bounds), ``intermediate = lp_all − lp``
    (LP-ALL's intermediate bounds against the dual's) and ``relaxation = exact − lp_all`` (the convex
    relaxation itself against the exact value). The parts sum to ``gap``; each is ≥ 0 up to the solvers'
    tolerances (a theorem for the first two and the third when the exact value is "optimal"; the
    ``exact_status`` column says). Columns: example, row, side, dual, lp, lp_all, exact, exact_status,
    gap, alpha, intermediate, relaxation and the parts' shares of the gap (NaN when the gap is 0).
    """
    import pandas as pd

    network = as_network(model, region.input_shape)
    C = check_objective(C, network, region)
    res = {k: bounder.bound(network, region, C) for k, bounder in looseness_bounders(exact, exact_options).items()}
    rows = []
    B, m = C.shape[:2]
    for b in range(B):
        for j in range(m):
            for side, sign in (("lower", 1.0), ("upper", -1.0)):
                v = {k: getattr(r, side)[b, j].item() for k, r in res.items()}
                row = {"example": b, "row": j, "side": side, **v, "exact_status": res["exact"].status[b],
                       "gap": sign * (v["exact"] - v["dual"])}
                for part, start, end in LOOSENESS_PARTS:
                    row[part] = sign * (v[end] - v[start])
                for part, _, _ in LOOSENESS_PARTS:
                    row[f"{part}_share"] = row[part] / row["gap"] if row["gap"] != 0 else math.nan
                rows.append(row)
    return pd.DataFrame(rows)


looseness = looseness_table


__all__ = ["slack", "above", "below", "containment_gap", "same_tolerance", "same_bounds", "SAME_TOLERANCE",
           "CROSS_CHECK_METHODS", "EXACT_METHODS", "LOOSENESS_PARTS", "cross_check", "looseness", "looseness_table",
           "looseness_bounders"]

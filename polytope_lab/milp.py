"""Exact bounds by MILP over the adversarial polytope (Wong & Kolter 2018, eq. 4), in PuLP.

For one example with input box ``[lo, hi]`` (an L∞ ball, ∩ the clip box) and pre-activation bounds
``l ≤ ẑ ≤ u`` from another Bounder (the big-M constants), the set of reachable activations is

    z_1 = x' ∈ [lo, hi],     ẑ_{i+1} = W_i z_i + b_i + Σ_j (S_ij z_j + b_ij),     f(x') = ẑ_k,
    I⁻ (u ≤ 0): z = 0 (the unit and its column are dropped);   I⁺ (l ≥ 0): z = ẑ;
    I (l < 0 < u): one binary a:  z ≥ ẑ,  z ≥ 0,  z ≤ u·a,  z ≤ ẑ − l(1 − a).

The sum runs over the skip terms (none in a sequential net). It is exact for any valid l, u;
tighter ones (``intermediate="progressive"``: interval ∩ dual, then an LP per unstable neuron, like
MIPVerify) make it faster. Each row ``c`` of ``C`` is minimised (lower bound) and ``−c`` minimised (upper
bound) per example; the objective ``cᵀẑ_k`` is written directly on the last hidden layer (and on the
layers its skip terms read). The model is built once per example in PuLP; with HiGHS the solver model
that PuLP builds (``pulp.HiGHS``, highspy) is kept and only its costs change between
rows; with CBC (``pulp.PULP_CBC_CMD``) PuLP writes and solves the problem once per row.

Before each MILP a primal heuristic (projected sign-gradient descent on the row, from the centre and
one seeded random point) gives a verified point; its full assignment is the solver's MIP start.

Robustness queries (:meth:`MILPBounder.certify`) only need the sign of each margin ``f_y − f_j``: the
solve stops as soon as it is decided (HiGHS ``objective_bound``/``objective_target``, CBC ``cutoff`` and
``maxSolutions``), which on the paper's MNIST ConvNet is seconds per image where the exact minimum of
a margin can take minutes.

Soundness of what is reported:
- ``lower`` is the solver's proven bound (HiGHS ``mip_dual_bound``; CBC's optimum when it proves
  optimality), never above an attained value; when the solver stops early (time limit) it is the larger
  of that bound and the intermediate bounder's own sound bound (CBC reports no bound: the latter alone).
- every incumbent is a witness: its input is checked against the box (1e-6), projected onto it and run
  through the network in float64; the attained value ``c f(x')`` is reported (``min_value``), never the
  solver's objective. A witness outside the box makes the row's status ``"witness_error"`` and its bound
  falls back to the intermediate bounder's.
- "optimal" only when the solver proves it; otherwise "time_limit", "infeasible" (numerical trouble:
  the region is never empty) or "solver_error", and the bounds are the sound fallbacks.

Minimum adversarial distance (eq. 6, L∞): ε becomes a variable, ``|x' − x| ≤ ε`` componentwise inside
the clip box and ``ε ≤ eps_max``, and misclassification is a disjunction over classes ``j ≠ y`` with
one binary each: ``f_y − f_j ≤ M_j (1 − s_j)``, ``Σ s_j = 1``, ``M_j`` an upper bound of ``f_y − f_j``
over the ``eps_max`` ball. Minimising ε gives the exact distance when it is below ``eps_max``.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pulp
import torch

from .bounds import Bounder, Bounds, check_objective, margin_matrix, require_sound
from .convert import as_network
from .network import Network
from .regions import LinfBall, Region

try:  # HiGHS through PuLP's highspy interface
    import highspy
except ImportError:  # pragma: no cover - highspy is a dependency
    highspy = None

SOLVERS = ("HIGHS", "CBC")

#: a witness may leave the box by this much (solver feasibility tolerance) before it is rejected
WITNESS_TOL = 1e-6
#: big-M bounds are widened by this (relative + absolute) so that rounding never cuts off a point
_WIDEN = 1e-7
#: early stop for sign decisions: stop when the bound exceeds +this or an incumbent is below −this
_DECIDE = 1e-6


def available_solvers() -> list:
    """Names of the MILP solvers usable here (``solver=`` of :class:`MILPBounder`)."""
    out = []
    if highspy is not None:
        out.append("HIGHS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            if pulp.PULP_CBC_CMD(msg=False).available():
                out.append("CBC")
        except Exception:  # pragma: no cover
            pass
    return out


def _check_solver(solver) -> str:
    key = str(solver).upper()
    available = available_solvers()
    if key not in available:
        raise ValueError(f"unknown or unavailable MILP solver {solver!r}; available: {available}")
    return key


# --------------------------------------------------------------------------------------------------
# the encoding
# --------------------------------------------------------------------------------------------------


def _widen(l: np.ndarray, u: np.ndarray):
    """Slightly looser (still valid) bounds, so that float rounding never makes the MILP infeasible."""
    return l - _WIDEN * (1 + np.abs(l)), u + _WIDEN * (1 + np.abs(u))


class _Encoding:
    """The MILP of one example: input box, then ``len(bounds)`` ReLU layers (eq. 4).

    ``ops``: per affine, ``(b, [(j, W_j)])`` from :meth:`Network.matrices` (the main term and the skip terms).
    ``bounds``: widened (l, u) per encoded ReLU layer, flat float64. With ``center``/``eps_max`` the input
    is ``|x' − center| ≤ ε ≤ eps_max`` inside the box. ``layers[j]`` = (indices of the units of ``z_j``
    that are not stably inactive, their variables), ``z_0`` the input: any affine function of the
    encoded layers is a cost on those variables.
    """

    def __init__(self, ops, lo, hi, bounds, center=None, eps_max=None):
        prob = pulp.LpProblem("adversarial_polytope", pulp.LpMinimize)
        self.prob = prob
        n0 = len(lo)
        self.x = [prob.add_variable(f"x{j}", float(lo[j]), float(hi[j])) for j in range(n0)]
        self.eps = None
        if center is not None:
            self.eps = prob.add_variable("eps", 0.0, float(eps_max))
            for j, v in enumerate(self.x):
                if hi[j] - lo[j] > 0:  # fixed coordinates need no constraint
                    prob += pulp.LpConstraint([(v, 1.0), (self.eps, -1.0)], pulp.LpConstraintLE, rhs=float(center[j]))
                    prob += pulp.LpConstraint([(v, 1.0), (self.eps, 1.0)], pulp.LpConstraintGE, rhs=float(center[j]))
        self.binaries = []
        self.layers = [(np.arange(n0), self.x)]
        self.units = []  # per layer: (unit indices, z variables, ẑ variables or None, binaries or None)
        for i, (l, u) in enumerate(bounds):
            b, _ = ops[i]
            rows = self._rows(ops[i])
            new_live, new_z, new_h, new_a = [], [], [], []
            for j in range(len(b)):
                if u[j] <= 0:  # I⁻: z = 0
                    continue
                row = [(v, -w) for v, w in rows(j)]
                if l[j] >= 0:  # I⁺: z = ẑ = W z + b
                    zj = prob.add_variable(f"z{i}_{j}", float(l[j]), float(u[j]))
                    prob += pulp.LpConstraint(row + [(zj, 1.0)], pulp.LpConstraintEQ, rhs=float(b[j]))
                    h = a = None
                else:          # I: ẑ = W z + b, binary a
                    h = prob.add_variable(f"h{i}_{j}", float(l[j]), float(u[j]))
                    zj = prob.add_variable(f"z{i}_{j}", 0.0, float(u[j]))
                    a = prob.add_variable(f"a{i}_{j}", 0, 1, cat=pulp.LpBinary)
                    self.binaries.append(a)
                    prob += pulp.LpConstraint(row + [(h, 1.0)], pulp.LpConstraintEQ, rhs=float(b[j]))
                    prob += pulp.LpConstraint([(zj, 1.0), (h, -1.0)], pulp.LpConstraintGE, rhs=0.0)        # z ≥ ẑ
                    prob += pulp.LpConstraint([(zj, 1.0), (a, -float(u[j]))], pulp.LpConstraintLE, rhs=0.0)  # z ≤ u a
                    prob += pulp.LpConstraint([(zj, 1.0), (h, -1.0), (a, -float(l[j]))], pulp.LpConstraintLE,
                                              rhs=-float(l[j]))  # z ≤ ẑ − l(1 − a)
                new_live.append(j)
                new_z.append(zj)
                new_h.append(h)
                new_a.append(a)
            live = np.asarray(new_live, dtype=np.int64)
            self.layers.append((live, new_z))
            self.units.append((live, new_z, new_h, new_a))
        self.depth = len(bounds)
        self.ops = ops

    def _rows(self, op):
        """``row(j)``: [(variable, coefficient)] of unit j's linear part ``Σ W_j z_j`` over the live units."""
        blocks = []
        for src, W in op[1]:
            live, zs = self.layers[src]
            Wl = W[:, live].tocsr()
            blocks.append((Wl.indptr, Wl.indices, Wl.data, zs))

        def row(j):
            out = []
            for ptr, ind, val, zs in blocks:
                out += [(zs[k], w) for k, w in zip(ind[ptr[j]:ptr[j + 1]].tolist(), val[ptr[j]:ptr[j + 1]].tolist())]
            return out
        return row

    def assignment(self, point: np.ndarray) -> list:
        """Every variable's value at input ``point`` (a feasible MIP start): [(variable, value)]."""
        values = list(zip(self.x, point.tolist()))
        zs = [point]  # z_0, z_1, ...: full vectors, 0 on stably inactive units
        for i, (live, vars_, hs, as_) in enumerate(self.units):
            b, parts = self.ops[i]
            zhat = b + sum(W @ zs[src] for src, W in parts)
            z = np.zeros_like(zhat)
            z[live] = np.maximum(zhat[live], 0.0)
            for j, zj, h, a in zip(live.tolist(), vars_, hs, as_):
                if h is None:  # I⁺
                    z[j] = zhat[j]
                    values.append((zj, float(zhat[j])))
                else:
                    values += [(zj, float(z[j])), (h, float(zhat[j])), (a, 1.0 if zhat[j] > 0 else 0.0)]
            zs.append(z)
        return values

    def costs(self, c: np.ndarray):
        """``cᵀẑ`` for the affine after the last encoded layer (main and skip terms): (variables,
        coefficients, constant)."""
        b, parts = self.ops[self.depth]
        vars_, coefs = [], []
        for src, W in parts:
            live, zs = self.layers[src]
            if len(live):
                vars_ += zs
                coefs.append(np.asarray(W[:, live].T @ c, dtype=np.float64).reshape(-1))
        return vars_, (np.concatenate(coefs) if coefs else np.zeros(0)), float(c @ b)

    def add_disjunction(self, rows, big_m):
        """Some row ``r`` has ``rowᵀ f ≤ 0``: binaries ``s_r``, ``rowᵀ f ≤ M_r (1 − s_r)``, ``Σ s = 1``."""
        s = []
        for r, (c, M) in enumerate(zip(rows, big_m)):
            vars_, g, const = self.costs(c)
            sr = self.prob.add_variable(f"s{r}", 0, 1, cat=pulp.LpBinary)
            terms = [(v, float(w)) for v, w in zip(vars_, g) if w != 0] + [(sr, float(M))]
            self.prob += pulp.LpConstraint(terms, pulp.LpConstraintLE, rhs=float(M) - const)
            s.append(sr)
        self.prob += pulp.LpConstraint([(v, 1.0) for v in s], pulp.LpConstraintEQ, rhs=1.0)
        self.binaries += s

    @property
    def n_binaries(self) -> int:
        return len(self.binaries)


def _descend(net64: Network, rows: torch.Tensor, lo: np.ndarray, hi: np.ndarray, centre: torch.Tensor,
             steps: int = 20, seed: int = 0):
    """Primal heuristic: projected sign-gradient descent of each row's ``rowᵀ f(x')`` over the box
    ``[lo, hi]``, from the centre and from one seeded random point. Returns (points (K, n0), values (K,)),
    float64 numpy, the best point found per row (its value is the network's, so it is attained)."""
    K, shape = rows.shape[0], net64.input_shape
    lo_t, hi_t = torch.from_numpy(lo), torch.from_numpy(hi)
    span = hi_t - lo_t
    g = torch.Generator().manual_seed(seed)
    best_x = centre.reshape(1, -1).expand(K, -1).clone()
    with torch.no_grad():
        best_v = (net64(best_x.reshape(K, *shape)) * rows).sum(1)
    for z in (best_x.clone(), lo_t + span * torch.rand(K, len(lo), generator=g, dtype=torch.float64)):
        for t in range(steps + 1):
            z = z.detach().requires_grad_(True)
            with torch.enable_grad():
                v = (net64(z.reshape(K, *shape)) * rows).sum(1)
                (grad,) = torch.autograd.grad(v.sum(), z)
            better = v.detach() < best_v
            best_v = torch.where(better, v.detach(), best_v)
            best_x = torch.where(better[:, None], z.detach(), best_x)
            if t == steps:
                break
            step = span * (0.5 * (1 - t / steps) + 0.02)
            z = torch.minimum(torch.maximum(z.detach() - step * grad.sign(), lo_t), hi_t)
    return best_x.numpy(), best_v.numpy()


# --------------------------------------------------------------------------------------------------
# solvers
# --------------------------------------------------------------------------------------------------


@dataclass
class _Outcome:
    """One solve of ``min costᵀ v + const``. ``bound``: proven lower bound (−inf if none); ``value``:
    the solver's objective at its incumbent (inf if none); ``x``: the incumbent's input (or None)."""

    status: str
    bound: float = -math.inf
    value: float = math.inf
    x: np.ndarray | None = None
    eps: float | None = None


class _HighsModel:
    """PuLP builds the HiGHS model once (``pulp.HiGHS``); each solve only changes the costs."""

    def __init__(self, enc: _Encoding, mip=True, threads=None, rel_gap=0.0, abs_gap=1e-9):
        self.enc, self.mip = enc, mip and enc.n_binaries > 0
        enc.prob.setObjective(pulp.LpAffineExpression([(v, 0.0) for v in enc.x]))  # registers every input
        solver = pulp.HiGHS(mip=mip, msg=False, threads=threads, gapRel=rel_gap, gapAbs=abs_gap)
        solver.createAndConfigureSolver(enc.prob)
        solver.buildSolverModel(enc.prob)
        self.h = enc.prob.solverModel
        self.n = self.h.getNumCol()
        self.x_index = np.array([v.index for v in enc.x], dtype=np.int64)
        self.eps_index = enc.eps.index if enc.eps is not None else None

    def solve(self, vars_, coefs, const=0.0, time_limit=None, stop_above=None, stop_below=None, warm=False,
              start=None):
        h = self.h
        cost = np.zeros(self.n)
        if len(vars_):
            np.add.at(cost, np.array([v.index for v in vars_], dtype=np.int64), coefs)
        h.changeColsCost(self.n, np.arange(self.n, dtype=np.int32), cost)
        h.setOptionValue("time_limit", float(time_limit) if time_limit is not None else highspy.kHighsInf)
        inf = highspy.kHighsInf
        h.setOptionValue("objective_bound", float(stop_above - const) if stop_above is not None else inf)
        h.setOptionValue("objective_target", float(stop_below - const) if stop_below is not None else -inf)
        if not warm:
            h.clearSolver()  # no stale incumbent or basis from the previous objective
        if start is not None:  # MIP start: a complete feasible assignment
            sol = highspy.HighsSolution()
            col = np.zeros(self.n)
            for v, val in start:
                col[v.index] = val
            sol.col_value = col.tolist()
            sol.value_valid = True
            h.setSolution(sol)
        run = h.run()
        if run == highspy.HighsStatus.kError and h.getModelStatus() == highspy.HighsModelStatus.kNotset:
            # the "threads" option differs from the running scheduler's: restart it once
            highspy.Highs.resetGlobalScheduler(True)
            run = h.run()
        S = highspy.HighsModelStatus
        ms = h.getModelStatus()
        info = h.getInfo()
        has = info.primal_solution_status == 2  # kSolutionStatusFeasible
        out = _Outcome("solver_error")
        if has:
            col = np.asarray(h.getSolution().col_value)
            out.x = col[self.x_index]
            out.value = info.objective_function_value + const
            if self.eps_index is not None:
                out.eps = float(col[self.eps_index])
        if ms == S.kOptimal:
            out.status = "optimal"
            bound = info.mip_dual_bound + const if self.mip else out.value
            out.bound = out.value if not math.isfinite(bound) else min(bound, out.value)
        elif ms in (S.kObjectiveBound, S.kObjectiveTarget):
            out.status = "stopped"
            out.bound = info.mip_dual_bound + const if self.mip else -math.inf
        elif ms in (S.kTimeLimit, S.kIterationLimit, S.kInterrupt) or ms == getattr(S, "kSolutionLimit", None):
            out.status = "time_limit"
            out.bound = info.mip_dual_bound + const if self.mip else -math.inf
        elif ms == S.kInfeasible:
            out.status = "infeasible"
        if not math.isfinite(out.bound) and out.bound != -math.inf:
            out.bound = -math.inf
        if out.status == "optimal" and not has:
            out.status = "solver_error"
        if stop_above is not None and out.status in ("optimal", "stopped"):
            # with a cutoff, HiGHS prunes against it and its reported dual bound can exceed the true
            # minimum: all that is proven is "no solution below stop_above" (or the bound, if lower)
            out.status, out.bound = "stopped", min(out.bound, stop_above)
        return out


class _CbcModel:
    """PuLP writes the problem and runs CBC (``pulp.PULP_CBC_CMD``) for every objective.

    CBC through PuLP reports no bound when it stops early: the caller falls back to its own bound.
    """

    def __init__(self, enc: _Encoding, threads=None, rel_gap=0.0, abs_gap=1e-9):
        self.enc, self.threads, self.rel_gap, self.abs_gap = enc, threads, rel_gap, abs_gap

    def solve(self, vars_, coefs, const=0.0, time_limit=None, stop_above=None, stop_below=None, warm=False,
              start=None):
        enc = self.enc
        if start is not None:
            for v, val in start:
                v.setInitialValue(val)
        terms = {v: 0.0 for v in enc.x}
        for v, w in zip(vars_, coefs):
            terms[v] = terms.get(v, 0.0) + float(w)
        enc.prob.setObjective(pulp.LpAffineExpression(list(terms.items())))
        options = []
        cutoff = None
        if stop_above is not None:  # prune every node whose bound reaches stop_above
            cutoff = stop_above - const
            options.append(f"cutoff {cutoff!r}")
        if stop_below is not None and stop_above is not None:  # any solution then lies below the cutoff
            options.append("maxSolutions 1")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, threads=self.threads,
                                       gapRel=self.rel_gap, gapAbs=self.abs_gap, options=options,
                                       warmStart=start is not None)
            try:
                enc.prob.solve(solver)
            except pulp.PulpSolverError:
                return _Outcome("solver_error")
        sol = enc.prob.sol_status
        out = _Outcome("solver_error")
        if sol in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            xs = [v.varValue for v in enc.x]
            if all(x is not None for x in xs):
                out.x = np.asarray(xs, dtype=np.float64)
                out.value = sum(float(w) * (v.varValue or 0.0) for v, w in zip(vars_, coefs)) + const
                if enc.eps is not None and enc.eps.varValue is not None:
                    out.eps = float(enc.eps.varValue)
        if sol == pulp.LpSolutionOptimal and out.x is not None:
            out.status, out.bound = "optimal", out.value
        elif sol == pulp.LpSolutionIntegerFeasible or (sol == pulp.LpSolutionNoSolutionFound
                                                       and enc.prob.status == pulp.LpStatusNotSolved):
            out.status = "stopped" if cutoff is not None and out.x is not None else "time_limit"
        elif sol == pulp.LpSolutionInfeasible or enc.prob.status == pulp.LpStatusInfeasible:
            if cutoff is not None:  # nothing below the cutoff: the minimum is at least stop_above
                out.status, out.bound = "stopped", stop_above
            else:
                out.status = "infeasible"
        return out


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------


@dataclass
class MILPBounds(Bounds):
    """:class:`Bounds` plus what the MILP found.

    ``min_value``/``max_value`` (B, m): ``C f(x')`` at the best verified witness of each minimisation /
    maximisation (so ``lower ≤ min ≤ min_value`` and ``max_value ≤ max ≤ upper``; NaN where none).
    ``argmin``/``argmax`` (B, m, *input_shape): those witnesses (NaN where none). ``lower_status`` /
    ``upper_status``: per example, one status per row. ``example_seconds``: wall time per example.
    """

    min_value: torch.Tensor | None = None
    max_value: torch.Tensor | None = None
    argmin: torch.Tensor | None = None
    argmax: torch.Tensor | None = None
    lower_status: list = field(default_factory=list)
    upper_status: list = field(default_factory=list)
    example_seconds: list = field(default_factory=list)


@dataclass
class Certification:
    """Robustness verdicts for margin objectives (rows ``e_y − e_j``), per example.

    ``status``: "certified" (every ``f_y − f_j`` provably > 0 over the region), "counterexample"
    (``witness`` lies in the region and some ``f_j(witness) ≥ f_y(witness)``), "time_limit" or
    "undecided" (the minimum margin is 0 within solver tolerance), or a solver failure status.
    ``lower`` (B,): a proven lower bound of ``min_j min_x' f_y − f_j`` (when certified: > 0, as far as
    the early stop needed); ``witness_margin`` (B,): ``min_j f_y − f_j`` at the witness (NaN if none);
    ``witness`` (B, *input_shape), NaN rows where none; ``seconds``: wall time per example.
    """

    status: list
    lower: torch.Tensor
    witness: torch.Tensor
    witness_margin: torch.Tensor
    seconds: list
    method: str = "milp"

    @property
    def certified(self) -> torch.Tensor:
        return torch.tensor([s == "certified" for s in self.status], dtype=torch.bool)

    @property
    def counterexample(self) -> torch.Tensor:
        return torch.tensor([s == "counterexample" for s in self.status], dtype=torch.bool)


@dataclass
class AdversarialDistance:
    """Minimum L∞ distance from ``x`` to an input (in the clip box) where some class ``j ≠ y`` scores at
    least as high as ``y`` (paper eq. 6), for one example.

    ``status`` "optimal": ``radius`` is exact (``lower ≤ radius``, within solver tolerance, and ``radius``
    is the distance of the verified ``witness``); "beyond_eps_max": no such input within ``eps_max``
    (``radius = lower = eps_max``, read "≥ eps_max"); "time_limit": ``lower ≤`` exact ``≤ upper``.
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


# --------------------------------------------------------------------------------------------------
# the bounder
# --------------------------------------------------------------------------------------------------

_STATUS_ORDER = ("solver_error", "witness_error", "infeasible", "time_limit", "optimal")


def _worst(statuses) -> str:
    for s in _STATUS_ORDER:
        if s in statuses:
            return s
    return "optimal"


class MILPBounder(Bounder):
    """Exact bounds of ``C f(x')`` over an L∞ ball (∩ clip box) by MILP (paper eq. 4).

    Options: ``solver`` "HIGHS" (default) or "CBC"; ``time_limit`` seconds per MILP (None: none);
    ``threads`` for the solver (None: its default); ``intermediate``: the big-M bounds, a Bounder
    instance or registered name (default "dual"), or "progressive" (interval ∩ dual, then one LP per
    unstable neuron on the relaxation of this encoding, layer by layer; solved with HiGHS whatever
    ``solver`` is); ``rel_gap``/``abs_gap``: the solver's optimality gaps (default 0 and 1e-9: exact).
    L2 balls are not linear sets: they raise ValueError.
    """

    name = "milp"
    #: region types this backend accepts
    supported_regions = (LinfBall,)

    def __init__(self, solver="HIGHS", time_limit=None, threads=None, intermediate="dual", rel_gap=0.0,
                 abs_gap=1e-9, heuristic_steps=20):
        self.solver = _check_solver(solver)
        if time_limit is not None and not (float(time_limit) > 0):
            raise ValueError(f"time_limit must be None or > 0 seconds, got {time_limit!r}")
        if threads is not None and int(threads) < 0:
            raise ValueError(f"threads must be None or >= 0, got {threads!r}")
        if isinstance(intermediate, str):
            if intermediate != "progressive" and intermediate not in Bounder.registry:
                raise ValueError(f"intermediate must be a Bounder, 'progressive' or one of "
                                 f"{Bounder.available()}, got {intermediate!r}")
        elif not isinstance(intermediate, Bounder):
            raise ValueError(f"intermediate must be a Bounder instance or name, got {type(intermediate).__name__}")
        self.time_limit = None if time_limit is None else float(time_limit)
        self.threads = None if threads is None else int(threads)
        self.intermediate = intermediate
        self.rel_gap, self.abs_gap = float(rel_gap), float(abs_gap)
        if int(heuristic_steps) < 0:
            raise ValueError(f"heuristic_steps must be >= 0, got {heuristic_steps!r}")
        self.heuristic_steps = int(heuristic_steps)

    # ---------------------------------------------------------------- helpers

    def _model(self, enc: _Encoding):
        if self.solver == "HIGHS":
            return _HighsModel(enc, threads=self.threads, rel_gap=self.rel_gap, abs_gap=self.abs_gap)
        return _CbcModel(enc, threads=self.threads, rel_gap=self.rel_gap, abs_gap=self.abs_gap)

    def _labelled(self, model, region, y):
        """(network, region in the network's dtype, labels) for the classification queries."""
        network = self._prepare(model, region)
        if region.x.dtype != network.dtype:
            region = region.to(dtype=network.dtype)
        y = torch.as_tensor(y).long().reshape(-1)
        if len(y) != region.batch_size:
            raise ValueError(f"y has {len(y)} labels for {region.batch_size} examples")
        return network, region, y

    @staticmethod
    def _prepare(model, region):
        if not isinstance(region, Region):
            raise ValueError(f"region must be a LinfBall or L2Ball, got {type(region).__name__}")
        if not isinstance(region, LinfBall):
            raise ValueError(f"the MILP backend supports L∞ balls (optionally ∩ a clip box) only: "
                             f"{type(region).__name__} is not a linear set; use the 'dual' or 'lp' backend")
        network = as_network(model, region.input_shape)
        return network

    def _bounds_for(self, network: Network, region: LinfBall, C: torch.Tensor):
        """float64 copies, the affine operators (:meth:`Network.matrices`), intermediate (l, u) per ReLU layer and
        fallback bounds of C."""
        with torch.no_grad():  # a detached copy: nothing below can reach the model's parameters
            net64 = network.to(dtype=torch.float64)
        reg64 = region.to(dtype=torch.float64)
        C64 = C.to(torch.float64)
        ops = network.matrices()
        with torch.no_grad():
            if isinstance(self.intermediate, str) and self.intermediate == "progressive":
                layers, lower, upper = self._progressive(net64, reg64, C64, ops)
            else:
                bounder = (Bounder.create(self.intermediate) if isinstance(self.intermediate, str)
                           else self.intermediate)
                b = require_sound(bounder.bound(net64, reg64, C64), "the MILP")
                layers = [(l.detach().double(), u.detach().double()) for l, u in b.intermediate]
                lower, upper = b.lower.detach().double(), b.upper.detach().double()
        return net64, reg64, C64, ops, layers, lower, upper

    def _progressive(self, net64, reg64, C64, ops):
        """Interval ∩ dual, then per-neuron LP tightening (relaxed encoding) of the unstable units."""
        ib = Bounder.create("interval").bound(net64, reg64, C64)
        db = Bounder.create("dual").bound(net64, reg64, C64)
        layers = [(torch.maximum(l1, l2), torch.minimum(u1, u2))
                  for (l1, u1), (l2, u2) in zip(ib.intermediate, db.intermediate)]
        lower, upper = torch.maximum(ib.lower, db.lower), torch.minimum(ib.upper, db.upper)
        if highspy is None or net64.n_relu_layers < 2:
            return layers, lower, upper
        lo, hi = (t.reshape(t.shape[0], -1).numpy() for t in reg64.box())
        B = reg64.batch_size
        flat = [[t.reshape(B, -1).numpy().copy() for t in lu] for lu in layers]
        for b in range(B):
            for i in range(1, net64.n_relu_layers):  # the first layer's box bounds are already exact
                l, u = flat[i][0][b], flat[i][1][b]
                unstable = np.nonzero((l < 0) & (u > 0))[0]
                if not len(unstable):
                    continue
                enc = _Encoding(ops, lo[b], hi[b], [_widen(flat[k][0][b], flat[k][1][b]) for k in range(i)])
                model = _HighsModel(enc, mip=False, threads=self.threads)
                for j in unstable:
                    e = np.zeros(len(l))
                    e[j] = 1.0
                    for sign in (1.0, -1.0):
                        vars_, g, const = enc.costs(sign * e)
                        out = model.solve(vars_, g, const, time_limit=self.time_limit, warm=True)
                        if out.status != "optimal":
                            continue
                        if sign > 0:
                            l[j] = max(l[j], out.bound)
                        else:
                            u[j] = min(u[j], -out.bound)
                    if l[j] > u[j]:  # rounding: keep a valid interval
                        l[j] = u[j] = 0.5 * (l[j] + u[j])
        layers = [(torch.from_numpy(fl[0]).reshape(l.shape), torch.from_numpy(fl[1]).reshape(u.shape))
                  for fl, (l, u) in zip(flat, layers)]
        return layers, lower, upper

    @staticmethod
    def _flat_layers(layers, b):
        return [_widen(l[b].reshape(-1).numpy(), u[b].reshape(-1).numpy()) for l, u in layers]

    @staticmethod
    def _witness(x, lo, hi):
        """(input projected onto the box, whether it was inside up to WITNESS_TOL)."""
        inside = bool(np.all(x >= lo - WITNESS_TOL) and np.all(x <= hi + WITNESS_TOL))
        return np.clip(x, lo, hi), inside

    # ---------------------------------------------------------------- bound

    def _bound(self, network, region, C):
        self._prepare(network, region)
        net64, reg64, C64, ops, layers, fb_lower, fb_upper = self._bounds_for(network, region, C)
        B, m = C.shape[:2]
        shape = network.input_shape
        lo_all, hi_all = (t.reshape(B, -1).numpy() for t in reg64.box())
        lower = fb_lower.clone()
        upper = fb_upper.clone()
        nan = torch.full((B, m), math.nan, dtype=torch.float64)
        min_value, max_value = nan.clone(), nan.clone()
        argmin = torch.full((B, m, *shape), math.nan, dtype=torch.float64)
        argmax = argmin.clone()
        statuses, lower_status, upper_status, seconds = [], [], [], []
        for b in range(B):
            start = time.perf_counter()
            lo, hi = lo_all[b], hi_all[b]
            enc = _Encoding(ops, lo, hi, self._flat_layers(layers, b))
            model = self._model(enc)
            rows = torch.cat([C64[b], -C64[b]])  # minimise c f (lower), then −c f (−upper)
            if self.heuristic_steps:
                guesses, guess_values = _descend(net64, rows, lo, hi, reg64.x[b], self.heuristic_steps)
            row_status = ([], [])
            for k in range(2 * m):
                side, r = divmod(k, m)
                vars_, g, const = enc.costs(rows[k].numpy())
                mip_start = enc.assignment(guesses[k]) if self.heuristic_steps else None
                out = model.solve(vars_, g, const, time_limit=self.time_limit, start=mip_start)
                fallback = (fb_lower[b, r] if side == 0 else -fb_upper[b, r]).item()
                status, attained, point = out.status, math.inf, None
                if out.x is not None:
                    p, inside = self._witness(out.x, lo, hi)
                    if inside:
                        with torch.no_grad():
                            attained = float(rows[k] @ net64(torch.from_numpy(p).reshape(1, *shape))[0])
                        point = p
                    else:
                        status = "witness_error"
                if self.heuristic_steps and guess_values[k] < attained:  # the heuristic's point is attained too
                    attained, point = float(guess_values[k]), guesses[k]
                if status == "optimal":
                    bound = min(out.bound, attained)
                elif status in ("time_limit", "stopped"):
                    status = "time_limit"
                    bound = min(max(out.bound, fallback), attained)
                else:  # infeasible, solver_error, witness_error: the intermediate bounder's sound bound
                    bound = fallback
                row_status[side].append(status)
                if side == 0:
                    lower[b, r] = bound
                else:
                    upper[b, r] = -bound
                if point is not None:
                    (min_value if side == 0 else max_value)[b, r] = attained if side == 0 else -attained
                    (argmin if side == 0 else argmax)[b, r] = torch.from_numpy(np.array(point)).reshape(shape)
            statuses.append(_worst(row_status[0] + row_status[1]))
            lower_status.append(row_status[0])
            upper_status.append(row_status[1])
            seconds.append(time.perf_counter() - start)
        dt = region.x.dtype
        out_layers = [(l.to(dt), u.to(dt)) for l, u in layers]
        return MILPBounds(lower.to(dt), upper.to(dt), out_layers, statuses, method="milp",
                          min_value=min_value.to(dt), max_value=max_value.to(dt), argmin=argmin.to(dt),
                          argmax=argmax.to(dt), lower_status=lower_status, upper_status=upper_status,
                          example_seconds=seconds)

    # ---------------------------------------------------------------- robustness queries

    def certify(self, model, region: LinfBall, y, trust_dual: bool = True) -> Certification:
        """Is the class ``y`` robust over ``region``? Decides the sign of every margin ``f_y − f_j``.

        Per example: the centre is checked first (a misclassified centre is its own counterexample);
        rows the intermediate bounder already certifies are skipped when ``trust_dual`` (its bounds are
        sound); the rest are solved most-doubtful first, each stopping as soon as its sign is decided —
        HiGHS: ``objective_bound`` = +1e-6 (prune nodes whose bound reaches it) and ``objective_target``
        = −1e-6 (stop at such an incumbent); CBC: ``cutoff`` +1e-6 and ``maxSolutions 1``. A found
        incumbent counts only once the network, run on its input, confirms some ``f_j ≥ f_y``; then the
        example stops. A sign still undecided after the early stop is solved to optimality.
        """
        network, region, y = self._labelled(model, region, y)
        n_out = network.output_size
        C = check_objective(margin_matrix(y, n_out), network, region)
        B, shape = region.batch_size, network.input_shape
        if B == 0:
            return Certification([], torch.zeros(0), torch.zeros(0, *shape), torch.zeros(0), [])
        net64, reg64, C64, ops, layers, fb_lower, _ = self._bounds_for(network, region, C)
        lo_all, hi_all = (t.reshape(B, -1).numpy() for t in reg64.box())
        with torch.no_grad():
            centre = torch.einsum("bmn,bn->bm", C64, net64(reg64.x))
        statuses, seconds = [], []
        lower = torch.full((B,), -math.inf, dtype=torch.float64)
        witness = torch.full((B, *shape), math.nan, dtype=torch.float64)
        witness_margin = torch.full((B,), math.nan, dtype=torch.float64)

        def margin_at(point, b):
            with torch.no_grad():
                return float((C64[b] @ net64(torch.from_numpy(point).reshape(1, *shape))[0]).min())

        for b in range(B):
            start = time.perf_counter()
            row_lower = fb_lower[b].clone()
            status = None
            if centre[b].min() <= 0:
                status = "counterexample"
                witness[b] = reg64.x[b]
                witness_margin[b] = float(centre[b].min())
            else:
                todo = [r for r in torch.argsort(row_lower).tolist() if not (trust_dual and row_lower[r] > 0)]
                guesses = {}
                if todo and self.heuristic_steps:  # a quick counterexample search first
                    pts, vals = _descend(net64, C64[b, todo], lo_all[b], hi_all[b], reg64.x[b], self.heuristic_steps)
                    guesses = dict(zip(todo, pts))
                    k = int(np.argmin(vals))
                    if vals[k] <= 0:
                        status = "counterexample"
                        witness[b] = torch.from_numpy(pts[k]).reshape(shape)
                        witness_margin[b] = margin_at(pts[k], b)
                        todo = []
                enc = model_ = None
                pending = []
                for r in todo:
                    if enc is None:
                        enc = _Encoding(ops, lo_all[b], hi_all[b], self._flat_layers(layers, b))
                        model_ = self._model(enc)
                    vars_, g, const = enc.costs(C64[b, r].numpy())
                    mip_start = enc.assignment(guesses[r]) if r in guesses else None
                    row_verdict = None
                    for early in (True, False):
                        if early:
                            out = model_.solve(vars_, g, const, self.time_limit, stop_above=_DECIDE,
                                               stop_below=-_DECIDE, start=mip_start)
                        else:
                            out = model_.solve(vars_, g, const, self.time_limit, start=mip_start)
                        if out.x is not None:
                            point, inside = self._witness(out.x, lo_all[b], hi_all[b])
                            if not inside:
                                row_verdict = "witness_error"
                                break
                            mg = margin_at(point, b)
                            if mg <= 0:
                                row_verdict = "counterexample"
                                witness[b] = torch.from_numpy(point).reshape(shape)
                                witness_margin[b] = mg
                                break
                        if out.bound > 0 and out.status in ("optimal", "stopped"):
                            row_lower[r] = max(float(row_lower[r]), out.bound)
                            row_verdict = "certified"
                            break
                        if out.status == "time_limit":
                            row_verdict = "time_limit"
                            break
                        if out.status in ("infeasible", "solver_error"):
                            row_verdict = out.status
                            break
                        if not early:  # solved to optimality, minimum is 0 within tolerance
                            row_verdict = "undecided"
                    if row_verdict == "counterexample":
                        status = "counterexample"
                        break
                    if row_verdict != "certified":
                        pending.append(row_verdict)
                if status is None:
                    if not pending:
                        status = "certified"
                    else:
                        for s in ("solver_error", "witness_error", "infeasible", "time_limit", "undecided"):
                            if s in pending:
                                status = s
                                break
            lower[b] = float(row_lower.min())
            statuses.append(status)
            seconds.append(time.perf_counter() - start)
        dt = region.x.dtype
        return Certification(statuses, lower.to(dt), witness.to(dt), witness_margin.to(dt), seconds)

    def minimum_distance(self, model, x, y, eps_max: float, clip=None) -> list:
        """Exact minimum L∞ adversarial distance (eq. 6) per example, searched up to ``eps_max``.

        ``x`` (B, *input_shape), ``y`` (B,). Returns one :class:`AdversarialDistance` per example. The
        big-M bounds come from the intermediate bounder on ``LinfBall(x, eps_max, clip)``, valid for every
        smaller ε; classes that bounder already rules out at ``eps_max`` get no binary.
        """
        eps_max = float(eps_max)
        if not eps_max > 0:
            raise ValueError(f"eps_max must be > 0, got {eps_max}")
        region = LinfBall(x, eps_max, clip)
        network, region, y = self._labelled(model, region, y)
        B, shape = region.batch_size, network.input_shape
        if B == 0:
            return []
        C = check_objective(margin_matrix(y, network.output_size), network, region)
        net64, reg64, C64, ops, layers, fb_lower, fb_upper = self._bounds_for(network, region, C)
        lo_all, hi_all = (t.reshape(B, -1).numpy() for t in reg64.box())
        x64 = reg64.x.reshape(B, -1).numpy()
        others = [[j for j in range(network.output_size) if j != int(y[b])] for b in range(B)]
        results = []
        for b in range(B):
            start = time.perf_counter()
            with torch.no_grad():
                margins = C64[b] @ net64(reg64.x[b:b + 1])[0]
            if margins.min() <= 0:  # x itself is not classified as y
                r = int(torch.argmin(margins))
                results.append(AdversarialDistance(0.0, 0.0, 0.0, "optimal", reg64.x[b].clone().to(region.x.dtype),
                                                   others[b][r], float(margins.min()), time.perf_counter() - start))
                continue
            rows = [r for r in range(C.shape[1]) if fb_lower[b, r] <= 0]
            if not rows:  # certified at eps_max by the intermediate bounder
                results.append(AdversarialDistance(eps_max, eps_max, math.inf, "beyond_eps_max",
                                                   seconds=time.perf_counter() - start))
                continue
            enc = _Encoding(ops, lo_all[b], hi_all[b], self._flat_layers(layers, b), center=x64[b], eps_max=eps_max)
            big_m = [max(float(fb_upper[b, r]), 0.0) * (1 + _WIDEN) + _WIDEN for r in rows]
            enc.add_disjunction([C64[b, r].numpy() for r in rows], big_m)
            model_ = self._model(enc)
            out = model_.solve([enc.eps], np.ones(1), 0.0, self.time_limit)
            seconds = lambda: time.perf_counter() - start  # noqa: E731
            if out.status == "infeasible":
                results.append(AdversarialDistance(eps_max, eps_max, math.inf, "beyond_eps_max", seconds=seconds()))
                continue
            lower = max(out.bound, 0.0) if math.isfinite(out.bound) else 0.0
            if out.x is None:
                status = out.status if out.status != "optimal" else "solver_error"
                results.append(AdversarialDistance(math.nan, lower, math.inf, status, seconds=seconds()))
                continue
            point, inside = self._witness(out.x, lo_all[b], hi_all[b])
            with torch.no_grad():
                f = net64(torch.from_numpy(point).reshape(1, *shape))[0]
            wm = C64[b] @ f
            dist = float(np.max(np.abs(point - x64[b]))) if len(point) else 0.0
            scale = 1.0 + float(f.abs().max())
            verified = inside and float(wm.min()) <= 1e-5 * scale
            status = out.status if verified else "witness_error"
            if status == "stopped":
                status = "time_limit"
            radius = dist if status == "optimal" else (dist if verified else math.nan)
            results.append(AdversarialDistance(
                radius, min(lower, dist) if verified else lower, dist if verified else math.inf, status,
                torch.from_numpy(point).reshape(shape).to(region.x.dtype), others[b][int(torch.argmin(wm))],
                float(wm.min()), seconds()))
        return results


# --------------------------------------------------------------------------------------------------
# functions
# --------------------------------------------------------------------------------------------------


def minimum_adversarial_distance(model, x, y, eps_max: float, clip=None, **options) -> list:
    """Exact minimum L∞ adversarial distance per example (paper eq. 6) up to ``eps_max``; ``options`` as
    for :class:`MILPBounder`. One :class:`AdversarialDistance` per example."""
    return MILPBounder(**options).minimum_distance(model, x, y, eps_max, clip)


def certified_radius(model, x, y, eps_max: float = 1.0, clip=None, tol: float = 1e-4, bounder="dual") -> list:
    """Largest ε (to ``tol``, by bisection) at which ``bounder`` certifies ``LinfBall(x, ε, clip)`` with the
    margin matrix of ``y``: a sound lower bound of the minimum adversarial distance, per example.

    ``x`` (B, *input_shape), ``y`` (B,). Returns a list of B floats (``eps_max`` if certified there, 0.0 if
    not even at ε = 0). Assumes certification is monotone in ε (bounds widen with ε).
    """
    b_ = Bounder.create(bounder) if isinstance(bounder, str) else bounder
    x = torch.as_tensor(x)
    y = torch.as_tensor(y).long().reshape(-1)
    B = x.shape[0]
    if B == 0:
        return []
    network = as_network(model, tuple(x.shape[1:]))
    C = margin_matrix(y, network.output_size)

    def ok(eps):
        with torch.no_grad():
            return b_.bound(network, LinfBall(x, eps.to(x.dtype), clip), C).certified

    lo = torch.zeros(B, dtype=torch.float64)
    hi = torch.full((B,), float(eps_max), dtype=torch.float64)
    at_max = ok(hi)
    at_zero = ok(lo)
    lo = torch.where(at_max, hi, lo)
    steps = max(1, int(math.ceil(math.log2(max(eps_max / tol, 2.0)))))
    for _ in range(steps):
        mid = (lo + hi) / 2
        good = ok(mid) & ~at_max & at_zero
        lo = torch.where(good, mid, lo)
        hi = torch.where(good | at_max, hi, mid)
    lo = torch.where(at_zero | at_max, lo, torch.zeros_like(lo))
    return [float(v) for v in lo]


__all__ = ["MILPBounder", "MILPBounds", "Certification", "AdversarialDistance", "minimum_adversarial_distance",
           "certified_radius", "available_solvers", "SOLVERS"]

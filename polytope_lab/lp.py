"""LP bounds: minimise ``cᵀẑ_k`` over the convex outer polytope of the paper's eq. 15.

The constraint system is :func:`polytope_lab.relaxation.build` (``exact=False``: the triangle on the
unstable units I, ``z = ẑ`` on I⁺, nothing on I⁻; convolutions and skip terms as sparse rows); a
:class:`polytope_lab.solvers.CvxpyAdapter` solves it (an LP, or an SOCP with the L2 ball's cone), one
problem per example, each row of C a re-solve with a new cost (DPP: CVXPY canonicalises once).
The pre-activation bounds l, u come from another bounder (default the dual network) or, with
``intermediate="lp"``, from per-neuron LPs layer by layer ("LP-ALL", Salman et al. 2019).
"""
from __future__ import annotations

import numpy as np
import torch

from .bounds import Bounder, Bounds, require_sound
from .network import Network
from .regions import L2Ball, Region
from .relaxation import build
from .solvers import Budget, CvxpyAdapter, cvxpy_solvers, time_limit_seconds

#: outcome statuses as per-row bound statuses: an inaccurate solve falls back to the sound bound ("ok")
ROW_STATUS = {"optimal": "optimal", "inaccurate": "ok", "time_limit": "time_limit", "infeasible": "infeasible"}
#: the example's status is the first of these among its rows' (errors come before all of them)
STATUS_ORDER = ("infeasible", "time_limit", "ok", "optimal")


def worst_status(statuses, order=STATUS_ORDER) -> str:
    """One example's status from its rows': any error, else the first of ``order`` present."""
    for s in statuses:
        if s.startswith("error"):
            return s
    return next((s for s in order if s in statuses), order[-1])


def numpy_rows(t: torch.Tensor) -> np.ndarray:
    """(B, ...) tensor as a (B, n) float64 array."""
    return t.detach().double().cpu().numpy().reshape(t.shape[0], -1)


class LPBounder(Bounder):
    """The LP relaxation (eq. 15): the optimum of the convex outer polytope for the given l, u.

    Options: ``solver`` any installed CVXPY solver (default None: HIGHS for L∞ balls, CLARABEL for L2
    balls, which make the problem an SOCP); ``intermediate`` the bounder (instance or registered name,
    default "dual") whose ``Bounds.intermediate`` give l, u, or "lp" for LP-ALL: the units that the dual
    bounds leave unstable get l, u from their own LPs over the LP-tightened layers below (the first
    layer's dual bounds are already exact; the LP of a stable unit does not depend on its l, u);
    ``time_limit`` seconds per example, all its solves together (each gets what is left; a row not solved
    in time keeps the intermediate bounder's bound, status "time_limit"); ``solver_options`` keyword
    arguments for ``Problem.solve``; ``device`` where the intermediate bounder runs.

    The values are the solver's reported optimum: exact for the relaxation only up to the solver's
    feasibility/optimality tolerances (``relaxation.SOLVER_TOLERANCE``, 1e-7 with HiGHS), so the LP is a
    referee for the other backends; certify with the dual, whose bound is exact arithmetic on a feasible
    dual point.

    Status per example (worst row first): "error: …" (a solver failure), "infeasible", "time_limit", "ok"
    (some solve was only "optimal_inaccurate": that row took the intermediate bounder's sound bound),
    "optimal". A row whose solve was not optimal never raises: it falls back to the intermediate
    bounder's own (sound, looser) bound on that row; an LP-ALL unit keeps its dual bounds.
    """

    name = "lp"

    #: certify needs a margin above the solvers' feasibility tolerance (1e-7, ×10: relaxation.solver_slack)
    certify_tol = 1e-6

    def __init__(self, solver=None, intermediate="dual", solver_options=None, time_limit=None, device=None):
        super().__init__(device=device)
        installed = cvxpy_solvers()
        if solver is not None and str(solver).upper() not in installed:
            raise ValueError(f"CVXPY solver {solver!r} is not installed; installed solvers: {installed}")
        if not (isinstance(intermediate, Bounder) or intermediate == "lp" or intermediate in Bounder.registry):
            raise ValueError(f"intermediate must be a Bounder, 'lp' or one of {Bounder.available()}, "
                             f"got {intermediate!r}")
        time_limit = time_limit_seconds(time_limit)
        self.solver = None if solver is None else str(solver).upper()
        self.intermediate = intermediate
        self.solver_options = dict(solver_options or {})
        self.time_limit = time_limit

    @property
    def lp_all(self) -> bool:
        return isinstance(self.intermediate, str) and self.intermediate == "lp"

    def _solver_for(self, region: Region) -> str:
        if not isinstance(region, L2Ball):
            return self.solver or "HIGHS"
        soc = cvxpy_solvers(conic=True)
        if self.solver is None and "CLARABEL" in soc:
            return "CLARABEL"
        if self.solver not in soc:
            raise ValueError(f"an L2 ball makes the LP a second-order-cone program (SOCP), which solver "
                             f"{self.solver} cannot solve; use one of {soc}")
        return self.solver

    def _reference(self, network, region, C) -> Bounds:
        """The intermediate bounder's (sound) bounds: l, u and the fallback of every row."""
        base = self.intermediate if isinstance(self.intermediate, Bounder) else \
            Bounder.create("dual" if self.lp_all else self.intermediate)
        return require_sound(base.bound(network, region, C), "the LP")

    def _bound(self, network: Network, region: Region, C: torch.Tensor) -> Bounds:
        solver = self._solver_for(region)
        ref = self._reference(network, region, C)
        ops, B = network.matrices(), region.batch_size
        rows, (lo, hi), centre = C.detach().double().cpu().numpy(), map(numpy_rows, region.box()), numpy_rows(region.x)
        ref_lo, ref_hi = ref.lower.detach().double().cpu().numpy(), ref.upper.detach().double().cpu().numpy()
        layers = [tuple(map(numpy_rows, lu)) for lu in ref.intermediate]
        lower, upper, status, used = ref_lo.copy(), ref_hi.copy(), [], []
        for b in range(B):
            budget = Budget(self.time_limit)
            ball = (centre[b], float(region.eps[b])) if isinstance(region, L2Ball) else None
            bounds = [(l[b].copy(), u[b].copy()) for l, u in layers]
            statuses = self._tighten(ops, bounds, lo[b], hi[b], ball, solver, budget) if self.lp_all else []
            system = build(ops, lo[b], hi[b], bounds, exact=False, ball=ball)
            adapter = CvxpyAdapter(system, solver, self.solver_options)
            lv, s1 = self._minimise(adapter, system, rows[b], budget)
            uv, s2 = self._minimise(adapter, system, -rows[b], budget)
            lower[b] = np.where(np.isnan(lv), ref_lo[b], lv)     # fallback: sound, looser
            upper[b] = np.where(np.isnan(uv), ref_hi[b], -uv)
            used.append(bounds)
            status.append(worst_status(statuses + s1 + s2))
        tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=C.dtype, device=C.device)  # noqa: E731
        intermediate = [tuple(tensor([ex[i][k] for ex in used]).reshape(B, *a.out_shape) for k in range(2))
                        for i, a in enumerate(network.affines[:-1])]
        return Bounds(tensor(lower), tensor(upper), intermediate, status, method="lp-all" if self.lp_all else "lp")

    @staticmethod
    def _minimise(adapter, system, rows, budget, layer=None, units=None):
        """``min rowᵀẑ`` (the output by default; ``layer``/``units``: those pre-activations) for each row:
        (values, row statuses); a value is NaN where the solve did not end "optimal"."""
        F, f0 = system.affine(system.depth if layer is None else layer, units)
        values, statuses = np.full(len(rows), np.nan), []
        for j, row in enumerate(rows):
            if budget.expired:
                statuses.append("time_limit")
                continue
            out = adapter.solve(np.asarray(F.T @ row).reshape(-1), float(row @ f0), time_limit=budget.remaining())
            if out.status == "optimal":
                values[j] = out.bound
            statuses.append(ROW_STATUS.get(out.status, out.status))   # else "error: …"
        return values, statuses

    def _tighten(self, ops, bounds, lo, hi, ball, solver, budget) -> list:
        """LP-ALL for one example: replace ``bounds[i]`` (i ≥ 1) of the units the given bounds leave
        unstable by their LP optima over the already tightened layers below; returns the statuses."""
        statuses = []
        for i in range(1, len(bounds)):
            l, u = bounds[i]
            units = np.flatnonzero((l < 0) & (u > 0))
            if units.size:
                system = build(ops, lo, hi, bounds[:i], exact=False, ball=ball)
                adapter = CvxpyAdapter(system, solver, self.solver_options)
                eye = np.eye(units.size)
                (lv, s1), (uv, s2) = (self._minimise(adapter, system, sign * eye, budget, i, units) for sign in (1, -1))
                l[units], u[units] = np.fmax(l[units], lv), np.fmin(u[units], -uv)  # NaN: keep the given bound
                statuses += s1 + s2
        return statuses

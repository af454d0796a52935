"""LP bounds: minimise ``cᵀẑ_k`` over the convex outer polytope of the paper's eq. 15, with CVXPY.

Variables per layer (the input ``x'``; per ReLU layer ``ẑ`` = ``z`` on I⁺, and ``ẑ``, ``z`` on I; nothing on
I⁻, where z = 0); constraints ``ẑ_{i+1} = W_i z_i + b_i + Σ_j (S_ij z_j + b_ij)`` (sparse operator matrices,
convolutions included; the sum over the network's skip terms), the input set, and on I the triangle
``z ≥ 0, z ≥ ẑ, z ≤ u(ẑ − l)/(u − l)``.
The pre-activation bounds l, u come from another bounder (default the dual network) or, with
``intermediate="lp"``, from per-neuron LPs layer by layer ("LP-ALL", Salman et al. 2019).
One problem is built per example; each row of C is a re-solve with a new value of the objective
``cvxpy.Parameter`` (DPP: CVXPY canonicalises once).
"""
from __future__ import annotations

import functools
import warnings

import cvxpy as cp
import numpy as np
import torch

from .bounds import Bounder, Bounds, require_sound
from .network import Network
from .regions import L2Ball, Region


def _soc_solvers() -> list:
    """Installed CVXPY solvers that accept second-order-cone constraints (needed for L2 balls)."""
    from cvxpy.constraints import SOC
    from cvxpy.reductions.solvers.defines import SOLVER_MAP_CONIC
    return [s for s in cp.installed_solvers()
            if s in SOLVER_MAP_CONIC and SOC in SOLVER_MAP_CONIC[s].SUPPORTED_CONSTRAINTS]


def _affine(op, zs, rows=None):
    """``ẑ[rows]`` of the affine ``op = (b, [(j, W_j)])`` as a CVXPY expression, each layer ``z_j`` given
    as terms ``zs[j] = [(units, variable)]``."""
    b, parts = op
    expr = cp.Constant(b if rows is None else b[rows])
    for j, W in parts:
        if rows is not None:
            W = W[rows]
        for units, v in zs[j]:
            expr = expr + W[:, units] @ v
    return expr


def _relaxation(ops, bounds, x_terms, constraints, top):
    """Eq. 15 from the input up to the input of affine ``top``: (terms of z_0..z_top, constraints)."""
    zs, cons = [x_terms], list(constraints)
    for i in range(top):
        l, u = bounds[i]
        active, unstable = np.flatnonzero(l >= 0), np.flatnonzero((l < 0) & (u > 0))
        new = []
        if active.size:                                       # I⁺: z = ẑ
            z = cp.Variable(active.size)
            cons.append(z == _affine(ops[i], zs, active))
            new.append((active, z))
        if unstable.size:                                     # I: the triangle
            zhat, z = cp.Variable(unstable.size), cp.Variable(unstable.size)
            lI, uI = l[unstable], u[unstable]
            cons += [zhat == _affine(ops[i], zs, unstable),
                     z >= 0, z >= zhat, z <= cp.multiply(uI / (uI - lI), zhat - lI)]
            new.append((unstable, z))
        zs.append(new)                                        # I⁻: z = 0, no term
    return zs, cons


def _solve(problem, solver, options) -> str:
    """``problem.solve`` returning its status; CVXPY's "may be inaccurate" warning is silenced (the
    status reports it) and a SolverError becomes the status "solver_error"."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            problem.solve(solver=solver, **options)
        return problem.status
    except cp.SolverError:
        return "solver_error"


def _minimise(problem, c, rows, solver, options):
    """``min rowᵀ(objective)`` for each row (re-solves with ``c.value = row``): (values, statuses);
    a value is NaN where the solve did not end "optimal"."""
    values, statuses = np.full(len(rows), np.nan), []
    for j, row in enumerate(rows):
        c.value = row
        status = _solve(problem, solver, options)
        if status not in ("optimal", "user_limit"):  # a warm start from the previous basis can fail numerically
            status = _solve(problem, solver, {**options, "warm_start": False})
        if status == "optimal":
            values[j] = problem.value
        statuses.append(status)
    return values, statuses


def _numpy(t: torch.Tensor) -> np.ndarray:
    """(B, ...) tensor as a (B, n) float64 array."""
    return t.detach().double().cpu().numpy().reshape(t.shape[0], -1)


def _worst(statuses) -> str:
    return next((s for s in statuses if s != "optimal"), "optimal")


class LPBounder(Bounder):
    """The LP relaxation (eq. 15): the optimum of the convex outer polytope for the given l, u.

    Options: ``solver`` any installed CVXPY solver (default None: HIGHS for L∞ balls, CLARABEL for L2
    balls, which make the problem an SOCP); ``intermediate`` the bounder (instance or registered name,
    default "dual") whose ``Bounds.intermediate`` give l, u, or "lp" for LP-ALL: the units that the dual
    bounds leave unstable get l, u from their own LPs over the LP-tightened layers below (the first
    layer's dual bounds are already exact; the LP of a stable unit does not depend on its l, u);
    ``solver_options`` keyword arguments for ``Problem.solve``.

    The values are the solver's reported optimum: exact for the relaxation only up to the solver's
    feasibility/optimality tolerances (about 1e-7 with HiGHS), so the LP is a referee for the other
    backends (``cross_check`` compares with a tolerance); certify with the dual, whose bound is exact
    arithmetic on a feasible dual point.

    Status per example: "optimal" when every solve was, else the first other CVXPY status
    ("optimal_inaccurate", "infeasible", "solver_error", ...). A row whose solve was not optimal never
    raises: it falls back to the intermediate bounder's own (sound, looser) bound on that row; an LP-ALL
    unit falls back to its dual bounds.
    """

    name = "lp"

    def __init__(self, solver=None, intermediate="dual", solver_options=None):
        installed = cp.installed_solvers()
        if solver is not None and str(solver).upper() not in installed:
            raise ValueError(f"CVXPY solver {solver!r} is not installed; installed solvers: {installed}")
        if not (isinstance(intermediate, Bounder) or intermediate == "lp" or intermediate in Bounder.registry):
            raise ValueError(f"intermediate must be a Bounder, 'lp' or one of {Bounder.available()}, "
                             f"got {intermediate!r}")
        self.solver = None if solver is None else str(solver).upper()
        self.intermediate = intermediate
        self.solver_options = dict(solver_options or {})

    def _solver_for(self, region: Region) -> str:
        if not isinstance(region, L2Ball):
            return self.solver or "HIGHS"
        soc = _soc_solvers()
        if self.solver is None and "CLARABEL" in soc:
            return "CLARABEL"
        if self.solver not in soc:
            raise ValueError(f"an L2 ball makes the LP a second-order-cone program (SOCP), which solver "
                             f"{self.solver} cannot solve; use one of {soc}")
        return self.solver

    def _bound(self, network: Network, region: Region, C: torch.Tensor) -> Bounds:
        solver = self._solver_for(region)
        lp_all = isinstance(self.intermediate, str) and self.intermediate == "lp"
        base = self.intermediate if isinstance(self.intermediate, Bounder) else \
            Bounder.create("dual" if lp_all else self.intermediate)
        ref = require_sound(base.bound(network, region, C), "the LP")   # l, u and the fallback bounds
        ops = network.matrices()
        B = region.batch_size
        rows, (lo, hi), centre = C.detach().double().cpu().numpy(), map(_numpy, region.box()), _numpy(region.x)
        layers = [tuple(map(_numpy, lu)) for lu in ref.intermediate]
        solve = functools.partial(_minimise, solver=solver, options=self.solver_options)
        lower, upper, status, used = [], [], [], []
        for b in range(B):
            x = cp.Variable(network.input_size)
            if isinstance(region, L2Ball):
                x_cons = [cp.norm(x - centre[b], 2) <= float(region.eps[b])]
            else:
                x_cons = [x >= lo[b], x <= hi[b]]
            x_terms = [(slice(None), x)]
            bounds = [(l[b], u[b]) for l, u in layers]
            statuses = self._tighten(ops, bounds, x_terms, x_cons, solve) if lp_all else []
            zs, cons = _relaxation(ops, bounds, x_terms, x_cons, network.n_relu_layers)
            c = cp.Parameter(network.output_size)
            problem = cp.Problem(cp.Minimize(c @ _affine(ops[-1], zs)), cons)
            (lv, s1), (uv, s2) = solve(problem, c, rows[b]), solve(problem, c, -rows[b])
            lower.append(lv)
            upper.append(-uv)
            used.append(bounds)
            status.append(_worst(statuses + s1 + s2))
        tensor = functools.partial(torch.as_tensor, dtype=C.dtype, device=C.device)
        lower, upper = tensor(np.array(lower)), tensor(np.array(upper))
        lower = torch.where(torch.isnan(lower), ref.lower.to(lower), lower)   # fallback: sound, looser
        upper = torch.where(torch.isnan(upper), ref.upper.to(upper), upper)
        intermediate = [tuple(tensor(np.array([ex[i][k] for ex in used])).reshape(B, *a.out_shape) for k in range(2))
                        for i, a in enumerate(network.affines[:-1])]
        return Bounds(lower, upper, intermediate, status, method="lp-all" if lp_all else "lp")

    @staticmethod
    def _tighten(ops, bounds, x_terms, x_cons, solve) -> list:
        """LP-ALL for one example: replace ``bounds[i]`` (i ≥ 1) of the units the given bounds leave
        unstable by their LP optima over the already tightened layers below; returns the statuses."""
        statuses = []
        for i in range(1, len(bounds)):
            l, u = bounds[i][0].copy(), bounds[i][1].copy()
            units = np.flatnonzero((l < 0) & (u > 0))
            if units.size:
                zs, cons = _relaxation(ops, bounds, x_terms, x_cons, i)
                c = cp.Parameter(units.size)
                problem = cp.Problem(cp.Minimize(c @ _affine(ops[i], zs, units)), cons)
                (lv, s1), (uv, s2) = solve(problem, c, np.eye(units.size)), solve(problem, c, -np.eye(units.size))
                l[units], u[units] = np.fmax(l[units], lv), np.fmin(u[units], -uv)  # NaN: keep the given bound
                statuses += s1 + s2
            bounds[i] = (l, u)
        return statuses

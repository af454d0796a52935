"""Solver adapters for the constraint system of :mod:`polytope_lab.relaxation` (eq. 15 / eq. 4).

One class per solver, behind :class:`SolverAdapter`: :class:`HighsAdapter` (highspy directly, LP and
MILP), :class:`CbcAdapter` (CBC through PuLP's ``PULP_CBC_CMD``), :class:`CvxpyAdapter` (any CVXPY
solver: LP, or SOCP with the L2 ball's cone). Each is built once per system and solves
``min costᵀv + const`` per objective, reporting an :class:`Outcome`: the solver's proven bound, its
incumbent's input, a status. A new solver (SCIP, Gurobi) is one more subclass, registered in
:data:`MILP_ADAPTERS` when it solves MILPs. Every adapter is silent: no solver writes to stdout.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from .relaxation import MIP_ABS_GAP, Relaxation

try:
    import highspy
except ImportError:  # pragma: no cover - highspy is a dependency
    highspy = None


@dataclass
class Outcome:
    """One solve of ``min costᵀv + const``. ``status``: "optimal", "stopped" (an early stop decided the
    sign: see ``stop_above``), "time_limit", "infeasible", "inaccurate" (a solution the solver does not
    vouch for) or "error: …". ``bound``: proven lower bound (−inf if none); ``value``: the objective at the
    incumbent (inf if none); ``x``: the incumbent's input (None if none); ``eps``: its ε (eq. 6)."""

    status: str
    bound: float = -math.inf
    value: float = math.inf
    x: np.ndarray | None = None
    eps: float | None = None


class SolverAdapter(ABC):
    """Hands a :class:`Relaxation` to one solver; :meth:`solve` is called once per objective.

    ``mip``: honour the integrality (False: solve the LP relaxation); ``threads``, ``rel_gap``,
    ``abs_gap``: the solver's thread count and MIP optimality gaps; ``options``: solver-specific extras.
    ``solve(cost, const, time_limit, stop_above, stop_below, start, warm)``: ``stop_above`` lets the solver
    stop once it proves the minimum is ≥ that value (then all that is proven is ``bound ≥ min(bound,
    stop_above)``), ``stop_below`` once it has an incumbent below it; ``start`` a full assignment (MIP
    start); ``warm`` keep the previous basis. A subclass sets ``name``, ``integer`` (solves MILPs) and
    ``conic`` (takes the L2 ``ball``).
    """

    name = ""
    integer = True
    conic = False

    def __init__(self, system: Relaxation, mip=True, threads=None, rel_gap=0.0, abs_gap=MIP_ABS_GAP, options=None):
        if system.ball is not None and not self.conic:
            raise ValueError(f"{self.name} cannot solve the second-order cone of an L2 ball")
        self.system, self.mip = system, bool(mip) and system.n_binaries > 0
        self.threads, self.rel_gap, self.abs_gap = threads, float(rel_gap), float(abs_gap)
        self.options = dict(options or {})

    @abstractmethod
    def solve(self, cost, const=0.0, time_limit=None, stop_above=None, stop_below=None, start=None,
              warm=False) -> Outcome:
        """``min costᵀv + const`` over the system."""

    def incumbent(self, out: Outcome, v: np.ndarray, const: float, cost) -> Outcome:
        """``out`` with the incumbent ``v`` (full assignment) read into ``x``, ``eps`` and ``value``."""
        out.x = np.asarray(v, dtype=np.float64)[self.system.x]
        out.value = float(np.dot(cost, v)) + const
        if self.system.eps is not None:
            out.eps = float(v[self.system.eps])
        return out

    @staticmethod
    def available() -> bool:
        return True


@contextlib.contextmanager
def _stdout_silenced():
    """File descriptor 1 to /dev/null (a C library's prints included)."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


_HIGHS_GREETED = []


def quiet_highs():
    """A new ``highspy.Highs`` with its output off. HiGHS prints its banner to stdout from C++ on the first
    construction in a process, before any option can be set: that one is made with stdout silenced
    (CVXPY's HiGHS interface then finds the banner already shown)."""
    if not _HIGHS_GREETED:
        with _stdout_silenced():
            h = highspy.Highs()
        _HIGHS_GREETED.append(True)
    else:
        h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("log_to_console", False)
    return h


class HighsAdapter(SolverAdapter):
    """HiGHS through highspy: the model is passed once, each solve only changes the costs."""

    name = "HIGHS"

    def __init__(self, system, mip=True, threads=None, rel_gap=0.0, abs_gap=MIP_ABS_GAP, options=None):
        super().__init__(system, mip, threads, rel_gap, abs_gap, options)
        h = self.h = quiet_highs()
        for key, value in {"mip_rel_gap": self.rel_gap, "mip_abs_gap": self.abs_gap, **self.options}.items():
            h.setOptionValue(key, value)
        if threads is not None:
            h.setOptionValue("threads", int(threads))
        A, row_lo, row_hi = system.rows()
        A = A.tocsc()
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = system.n_vars, A.shape[0]
        lp.col_cost_ = np.zeros(system.n_vars)
        lp.col_lower_, lp.col_upper_ = system.lb, system.ub
        lp.row_lower_, lp.row_upper_ = row_lo, row_hi
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = A.indptr, A.indices, A.data
        if self.mip:
            lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                               for i in system.integrality]
        h.passModel(lp)
        self.n = system.n_vars

    def solve(self, cost, const=0.0, time_limit=None, stop_above=None, stop_below=None, start=None, warm=False):
        h, inf = self.h, highspy.kHighsInf
        h.changeColsCost(self.n, np.arange(self.n, dtype=np.int32), np.asarray(cost, dtype=np.float64))
        h.setOptionValue("time_limit", float(time_limit) if time_limit is not None else inf)
        h.setOptionValue("objective_bound", float(stop_above - const) if stop_above is not None else inf)
        h.setOptionValue("objective_target", float(stop_below - const) if stop_below is not None else -inf)
        if not warm:
            h.clearSolver()  # no stale incumbent or basis from the previous objective
        if start is not None:  # MIP start: a complete feasible assignment
            sol = highspy.HighsSolution()
            sol.col_value = np.nan_to_num(np.asarray(start, dtype=np.float64)).tolist()
            sol.value_valid = True
            h.setSolution(sol)
        if h.run() == highspy.HighsStatus.kError and h.getModelStatus() == highspy.HighsModelStatus.kNotset:
            # the "threads" option differs from the running scheduler's: restart it once
            highspy.Highs.resetGlobalScheduler(True)
            h.run()
        return self._outcome(cost, const, stop_above)

    def _outcome(self, cost, const, stop_above) -> Outcome:
        S, h = highspy.HighsModelStatus, self.h
        ms, info = h.getModelStatus(), h.getInfo()
        out = Outcome(error_detail(f"HiGHS model status {h.modelStatusToString(ms)}"))
        has = info.primal_solution_status == 2  # kSolutionStatusFeasible
        if has:
            self.incumbent(out, np.asarray(h.getSolution().col_value), const, cost)
            out.value = info.objective_function_value + const
        dual = info.mip_dual_bound + const if self.mip else -math.inf
        if ms == S.kOptimal and has:
            out.status = "optimal"
            bound = dual if self.mip else out.value
            out.bound = out.value if not math.isfinite(bound) else min(bound, out.value)
        elif ms in (S.kObjectiveBound, S.kObjectiveTarget):
            out.status, out.bound = "stopped", dual
        elif ms in (S.kTimeLimit, S.kIterationLimit, S.kInterrupt, S.kSolutionLimit):
            out.status, out.bound = "time_limit", dual
        elif ms == S.kInfeasible and stop_above is not None:  # everything pruned by the cutoff
            out.status, out.bound = "stopped", stop_above
        elif ms == S.kInfeasible:
            out.status = "infeasible"
        if not math.isfinite(out.bound):
            out.bound = -math.inf
        if stop_above is not None and out.status in ("optimal", "stopped"):
            # with a cutoff HiGHS prunes against it and its reported dual bound can exceed the true
            # minimum: all that is proven is "no solution below stop_above" (or the bound, if lower)
            out.status, out.bound = "stopped", min(out.bound, stop_above)
        return out

    @staticmethod
    def available() -> bool:
        return highspy is not None


def error_detail(detail: str) -> str:
    """An outcome's failure status (the bounders map it to ``bounds.error_status``)."""
    return "error: " + detail


class CbcAdapter(SolverAdapter):
    """CBC through PuLP (``PULP_CBC_CMD``, ``msg=False``): PuLP writes and solves the problem per objective.
    CBC through PuLP reports no bound when it stops early: the caller falls back to its own bound."""

    name = "CBC"

    def __init__(self, system, mip=True, threads=None, rel_gap=0.0, abs_gap=MIP_ABS_GAP, options=None):
        import pulp
        super().__init__(system, mip, threads, rel_gap, abs_gap, options)
        self.pulp = pulp
        prob = self.prob = pulp.LpProblem("relaxation", pulp.LpMinimize)
        finite = lambda t: float(t) if math.isfinite(t) else None  # noqa: E731
        cat = [pulp.LpInteger if i and self.mip else pulp.LpContinuous for i in system.integrality]
        self.vars = [prob.add_variable(f"v{k}", finite(lo), finite(hi), cat=c)
                     for k, (lo, hi, c) in enumerate(zip(system.lb, system.ub, cat))]
        for A, b, sense in ((system.A_eq, system.b_eq, pulp.LpConstraintEQ), (system.A_ub, system.b_ub, pulp.LpConstraintLE)):
            for r in range(A.shape[0]):
                lo, hi = A.indptr[r], A.indptr[r + 1]
                terms = [(self.vars[k], float(w)) for k, w in zip(A.indices[lo:hi].tolist(), A.data[lo:hi].tolist())]
                prob += pulp.LpConstraint(terms, sense, rhs=float(b[r]))

    def solve(self, cost, const=0.0, time_limit=None, stop_above=None, stop_below=None, start=None, warm=False):
        pulp, prob = self.pulp, self.prob
        if start is not None:
            for v, val in zip(self.vars, np.asarray(start).tolist()):
                v.setInitialValue(None if math.isnan(val) else val)
        keep = set(np.flatnonzero(cost).tolist()) | set(self.system.x.tolist())  # inputs: values reported
        prob.setObjective(pulp.LpAffineExpression([(self.vars[k], float(cost[k])) for k in sorted(keep)]))
        options = [] if stop_above is None else [f"cutoff {stop_above - const!r}"]  # prune nodes reaching it
        if stop_below is not None and stop_above is not None:  # any solution then lies below the cutoff
            options.append("maxSolutions 1")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            solver = pulp.PULP_CBC_CMD(msg=False, mip=self.mip, timeLimit=time_limit, threads=self.threads,
                                       gapRel=self.rel_gap, gapAbs=self.abs_gap, options=options,
                                       warmStart=start is not None)
            try:
                prob.solve(solver)
            except pulp.PulpSolverError as e:
                return Outcome(error_detail(f"CBC failed: {e}"))
        return self._outcome(cost, const, stop_above)

    def _outcome(self, cost, const, stop_above) -> Outcome:
        pulp, prob = self.pulp, self.prob
        sol, out = prob.sol_status, Outcome(error_detail(f"CBC status {pulp.LpStatus.get(prob.status)}"))
        if sol in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            v = np.array([np.nan if x.varValue is None else x.varValue for x in self.vars], dtype=np.float64)
            if not np.isnan(v[self.system.x]).any():
                self.incumbent(out, np.nan_to_num(v), const, cost)
        if sol == pulp.LpSolutionOptimal and out.x is not None:
            out.status, out.bound = "optimal", out.value
        elif sol == pulp.LpSolutionIntegerFeasible or (sol == pulp.LpSolutionNoSolutionFound
                                                       and prob.status == pulp.LpStatusNotSolved):
            out.status = "stopped" if stop_above is not None and out.x is not None else "time_limit"
        elif sol == pulp.LpSolutionInfeasible or prob.status == pulp.LpStatusInfeasible:
            if stop_above is not None:  # nothing below the cutoff: the minimum is at least stop_above
                out.status, out.bound = "stopped", stop_above
            else:
                out.status = "infeasible"
        return out

    @staticmethod
    def available() -> bool:
        try:
            import pulp
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return bool(pulp.PULP_CBC_CMD(msg=False).available())
        except Exception:  # pragma: no cover
            return False


#: MILP solvers by name (``MILPBounder(solver=...)``): a new solver is one more adapter class here
MILP_ADAPTERS = {"HIGHS": HighsAdapter, "CBC": CbcAdapter}


def available_solvers() -> list:
    """Names of the MILP solvers usable here."""
    return [name for name, cls in MILP_ADAPTERS.items() if cls.available()]


def milp_adapter(name: str) -> type:
    """The adapter class of MILP solver ``name``, or ValueError naming it and the installed ones."""
    key = str(name).upper()
    installed = available_solvers()
    if key not in installed:
        raise ValueError(f"unknown or unavailable MILP solver {name!r}; available: {installed}")
    return MILP_ADAPTERS[key]


def cvxpy_solvers(conic: bool = False) -> list:
    """Installed CVXPY solvers (``conic``: those that accept second-order-cone constraints, for L2 balls)."""
    import cvxpy as cp
    if not conic:
        return cp.installed_solvers()
    from cvxpy.constraints import SOC
    from cvxpy.reductions.solvers.defines import SOLVER_MAP_CONIC
    return [s for s in cp.installed_solvers()
            if s in SOLVER_MAP_CONIC and SOC in SOLVER_MAP_CONIC[s].SUPPORTED_CONSTRAINTS]


#: the name of each CVXPY solver's own time-limit option (seconds); others are only checked between solves
CVXPY_TIME_OPTION = {"HIGHS": "time_limit", "CLARABEL": "time_limit", "SCS": "time_limit_secs",
                     "OSQP": "time_limit"}
#: CVXPY statuses as outcome statuses ("inaccurate": a solution the solver does not vouch for)
CVXPY_STATUS = {"optimal": "optimal", "optimal_inaccurate": "inaccurate", "user_limit": "time_limit",
                "infeasible": "infeasible", "infeasible_inaccurate": "infeasible"}


class CvxpyAdapter(SolverAdapter):
    """Any CVXPY solver on the relaxation (LP; SOCP with the L2 ball's cone ``‖x' − x‖₂ ≤ ε``). One
    problem, the cost a ``cvxpy.Parameter`` (DPP: CVXPY canonicalises once); integrality is ignored.
    ``options``: keyword arguments of ``Problem.solve``. A solve whose warm start fails is retried cold."""

    name = "CVXPY"
    integer = False
    conic = True

    def __init__(self, system, solver="HIGHS", options=None):
        import cvxpy as cp
        super().__init__(system, mip=False, options=options)
        self.cp, self.solver = cp, str(solver).upper()
        v = cp.Variable(system.n_vars)
        cons = []
        if system.A_eq.shape[0]:
            cons.append(system.A_eq @ v == system.b_eq)
        if system.A_ub.shape[0]:
            cons.append(system.A_ub @ v <= system.b_ub)
        for side, values in ((1, system.lb), (-1, system.ub)):
            k = np.flatnonzero(np.isfinite(values))
            if len(k):
                cons.append(side * v[k] >= side * values[k])
        if system.ball is not None:
            centre, radius = system.ball
            cons.append(cp.norm(v[system.x] - np.asarray(centre).reshape(-1), 2) <= float(radius))
        self.v, self.c = v, cp.Parameter(system.n_vars)
        self.problem = cp.Problem(cp.Minimize(self.c @ v), cons)
        if self.solver == "HIGHS":
            quiet_highs()  # the banner, once per process, with stdout silenced

    def solve(self, cost, const=0.0, time_limit=None, stop_above=None, stop_below=None, start=None, warm=False):
        self.c.value = np.asarray(cost, dtype=np.float64)
        options = dict(self.options)
        key = CVXPY_TIME_OPTION.get(self.solver)
        if time_limit is not None and key is not None:
            options[key] = min(float(time_limit), float(options.get(key, math.inf)))
        status = self._run(options)
        if status not in ("optimal", "user_limit"):  # a warm start from the previous basis can fail numerically
            status = self._run({**options, "warm_start": False})
        out = Outcome(CVXPY_STATUS.get(status, error_detail(f"{self.solver} status {status}")))
        if out.status == "optimal" and self.v.value is not None:
            self.incumbent(out, self.v.value, const, cost)
            out.value = float(self.problem.value) + const
            out.bound = out.value
        elif out.status == "optimal":
            out.status = error_detail(f"{self.solver} reported optimal without a solution")
        return out

    def _run(self, options) -> str:
        """``problem.solve``'s status; CVXPY's "may be inaccurate" warning is silenced (the status reports
        it) and a SolverError becomes "solver_error"."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self.problem.solve(solver=self.solver, **options)
            return self.problem.status
        except self.cp.SolverError:
            return "solver_error"


def time_limit_seconds(time_limit):
    """``time_limit`` as float seconds (None: no limit); a clear error unless it is None or a number > 0."""
    if time_limit is None:
        return None
    try:
        seconds = float(time_limit)
    except (TypeError, ValueError):
        seconds = float("nan")
    if isinstance(time_limit, bool) or not seconds > 0:
        raise ValueError(f"time_limit must be None or > 0 seconds, got {time_limit!r}")
    return seconds


class Budget:
    """Seconds left of a per-example time limit (None: no limit), shared by that example's solves."""

    def __init__(self, seconds=None):
        import time
        self._clock = time.perf_counter
        self.deadline = None if seconds is None else self._clock() + float(seconds)

    def remaining(self):
        """Seconds left (≥ 0), or None without a limit."""
        return None if self.deadline is None else max(0.0, self.deadline - self._clock())

    @property
    def expired(self) -> bool:
        return self.deadline is not None and self._clock() >= self.deadline

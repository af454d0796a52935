"""Exact bounds by MILP over the adversarial polytope (Wong & Kolter 2018, eq. 4).

The system is :func:`polytope_lab.relaxation.build` with ``exact=True``: for one example with input box
``[lo, hi]`` (an L∞ ball, ∩ the clip box) and pre-activation bounds ``l ≤ ẑ ≤ u`` from another Bounder (the
big-M constants, widened by ``relaxation.WIDEN`` so that rounding never cuts off a point),

    z_1 = x' ∈ [lo, hi],     ẑ_{i+1} = W_i z_i + b_i + Σ_j (S_ij z_j + b_ij),     f(x') = ẑ_k,
    I⁻ (u ≤ 0): z = 0;   I⁺ (l ≥ 0): z = ẑ;   I (l < 0 < u): one binary a:  z ≥ ẑ, z ≥ 0, z ≤ u·a, z ≤ ẑ − l(1 − a).

It is exact for any valid l, u; tighter ones (``intermediate="progressive"``: interval ∩ dual, then an LP
per unstable neuron on the LP relaxation of this system, like MIPVerify) make it faster. Each row ``c`` of
``C`` is minimised (lower bound) and ``−c`` minimised (upper bound) per example, by one solver adapter
(:mod:`polytope_lab.solvers`: HiGHS keeps its model and only changes costs; CBC re-solves).

Before the MILPs a primal heuristic (:func:`polytope_lab.attacks.pgd_minimize` on the rows) gives
verified points; each row's best is the solver's MIP start. Robustness queries (:meth:`MILPBounder.certify`)
only need the sign of each margin ``f_y − f_j``: the solve stops as soon as it is decided (HiGHS
``objective_bound``/``objective_target``, CBC ``cutoff``, ``maxSolutions``): seconds per image on the
paper's MNIST ConvNet, where the exact minimum of a margin can take minutes.

Soundness of what is reported:
- ``lower`` is the solver's proven bound (HiGHS ``mip_dual_bound``; CBC's optimum when it proves
  optimality), never above an attained value; when the solver stops early (time limit) it is the larger
  of that bound and the intermediate bounder's own sound bound (CBC reports no bound: the latter alone).
  With a cutoff (``objective_bound``) HiGHS's dual bound can exceed the true minimum: all that is then
  proven is "no solution below the cutoff" (the adapter reports ``min(bound, cutoff)``).
- every incumbent is a witness: its input is checked against the box (``WITNESS_TOL``), projected onto it
  and run through the network in float64; the attained value ``c f(x')`` is reported (``min_value``), never
  the solver's objective. A witness outside the box makes the row's status ``"error: witness outside the
  region"`` and its bound falls back to the intermediate bounder's.
- "optimal" only when the solver proves it; otherwise "time_limit", "infeasible" (numerical trouble: the
  region is never empty) or "error: …", and the bounds are the sound fallbacks.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from .attacks import pgd_minimize
from .bounds import (Bounder, Bounds, Certification, certified_labels, certify_margin, check_objective,
                     error_status, margin_matrix, require_sound)
from .network import Network
from .regions import Box, LinfBall
from .relaxation import MIP_ABS_GAP, SLACK_FACTOR, SOLVER_TOLERANCE, WITNESS_TOL, build, widen
from .solvers import MILP_ADAPTERS, Budget, HighsAdapter, available_solvers, milp_adapter, time_limit_seconds

SOLVERS = ("HIGHS", "CBC")
#: a sign is decided only by a proven bound above ``DECIDE · max(1, scale)`` (:func:`decide_margin`): 10× the
#: solvers' integrality tolerance 1e-6 (a binary 1e-6 off 0/1 moves the objective by ~1e-6 × its magnitude)
DECIDE = SLACK_FACTOR * SOLVER_TOLERANCE["mip_feasibility"]
WITNESS_ERROR = error_status("witness outside the region")
#: an example's status is the first of these among its rows' (errors before all of them)
STATUS_ORDER = ("infeasible", "time_limit", "optimal")
VERDICT_ORDER = ("time_limit", "unknown")     # a certify row's unresolved verdict, most serious first

__all__ = ["MILPBounder", "MILPBounds", "PointSearch", "available_solvers", "SOLVERS", "WITNESS_TOL"]


def decide_margin(lower: float, upper: float) -> float:
    """The margin a proven bound of ``min rowᵀ f`` must exceed to decide its sign: ``DECIDE · max(1, scale)``,
    scale = max(|lower|, |upper|) of the row over the region (the intermediate bounder's sound bounds)."""
    scale = max(abs(lower), abs(upper))
    return certify_margin(scale if math.isfinite(scale) else 0.0, DECIDE)


def worst(statuses, order=STATUS_ORDER) -> str:
    """One example's status from its rows': any error, else the first of ``order`` present."""
    for s in statuses:
        if s.startswith("error"):
            return s
    return next((s for s in order if s in statuses), order[-1])


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

    def to(self, device) -> "MILPBounds":
        super().to(device)
        for name in ("min_value", "max_value", "argmin", "argmax"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self


@dataclass
class ExactProblem:
    """One call's float64 CPU copies and big-M bounds ``layers`` ((l, u) per ReLU layer, (B, *shape)), with
    the fallbacks ``lower``/``upper`` (sound bounds of C); ``progressive``: tighten the layers by LPs first."""

    net64: Network
    reg64: Box
    C64: torch.Tensor
    layers: list
    lower: torch.Tensor
    upper: torch.Tensor
    progressive: bool = False
    threads: int | None = None

    @cached_property
    def ops(self) -> list:
        """The normal form's matrices, built on first use (an example the dual decides needs none)."""
        return self.net64.matrices()

    def box(self, b: int):
        """(lo, hi) of example b, flat float64 numpy."""
        return tuple(t[b].reshape(-1).numpy() for t in self.reg64.box())

    def flat_layers(self, b: int, budget=None) -> list:
        """Widened flat (l, u) per ReLU layer of example b (LP-tightened first when progressive)."""
        layers = [(l[b].reshape(-1).numpy().copy(), u[b].reshape(-1).numpy().copy()) for l, u in self.layers]
        if self.progressive:
            self.tighten(b, layers, budget or Budget())
        return [widen(l, u) for l, u in layers]

    def system(self, b: int, budget=None, **options):
        """Example b's exact system (eq. 4); ``options`` as for :func:`relaxation.build`."""
        lo, hi = self.box(b)
        return build(self.ops, lo, hi, self.flat_layers(b, budget), exact=True, **options)

    def tighten(self, b: int, layers: list, budget: Budget):
        """Per-neuron LP tightening (the LP relaxation of this system, HiGHS) of the unstable units,
        layer by layer (the first layer's box bounds are already exact); ``layers`` and the reported
        ``self.layers`` of example b are updated."""
        lo, hi = self.box(b)
        for i in range(1, len(layers)):
            l, u = layers[i]
            unstable = np.flatnonzero((l < 0) & (u > 0))
            if not len(unstable) or budget.expired:
                continue
            system = build(self.ops, lo, hi, [widen(*lu) for lu in layers[:i]], exact=True)
            lp = HighsAdapter(system, mip=False, threads=self.threads)
            F, f0 = system.affine(i, unstable)
            for k, j in enumerate(unstable):
                row = F.getrow(k).toarray().reshape(-1)
                for sign in (1.0, -1.0):
                    out = lp.solve(sign * row, sign * f0[k], time_limit=budget.remaining(), warm=True)
                    if out.status == "optimal" and sign > 0:
                        l[j] = max(l[j], out.bound)
                    elif out.status == "optimal":
                        u[j] = min(u[j], -out.bound)
                if l[j] > u[j]:  # rounding: keep a valid interval
                    l[j] = u[j] = 0.5 * (l[j] + u[j])
            for t, v in zip(self.layers[i], (l, u)):
                t[b] = torch.from_numpy(v).reshape(t[b].shape)


@dataclass
class PointSearch:
    """:meth:`MILPBounder.find_point`'s answer for the conjunction ``A f(x') ≤ b`` over a box.

    ``status``: "refuted" (proven: no point of the box satisfies every row; ``bound`` > 0 is a proven lower
    bound of ``min max_k (A_k f − b_k)``), "found" (``point``, flat float64, lies in the box and satisfies
    every row on the float64 network: ``value = max_k (A_k f(point) − b_k) ≤ 0``), "time_limit",
    "unknown" (the minimum is 0 within the solver's tolerance) or "error: …". Otherwise than "found",
    ``point``/``value`` are the solver's last incumbent in the box (``value`` > 0: it fails), or None."""

    status: str
    bound: float = -math.inf
    point: np.ndarray | None = None
    value: float = math.nan


def witness(x: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """(input projected onto the box, whether it was inside up to ``WITNESS_TOL``)."""
    inside = bool(np.all(x >= lo - WITNESS_TOL) and np.all(x <= hi + WITNESS_TOL))
    return np.clip(x, lo, hi), inside


class MILPBounder(Bounder):
    """Exact bounds of ``C f(x')`` over a Box or an L∞ ball (∩ clip box) by MILP (paper eq. 4).

    Options: ``solver`` "HIGHS" (default) or "CBC" (:func:`available_solvers`); ``time_limit`` seconds
    per example (None: none), all its solves together, for ``bound`` and ``certify`` alike (each solve
    gets what is left); ``threads`` for the solver (None: its default); ``intermediate``: the big-M
    bounds, a Bounder instance or registered name (default "dual"), or "progressive" (interval ∩ dual,
    then one LP per unstable neuron on the relaxation of this system, layer by layer; solved with HiGHS
    whatever ``solver`` is); ``rel_gap``/``abs_gap``: the solver's optimality gaps (default 0 and
    ``MIP_ABS_GAP`` = 1e-9: exact); ``heuristic_steps``: PGD steps of the primal heuristic (0: none);
    ``device``: where the intermediate bounder runs (the MILP itself runs on the CPU).
    L2 balls are not linear sets: the base class rejects them.
    """

    name = "milp"
    #: region types this backend accepts
    supported_regions = (LinfBall, Box)   # a LinfBall is a Box; named for the error message

    def __init__(self, solver="HIGHS", time_limit=None, threads=None, intermediate="dual", rel_gap=0.0,
                 abs_gap=MIP_ABS_GAP, heuristic_steps=20, device=None):
        super().__init__(device=device)
        self.solver = milp_adapter(solver).name
        time_limit = time_limit_seconds(time_limit)
        if threads is not None and int(threads) < 0:
            raise ValueError(f"threads must be None or >= 0, got {threads!r}")
        if isinstance(intermediate, str):
            if intermediate != "progressive" and intermediate not in Bounder.registry:
                raise ValueError(f"intermediate must be a Bounder, 'progressive' or one of "
                                 f"{Bounder.available()}, got {intermediate!r}")
        elif not isinstance(intermediate, Bounder):
            raise ValueError(f"intermediate must be a Bounder instance or name, got {type(intermediate).__name__}")
        if int(heuristic_steps) < 0:
            raise ValueError(f"heuristic_steps must be >= 0, got {heuristic_steps!r}")
        self.time_limit = time_limit
        self.threads = None if threads is None else int(threads)
        self.intermediate = intermediate
        self.rel_gap, self.abs_gap = float(rel_gap), float(abs_gap)
        self.heuristic_steps = int(heuristic_steps)

    # ---------------------------------------------------------------- shared by bound, certify, verify

    def adapter(self, system):
        """The configured solver on ``system``."""
        return MILP_ADAPTERS[self.solver](system, threads=self.threads, rel_gap=self.rel_gap, abs_gap=self.abs_gap)

    def exact_problem(self, network: Network, region: Box, C: torch.Tensor) -> ExactProblem:
        """float64 CPU copies, the normal form's matrices, the big-M bounds and the fallback bounds of C."""
        progressive = isinstance(self.intermediate, str) and self.intermediate == "progressive"
        with torch.no_grad():
            if progressive:
                ib = Bounder.create("interval").bound(network, region, C)
                db = Bounder.create("dual").bound(network, region, C)
                layers = [(torch.maximum(l1, l2), torch.minimum(u1, u2))
                          for (l1, u1), (l2, u2) in zip(ib.intermediate, db.intermediate)]
                lower, upper = torch.maximum(ib.lower, db.lower), torch.minimum(ib.upper, db.upper)
            else:
                bounder = Bounder.create(self.intermediate) if isinstance(self.intermediate, str) else self.intermediate
                b = require_sound(bounder.bound(network, region, C), "the MILP")
                layers, lower, upper = b.intermediate, b.lower, b.upper
            cpu = dict(device="cpu", dtype=torch.float64)
            net64 = network.to(**cpu)  # a detached copy: nothing below can reach the model's parameters
        return ExactProblem(net64, region.to(**cpu), C.detach().to(**cpu),
                            [(l.detach().to(**cpu), u.detach().to(**cpu)) for l, u in layers],
                            lower.detach().to(**cpu), upper.detach().to(**cpu), progressive, self.threads)

    def heuristic(self, prob: ExactProblem, b: int, rows: torch.Tensor):
        """Primal heuristic: PGD (:func:`attacks.pgd_minimize`) on each row over example b's region:
        (points (K, n0), values (K,)) float64 numpy, every value attained by the float64 network."""
        values, points = pgd_minimize(prob.net64, prob.reg64.select([b]), rows.unsqueeze(0),
                                      steps=self.heuristic_steps, restarts=2, seed=0)
        return points[0].reshape(len(rows), -1).numpy(), values[0].numpy()

    def value_at(self, prob: ExactProblem, rows: torch.Tensor, point: np.ndarray) -> torch.Tensor:
        """``rows f(point)`` by the float64 network."""
        with torch.no_grad():
            return rows @ prob.net64(torch.from_numpy(point).reshape(1, *prob.net64.input_shape))[0]

    # ---------------------------------------------------------------- bound

    def _bound(self, network, region, C):
        prob = self.exact_problem(network, region, C)
        B, m = C.shape[:2]
        shape = network.input_shape
        res = dict(lower=prob.lower.clone(), upper=prob.upper.clone(),
                   min_value=torch.full((B, m), math.nan, dtype=torch.float64),
                   argmin=torch.full((B, m, *shape), math.nan, dtype=torch.float64))
        res["max_value"], res["argmax"] = res["min_value"].clone(), res["argmin"].clone()
        statuses, lower_status, upper_status, seconds = [], [], [], []
        for b in range(B):
            start, budget = time.perf_counter(), Budget(self.time_limit)
            row_status = self._bound_example(prob, b, budget, res)
            statuses.append(worst(row_status[0] + row_status[1]))
            lower_status.append(row_status[0])
            upper_status.append(row_status[1])
            seconds.append(time.perf_counter() - start)
        dt, dev = region.x.dtype, region.x.device
        out = {k: v.to(device=dev, dtype=dt) for k, v in res.items()}
        layers = [(l.to(device=dev, dtype=dt), u.to(device=dev, dtype=dt)) for l, u in prob.layers]
        return MILPBounds(out["lower"], out["upper"], layers, statuses, method="milp",
                          min_value=out["min_value"], max_value=out["max_value"], argmin=out["argmin"],
                          argmax=out["argmax"], lower_status=lower_status, upper_status=upper_status,
                          example_seconds=seconds)

    def _bound_example(self, prob: ExactProblem, b: int, budget: Budget, res: dict):
        """Minimise every row and its negation for example b, writing into ``res``; the row statuses."""
        m, shape = prob.C64.shape[1], prob.net64.input_shape
        lo, hi = prob.box(b)
        rows = torch.cat([prob.C64[b], -prob.C64[b]])  # minimise c f (lower), then −c f (−upper)
        guesses, guess_values = self.heuristic(prob, b, rows) if self.heuristic_steps else (None, None)
        system = prob.system(b, budget)
        model = self.adapter(system)
        row_status = ([], [])
        for k in range(2 * m):
            side, r = divmod(k, m)
            fallback = (prob.lower[b, r] if side == 0 else -prob.upper[b, r]).item()
            start = system.assignment(guesses[k]) if guesses is not None else None
            status, bound, attained, point = self._solve_row(prob, system, model, rows[k], fallback, lo, hi,
                                                             budget, start)
            if guesses is not None and guess_values[k] < attained:  # the heuristic's point is attained too
                attained, point = float(guess_values[k]), guesses[k]
                bound = min(bound, attained)
            row_status[side].append(status)
            res["lower" if side == 0 else "upper"][b, r] = bound if side == 0 else -bound
            if point is not None:
                res["min_value" if side == 0 else "max_value"][b, r] = attained if side == 0 else -attained
                res["argmin" if side == 0 else "argmax"][b, r] = torch.from_numpy(np.array(point)).reshape(shape)
        return row_status

    def _solve_row(self, prob, system, model, row, fallback, lo, hi, budget, start):
        """One row's (status, sound lower bound, attained value, witness point) of ``min rowᵀ f``."""
        if budget.expired:
            return "time_limit", fallback, math.inf, None
        cost, const = system.cost(row.numpy())
        out = model.solve(cost, const, time_limit=budget.remaining(), start=start)
        status, attained, point = out.status, math.inf, None
        if out.x is not None:
            p, inside = witness(out.x, lo, hi)
            if inside:
                attained, point = float(self.value_at(prob, row, p)), p
            else:
                status = WITNESS_ERROR
        if status == "optimal":
            return status, min(out.bound, attained), attained, point
        if status in ("time_limit", "stopped"):
            return "time_limit", min(max(out.bound, fallback), attained), attained, point
        # infeasible, solver error, witness error: the intermediate bounder's sound bound
        return status, min(fallback, attained), attained, point

    # ---------------------------------------------------------------- a conjunction, jointly

    def find_point(self, model, region: Box, A, b, time_limit=None) -> PointSearch:
        """Is there ``x'`` in ``region`` (one example) with ``A f(x') ≤ b`` in every row jointly? The MILP minimises ``t ≥ A_k f − b_k``
        (:meth:`Relaxation.add_row_maximum`), stopping once the sign of its minimum is decided, then to optimality; refuted only with a proven
        bound > :func:`decide_margin`. An incumbent, projected onto the caller's region (float64), counts only once the float64 network
        confirms it. ``time_limit``: seconds (None: the bounder's own); A (k ≥ 1, n_out), b (k,)."""
        asked = [t.reshape(-1).numpy() for t in self.exact_region(region).box()]
        network, region = self.prepare(model, region)
        if region.batch_size != 1:
            raise ValueError(f"find_point takes a region of one example, got {region.batch_size}")
        A = check_objective(A, network, region)
        b64 = torch.as_tensor(np.asarray(b, dtype=np.float64)).reshape(-1)
        if A.shape[1] == 0 or len(b64) != A.shape[1] or not torch.isfinite(b64).all():
            raise ValueError(f"b must hold one finite value per row of A ({A.shape[1]} >= 1), got {tuple(b64.shape)}")
        budget = Budget(self.time_limit if time_limit is None else time_limit)
        prob = self.exact_problem(network, region, A)
        rows, lower, upper = prob.C64[0], prob.lower[0] - b64, prob.upper[0] - b64
        margin = decide_margin(float(lower.max()), float(upper.max()))
        if float(lower.max()) > margin:   # one row fails everywhere (the intermediate bounder's sound bound)
            return PointSearch("refuted", float(lower.max()))
        system = prob.system(0, budget)
        t_lo, t_hi = widen(np.array([float(lower.max())]), np.array([float(upper.max())]))
        t = system.add_row_maximum(rows.numpy(), b64.numpy(), t_lo[0], t_hi[0])
        cost = np.eye(1, system.n_vars, t).reshape(-1)                                # minimise t
        solver, (lo, hi) = self.adapter(system), asked
        last = dict(point=None, value=math.nan)   # the latest incumbent that failed the network's check
        for early in (True, False):
            if budget.expired:
                return PointSearch("time_limit", **last)
            stops = dict(stop_above=2 * margin, stop_below=-margin) if early else {}
            out = solver.solve(cost, 0.0, time_limit=budget.remaining(), **stops)
            if out.x is not None:
                point, inside = witness(out.x, lo, hi)
                if not inside:
                    return PointSearch(WITNESS_ERROR)
                value = float((self.value_at(prob, rows, point) - b64).max())
                if value <= 0:
                    return PointSearch("found", out.bound, point, value)
                last = dict(point=point, value=value)
            if out.bound > margin and out.status in ("optimal", "stopped"):   # clear of the solver's tolerance
                return PointSearch("refuted", out.bound)
            if out.status == "time_limit":
                return PointSearch("time_limit", out.bound, **last)
            if out.status == "infeasible":   # t is free above its lower bound: never empty
                return PointSearch(error_status("the solver found the MILP infeasible (numerical trouble)"))
            if out.status.startswith("error"):
                return PointSearch(out.status)
        return PointSearch("unknown", out.bound, **last)

    # ---------------------------------------------------------------- robustness queries

    def certify(self, model, region: Box, y=None, trust_dual: bool = True) -> Certification:
        """Is every point of ``region`` classified as ``y`` (None: the prediction at the centre)? Decides
        the sign of every margin ``f_y − f_j``.

        Per example: the centre is checked first (a misclassified centre is its own counterexample);
        rows the intermediate bounder (run on the float64 network) already certifies, above
        :func:`decide_margin`, are skipped when ``trust_dual``; the primal heuristic looks for a
        counterexample; the rest are solved most-doubtful first, each stopping as soon as its sign is
        decided — HiGHS: ``objective_bound`` = +2δ (prune nodes whose bound reaches it) and
        ``objective_target`` = −δ (stop at such an incumbent); CBC: ``cutoff`` +2δ and ``maxSolutions 1``,
        δ = :func:`decide_margin` of the row (``DECIDE · max(1, scale)``, 1e-5 relative: clear of the
        solvers' tolerances). A found incumbent counts only once the network, run on its input, confirms
        some ``f_j ≥ f_y``; then the example stops. A sign still undecided after the early stop is solved
        to optimality; a minimum margin within δ of 0 is "unknown".
        ``time_limit``: seconds per example, all rows together.
        """
        asked, dt, dev = self.exact_region(region), region.x.dtype, region.x.device
        network, region = self.prepare(model, region)
        y = certified_labels(network, region, y)
        B, shape = region.batch_size, network.input_shape
        if B == 0:
            return Certification([], torch.zeros(0, dtype=dt), torch.zeros(0, *shape, dtype=dt), torch.zeros(0, dtype=dt),
                                 y, [], method="milp")
        C = check_objective(margin_matrix(y, network.output_size), network, region)
        if self.device is not None:
            network, region, C = network.to(self.device), region.to(self.device), C.to(self.device)
        f64 = dict(dtype=torch.float64)   # the trusted dual rows are float64 bounds (numerical honesty)
        prob = self.exact_problem(network.to(**f64), region.to(**f64), C.to(**f64))
        res = dict(margin=torch.full((B,), -math.inf, dtype=torch.float64),
                   counterexample=torch.full((B, *shape), math.nan, dtype=torch.float64),
                   counterexample_margin=torch.full((B,), math.nan, dtype=torch.float64))
        statuses, seconds = [], []
        for b in range(B):
            start = time.perf_counter()
            statuses.append(self._certify_example(prob, b, trust_dual, Budget(self.time_limit), res, (asked.select([b]), dt)))
            seconds.append(time.perf_counter() - start)
        res = {k: v.to(device=dev, dtype=dt) for k, v in res.items()}
        return Certification(statuses, res["margin"], res["counterexample"], res["counterexample_margin"], y,
                             seconds, method="milp")

    def _certify_example(self, prob: ExactProblem, b: int, trust_dual: bool, budget: Budget, res: dict, asked):
        """Example b's verdict; writes its margin bound and any counterexample (first moved into ``asked``,
        (the caller's float64 region, dtype), by :meth:`~polytope_lab.regions.Box.representable_point`)."""
        rows, shape = prob.C64[b], prob.net64.input_shape
        row_lower = prob.lower[b].clone()
        res["margin"][b] = float(row_lower.min())
        box, dtype = asked

        def refuted(point):
            point = box.representable_point(torch.as_tensor(np.asarray(point)).reshape(1, *shape), dtype).reshape(-1).numpy()
            margin = float(self.value_at(prob, rows, point).min())
            if margin > 0:
                return False
            res["counterexample"][b] = torch.from_numpy(np.asarray(point)).reshape(shape)
            res["counterexample_margin"][b] = margin
            return True

        if refuted(prob.reg64.x[b].reshape(-1).numpy()):
            return "counterexample"
        trusted = [float(row_lower[r]) > decide_margin(float(row_lower[r]), float(prob.upper[b, r]))
                   for r in range(len(rows))]
        todo = [r for r in torch.argsort(row_lower).tolist() if not (trust_dual and trusted[r])]
        guesses = {}
        if todo and self.heuristic_steps:  # a quick counterexample search first
            points, values = self.heuristic(prob, b, rows[todo])
            guesses = dict(zip(todo, points))
            if values.min() <= 0 and refuted(points[int(np.argmin(values))]):
                return "counterexample"
        pending, system, model = [], None, None
        for r in todo:
            if system is None:
                system = prob.system(b, budget)
                model = self.adapter(system)
            verdict, bound = self._decide_row(prob, b, system, model, r, guesses.get(r), budget, refuted)
            if verdict == "counterexample":
                return verdict
            if verdict == "certified":
                row_lower[r] = max(float(row_lower[r]), bound)
                res["margin"][b] = float(row_lower.min())
            else:
                pending.append(verdict)
        res["margin"][b] = float(row_lower.min())
        return "certified" if not pending else worst(pending, VERDICT_ORDER)

    def _decide_row(self, prob, b, system, model, r, guess, budget, refuted):
        """The sign of margin row r: ("certified", proven bound > :func:`decide_margin`, clear of the solver's
        tolerances), ("counterexample", _) (recorded by ``refuted``), or an undecided verdict ("time_limit",
        "unknown", "error: …")."""
        lo, hi = prob.box(b)
        cost, const = system.cost(prob.C64[b, r].numpy())
        start = system.assignment(guess) if guess is not None else None
        margin = decide_margin(float(prob.lower[b, r]), float(prob.upper[b, r]))
        for early in (True, False):
            if budget.expired:
                return "time_limit", None
            stops = dict(stop_above=2 * margin, stop_below=-margin) if early else {}
            out = model.solve(cost, const, time_limit=budget.remaining(), start=start, **stops)
            if out.x is not None:
                point, inside = witness(out.x, lo, hi)
                if not inside:
                    return WITNESS_ERROR, None
                if refuted(point):
                    return "counterexample", None
            if out.bound > margin and out.status in ("optimal", "stopped"):
                return "certified", out.bound
            if out.status == "time_limit":
                return "time_limit", None
            if out.status == "infeasible":
                return error_status("the solver found the MILP infeasible (numerical trouble)"), None
            if out.status.startswith("error"):
                return out.status, None
        return "unknown", None  # solved to optimality: the minimum margin is within the margin of 0

"""The verification pipeline for a VNN-LIB property: dual → attack → optimised dual → exact, cheapest first.

:func:`verify_property` decides a :class:`~polytope_lab.vnnlib.Property` (cases of an input box and
disjuncts ``A f(x) ≤ b``, the **unsafe** condition) on a network within a time limit:

1. ``"dual"``: interval ∩ dual bounds of every row over the box: a disjunct is refuted when one row's
   ``lower(A_k f) − b_k > REFUTE_TOL`` (:func:`polytope_lab.properties.refuted`). It runs before the attack
   because it is cheaper (mnistfc 256x2: 0.03 s for a case's 9 rows, PGD a few seconds) and leaves the
   attack only the disjuncts it cannot refute;
2. ``"attack"``: the box centre, then signed-gradient PGD from random starts minimising
   ``max_k (A_k f(x) − b_k)`` per open disjunct (at most ``ATTACK_SHARE`` of the time left); a point
   where it is ≤ 0 is a candidate counterexample;
3. ``"dual-optimized"``: the dual with optimised α, for the disjuncts still open;
4. ``"exact"``: the exact backend from the registry ("bab" where it offers ``find_point``, else the
   MILP, :meth:`MILPBounder.find_point`) decides each open disjunct's rows *jointly*, with the time left
   shared among them; a backend with ``find_points`` (bab) takes a case's open disjuncts in one search,
   so the root bounds and the attack are computed once per case, not once per disjunct.

Soundness: ``"unsat"`` only when every disjunct of every case is refuted by a sound bound (float64) or
the exact backend; ``"sat"`` only with a counterexample that lies in its case's box (within
``BOX_TOL``, then clamped into it) and satisfies a disjunct on the float64 network, exactly (no
tolerance). Anything else is ``"timeout"`` (the time limit struck), ``"error"`` (a solver failed) or
``"unknown"``. Bad input (sizes, stage names) raises ValueError; solver failures never escape.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .bounds import Bounder, Bounds
from .convert import as_network
from .network import Network
from .properties import case_objective, refuted, satisfied
from .solvers import Budget
from .vnnlib import Case

#: the stages, cheapest first ("exact": the backend of EXACT_BACKENDS that is registered)
STAGES = ("dual", "attack", "dual-optimized", "exact")
#: exact backends in order of preference; one must be registered and offer ``find_point``
EXACT_BACKENDS = ("bab", "milp")
#: PropertyResult.verdict values (VNN-COMP's result words)
VERDICTS = ("unsat", "sat", "timeout", "unknown", "error")
#: a counterexample may leave its box by this much before it is rejected (then it is clamped into it)
BOX_TOL = 1e-6
#: the attack may spend at most this share of the time left when it starts (the bounds and the exact
#: backend get the rest)
ATTACK_SHARE = 0.25
#: at most this many seconds of local attack around an exact backend's incumbent that failed the check
POLISH_SECONDS = 2.0
#: a bound refutes a row only with ``lower − b > REFUTE_TOL``: float64 rounding in the bound itself (about
#: 1e-12 on mnistfc-sized nets) never decides
REFUTE_TOL = 1e-9
#: seconds the first optimised-α bound of a process spends importing torch._dynamo (torch.optim's first use;
#: measured 2-3 s here): budgeted so that the stage is skipped rather than run past the time limit
ALPHA_FIRST_USE_SECONDS = 3.0

__all__ = ["verify_property", "PropertyResult", "CaseResult", "Counterexample", "check_counterexample",
           "exact_backend", "STAGES", "VERDICTS", "BOX_TOL", "REFUTE_TOL"]


@dataclass
class Counterexample:
    """A checked unsafe point: ``x`` (flat float64, the property's C order, inside case ``case``'s box),
    ``y = f(x)`` (float64 network) satisfying disjunct ``disjunct``."""

    x: np.ndarray
    y: np.ndarray
    case: int
    disjunct: int


@dataclass
class CaseResult:
    """Per disjunct of one case: ``status`` ("refuted", "sat", "open", "time_limit", "unknown", "error: …"),
    ``stage`` that decided it (None while open) and ``margin``, the best proven lower bound of
    ``max_k (A_k f − b_k)`` over the box (> 0 where refuted; −inf where none)."""

    status: list
    stage: list
    margin: list

    @property
    def verdict(self) -> str:
        """"sat", "unsat" (every disjunct refuted) or "open"."""
        if "sat" in self.status:
            return "sat"
        return "unsat" if all(s == "refuted" for s in self.status) else "open"


@dataclass
class PropertyResult:
    """:func:`verify_property`'s answer: ``verdict`` (one of ``VERDICTS``), the checked ``counterexample``
    (sat only), the ``stage`` that decided (sat: the one that found the point; unsat: the dearest one
    needed; else None), wall ``seconds``, per-case ``cases`` (:class:`CaseResult`), ``stage_seconds`` and
    a ``message`` (errors, what was left open)."""

    verdict: str
    counterexample: Counterexample | None
    stage: str | None
    seconds: float
    cases: list
    stage_seconds: dict = field(default_factory=dict)
    message: str = ""


def exact_backend(name=None) -> str:
    """The exact backend to use: ``name`` if given (it must be registered and offer ``find_point``), else
    the first of ``EXACT_BACKENDS`` that does."""
    names = EXACT_BACKENDS if name is None else (name,)
    for n in names:
        if n in Bounder.registry and hasattr(Bounder.registry[n], "find_point"):
            return n
    raise ValueError(f"no exact backend among {list(names)} is registered with find_point; "
                     f"registered: {Bounder.available()}")


def check_counterexample(network: Network, case: Case, x, tol: float = BOX_TOL):
    """``(x clamped into the box, y = f(x), index of a satisfied disjunct)`` if ``x`` lies in ``case``'s
    box within ``tol`` and its float64 output satisfies a disjunct exactly; else None. ``network``: a
    float64 :class:`Network` taking the case's inputs (any shape with their count)."""
    x = torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64))
    x = x.reshape(-1)
    lo, hi = torch.from_numpy(case.lo), torch.from_numpy(case.hi)
    if x.shape != lo.shape or not torch.isfinite(x).all() or (x < lo - tol).any() or (x > hi + tol).any():
        return None
    x = torch.minimum(torch.maximum(x, lo), hi)
    with torch.no_grad():
        y = network(x.reshape(1, *network.input_shape)).reshape(1, -1)
    if not torch.isfinite(y).all():
        return None
    hits = torch.nonzero(satisfied(case, y)[0]).reshape(-1)
    return (x.numpy().copy(), y[0].numpy().copy(), int(hits[0])) if len(hits) else None


class _Run:
    """One property's state: the float64 network, the cases and their boxes, the budget, each disjunct's
    status, and the counterexample once found."""

    def __init__(self, net64, cases, budget, options):
        self.net, self.cases, self.budget, self.opt = net64, cases, budget, options
        self.regions = [c.region(net64.input_shape, torch.float64) for c in cases]
        self.results = [CaseResult(["open"] * len(c.disjuncts), [None] * len(c.disjuncts),
                                   [-math.inf] * len(c.disjuncts)) for c in cases]
        self.counterexample, self.found_by, self.errors = None, None, []
        self.dual_seconds = 0.0

    def open(self, ci: int) -> list:
        """Indices of case ci's disjuncts neither refuted nor found."""
        return [d for d, s in enumerate(self.results[ci].status) if s not in ("refuted", "sat")]

    def refute(self, ci: int, d: int, stage: str, margin: float):
        r = self.results[ci]
        r.status[d], r.stage[d], r.margin[d] = "refuted", stage, max(r.margin[d], float(margin))

    def note(self, ci: int, d: int, status: str, margin=-math.inf):
        r = self.results[ci]
        r.status[d], r.margin[d] = status, max(r.margin[d], float(margin))

    def check(self, ci: int, x, stage: str) -> bool:
        """Record ``x`` as the counterexample if it checks out (:func:`check_counterexample`)."""
        ok = check_counterexample(self.net, self.cases[ci], x)
        if ok is None:
            return False
        self.counterexample = Counterexample(ok[0], ok[1], ci, ok[2])
        self.found_by = stage
        r = self.results[ci]
        r.status[ok[2]], r.stage[ok[2]] = "sat", stage
        return True

    @property
    def decided(self) -> bool:
        return self.counterexample is not None or all(not self.open(ci) for ci in range(len(self.cases)))


# ---------------------------------------------------------------------------------------- stages


def _attack(run: _Run):
    """The centre of each box, then PGD on every open disjunct with rows."""
    stop = Budget(run.budget.remaining() * ATTACK_SHARE)
    for ci, case in enumerate(run.cases):
        if not run.open(ci):
            continue
        if stop.expired or run.check(ci, run.regions[ci].center, "attack"):
            return
        ds = [d for d in run.open(ci) if len(case.disjuncts[d].b)]
        if ds and _pgd(run, ci, ds, stop):
            return


def _pgd(run: _Run, ci: int, ds: list, stop: Budget, start=None, scale: float = 1.0, stage: str = "attack") -> bool:
    """Sign-gradient descent on ``max_k (A_k f − b_k)`` of disjuncts ``ds`` from ``restarts`` starts each
    (the first at the centre; with ``start``, a flat point: at it and within ``scale``·radius of it),
    steps (``scale``·4·radius/steps) shrinking linearly, until ``stop``; True once a point checks out
    (recorded as found by ``stage``)."""
    case, region, (steps, R) = run.cases[ci], run.regions[ci], run.opt["attack"]
    K, n_out = max(len(case.disjuncts[d].b) for d in ds), run.net.output_size
    C = torch.zeros(len(ds), K, n_out, dtype=torch.float64)
    off = torch.full((len(ds), K), math.inf, dtype=torch.float64)   # padding rows: −inf, never the max
    for i, d in enumerate(ds):
        A, b = case.disjuncts[d]
        C[i, :len(b)], off[i, :len(b)] = torch.from_numpy(A), torch.from_numpy(b)
    C, off = C.repeat_interleave(R, 0), off.repeat_interleave(R, 0)
    lo, hi = region.box()
    gen = torch.Generator().manual_seed(int(run.opt["seed"]) + ci)
    x = lo + torch.rand((len(C), *lo.shape[1:]), generator=gen, dtype=torch.float64) * (hi - lo)
    x[::R] = region.center[0]
    radius = region.radius * scale
    if start is not None:   # a local search around start
        s0 = torch.as_tensor(np.asarray(start, dtype=np.float64)).reshape(lo.shape[1:])
        x = torch.minimum(torch.maximum(s0 + (2 * (x - lo) / (hi - lo).clamp(min=1e-300) - 1) * radius, lo), hi)
        x[::R] = s0
    for step in range(steps + 1):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            g = (torch.einsum("pkn,pn->pk", C, run.net(x).reshape(len(x), -1)) - off).amax(1)
            grad, = torch.autograd.grad(g.sum(), x)
        for p in torch.argsort(g.detach())[:8].tolist():   # the most promising points only
            if g[p] <= 0 and run.check(ci, x[p], stage):
                return True
        if step == steps or stop.expired:
            return False
        eta = radius * (4.0 / steps) * (1.0 - step / (steps + 1))
        x = torch.minimum(torch.maximum(x.detach() - eta * grad.sign(), lo), hi)
    return False


def _dual(run: _Run, optimized: bool):
    """Interval ∩ dual bounds (``optimized``: the dual with optimised α) of every open disjunct's rows."""
    stage = "dual-optimized" if optimized else "dual"
    for ci, case in enumerate(run.cases):
        ds = [d for d in run.open(ci) if len(case.disjuncts[d].b)]
        if not ds:
            continue
        if run.budget.expired or (optimized and run.budget.remaining() < _alpha_overhead(run)):
            return
        sub = Case(case.lo, case.hi, [case.disjuncts[d] for d in ds])
        C, offset, groups = case_objective(sub)
        try:
            start = time.perf_counter()
            if optimized:   # the ascents get what is left once the rest of the stage is paid for
                ascent = max(run.budget.remaining() - _alpha_overhead(run), 1e-3)
                bounders = [Bounder.create("dual", alpha="optimized", steps=run.opt["alpha_steps"], time_limit=ascent)]
            else:
                bounders = [Bounder.create("interval"), Bounder.create("dual")]
            bounds = [bd.bound(run.net, run.regions[ci], C) for bd in bounders]
            if not optimized:
                run.dual_seconds = max(run.dual_seconds, time.perf_counter() - start)
        except Exception as e:  # a failed bound loses the stage for this case, not the property
            run.errors.append(f"{stage} on case {ci}: {type(e).__name__}: {e}")
            continue
        lower = torch.stack([b.lower for b in bounds]).amax(0)
        done = refuted(sub, Bounds(lower, lower.clone(), method=stage), tol=REFUTE_TOL)
        margin = lower[0] - offset
        for i, (d, g) in enumerate(zip(ds, groups)):
            m = margin[g]
            best = float(m[torch.isfinite(m)].max()) if torch.isfinite(m).any() else -math.inf
            if done[i]:
                run.refute(ci, d, stage, best)
            else:
                run.note(ci, d, "open", best)


def _alpha_overhead(run: _Run) -> float:
    """Seconds of an optimised-α bound outside its ascents' time limit: the best-slope bounds and the
    ascents' starts (about two fixed-α passes per ReLU layer) and the first use's import. The ascents
    themselves get the time that is left (the dual's ``time_limit``), so the stage ends by the deadline."""
    first = 0.0 if "torch._dynamo" in sys.modules else ALPHA_FIRST_USE_SECONDS
    return 2 * run.net.n_relu_layers * run.dual_seconds + first


def _exact(run: _Run):
    """The exact backend's ``find_point`` on each open disjunct, the time left shared among those still
    pending; a disjunct that ran out of its share is retried with what is left after the others."""
    name = run.opt["exact"]
    cls = Bounder.registry[name]
    options = {"threads": run.opt["threads"]} if run.opt["threads"] is not None and "threads" in cls.options() else {}
    backend = Bounder.create(name, **options)
    if hasattr(backend, "find_points"):
        return _exact_joint(run, backend, name)
    pending = [(ci, d) for ci in range(len(run.cases)) for d in run.open(ci)]
    for _ in range(4):   # rounds: each gives the pending disjuncts a larger share
        if not pending or run.budget.expired:
            return
        again = []
        for i, (ci, d) in enumerate(pending):
            if run.budget.expired:
                run.note(ci, d, "time_limit")
                continue
            status = _exact_one(run, backend, name, ci, d, run.budget.remaining() / (len(pending) - i))
            if status == "sat":
                return
            if status == "time_limit":
                again.append((ci, d))
        pending = again


def _exact_joint(run: _Run, backend, name: str):
    """The exact backend's ``find_points`` on each case's open disjuncts together (one search per case:
    the root bounds and the attack shared by its disjuncts), the time left shared among the cases still
    pending; a case that ran out of its share is retried with what is left after the others."""
    pending = [ci for ci in range(len(run.cases)) if run.open(ci)]
    for _ in range(4):
        if not pending or run.budget.expired:
            return
        again = []
        for i, ci in enumerate(pending):
            if run.budget.expired:
                for d in run.open(ci):
                    run.note(ci, d, "time_limit")
                continue
            status = _exact_case(run, backend, name, ci, run.budget.remaining() / (len(pending) - i))
            if status == "sat":
                return
            if status == "time_limit":
                again.append(ci)
        pending = again


def _exact_case(run: _Run, backend, name: str, ci: int, seconds: float) -> str:
    """Case ci's open disjuncts through ``find_points`` in one call: "sat", "time_limit" (some disjunct ran
    out of time) or "done"."""
    case = run.cases[ci]
    for d in run.open(ci):
        if not len(case.disjuncts[d].b):   # no rows: every point of the box is unsafe
            if run.check(ci, run.regions[ci].center, name):
                return "sat"
            run.note(ci, d, "unknown")
    ds = [d for d in run.open(ci) if len(case.disjuncts[d].b)]
    if not ds:
        return "done"
    try:
        outs = backend.find_points(run.net, run.regions[ci], [case.disjuncts[d] for d in ds],
                                   time_limit=max(seconds, 1e-3))
    except Exception as e:  # a solver failure leaves these disjuncts open, with the message
        status = f"error: {type(e).__name__}: {e}"
        run.errors.append(f"{name} on case {ci}, disjuncts {ds}: {status}")
        for d in ds:
            run.note(ci, d, status)
        return status
    statuses = [_point_status(run, name, ci, d, out) for d, out in zip(ds, outs)]
    if "sat" in statuses:
        return "sat"
    return "time_limit" if "time_limit" in statuses else "done"


def _point_status(run: _Run, name: str, ci: int, d: int, out) -> str:
    """Record disjunct d's :class:`~polytope_lab.milp.PointSearch` ``out``; its new status."""
    if out.status == "refuted":
        run.refute(ci, d, name, out.bound)
        return "refuted"
    if out.status == "found" and run.check(ci, out.point, name):
        return "sat"
    if out.point is not None and _polish(run, ci, d, out.point, name):
        return "sat"
    if out.status == "found":
        run.note(ci, d, "error: the exact backend's point does not check out on the network")
        return "error"
    run.note(ci, d, out.status, out.bound if math.isfinite(out.bound) and out.bound <= 0 else -math.inf)
    return out.status


def _exact_one(run: _Run, backend, name: str, ci: int, d: int, seconds: float) -> str:
    """One disjunct through the exact backend; its new status."""
    A, b = run.cases[ci].disjuncts[d]
    if not len(b):   # no rows: every point of the box is unsafe
        return "sat" if run.check(ci, run.regions[ci].center, name) else "unknown"
    try:
        out = backend.find_point(run.net, run.regions[ci], A, b, time_limit=max(seconds, 1e-3))
    except Exception as e:  # a solver failure leaves this disjunct open, with the message
        out_status = f"error: {type(e).__name__}: {e}"
        run.errors.append(f"{name} on case {ci}, disjunct {d}: {out_status}")
        run.note(ci, d, out_status)
        return out_status
    return _point_status(run, name, ci, d, out)


def _polish(run: _Run, ci: int, d: int, point, stage: str) -> bool:
    """A local attack around the exact backend's incumbent that failed the network's check by a hair
    (solver tolerance): True once a nearby point checks out (recorded as found by ``stage``)."""
    stop = Budget(min(run.budget.remaining(), POLISH_SECONDS))
    for scale in (1e-3, 1e-6):
        if not stop.expired and _pgd(run, ci, [d], stop, start=point, scale=scale, stage=stage):
            return True
    return False


# ---------------------------------------------------------------------------------------- the entry point


def _prepare(model, prop, input_shape):
    """(float64 network, cases) after checking the property's sizes against the network."""
    cases = list(prop)
    if not cases or not all(isinstance(c, Case) for c in cases):
        raise ValueError(f"prop must be a non-empty Property (a list of Case), got {prop!r}")
    if input_shape is None:
        input_shape = model.input_shape if isinstance(model, Network) else (cases[0].lo.size,)
    net = as_network(model, tuple(input_shape))
    for i, case in enumerate(cases):
        if case.lo.size != net.input_size:
            raise ValueError(f"case {i} has {case.lo.size} inputs; the network takes {net.input_size}")
        for d in case.disjuncts:
            if d.A.ndim != 2 or d.A.shape[1] != net.output_size or d.b.shape != (d.A.shape[0],):
                raise ValueError(f"case {i} has a disjunct with A {d.A.shape}, b {d.b.shape}; the network has "
                                 f"{net.output_size} outputs")
    return net.to(device="cpu", dtype=torch.float64), cases


def _verdict(run: _Run) -> tuple:
    """(verdict, stage, message) from the run's state."""
    order = {s: i for i, s in enumerate(STAGES[:-1] + (run.opt["exact"],))}
    if run.counterexample is not None:
        return "sat", run.found_by, "; ".join(run.errors)
    left = [(ci, d, run.results[ci].status[d]) for ci in range(len(run.cases)) for d in run.open(ci)]
    if not left:
        stages = [s for r in run.results for s in r.stage]
        return "unsat", max(stages, key=order.get) if stages else None, "; ".join(run.errors)
    statuses = {s for _, _, s in left}
    message = "; ".join(run.errors + [f"{len(left)} disjunct(s) left open: " + ", ".join(sorted(statuses))])
    if any(s.startswith("error") for s in statuses):
        return "error", None, message
    if run.budget.expired or "time_limit" in statuses:
        return "timeout", None, message
    return ("error" if run.errors else "unknown"), None, message


def verify_property(model, prop, time_limit: float, input_shape=None, seed: int = 0, stages=STAGES, exact=None,
                    attack_steps: int = 50, attack_restarts: int = 5, alpha_steps: int = 20,
                    threads=None) -> PropertyResult:
    """Decide ``prop`` (a :class:`~polytope_lab.vnnlib.Property`) on ``model`` (an nn.Sequential or a
    Network) within ``time_limit`` seconds, all stages together (see the module docstring).

    ``input_shape``: the network's input shape (default: a Network's own, else ``(n_inputs,)``); the
    property's inputs are its C-order flattening. ``stages``: a subset of ``STAGES``, always run cheapest
    first (e.g. without "attack" to test the bounds alone); ``exact``: the exact backend's name (default: the
    first of ``EXACT_BACKENDS`` registered); ``attack_steps``/``attack_restarts`` for PGD (restarts per
    disjunct), ``alpha_steps`` for optimised α, ``threads`` for the solver. ``seed`` fixes the attack.
    """
    start = time.perf_counter()
    if not (isinstance(time_limit, (int, float)) and math.isfinite(time_limit) and time_limit > 0):
        raise ValueError(f"time_limit must be a finite number of seconds > 0, got {time_limit!r}")
    unknown = [s for s in stages if s not in STAGES]
    if unknown or int(attack_steps) < 1 or int(attack_restarts) < 1 or int(alpha_steps) < 1:
        raise ValueError(f"stages must be among {STAGES} (got unknown {unknown}); attack_steps, attack_restarts "
                         f"and alpha_steps must be >= 1")
    net64, cases = _prepare(model, prop, input_shape)
    name = exact_backend(exact) if "exact" in stages else (exact or "exact")
    run = _Run(net64, cases, Budget(time_limit), dict(seed=seed, attack=(int(attack_steps), int(attack_restarts)),
                                                      alpha_steps=int(alpha_steps), exact=name, threads=threads))
    actions = {"attack": _attack, "dual": lambda r: _dual(r, False), "dual-optimized": lambda r: _dual(r, True),
               "exact": _exact}
    seconds = {}
    for stage in [s for s in STAGES if s in stages]:
        if run.decided or run.budget.expired:
            break
        t0 = time.perf_counter()
        try:
            actions[stage](run)
        except Exception as e:  # a failed stage is reported; the later stages still run
            run.errors.append(f"{stage}: {type(e).__name__}: {e}")
        seconds[name if stage == "exact" else stage] = time.perf_counter() - t0
    verdict, stage, message = _verdict(run)
    return PropertyResult(verdict, run.counterexample, stage, time.perf_counter() - start, run.results,
                          seconds, message)

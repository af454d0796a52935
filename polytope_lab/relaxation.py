"""The constraint system of the LP relaxation (eq. 15) and of the exact MILP (eq. 4), built once, sparse.

One example's system, from the normal form (:meth:`Network.matrices`: per affine ``(b, [(j, W_j)])``, main
and skip terms, convolutions as sparse matrices) and pre-activation bounds ``l ≤ ẑ ≤ u`` of the ReLU
layers (from another bounder), over variables ``v``:

    z_0 = x' ∈ [lo, hi] (+ an L2 cone ``‖x' − x‖₂ ≤ ε`` that the adapter adds, ``Relaxation.ball``),
    ẑ_{i+1} = Σ_j W_ij z_j + b_i                       (rows of ``A_eq``),
    I⁻ (u ≤ 0, l < 0): z = 0, no variable;   I⁺ (l ≥ 0): z = ẑ, one variable,
    I (l < 0 < u), relaxation (eq. 15): z ≥ 0, z ≥ ẑ, z ≤ u(ẑ − l)/(u − l);
    I, exact (eq. 4): a binary a, ẑ ∈ [l, u], z ∈ [0, u], z ≥ ẑ, z ≤ u·a, z ≤ ẑ − l(1 − a).

``A_eq v = b_eq``, ``A_ub v ≤ b_ub``, ``lb ≤ v ≤ ub``, ``integrality`` (True: integer). Variable index
maps per layer say which variable holds which unit (``layer_vars[j]``: z_j, −1 where z = 0;
``zhat_vars[i]``, ``binary_vars[i]``). Objectives are affine in ``v``: :meth:`Relaxation.cost` gives
``cᵀẑ_{i+1}`` as (cost vector, constant). Optional blocks: the ε variable of eq. 6 (``center``/``eps_max``),
a disjunction ``∃ r: C_r f ≤ 0`` (:meth:`Relaxation.add_disjunction`), the maximum of rows
``t ≥ C_k f − d_k`` (:meth:`Relaxation.add_row_maximum`, a conjunction's joint test), and split rows ``s·ẑ_ij ≥ 0``
(:meth:`Relaxation.add_split`, for branch and bound).

The solvers that take this system are adapters in :mod:`polytope_lab.solvers` (HiGHS, CBC, CVXPY).

Tolerances: :data:`SOLVER_TOLERANCE` lists the feasibility/optimality tolerances the solvers run with
(HiGHS 1.16's documented defaults, ``highspy.Highs().getOptionValue``; CBC's; Clarabel's), and
:func:`solver_slack` derives from them how far two independent solves of one problem may disagree.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

#: Feasibility and optimality tolerances of the solvers as this module runs them. HiGHS 1.16 defaults
#: (``Highs().getOptionValue``): primal/dual feasibility 1e-7, MIP integrality ("mip_feasibility") 1e-6; the
#: MILP sets the gaps itself (relative 0, absolute ``MIP_ABS_GAP``). CBC (PuLP's bundled cbc 2.10):
#: primal tolerance 1e-7, integer tolerance 1e-6. Clarabel 0.11 (the L2 default): feasibility and gap 1e-8.
SOLVER_TOLERANCE = {
    "primal_feasibility": 1e-7,
    "dual_feasibility": 1e-7,
    "mip_feasibility": 1e-6,
    "mip_abs_gap": 1e-9,
    "conic_feasibility": 1e-8,
}
#: the MILP's absolute optimality gap (HiGHS ``mip_abs_gap``, CBC ``gapAbs``): "optimal" means within this
MIP_ABS_GAP = SOLVER_TOLERANCE["mip_abs_gap"]
#: a witness may leave the input box by this much (HiGHS's integrality tolerance) before it is rejected
WITNESS_TOL = SOLVER_TOLERANCE["mip_feasibility"]
#: big-M bounds are widened by this (relative + absolute) so that rounding never cuts off a point
WIDEN = 1e-7
#: how many tolerances two solves may differ by: a point violating rows by δ (or a binary off by δ) moves
#: the objective by about δ times the weights along it, which on these nets stays within 10·max(1, |value|)
SLACK_FACTOR = 10.0


def solver_slack(value, exact: bool = True, factor: float = SLACK_FACTOR) -> float:
    """How far two independent solves of the same problem may disagree at optimum ``value``:
    ``factor · tol · max(1, |value|)`` with tol the MIP integrality tolerance (``exact``, 1e-6: a binary
    may sit 1e-6 from 0/1, letting ``z ≤ u·a`` pass ``u·1e-6``) or the LP's primal feasibility tolerance
    (1e-7). Default: 1e-5 (MILP) and 1e-6 (LP), relative to max(1, |value|). ``value``: a number, or an
    array/tensor (its largest magnitude is used)."""
    tol = SOLVER_TOLERANCE["mip_feasibility" if exact else "primal_feasibility"]
    magnitude = np.abs(np.asarray(value, dtype=np.float64))
    return factor * tol * max(1.0, float(magnitude.max()) if magnitude.size else 1.0)


def widen(l: np.ndarray, u: np.ndarray):
    """Slightly looser (still valid) bounds, so that float rounding never makes the MILP infeasible."""
    return l - WIDEN * (1 + np.abs(l)), u + WIDEN * (1 + np.abs(u))


# --------------------------------------------------------------------------------------------------
# the system
# --------------------------------------------------------------------------------------------------


@dataclass
class Relaxation:
    """``A_eq v = b_eq, A_ub v ≤ b_ub, lb ≤ v ≤ ub`` (+ integrality, + ``ball``) for one example; see
    the module docstring. Build it with :func:`build`."""

    ops: list
    depth: int
    exact: bool
    lb: np.ndarray
    ub: np.ndarray
    integrality: np.ndarray
    A_eq: sp.csr_matrix
    b_eq: np.ndarray
    A_ub: sp.csr_matrix
    b_ub: np.ndarray
    layer_vars: list = field(default_factory=list)
    zhat_vars: list = field(default_factory=list)
    binary_vars: list = field(default_factory=list)
    eps: int | None = None
    ball: tuple | None = None       # (centre, radius): ‖x' − centre‖₂ ≤ radius, added by a conic adapter
    splits: list = field(default_factory=list)   # (layer, unit, sign) of the split rows added

    @property
    def n_vars(self) -> int:
        return len(self.lb)

    @property
    def x(self) -> np.ndarray:
        """Variable index of each input coordinate."""
        return self.layer_vars[0]

    @property
    def n_binaries(self) -> int:
        return int(self.integrality.sum())

    def affine(self, i: int, rows=None):
        """``ẑ_{i+1}[rows] = F v + f0`` for affine ``i`` (i ≤ depth): (F csr (len(rows), n_vars), f0)."""
        return affine_rows(self.ops[i], self.layer_vars, self.n_vars, rows)

    def cost(self, c: np.ndarray, i: int | None = None, rows=None):
        """``cᵀẑ_{i+1}[rows]`` (default: the affine after the last encoded layer, every row) as (cost
        vector over ``v``, constant)."""
        F, f0 = self.affine(self.depth if i is None else i, rows)
        c = np.asarray(c, dtype=np.float64)
        return np.asarray(F.T @ c).reshape(-1), float(c @ f0)

    def assignment(self, point: np.ndarray) -> np.ndarray:
        """Every variable's value at input ``point``: a feasible MIP start (NaN for added variables)."""
        v = np.full(self.n_vars, np.nan)
        point = np.asarray(point, dtype=np.float64).reshape(-1)
        v[self.x] = point
        zs = [point]
        for i in range(self.depth):
            b, parts = self.ops[i]
            zhat = b + sum(W @ zs[src] for src, W in parts)
            hv, zv, av = self.zhat_vars[i], self.layer_vars[i + 1], self.binary_vars[i]
            z = np.where(zv < 0, 0.0, np.where(hv == zv, zhat, np.maximum(zhat, 0.0)))   # I⁺: z = ẑ
            v[hv[hv >= 0]] = zhat[hv >= 0]
            v[zv[zv >= 0]] = z[zv >= 0]
            v[av[av >= 0]] = (zhat[av >= 0] > 0).astype(np.float64)
            zs.append(z)
        if self.eps is not None:
            v[self.eps] = 0.0
        return v

    # ---------------------------------------------------------------- added blocks

    def add_variables(self, lb, ub, integer=False) -> np.ndarray:
        """New variables (indices); existing rows get zero columns."""
        lb, ub = np.atleast_1d(np.asarray(lb, dtype=np.float64)), np.atleast_1d(np.asarray(ub, dtype=np.float64))
        first = self.n_vars
        self.lb, self.ub = np.concatenate([self.lb, lb]), np.concatenate([self.ub, ub])
        self.integrality = np.concatenate([self.integrality, np.full(len(lb), bool(integer))])
        self.A_eq = _resize(self.A_eq, self.n_vars)
        self.A_ub = _resize(self.A_ub, self.n_vars)
        return np.arange(first, self.n_vars)

    def add_rows(self, A, b, equality=False):
        """Rows ``A v ≤ b`` (or ``= b``); ``A`` may have fewer columns than there are variables."""
        A = _resize(sp.csr_matrix(A), self.n_vars)
        if equality:
            self.A_eq, self.b_eq = sp.vstack([self.A_eq, A]).tocsr(), np.concatenate([self.b_eq, b])
        else:
            self.A_ub, self.b_ub = sp.vstack([self.A_ub, A]).tocsr(), np.concatenate([self.b_ub, b])

    def add_disjunction(self, C: np.ndarray, big_m) -> np.ndarray:
        """Some row r has ``C_r f ≤ 0``: binaries ``s_r``, ``C_r f ≤ M_r (1 − s_r)``, ``Σ s = 1`` (eq. 6)."""
        s = self.add_variables(np.zeros(len(C)), np.ones(len(C)), integer=True)
        F, f0 = self.affine(self.depth)
        A = sp.csr_matrix(np.asarray(C, dtype=np.float64)) @ F
        A = A + sp.csr_matrix((np.asarray(big_m, dtype=np.float64), (np.arange(len(C)), s)), shape=A.shape)
        self.add_rows(A, np.asarray(big_m, dtype=np.float64) - np.asarray(C) @ f0)
        self.add_rows(sp.csr_matrix((np.ones(len(s)), (np.zeros(len(s), dtype=int), s)), shape=(1, self.n_vars)),
                      np.ones(1), equality=True)
        return s

    def add_row_maximum(self, C: np.ndarray, offset: np.ndarray, lb: float, ub: float) -> int:
        """A variable ``t ∈ [lb, ub]`` with ``t ≥ C_k f − offset_k`` for every row k (so ``min t`` is
        ``min max_k (C_k f − offset_k)``: > 0 iff the rows ``C f ≤ offset`` hold nowhere jointly); its index.
        ``lb``/``ub`` must be valid bounds of that maximum (e.g. from a sound bounder, widened)."""
        C = np.asarray(C, dtype=np.float64).reshape(-1, np.size(self.ops[self.depth][0]))
        t = int(self.add_variables([lb], [ub])[0])
        F, f0 = self.affine(self.depth)
        A = sp.csr_matrix(C) @ F - sp.csr_matrix((np.ones(len(C)), (np.arange(len(C)), np.full(len(C), t))),
                                                 shape=(len(C), self.n_vars))
        self.add_rows(A, np.asarray(offset, dtype=np.float64).reshape(-1) - C @ f0)
        return t

    def add_split(self, layer: int, unit: int, sign: int):
        """The branch-and-bound row ``sign · ẑ_{layer, unit} ≥ 0`` (sign +1: active, −1: inactive), any unit."""
        if sign not in (1, -1):
            raise ValueError(f"sign must be +1 or -1, got {sign!r}")
        F, f0 = self.affine(layer, [unit])
        self.add_rows(-sign * F, np.array([sign * f0[0]]))
        self.splits.append((layer, unit, sign))

    def rows(self):
        """(A csr, row_lower, row_upper): the equality and inequality rows as one ranged block."""
        A = sp.vstack([self.A_eq, self.A_ub]).tocsr()
        return A, np.concatenate([self.b_eq, np.full(len(self.b_ub), -np.inf)]), np.concatenate([self.b_eq, self.b_ub])


def affine_rows(op, layer_vars, n_vars: int, rows=None):
    """``ẑ[rows] = F v + f0`` of the affine ``op = (b, [(j, W_j)])`` over the variables ``layer_vars[j]``."""
    b, parts = op
    rows = np.arange(len(b)) if rows is None else np.asarray(rows, dtype=np.int64)
    data, r_, c_ = [], [], []
    for src, W in parts:
        idx = layer_vars[src]
        live = np.flatnonzero(idx >= 0)
        Wl = sp.csr_matrix(W)[rows][:, live].tocoo()
        data.append(Wl.data)
        r_.append(Wl.row)
        c_.append(idx[live][Wl.col])
    F = sp.csr_matrix((np.concatenate(data), (np.concatenate(r_), np.concatenate(c_))), shape=(len(rows), n_vars)) \
        if data else sp.csr_matrix((len(rows), n_vars))
    return F, np.asarray(b, dtype=np.float64).reshape(-1)[rows]


def _resize(A: sp.csr_matrix, n_cols: int) -> sp.csr_matrix:
    A = sp.csr_matrix(A)
    if A.shape[1] == n_cols:
        return A
    return sp.csr_matrix((A.data, A.indices, A.indptr), shape=(A.shape[0], n_cols))


class _Builder:
    """Accumulates variables and coo rows while :func:`build` walks the layers."""

    def __init__(self):
        self.lb, self.ub, self.integer = [], [], []
        self.eq, self.ub_rows = ([], [], [], []), ([], [], [], [])   # (rows, cols, vals, rhs) per block
        self.n = 0

    def variables(self, lb, ub, integer=False, n=None) -> np.ndarray:
        """``n`` new variables (default: as many as ``ub`` has entries) with bounds ``lb``, ``ub``."""
        n = np.size(ub) if n is None else n
        lb = np.broadcast_to(np.asarray(lb, dtype=np.float64), (n,))
        ub = np.broadcast_to(np.asarray(ub, dtype=np.float64), (n,))
        idx = np.arange(self.n, self.n + lb.size)
        self.n += lb.size
        self.lb.append(lb.reshape(-1))
        self.ub.append(ub.reshape(-1))
        self.integer.append(np.full(lb.size, integer))
        return idx

    def rows(self, terms, rhs, equality=False):
        """Rows ``Σ_k coef_k · v[var_k] (≤ or =) rhs``, one per entry of rhs; terms [(vars, coefs)], vectors."""
        block = self.eq if equality else self.ub_rows
        start = sum(len(r) for r in block[3])
        rhs = np.asarray(rhs, dtype=np.float64).reshape(-1)
        r = np.arange(start, start + len(rhs))
        for vars_, coefs in terms:
            block[0].append(r)
            block[1].append(np.asarray(vars_))
            block[2].append(np.broadcast_to(np.asarray(coefs, dtype=np.float64), r.shape))
        block[3].append(rhs)

    def matrix_rows(self, A: sp.coo_matrix, rhs, equality=False):
        """Rows ``A v (≤ or =) rhs`` from a sparse matrix over the variables so far."""
        block = self.eq if equality else self.ub_rows
        start = sum(len(r) for r in block[3])
        block[0].append(A.row + start)
        block[1].append(A.col)
        block[2].append(A.data)
        block[3].append(np.asarray(rhs, dtype=np.float64).reshape(-1))

    def block(self, which):
        rows, cols, vals, rhs = which
        b = np.concatenate(rhs) if rhs else np.zeros(0)
        if not rows:
            return sp.csr_matrix((len(b), self.n)), b
        A = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(len(b), self.n))
        return A, b


def build(ops, lo, hi, bounds, exact: bool, center=None, eps_max=None, ball=None) -> Relaxation:
    """The system of one example: input box ``[lo, hi]`` (flat), ``len(bounds)`` ReLU layers with flat
    (l, u) each, then the affine ``ops[len(bounds)]`` as the objective's layer.

    ``exact``: the MILP (eq. 4, binaries; pass bounds widened by :func:`widen`) or the relaxation (eq. 15).
    ``center``/``eps_max``: eq. 6's ε variable, ``|x' − center| ≤ ε ≤ eps_max`` inside the box.
    ``ball`` = (centre, radius): an L2 ball, recorded for a conic adapter (the box is its bounding box).
    """
    B = _Builder()
    lo, hi = np.asarray(lo, dtype=np.float64).reshape(-1), np.asarray(hi, dtype=np.float64).reshape(-1)
    x = B.variables(lo, hi)
    system = Relaxation(ops, len(bounds), exact, None, None, None, None, None, None, None, layer_vars=[x])
    eps = None
    if center is not None:
        eps = int(B.variables(0.0, float(eps_max), n=1)[0])
        free = np.flatnonzero(hi > lo)   # fixed coordinates need no constraint
        c = np.asarray(center, dtype=np.float64).reshape(-1)[free]
        B.rows([(x[free], 1.0), (np.full(len(free), eps), -1.0)], c)      # x' − ε ≤ c
        B.rows([(x[free], -1.0), (np.full(len(free), eps), -1.0)], -c)    # −x' − ε ≤ −c
    for i, (l, u) in enumerate(bounds):
        _layer(B, system, i, np.asarray(l, dtype=np.float64), np.asarray(u, dtype=np.float64), exact)
    system.A_eq, system.b_eq = B.block(B.eq)
    system.A_ub, system.b_ub = B.block(B.ub_rows)
    system.lb, system.ub = np.concatenate(B.lb), np.concatenate(B.ub)
    system.integrality = np.concatenate(B.integer).astype(bool)
    system.eps, system.ball = eps, ball
    return system


def _layer(B: _Builder, system: Relaxation, i: int, l, u, exact: bool):
    """Variables and rows of ReLU layer i (eq. 15 or eq. 4), appended to the builder and the index maps."""
    n = len(l)
    active, unstable = np.flatnonzero(l >= 0), np.flatnonzero((l < 0) & (u > 0))
    nA, nI, inf = len(active), len(unstable), np.inf
    z_idx, h_idx, a_idx = np.full(n, -1), np.full(n, -1), np.full(n, -1)
    z_idx[active] = B.variables(l[active], u[active]) if exact else B.variables(-inf, inf, n=nA)
    h_idx[active] = z_idx[active]
    lI, uI = l[unstable], u[unstable]
    h_idx[unstable] = B.variables(lI, uI) if exact else B.variables(-inf, inf, n=nI)
    z_idx[unstable] = B.variables(0.0, uI if exact else inf, n=nI)
    rows = np.concatenate([active, unstable])                                   # ẑ = F v + f0: h − F v = f0
    F, f0 = affine_rows(system.ops[i], system.layer_vars, B.n, rows)
    F = F - sp.csr_matrix((np.ones(len(rows)), (np.arange(len(rows)), h_idx[rows])), shape=F.shape)
    B.matrix_rows((-F).tocoo(), f0, equality=True)
    hI, zI = h_idx[unstable], z_idx[unstable]
    B.rows([(hI, 1.0), (zI, -1.0)], np.zeros(nI))                    # z ≥ ẑ
    if exact:
        a_idx[unstable] = B.variables(0.0, 1.0, integer=True, n=nI)
        aI = a_idx[unstable]
        B.rows([(zI, 1.0), (aI, -uI)], np.zeros(nI))                 # z ≤ u a
        B.rows([(zI, 1.0), (hI, -1.0), (aI, -lI)], -lI)                          # z ≤ ẑ − l(1 − a)
    else:
        slope = uI / (uI - lI)
        B.rows([(zI, 1.0), (hI, -slope)], -slope * lI)                           # z ≤ u(ẑ − l)/(u − l)
    system.layer_vars.append(z_idx)
    system.zhat_vars.append(h_idx)
    system.binary_vars.append(a_idx)

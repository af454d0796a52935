"""Wong–Kolter dual network (Wong & Kolter 2018, §3): sound bounds on ``c^T f(x')`` by weak duality.

Notation follows the paper: the dual network ``ν_k = −c``, ``ν̂_i = W_iᵀ ν_{i+1}`` (eq. 22), ReLU layers
with pre-activation bounds ``l ≤ ẑ ≤ u`` split into ``I⁻, I⁺, I``, and the objective ``J`` of eq. 23.
In code we propagate ``ω = −ν`` (so ``ω_k = c``): for fixed α this is the linearised network run
backwards, and it gives the lower and upper bound of a row in one pass.

Intermediate bounds (Algorithm 1) are computed layer by layer, per layer with the cheaper of
- advancing the *forward frontier*: the input identity and each earlier layer's unstable units pushed
  forward through the linearised network (Algorithm 1's columns, reused from layer to layer; along a
  chain of convolutions built from receptive-field patches, see ``patches.py``), or
- *backward rows*: the identity on the layer's units pushed back (eq. 22 with c = ±e_j) until they
  reach the frontier, whose columns then give the rest of J in one product ("jump").
The final objective is a backward pass that jumps the same way. Every route evaluates the same
formula, so they agree to rounding (``strategy="forward"``/``"backward"`` keep the pure routes).

Two scaled variants (Wong et al. 2018b, "Scaling provable adversarial defenses"):
- ``proj=k``: the frontier's ℓ1 terms estimated from k Cauchy random projections (median estimator), so
  a pass costs k columns instead of one per input dimension and unstable unit: for training; NOT sound.
  The estimators are in ``projections.py``.
- :func:`~polytope_lab.chunked.column_chunked_bounds` (``chunked.py``): the exact bounds with the forward
  columns in chunks (optionally spread over several devices), for one example too large to hold all its
  columns at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .bounds import Bounder, Bounds
from . import patches
from .network import LinearOp, Network
from .projections import check_proj, l1_estimate, l2_estimate, random_matrix
from .regions import L2Ball, LinfBall, Region

FLOAT_BYTES = 4
SKIP_FORWARD_BYTES = 2 ** 31  # "auto" on a skip net: forward columns only while they fit in this


def relu_slopes(l: torch.Tensor, u: torch.Tensor):
    """The fixed dual slope ``d`` (eq. 27: 0 on I⁻, 1 on I⁺, u/(u−l) on I) and the mask of ``I``."""
    unstable = (l < 0) & (u > 0)
    d = (l >= 0).to(l.dtype)
    d = torch.where(unstable, u / torch.where(unstable, u - l, torch.ones_like(u)), d)
    return d, unstable


def relu_terms(G: torch.Tensor, lI: torch.Tensor):
    """``(Σ_q lI_q [−G_q]₊, Σ_q lI_q [G_q]₊)``, each (B, n), over the columns q of G (B|1, n, q) with lI
    (B, q): the unstable units' terms of the lower and the upper bound (eq. 23's ``Σ_{j∈I} l_j [ν_j]₊``),
    from one clamp and two batched products (``[−a]₊ = [a]₊ − a``)."""
    lI = lI.unsqueeze(-1)                                                       # (B, q, 1)
    pos = torch.matmul(G.clamp(min=0), lI).squeeze(-1)
    return pos - torch.matmul(G, lI).squeeze(-1), pos


def _backward(network: Network, region: Region, bounds: list, rows: torch.Tensor, top: int, alpha=None,
              frontier=None):
    """Bounds on ``rowsᵀ ẑ`` at the output of affine ``top`` from the dual network (eq. 22–23).

    rows: (B, m, *out_shape of affine top). alpha: None for the fixed choice α = u/(u−l), giving
    (lower, upper); or one tensor per ReLU layer below ``top``, (B, m, *shape), giving (lower, None).
    frontier: a :class:`_Frontier` at some layer s ≤ top: the pass stops at layer s and takes the rest
    of the dual network (with the fixed α) from the frontier's precomputed columns (sequential networks).
    Skip terms ``S_ij`` (Wong et al. 2018b, dense form): ``ν̂_j`` collects ``S_ijᵀ ν_{i+1}`` from every
    affine i that reads z_j, and ``ν_{i+1}ᵀ b`` includes their biases.
    """
    B, m = rows.shape[:2]
    if frontier is not None and frontier.layer == 0:
        frontier = None  # A_1's own transpose is cheaper than its dense columns
    stop = -1 if frontier is None else frontier.layer
    omega = rows  # ω_{k} = c = −ν_k                                        # (B, m, *shape_top)
    J = rows.new_zeros(B, m)        # linear part: Σ ω_{i+1}ᵀ b_i (+ ω̂_1ᵀ x below)
    relu_lo = rows.new_zeros(B, m)  # Σ_{j∈I} l_j [ν_j]_+ for c
    relu_up = rows.new_zeros(B, m)  # the same for −c (fixed α only)
    incoming = {}  # j: Σ S_ijᵀ ω_{i+1} over the skip terms read so far, (B, m, n_j)
    for i in range(top, stop, -1):
        A = network.affines[i]
        J = J + (omega.reshape(B, m, -1) * A.bias().reshape(1, 1, -1)).sum(-1)      # ν_{i+1}ᵀ b_i
        omega_hat = A.transpose(omega.reshape(B * m, *A.out_shape)).reshape(B, m, *A.in_shape)  # ν̂_i = W_iᵀ ν_{i+1}
        for j, S in network.skips_into(i):
            J = J + (omega.reshape(B, m, -1) * S.bias().reshape(1, 1, -1)).sum(-1)
            back = S.transpose(omega.reshape(B * m, *S.out_shape)).reshape(B, m, -1)
            incoming[j] = back if j not in incoming else incoming[j] + back
        if i in incoming:                                                       # ν̂_i += Σ_{i'} S_{i'i}ᵀ ν_{i'+1}
            omega_hat = omega_hat + incoming.pop(i).reshape(omega_hat.shape)
        if i == 0:
            break
        l, u = bounds[i - 1]
        d, unstable = relu_slopes(l, u)
        lI = torch.where(unstable, l, torch.zeros_like(l)).reshape(B, -1)       # (B, n_i)
        d, unstable = (t.reshape(B, 1, *A.in_shape) for t in (d, unstable))     # (B, 1, *shape_i)
        if alpha is None:
            omega = d * omega_hat                                                # ν_i = D_i ν̂_i (eq. 26)
        else:
            # eq. 22 in ω: ω = α[ω̂]_+ − u/(u−l)[ω̂]_− on I, d ω̂ elsewhere
            a = alpha[i - 1].reshape(B, m, *A.in_shape)
            omega = torch.where(unstable, a * omega_hat.clamp(min=0) + d * omega_hat.clamp(max=0), d * omega_hat)
        lo, up = relu_terms(omega.reshape(B, m, -1), lI)
        relu_lo = relu_lo + lo
        if alpha is None:
            relu_up = relu_up + up
    if frontier is not None:
        lin, dev, lo, up = frontier.jump(omega.reshape(B, m, -1))
        upper = None if alpha is not None else J + lin + dev - relu_up - up
        return J + lin - dev + relu_lo + lo, upper
    center = (omega_hat.reshape(B, m, -1) * region.center.reshape(B, 1, -1)).sum(-1)  # ω̂_1ᵀ x
    dev = region.deviation(omega_hat)                                                # ε‖ν̂_1‖ (dual norm)
    lower = J + center - dev + relu_lo
    upper = None if alpha is not None else J + center + dev - relu_up
    return lower, upper


def _push(A, d, M):
    """``A·(d ⊙ column)`` for every column of M: (B|1, n, c) with d (B, n) -> (B, n', c)."""
    if isinstance(M, patches.PatchRows):
        if isinstance(A, LinearOp) and M.foldable:
            return M.left_multiply(A.weight * d.unsqueeze(1))
        M = M.dense()
    if isinstance(A, LinearOp):
        return torch.matmul(A.weight * d.unsqueeze(1), M)                     # (W D) M: no (B, n, c) temporary
    B, c = d.shape[0], M.shape[2]
    cols = (d.unsqueeze(2) * M).transpose(1, 2).reshape(B * c, *A.in_shape)
    return A.linear(cols).reshape(B, c, -1).transpose(1, 2)


class _Frontier:
    """Algorithm 1's forward state at the output of affine ``layer`` (ẑ_s), in row layout.

    ``h`` (B, n_s): the linearised network run on the region's centre (biases included).
    ``F`` (B|1, n_s, n_0): ∂ẑ_s/∂x' through the fixed D's (``A_1`` alone is shared by the batch).
    ``G[j]`` (B, n_s, q_j) and ``lI[j]`` (B, q_j): for ReLU layer j < s, the response to ``d_q e_q`` of
    each unstable unit q (padded to the batch maximum, l = 0 on padding) and its lower bound.

    With ``proj=k`` (random projections), a block with more than k columns — the input identity when
    n_0 > k, a ReLU layer's unstable units when some example has more than k — is not kept; its share of
    every row's radius is estimated instead. Since ``Σ_q l_q [a_q]₊ = ½ Σ_q l_q a_q − ½ ‖l ⊙ a‖₁`` (l < 0),
    a row's radius ``Σ rad |F_j| + Σ_layers ½ ‖(lI ⊙ G)_j‖₁`` (rad = ε for a plain ball) is the ℓ1 norm of
    one row of the concatenation ``[rad ⊙ F, ½ lI ⊙ G_1, …]`` of the projected blocks:
    ``S`` (B|1, k, n_s) holds k combinations of those columns with i.i.d. standard Cauchy weights, as k
    images (pushed through convolutions without transposes), and :func:`l1_estimate` over k estimates
    every row's norm; ``shift`` (B, n_s) is the linear half ``−½ Σ G lI``, pushed as one column;
    ``S2`` (B|1, k, n_s) sketches an L2 ball's input term ``ε‖F_j‖₂`` with Gaussian weights
    (:func:`l2_estimate`); ``scale`` (B, 1): a plain ball's ε, not yet applied to the input sketch shared
    by the batch (folded into the slopes at the first advance).
    """

    def __init__(self, network: Network, region: Region, proj=None, generator=None):
        A = network.affines[0]
        n0, B = network.input_size, region.batch_size
        self.network, self.region, self.layer = network, region, 0
        self.proj, self.generator = proj, generator
        x = region.x
        self.h = A.forward(region.center).reshape(B, -1)
        self.F = self.S = self.S2 = self.shift = self.scale = None
        if proj is None or proj >= n0:
            eye = torch.eye(n0, device=x.device, dtype=x.dtype).reshape(n0, *network.input_shape)
            self.F = A.linear(eye).reshape(n0, -1).t().unsqueeze(0)           # (1, n_1, n0): A_1·I
        else:
            self._sketch_input(A)
        self.G, self.lI, self.slopes = [], [], []

    def _sketch_input(self, A):
        """``S`` (L∞) or ``S2`` (L2) at layer 0: A_1 applied to k random combinations of the input
        coordinates, each weighted by its radius."""
        region, k, shape = self.region, self.proj, self.network.input_shape
        B, n0 = region.batch_size, self.network.input_size
        if not isinstance(region, (LinfBall, L2Ball)):
            raise ValueError(f"random projections need a LinfBall or an L2Ball, got {type(region).__name__}")
        kind = "cauchy" if isinstance(region, LinfBall) else "gauss"
        R = random_matrix(kind, (k, n0), self.generator, region.x)
        if isinstance(region, LinfBall) and region.clip is not None:   # per-coordinate radius: one sketch per example
            R = (region.radius.reshape(B, 1, n0) * R).reshape(B * k, n0)
        else:
            self.scale = region.eps.reshape(B, 1)
        S = A.linear(R.reshape(-1, *shape)).reshape(-1, k, A.out_features)    # (B|1, k, n_1)
        if kind == "cauchy":
            self.S = S
        else:
            self.S2 = S

    def _sketched(self, omega=None):
        """Estimated radius of every row, (B, n_s), or of the rows ``omega`` (B, m, n_s), (B, m); 0 if none."""
        dev = 0.0
        for M, estimate in ((self.S, l1_estimate), (self.S2, l2_estimate)):
            if M is not None:
                dev = dev + (estimate(M, 1) if omega is None else estimate(torch.matmul(omega, M.transpose(1, 2))))
        return dev if self.scale is None else dev * self.scale

    @property
    def estimated(self) -> bool:
        """Whether some term is estimated from random projections (the bounds are then not sound)."""
        return self.S is not None or self.S2 is not None

    @property
    def columns(self) -> int:
        exact = 0 if self.F is None else self.F.shape[2]
        sketched = sum(M.shape[1] for M in (self.S, self.S2) if M is not None)
        return exact + sketched + sum(g.shape[2] for g in self.G)

    @property
    def width(self) -> int:
        return self.h.shape[1]

    def advance_cost(self) -> int:
        """Multiply-adds per example of :meth:`advance`."""
        A = self.network.affines[self.layer + 1]
        convs = self.network.affines[: self.layer + 2]
        by_patches = patches.cost(convs) if self.F is not None else 0
        if by_patches:
            return by_patches + (self.columns - self.F.shape[2]) * A.cost
        return self.columns * A.cost

    def bounds(self):
        """(l, u) of the current layer's pre-activations, each (B, n_s)."""
        mid = self.h if self.shift is None else self.h + self.shift
        dev = self._sketched()                                                  # (B, n_s), or 0
        F = self.F
        if F is not None:
            dev = dev + (F.deviation(self.region) if isinstance(F, patches.PatchRows) else self.region.deviation(F))
        lower, upper = mid - dev, mid + dev
        for G, lI in zip(self.G, self.lI):
            lo, up = relu_terms(G, lI)
            lower, upper = lower + lo, upper - up
        return lower, upper

    def jump(self, omega):
        """The dual terms of the layers at and below the frontier for rows ``omega`` (B, m, n_s).

        Returns (linear, deviation, relu term for the rows, relu term for the negated rows), each (B, m).
        """
        mid = self.h if self.shift is None else self.h + self.shift
        lin = (omega * mid.unsqueeze(1)).sum(2)                                 # Σ ν^T b + ν̂_1ᵀ x
        dev = self._sketched(omega)
        F = self.F
        if isinstance(F, patches.PatchRows):
            nu_hat_1 = F.left_multiply(omega) if F.foldable else torch.matmul(omega, F.dense())
            dev = dev + self.region.deviation(nu_hat_1)
        elif F is not None:
            dev = dev + self.region.deviation(torch.matmul(omega, F))           # ν̂_1: (B, m, n0)
        lo, up = torch.zeros_like(lin), torch.zeros_like(lin)
        for G, lI in zip(self.G, self.lI):
            terms = relu_terms(torch.matmul(omega, G), lI)                      # ν at the unstable units: (B, m, q)
            lo, up = lo + terms[0], up + terms[1]
        return lin, dev, lo, up

    def advance(self, l, u):
        """Apply D (from the current layer's l, u) and the next affine layer to every column."""
        self.layer += 1
        A = self.network.affines[self.layer]
        B = self.h.shape[0]
        l = l.reshape(B, -1)
        d, unstable = relu_slopes(l, u.reshape(B, -1))
        self.slopes.append(d)
        self.h = A.forward((d * self.h).reshape(B, *A.in_shape)).reshape(B, -1)
        convs = self.network.affines[: self.layer + 1]
        if self.F is not None and patches.cost(convs):
            self.F = patches.conv_jacobian(convs, [s.reshape(B, *c.out_shape) for s, c in zip(self.slopes, convs)])
        elif self.F is not None:
            self.F = _push(A, d, self.F)
        self.G = [_push(A, d, G) for G in self.G]
        # new columns: A(d_q e_q) for each unstable unit q of this layer, padded to the batch maximum
        counts = unstable.sum(1)
        q_max = int(counts.max()) if B else 0
        projected = self.proj is not None and q_max > self.proj
        if self.estimated or projected:
            self._advance_sketches(A, d, torch.where(unstable, d * l, torch.zeros_like(l)) / 2 if projected else None)
        if q_max > 0 and not projected:
            order = torch.argsort(unstable.to(torch.int8), dim=1, descending=True, stable=True)[:, :q_max]
            valid = torch.arange(q_max, device=d.device)[None, :] < counts[:, None]  # (B, q_max)
            dI = torch.gather(d, 1, order) * valid
            self.lI.append(torch.gather(l, 1, order) * valid)
            self.G.append(_columns(A, order, B * q_max) * dI.unsqueeze(1))

    def _advance_sketches(self, A, d, w=None):
        """Push the sketches and ``shift`` through D and A. With ``w`` (B, n) = ½ l_q d_q on this layer's
        unstable units (0 elsewhere), first fold those units in (see the class docstring): k Cauchy
        combinations ``w ⊙ R`` into ``S`` and ``−w`` into ``shift``."""
        B, k = d.shape[0], self.proj
        if self.scale is not None:
            d, self.scale = d * self.scale, None
        S, S2 = (None if M is None else d.unsqueeze(1) * M for M in (self.S, self.S2))  # (B, k, n)
        shift = None if self.shift is None else d * self.shift
        if w is not None:
            R = random_matrix("cauchy", (1, k, w.shape[1]), self.generator, w)
            S = w.unsqueeze(1) * R if S is None else torch.addcmul(S, w.unsqueeze(1), R)
            shift = -w if shift is None else shift - w
        self.S, self.S2 = (None if M is None else A.linear(M.reshape(B * k, *A.in_shape)).reshape(B, k, -1)
                           for M in (S, S2))
        self.shift = None if shift is None else A.linear(shift.reshape(B, *A.in_shape)).reshape(B, -1)


def _columns(A, order, budget: int) -> torch.Tensor:
    """Columns ``order`` (B, q) of A's matrix as (B, n_out, q): a gather from the dense matrix, or A
    applied to one-hot inputs when that takes fewer operator calls (``budget`` = B·q)."""
    B, q = order.shape
    if isinstance(A, LinearOp):
        return A.weight[:, order].permute(1, 0, 2)
    n_in = A.in_features
    ref = A.bias()
    if n_in <= budget and n_in * A.out_features <= 2 ** 26:
        eye = torch.eye(n_in, device=ref.device, dtype=ref.dtype).reshape(n_in, *A.in_shape)
        dense = A.linear(eye).reshape(n_in, -1)                                 # row q = column q of W
        return dense[order].transpose(1, 2)
    E = ref.new_zeros(B, q, n_in).scatter(2, order.unsqueeze(2), 1.0)
    return A.linear(E.reshape(B * q, *A.in_shape)).reshape(B, q, -1).transpose(1, 2)


def _plan(network: Network, frontier: _Frontier, i: int) -> bool:
    """Whether to advance the frontier to layer i (else: backward rows from i down to the frontier)."""
    A = network.affines[i]
    s = frontier.layer
    if s == 0:
        backward = A.out_features * sum(a.cost for a in network.affines[: i + 1])
    else:
        backward = A.out_features * (sum(a.cost for a in network.affines[s + 1: i + 1]) + frontier.width * frontier.columns)
    return frontier.advance_cost() <= backward


def intermediate_bounds(network: Network, region: Region, strategy: str = "auto", return_frontier=False,
                        proj=None, generator=None):
    """Algorithm 1: (l, u) of every ReLU layer's pre-activations, each (B, *shape), with fixed α.

    ``strategy``: "auto" (per layer, the cheaper of advancing the forward frontier and backward rows that
    jump through it), "forward" (always advance) or "backward" (rows all the way to the input).
    With ``return_frontier``, also returns the frontier (None for "backward" or without ReLU layers) for
    :func:`dual_objective`.
    ``proj=k``: the frontier's blocks of more than k columns are replaced by k random projections (see
    :class:`_Frontier`) drawn from ``generator`` (torch's global one when None); the bounds are then
    estimates, not sound (``frontier.estimated``). Rows that never reach the frontier stay exact.
    A network with skip connections: forward columns through the skips ("forward"; "auto" while they
    fit in ``SKIP_FORWARD_BYTES``; ``proj`` as above) or backward rows ("backward"); the frontier returned
    is then a :class:`~polytope_lab.skip_frontier.SkipFrontier` (None for backward rows), which the final
    objective does not jump through: it runs to the input.
    """
    if strategy not in ("auto", "forward", "backward"):
        raise ValueError(f"strategy must be 'auto', 'forward' or 'backward', got {strategy!r}")
    check_proj(proj)
    if network.has_skips:
        bounds, frontier = _skip_bounds(network, region, strategy, proj, generator)
        return (bounds, frontier) if return_frontier else bounds
    bounds = []
    use_frontier = strategy != "backward" and network.n_relu_layers > 0
    frontier = _Frontier(network, region, proj, generator) if use_frontier else None
    B = region.batch_size
    for i in range(network.n_relu_layers):
        A = network.affines[i]
        if frontier is not None and frontier.layer < i and (strategy == "forward" or _plan(network, frontier, i)):
            frontier.advance(*bounds[frontier.layer])
        if frontier is not None and frontier.layer == i:
            l, u = frontier.bounds()
        else:
            n = A.out_features
            eye = torch.eye(n, device=region.x.device, dtype=region.x.dtype).reshape(1, n, *A.out_shape)
            l, u = _backward(network, region, bounds, eye.expand(B, n, *A.out_shape), i, frontier=frontier)
        bounds.append((l.reshape(B, *A.out_shape), u.reshape(B, *A.out_shape)))
    return (bounds, frontier) if return_frontier else bounds


def _skip_bounds(network: Network, region: Region, strategy: str, proj=None, generator=None):
    """(bounds, frontier) of a network with skip connections: forward columns through every skip
    (:class:`~polytope_lab.skip_frontier.SkipFrontier`; "forward", and "auto" while its columns at every
    layer would take at most ``SKIP_FORWARD_BYTES``) or backward rows to the input (frontier None)."""
    from .skip_frontier import SkipFrontier  # it builds on this module
    B, bounds = region.batch_size, []
    sizes = [network.layer_size(j) for j in range(network.n_relu_layers)]      # z_0 .. z_{k-1}
    blocks = sizes if proj is None else [min(n, proj) for n in sizes]          # columns per block, at most
    columns = FLOAT_BYTES * B * sum(n * sum(blocks[:j]) for j, n in enumerate(sizes) if j)  # worst case
    forward = strategy == "forward" or (strategy == "auto" and columns <= SKIP_FORWARD_BYTES)
    frontier = SkipFrontier(network, region, proj, generator) if forward else None
    for i in range(network.n_relu_layers):
        A = network.affines[i]
        if frontier is not None:
            if i:
                frontier.advance(*bounds[-1])
            l, u = frontier.bounds()
        else:
            n = A.out_features
            eye = torch.eye(n, device=region.x.device, dtype=region.x.dtype).reshape(1, n, *A.out_shape)
            l, u = _backward(network, region, bounds, eye.expand(B, n, *A.out_shape), i)
        bounds.append((l.reshape(B, *A.out_shape), u.reshape(B, *A.out_shape)))
    return bounds, frontier


def _exact(frontier):
    """``frontier`` if the final objective can jump through it: a sequential frontier without estimated
    terms (the final objective is exact given the bounds)."""
    return frontier if isinstance(frontier, _Frontier) and not frontier.estimated else None


def dual_objective(network: Network, region: Region, bounds: list, C: torch.Tensor, alpha=None, frontier=None):
    """``J`` (eq. 23): lower bound of ``C f(x')``, (B, m); with ``alpha=None`` also the upper bound.

    ``frontier`` (from :func:`intermediate_bounds`) shortens the backward pass; with it, only the α of
    the ReLU layers above the frontier are used (those below keep the fixed choice). A frontier with
    estimated terms (``proj``) is not used: given the bounds, J is then computed exactly, to the input.
    """
    top = len(network.affines) - 1
    rows = C.reshape(C.shape[0], C.shape[1], *network.affines[-1].out_shape)
    return _backward(network, region, bounds, rows, top, alpha, _exact(frontier))


def optimize_alpha(network, region, bounds, C, steps=20, lr=0.2, frontier=None):
    """Projected gradient ascent on α ∈ [0,1] (one α per objective row); returns the best J seen.

    Starts from the fixed choice α = u/(u−l); every iterate is a valid dual point, so every J is a
    sound lower bound and the best one is kept per row. With a ``frontier`` only the ReLU layers above
    it are optimised (each step is then a short backward pass).
    """
    bounds = [(l.detach(), u.detach()) for l, u in bounds]
    m = C.shape[1]
    frontier = _exact(frontier)
    first = 0 if frontier is None else frontier.layer
    alpha = [relu_slopes(l, u)[0].unsqueeze(1).expand(l.shape[0], m, *l.shape[1:]).clone().requires_grad_(j >= first)
             for j, (l, u) in enumerate(bounds)]
    free = [a for a in alpha if a.requires_grad]
    opt = torch.optim.Adam(free, lr=lr) if free else None
    best = None
    for step in range(steps + 1):
        with torch.enable_grad():
            J, _ = dual_objective(network, region, bounds, C, alpha, frontier)
            best = J.detach() if best is None else torch.maximum(best, J.detach())
            if step == steps or opt is None:
                break
            grads = torch.autograd.grad(-J.sum(), free)  # α only: never touches the model's .grad
        for a, g in zip(free, grads):
            a.grad = g
        opt.step()
        with torch.no_grad():
            for a in free:
                a.clamp_(0.0, 1.0)
    return best


@dataclass
class EstimatedBounds(Bounds):
    """Bounds computed from random-projection estimates (``DualBounder(proj=k)``): close to the exact dual
    bounds for large k, but NOT sound — an estimate can be tighter than the truth. ``sound`` is False and
    ``certified`` raises; ``(b.lower > 0).all(1)`` gives the estimate's verdict if you explicitly want it."""

    sound: bool = False

    @property
    def certified(self) -> torch.Tensor:
        raise ValueError(f"estimated bounds ({self.method}) cannot certify; use exact bounds (proj=None)")


class DualBounder(Bounder):
    """Wong–Kolter dual bounds.

    Options: ``alpha`` "fixed" (Algorithm 1's α = u/(u−l)) or "optimized" (projected gradient ascent,
    ``steps``/``lr``, on every ReLU layer's α in the final objective, one α per objective row; the
    intermediate bounds keep the fixed α); ``device`` (default: where the region's ``x`` lives, so CPU
    unless you pass CUDA tensors or ``device="cuda"``; results come back on ``x``'s device);
    ``max_memory`` bytes per chunk of examples (chunking bounds peak memory, results are unchanged);
    ``strategy`` "auto" | "forward" | "backward" for the intermediate bounds. Results carry no gradient:
    use :func:`polytope_lab.robust_loss` or :func:`dual_objective` to differentiate through the bound.

    ``proj=k``: estimate the intermediate bounds with k random projections (Wong et al. 2018b; Cauchy
    with the median estimator for L∞ and the ReLU terms, Gaussian with the root mean square for an L2
    ball's input term). A block of columns is projected only when k is smaller than its number of
    columns (n_0 for the input, the batch's largest count of unstable units for a ReLU layer), otherwise
    it stays exact. Given the intermediate bounds the final objective is exact. If anything was
    estimated the result is an :class:`EstimatedBounds` (``method`` e.g. "dual-proj50", ``sound`` False,
    ``certified`` raises); ``seed`` (int) draws the projections from a fresh generator on every call, so
    a call is reproducible (None: torch's global generator).

    ``column_chunk=c``: exact intermediate bounds holding at most c forward columns at once
    (:func:`column_chunked_bounds`), for an example too big for memory; ``devices`` (a list of torch
    devices) spreads the chunks. ``max_memory`` chunks over examples, ``column_chunk`` within one.

    Networks with skip connections (``models.DenseSequential``): the dual transposes through the skips;
    intermediate bounds come from forward columns kept at every layer a skip reads ("auto", "forward") or
    from backward rows ("backward"); ``proj`` sketches the forward columns (backward rows stay exact), and
    ``column_chunk`` chunks backward rows.
    """

    name = "dual"

    def __init__(self, alpha="fixed", device=None, max_memory=2 ** 32, strategy="auto", steps=20, lr=0.2,
                 proj=None, seed=0, column_chunk=None, devices=None):
        if alpha not in ("fixed", "optimized"):
            raise ValueError(f"alpha must be 'fixed' or 'optimized', got {alpha!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be None or an integer, got {seed!r}")
        if column_chunk is not None and (isinstance(column_chunk, bool) or not isinstance(column_chunk, int)
                                         or column_chunk < 1):
            raise ValueError(f"column_chunk must be None or an integer >= 1, got {column_chunk!r}")
        if devices is not None and (column_chunk is None or isinstance(devices, (str, torch.device))
                                    or len(devices) == 0):
            raise ValueError("devices must be a non-empty list of devices, used with column_chunk")
        if check_proj(proj) is not None and column_chunk is not None:
            raise ValueError("proj (estimated bounds) and column_chunk (exact bounds) exclude each other")
        self.alpha, self.device, self.max_memory = alpha, device, max_memory
        self.strategy, self.steps, self.lr = strategy, steps, lr
        self.proj, self.seed, self.column_chunk, self.devices = proj, seed, column_chunk, devices

    def chunk_size(self, network: Network, batch: int) -> int:
        """Examples per chunk so that the per-example blocks (rows or columns of the dual network,
        at most ``max width × (n_0 + Σ n_i)`` floats) stay under ``max_memory``."""
        sizes = [a.out_features for a in network.affines]
        widest = max(sizes[1:] or sizes)
        per_example = FLOAT_BYTES * widest * (network.input_size + sum(sizes))
        return max(1, min(batch, int(self.max_memory // max(per_example, 1))))

    def _bound(self, network, region, C):
        out_device = region.x.device
        device = out_device if self.device is None else torch.device(self.device)
        network, region, C = network.to(device), region.to(device), C.to(device)
        generator = None if self.proj is None or self.seed is None else torch.Generator().manual_seed(self.seed)
        step = self.chunk_size(network, region.batch_size)
        lowers, uppers, layers, estimated = [], [], [], False
        for start in range(0, region.batch_size, step):
            idx = slice(start, start + step)
            sub = region.select(idx)
            with torch.no_grad():
                if self.column_chunk is not None:
                    from .chunked import column_chunked_bounds  # chunked.py builds on this module
                    bounds, frontier = column_chunked_bounds(network, sub, self.column_chunk, self.devices), None
                else:
                    bounds, frontier = intermediate_bounds(network, sub, self.strategy, return_frontier=True,
                                                           proj=self.proj, generator=generator)
            estimated = estimated or (frontier is not None and frontier.estimated)
            if self.alpha == "fixed":
                with torch.no_grad():
                    lo, up = dual_objective(network, sub, bounds, C[idx], frontier=frontier)
            else:
                both = optimize_alpha(network, sub, bounds, torch.cat([C[idx], -C[idx]], 1), self.steps, self.lr)
                m = C.shape[1]
                lo, up = both[:, :m], -both[:, m:]
            lowers.append(lo.detach())
            uppers.append(up.detach())
            layers.append(bounds)
        intermediate = [tuple(torch.cat([ch[j][k] for ch in layers]).to(out_device) for k in range(2))
                        for j in range(network.n_relu_layers)]
        method = "dual" if self.alpha == "fixed" else "dual-optimized"
        result = EstimatedBounds if estimated else Bounds
        return result(torch.cat(lowers).to(out_device), torch.cat(uppers).to(out_device), intermediate,
                      ["ok"] * region.batch_size, method=method + (f"-proj{self.proj}" if estimated else ""))

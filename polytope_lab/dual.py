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
"""
from __future__ import annotations

import torch

from .bounds import Bounder, Bounds
from . import patches
from .network import LinearOp, Network
from .regions import Region

FLOAT_BYTES = 4


def relu_slopes(l: torch.Tensor, u: torch.Tensor):
    """The fixed dual slope ``d`` (eq. 27: 0 on I⁻, 1 on I⁺, u/(u−l) on I) and the mask of ``I``."""
    unstable = (l < 0) & (u > 0)
    d = (l >= 0).to(l.dtype)
    d = torch.where(unstable, u / torch.where(unstable, u - l, torch.ones_like(u)), d)
    return d, unstable


def _backward(network: Network, region: Region, bounds: list, rows: torch.Tensor, top: int, alpha=None,
              frontier=None):
    """Bounds on ``rowsᵀ ẑ`` at the output of affine ``top`` from the dual network (eq. 22–23).

    rows: (B, m, *out_shape of affine top). alpha: None for the fixed choice α = u/(u−l), giving
    (lower, upper); or one tensor per ReLU layer below ``top``, (B, m, *shape), giving (lower, None).
    frontier: a :class:`_Frontier` at some layer s ≤ top: the pass stops at layer s and takes the rest
    of the dual network (with the fixed α) from the frontier's precomputed columns.
    """
    B, m = rows.shape[:2]
    if frontier is not None and frontier.layer == 0:
        frontier = None  # A_1's own transpose is cheaper than its dense columns
    stop = -1 if frontier is None else frontier.layer
    omega = rows  # ω_{k} = c = −ν_k                                        # (B, m, *shape_top)
    J = rows.new_zeros(B, m)        # linear part: Σ ω_{i+1}ᵀ b_i (+ ω̂_1ᵀ x below)
    relu_lo = rows.new_zeros(B, m)  # Σ_{j∈I} l_j [ν_j]_+ for c
    relu_up = rows.new_zeros(B, m)  # the same for −c (fixed α only)
    for i in range(top, stop, -1):
        A = network.affines[i]
        J = J + (omega.reshape(B, m, -1) * A.bias().reshape(1, 1, -1)).sum(-1)      # ν_{i+1}ᵀ b_i
        omega_hat = A.transpose(omega.reshape(B * m, *A.out_shape)).reshape(B, m, *A.in_shape)  # ν̂_i = W_iᵀ ν_{i+1}
        if i == 0:
            break
        l, u = bounds[i - 1]
        d, unstable = relu_slopes(l, u)
        d, unstable, l = (t.reshape(B, 1, *A.in_shape) for t in (d, unstable, l))  # (B, 1, *shape_i)
        lI = torch.where(unstable, l, torch.zeros_like(l))
        if alpha is None:
            omega = d * omega_hat                                                # ν_i = D_i ν̂_i (eq. 26)
            relu_up = relu_up + (lI * omega.clamp(min=0)).reshape(B, m, -1).sum(-1)
        else:
            # eq. 22 in ω: ω = α[ω̂]_+ − u/(u−l)[ω̂]_− on I, d ω̂ elsewhere
            a = alpha[i - 1].reshape(B, m, *A.in_shape)
            omega = torch.where(unstable, a * omega_hat.clamp(min=0) + d * omega_hat.clamp(max=0), d * omega_hat)
        relu_lo = relu_lo + (lI * (-omega).clamp(min=0)).reshape(B, m, -1).sum(-1)
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
    """

    def __init__(self, network: Network, region: Region):
        A = network.affines[0]
        n0, B = network.input_size, region.batch_size
        self.network, self.region, self.layer = network, region, 0
        x = region.x
        self.h = A.forward(region.center).reshape(B, -1)
        eye = torch.eye(n0, device=x.device, dtype=x.dtype).reshape(n0, *network.input_shape)
        self.F = A.linear(eye).reshape(n0, -1).t().unsqueeze(0)               # (1, n_1, n0): A_1·I
        self.G, self.lI, self.slopes = [], [], []

    @property
    def columns(self) -> int:
        return self.F.shape[2] + sum(g.shape[2] for g in self.G)

    @property
    def width(self) -> int:
        return self.F.shape[1]

    def advance_cost(self) -> int:
        """Multiply-adds per example of :meth:`advance`."""
        A = self.network.affines[self.layer + 1]
        convs = self.network.affines[: self.layer + 2]
        dense = self.columns * A.cost
        by_patches = patches.cost(convs)
        if by_patches:
            dense = by_patches + (self.columns - self.F.shape[2]) * A.cost
        return dense

    def bounds(self):
        """(l, u) of the current layer's pre-activations, each (B, n_s)."""
        F = self.F
        dev = F.deviation(self.region) if isinstance(F, patches.PatchRows) else self.region.deviation(F)  # (B, n_s)
        lower, upper = self.h - dev, self.h + dev
        for G, lI in zip(self.G, self.lI):
            lower = lower + (lI.unsqueeze(1) * (-G).clamp(min=0)).sum(2)
            upper = upper - (lI.unsqueeze(1) * G.clamp(min=0)).sum(2)
        return lower, upper

    def jump(self, omega):
        """The dual terms of the layers at and below the frontier for rows ``omega`` (B, m, n_s).

        Returns (linear, deviation, relu term for the rows, relu term for the negated rows), each (B, m).
        """
        lin = (omega * self.h.unsqueeze(1)).sum(2)                              # Σ ν^T b + ν̂_1ᵀ x
        F = self.F
        if isinstance(F, patches.PatchRows):
            nu_hat_1 = F.left_multiply(omega) if F.foldable else torch.matmul(omega, F.dense())
        else:
            nu_hat_1 = torch.matmul(omega, F)                                   # (B, m, n0)
        dev = self.region.deviation(nu_hat_1)
        lo, up = torch.zeros_like(lin), torch.zeros_like(lin)
        for G, lI in zip(self.G, self.lI):
            nu_I = torch.matmul(omega, G)                                       # (B, m, q): ν at unstable units
            lo = lo + (lI.unsqueeze(1) * (-nu_I).clamp(min=0)).sum(2)
            up = up + (lI.unsqueeze(1) * nu_I.clamp(min=0)).sum(2)
        return lin, dev, lo, up

    def advance(self, l, u):
        """Apply D (from the current layer's l, u) and the next affine layer to every column."""
        self.layer += 1
        A = self.network.affines[self.layer]
        B = self.h.shape[0]
        d, unstable = relu_slopes(l.reshape(B, -1), u.reshape(B, -1))
        self.slopes.append(d)
        self.h = A.forward((d * self.h).reshape(B, *A.in_shape)).reshape(B, -1)
        convs = self.network.affines[: self.layer + 1]
        if patches.cost(convs):
            self.F = patches.conv_jacobian(convs, [s.reshape(B, *c.out_shape) for s, c in zip(self.slopes, convs)])
        else:
            self.F = _push(A, d, self.F)
        self.G = [_push(A, d, G) for G in self.G]
        # new columns: A(d_q e_q) for each unstable unit q of this layer, padded to the batch maximum
        counts = unstable.sum(1)
        q_max = int(counts.max()) if B else 0
        if q_max > 0:
            order = torch.argsort(unstable.to(torch.int8), dim=1, descending=True, stable=True)[:, :q_max]
            valid = torch.arange(q_max, device=d.device)[None, :] < counts[:, None]  # (B, q_max)
            dI = torch.gather(d, 1, order) * valid
            self.lI.append(torch.gather(l.reshape(B, -1), 1, order) * valid)
            self.G.append(_columns(A, order, B * q_max) * dI.unsqueeze(1))


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


def intermediate_bounds(network: Network, region: Region, strategy: str = "auto", return_frontier=False):
    """Algorithm 1: (l, u) of every ReLU layer's pre-activations, each (B, *shape), with fixed α.

    ``strategy``: "auto" (per layer, the cheaper of advancing the forward frontier and backward rows that
    jump through it), "forward" (always advance) or "backward" (rows all the way to the input).
    With ``return_frontier``, also returns the frontier (None for "backward") for :func:`dual_objective`.
    """
    if strategy not in ("auto", "forward", "backward"):
        raise ValueError(f"strategy must be 'auto', 'forward' or 'backward', got {strategy!r}")
    bounds = []
    frontier = _Frontier(network, region) if strategy != "backward" else None
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


def dual_objective(network: Network, region: Region, bounds: list, C: torch.Tensor, alpha=None, frontier=None):
    """``J`` (eq. 23): lower bound of ``C f(x')``, (B, m); with ``alpha=None`` also the upper bound.

    ``frontier`` (from :func:`intermediate_bounds`) shortens the backward pass; with it, only the α of
    the ReLU layers above the frontier are used (those below keep the fixed choice).
    """
    top = len(network.affines) - 1
    rows = C.reshape(C.shape[0], C.shape[1], *network.affines[-1].out_shape)
    return _backward(network, region, bounds, rows, top, alpha, frontier)


def optimize_alpha(network, region, bounds, C, steps=20, lr=0.2, frontier=None):
    """Projected gradient ascent on α ∈ [0,1] (one α per objective row); returns the best J seen.

    Starts from the fixed choice α = u/(u−l); every iterate is a valid dual point, so every J is a
    sound lower bound and the best one is kept per row. With a ``frontier`` only the ReLU layers above
    it are optimised (each step is then a short backward pass).
    """
    bounds = [(l.detach(), u.detach()) for l, u in bounds]
    m = C.shape[1]
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


class DualBounder(Bounder):
    """Wong–Kolter dual bounds.

    Options: ``alpha`` "fixed" (Algorithm 1's α = u/(u−l)) or "optimized" (projected gradient ascent,
    ``steps``/``lr``, on every ReLU layer's α in the final objective, one α per objective row; the
    intermediate bounds keep the fixed α); ``device`` (default: where the region's ``x`` lives, so CPU
    unless you pass CUDA tensors or ``device="cuda"``; results come back on ``x``'s device);
    ``max_memory`` bytes per chunk of examples (chunking bounds peak memory, results are unchanged);
    ``strategy`` "auto" | "forward" | "backward" for the intermediate bounds. Results carry no gradient:
    use :func:`polytope_lab.robust_loss` or :func:`dual_objective` to differentiate through the bound.
    """

    name = "dual"

    def __init__(self, alpha="fixed", device=None, max_memory=2 ** 32, strategy="auto", steps=20, lr=0.2):
        if alpha not in ("fixed", "optimized"):
            raise ValueError(f"alpha must be 'fixed' or 'optimized', got {alpha!r}")
        self.alpha, self.device, self.max_memory = alpha, device, max_memory
        self.strategy, self.steps, self.lr = strategy, steps, lr

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
        step = self.chunk_size(network, region.batch_size)
        lowers, uppers, layers = [], [], []
        for start in range(0, region.batch_size, step):
            idx = slice(start, start + step)
            sub = region.select(idx)
            with torch.no_grad():
                bounds, frontier = intermediate_bounds(network, sub, self.strategy, return_frontier=True)
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
        return Bounds(torch.cat(lowers).to(out_device), torch.cat(uppers).to(out_device), intermediate,
                      ["ok"] * region.batch_size, method=method)

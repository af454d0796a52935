"""Wong–Kolter dual network (Wong & Kolter 2018, §3): sound bounds on ``c^T f(x')`` by weak duality.

Notation follows the paper: the dual network ``ν_k = −c``, ``ν̂_i = W_iᵀ ν_{i+1}`` (eq. 22), ReLU layers
with pre-activation bounds ``l ≤ ẑ ≤ u`` split into ``I⁻, I⁺, I``, and the objective ``J`` of eq. 23.
In code we propagate ``ω = −ν`` (so ``ω_k = c``): for fixed α this is the linearised network run
backwards, and it gives the lower and upper bound of a row in one pass.

Intermediate bounds (Algorithm 1) are computed layer by layer, per layer with the cheaper of
- *forward columns*: the input identity and each earlier layer's unstable units pushed forward
  through the linearised network (reused from layer to layer; ``A_1·I`` is shared by the batch), or
- *backward rows*: the identity on the layer's units pushed back to the input (eq. 22 with c = ±e_j).
Both evaluate the same formula, so they agree to rounding.
"""
from __future__ import annotations

import torch

from .bounds import Bounder, Bounds
from .network import Network
from .regions import Region

FLOAT_BYTES = 4


def relu_slopes(l: torch.Tensor, u: torch.Tensor):
    """The fixed dual slope ``d`` (eq. 27: 0 on I⁻, 1 on I⁺, u/(u−l) on I) and the mask of ``I``."""
    unstable = (l < 0) & (u > 0)
    d = (l >= 0).to(l.dtype)
    d = torch.where(unstable, u / torch.where(unstable, u - l, torch.ones_like(u)), d)
    return d, unstable


def _backward(network: Network, region: Region, bounds: list, rows: torch.Tensor, top: int, alpha=None):
    """Bounds on ``rowsᵀ ẑ`` at the output of affine ``top`` from the dual network (eq. 22–23).

    rows: (B, m, *out_shape of affine top). alpha: None for the fixed choice α = u/(u−l), giving
    (lower, upper); or one tensor per ReLU layer below ``top``, (B, m, *shape), giving (lower, None).
    """
    B, m = rows.shape[:2]
    omega = rows  # ω_{k} = c = −ν_k                                        # (B, m, *shape_top)
    J = rows.new_zeros(B, m)        # linear part: Σ ω_{i+1}ᵀ b_i (+ ω̂_1ᵀ x below)
    relu_lo = rows.new_zeros(B, m)  # Σ_{j∈I} l_j [ν_j]_+ for c
    relu_up = rows.new_zeros(B, m)  # the same for −c (fixed α only)
    for i in range(top, -1, -1):
        A = network.affines[i]
        J = J + (omega.reshape(B, m, -1) * A.bias().reshape(1, 1, -1)).sum(-1)      # ν_{i+1}ᵀ b_i
        omega_hat = A.transpose(omega.reshape(B * m, *A.out_shape)).reshape(B, m, *A.in_shape)  # ν̂_i = W_iᵀ ν_{i+1}
        if i == 0:
            break
        l, u = bounds[i - 1]
        d, unstable = relu_slopes(l, u)
        d, unstable, l = (t.reshape(B, 1, *A.in_shape) for t in (d, unstable, l))  # (B, 1, *shape_i)
        if alpha is None:
            omega = d * omega_hat                                                # ν_i = D_i ν̂_i (eq. 26)
            lI = torch.where(unstable, l, torch.zeros_like(l))
            relu_lo = relu_lo + (lI * (-omega).clamp(min=0)).reshape(B, m, -1).sum(-1)
            relu_up = relu_up + (lI * omega.clamp(min=0)).reshape(B, m, -1).sum(-1)
        else:
            # eq. 22 in ω: ω = α[ω̂]_+ − u/(u−l)[ω̂]_− on I, d ω̂ elsewhere
            a = alpha[i - 1].reshape(B, m, *A.in_shape)
            omega_I = a * omega_hat.clamp(min=0) + d * omega_hat.clamp(max=0)
            omega = torch.where(unstable, omega_I, d * omega_hat)
            lI = torch.where(unstable, l, torch.zeros_like(l))
            relu_lo = relu_lo + (lI * (-omega).clamp(min=0)).reshape(B, m, -1).sum(-1)
    center = (omega_hat.reshape(B, m, -1) * region.center.reshape(B, 1, -1)).sum(-1)  # ω̂_1ᵀ x
    dev = region.deviation(omega_hat)                                                # ε‖ν̂_1‖ (dual norm)
    lower = J + center - dev + relu_lo
    upper = None if alpha is not None else J + center + dev - relu_up
    return lower, upper


class _Forward:
    """Algorithm 1's forward state at the output of one affine layer (see module docstring)."""

    def __init__(self, network: Network, region: Region):
        A = network.affines[0]
        n0 = network.input_size
        self.network, self.region, self.layer = network, region, 0
        x = region.x
        self.h = A.forward(region.center)                                     # (B, *shape_1)
        eye = torch.eye(n0, device=x.device, dtype=x.dtype).reshape(n0, *network.input_shape)
        self.F_in = A.linear(eye).unsqueeze(0)                                # (1, n0, *shape_1): A_1·I
        self.G = []    # per earlier ReLU layer: (B, |I|max, *shape) columns d_q·(response to unit q)
        self.lI = []   # per earlier ReLU layer: (B, |I|max) l of those units (0 on padding)

    @property
    def columns(self) -> int:
        return self.F_in.shape[1] + sum(g.shape[1] for g in self.G)

    def bounds(self):
        """(l, u) of the current layer's pre-activations, each (B, *shape)."""
        B = self.h.shape[0]
        shape = self.h.shape[1:]
        Fin = self.F_in.reshape(self.F_in.shape[0], self.F_in.shape[1], -1).transpose(1, 2)  # (B|1, n, n0)
        dev = self.region.deviation(Fin).reshape(B, *shape)
        lower, upper = self.h - dev, self.h + dev
        for G, lI in zip(self.G, self.lI):
            Gf = G.reshape(B, G.shape[1], -1)                                  # (B, |I|, n)
            lower = lower + torch.einsum("bq,bqn->bn", lI, (-Gf).clamp(min=0)).reshape(B, *shape)
            upper = upper - torch.einsum("bq,bqn->bn", lI, Gf.clamp(min=0)).reshape(B, *shape)
        return lower, upper

    def advance(self, l, u):
        """Apply D (from l, u) and the next affine layer to every column."""
        self.layer += 1
        A = self.network.affines[self.layer]
        d, unstable = relu_slopes(l, u)
        B = d.shape[0]

        def push(cols):  # (B|1, q, *shape) -> (B, q, *next_shape)
            scaled = d.unsqueeze(1) * cols
            q = scaled.shape[1]
            return A.linear(scaled.reshape(B * q, *A.in_shape)).reshape(B, q, *A.out_shape)

        self.h = A.forward(d * self.h)
        self.F_in = push(self.F_in)
        self.G = [push(G) for G in self.G]
        # new columns: d_q e_q for each unstable unit q of this layer, padded to the batch maximum
        flat_I = unstable.reshape(B, -1)
        counts = flat_I.sum(1)
        q_max = int(counts.max()) if B else 0
        if q_max > 0:
            order = torch.argsort(flat_I.to(torch.int8), dim=1, descending=True, stable=True)[:, :q_max]
            valid = torch.arange(q_max, device=d.device)[None, :] < counts[:, None]  # (B, q_max)
            dI = torch.gather(d.reshape(B, -1), 1, order) * valid
            lI = torch.gather(l.reshape(B, -1), 1, order) * valid
            E = d.new_zeros(B, q_max, flat_I.shape[1])
            E.scatter_(2, order.unsqueeze(2), dI.unsqueeze(2))
            self.G.append(A.linear(E.reshape(B * q_max, *A.in_shape)).reshape(B, q_max, *A.out_shape))
            self.lI.append(lI)


def intermediate_bounds(network: Network, region: Region, strategy: str = "auto") -> list:
    """Algorithm 1: (l, u) of every ReLU layer's pre-activations, each (B, *shape), with fixed α.

    ``strategy``: "auto" (cheaper per layer), "forward" or "backward".
    """
    if strategy not in ("auto", "forward", "backward"):
        raise ValueError(f"strategy must be 'auto', 'forward' or 'backward', got {strategy!r}")
    bounds = []
    fwd = _Forward(network, region) if strategy != "backward" else None
    for i in range(network.n_relu_layers):
        A = network.affines[i]
        if fwd is not None and i > 0:
            l_prev, u_prev = bounds[-1]
            if strategy == "auto":
                fwd_cost = fwd.columns * A.cost
                bwd_cost = A.out_features * sum(a.cost for a in network.affines[: i + 1])
                if bwd_cost < fwd_cost:
                    fwd = None
            if fwd is not None:
                fwd.advance(l_prev, u_prev)
        if fwd is not None:
            l, u = fwd.bounds()
        else:
            B, n = region.batch_size, A.out_features
            eye = torch.eye(n, device=region.x.device, dtype=region.x.dtype).reshape(1, n, *A.out_shape)
            l, u = _backward(network, region, bounds, eye.expand(B, n, *A.out_shape), i)
            l, u = l.reshape(B, *A.out_shape), u.reshape(B, *A.out_shape)
        bounds.append((l, u))
    return bounds


def dual_objective(network: Network, region: Region, bounds: list, C: torch.Tensor, alpha=None):
    """``J`` (eq. 23): lower bound of ``C f(x')``, (B, m); with ``alpha=None`` also the upper bound."""
    top = len(network.affines) - 1
    rows = C.reshape(C.shape[0], C.shape[1], *network.affines[-1].out_shape)
    return _backward(network, region, bounds, rows, top, alpha)


def optimize_alpha(network, region, bounds, C, steps=20, lr=0.1):
    """Projected gradient ascent on α ∈ [0,1] (one α per objective row); returns the best J seen.

    Starts from the fixed choice α = u/(u−l); every iterate is a valid dual point, so every J is a
    sound lower bound and the best one is kept per row.
    """
    bounds = [(l.detach(), u.detach()) for l, u in bounds]
    m = C.shape[1]
    alpha = [relu_slopes(l, u)[0].unsqueeze(1).expand(l.shape[0], m, *l.shape[1:]).clone().requires_grad_(True)
             for l, u in bounds]
    opt = torch.optim.Adam(alpha, lr=lr)
    best = None
    for _ in range(steps + 1):
        with torch.enable_grad():
            J, _ = dual_objective(network, region, bounds, C, alpha)
        best = J.detach() if best is None else torch.maximum(best, J.detach())
        if _ == steps:
            break
        opt.zero_grad()
        (-J.sum()).backward()
        opt.step()
        with torch.no_grad():
            for a in alpha:
                a.clamp_(0.0, 1.0)
    return best


def _default_device(device):
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class DualBounder(Bounder):
    """Wong–Kolter dual bounds.

    Options: ``alpha`` "fixed" (Algorithm 1's α = u/(u−l)) or "optimized" (projected gradient ascent on
    the final layer's α, ``steps``/``lr``); ``device`` (default: CUDA if available, else CPU);
    ``max_memory`` bytes per chunk of examples (chunking bounds peak memory, results are unchanged);
    ``strategy`` "auto" | "forward" | "backward" for the intermediate bounds.
    """

    name = "dual"

    def __init__(self, alpha="fixed", device=None, max_memory=2 ** 30, strategy="auto", steps=20, lr=0.1):
        if alpha not in ("fixed", "optimized"):
            raise ValueError(f"alpha must be 'fixed' or 'optimized', got {alpha!r}")
        self.alpha, self.device, self.max_memory = alpha, device, max_memory
        self.strategy, self.steps, self.lr = strategy, steps, lr

    def chunk_size(self, network: Network, batch: int) -> int:
        """Examples per chunk so that the largest column/row block stays under ``max_memory``."""
        widest = max(a.in_features for a in network.affines)
        per_example = FLOAT_BYTES * widest * (network.input_size + sum(a.out_features for a in network.affines))
        return max(1, min(batch, int(self.max_memory // max(per_example, 1))))

    def _bound(self, network, region, C):
        device = _default_device(self.device)
        out_device = region.x.device
        network, region, C = network.to(device), region.to(device), C.to(device)
        step = self.chunk_size(network, region.batch_size)
        lowers, uppers, layers = [], [], []
        for start in range(0, region.batch_size, step):
            idx = slice(start, start + step)
            sub = region.select(idx)
            bounds = intermediate_bounds(network, sub, self.strategy)
            if self.alpha == "fixed":
                lo, up = dual_objective(network, sub, bounds, C[idx])
            else:
                both = optimize_alpha(network, sub, bounds, torch.cat([C[idx], -C[idx]], 1), self.steps, self.lr)
                m = C.shape[1]
                lo, up = both[:, :m], -both[:, m:]
            lowers.append(lo)
            uppers.append(up)
            layers.append(bounds)
        intermediate = [tuple(torch.cat([ch[j][k] for ch in layers]).to(out_device) for k in range(2))
                        for j in range(network.n_relu_layers)]
        method = "dual" if self.alpha == "fixed" else "dual-optimized"
        return Bounds(torch.cat(lowers).to(out_device), torch.cat(uppers).to(out_device), intermediate,
                      ["ok"] * region.batch_size, method=method)

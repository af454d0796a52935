"""The dual network over branch-and-bound subdomains: ReLU splits ``s·ẑ_{i,j} ≥ 0`` relaxed with multipliers
β ≥ 0 (β-CROWN, Wang et al. 2021), jointly optimised with α by projected gradient ascent.

A subdomain is the region plus split signs ``s`` per ReLU layer (+1 active, −1 inactive, 0 free). Its
split units are stable in the relaxation (``l := max(l, 0)`` for s = +1, ``u := min(u, 0)`` for s = −1,
:func:`split_bounds`; the other bounds are the root's, valid on every subdomain) and the Lagrangian
``cᵀẑ_k − Σ β s ẑ`` adds ``β∘s`` to ``ν_i`` at the split units (``backward(..., splits=...)``). For every
α ∈ [0, 1] and β ≥ 0 the result is a lower bound of ``cᵀf`` over the subdomain (weak duality: the
subtracted term is ≥ 0 there), so every iterate is sound and the best one per row is kept; β = 0 and no
splits give back the plain dual bound J (eq. 23). The derivation is in docs/bab.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backward import backward
from .relu import relu_slopes
from .tight import TIGHT_DECAY, bound_units, unstable
from ..network import Network
from ..regions import Region


def split_bounds(bounds: list, signs: list) -> list:
    """Root bounds (l, u) per ReLU layer, each (N, *shape), clipped by the split signs (N, *shape)."""
    out = []
    for (l, u), s in zip(bounds, signs):
        out.append((torch.where(s > 0, l.clamp(min=0), l), torch.where(s < 0, u.clamp(max=0), u)))
    return out


@dataclass
class SplitBound:
    """:func:`split_dual`'s answer for N subdomains with K rows each: ``lower`` (N, K) the best sound bound
    seen; ``alpha``/``beta`` per ReLU layer (N, K, *shape), the last iterate (a warm start for children);
    ``omega_hat`` per ReLU layer (N, K, *shape): ω̂ = −ν̂ on its post-activations at the last iterate, and
    ``omega_input`` (N, K, *input_shape) ω̂_1 on the input (the relaxation's minimiser is the box corner
    it points to)."""

    lower: torch.Tensor
    alpha: list
    beta: list
    omega_hat: list
    omega_input: torch.Tensor


def initial_alpha(bounds: list, K: int) -> list:
    """The fixed choice α = u/(u−l) (Algorithm 1), expanded to K rows: (N, K, *shape) per layer."""
    return [relu_slopes(l, u)[0].unsqueeze(1).expand(l.shape[0], K, *l.shape[1:]).clone() for l, u in bounds]


def split_dual(network: Network, region: Region, bounds: list, signs: list, C: torch.Tensor, alpha=None,
               beta=None, steps: int = 10, lr: float = 0.1, lr_beta: float = 0.05, budget=None) -> SplitBound:
    """Sound lower bounds of ``C f(x')`` over N subdomains (one batched dual call per step).

    region: N examples (the subdomains' input sets); bounds: root (l, u) per ReLU layer, (N, *shape);
    signs: split signs per layer, (N, *shape), in {−1, 0, +1}; C (N, K, n_out). alpha, beta: warm starts
    per layer (N, K, *shape) (default: α = u/(u−l), β = 0). Projected Adam on (α, β) for ``steps`` steps
    (α ∈ [0, 1], β ≥ 0 and 0 off the split units); every iterate is a sound bound and the best per row is
    kept. With ``steps=0`` only the start is evaluated. ``budget`` (a :class:`~polytope_lab.solvers.Budget`):
    stop early once it expires (the best iterate so far is returned; each is sound).
    """
    clipped = split_bounds([(l.detach(), u.detach()) for l, u in bounds], signs)
    N, K = C.shape[:2]
    rows = C.reshape(N, K, *network.affines[-1].out_shape)
    alpha = initial_alpha(clipped, K) if alpha is None else [a.detach().clone() for a in alpha]
    if beta is None:
        beta = [torch.zeros_like(a) for a in alpha]
    split_mask = [(s != 0).unsqueeze(1).to(C.dtype) for s in signs]
    beta = [(b.detach() * m).clone() for b, m in zip(beta, split_mask)]
    sign_t = [s.to(C.dtype) for s in signs]
    free = [t.requires_grad_(True) for t in alpha + beta]
    steps = steps if free else 0   # no ReLU layer: nothing to optimise
    opt = torch.optim.Adam([{"params": alpha, "lr": lr}, {"params": beta, "lr": lr_beta}]) if steps else None
    best, record = None, []
    for step in range(steps + 1):
        record = []
        with torch.enable_grad():
            splits = [(s, b) for s, b in zip(sign_t, beta)]
            J, _ = backward(network, region, clipped, rows, len(network.affines) - 1, alpha, splits=splits,
                            record=record)
            best = J.detach() if best is None else torch.maximum(best, J.detach())
            if step == steps or (budget is not None and budget.expired):
                break
            grads = torch.autograd.grad(-J.sum(), free)
        for t, g in zip(free, grads):
            t.grad = g
        opt.step()
        with torch.no_grad():
            for a in alpha:
                a.clamp_(0.0, 1.0)
            for b, m in zip(beta, split_mask):
                b.clamp_(min=0.0).mul_(m)
    hats = [h.detach() for h in reversed(record)]          # ω̂_1 (input), ω̂_2, …: record is top first
    return SplitBound(best, [a.detach() for a in alpha], [b.detach() for b in beta], hats[1:], hats[0])


def tightened_bounds(network: Network, region: Region, bounds: list, steps: int = 20, lr: float = 0.5,
                     budget=None, max_memory: float = 2 ** 32) -> list:
    """The root's intermediate bounds tightened layer by layer by optimised α, as the tight mode does
    (:func:`~.tight.optimized_bounds`: for each ReLU layer i ≥ 1 the rows ±e_j of its unstable units, from
    the better of fixed and adaptive α, as receptive-field patches below a conv chain, skips included),
    ``steps`` steps of lr ``lr``; the elementwise best of the old and new bounds (both sound) is kept.
    ``budget`` (``.expired``) stops it between steps: the bounds so far are sound. Fewer unstable units:
    fewer splits."""
    out = [(l.clone(), u.clone()) for l, u in bounds]
    for i in range(1, len(out)):
        if budget is not None and budget.expired:
            break
        mask = unstable(*out[i])
        if mask.any():
            out[i] = bound_units(network, region, out, i, mask, steps, lr, TIGHT_DECAY, max_memory, budget=budget)
    return out


__all__ = ["split_bounds", "split_dual", "initial_alpha", "tightened_bounds", "SplitBound"]

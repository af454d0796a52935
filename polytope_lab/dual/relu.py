"""The ReLU layers of the dual network (Wong & Kolter 2018, §3): the fixed slopes, the unstable units
``I = {j : l_j < 0 < u_j}`` and their terms ``Σ_{j∈I} l_j [ν_j]₊`` in the objective J (eq. 23)."""
from __future__ import annotations

from typing import NamedTuple

import torch


def relu_slopes(l: torch.Tensor, u: torch.Tensor):
    """The fixed dual slope ``d`` (eq. 27: 0 on I⁻, 1 on I⁺, u/(u−l) on I) and the mask of ``I``."""
    unstable = (l < 0) & (u > 0)
    d = (l >= 0).to(l.dtype)
    d = torch.where(unstable, u / torch.where(unstable, u - l, torch.ones_like(u)), d)
    return d, unstable


def adaptive_slopes(l: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """CROWN's lower slope: 1 on I where ``u ≥ −l`` (else 0), 1 on I⁺, 0 on I⁻; same shape as l."""
    unstable = (l < 0) & (u > 0)
    return torch.where(unstable, (u >= -l).to(l.dtype), (l >= 0).to(l.dtype))


def relu_terms(G: torch.Tensor, lI: torch.Tensor):
    """``(Σ_q lI_q [−G_q]₊, Σ_q lI_q [G_q]₊)``, each (B, n), over the columns q of G (B|1, n, q) with lI
    (B, q): the unstable units' terms of the lower and the upper bound (eq. 23's ``Σ_{j∈I} l_j [ν_j]₊``),
    from one clamp and two batched products (``[−a]₊ = [a]₊ − a``)."""
    lI = lI.unsqueeze(-1)                                                       # (B, q, 1)
    pos = torch.matmul(G.clamp(min=0), lI).squeeze(-1)
    return pos - torch.matmul(G, lI).squeeze(-1), pos


class LowerSlopeStep(torch.autograd.Function):
    """The ReLU step with lower slopes α: ``ω = s [ω̂]₊ + d [ω̂]₋`` with ``s = α`` on I and ``s = d``
    elsewhere (on I this is ``α[ω̂]₊ + d[ω̂]₋``, elsewhere ``d ω̂``), with its gradient in a few fused
    passes (the tight mode's inner loop is bound by these elementwise passes; masks are multiplied in,
    which is faster than ``where`` on the CPU). ``s = α·1_I + d·(1 − 1_I)`` is exact, so ω is exactly 0
    where α = 0 and ω̂ > 0: the kinks of the terms above then see ω = 0, not a rounding error of either
    sign. ω̂, α (B, m, …); d and the mask of I (bool or 0/1 floats) broadcastable to them."""

    @staticmethod
    def forward(ctx, omega_hat, alpha, d, unstable):
        mask = unstable.to(alpha.dtype)
        slope = torch.addcmul(d * (1 - mask), alpha, mask)
        ctx.save_for_backward(omega_hat, slope, d, mask)
        return torch.addcmul(d * omega_hat.clamp(max=0), slope, omega_hat.clamp(min=0))

    @staticmethod
    def backward(ctx, grad):
        omega_hat, slope, d, mask = ctx.saved_tensors
        positive = (omega_hat > 0).to(grad.dtype)
        grad_hat = grad * torch.addcmul(d, slope - d, positive) if ctx.needs_input_grad[0] else None
        grad_alpha = (grad * omega_hat.clamp(min=0)).mul_(mask) if ctx.needs_input_grad[1] else None
        return grad_hat, grad_alpha, None, None


def lower_slope_step(omega_hat, alpha, d, unstable):
    """``ω = α[ω̂]₊ + d[ω̂]₋`` on I, ``d ω̂`` elsewhere (:class:`LowerSlopeStep`; plain autograd when the
    slopes d themselves carry a gradient, e.g. a loss trained through the bounds)."""
    if d.requires_grad:
        return torch.where(unstable.bool(), alpha * omega_hat.clamp(min=0) + d * omega_hat.clamp(max=0), d * omega_hat)
    return LowerSlopeStep.apply(omega_hat, alpha, d, unstable)


def lower_slope_terms(omega_hat, alpha, d, unstable, lI):
    """(ω, lo): :func:`lower_slope_step` and its rows' ReLU terms ``Σ_{j∈I} l_j [−ω_j]₊`` (B, m), lI (B, n)
    the lower bounds on I (0 elsewhere). Without a gradient to track it takes the short way: on I
    ``[−ω]₊ = d[−ω̂]₊`` whatever α ≥ 0, so the terms are one product with ``[ω̂]₋``, which the step needs
    anyway (4 elementwise passes and 1 product instead of 5 and 2; the dual bound's inner loop)."""
    B, m = omega_hat.shape[:2]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (omega_hat, alpha, d)):
        omega = lower_slope_step(omega_hat, alpha, d, unstable)
        return omega, relu_terms(omega.reshape(B, m, -1), lI)[0]
    negative = omega_hat.clamp(max=0)
    omega = omega_hat.clamp(min=0).mul_(torch.where(unstable, alpha, d)).addcmul_(d, negative)  # in place: fewer pages
    weights = (lI * d.reshape(B, -1)).unsqueeze(-1)                             # (B, n, 1)
    return omega, -torch.matmul(negative.reshape(B, m, -1), weights).squeeze(-1)


def max_unstable(unstable: torch.Tensor) -> int:
    """The batch's largest number of unstable units, ``max_b |I_b|``, for ``unstable`` (B, n)."""
    return int(unstable.sum(1).max()) if unstable.shape[0] else 0


class UnstableUnits(NamedTuple):
    """The unstable units ``I`` of one ReLU layer, per example, padded to the batch maximum q:
    ``order`` (B, q) their indices (any index on padding), ``d`` (B, q) their slopes u/(u−l) and ``l``
    (B, q) their lower bounds, both 0 on padding (so padding adds nothing to any term)."""
    order: torch.Tensor
    d: torch.Tensor
    l: torch.Tensor


def unstable_units(d: torch.Tensor, unstable: torch.Tensor, l: torch.Tensor) -> UnstableUnits:
    """Gather ``I`` from the slopes ``d``, mask ``unstable`` and lower bounds ``l``, each (B, n)."""
    counts = unstable.sum(1)
    q = int(counts.max()) if unstable.shape[0] else 0
    order = torch.argsort(unstable.to(torch.int8), dim=1, descending=True, stable=True)[:, :q]
    valid = torch.arange(q, device=d.device)[None, :] < counts[:, None]        # (B, q)
    return UnstableUnits(order, torch.gather(d, 1, order) * valid, torch.gather(l, 1, order) * valid)


__all__ = ["relu_slopes", "adaptive_slopes", "relu_terms", "lower_slope_step", "lower_slope_terms", "max_unstable", "UnstableUnits", "unstable_units"]

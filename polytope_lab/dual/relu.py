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


def relu_terms(G: torch.Tensor, lI: torch.Tensor):
    """``(Σ_q lI_q [−G_q]₊, Σ_q lI_q [G_q]₊)``, each (B, n), over the columns q of G (B|1, n, q) with lI
    (B, q): the unstable units' terms of the lower and the upper bound (eq. 23's ``Σ_{j∈I} l_j [ν_j]₊``),
    from one clamp and two batched products (``[−a]₊ = [a]₊ − a``)."""
    lI = lI.unsqueeze(-1)                                                       # (B, q, 1)
    pos = torch.matmul(G.clamp(min=0), lI).squeeze(-1)
    return pos - torch.matmul(G, lI).squeeze(-1), pos


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


__all__ = ["relu_slopes", "relu_terms", "max_unstable", "UnstableUnits", "unstable_units"]

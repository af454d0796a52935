"""Random projections for the dual's ℓ1 (and L2) terms (Wong et al. 2018b, "Scaling provable adversarial
defenses"): for ``S = v R`` with k i.i.d. standard Cauchy columns R, each entry of S is Cauchy with scale
‖v‖₁, so the median of |S| estimates ‖v‖₁ from k numbers instead of one per coordinate of v; with
Gaussian R the root mean square estimates ‖v‖₂. Used by the dual's forward frontier (``proj=k``).
"""
from __future__ import annotations

import torch


def check_proj(proj):
    """``proj`` (None or a positive int, the number of random projections) or a ValueError."""
    if proj is not None and (isinstance(proj, bool) or not isinstance(proj, int) or proj < 1):
        raise ValueError(f"proj must be None or an integer >= 1 (the number of random projections), got {proj!r}")
    return proj


def random_matrix(kind: str, shape, generator, like: torch.Tensor) -> torch.Tensor:
    """I.i.d. standard Cauchy ("cauchy") or Gaussian ("gauss") entries, drawn on the CPU from ``generator``
    (torch's global generator when None), so that a seed gives the same draws on every device."""
    t = torch.empty(shape, dtype=torch.float64)
    if kind == "cauchy":
        t.cauchy_(generator=generator)
    else:
        t.normal_(generator=generator)
    return t.to(device=like.device, dtype=like.dtype)


def l1_estimate(S: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Median of ``|S|`` along ``dim`` (the mean of the two middle values for an even count): for ``S = v R``
    with i.i.d. standard Cauchy R, each entry is Cauchy with scale ‖v‖₁, and median |Cauchy(0, 1)| = 1."""
    a = S.abs()
    k = a.shape[dim]
    if k % 2:
        return a.kthvalue((k + 1) // 2, dim).values
    lower_half = a.topk(k // 2 + 1, dim, largest=False, sorted=False).values  # one selection, not two
    return lower_half.topk(2, dim).values.mean(dim)


def l2_estimate(S: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Root mean square of ``S`` along ``dim``: for ``S = v R`` with standard Gaussian R, E S² = ‖v‖₂²."""
    return S.square().mean(dim).sqrt()


__all__ = ["check_proj", "random_matrix", "l1_estimate", "l2_estimate"]

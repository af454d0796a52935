"""Random projections for the dual's ℓ1 (and L2) terms (Wong et al. 2018b, "Scaling provable adversarial
defenses"): for ``S = v R`` with k i.i.d. standard Cauchy columns R, each entry of S is Cauchy with scale
‖v‖₁, so the median of |S| estimates ‖v‖₁ from k numbers instead of one per coordinate of v; with
Gaussian R the root mean square estimates ‖v‖₂. Used by the dual's forward frontiers (``proj=k``):
the blocks they sketch are the input's columns (:func:`sketch_input`) and a ReLU layer's unstable units
(:func:`sketch_relu`), whose terms ``Σ_q l_q [a_q]₊ = ½ Σ_q l_q a_q − ½ ‖l ⊙ a‖₁`` (l < 0) split into a
linear half and an ℓ1 norm.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..regions import Box, L2Ball, Region


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


class InputSketch(NamedTuple):
    """k random combinations of the input coordinates: ``R`` (B|1, k, n_0), each coordinate weighted by
    its radius when the radius varies per coordinate (a clipped L∞ ball; then one sketch per example);
    ``scale`` (B,) the ball's ε still to be applied (None when already in R); ``kind`` "cauchy" (L∞,
    for ``ε‖ν̂_1‖₁``) or "gauss" (L2, for ``ε‖ν̂_1‖₂``)."""
    R: torch.Tensor
    scale: Optional[torch.Tensor]
    kind: str


def sketch_input(region: Region, n0: int, k: int, generator) -> InputSketch:
    """The sketch of the n_0 input columns (k combinations drawn from ``generator``) for a Box (LinfBall)
    or an L2Ball."""
    if not isinstance(region, (Box, L2Ball)):
        raise ValueError(f"random projections need a Box (LinfBall) or an L2Ball, got {type(region).__name__}")
    B = region.batch_size
    kind = "cauchy" if isinstance(region, Box) else "gauss"
    R = random_matrix(kind, (1, k, n0), generator, region.x)
    if isinstance(region, Box) and not region.cubic:   # per-coordinate radius
        return InputSketch(region.radius.reshape(B, 1, n0) * R, None, kind)
    return InputSketch(R, region.eps.reshape(B), kind)


def sketch_relu(d: torch.Tensor, unstable: torch.Tensor, l: torch.Tensor, k: int, generator):
    """A ReLU layer's unstable units as one projected block: ``w`` (B, n) = ½ l_q d_q on I (0 elsewhere),
    the columns' weights in the radius (and ``−w`` the linear half), and ``R`` (1, k, n) k standard
    Cauchy combinations of the units drawn from ``generator``."""
    w = torch.where(unstable, d * l, torch.zeros_like(l)) / 2
    return w, random_matrix("cauchy", (1, k, w.shape[1]), generator, w)


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


__all__ = ["check_proj", "random_matrix", "InputSketch", "sketch_input", "sketch_relu", "l1_estimate",
           "l2_estimate"]

"""Backward rows of the dual network (Wong & Kolter 2018, eqs. 22–23).

For rows c at the output ``ẑ_k`` of affine ``top``: ``ν_k = −c``, ``ν̂_i = W_iᵀ ν_{i+1}`` (eq. 22) and,
on a ReLU layer with bounds ``l ≤ ẑ_i ≤ u``, ``ν_i = 0`` on I⁻, ``ν̂_i`` on I⁺ and
``u/(u−l)[ν̂_i]₊ − α[ν̂_i]₋`` on I (0 ≤ α ≤ 1); then
``J = −Σ_i ν_{i+1}ᵀ b_i − xᵀν̂_1 − ε‖ν̂_1‖ + Σ_i Σ_{j∈I_i} l_j [ν_j]₊`` (eq. 23).
In code we propagate ``ω = −ν`` (``ω = c`` at the top): for fixed α this is the linearised network run
backwards, and it gives the lower and the upper bound of a row in one pass. A *frontier* (the forward
columns of Algorithm 1 at some layer s, ``frontier.py``) ends the pass early: its ``jump`` gives the
rest of J in one product.
"""
from __future__ import annotations

import torch

from .columns import basis
from .relu import lower_slope_terms, relu_slopes, relu_terms
from ..network import Network
from ..regions import Region


def _affine_step(network: Network, i: int, omega: torch.Tensor, J: torch.Tensor, incoming: dict):
    """Through affine i: ``J += ν_{i+1}ᵀ b_i`` and ``ν̂_i = W_iᵀ ν_{i+1}`` (in ω), returns (J, ω̂_i).

    Skip terms ``S_ij`` (Wong et al. 2018b, dense form): ``ν̂_j`` collects ``S_ijᵀ ν_{i+1}`` from every
    affine i that reads z_j (kept in ``incoming`` until layer j), and ``ν_{i+1}ᵀ b`` includes their biases.
    """
    B, m = omega.shape[:2]
    A = network.affines[i]
    J = J + torch.matmul(omega.reshape(B, m, -1), A.bias().reshape(-1))              # ν_{i+1}ᵀ b_i
    omega_hat = A.transpose(omega.reshape(B * m, *A.out_shape)).reshape(B, m, *A.in_shape)
    for j, S in network.skips_into(i):
        J = J + torch.matmul(omega.reshape(B, m, -1), S.bias().reshape(-1))
        back = S.transpose(omega.reshape(B * m, *S.out_shape)).reshape(B, m, -1)
        incoming[j] = back if j not in incoming else incoming[j] + back
    if i in incoming:                                                           # ν̂_i += Σ_{i'} S_{i'i}ᵀ ν_{i'+1}
        omega_hat = omega_hat + incoming.pop(i).reshape(omega_hat.shape)
    return J, omega_hat


def _relu_step(l: torch.Tensor, u: torch.Tensor, omega_hat: torch.Tensor, alpha=None):
    """Through a ReLU layer with bounds l, u (B, *shape): ``ν_i`` from ``ν̂_i`` (eq. 22, in ω) and its
    terms ``Σ_{j∈I} l_j [ν_j]₊`` for the rows and the negated rows, returns (ω_i, lo, up) (up None with
    an explicit alpha: the negated rows would need their own slopes).

    alpha: None for the fixed choice α = u/(u−l) (``ν_i = D_i ν̂_i``, eq. 26), else (B, m, *shape), or
    (B, 1, *shape) for one α shared by the rows."""
    B, m = omega_hat.shape[:2]
    shape = omega_hat.shape[2:]
    d, unstable = relu_slopes(l, u)
    lI = torch.where(unstable, l, torch.zeros_like(l)).reshape(B, -1)           # (B, n_i)
    d, unstable = (t.reshape(B, 1, *shape) for t in (d, unstable))              # (B, 1, *shape_i)
    if alpha is None:
        omega = d * omega_hat
        lo, up = relu_terms(omega.reshape(B, m, -1), lI)
        return omega, lo, up
    # ω = α[ω̂]₊ − u/(u−l)[ω̂]₋ on I, d ω̂ elsewhere; α per row, or (B, 1, …) shared
    omega, lo = lower_slope_terms(omega_hat, alpha.reshape(B, -1, *shape), d, unstable, lI)
    return omega, lo, None


def backward(network: Network, region: Region, bounds: list, rows, top: int, alpha=None,
             frontier=None, splits=None, record=None, first=None):
    """Bounds on ``rowsᵀ ẑ`` at the output of affine ``top`` from the dual network (eqs. 22–23).

    rows: (B, m, *out_shape of affine top). bounds: (l, u) of the ReLU layers below ``top``. alpha:
    None for the fixed choice α = u/(u−l), giving (lower, upper); or one tensor per ReLU layer below
    ``top``, (B, m, *shape), giving (lower, None). frontier: a forward frontier at some layer s ≤ top
    (sequential networks): the pass stops at layer s and takes the rest of the dual network (with the
    fixed α) from the frontier's columns.

    splits (branch and bound, :mod:`.splits`): one ``(s, β)`` or None per ReLU layer below ``top``, s the
    split signs (B, *shape) in {−1, 0, +1} and β ≥ 0 (B, m, *shape): the Lagrangian term ``−Σ β s ẑ`` of
    the split constraints ``s ẑ ≥ 0`` adds ``−β∘s`` to ω on those pre-activations (``+β∘s`` to ν) before
    ``ν̂ = Wᵀν``; lower bound only, no frontier. record: a list that receives ω̂_i of every affine i passed
    (top first, ω̂_1 on the input last), for branching scores and relaxation minimisers.

    first: (J, ω̂) (B, m), (B, m, *in_shape of affine top) of rows whose step through affine ``top`` is
    already taken (unit rows gather it, :func:`~.tight.unit_start`); ``rows`` is then None, and affine
    ``top`` must have no skip terms.
    """
    if first is not None and network.skips_into(top):
        raise ValueError("first: affine top has skip terms, which need the rows")
    B, m = (rows if first is None else first[1]).shape[:2]
    if splits is not None and (alpha is None or frontier is not None):
        raise ValueError("splits need an explicit alpha (lower bound only) and no frontier")
    if frontier is not None and frontier.layer == 0:
        frontier = None  # A_1's own transpose is cheaper than its dense columns
    stop = -1 if frontier is None else frontier.layer
    omega = rows  # ω = c = −ν at the top                                   # (B, m, *shape_top)
    ref = rows if first is None else first[1]
    J = ref.new_zeros(B, m)        # linear part: Σ ω_{i+1}ᵀ b_i (+ ω̂_1ᵀ x below)
    relu_lo = ref.new_zeros(B, m)  # Σ_{j∈I} l_j [ν_j]_+ for c
    relu_up = ref.new_zeros(B, m)  # the same for −c (fixed α only)
    incoming = {}
    for i in range(top, stop, -1):
        if first is not None and i == top:
            J, omega_hat = first
        else:
            J, omega_hat = _affine_step(network, i, omega, J, incoming)
        if record is not None:
            record.append(omega_hat)
        if i == 0:
            break
        omega, lo, up = _relu_step(*bounds[i - 1], omega_hat, None if alpha is None else alpha[i - 1])
        if splits is not None and splits[i - 1] is not None:
            s, beta = splits[i - 1]
            omega = omega - beta.reshape(omega.shape) * s.reshape(B, 1, *omega.shape[2:])
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


def unit_bounds(network: Network, region: Region, bounds: list, i: int, start: int = 0, count=None,
                frontier=None):
    """(l, u), each (B, count), of the pre-activations ``start … start+count−1`` (default: all) at the
    output of affine i: the rows ``e_j`` (eq. 22 with c = ±e_j) pushed back by :func:`backward`."""
    A, B = network.affines[i], region.batch_size
    count = A.out_features - start if count is None else count
    rows = basis(A.out_features, start, count, region.x.device, region.x.dtype).reshape(1, count, *A.out_shape)
    return backward(network, region, bounds, rows.expand(B, count, *A.out_shape), i, frontier=frontier)


def jump_frontier(frontier):
    """``frontier`` if the final objective may jump through it (``frontier.jumpable``: a sequential
    frontier without estimated terms, so J stays exact given the bounds), else None."""
    return frontier if frontier is not None and frontier.jumpable else None


def dual_objective(network: Network, region: Region, bounds: list, C: torch.Tensor, alpha=None, frontier=None):
    """``J`` (eq. 23): lower bound of ``C f(x')``, (B, m); with ``alpha=None`` also the upper bound.

    ``frontier`` (from :func:`~polytope_lab.dual.intermediate_bounds`) shortens the backward pass; with
    it, only the α of the ReLU layers above the frontier are used (those below keep the fixed choice). A
    frontier with estimated terms (``proj``) is not used: given the bounds, J is then computed exactly,
    to the input.
    """
    top = len(network.affines) - 1
    rows = C.reshape(C.shape[0], C.shape[1], *network.affines[-1].out_shape)
    return backward(network, region, bounds, rows, top, alpha, jump_frontier(frontier))


__all__ = ["backward", "unit_bounds", "jump_frontier", "dual_objective"]

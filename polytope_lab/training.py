"""Provably robust training objective (paper eq. 35)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .bounds import check_objective, margin_matrix
from .dual import dual_objective, intermediate_bounds
from .network import as_network
from .regions import LinfBall


def robust_loss(model, eps, X, y, clip=None, reduction="mean", region=None):
    """``(loss, robust_error)``: cross-entropy on ``−J(e_y − e_j)`` over j (eq. 34–35), differentiable in
    the model's parameters — a drop-in for ``nn.CrossEntropyLoss`` in a training loop.

    The row for j = y is 0 by construction, so the example is certified iff every other coordinate is
    negative; ``robust_error`` is the fraction (or, with ``reduction="none"``, the per-example flags) of
    examples not certified. ``region`` overrides the default ``LinfBall(X, eps, clip)`` (e.g. an L2Ball).
    """
    if region is None:
        region = LinfBall(X, eps, clip=clip)
    network = as_network(model, region.input_shape)
    if region.x.dtype != network.dtype:
        region = region.to(dtype=network.dtype)
    y = torch.as_tensor(y, device=region.x.device).long()
    n = network.output_size
    C = torch.eye(n, device=region.x.device, dtype=region.x.dtype)
    C = C[y].unsqueeze(1) - C.unsqueeze(0)                          # (B, n, n): rows e_y − e_j, row y = 0
    C = check_objective(C, network, region)
    bounds, frontier = intermediate_bounds(network, region, return_frontier=True)
    J, _ = dual_objective(network, region, bounds, C, frontier=frontier)
    f = -J                                                          # (B, n): f_j ≥ max (z_j − z_y)
    err = (f.scatter(1, y[:, None], float("-inf")) >= 0).any(1)     # some j ≠ y not provably below y
    loss = F.cross_entropy(f, y, reduction=reduction)
    if reduction == "none":
        return loss, err
    return loss, err.float().mean().item()


__all__ = ["robust_loss", "margin_matrix"]

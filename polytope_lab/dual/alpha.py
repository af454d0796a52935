"""Optimised dual slopes: any α ∈ [0, 1] on the unstable units gives a valid dual point (eq. 22), so
J(α) (eq. 23) is a sound lower bound for every α, and projected gradient ascent tightens it."""
from __future__ import annotations

import torch

from .backward import dual_objective, jump_frontier
from .relu import relu_slopes


def optimize_alpha(network, region, bounds, C, steps=20, lr=0.2, frontier=None, budget=None):
    """Projected gradient ascent on α ∈ [0,1] (one α per objective row); returns the best J seen.

    Starts from the fixed choice α = u/(u−l); every iterate is a valid dual point, so every J is a
    sound lower bound and the best one is kept per row. With a ``frontier`` only the ReLU layers above
    it are optimised (each step is then a short backward pass). ``budget`` (``.expired``) ends it early.
    """
    bounds = [(l.detach(), u.detach()) for l, u in bounds]
    m = C.shape[1]
    frontier = jump_frontier(frontier)
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
            if step == steps or opt is None or (budget is not None and budget.expired):
                break
            grads = torch.autograd.grad(-J.sum(), free)  # α only: never touches the model's .grad
        for a, g in zip(free, grads):
            a.grad = g
        opt.step()
        with torch.no_grad():
            for a in free:
                a.clamp_(0.0, 1.0)
    return best


__all__ = ["optimize_alpha"]

"""Gradient attacks: FGSM and PGD on the cross-entropy, and PGD on arbitrary objective rows ``C f``.

Attacks give *upper* bounds on a minimum (a point that is really in the region), the other side of the
sandwich from the certified lower bounds. They never leave the region: every iterate is projected.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .regions import Box, L2Ball, LinfBall, Region


def _logits(model, x):
    out = model(x)
    return out.reshape(out.shape[0], -1)


def _step(region: Region, x, grad, step_size):
    """One ascent step of size ``step_size`` ((B,), or (B, *shape) per coordinate for a sign step) in the
    region's geometry, then projection."""
    view = (-1,) + (1,) * (x.dim() - 1)
    step = step_size.reshape(view) if step_size.dim() == 1 else step_size
    if isinstance(region, L2Ball):
        norm = grad.reshape(grad.shape[0], -1).norm(dim=1).clamp(min=1e-12).reshape(view)
        x = x + step * grad / norm
    else:
        x = x + step * grad.sign()
    return region.project(x)


def _random_start(region: Region, generator=None):
    lo, hi = region.box()
    u = torch.rand(lo.shape, generator=generator, device=lo.device, dtype=lo.dtype)
    return region.project(lo + u * (hi - lo))


def _ascend(model, region, objective, steps, step_size, restarts, random_start, generator):
    """Maximise ``objective(logits)`` (B,) over the region; returns the best points and values."""
    x0 = region.x
    if step_size is None:   # a ball: 2.5·eps/steps; a general box: 2.5·radius/steps per coordinate
        scale = region.eps if isinstance(region, (LinfBall, L2Ball)) else region.radius
        step_size = scale * 2.5 / max(steps, 1)
    else:
        step_size = torch.as_tensor(step_size, dtype=x0.dtype, device=x0.device).expand(region.batch_size)
    best_x = x0.clone()
    with torch.no_grad():
        best_v = objective(_logits(model, x0))
    for _ in range(restarts):
        x = _random_start(region, generator) if random_start else x0.clone()
        for _ in range(steps + 1):
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                v = objective(_logits(model, x))
                grad, = torch.autograd.grad(v.sum(), x)   # input gradient only: the model's .grad is untouched
            better = v.detach() > best_v
            best_v = torch.where(better, v.detach(), best_v)
            best_x[better] = x.detach()[better]
            x = _step(region, x.detach(), grad, step_size)
    return best_x, best_v


def attack_region(X, eps, clip=None, norm="linf") -> Region:
    """The region an attack searches: ``X`` itself if it is a Region (then ``eps``, ``clip`` and ``norm``
    must be left unset), else ``LinfBall(X, eps, clip)`` or ``L2Ball(X, eps)``."""
    if isinstance(X, Region):
        if eps is not None or clip is not None or norm != "linf":
            raise ValueError("pass either a Region or X with eps (and clip/norm), not both: the region already "
                             f"fixes them ({X!r})")
        return X
    if eps is None:
        raise ValueError("eps is required when X is a tensor (or pass a LinfBall/L2Ball as X)")
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if norm == "l2" and clip is not None:
        raise ValueError("clip is only supported with norm='linf'")
    return LinfBall(X, eps, clip=clip) if norm == "linf" else L2Ball(X, eps)


def pgd(model, X, y, eps=None, steps=40, step_size=None, restarts=1, random_start=True, clip=None, norm="linf",
        targeted=None, seed=None):
    """Projected gradient attack on the cross-entropy; returns ``(X_adv, success)``.

    ``X`` with ``eps``: ``norm`` "linf" (sign steps, ``LinfBall(X, eps, clip)``) or "l2" (normalised steps,
    ``L2Ball``); or ``X`` a Region (Box, LinfBall, L2Ball) and no eps. ``step_size`` defaults to 2.5·eps/steps;
    ``targeted``: labels to reach (the loss towards them is minimised) instead of leaving ``y``.
    ``success[b]``: the attacked prediction differs from ``y[b]`` (untargeted) or equals ``targeted[b]``.
    The best point over steps and restarts is returned.
    """
    region = attack_region(X, eps, clip, norm)
    y = torch.as_tensor(y, device=region.x.device).long()
    target = None if targeted is None else torch.as_tensor(targeted, device=region.x.device).long()
    generator = None if seed is None else torch.Generator(device=region.x.device).manual_seed(seed)

    def objective(logits):
        if target is None:
            return F.cross_entropy(logits, y, reduction="none")
        return -F.cross_entropy(logits, target, reduction="none")

    x_adv, _ = _ascend(model, region, objective, steps, step_size, restarts, random_start, generator)
    with torch.no_grad():
        pred = _logits(model, x_adv).argmax(1)
    success = pred != y if target is None else pred == target
    return x_adv, success


def fgsm(model, X, y, eps=None, clip=None):
    """Fast gradient sign method (one full step of size eps, no random start); ``(X_adv, success)``.
    ``X`` with ``eps`` (and ``clip``), or ``X`` a LinfBall or a Box (from its centre, a step of its
    per-coordinate radius); the sign step is an L∞ attack."""
    region = attack_region(X, eps, clip)
    if not isinstance(region, Box):
        raise ValueError(f"FGSM takes a sign step, an L∞ attack: use pgd(..., norm='l2') for {type(region).__name__}")
    x = region.x.clone().requires_grad_(True)
    y = torch.as_tensor(y, device=x.device).long()
    with torch.enable_grad():
        loss = F.cross_entropy(_logits(model, x), y)
        grad, = torch.autograd.grad(loss, x)
    x_adv = _step(region, x.detach(), grad, region.eps if isinstance(region, LinfBall) else region.radius)
    with torch.no_grad():
        success = _logits(model, x_adv).argmax(1) != y
    return x_adv, success


def pgd_minimize(model, region: Region, C, steps=50, step_size=None, restarts=2, seed=0):
    """Smallest ``C f(x')`` found per row by PGD over ``region``: (values (B, m), points (B, m, *shape)).

    Every value is attained by a point in the region, so it is an upper bound on the true minimum.
    """
    if not isinstance(region, (Box, L2Ball)):
        raise ValueError(f"region must be a Box (LinfBall) or an L2Ball, got {type(region).__name__}")
    B = region.batch_size
    C = torch.as_tensor(C, dtype=region.x.dtype, device=region.x.device)
    if C.dim() == 2:
        C = C.expand(B, *C.shape)
    m = C.shape[1]
    rows = region.select(torch.arange(B, device=region.x.device).repeat_interleave(m))   # one problem per row
    c = C.reshape(B * m, -1)
    generator = torch.Generator(device=region.x.device).manual_seed(seed)
    points, values = _ascend(model, rows, lambda logits: -(logits * c).sum(1), steps, step_size, restarts,
                             True, generator)
    return -values.reshape(B, m), points.reshape(B, m, *region.input_shape)

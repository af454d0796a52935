"""Benchmark part i: skip connections, polytope_lab against the reference (convex_adversarial 0.4.4).

The same residual block in both libraries' containers (``models.DenseSequential``/``Dense`` and the
reference's ``DenseSequential``/``Dense``, sharing the modules, so the functions are identical; the
reference's own layout: ``conv, ReLU, Dense(conv), ReLU, Dense(identity, None, conv), ReLU, ...``). The
reference's lower bound on ``C f(x)`` is ``DualNetwork(net, X, ε)(C)`` (its J; ``robust_loss`` takes
``−J`` of the margins as logits):
  1. soundness on a small residual conv net (1×5×5 inputs in [−2, 2], ε = 0.3), where the MILP gives the
     exact minimum of every output: how far each library's dual lower bound lies above it (> 0: unsound),
     and how far apart the two libraries' bounds are;
  2. an MNIST-sized residual ConvNet (stride-2 first conv, 16×14×14 blocks, random weights, ε = 0.02,
     first test images): ms/image of the dual bound on the margins e_y − e_j, the largest difference of
     the two libraries' bounds, and the rows where PGD goes below a bound (sampling check);
  3. on that net, one provably robust training step (``robust_loss`` forward + backward) on a batch of
     ``--skip-batch`` images, exact and with ``proj=--proj`` random projections, both libraries.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

import polytope_lab as pl
from polytope_lab import checks, models

N_CLASSES = 10


DEFAULTS = dict(skip_images=20, skip_batch=10)
QUICK = dict(skip_images=4, skip_batch=2)
TOL = 1e-5  # PGD "below the bound": by more than checks.slack(value, TOL)


def add_arguments(parser):
    parser.add_settings(DEFAULTS, QUICK)
    parser.setting("--skip-images", type=int, help="part i: MNIST test images")
    parser.setting("--skip-batch", type=int,
                   help="part i: batch of the training steps (the exact step holds every forward column: "
                        "about 0.3 GiB per image)")


class _Flatten(nn.Module):
    """The reference's DualNetwork recognises a module named Flatten."""

    def forward(self, x):
        return x.reshape(x.shape[0], -1)


def residual_pair(channels, in_shape, n_out, ca, seed, stride=1):
    """(ours, reference or None): conv(stride)-ReLU, then a residual block over two convs, then Linear."""
    torch.manual_seed(seed)
    c_in, h, w = in_shape
    k = 4 if stride == 2 else 3  # the paper's Conv(4, stride 2, padding 1): 28 → 14, as the reference needs
    c1 = nn.Conv2d(c_in, channels, k, stride=stride, padding=1)
    h, w = (h + 2 - k) // stride + 1, (w + 2 - k) // stride + 1
    c2, c3 = nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 3, padding=1)
    fc = nn.Linear(channels * h * w, n_out)
    ours = models.DenseSequential(c1, nn.ReLU(), c2, nn.ReLU(), models.Dense(nn.Identity(), None, c3), nn.ReLU(),
                                  nn.Flatten(), fc).eval()
    ref = None if ca is None else ca.DenseSequential(c1, nn.ReLU(), ca.Dense(c2), nn.ReLU(),
                                                     ca.Dense(nn.Sequential(), None, c3), nn.ReLU(), _Flatten(),
                                                     fc).eval()
    return ours, ref


def _soundness(ca):
    ours, ref = residual_pair(2, (1, 5, 5), 3, ca, seed=0)
    ours, ref = ours.double(), None if ref is None else ref.double()
    X = 4 * torch.rand(3, 1, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 2
    C = torch.eye(3, dtype=torch.float64).expand(3, 3, 3)
    region = pl.LinfBall(X, 0.3)
    exact = pl.Bounder.create("milp", threads=1).bound(ours, region, C)
    with torch.no_grad():
        lowers = {"polytope_lab": pl.Bounder.create("dual").bound(ours, region, C).lower}
        if ref is not None:
            lowers["convex_adversarial"] = ca.DualNetwork(ref, X, 0.3)(C)
    above = {k: (v - exact.lower).max().item() for k, v in lowers.items()}
    return [{"part": "i", "quantity": "skip net 1×5×5: max (dual lower − exact MILP minimum), 9 rows",
             **above, "note": f"> 0 means the bound is unsound; MILP statuses {sorted(set(exact.status))}; "
                              f"residual conv block, ε = 0.3{_agreement(lowers)}"}]


def _agreement(lowers):
    """Note fragment: the largest difference between the two libraries' lower bounds."""
    if len(lowers) < 2:
        return "; convex_adversarial not installed: reference skipped"
    return f"; max |ours − reference| {(lowers['polytope_lab'] - lowers['convex_adversarial']).abs().max().item():.2g}"


def _speed(X, y, args, ca):
    ours, ref = residual_pair(16, (1, 28, 28), N_CLASSES, ca, seed=2, stride=2)
    X, y = X[:args.skip_images].reshape(-1, 1, 28, 28), y[:args.skip_images]
    eps, C = 0.02, pl.margin_matrix(y, N_CLASSES)
    fns = {"polytope_lab": lambda: pl.Bounder.create("dual").bound(ours, pl.LinfBall(X, eps), C).lower}
    if ref is not None:
        fns["convex_adversarial"] = lambda: ca.DualNetwork(ref, X, eps)(C)
    seconds, lowers = {}, {}
    with torch.no_grad():
        for name, fn in fns.items():
            start = time.perf_counter()
            lowers[name] = fn()
            seconds[name] = time.perf_counter() - start
    attack = pl.pgd_minimize(ours, pl.LinfBall(X, eps), C, steps=40)[0].detach()
    rows = [{"part": "i", "quantity": f"residual ConvNet 1×28×28 → 16×14×14, dual bound ms/image "
                                      f"({len(y)} images, ε = {eps})",
             **{k: 1000 * v / len(y) for k, v in seconds.items()},
             "note": "ours: forward columns kept at every layer a skip reads; one timed call each"
                     + _agreement(lowers)}]
    if ref is not None:
        rows[0]["reference / ours"] = seconds["convex_adversarial"] / seconds["polytope_lab"]
    rows.append({"part": "i", "quantity": "residual ConvNet: margin rows where PGD goes below the bound",
                 **{k: int((checks.above(v, attack, TOL) > 0).sum()) for k, v in lowers.items()},
                 "note": f"of {C.shape[0] * C.shape[1]} rows; PGD 40 steps, 2 restarts per row (pgd_minimize)"})
    return rows


def _training(X, y, args, ca):
    """Seconds of one robust_loss forward + backward on the residual ConvNet, exact and projected, after a
    warm-up call (the weights are not updated: every call sees the same net and batch)."""
    ours, ref = residual_pair(16, (1, 28, 28), N_CLASSES, ca, seed=2, stride=2)
    B, k, eps = args.skip_batch, args.proj, 0.02
    X, y = X[:B].reshape(-1, 1, 28, 28), y[:B]
    generator = torch.Generator().manual_seed(args.seed)
    steps = {("polytope_lab", "exact"): lambda: pl.robust_loss(ours, eps, X, y),
             ("polytope_lab", "proj"): lambda: pl.robust_loss(ours, eps, X, y, proj=k, generator=generator)}
    if ref is not None:
        steps["convex_adversarial", "exact"] = lambda: ca.robust_loss(ref, eps, X, y)
        steps["convex_adversarial", "proj"] = lambda: ca.robust_loss(ref, eps, X, y, proj=k, norm_type="l1_median")
    seconds, losses = {}, {}
    for key, step in steps.items():
        for _ in range(2):  # the first call warms up
            start = time.perf_counter()
            loss, _ = step()
            loss.backward()
            seconds[key], losses[key] = time.perf_counter() - start, loss.item()
    rows = []
    for variant, name in (("exact", "exact"), ("proj", f"proj={k}")):
        values = {who: seconds[who, variant] for who in ("polytope_lab", "convex_adversarial") if (who, variant) in seconds}
        row = {"part": "i", "quantity": f"residual ConvNet: robust_loss fwd+bwd ({name}), s (batch {B}, ε = {eps})",
               **values, "note": f"one timed call after a warm-up; loss {losses['polytope_lab', variant]:.4g} (ours)"}
        if ref is not None:
            row["reference / ours"] = values["convex_adversarial"] / values["polytope_lab"]
            row["note"] += f", {losses['convex_adversarial', variant]:.4g} (reference)"
        rows.append(row)
    rows.append({"part": "i", "quantity": f"residual ConvNet: robust_loss speed-up with proj={k} (exact / projected)",
                 **{who: seconds[who, "exact"] / seconds[who, "proj"]
                    for who in ("polytope_lab", "convex_adversarial") if (who, "proj") in seconds},
                 "note": f"batch {B}; the exact loss holds every forward column (about 0.3 GiB per image)"})
    return rows


def part_i(X, y, args, ca=None):
    return _soundness(ca) + _speed(X, y, args, ca) + _training(X, y, args, ca)

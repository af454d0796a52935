"""Benchmark part k: tighter dual bounds (intermediate slopes, tight mode) on the fixed networks of
``--bench-nets`` (``toy`` 2-100⁴-2 at ε 0.05/0.1/0.25, ``conv`` at ε 0.01/0.05/0.1, L∞, not clipped):
per row and option the mean width (upper − lower over points × outputs, float32) and the whole-batch
seconds (median of ``--tight-reps``; the non-optimised options interleaved and repeated up to
``MAX_FAST_REPS`` times, :func:`timed_side_by_side`), the LP with the same intermediate bounds, on ``toy`` LP-ALL (every
intermediate bound by its own LP: the convex-relaxation barrier), and the peers' figures from
``peer_widths.json`` (stored, not re-measured). Then the pretrained ConvNet on the first ``--tight-images``
test images at ε = 0.1: certified count and ms/image per option.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time

import torch
import torch.nn as nn

import polytope_lab as pl
from polytope_lab.dual import FINAL_ALPHA_ONLY

from .cli import time_interleaved

STORED = "stored, not re-measured"
OPTIONS = {  # label: DualBounder options
    "dual fixed": {},
    "dual optimized (final α only)": FINAL_ALPHA_ONLY,
    "dual adaptive slopes": dict(slopes="adaptive"),
    "dual best slopes": dict(slopes="best"),
    "dual optimized, best slopes, final α only": dict(alpha="optimized", optimize_intermediate=False),
    "tight mode (alpha='optimized')": dict(alpha="optimized"),
}
ROWS = [("toy", 0.05), ("toy", 0.1), ("toy", 0.25), ("conv", 0.01), ("conv", 0.05), ("conv", 0.1)]
DEFAULTS = dict(tight_reps=3, tight_images=200)
MAX_FAST_REPS = 101  # at most this many interleaved calls of each non-optimised option
QUICK = dict(tight_reps=1, tight_images=20)


def add_arguments(parser):
    parser.add_settings(DEFAULTS, QUICK)
    parser.add_argument("--bench-nets", default=None, help="part k: folder of the fixed networks "
                                                          "(toy.json/.pt, conv.*, peer_widths.json)")
    parser.setting("--tight-reps", type=int, help="part k: timed repetitions per measurement (median)")
    parser.setting("--tight-images", type=int, help="part k: ConvNet test images (0: skip the ConvNet)")
    parser.add_argument("--tight-nets", default="toy,conv", help="part k: bench nets to measure (comma-separated)")
    parser.add_argument("--tight-conv-lp", action="store_true",
                        help="part k: the LP rows on conv too (minutes per point; default: toy only)")


def build(layers):
    """nn.Sequential from the bench net's layer list."""
    mods = []
    for spec in layers:
        kind = spec["type"]
        if kind == "Linear":
            mods.append(nn.Linear(spec["in"], spec["out"]))
        elif kind == "Conv2d":
            mods.append(nn.Conv2d(spec["in_channels"], spec["out_channels"], spec["kernel_size"],
                                  stride=spec["stride"], padding=spec["padding"]))
        elif kind == "ReLU":
            mods.append(nn.ReLU())
        elif kind == "Flatten":
            mods.append(nn.Flatten())
        else:
            raise ValueError(f"unknown layer type {kind!r}")
    return nn.Sequential(*mods)


def load_net(folder, name):
    """(model, inputs) of bench net ``name`` in ``folder``, float32."""
    with open(os.path.join(folder, f"{name}.json")) as f:
        spec = json.load(f)
    model = build(spec["layers"])
    model.load_state_dict(torch.load(os.path.join(folder, f"{name}.pt")))
    return model.eval().float(), torch.load(os.path.join(folder, f"{name}_inputs.pt")).float()


def timed(fn, reps):
    """(result, median seconds) of ``reps`` calls after one warm-up (``reps`` 0: the one call, timed)."""
    start = time.perf_counter()
    out = fn()
    times = [time.perf_counter() - start] if reps == 0 else []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def timed_side_by_side(fns: dict, reps: int, budget: float = 2.0):
    """{label: (result, median seconds)} of the calls ``fns`` interleaved (:func:`time_interleaved`), with at
    least ``reps`` repetitions and as many more (at most ``MAX_FAST_REPS``) as fit in about ``budget``
    seconds per call: the non-optimised toy bounds take a few ms, where 3 repetitions leave their ratios
    ±50% apart from run to run."""
    slowest = max(timed(fn, 0)[1] for fn in fns.values())          # also the warm-up
    n = max(reps, min(MAX_FAST_REPS, math.ceil(budget / max(slowest, 1e-9))))
    out = time_interleaved({label: (lambda k, fn=fn: fn()) for label, fn in fns.items()}, 1, reps=n, warmup=False)
    return {label: (results[0], total) for label, (results, total) in out.items()}, n


def width(b):
    return float((b.upper - b.lower).mean())


def measure_row(model, X, eps, reps, options=OPTIONS, lp_all=False, lp=True):
    """{label: (width, seconds, bounds, how timed)} for every option (the non-optimised ones side by side,
    :func:`timed_side_by_side`), the LP over each variant's intermediate bounds ("LP | label"), and LP-ALL
    when asked."""
    region = pl.LinfBall(X, eps)
    bounders = {label: pl.Bounder.create("dual", **opts) for label, opts in options.items()}
    fast = {label: (lambda b=b: b.bound(model, region)) for label, b in bounders.items() if b.alpha == "fixed"}
    timings, fast_reps = timed_side_by_side(fast, reps) if fast else ({}, 0)
    how = f"median of {reps} whole-batch calls" if reps else "one whole-batch call"
    out = {}
    for label, bounder in bounders.items():
        if label in fast:
            out[label] = (width(timings[label][0]), timings[label][1], timings[label][0],
                          f"median of {fast_reps} whole-batch calls, interleaved with the other non-optimised options")
        else:
            b, s = timed(lambda: bounder.bound(model, region), reps)
            out[label] = (width(b), s, b, how)
    for label in ("dual fixed", "tight mode (alpha='optimized')"):
        if lp and label in out:
            lp = pl.Bounder.create("lp", intermediate=pl.Bounder.create("dual", **options[label]))
            b, s = timed(lambda: lp.bound(model, region), 0)
            out[f"LP | {label}"] = (width(b), s, b, "LP rows: one call, not repeated")
    if lp_all:
        b, s = timed(lambda: pl.Bounder.create("lp", intermediate="lp").bound(model, region), 0)
        out["LP-ALL"] = (width(b), s, b, "LP rows: one call, not repeated")
    return out


def part_k(args, model=None, X=None, y=None):
    """Rows of part k (see the module docstring)."""
    if args.bench_nets is None:
        raise SystemExit("part k needs --bench-nets DIR (../shared/bench_nets)")
    with open(os.path.join(args.bench_nets, "peer_widths.json")) as f:
        peers = json.load(f)
    rows = []
    nets = args.tight_nets.split(",")
    for name, eps in [(n, e) for n, e in ROWS if n in nets]:
        net, pts = load_net(args.bench_nets, name)
        peer = peers[f"{name}_{eps}"]
        ac_w, ac_s = peer["mean_width"]["alpha_crown"], peer["seconds_whole_batch_2_threads"]["alpha_crown"]
        res = measure_row(net, pts, eps, args.tight_reps, lp_all=name == "toy",
                          lp=name == "toy" or args.tight_conv_lp)
        for label, (w, s, _, how) in res.items():
            rows.append({"part": "k", "quantity": f"{name} ε={eps}: {label}", "polytope_lab": w, "seconds": s,
                         "width / α-CROWN": w / ac_w, "time / α-CROWN": s / ac_s, "note": f"mean width; {how}"})
        for peer_name in ("wong_kolter_dual", "crown", "alpha_crown", "pgd_inner"):
            rows.append({"part": "k", "quantity": f"{name} ε={eps}: {peer_name} ({STORED})",
                         "polytope_lab": None, STORED: peer["mean_width"][peer_name],
                         "seconds": peer["seconds_whole_batch_2_threads"].get(peer_name)})
    if model is not None and args.tight_images > 0:
        rows += convnet_rows(model, X, y, args)
    return rows


def convnet_rows(model, X, y, args, eps=0.1):
    """Certified count and ms/image per option on the first ``--tight-images`` test images."""
    n = args.tight_images
    Xn, yn = X[:n], y[:n]
    C = pl.margin_matrix(yn, 10)
    rows = []
    for label, opts in OPTIONS.items():
        bounder = pl.Bounder.create("dual", max_memory=2 ** 31, **opts)
        start = time.perf_counter()
        certified = 0
        for k in range(0, n, 50):
            certified += int(bounder.bound(model, pl.LinfBall(Xn[k:k + 50], eps), C[k:k + 50]).certified.sum())
        ms = 1000 * (time.perf_counter() - start) / n
        rows.append({"part": "k", "quantity": f"ConvNet ε={eps}: {label}: certified / {n}", "polytope_lab": certified,
                     "seconds": ms / 1000 * n, "note": f"{ms:.1f} ms/image, batches of 50"})
    return rows


__all__ = ["part_k", "load_net", "measure_row", "timed_side_by_side", "OPTIONS", "ROWS", "MAX_FAST_REPS", "convnet_rows"]

"""Benchmark parts e and f: the exact referees (MILP, LP) on MNIST, ε = 0.1, ball ∩ [0, 1].

  e. MILP robustness verdicts (``MILPBounder.certify``, one image per call, the whole call timed —
     intermediate bounds included) on the first ``--milp-images`` test images, per solver: median and
     90th-percentile seconds per image, the fraction settled within ``--milp-time-limit`` seconds, and the
     exact adversarial error (counterexamples verified by running the network; unsettled images widen it
     to a range). Per-image verdicts go to the result store (``<out>/results.sqlite``, table
     ``milp_per_image``) as they are computed, and to ``<out>/milp_per_image.csv``; a rerun with ``--resume``
     keeps the verdicts already stored.
  f. LP of the convex outer polytope (eq. 15, HiGHS) against the dual bound with optimised α on the same
     intermediate bounds: seconds per example and the gap of the margin lower bounds, for the ConvNet and
     for an MLP trained here (checkpointed under ``<out>``).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import polytope_lab as pl
from polytope_lab.dual import FINAL_ALPHA_ONLY
from polytope_lab.evaluation import certify_each

from .cli import result_store
from .trained import robust_mlp

CLIP = (0.0, 1.0)
SETTLED = ("certified", "counterexample")
MIPVERIFY = "MIPVerify (Gurobi, 8 CPUs): mean 3.52 s/image; exact adversarial error 4.38% on the full test set"
MLP_SIZES = [784, 100, 100, 10]
PER_IMAGE = ["solver", "image", "label", "status", "seconds", "margin", "counterexample_margin"]
DEFAULTS = dict(milp_images=100, milp_solvers=["HIGHS", "CBC"], milp_time_limit=120.0, lp_images=10,
                mlp_images=10_000, mlp_epochs=2)
QUICK = dict(milp_images=3, milp_solvers=["HIGHS"], lp_images=1, mlp_images=1_000, mlp_epochs=1)


def add_arguments(parser):
    parser.add_settings(DEFAULTS, QUICK)
    parser.setting("--milp-images", type=int, help="part e: first N test images")
    parser.setting("--milp-solvers", nargs="+", help="part e: MILP solvers")
    parser.setting("--milp-time-limit", type=float,
                   help="part e: MILP seconds per image (all its margins together); an image is settled "
                        "when certified or refuted")
    parser.setting("--lp-images", type=int, help="part f: test images per network")
    parser.setting("--mlp-images", type=int, help="part f: training images of the MLP trained here")
    parser.setting("--mlp-epochs", type=int, help="part f: epochs of the MLP trained here")
    parser.add_argument("--milp-every-margin", action="store_true",
                        help="part e: also time the first solver deciding every margin by MILP (no dual shortcut)")
    parser.add_argument("--resume", action="store_true", help="part e: keep the per-image verdicts already stored")


def milp_per_image(model, X, y, eps, solver, args, store, trust_dual=True) -> list:
    """Certify the images one by one with ``solver`` (each verdict stored as soon as it is made; those
    already stored are kept); the rows. ``trust_dual=False``: every margin is decided by the MILP, none
    skipped on the dual's certificate."""
    bounder = pl.Bounder.create("milp", solver=solver, threads=args.threads, time_limit=args.milp_time_limit)
    label = solver if trust_dual else f"{solver}, every margin"
    records = certify_each(bounder, model, X, y, eps, clip=CLIP, store=store, prefix=(label,), progress=True,
                           trust_dual=trust_dual)
    return [{"solver": label, **r} for r in records]


def part_e(model, X, y, eps, args):
    """MILP verdicts on the first ``--milp-images`` images, per solver."""
    X, y = X[:args.milp_images], y[:args.milp_images]
    n = len(X)
    store = result_store(args.out, "milp_per_image")
    if not args.resume:
        store.clear()
    labels, verdicts = list(args.milp_solvers), []
    for solver in args.milp_solvers:
        verdicts += milp_per_image(model, X, y, eps, solver, args, store)
    if args.milp_every_margin:
        verdicts += milp_per_image(model, X, y, eps, args.milp_solvers[0], args, store, trust_dual=False)
        labels.append(f"{args.milp_solvers[0]}, every margin")
    store.close()
    table = pd.DataFrame(verdicts, columns=PER_IMAGE)
    table.to_csv(Path(args.out) / "milp_per_image.csv", index=False)
    with torch.no_grad():
        dual = pl.Bounder.create("dual").bound(model, pl.LinfBall(X, eps, clip=CLIP), pl.margin_matrix(y, 10))
    dual_err = int((~dual.certified).sum())
    needs_milp = set(torch.nonzero(~dual.certified).flatten().tolist())  # images the dual leaves open
    rows = []
    for solver in labels:
        t = table[(table["solver"] == solver) & (table["image"] < n)]
        secs = t["seconds"].tolist()
        hard = t[t["image"].isin(needs_milp)]["seconds"].tolist()
        settled = t["status"].isin(SETTLED) & (t["seconds"] <= args.milp_time_limit)
        refuted = int((t["status"] == "counterexample").sum())
        open_ = int((~t["status"].isin(SETTLED)).sum())
        what = f"MILP {solver}, {args.threads} thread(s)"
        err = f"{refuted}/{n}" + (f" to {refuted + open_}/{n} ({open_} unsettled)" if open_ else "")
        rows += [
            {"part": "e", "quantity": f"{what}: median s/image (first {n}, ε={eps} ∩ [0,1])",
             "polytope_lab": statistics.median(secs), "note": "target ≤ 3.5 s; " + MIPVERIFY},
            {"part": "e", "quantity": f"{what}: 90th percentile s/image",
             "polytope_lab": float(np.percentile(secs, 90)),
             "note": f"mean {statistics.fmean(secs):.3g} s, max {max(secs):.3g} s"},
            {"part": "e", "quantity": f"{what}: median s/image on the images the dual bound leaves open",
             "polytope_lab": statistics.median(hard) if hard else float("nan"),
             "note": f"{len(hard)} of {n} images are not certified by the dual bound (the others need no MILP "
                     f"solve unless every margin is asked for); max {max(hard, default=float('nan')):.3g} s"},
            {"part": "e", "quantity": f"{what}: fraction settled within {args.milp_time_limit:g} s",
             "polytope_lab": float(settled.mean()), "note": "certified, or a counterexample checked on the network"},
            {"part": "e", "quantity": f"{what}: exact adversarial error",
             "polytope_lab": refuted / n, "note": f"{err}; dual bound leaves {dual_err}/{n} uncertified; "
                                                    f"clean misclassifications count as counterexamples"},
        ]
    return rows


def trained_mlp(X_train, y_train, eps, args):
    """A 784-100-100-10 MLP robustly trained here on the first ``--mlp-images`` images for ``--mlp-epochs``
    (ε warm-up over the first epoch), checkpointed in --out: a rerun resumes or reuses it."""
    n, epochs = args.mlp_images, args.mlp_epochs
    net, _ = robust_mlp(X_train[:n], y_train[:n], MLP_SIZES, eps=eps, epochs=epochs, clip=CLIP, seed=args.seed,
                        directory=Path(args.out) / f"mlp_{n}_images_{epochs}_epochs")
    return net


def part_f(networks: dict, eps, args):
    """LP vs dual (fixed and optimised α) per network on the first ``--lp-images`` images, one at a time."""
    backends = {"dual": pl.Bounder.create("dual"), "dual-optimized": pl.Bounder.create("dual", **FINAL_ALPHA_ONLY),
                "lp": pl.Bounder.create("lp")}
    rows = []
    for name, (model, X, y) in networks.items():
        X, y = X[:args.lp_images], y[:args.lp_images]
        lower, seconds = {k: [] for k in backends}, {k: 0.0 for k in backends}
        for i in tqdm(range(len(X)), desc=f"f: LP vs dual, {name}", leave=False):
            region, C = pl.LinfBall(X[i:i + 1], eps, clip=CLIP), pl.margin_matrix(y[i:i + 1], 10)
            for k, bounder in backends.items():
                start = time.perf_counter()
                b = bounder.bound(model, region, C)
                seconds[k] += time.perf_counter() - start
                lower[k].append(b.lower.detach().double().reshape(-1))
        lo = {k: torch.cat(v) for k, v in lower.items()}
        n = len(X)
        for k in backends:
            rows.append({"part": "f", "quantity": f"{name}: {k}, s/example (lower and upper of 9 margins)",
                         "polytope_lab": seconds[k] / n, "note": f"first {n} test images, ε={eps} ∩ [0,1]"})
        for k in ("dual", "dual-optimized"):
            gap = lo["lp"] - lo[k]
            rows.append({"part": "f", "quantity": f"{name}: LP − {k} margin lower bound, mean (max)",
                         "polytope_lab": gap.mean().item(),
                         "note": f"max {gap.max().item():.3g}, min {gap.min().item():.3g}; same intermediate "
                                 f"bounds; certified: LP {int((lo['lp'].reshape(n, -1) > 0).all(1).sum())}, "
                                 f"{k} {int((lo[k].reshape(n, -1) > 0).all(1).sum())} of {n}"})
    return rows

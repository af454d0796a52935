"""Tightness of the bounds: interval, dual, optimised dual, LP and exact MILP on the same problems.

    python -m experiments.tightness --eps 0.05 0.1 0.25      # part A; part B's MLP when MNIST is found
    python -m experiments.tightness --model ../shared/models/wong_kolter_mnist_eps0.1.pth --data-dir ../shared/data
    python -m experiments.tightness --quick                  # seconds: small networks (CI)

A. The paper's random 2-D network (§4.1, eqs. 36–37): a 2-100-100-100-100-2 MLP with weights N(0, std
   1/√fan_in) and biases N(0, 1), and a centre x₀ ~ U[0, 1]² (the paper does not give its x₀; both come
   from ``--seed``), L∞ ball of radius ε, not clipped. For each ε and output coordinate, the range
   [lower, upper] that each method gives: "milp" (exact: the true range), "lp" (the convex relaxation,
   eq. 15, with the dual's intermediate bounds), "dual-optimized" (α optimised in the final objective,
   same intermediate bounds), "dual" (Algorithm 1) and "interval" (naive layerwise bounds, eq. 37), plus
   "grid": the attained range on a dense grid of the box (an inner estimate that checks the MILP).
B. MNIST (test images 0…--samples−1, L∞ ball ∩ [0, 1]): the pretrained ConvNet (``--model``) and a
   784-100-100-10 MLP trained here with the provable objective (checkpointed in ``--out``). For image i
   with label y and method M, the *margin lower bound* is ``min_{j≠y} L_M(i, j)``, where ``L_M(i, j)`` is
   M's lower bound of ``min_{x'} f_y(x') − f_j(x')`` over the ball; the image is certified iff it is > 0.
   The table gives its mean over the images, the certified fraction and seconds per image. The MILP
   (``--milp-mode certify``, the default) only decides the sign of each margin: it gives the exact
   verdict (certified / counterexample) and no margin; ``--milp-mode bound`` solves the margins exactly.
   ``--exact bab``: the exact column (still labelled "milp") by branch and bound (``Bounder "bab"``, ReLU
   splits, the same time limit) instead of the MILP; ``settings.json`` records which.

Checks ("check" column), per coordinate or image, each method against the next tighter one present:
interval ⊇ dual ⊇ dual-optimized ⊇ lp ⊇ milp ⊇ grid within ``--tol`` (relative). dual ⊇ dual-optimized
(the optimiser starts at the fixed α and keeps the best), dual-optimized ⊇ lp (weak duality, same
intermediate bounds) and lp ⊇ milp ⊇ grid are theorems up to the LP solver's tolerance; interval ⊇ dual is
observed, not guaranteed. In part B: every sound "certified" must agree with the MILP (no counterexample).

Outputs in ``--out``: ``random_net.csv/.md/.json`` (part A), ``mnist_images.csv`` (part B per image),
``mnist.csv/.md/.json`` (part B summary), ``random_net.png``, ``mnist_certified.png``, the MLP's
checkpoint and training log, ``settings.json``. Rows go to the result store (``results.sqlite``, tables
``random_net`` and ``mnist_images``) as they are computed; a rerun skips rows already there (``--overwrite``
recomputes). ``--budget`` caps the seconds spent per (network, ε,
method) in part B: images after it are skipped and the table's ``images`` column says how many ran. An
LP solve that hits ``--lp-time-limit`` keeps the dual's bound for that row (status "user_limit"), and the
LP's remaining images at that and larger ε are skipped (on the ConvNet at ε = 0.25 the LP of one image
ran 14 minutes without finishing).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import matplotlib
import matplotlib.lines
import matplotlib.patches
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import polytope_lab as pl
from polytope_lab import checks, data, models, polytopes

from .cli import ExperimentParser, result_store, to_markdown, torch_threads, write_table
from .trained import robust_mlp

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: loosest to tightest: each method's range should contain the next one's
METHODS = ["interval", "dual", "dual-optimized", "lp", "milp"]
BATCHED = {"interval", "dual", "dual-optimized"}  # run on all images at once (solvers: one image per call)
CLIP = (0.0, 1.0)
EXACT = ("optimal", "certified", "counterexample")  # solver statuses of an exact answer
TIME_LIMIT = ("time_limit", "user_limit")           # an LP stopped at --lp-time-limit
N_CLASSES = 10
A_COLUMNS = ["eps", "coordinate", "method", "lower", "upper", "width", "width / true width", "seconds", "status",
             "check"]
IMAGE_COLUMNS = ["network", "eps", "method", "image", "label", "margin lower bound", "certified", "status",
                 "seconds"]
B_COLUMNS = ["network", "eps", "method", "images", "mean margin lower bound", "certified fraction",
             "seconds per image", "statuses", "check"]
COLORS = {"interval": "tab:gray", "dual": "tab:blue", "dual-optimized": "tab:cyan", "lp": "tab:green",
          "milp": "tab:red", "grid": "black"}

#: hollow markers of decreasing size, so that coinciding lines stay visible
MARKERS = {"interval": dict(marker="s", ms=7), "dual": dict(marker="o", ms=11, mfc="none"),
           "dual-optimized": dict(marker="D", ms=8, mfc="none", ls="--"), "lp": dict(marker="^", ms=5, ls=":"),
           "milp": dict(marker="*", ms=15, mfc="none", lw=2.5, alpha=0.7)}
DEFAULTS = dict(sizes=[2, 100, 100, 100, 100, 2], grid=401, samples=20, mlp_sizes=[784, 100, 100, 10],
                mlp_images=10_000, mlp_epochs=2, mlp_eps=0.1, mlp_warmup=1, budget=600.0, milp_time_limit=60.0,
                lp_time_limit=5.0)
QUICK = dict(sizes=[2, 20, 20, 20, 2], grid=101, samples=3, mlp_sizes=[784, 20, 10], mlp_images=2000,
             mlp_epochs=1, budget=30.0, milp_time_limit=10.0, lp_time_limit=2.0)


def parse_args(argv=None):
    parser = ExperimentParser(__doc__.strip().splitlines()[0], out="figures/tightness", defaults=DEFAULTS,
                              quick=QUICK, model_help="state_dict of the paper's MNIST ConvNet (part B)")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.1, 0.25], help="L∞ radii")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="backends to run")
    parser.add_argument("--parts", default="AB", help="which parts to run: A, B or AB")
    parser.setting("--samples", type=int, help="MNIST test images per (network, ε)")
    parser.add_argument("--milp-mode", choices=["certify", "bound"], default="certify",
                        help="part B: MILP sign decisions only (fast), or exact margins")
    parser.setting("--milp-time-limit", type=float, help="MILP seconds per example (all its rows together)")
    parser.add_argument("--exact", choices=["milp", "bab"], default="milp",
                        help="backend of the exact column (label 'milp'): the MILP or branch and bound (bab, "
                             "ReLU splits), same time limit")
    parser.setting("--lp-time-limit", type=float,
                   help="seconds per LP solve; a row that hits it keeps the dual's bound")
    parser.setting("--budget", type=float,
                   help="part B: seconds per (network, ε, method) before its remaining images are skipped")
    parser.setting("--mlp-epochs", type=int, help="epochs of provable training of the MLP")
    parser.add_argument("--tol", type=float, default=1e-5,
                        help="relative tolerance of the containment checks (polytope_lab.checks.slack)")
    parser.add_argument("--overwrite", action="store_true", help="recompute rows already in --out")
    args = parser.parse_args(argv)
    cfg = {key: getattr(args, key) for key in DEFAULTS}
    if min(args.eps) <= 0 or cfg["samples"] < 1 or cfg["mlp_epochs"] < 1 or cfg["budget"] <= 0:
        parser.error("every ε must be > 0, --samples and --mlp-epochs ≥ 1, --budget > 0")
    if not set(args.parts.upper()) <= {"A", "B"} or not args.parts:
        parser.error(f"--parts must be A, B or AB, got {args.parts!r}")
    args.parts = args.parts.upper()
    args.methods = [m for m in METHODS if m in args.methods]  # loosest first
    return args, cfg


# --------------------------------------------------------------------------------------------------
# plumbing: bounders, settings
# --------------------------------------------------------------------------------------------------


def make_bounder(label: str, args, cfg):
    """The backend behind a method label (as in ``pl.cross_check``), with this run's device and limits."""
    if label == "milp" and args.exact == "bab":   # the exact column by branch and bound
        name, options = checks.CROSS_CHECK_METHODS["bab"]
        return pl.Bounder.create(name, **options, time_limit=cfg["milp_time_limit"])
    name, options = checks.CROSS_CHECK_METHODS[label]
    options = dict(options)
    if name == "dual":
        options["device"] = args.device
    if name == "milp":
        options["time_limit"] = cfg["milp_time_limit"]
    if name == "lp":
        options["solver_options"] = {"time_limit": float(cfg["lp_time_limit"])}
    return pl.Bounder.create(name, **options)


def warm_up(label, bounder, model, region, C, warmed: set, key=None) -> None:
    """One untimed call of a batched backend before its first timed one (it pays one-off setup costs:
    autograd, thread pools); once per ``key``."""
    if label in BATCHED and (label, key) not in warmed:
        bounder.bound(model, region.select(slice(0, 1)), C[:1] if C.dim() == 3 else C)
        warmed.add((label, key))


def check_settings(out: Path, settings: dict, overwrite: bool) -> None:
    """Refuse to mix rows made under other settings into ``out`` (unless overwriting)."""
    path = out / "settings.json"
    if path.is_file() and not overwrite:
        old = json.loads(path.read_text())
        changed = sorted(k for k in settings if k in old and old[k] != settings[k])
        if changed:
            raise SystemExit(f"{out} holds results made with other settings ({', '.join(changed)}: "
                             f"{[old[k] for k in changed]} there, {[settings[k] for k in changed]} now); "
                             f"use --overwrite or another --out")
        settings = {**old, **settings}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# part A: the random 2-D network
# --------------------------------------------------------------------------------------------------


def part_a(args, cfg, out: Path) -> pd.DataFrame:
    net, x0 = models.random_network(cfg["sizes"], args.seed)
    store = result_store(out, "random_net")                                 # key: (ε, coordinate, method)
    bounders = {m: make_bounder(m, args, cfg) for m in args.methods}
    n_out, warmed = cfg["sizes"][-1], set()
    for eps in tqdm(args.eps, desc="A: random net"):
        region = pl.LinfBall(x0, eps)
        for j in range(1, n_out + 1):
            C = torch.eye(n_out, dtype=torch.float64)[j - 1:j]                      # (1, n_out): e_j
            for label in args.methods:
                if (eps, j, label) in store:
                    continue
                warm_up(label, bounders[label], net, region, C, warmed)
                b = bounders[label].bound(net, region, C)
                lo, hi = b.lower[0, 0].item(), b.upper[0, 0].item()
                store.put((eps, j, label), {"eps": eps, "coordinate": j, "method": label, "lower": lo, "upper": hi,
                                            "width": hi - lo, "seconds": b.seconds, "status": b.status[0]})
            if (eps, j, "grid") not in store:
                start = time.perf_counter()
                _, outputs, _ = polytopes.image_of_box(net, region, cfg["grid"])     # (n², n_out)
                lo, hi = float(outputs[:, j - 1].min()), float(outputs[:, j - 1].max())
                store.put((eps, j, "grid"), {"eps": eps, "coordinate": j, "method": "grid", "lower": lo, "upper": hi,
                                             "width": hi - lo, "seconds": time.perf_counter() - start,
                                             "status": f"attained on a {cfg['grid']}² grid"})
        table = finish_a(store.frame(A_COLUMNS), args.eps, args.tol)
        write_table(table, out, "random_net", json_too=True,
                    meta={"sizes": cfg["sizes"], "x0": x0[0].tolist(), "seed": args.seed, "grid": cfg["grid"],
                          "milp_time_limit": cfg["milp_time_limit"], "lp_time_limit": cfg["lp_time_limit"]})
    store.close()
    plot_a(table, net, x0, cfg, out / "random_net.png")
    return table


def finish_a(df: pd.DataFrame, eps_list, tol: float) -> pd.DataFrame:
    """Part A's table for the ε in ``eps_list``: width ratios to the MILP's (true) range and the checks."""
    order = METHODS + ["grid"]
    df = df[df["eps"].round(12).isin([round(e, 12) for e in eps_list])].copy()
    df["rank"] = df["method"].map(order.index)
    df = df.sort_values(["eps", "coordinate", "rank"]).reset_index(drop=True)
    ratio, check = {}, {}
    for _, group in df.groupby(["eps", "coordinate"]):
        by = group.set_index("method")
        true = by.loc["milp", "width"] if "milp" in by.index else math.nan
        for idx, row in group.iterrows():
            ratio[idx] = row["width"] / true if true > 0 else math.nan
            check[idx] = check_a(row["method"], by, order, tol)
    df["width / true width"], df["check"] = pd.Series(ratio, dtype=float), pd.Series(check, dtype=object)
    return df[A_COLUMNS]


def check_a(method: str, by: pd.DataFrame, order: list, tol: float) -> str:
    """Whether the method's range contains the next tighter method's and the grid's attained range."""
    if method == "grid":
        return "reference (attained)"
    tighter = [m for m in order[order.index(method) + 1:] if m in by.index]
    refs = tighter[:1] + (["grid"] if "grid" in by.index and tighter[:1] != ["grid"] else [])
    if refs and refs[0] == "milp" and by.loc["milp", "status"] != "optimal":
        refs = refs[1:]                                    # a time-limited MILP gives no exact range
    problems = []
    for ref in refs:
        gap = checks.containment_gap(by.loc[method, "lower"], by.loc[method, "upper"], by.loc[ref, "lower"],
                                     by.loc[ref, "upper"], tol)
        if gap > 0:
            problems.append(f"does not contain {ref} (by {gap:.3g})")
    return "; ".join(problems) or ("ok ⊇ " + ", ".join(refs) if refs else "ok")


def plot_a(table: pd.DataFrame, net, x0, cfg, path: Path) -> None:
    """Per ε: the widths per method and coordinate (log scale, interval's ratio to the true width written
    above its bar), and the output-space boxes around the image of a grid of the input box (the true
    set); the interval box is far outside that panel."""
    eps_list = sorted(table["eps"].unique())
    fig, axes = plt.subplots(len(eps_list), 2, figsize=(11, 3.4 * len(eps_list) + 0.6), squeeze=False)
    methods = [m for m in METHODS + ["grid"] if m in set(table["method"])]
    styles = {"dual-optimized": dict(lw=3.5, ls="-", alpha=0.6)}              # under the LP's box it overlays
    for r, eps in enumerate(eps_list):
        t = table[table["eps"] == eps].set_index(["coordinate", "method"])
        coords = sorted(table["coordinate"].unique())
        ax = axes[r, 0]
        width = 0.8 / len(methods)
        for k, m in enumerate(methods):
            xs = np.arange(len(coords)) + (k - (len(methods) - 1) / 2) * width
            ax.bar(xs, [t.loc[(j, m), "width"] if (j, m) in t.index else np.nan for j in coords], width,
                   color=COLORS[m])
            if m == "interval":
                for x, j in [(x, j) for x, j in zip(xs, coords) if (j, m) in t.index]:
                    ratio = t.loc[(j, m), "width / true width"]
                    ax.annotate(f"×{ratio:.0f}" if ratio >= 100 else f"×{ratio:.3g}", (x, t.loc[(j, m), "width"]),
                                ha="center", va="bottom", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(table["width"].min() / 3, table["width"].max() * 4)
        ax.set_xticks(range(len(coords)), [f"output $z_{{{j}}}$" for j in coords])
        ax.set_ylabel("width of [lower, upper]")
        ax.set_title(f"ε = {eps:g}: width of each method's range")
        ax.grid(axis="y", alpha=0.3)
        ax = axes[r, 1]
        _, outputs, _ = polytopes.image_of_box(net, pl.LinfBall(x0, eps), min(cfg["grid"], 201))
        ax.scatter(outputs[:, 0], outputs[:, 1], s=1, color="0.75", rasterized=True)
        for m in [m for m in methods if m not in ("interval", "grid") and all((j, m) in t.index for j in coords)]:
            (l1, l2), (u1, u2) = ([t.loc[(j, m), side] for j in coords[:2]] for side in ("lower", "upper"))
            ax.add_patch(plt.Rectangle((l1, l2), u1 - l1, u2 - l2, fill=False, color=COLORS[m],
                                       **styles.get(m, dict(lw=1.5))))
        ax.autoscale_view()
        ax.margins(0.05)
        ax.set_xlabel("output $z_1$")
        ax.set_ylabel("output $z_2$")
        ax.set_title(f"ε = {eps:g}: output boxes around the true set")
    handles = [matplotlib.patches.Patch(color=COLORS[m], label="grid (attained)" if m == "grid" else m)
               for m in methods]
    handles.append(matplotlib.lines.Line2D([], [], ls="", marker="o", color="0.75", label="f(x′), x′ on a grid"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle(f"Random {'-'.join(map(str, cfg['sizes']))} network (paper §4.1): range of each output "
                 f"over the L∞ ball around x₀")
    fig.tight_layout(rect=(0, 0.035, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# part B: MNIST networks
# --------------------------------------------------------------------------------------------------


def trained_mlp(X_train, y_train, args, cfg, out: Path):
    """The MLP trained with the provable objective at ``mlp_eps`` (ε warm-up over ``mlp_warmup`` epochs) on
    the first ``mlp_images`` training images; checkpointed in ``out``, so a rerun resumes or reuses it."""
    n, epochs = cfg["mlp_images"], cfg["mlp_epochs"]
    directory = out / f"mlp_{'-'.join(map(str, cfg['mlp_sizes']))}_{n}_images_{epochs}_epochs"
    return robust_mlp(X_train[:n], y_train[:n], cfg["mlp_sizes"], eps=cfg["mlp_eps"], epochs=epochs,
                      directory=directory, seed=args.seed, warmup_epochs=cfg["mlp_warmup"], clip=CLIP,
                      flatten_layer=True, resume=not args.overwrite, log_path=directory / "training_log.csv",
                      progress=True)


def networks(args, cfg, out: Path):
    """{name: model} for part B and notes on what was skipped; (X, y) of the test images."""
    notes = []
    try:
        X, y = data.mnist("test", root=args.data_dir)
    except FileNotFoundError as e:
        if args.model:
            raise SystemExit(f"--model was given but the MNIST test set is missing: {e}") from e
        return {}, None, [f"part B skipped: no MNIST data ({e})"]
    nets = {}
    if args.model:
        nets[f"ConvNet ({Path(args.model).stem})"] = models.load_state(models.mnist_convnet(), args.model)
    else:
        notes.append("part B: pretrained ConvNet skipped (pass --model PATH to include it)")
    X_train, y_train = data.mnist("train", root=args.data_dir)
    mlp, log = trained_mlp(X_train, y_train, args, cfg, out)
    last = log.iloc[-1]
    notes.append(f"MLP trained {len(log)} epochs on {cfg['mlp_images']} images at ε = {cfg['mlp_eps']}: training "
                 f"error {last['error']:.3f}, robust error (dual bound) {last['robust_error']:.3f}")
    nets[f"MLP {'-'.join(map(str, cfg['mlp_sizes']))} (robust, ε={cfg['mlp_eps']:g})"] = mlp
    return nets, (X[:cfg["samples"]], y[:cfg["samples"]]), notes


def bound_images(label, bounder, model, X, y, eps, milp_mode):
    """One call of ``label`` on images X: per image (margin lower bound, certified, status, seconds)."""
    region = pl.LinfBall(X, eps, clip=CLIP)
    start = time.perf_counter()
    if label == "milp" and milp_mode == "certify":
        cert = bounder.certify(model, region, y)
        margins = [math.nan] * len(X)
        certified, status = cert.certified.tolist(), list(cert.status)
    else:
        b = bounder.bound(model, region, pl.margin_matrix(y, N_CLASSES))
        margins = b.lower.min(dim=1).values.tolist()
        certified, status = b.certified.tolist(), list(b.status)
    seconds = (time.perf_counter() - start) / len(X)
    return [(m, c, s, seconds) for m, c, s in zip(margins, certified, status)]


def part_b(args, cfg, out: Path):
    nets, test, notes = networks(args, cfg, out)
    if not nets:
        return pd.DataFrame(columns=B_COLUMNS), notes
    X, y = test
    store = result_store(out, "mnist_images")                        # key: (network, ε, method, image)
    bounders = {m: make_bounder(m, args, cfg) for m in args.methods}
    tasks = [(name, eps, m) for name in nets for eps in sorted(args.eps) for m in args.methods]  # ε ascending: see lp
    warmed = set()
    for name, eps, label in tqdm(tasks, desc="B: MNIST"):
        df = store.frame(IMAGE_COLUMNS)
        spent = df[(df["network"] == name) & (df["eps"].round(12) == round(eps, 12))
                   & (df["method"] == label)]["seconds"].sum()
        todo = [i for i in range(len(X)) if (name, eps, label, i) not in store]
        chunks = [todo] if label in BATCHED else [[i] for i in todo]
        for chunk in tqdm([c for c in chunks if c], desc=f"{label}, ε={eps:g}", leave=False):
            if label == "lp" and lp_timed_out(store.frame(IMAGE_COLUMNS), name, eps):
                notes.append(f"{name}, ε={eps:g}, lp: an LP solve hit --lp-time-limit at this or a smaller ε; "
                             f"the remaining images are skipped (the LP only grows with ε)")
                break
            if spent >= cfg["budget"]:
                done = sum((name, eps, label, i) in store for i in range(len(X)))
                notes.append(f"{name}, ε={eps:g}, {label}: budget of {cfg['budget']:g} s spent after "
                             f"{done} of {len(X)} images")
                break
            idx = torch.tensor(chunk)
            warm_up(label, bounders[label], nets[name], pl.LinfBall(X[idx[:1]], eps, clip=CLIP),
                    pl.margin_matrix(y[idx[:1]], N_CLASSES), warmed, key=name)
            results = bound_images(label, bounders[label], nets[name], X[idx], y[idx], eps, args.milp_mode)
            for i, (margin, cert, status, seconds) in zip(chunk, results):
                store.put((name, eps, label, i), {"network": name, "eps": eps, "method": label, "image": i,
                                                  "label": int(y[i]), "margin lower bound": margin,
                                                  "certified": bool(cert), "status": status, "seconds": seconds})
                spent += seconds
        df = store.frame(IMAGE_COLUMNS)
        df.to_csv(out / "mnist_images.csv", index=False)
        summary = summarise(df, list(nets), args.eps, args.methods, len(X), args.tol)
        write_table(summary, out, "mnist", json_too=True,
                    meta={"samples": len(X), "clip": CLIP, "milp_mode": args.milp_mode,
                          "milp_time_limit": cfg["milp_time_limit"], "lp_time_limit": cfg["lp_time_limit"],
                          "budget": cfg["budget"], "notes": notes})
    store.close()
    plot_b(summary, out / "mnist_certified.png")
    return summary, notes


def lp_timed_out(df: pd.DataFrame, name: str, eps: float) -> bool:
    """Whether an LP of this network hit its time limit at ε or below (status "time_limit"; CVXPY's own
    "user_limit" before the shared status vocabulary)."""
    return bool(((df["network"] == name) & (df["method"] == "lp") & (df["eps"] <= eps + 1e-12)
                 & df["status"].isin(TIME_LIMIT)).any())


def summarise(df: pd.DataFrame, names, eps_list, methods, samples: int, tol: float) -> pd.DataFrame:
    """Part B's table from the per-image rows (images 0…samples−1 of the selected networks, ε, methods)."""
    df = df[df["network"].isin(names) & df["eps"].round(12).isin([round(e, 12) for e in eps_list])
            & df["method"].isin(methods) & (df["image"] < samples)]
    out = []
    for name in names:
        for eps in eps_list:
            sub = df[(df["network"] == name) & (df["eps"].round(12) == round(eps, 12))]
            per = {m: g.set_index("image") for m, g in sub.groupby("method")}
            for m in [m for m in METHODS if m in per]:
                g = per[m]
                statuses = g["status"].value_counts()
                out.append({"network": name, "eps": eps, "method": m, "images": len(g),
                            "mean margin lower bound": g["margin lower bound"].mean(),
                            "certified fraction": g["certified"].astype(bool).mean(),
                            "seconds per image": g["seconds"].mean(),
                            "statuses": ", ".join(f"{s} {n}" for s, n in statuses.items()),
                            "check": check_b(m, per, tol)})
    return pd.DataFrame(out, columns=B_COLUMNS)


def check_b(method: str, per: dict, tol: float) -> str:
    """Per image: the margin is at most the next tighter method's and a certified image stays certified by
    it (LP/MILP only where they solved exactly), and no image it certifies has a MILP counterexample."""
    if method == "milp":
        unknown = int((~per["milp"]["status"].isin(EXACT)).sum())
        return f"{unknown} images not solved exactly (time limit)" if unknown else "exact"
    g = per[method]
    problems = []
    tighter = [m for m in METHODS[METHODS.index(method) + 1:] if m in per]
    if tighter:
        ref = per[tighter[0]]
        common = g.index.intersection(ref.index)
        a, b = g.loc[common], ref.loc[common]
        if tighter[0] in ("lp", "milp"):                  # solver statuses other than these: a fallback bound
            keep = b["status"].isin(EXACT)
            a, b = a[keep], b[keep]
        both = a["margin lower bound"].notna() & b["margin lower bound"].notna()
        excess = checks.above(a["margin lower bound"][both], b["margin lower bound"][both], tol)
        if (excess > 0).any():
            problems.append(f"margin above {tighter[0]}'s on {int((excess > 0).sum())} images "
                            f"(by ≤ {excess.max():.3g})")
        lost = a["certified"].astype(bool) & ~b["certified"].astype(bool)
        if lost.any():
            problems.append(f"{int(lost.sum())} images certified but not by {tighter[0]}")
    if "milp" in per:
        milp = per["milp"]
        common = g.index.intersection(milp.index)
        wrong = g.loc[common, "certified"].astype(bool) & (milp.loc[common, "status"] == "counterexample")
        if wrong.any():
            problems.append(f"UNSOUND: {int(wrong.sum())} certified images have a MILP counterexample")
    return "; ".join(problems) or "ok"


def plot_b(summary: pd.DataFrame, path: Path) -> None:
    """Per network: certified fraction and mean margin lower bound against ε, one line per method. Points
    from fewer images than the network's others (budget) or from LPs that hit their time limit are left out."""
    names = list(dict.fromkeys(summary["network"]))
    if not names:
        return
    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 7.5), squeeze=False)
    for c, name in enumerate(names):
        t = summary[summary["network"] == name]
        lp_stopped = t["method"].eq("lp") & t["statuses"].str.contains("|".join(TIME_LIMIT))
        t = t[(t["images"] == t["images"].max()) & ~lp_stopped]
        for m in [m for m in METHODS if m in set(t["method"])]:
            s = t[t["method"] == m].sort_values("eps")
            style = dict(color=COLORS[m], label="milp (exact verdicts)" if m == "milp" else m, **MARKERS[m])
            axes[0, c].plot(s["eps"], s["certified fraction"], **style)
            if s["mean margin lower bound"].notna().any():
                axes[1, c].plot(s["eps"], s["mean margin lower bound"], **style)
        margins = t["mean margin lower bound"].abs()
        smallest = float(margins[margins > 0].min()) if (margins > 0).any() else 1.0
        axes[1, c].set_yscale("symlog", linthresh=10.0 ** math.floor(math.log10(max(smallest, 1e-3))))
        axes[0, c].set_title(name)
        axes[0, c].set_ylabel("certified fraction")
        axes[0, c].set_ylim(-0.03, 1.03)
        axes[0, c].legend(fontsize=8)
        axes[1, c].axhline(0, color="black", lw=0.8)
        axes[1, c].set_ylabel("mean margin lower bound (symlog)")
        for ax in axes[:, c]:
            ax.set_xlabel("ε (L∞ ball ∩ [0, 1])")
            ax.grid(alpha=0.3)
    fig.suptitle(f"MNIST test images 0–{int(summary['images'].max()) - 1}: how much each bound certifies")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------


def main(argv=None):
    args, cfg = parse_args(argv)
    with torch_threads(args.threads):
        return run(args, cfg)


def run(args, cfg):
    out = Path(args.out)
    if args.overwrite:
        for table in ("random_net", "mnist_images"):
            with result_store(out, table) as store:
                store.clear()
    settings = {"seed": args.seed, "quick": args.quick, "sizes": cfg["sizes"], "grid": cfg["grid"],
                "mlp": {k: cfg[k] for k in ("mlp_sizes", "mlp_images", "mlp_epochs", "mlp_eps", "mlp_warmup")},
                "milp_mode": args.milp_mode, "milp_time_limit": cfg["milp_time_limit"],
                "lp_time_limit": cfg["lp_time_limit"], "exact": args.exact}
    check_settings(out, settings, args.overwrite)
    results, notes = {}, []
    if "A" in args.parts:
        results["random_net"] = part_a(args, cfg, out)
        print(to_markdown(results["random_net"]))
    if "B" in args.parts:
        results["mnist"], notes = part_b(args, cfg, out)
        print(to_markdown(results["mnist"]))
    for note in notes:
        print("note:", note)
    print(f"wrote {out}/")
    return results


if __name__ == "__main__":
    main()

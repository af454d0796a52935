"""The paper's 2-D toy domain (Wong & Kolter 2018, §4.1, Figs. 4–6) on synthetic data.

    python -m experiments.toy2d            # ≈ 2 min on 2 cores; figures and tables in figures/toy2d/
    python -m experiments.toy2d --quick    # seconds: small networks, same code paths (CI)

1. Polytopes (Fig. 4): random 2-100-100-100-100-2 networks (weights N(0, std 1/√fan_in), biases N(0, 1)),
   one centre x₀ ~ U[0, 1]² per network, L∞ boxes of radius ε. The true output set is the image of a
   dense grid of the box; around it the convex outer bounds of the dual network and of the LP (same
   relaxation, same intermediate bounds, solved optimally), both from the same K support directions;
   the MILP's exact support lines in a few directions (time-limited: statuses reported; ``--exact bab``:
   by branch and bound instead); the interval box.
2. Classifiers (Fig. 5): 50 points in [0, 1]², ≥ 0.08 apart (L∞), random labels; the same architecture
   trained by full-batch Adam, standard vs robust (the dual bound's loss) at ε = 0.03. To fit the budget:
   1000 steps, 700 at lr 1e-2 (robust: ε ramped up from 0 over the first 300), then 300 at the paper's
   1e-3 (a fresh Adam). The paper's lr 1e-3 alone (--lr 1e-3 --final-steps 0 --warmup 0) still has
   ≈10–15% robust error after 1000–3000 steps.
3. Training curves and the polytope of one training point after robust training (Fig. 6).

Writes PNGs, CSV/Markdown/JSON tables and ``toy2d.json`` (settings, seconds, every number) to ``--out``,
and the table rows to its result store (``results.sqlite``, tables ``polytopes`` and ``classifiers``).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

import polytope_lab as pl
from polytope_lab import data, evaluation, models, polytopes, training
from polytope_lab.checks import CROSS_CHECK_METHODS

from . import toy2d_plots as plots
from .cli import ExperimentParser, machine_load, record_rows, to_markdown, torch_threads, write_table

#: ``--exact``: the backends that can draw the exact support lines
EXACT_BACKENDS = ("milp", "bab")
DEFAULTS = dict(sizes=[2, 100, 100, 100, 100, 2], eps=[0.05, 0.1, 0.25], nets=3, grid=250, resolution=400,
                directions=32, milp_directions=4, milp_time_limit=0.5, points=50, min_distance=0.08,
                train_eps=0.03, train_sizes=[2, 100, 100, 100, 100, 2], epochs_standard=1000,
                epochs_robust=1000, lr=1e-2, lr_final=1e-3, final_steps=300, warmup=300, attack_grid=41,
                region_grid=300)
QUICK = dict(sizes=[2, 16, 16, 2], nets=2, grid=60, resolution=150, directions=8, milp_directions=2,
             milp_time_limit=10.0, points=12, train_sizes=[2, 16, 16, 2], epochs_standard=40, epochs_robust=40,
             final_steps=10, warmup=10, attack_grid=9, region_grid=60)


def parse_args(argv=None):
    parser = ExperimentParser(__doc__.strip().splitlines()[0], out="figures/toy2d", defaults={"threads": 1, **DEFAULTS},
                              quick=QUICK)
    parser.setting("--nets", type=int, help="random networks per ε")
    parser.setting("--eps", type=float, nargs="+", help="radii of Fig. 4")
    parser.setting("--directions", type=int, help="support directions per bounder: rows of C, 2 half-planes each")
    parser.setting("--milp-directions", type=int, help="MILP rows, 2 support lines each")
    parser.setting("--milp-time-limit", type=float, help="MILP seconds per bound call (all its rows together)")
    parser.add_argument("--exact", choices=EXACT_BACKENDS, default="milp",
                        help="backend of the exact support lines (max of cᵀf over the box for --milp-directions "
                             "directions c): the MILP or branch and bound (bab), same time limit")
    parser.setting("--epochs-standard", type=int, help="full-batch Adam steps, standard training")
    parser.setting("--epochs-robust", type=int, help="full-batch Adam steps, robust training")
    parser.setting("--lr", type=float, help="Adam learning rate")
    parser.setting("--lr-final", type=float, help="learning rate of the last --final-steps steps")
    parser.setting("--final-steps", type=int, help="steps at --lr-final, a fresh Adam (0: none)")
    parser.setting("--warmup", type=int, help="robust training: steps over which ε ramps up from 0")
    # --threads (1 here): the networks are small, so a second thread only pays on an idle machine and costs
    # up to 4× on a busy one
    args = parser.parse_args(argv)
    cfg = {key: getattr(args, key) for key in DEFAULTS}
    cfg["exact"] = args.exact
    if args.threads < 1:
        parser.error("--threads must be ≥ 1")
    if cfg["nets"] < 1 or cfg["directions"] < 2 or cfg["milp_directions"] < 1:
        parser.error("--nets must be ≥ 1, --directions ≥ 2, --milp-directions ≥ 1")
    if min(cfg["eps"]) <= 0 or cfg["lr"] <= 0 or cfg["lr_final"] <= 0:
        parser.error("every ε and both learning rates must be > 0")
    if not 0 <= cfg["final_steps"] < min(cfg["epochs_standard"], cfg["epochs_robust"]):
        parser.error("--final-steps must lie in [0, epochs) for both trainings")
    if not 0 <= cfg["warmup"] <= cfg["epochs_robust"] - cfg["final_steps"]:
        parser.error("--warmup must lie in [0, epochs-robust − final-steps]")
    return args, cfg


def timed(fn):
    """(fn(), wall seconds)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def outer_bounds(net, region, cfg, bounders, device):
    """True set and every bounder's outer set of one region: (numbers for the table, shapes for the plots).

    The support directions are spread evenly in the scale of the dual network's bounding box, so that
    an elongated set is outlined as well as a round one (the same directions for every bounder).
    """
    eye = torch.eye(2, dtype=torch.float64)
    (inputs, outputs, triangles), t_true = timed(lambda: polytopes.image_of_box(net, region, cfg["grid"]))
    mask, extent, area_true = polytopes.coverage(outputs, triangles, cfg["resolution"])
    b = {"interval": bounders["interval"].bound(net, region, eye)}
    dual_box = bounders["dual"].bound(net, region, eye)
    scale = (dual_box.upper - dual_box.lower)[0]
    C = polytopes.unit_directions(cfg["directions"], scale=scale)
    Cm = polytopes.unit_directions(cfg["milp_directions"], scale=scale)
    for name, rows in (("dual", C), ("lp", C), ("milp", Cm)):
        b[name] = bounders[name].bound(net, region, rows)
    shapes = {name: polytopes.outer_polygon(C, b[name].lower[0], b[name].upper[0]) for name in ("dual", "lp")}
    box = np.stack([b["interval"].lower[0].numpy(), b["interval"].upper[0].numpy()])  # (2: lo/hi, 2)
    optimal = np.array([s == "optimal" for s in exact_statuses(b["milp"], len(Cm))])
    milp_slack = polytopes.slack(outputs, Cm, b["milp"].lower[0], b["milp"].upper[0])
    violation = max(-polytopes.slack(outputs, C, b[n].lower[0], b[n].upper[0]).min() for n in ("dual", "lp"))
    violation = max(violation, -polytopes.slack(outputs, eye, *box).min(),
                    -milp_slack.min())
    true_lo, true_hi = outputs.min(axis=0), outputs.max(axis=0)
    # per direction, how much the LP's support value improves on the dual's (≥ 0: same relaxation, optimum)
    lp_gain = min((b["lp"].lower - b["dual"].lower).min().item(), (b["dual"].upper - b["lp"].upper).min().item())
    dual_lo, dual_hi = shapes["dual"].min(axis=0), shapes["dual"].max(axis=0)
    areas = {"area_true": area_true, "area_hull": polytopes.hull_area(outputs),
             "area_lp": polytopes.polygon_area(shapes["lp"]), "area_dual": polytopes.polygon_area(shapes["dual"]),
             "area_box": float(np.prod(box[1] - box[0]))}
    row = {**areas,
           "lp/true": areas["area_lp"] / areas["area_true"], "dual/true": areas["area_dual"] / areas["area_true"],
           "true_min1": true_lo[0], "dual_min1": dual_lo[0], "lp_tighter_by": lp_gain,
           "true_w1": true_hi[0] - true_lo[0], "true_w2": true_hi[1] - true_lo[1],
           "dual_w1": dual_hi[0] - dual_lo[0], "dual_w2": dual_hi[1] - dual_lo[1],
           "box_w1": box[1, 0] - box[0, 0], "box_w2": box[1, 1] - box[0, 1],
           "unstable": "/".join(str(int(((l < 0) & (u > 0)).sum())) for l, u in b["dual"].intermediate),
           "milp_optimal": f"{int(optimal.sum())}/{len(optimal)}",
           "milp_touch_gap": float(milp_slack[optimal].max()) if optimal.any() else float("nan"),
           "max_violation": float(violation),
           "s_true": t_true, "s_dual": b["dual"].seconds, "s_lp": b["lp"].seconds, "s_milp": b["milp"].seconds}
    shape = {"mask": mask, "extent": extent, "dual": shapes["dual"], "lp": shapes["lp"], "box": box,
             "ratio_dual": row["dual/true"], "ratio_lp": row["lp/true"],
             "milp": {"C": torch.cat([Cm, Cm]).numpy(),
                      "values": torch.cat([b["milp"].lower[0], b["milp"].upper[0]]).numpy(), "optimal": optimal}}
    return row, shape


def exact_statuses(bounds, m: int) -> list:
    """The 2m support values' statuses of one example (m lower, then m upper): the MILP's per row, else
    the example's status for every row (branch and bound)."""
    if getattr(bounds, "lower_status", None):
        return bounds.lower_status[0] + bounds.upper_status[0]
    return [bounds.status[0]] * (2 * m)


def exact_bounder(cfg):
    """The exact support lines' backend (``--exact``, key "milp" in the tables): the MILP without its primal
    heuristic (on these 4×100 networks sign-gradient descent per row costs more than the time-limited
    solves it would warm-start), or branch and bound (ReLU splits, as in ``pl.cross_check``)."""
    if cfg.get("exact", "milp") == "bab":
        name, options = CROSS_CHECK_METHODS["bab"]
        return pl.Bounder.create(name, **options, time_limit=cfg["milp_time_limit"])
    return pl.Bounder.create("milp", time_limit=cfg["milp_time_limit"], heuristic_steps=0)


def make_bounders(cfg, device):
    """The four backends (the exact one: :func:`exact_bounder`)."""
    return {"dual": pl.Bounder.create("dual", device=device), "lp": pl.Bounder.create("lp"),
            "interval": pl.Bounder.create("interval"), "milp": exact_bounder(cfg)}


def polytope_part(cfg, device):
    """Fig. 4: one row per (ε, random network) and the shapes to draw."""
    bounders = make_bounders(cfg, device)
    rows, panels = [], []
    tasks = [(j, i) for j in range(cfg["nets"]) for i in range(len(cfg["eps"]))]
    for j, i in tqdm(tasks, desc="polytopes"):
        net, x0 = models.random_network(cfg["sizes"], cfg["seed"] * 1000 + j)
        eps = cfg["eps"][i]
        row, shape = outer_bounds(net, pl.LinfBall(x0, eps), cfg, bounders, device)
        rows.append({"eps": eps, "net": j + 1, "net_seed": cfg["seed"] * 1000 + j,
                     "x0_1": x0[0, 0].item(), "x0_2": x0[0, 1].item(), **row})
        panels.append({**shape, "row": i, "col": j, "eps": eps})
    return pd.DataFrame(rows), panels


def evaluate(model, X, y, eps, cfg, seed):
    """Clean error, PGD error, dense-grid attack error and the dual bound on the robust error."""
    clean = evaluation.clean_errors(model, X, y)
    pgd_hit = evaluation.attack_errors(model, X, y, eps, "pgd", count_clean=False, steps=50, seed=seed)
    grid_hit = torch.zeros(len(X), dtype=torch.bool)
    for k in range(len(X)):
        _, outputs, _ = polytopes.image_of_box(model, pl.LinfBall(X[k:k + 1], eps), cfg["attack_grid"])
        grid_hit[k] = bool((outputs.argmax(1) != int(y[k])).any())
    bound_error = evaluation.robust_errors(model, X, y, eps)
    flagged = (clean | pgd_hit | grid_hit).numpy()
    n = len(X)
    return {"clean_error": int(clean.sum()) / n, "pgd_error": int(pgd_hit.sum()) / n,
            "grid_attack_error": int(grid_hit.sum()) / n, "robust_error_bound": int(bound_error.sum()) / n}, flagged


def decision_grid(model, n):
    """The predicted class on an n×n grid over [−0.05, 1.05]² (for contourf)."""
    xs = torch.linspace(-0.05, 1.05, n)
    xx, yy = torch.meshgrid(xs, xs, indexing="xy")
    with torch.no_grad():
        pred = model(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)).argmax(1).reshape(n, n)
    return xx.numpy(), yy.numpy(), pred.numpy()


def classifier_part(cfg, device):
    """Fig. 5: the toy points, standard and robust training (two lr phases each), their evaluation."""
    X, y = data.toy_points(cfg["points"], cfg["min_distance"], seed=cfg["seed"])
    eps = cfg["train_eps"]
    rows, logs, models_ = [], {}, {}
    for mode in ("standard", "robust"):
        torch.manual_seed(cfg["seed"])
        model = models.mlp(cfg["train_sizes"])
        epochs = cfg[f"epochs_{mode}"]
        start = time.perf_counter()
        phases = []                       # (steps, lr, ε warm-up): lr high, then the last steps at lr_final
        for steps, lr, warmup in ((epochs - cfg["final_steps"], cfg["lr"], cfg["warmup"] if mode == "robust" else 0),
                                  (cfg["final_steps"], cfg["lr_final"], 0)):
            if steps:
                log = training.train(model, X, y, mode=mode, eps=eps, epochs=steps, batch_size=len(X), lr=lr,
                                     warmup_epochs=warmup, seed=cfg["seed"], device=device, progress=True)
                phases.append(log.assign(epoch=log["epoch"] + sum(len(p) for p in phases), lr=lr))
        log, seconds = pd.concat(phases, ignore_index=True), time.perf_counter() - start
        model.cpu()
        numbers, flagged = evaluate(model, X, y, eps, cfg, cfg["seed"])
        rows.append({"training": mode, "epochs": epochs, "final_loss": float(log["loss"].iloc[-1]),
                     "final_robust_loss": float(log["robust_loss"].iloc[-1]), **numbers, "seconds": seconds})
        logs[mode] = log.assign(training=mode)
        models_[mode] = (model, flagged)
    return X, y, pd.DataFrame(rows), logs, models_


def training_point_polytope(model, X, y, cfg, device):
    """Fig. 6 right: the certified training point with the smallest dual margin, its true and outer sets.

    Drawn in the coordinates (margin z_y − z_other, mean logit (z_1 + z_2)/2): a linear head appended to
    the network (determinant ±1, so areas are those in (z_1, z_2)); the decision boundary is margin = 0.
    """
    eps = cfg["train_eps"]
    net = copy.deepcopy(model).double().requires_grad_(False)
    X64 = X.double()
    margins = pl.Bounder.create("dual").bound(net, pl.LinfBall(X64, eps), pl.margin_matrix(y, 2)).lower[:, 0]
    candidates = torch.where(margins > 0, margins, torch.full_like(margins, float("inf")))
    k = int(candidates.argmin()) if torch.isfinite(candidates).any() else int(margins.argmax())
    head = nn.Linear(2, 2, bias=False).double().requires_grad_(False)
    head.weight.copy_(torch.tensor([[1.0, -1.0] if int(y[k]) == 0 else [-1.0, 1.0], [0.5, 0.5]]))
    net = nn.Sequential(*net, head)
    bounders = make_bounders(cfg, device)
    row, shape = outer_bounds(net, pl.LinfBall(X64[k:k + 1], eps), cfg, bounders, device)
    milp = shape["milp"]                                           # its first row is the margin direction
    exact = float(milp["values"][0]) if milp["optimal"][0] else float("nan")
    return {"point": k, "label": int(y[k]), "x_1": X[k, 0].item(), "x_2": X[k, 1].item(),
            "dual_margin": margins[k].item(), "exact_margin": exact, **row}, shape


def save(fig, path):
    fig.savefig(path, dpi=110)
    plots.plt.close(fig)
    return path


def main(argv=None):
    """Run the experiment (see the module docstring); returns what ``toy2d.json`` holds."""
    args, cfg = parse_args(argv)
    cfg["seed"] = args.seed
    with torch_threads(args.threads):
        return run(args, cfg)


def run(args, cfg):
    """Figs. 4–6 in order, writing each part's files as soon as it is done; returns the summary."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    seconds, cpu_seconds = {}, {}

    def lap(name, since):
        """Record wall and CPU seconds of a part (CPU: this process, all threads — the un-niced estimate)."""
        seconds[name], cpu_seconds[name] = time.perf_counter() - since[0], time.process_time() - since[1]
        return time.perf_counter(), time.process_time()

    started = t = (time.perf_counter(), time.process_time())

    poly, panels = polytope_part(cfg, args.device)
    t = lap("polytopes", t)
    meta = {"settings": cfg, "x0": "uniform in [0, 1]^2 per network (from its seed)"}
    write_table(poly, out, "polytopes", meta=meta, json_too=True)
    record_rows(out, "polytopes", poly.to_dict("records"), key=["eps", "net"])
    title = (f"random {'-'.join(map(str, cfg['sizes']))} networks, outer bounds from "
             f"{2 * cfg['directions']} directions")
    files = [save(plots.polytopes_figure(panels, cfg["eps"], cfg["nets"], title), out / "polytopes.png"),
             save(plots.box_figure([p for p in panels if p["col"] == 0], "interval bounds vs the dual polytope, net 1"),
                  out / "polytopes_box.png")]

    X, y, clf, logs, trained = classifier_part(cfg, args.device)
    write_table(clf, out, "classifiers", meta=meta, json_too=True)
    record_rows(out, "classifiers", clf.to_dict("records"), key=["training"])
    log = pd.concat(logs.values(), ignore_index=True)
    log.to_csv(out / "training_log.csv", index=False)
    clf_panels = []
    for mode, (model, flagged) in trained.items():
        r = clf.set_index("training").loc[mode]
        clf_panels.append({"grid": decision_grid(model, cfg["region_grid"]), "X": X.numpy(), "y": y.numpy(),
                           "flagged": flagged,
                           "title": f"{mode} training ({int(r['epochs'])} steps)\nclean err {r['clean_error']:.0%}, "
                                    f"attack err {max(r['pgd_error'], r['grid_attack_error']):.0%}, "
                                    f"robust bound {r['robust_error_bound']:.0%}"})
    files.append(save(plots.classifiers_figure(clf_panels, cfg["train_eps"]), out / "classifiers.png"))
    t = lap("classifiers", t)

    point, shape = training_point_polytope(trained["robust"][0], X, y, cfg, args.device)
    note = (f"min margin: {point['true_min1']:.3g} sampled, {point['exact_margin']:.3g} MILP,\n"
            f"≥ {point['dual_margin']:.3g} dual bound; "
            f"area ×{point['dual/true']:.2f} dual, ×{point['lp/true']:.2f} LP")
    title = f"point {point['point']} (label {point['label']}), ε = {cfg['train_eps']:g}, after robust training"
    marks = [(cfg["warmup"], "robust: ε warm-up ends")] if cfg["warmup"] else []
    if cfg["final_steps"]:
        marks.append((cfg["epochs_robust"] - cfg["final_steps"], f"lr {cfg['lr']:g} → {cfg['lr_final']:g}"))
    files.append(save(plots.training_figure(logs, shape, title, note, marks), out / "training.png"))
    lap("training_point", t)
    lap("total", started)

    summary = {"settings": cfg, "threads": args.threads, "x0": meta["x0"], "seconds": seconds,
               "cpu_seconds": cpu_seconds,
               "machine": machine_load(),
               "timing_dependent": ["s_*", "seconds", "milp_* (when a MILP stops at its time limit)"],
               "polytopes": poly.to_dict(orient="records"), "classifiers": clf.to_dict(orient="records"),
               "training_point": point, "files": sorted(str(Path(f).name) for f in files)}
    (out / "toy2d.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    cols = ["eps", "net", "area_true", "area_hull", "area_lp", "area_dual", "area_box", "milp_optimal"]
    print(to_markdown(poly[cols]))
    print(to_markdown(clf.drop(columns=["final_loss", "final_robust_loss"])))
    print(f"total {seconds['total']:.1f} s ({cpu_seconds['total']:.1f} s CPU); outputs in {out}/")
    return summary


if __name__ == "__main__":
    main()

"""Paper Table 1 (§4.2): clean, FGSM, PGD, dual-bound and exact (MILP) errors of the MNIST ConvNet.

The paper's ConvNet trained three ways — standard, PGD-adversarial (Madry et al.), provably robust — or loaded:

    python -m experiments.mnist_table                  # all 60,000 training images, 4 epochs: ~1 h on 2 idle cores
    python -m experiments.mnist_table --models none --checkpoint wk=wong_kolter_mnist_eps0.1.pth
    python -m experiments.mnist_table --paper --device cuda      # the paper's 20 epochs on all 60,000 images

Per model, on the first ``--test-size`` MNIST test images at ε (``--eps``), L∞ ball (∩ [0, 1] with ``--clip``):
  clean error; FGSM error (one sign step of size ε); PGD error (the paper's footnote 6: 100 sign steps of
  size 0.001 from the image, no random start; the highest-loss iterate is kept); dual-bound robust error
  (Bounder "dual", rows e_y − e_j: an image counts unless every margin is certified). An attacked image
  counts as an error when the attack's point *or the image itself* is misclassified (the image lies in the
  ball), so clean ≤ FGSM and clean ≤ PGD ≤ bound always hold; FGSM ≤ PGD is checked, not guaranteed.
  MILP exact error (``MILPBounder.certify``, HiGHS, ball ∩ [0, 1] whatever ``--clip``) on the first
  ``--milp-samples`` images, with PGD and the dual bound on the same images and the same region, so that
  PGD ≤ exact ≤ bound can be checked; an image not settled within the time limit widens the exact error
  to a range. ``--exact bab`` computes these columns by branch and bound (``BaBBounder.certify``, same
  images, region and time limit; the columns keep their "MILP" names, the notes and table.json say which).
Training: ``training.train`` with Adam (lr 1e-3, batches of 50, as in the paper) on the first ``--train-size``
training images. Robust and PGD training: a linear ε warm-up over ``--warmup-epochs`` (1; none with
``--paper``: the seed code trains at a fixed ε); without it PGD training at ε = 0.1 stalled at chance
(88.8% training error for 4 epochs, measured). Robust training also,
to fit a CPU, intermediate bounds estimated with ``--proj`` 50 random projections (Wong et al. 2018b; every
reported error uses exact bounds; ``--paper`` trains exactly). PGD training: ``--pgd-train-steps`` sign
steps of 2.5·ε/steps from a random start (10 by default; Madry et al.'s 40 with ``--paper``).

Written as it goes under ``--out``, into the result store ``results.sqlite``: each finished (model, column)
cell (table ``cells``, with a hash of everything it depends on; a rerun skips cells whose hash matches) and
each MILP image (table ``milp_images``; also exported to ``milp/<model>-<hash>.csv``; an image PGD already
breaks is a verified counterexample and skips the solver unless ``--milp-every-image``); the
per-epoch training logs to ``logs/<model>.csv``, training checkpoints to ``checkpoints/`` (an interrupted
training resumes). Then ``table.csv``, ``table.md`` (with notes) and ``table.json`` (settings, checks).
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import polytope_lab as pl
from polytope_lab import data, evaluation, models, training

from .cli import ExperimentParser, command, machine_load, result_store, to_markdown, torch_threads, write_table

CLIP = (0.0, 1.0)
FULL_TEST = 10_000
N_CLASSES = 10
MODES = training.MODES
PGD_EVAL = "the paper's footnote 6 (as Madry et al.): 100 steps of size 0.001, no random start"
PGD_TRAIN = "sign steps of 2.5·ε/steps from a random start (Madry et al. use 40 on MNIST)"
#: published errors (%) at ε = 0.1, ball not clipped: clean, FGSM, PGD, bound
PUBLISHED = {
    "paper Table 1, standard training": [1.2, 39.7, 94.0, 100.0],
    "paper Table 1, robust training (20 epochs)": [2.9, 5.8, 6.2, 8.4],
    "convex_adversarial README, released robust model": [1.8, 3.9, 4.1, 5.8],
}
SETTLED = ("certified", "counterexample")
#: ``--exact``: the backends the exact columns can use
EXACT_BACKENDS = ("milp", "bab")
SECONDS = {"clean": "clean s", "fgsm": "FGSM s", "pgd": "PGD s", "bound": "bound s", "milp": "MILP s"}
MILP_COLUMNS = ["image", "label", "pgd_error", "bound_error", "status", "by", "seconds", "margin",
                "counterexample_margin"]
DEFAULTS = dict(eps=0.1, train_size=60_000, epochs=4, warmup_epochs=1, batch_size=50, lr=1e-3, pgd_train_steps=10,
                proj=50, test_size=FULL_TEST, eval_batch=50, attack_batch=500, pgd_steps=100, pgd_step_size=0.001,
                milp_samples=100, milp_time_limit=2.0)
QUICK = dict(train_size=500, epochs=1, test_size=100, milp_samples=3, milp_time_limit=1.0)
#: --paper: the paper's training (the seed code trains at a fixed ε, exactly, Madry et al.'s 40 PGD steps)
PAPER = dict(train_size=60_000, epochs=20, warmup_epochs=0, proj=0, pgd_train_steps=40)


def parse_args(argv=None):
    parser = ExperimentParser(__doc__.strip().splitlines()[0], out="figures/mnist_table", defaults=DEFAULTS,
                              quick=QUICK,
                              model_help="a state_dict of the paper's ConvNet to evaluate: short for --checkpoint "
                                         "<file stem>=PATH")
    parser.preset("--paper", PAPER, help="the paper's training: all 60,000 images, 20 epochs, no warm-up, exact "
                                         "robust training, 40-step PGD training (GPU recommended)")
    parser.setting("--eps", type=float, help="L∞ radius for training and evaluation")
    parser.add_argument("--clip", action="store_true",
                        help="intersect the ball with [0, 1] for training, FGSM, PGD and the bound (MILP always is)")
    parser.add_argument("--models", default=",".join(MODES),
                        help="comma-separated subset of standard,pgd,robust to train ('none': only --checkpoint)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="evaluate the state_dict at PATH as model NAME (repeatable); a NAME from --models "
                             "is loaded instead of trained")
    parser.setting("--train-size", type=int, help="first N training images")
    parser.setting("--epochs", type=int, help="training epochs")
    parser.setting("--warmup-epochs", type=int, help="robust and PGD training: epochs of linear ε warm-up")
    parser.setting("--batch-size", type=int, help="training batch size")
    parser.setting("--lr", type=float, help="Adam learning rate")
    parser.setting("--pgd-train-steps", type=int, help="PGD training: attack steps of 2.5·ε/steps")
    parser.setting("--proj", type=int,
                   help="robust training: random projections for the intermediate bounds (0: exact)")
    parser.setting("--test-size", type=int, help="first N test images")
    parser.setting("--eval-batch", type=int, help="images per bound batch")
    parser.setting("--attack-batch", type=int, help="images per FGSM / PGD batch")
    parser.setting("--pgd-steps", type=int, help="PGD evaluation steps")
    parser.setting("--pgd-step-size", type=float, help="PGD evaluation step size")
    parser.setting("--milp-samples", type=int, help="first N test images for the MILP")
    parser.add_argument("--milp-every-image", action="store_true",
                        help="run the MILP also on images PGD already breaks (a soundness cross-check; slower)")
    parser.setting("--milp-time-limit", type=float,
                   help="MILP seconds per image (all its margins together)")
    parser.add_argument("--exact", choices=EXACT_BACKENDS, default="milp",
                        help="backend of the exact ('MILP') columns: the MILP or branch and bound (bab); "
                             "same images, region and time limit")
    args = parser.parse_args(argv)
    names = [] if args.models.strip().lower() in ("", "none") else [m.strip() for m in args.models.split(",")]
    unknown = [m for m in names if m not in MODES]
    if unknown:
        parser.error(f"--models takes a comma-separated subset of {','.join(MODES)} (or 'none'), got {unknown}")
    args.models = [m for m in MODES if m in names]
    checkpoints = {}
    for item in args.checkpoint + ([f"{Path(args.model).stem}={args.model}"] if args.model else []):
        name, sep, path = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not path:
            parser.error(f"--checkpoint takes NAME=PATH with NAME of letters, digits, '_', '-', '.'; got {item!r}")
        if name in checkpoints:
            parser.error(f"--checkpoint names model {name!r} twice")
        if not Path(path).is_file():
            parser.error(f"--checkpoint {name}: no file at {path}")
        checkpoints[name] = path
    args.checkpoint = checkpoints
    if not args.models and not checkpoints:
        parser.error("nothing to evaluate: give --models and/or --checkpoint")
    for name, low in (("train_size", 1), ("epochs", 1), ("batch_size", 1), ("test_size", 1), ("eval_batch", 1),
                      ("pgd_steps", 1), ("pgd_train_steps", 1), ("milp_samples", 0), ("warmup_epochs", 0),
                      ("proj", 0), ("attack_batch", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if not 0 < args.eps < 1 or args.pgd_step_size <= 0 or args.milp_time_limit <= 0 or args.lr <= 0:
        parser.error("--eps must lie in (0, 1); --pgd-step-size, --milp-time-limit and --lr must be > 0")
    args.test_size = min(args.test_size, FULL_TEST)
    args.milp_samples = min(args.milp_samples, args.test_size)
    return args


# ------------------------------------------------------------------------------------------ bookkeeping


def key_of(obj) -> str:
    """A short hash of a JSON-able description: cells and files made under other settings never match."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stored_cell(store, model: str, column: str, key: str):
    """The finished cell of (model, column) in ``store`` if it was made under ``key``, else None."""
    cell = store.get((model, column))
    return cell if cell is not None and cell["key"] == key else None


def model_specs(args) -> dict:
    """{name: description}: what identifies each model (its training settings, or its file's SHA-256)."""
    specs = {}
    clip = list(CLIP) if args.clip else None
    for mode in args.models:
        specs[mode] = {"mode": mode, "train_size": args.train_size, "epochs": args.epochs, "eps": args.eps,
                       "batch_size": args.batch_size, "lr": args.lr, "clip": clip, "seed": args.seed,
                       "warmup_epochs": args.warmup_epochs if mode in ("robust", "pgd") else 0,
                       "attack_steps": args.pgd_train_steps if mode == "pgd" else None,
                       "proj": args.proj or None if mode == "robust" else None}
    for name, path in args.checkpoint.items():
        specs[name] = {"checkpoint": str(path), "sha256": data.sha256(path)}
    return specs


def get_model(name, spec, args, train_data):
    """(model, training log or None): loaded from ``--checkpoint``, or trained (resuming) under ``--out``."""
    if "checkpoint" in spec:
        return models.load_state(models.mnist_convnet(), spec["checkpoint"]).to(args.device), None
    X, y = train_data()
    torch.manual_seed(args.seed)
    net = models.mnist_convnet()
    out = Path(args.out)
    log = training.train(net, X[:args.train_size], y[:args.train_size], mode=spec["mode"], eps=args.eps,
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         warmup_epochs=spec["warmup_epochs"], clip=spec["clip"], attack_steps=args.pgd_train_steps,
                         seed=args.seed, device=args.device, log_path=out / "logs" / f"{name}.csv",
                         checkpoint_dir=out / "checkpoints" / f"{name}-{key_of(spec)}", progress=sys.stderr.isatty(),
                         architecture={"name": "mnist_convnet"}, proj=spec["proj"])
    return net, log


# ------------------------------------------------------------------------------------------ the columns


def errors(model, X, y, column, args, clip) -> torch.Tensor:
    """(N,) bool: image counted as an error in ``column`` ("clean", "fgsm", "pgd" or "bound")."""
    progress, eps, batch = sys.stderr.isatty(), args.eps, args.attack_batch
    if column == "clean":
        return evaluation.clean_errors(model, X, y, batch_size=batch, progress=progress)
    if column == "fgsm":
        return evaluation.attack_errors(model, X, y, eps, "fgsm", clip=clip, batch_size=batch, progress=progress)
    if column == "pgd":
        return evaluation.attack_errors(model, X, y, eps, "pgd", clip=clip, batch_size=batch, progress=progress,
                                        steps=args.pgd_steps, step_size=args.pgd_step_size, random_start=False)
    return evaluation.robust_errors(model, X, y, eps, clip=clip, n_classes=N_CLASSES, batch_size=args.eval_batch,
                                    progress=progress)


def exact_bounder(args):
    """The exact columns' backend (``--exact``): the MILP (HiGHS, 1 thread) or bab, with ``--milp-time-limit``."""
    if args.exact == "bab":
        return pl.Bounder.create("bab", time_limit=args.milp_time_limit, progress=sys.stderr.isatty())
    return pl.Bounder.create("milp", time_limit=args.milp_time_limit, threads=1)


def milp_column(model, X, y, args, name: str, key: str, store) -> dict:
    """MILP verdicts on the first ``--milp-samples`` images (each stored in ``store`` under ``(name, key,
    image)`` as it is made, kept on a rerun; exported to ``milp/<name>-<key>.csv``), with PGD and the dual
    bound on the same images over the same region (ball ∩ [0, 1])."""
    n = args.milp_samples
    model = model.cpu()
    X, y = X[:n].cpu(), y[:n].cpu()
    started = time.perf_counter()
    pgd_wrong = errors(model, X, y, "pgd", args, CLIP)
    dual_open = errors(model, X, y, "bound", args, CLIP)
    side_seconds = time.perf_counter() - started
    bounder = exact_bounder(args)
    # PGD's point in ball ∩ [0, 1] is misclassified: a verified counterexample, no solve
    known = {} if args.milp_every_image else {i: {"by": "pgd"} for i in range(n) if pgd_wrong[i]}
    records = evaluation.certify_each(bounder, model, X, y, args.eps, clip=CLIP, store=store, prefix=(name, key),
                                      known=known, progress=sys.stderr.isatty())
    done = pd.DataFrame([{**r, "pgd_error": bool(pgd_wrong[r["image"]]), "bound_error": bool(dual_open[r["image"]]),
                          "by": r.get("by", args.exact)} for r in records], columns=MILP_COLUMNS)
    done.to_csv(Path(args.out) / "milp" / f"{name}-{key}.csv", index=False)
    t = done[done["image"] < n]
    status = t["status"]
    refuted, settled = int((status == "counterexample").sum()), int(status.isin(SETTLED).sum())
    return {"n": n, "refuted": refuted, "open": n - settled, "settled": settled,
            "solved": int((t["by"] == args.exact).sum()),
            "pgd_errors": int(pgd_wrong.sum()), "bound_errors": int(dual_open.sum()),
            # soundness cross-checks: MILP-certified yet broken by PGD; a counterexample the dual certifies
            "certified_but_attacked": int(((status == "certified") & pgd_wrong[t["image"].tolist()].numpy()).sum()),
            "refuted_but_bounded": int(((status == "counterexample") & ~dual_open[t["image"].tolist()].numpy()).sum()),
            "statuses": {str(k): int(v) for k, v in status.value_counts().items()},
            "seconds": side_seconds + float(t["seconds"].sum())}


# ------------------------------------------------------------------------------------------ the table


def region_name(clip) -> str:
    return "ball∩[0,1]" if clip else "ball"


def table_row(name, spec, log, cells, args) -> dict:
    R, M = region_name(args.clip), region_name(True)

    def pct(cell, k="errors"):
        return float("nan") if cell is None else 100.0 * cell[k] / cell["n"]

    source = spec.get("mode", "checkpoint " + Path(spec.get("checkpoint", "")).name)
    row = {"model": name, "source": source + (f" (proj {spec['proj']})" if spec.get("proj") else ""),
           "train images": spec.get("train_size"), "epochs": spec.get("epochs"),
           "train s/epoch": float(log["seconds"].mean()) if log is not None and len(log) else float("nan"),
           "test images": args.test_size, "clean err %": pct(cells["clean"]),
           f"FGSM err % ({R})": pct(cells["fgsm"]), f"PGD err % ({R})": pct(cells["pgd"]),
           f"bound err % ({R})": pct(cells["bound"])}
    m = cells["milp"]
    row.update({"MILP images": args.milp_samples if m else 0, "MILP settled %": pct(m, "settled"),
                f"MILP exact err % ({M})": pct(m, "refuted"),
                "MILP exact err % upper": float("nan") if m is None else 100.0 * (m["refuted"] + m["open"]) / m["n"],
                f"PGD err % on MILP images ({M})": pct(m, "pgd_errors"),
                f"bound err % on MILP images ({M})": pct(m, "bound_errors")})
    for column, label in SECONDS.items():
        row[label] = float("nan") if cells[column] is None else cells[column]["seconds"]
    return row


def checks(cells) -> dict:
    """The orderings that must hold (bounds are sound, attacks count clean errors); FGSM ≤ PGD is empirical."""
    e = {k: None if cells[k] is None else cells[k]["errors"] for k in ("clean", "fgsm", "pgd", "bound")}
    out = {}
    for a, b in (("clean", "fgsm"), ("fgsm", "pgd"), ("pgd", "bound"), ("clean", "bound")):
        if e[a] is not None and e[b] is not None:
            out[f"{a} <= {b}"] = e[a] <= e[b]
    m = cells["milp"]
    if m is not None:
        out["PGD <= MILP upper (MILP images)"] = m["pgd_errors"] <= m["refuted"] + m["open"]
        out["MILP exact <= bound (MILP images)"] = m["refuted"] <= m["bound_errors"]
        out["no MILP-certified image broken by PGD"] = m["certified_but_attacked"] == 0
        out["no MILP counterexample certified by the bound"] = m["refuted_but_bounded"] == 0
    return out


def notes(args, milp_ok) -> list:
    R = region_name(args.clip)
    lines = [
        f"ε = {args.eps}; first {args.test_size} MNIST test images; errors in % of them; "
        "'X s' = wall-clock seconds for column X (1-minute load average as it ended: load_per_cell in table.json).",
        f"FGSM, PGD, bound: L∞ {R}. An attacked image counts as an error if the attack's point or the image "
        f"itself is misclassified. PGD: {PGD_EVAL} (the highest-loss iterate is kept).",
        "Bound: the dual bound (Bounder 'dual', fixed α); an image counts unless every margin e_y − e_j "
        "is certified.",
        ("MILP: MILPBounder.certify (HiGHS, 1 thread, " if args.exact == "milp" else
         "MILP columns by branch and bound (--exact bab: BaBBounder.certify, ")
        + f"{args.milp_time_limit:g} s per image) on the first "
        f"{args.milp_samples} images over the ball ∩ [0,1]; 'exact err' counts verified counterexamples, "
        "'upper' adds the images not settled in time; PGD and the bound are rerun there on ball ∩ [0,1]"
        + ("." if args.milp_every_image else "; an image PGD breaks there counts as a verified counterexample "
           "without a solve."),
        "Published (%, ε = 0.1, ball not clipped; clean / FGSM / PGD / bound): "
        + "; ".join(f"{k}: {' / '.join(map(str, v))}" for k, v in PUBLISHED.items()) + ".",
    ]
    if args.models:
        lines.append(f"Training ({', '.join(args.models)}): Adam lr {args.lr}, batches of {args.batch_size}, first "
                     f"{args.train_size} training images, {args.epochs} epoch(s); robust and PGD: ε warm-up over "
                     f"{args.warmup_epochs} epoch(s); robust: "
                     + (f"intermediate bounds from {args.proj} random projections (evaluation exact)" if args.proj
                        else "exact bounds") + f"; PGD: {args.pgd_train_steps} {PGD_TRAIN}; training region L∞ {R}.")
    if not milp_ok:
        lines.append("MILP columns skipped: the MILP backend is not available here "
                     "('milp' not in Bounder.available()).")
    return lines


def cell_keys(spec, args, clip) -> dict:
    """{column: key}: a hash of everything the column's value depends on."""
    model = key_of(spec)
    base = {"model": model, "test_size": args.test_size, "eps": args.eps}
    return {column: key_of(desc) for column, desc in {
        "clean": {"model": model, "test_size": args.test_size},
        "fgsm": {**base, "clip": clip},
        "pgd": {**base, "clip": clip, "steps": args.pgd_steps, "step_size": args.pgd_step_size},
        "bound": {**base, "clip": clip, "bounder": "dual"},
        "milp": {"model": model, "eps": args.eps, "n": args.milp_samples, "solver": "HIGHS",
                 "time_limit": args.milp_time_limit, "pgd": [args.pgd_steps, args.pgd_step_size],
                 "every_image": args.milp_every_image, **({} if args.exact == "milp" else {"exact": args.exact})}
    }.items()}


def model_cells(name, model, keys, X, y, args, store, milp_store, milp_ok) -> dict:
    """{column: cell}: the stored cell when its key matches, else computed and stored (None: MILP skipped)."""
    clip = CLIP if args.clip else None
    cells = {}
    for column, key in keys.items():
        cell = stored_cell(store, name, column, key)
        if cell is None and column == "milp" and (not milp_ok or args.milp_samples == 0):
            cells[column] = None
            continue
        if cell is None:
            start = time.perf_counter()
            if column == "milp":
                cell = milp_column(model, X, y, args, name, key, milp_store)
                model.to(args.device)
                what = f"{cell['refuted']}/{cell['n']} refuted, {cell['open']} open"
            else:
                flags = errors(model, X, y, column, args, clip)
                cell = {"n": len(flags), "errors": int(flags.sum()), "seconds": time.perf_counter() - start}
                what = f"{cell['errors']}/{cell['n']} errors"
            region = "none" if column == "clean" else region_name(column == "milp" or args.clip)
            cell.update(model=name, column=column, key=key, region=region, load=machine_load()["loadavg_1min"])
            store.put((name, column), cell)
            print(f"[{name}] {column}: {what} ({cell['seconds']:.1f} s)", flush=True)
        cells[column] = cell
    return cells


def main(argv=None):
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args, argv)


def run(args, argv):
    out = Path(args.out)
    (out / "milp").mkdir(parents=True, exist_ok=True)
    started, load_start = time.perf_counter(), machine_load()
    milp_ok = args.exact in pl.Bounder.available()
    X, y = data.mnist("test", root=args.data_dir)
    X, y = X[:args.test_size].to(args.device), y[:args.test_size].to(args.device)
    train_cache = {}

    def train_data():
        if not train_cache:
            train_cache["xy"] = data.mnist("train", root=args.data_dir)
        return train_cache["xy"]

    store, milp_store, specs = result_store(out, "cells"), result_store(out, "milp_images"), model_specs(args)
    rows, all_checks, logs, statuses, loads = [], {}, {}, {}, {}
    for name, spec in specs.items():
        model, log = get_model(name, spec, args, train_data)
        model.eval()
        if log is not None:
            logs[name] = [round(s, 2) for s in log["seconds"]]
            print(f"[{name}] trained: {len(log)} epoch(s), s/epoch {logs[name]}", flush=True)
        cells = model_cells(name, model, cell_keys(spec, args, CLIP if args.clip else None), X, y, args, store,
                            milp_store, milp_ok)
        rows.append(table_row(name, spec, log, cells, args))
        all_checks[name] = checks(cells)
        statuses[name] = None if cells["milp"] is None else cells["milp"]["statuses"]
        loads[name] = {column: cell.get("load") for column, cell in cells.items() if cell is not None}
    store.close()
    milp_store.close()
    df = pd.DataFrame(rows)
    meta = {"command": command("mnist_table", argv),
            "eps": args.eps, "clip": args.clip, "test_size": args.test_size, "seed": args.seed,
            "quick": args.quick, "paper": args.paper, "models": specs,
            "pgd_eval": {"steps": args.pgd_steps, "step_size": args.pgd_step_size, "random_start": False,
                         "why": PGD_EVAL},
            "fgsm": "one sign step of size ε", "pgd_train": {"steps": args.pgd_train_steps, "why": PGD_TRAIN},
            "training": {"train_size": args.train_size, "epochs": args.epochs, "warmup_epochs": args.warmup_epochs,
                         "batch_size": args.batch_size, "lr": args.lr, "seconds_per_epoch": logs},
            "milp": {"available": milp_ok, "samples": args.milp_samples, "backend": args.exact,
                     "solver": "HIGHS, 1 thread" if args.exact == "milp" else "bab (float64 CPU)",
                     "time_limit_per_image": args.milp_time_limit, "region": "ball ∩ [0, 1]", "statuses": statuses},
            "checks": all_checks, "published_percent_clean_fgsm_pgd_bound": PUBLISHED,
            "device": args.device, "torch": torch.__version__,
            "seconds_this_run": round(time.perf_counter() - started, 1),
            "load_at_start": load_start, "load_at_end": machine_load(), "load_per_cell": loads}
    paths = write_table(df, out, "table", meta=meta, json_too=True)
    with open(paths[1], "a") as f:
        f.write("\nNotes:\n\n" + "".join(f"- {line}\n" for line in notes(args, milp_ok)))
    print(to_markdown(df))
    for name, result in all_checks.items():
        failed = [k for k, ok in result.items() if not ok]
        if failed:
            print(f"warning: {name}: check(s) failed: {', '.join(failed)}")
    print(f"{meta['seconds_this_run']} s; wrote " + ", ".join(str(p) for p in paths))
    return df


if __name__ == "__main__":
    main()

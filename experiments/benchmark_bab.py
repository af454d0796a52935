"""Benchmark part l: branch and bound ("bab") against the MILP, side by side, the same per-example time limit.

Pieces (``--bab-pieces``, any subset, each runnable alone), every example timed whole (the two backends in
turn on each example) and its result put to the result store (``<out>/results.sqlite``, table
``bab_per_example``) as soon as it is made; a rerun with ``--resume`` skips the examples already stored
(keys name the piece, backend and time limit):

  mnistfc.    VNN-COMP 2021 ``mnistfc`` 256x2 (``--vnncomp-dir``: its ``instances.csv``, the 256x2 lines),
              ``verify_property`` with ``exact="bab"`` and with ``exact="milp"``: decided (sat + unsat) and
              median seconds, on all properties and on those that neither the dual, the attack nor the
              optimised dual decides (the exact stage decided them, or nobody did), and the ratio;
  pgd.        the PGD-trained ConvNet of ``experiments.mnist_table``'s default run (trained here, or its
              checkpoint under ``<out>`` reused), ε = 0.1 ∩ [0, 1], first ``--bab-images`` test images,
              each backend's default ``certify``: decided within the limit, median, ratio;
  pretrained. the pretrained ConvNet (``--model``), same setting: equal verdicts, counts, median and 90th
              percentile seconds per image;
  mlp.        the 784-100-100-10 MLP of ``experiments.tightness`` (trained here, checkpointed), ε = 0.1 ∩
              [0, 1]: exact minima and maxima of the 9 margins (``bound``) of the first ``--bab-mlp-images``
              images, how many images each settles, the largest difference where both are optimal.
Per piece also BaB's subdomains per second (all its searches over its wall seconds) and the process's peak
resident memory when the piece ends (``resource.getrusage``: monotone over the run). A run that hits the
limit (or ends undecided) counts as the limit in every median and ratio. Writes ``<out>/bab_per_example.csv``
and the summary ``<out>/bab_summary.csv``/``.md``; returns the benchmark's rows.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import polytope_lab as pl
from polytope_lab import data, models, training
from polytope_lab.bab import BaBBounder
from polytope_lab.evaluation import certify_each

from . import mnist_table, tightness
from .cli import result_store, write_table
from .trained import robust_mlp
from .vnncomp_bench import read_instances

CLIP = (0.0, 1.0)
EPS = 0.1
PIECES = ("mnistfc", "pgd", "pretrained", "mlp")
BACKENDS = ("bab", "milp")
DECIDED = ("certified", "counterexample", "sat", "unsat", "optimal")
BOUND_STAGES = ("dual", "attack", "dual-optimized")
MNISTFC_NET = "mnist-net_256x2.onnx"
TABLE = "bab_per_example"
PER_EXAMPLE = ["piece", "backend", "time_limit", "example", "status", "seconds", "stage", "subdomains", "value"]
DEFAULTS = dict(bab_time_limit=120.0, bab_pieces=list(PIECES), bab_images=100, bab_properties=None,
                bab_mlp_images=10, bab_pgd_train_size=mnist_table.DEFAULTS["train_size"],
                bab_pgd_epochs=mnist_table.DEFAULTS["epochs"], bab_mlp_train_images=tightness.DEFAULTS["mlp_images"],
                bab_mlp_epochs=tightness.DEFAULTS["mlp_epochs"])
QUICK = dict(bab_time_limit=1.0, bab_images=2, bab_properties=1, bab_mlp_images=1, bab_pgd_train_size=300,
             bab_pgd_epochs=1, bab_mlp_train_images=500, bab_mlp_epochs=1)


def pieces(text) -> list:
    names = [p.strip() for p in str(text).split(",") if p.strip()]
    unknown = sorted(set(names) - set(PIECES))
    if unknown or not names:
        raise ValueError(f"--bab-pieces takes a comma-separated subset of {','.join(PIECES)}, got {text!r}")
    return names


def add_arguments(parser):
    parser.add_settings(DEFAULTS, QUICK)
    parser.setting("--bab-time-limit", type=float, help="part l: seconds per example, both backends")
    parser.setting("--bab-pieces", type=pieces, help=f"part l: comma-separated subset of {','.join(PIECES)}")
    parser.setting("--bab-images", type=int, help="part l (pgd, pretrained): first N test images")
    parser.setting("--bab-properties", type=int, help="part l (mnistfc): first N 256x2 properties (none: all)")
    parser.setting("--bab-mlp-images", type=int, help="part l (mlp): first N test images")
    parser.setting("--bab-pgd-train-size", type=int, help="part l (pgd): training images of the PGD ConvNet")
    parser.setting("--bab-pgd-epochs", type=int, help="part l (pgd): epochs of the PGD ConvNet")
    parser.setting("--bab-mlp-train-images", type=int, help="part l (mlp): training images of the MLP")
    parser.setting("--bab-mlp-epochs", type=int, help="part l (mlp): epochs of the MLP")
    parser.add_argument("--vnncomp-dir", default=None,
                        help="part l (mnistfc): the VNN-COMP 2021 mnistfc folder (instances.csv, onnx, vnnlib)")


# ---------------------------------------------------------------------------------------------- helpers


def capped(seconds, statuses, limit) -> list:
    """Seconds per example, an undecided one (or one past the limit) counted as the limit."""
    return [min(float(s), limit) if st in DECIDED else limit for s, st in zip(seconds, statuses)]


def median(values) -> float:
    return statistics.median(values) if len(values) else float("nan")


def peak_rss_mib() -> float:
    """The process's peak resident set size so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bounders(args) -> dict:
    """The two backends, each with the per-example time limit (the MILP with ``--threads`` threads)."""
    return {"bab": pl.Bounder.create("bab", time_limit=args.bab_time_limit, progress=sys.stderr.isatty()),
            "milp": pl.Bounder.create("milp", time_limit=args.bab_time_limit, threads=args.threads)}


def stored_runs(store, piece, limit, n, ones: dict, resume: bool) -> dict:
    """{backend: records of examples 0..n-1} of (piece, backend, limit), the backends interleaved per
    example (so drift in the machine's speed falls on both): from the store with ``resume``, else
    ``ones[backend](i)`` (put at once, with the BaB subdomains it bounded)."""
    records = {backend: [] for backend in ones}
    for i in tqdm(range(n), desc=f"l: {piece}", leave=False):
        for backend, one in ones.items():
            key = (piece, backend, limit, i)
            if not (resume and key in store):
                before = BaBBounder.subdomains_bounded
                record = one(i)
                record.update(piece=piece, backend=backend, time_limit=limit, example=i,
                              subdomains=BaBBounder.subdomains_bounded - before, peak_rss_mib=peak_rss_mib())
                store.put(key, record)
            records[backend].append(store.get(key))
    return records


def side_by_side(piece: str, what: str, records: dict, limit: float, subset=None) -> list:
    """Rows: decided and median (capped) seconds per backend, and the MILP/BaB ratio of the medians."""
    rows, med = [], {}
    for backend in BACKENDS:
        rs = [r for r in records[backend] if subset is None or r["example"] in subset]
        secs = capped([r["seconds"] for r in rs], [r["status"] for r in rs], limit)
        decided = sum(r["status"] in DECIDED and r["seconds"] <= limit for r in rs)
        med[backend] = median(secs)
        rows += [{"part": "l", "quantity": f"{piece}: {backend} decided{what}", "polytope_lab": f"{decided}/{len(rs)}",
                  "note": f"within {limit:g} s"},
                 {"part": "l", "quantity": f"{piece}: {backend} median s{what}", "polytope_lab": med[backend],
                  "note": f"a run past {limit:g} s or undecided counts as {limit:g} s; 90th percentile "
                          f"{np.percentile(secs, 90) if secs else float('nan'):.3g} s"}]
    rows.append({"part": "l", "quantity": f"{piece}: MILP / BaB median{what}",
                 "polytope_lab": med["milp"] / med["bab"] if med["bab"] > 0 else float("nan"),
                 "note": "goal ≥ 10×"})
    return rows


def resources(piece: str, records: dict, rss_before: float) -> list:
    """Subdomains per second and peak memory. The peak is the largest the records carry (the process's peak
    when each was run), so a resumed piece reports the run that measured it; NaN if none carries one."""
    bab = records["bab"]
    seconds, subdomains = sum(r["seconds"] for r in bab), sum(r["subdomains"] for r in bab)
    peaks = [r["peak_rss_mib"] for b in records for r in records[b] if r.get("peak_rss_mib") is not None]
    peak = max(peaks) if peaks else float("nan")
    return [{"part": "l", "quantity": f"{piece}: BaB subdomains per second", "polytope_lab":
             subdomains / seconds if seconds > 0 else float("nan"),
             "note": f"{subdomains} subdomains bounded in {seconds:.3g} s of BaB wall time (root and attack included)"},
            {"part": "l", "quantity": f"{piece}: peak resident memory, MiB", "polytope_lab": peak,
             "note": f"whole process, monotone over the run ({rss_before:.0f} MiB before the piece in this run)"
                     if peaks else "not recorded: every record comes from a run that did not store it"}]


# ---------------------------------------------------------------------------------------------- pieces


def piece_mnistfc(args, store) -> tuple:
    """VNN-COMP mnistfc 256x2 through verify_property, exact="bab" and exact="milp"."""
    if args.vnncomp_dir is None:
        return [{"part": "l", "quantity": "mnistfc: skipped", "note": "no --vnncomp-dir given"}], {}
    from .vnncomp_instance import load_instance
    root = Path(args.vnncomp_dir)
    instances = [i for i in read_instances(root / "instances.csv") if i[0].name == MNISTFC_NET][:args.bab_properties]
    limit, networks = args.bab_time_limit, {}

    def solve(backend):
        def one(i):
            onnx, vnnlib, _ = instances[i]
            inst = load_instance(onnx, vnnlib, networks)
            r = pl.verify_property(inst.network, inst.prop, limit, exact=backend, threads=args.threads)
            return {"status": r.verdict, "seconds": r.seconds, "stage": r.stage, "value": vnnlib.name}
        return one

    records = stored_runs(store, "mnistfc", limit, len(instances), {b: solve(b) for b in BACKENDS}, args.resume)
    hard = {r["example"] for b in BACKENDS for r in records[b] if r["stage"] not in BOUND_STAGES}
    rows = side_by_side("mnistfc", f" (of {len(instances)} properties)", records, limit)
    rows += side_by_side("mnistfc", f", properties the bounds and the attack leave open ({len(hard)})", records,
                         limit, hard)
    return rows, records


def certify_piece(piece, model, X, y, args, store) -> tuple:
    """Each backend's default certify on the first --bab-images images, ε ∩ [0, 1]."""
    n, limit = min(args.bab_images, len(X)), args.bab_time_limit
    def certify(bounder):
        def one(i):
            r = certify_each(bounder, model, X[i:i + 1], y[i:i + 1], EPS, clip=CLIP)[0]
            return {"status": r["status"], "seconds": r["seconds"], "stage": None, "value": r["margin"]}
        return one

    records = stored_runs(store, piece, limit, n, {b: certify(bd) for b, bd in bounders(args).items()}, args.resume)
    rows = side_by_side(piece, f" (first {n} images, ε={EPS} ∩ [0,1])", records, limit)
    verdicts = {b: [r["status"] for r in records[b]] for b in BACKENDS}
    both = [i for i in range(n) if all(verdicts[b][i] in ("certified", "counterexample") for b in BACKENDS)]
    differ = [i for i in both if verdicts["bab"][i] != verdicts["milp"][i]]
    counts = {b: f"{verdicts[b].count('certified')} certified, {verdicts[b].count('counterexample')} "
                 f"non-robust, {n - verdicts[b].count('certified') - verdicts[b].count('counterexample')} open"
              for b in BACKENDS}
    rows.append({"part": "l", "quantity": f"{piece}: same verdicts where both decided",
                 "polytope_lab": "yes" if not differ else f"no: images {differ}",
                 "note": f"{len(both)} decided by both; BaB {counts['bab']}; MILP {counts['milp']}"})
    return rows, records


def pgd_convnet(X_train, y_train, args):
    """The ConvNet PGD-trained as experiments.mnist_table's default run does (its training settings),
    checkpointed under --out (a rerun resumes or reuses it)."""
    d = mnist_table.DEFAULTS
    torch.manual_seed(args.seed)
    net = models.mnist_convnet()
    n = args.bab_pgd_train_size
    training.train(net, X_train[:n], y_train[:n], mode="pgd", eps=d["eps"], epochs=args.bab_pgd_epochs,
                   batch_size=d["batch_size"], lr=d["lr"], warmup_epochs=min(d["warmup_epochs"], args.bab_pgd_epochs),
                   attack_steps=d["pgd_train_steps"], seed=args.seed, progress=sys.stderr.isatty(),
                   checkpoint_dir=Path(args.out) / f"bab_pgd_convnet_{n}_images_{args.bab_pgd_epochs}_epochs",
                   architecture={"name": "mnist_convnet"})
    return net.eval()


def piece_mlp(X_train, y_train, X, y, args, store) -> tuple:
    """Exact margin minima and maxima of the tightness MLP by ``bound``, both backends."""
    t = tightness.DEFAULTS
    directory = Path(args.out) / f"bab_mlp_{args.bab_mlp_train_images}_images_{args.bab_mlp_epochs}_epochs"
    mlp, _ = robust_mlp(X_train[:args.bab_mlp_train_images], y_train[:args.bab_mlp_train_images], t["mlp_sizes"],
                        eps=t["mlp_eps"], epochs=args.bab_mlp_epochs, directory=directory, seed=args.seed,
                        warmup_epochs=t["mlp_warmup"], clip=CLIP, flatten_layer=True)
    mlp.eval()
    n, limit = min(args.bab_mlp_images, len(X)), args.bab_time_limit
    def exact(bounder):
        def one(i):
            start = time.perf_counter()
            b = bounder.bound(mlp, pl.LinfBall(X[i:i + 1], EPS, clip=CLIP), pl.margin_matrix(y[i:i + 1], 10))
            return {"status": b.status[0], "seconds": time.perf_counter() - start, "stage": None,
                    "value": b.lower[0].tolist() + b.upper[0].tolist()}
        return one

    records = stored_runs(store, "mlp", limit, n, {b: exact(bd) for b, bd in bounders(args).items()}, args.resume)
    rows = side_by_side("mlp", f" (exact margin bounds, first {n} images, ε={EPS} ∩ [0,1])", records, limit)
    both = [(a, m) for a, m in zip(records["bab"], records["milp"]) if a["status"] == m["status"] == "optimal"]
    diff = max((float(np.max(np.abs(np.subtract(a["value"], m["value"])))) for a, m in both), default=float("nan"))
    rows.append({"part": "l", "quantity": "mlp: max |BaB − MILP| where both are optimal", "polytope_lab": diff,
                 "note": f"{len(both)} images settled by both; minima and maxima of the 9 margins"})
    return rows, records


# ---------------------------------------------------------------------------------------------- the part


def part_l(model, X, y, args):
    """The pieces of --bab-pieces, BaB and MILP side by side; rows for the benchmark's table."""
    out = Path(args.out)
    store = result_store(out, TABLE)
    train = None

    def train_data():
        nonlocal train
        if train is None:
            train = data.mnist("train", root=args.data_dir)
        return train

    rows, per_example = [], []
    try:
        for piece in args.bab_pieces:
            rss = peak_rss_mib()
            if piece == "mnistfc":
                r, records = piece_mnistfc(args, store)
            elif piece == "pgd":
                r, records = certify_piece("pgd", pgd_convnet(*train_data(), args), X, y, args, store)
            elif piece == "pretrained":
                r, records = certify_piece("pretrained", model, X, y, args, store)
            else:
                r, records = piece_mlp(*train_data(), X, y, args, store)
            rows += r + (resources(piece, records, rss) if records else [])
            per_example += [rec for b in records for rec in records[b]]
    finally:
        store.close()
    frame = pd.DataFrame(per_example, columns=PER_EXAMPLE)
    frame.to_csv(out / "bab_per_example.csv", index=False)
    write_table(pd.DataFrame(rows), out, "bab_summary")
    return rows

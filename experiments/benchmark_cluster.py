"""Benchmark part j: test-set verification on a Dask cluster (``polytope_lab.verify_dataset``).

MILP ``certify`` (HiGHS, one thread) of the first ``--cluster-images`` test images of the pretrained
ConvNet at ε ∩ [0, 1], in one run: an embedded ``LocalCluster`` of 1 worker process and then one of 2
(one thread each), each warmed up first (every worker certifies one image outside the timed set) and its
start not timed; each timed run writes its results to a fresh table of ``<out>/cluster_bench.sqlite``, as
a real run does. Reported: the wall time of each, the speed-up (goal ≥ 1.8× on 2 cores), and the
overhead per example at the chunk size used, ``(workers × wall − Σ certify seconds) / images`` (worker
time not spent in ``certify``: scheduling, transfers, the store), and whether both runs reach the same
verdicts. The per-image results of the 2-worker run go to ``<out>/cluster_per_image.csv``.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

import polytope_lab as pl
from polytope_lab import runs
from polytope_lab.dataset import cluster_client
from polytope_lab.store import ResultStore

CLIP = (0.0, 1.0)
BACKEND = "milp"
OPTIONS = {"threads": 1}
DEFAULTS = dict(cluster_images=200, cluster_chunk=None)
QUICK = dict(cluster_images=10)


def add_arguments(parser):
    parser.add_settings(DEFAULTS, QUICK)
    parser.setting("--cluster-images", type=int, help="part j: first N test images")
    parser.setting("--cluster-chunk", type=int,
                   help="part j: images per task (none: verify_dataset's default, about 8 tasks per worker)")


def warm_worker(model, x, y, eps):
    """Run on every worker before timing: imports, torch and HiGHS initialised by one certify."""
    torch.set_num_threads(1)
    pl.Bounder.create(BACKEND, **OPTIONS).certify(model, pl.LinfBall(x, eps, clip=CLIP), y)


def timed_run(model, X, y, eps, workers: int, args, store: ResultStore):
    """(results frame, wall seconds, cluster start seconds) of one run on a fresh embedded cluster."""
    start = time.perf_counter()
    with cluster_client(workers=workers) as client:
        client.run(warm_worker, model, X[-1:], y[-1:], eps)
        started = time.perf_counter() - start
        store.clear()
        t0 = time.perf_counter()
        frame = pl.verify_dataset(model, X[:-1], y[:-1], eps, clip=CLIP, backend=BACKEND, options=OPTIONS,
                                  client=client, store=store, chunk_size=args.cluster_chunk)
        wall = time.perf_counter() - t0
    return frame, wall, started


def part_j(model, X, y, eps, args):
    """Wall time with 1 and 2 worker processes, speed-up, per-example overhead."""
    n = min(args.cluster_images, len(X) - 1)
    X, y = X[:n + 1], y[:n + 1]  # the last one only warms the workers up
    out, results = Path(args.out), {}
    for workers in (1, 2):
        with ResultStore(out / "cluster_bench.sqlite", f"cluster_{workers}_workers") as store:
            results[workers] = timed_run(model, X, y, eps, workers, args, store)
    (one, wall1, start1), (two, wall2, start2) = results[1], results[2]
    two.to_csv(out / "cluster_per_image.csv", index=False)
    chunk = {1: one.attrs["chunk_size"], 2: two.attrs["chunk_size"]}
    what = f"MILP certify ({OPTIONS['threads']} HiGHS thread), first {n} images, ε={eps} ∩ [0,1]"
    s1, s2 = runs.summary(one), runs.summary(two)
    same = one["status"].tolist() == two["status"].tolist()
    verdicts = f"{s2['certified']} certified, {s2['counterexamples']} counterexamples, {s2['undecided']} undecided"
    overhead = {w: 1000 * (w * wall - s["certify_seconds"]) / n for w, wall, s in ((1, wall1, s1), (2, wall2, s2))}
    return [
        {"part": "j", "quantity": f"{what}: wall s, 1 worker process", "polytope_lab": wall1,
         "note": f"Σ certify {s1['certify_seconds']:.1f} s; chunks of {chunk[1]}; cluster start "
                 f"{start1:.1f} s (not timed); results stored per chunk"},
        {"part": "j", "quantity": f"{what}: wall s, 2 worker processes", "polytope_lab": wall2,
         "note": f"Σ certify {s2['certify_seconds']:.1f} s; chunks of {chunk[2]}; cluster start {start2:.1f} s "
                 "(not timed)"},
        {"part": "j", "quantity": "speed-up, 2 workers over 1 (one thread each)", "polytope_lab": wall1 / wall2,
         "note": f"goal ≥ 1.8× on 2 cores; Σ certify with 2 / with 1: "
                 f"{s2['certify_seconds'] / s1['certify_seconds']:.2f} (> 1: the two processes slow each other)"},
        {"part": "j", "quantity": f"overhead per example, ms (chunks of {chunk[1]}), 1 worker",
         "polytope_lab": overhead[1], "note": "(wall − Σ certify) / images: scheduling, transfers, the store"},
        {"part": "j", "quantity": f"overhead per example, ms (chunks of {chunk[2]}), 2 workers",
         "polytope_lab": overhead[2], "note": "(2 × wall − Σ certify) / images, idle time at the end included"},
        {"part": "j", "quantity": "same verdicts with 1 and 2 workers", "polytope_lab": "yes" if same else "no",
         "note": f"{verdicts}; robust error {100 * s2['robust_error']:.2f}%"},
    ]

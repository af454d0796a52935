"""Benchmark parts g and h: the scalable variants of the dual bound (Wong et al. 2018b) on the paper's MNIST
ConvNet, ε = 0.1, L∞ ball not clipped (as in parts a–d).

  g. Provably robust training step (``robust_loss`` forward + backward + one Adam step, batches of
     ``--batch`` MNIST training images, ``--threads`` threads), exact bounds against random projections
     (``proj=--proj``): seconds per step (wall clock and process CPU time, the two variants interleaved
     step by step, each training its own copy of the pretrained weights), their ratio, and seconds per
     full-MNIST epoch (60,000 images) extrapolated from the median step; plus the exact and the estimated
     robust loss and error on the first batch (same weights). With convex_adversarial installed (not
     under --quick), its exact and projected (``proj``, ``norm_type="l1_median"``) steps alongside.
  h. Peak memory of the exact bound (``DualBounder``, torch.no_grad, margin objectives) against the batch
     size, unchunked, chunked over examples (``max_memory``) and chunked over columns (``column_chunk``).
     Each setting runs in a fresh Python process holding torch, the model and the images
     (``python -m experiments.measure_memory``); the figure is the process's peak resident set size during
     the call minus its resident size just before (Linux: the peak is reset through /proc/self/clear_refs;
     elsewhere ``ru_maxrss``, which may include earlier peaks). It counts every page the call touched
     (tensors, allocator caches, convolution buffers), not tensor bytes.

Run through ``python -m experiments.benchmark --parts gh``; this module is not an entry point.
"""
from __future__ import annotations

import argparse
import copy
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import polytope_lab as pl

from . import measure_memory

TRAIN_SET_SIZE = 60_000
EPOCH_TARGET_S = 600.0   # the goal: ≤ 10 minutes per epoch on 2 cores
RATIO_TARGET = 8.0       # the goal: projections ≥ 8× faster per step
MEMORY_SETTINGS = ("unchunked", "examples", "columns")
DEFAULTS = dict(proj=50, train_steps=6, lr=1e-4, train_reference=True, memory_batches=[1, 10, 50, 100],
                max_memory_mib=256.0, column_chunk=64, memory_settings=list(MEMORY_SETTINGS))
#: --quick: the reference's exact training step alone takes seconds, so it is skipped
QUICK = dict(train_steps=1, train_reference=False, memory_batches=[10], memory_settings=["unchunked", "columns"])


def add_arguments(parser):
    parser.add_settings(DEFAULTS, QUICK)
    parser.setting("--proj", type=int, help="part g: random projections k")
    parser.setting("--train-steps", type=int, help="part g: timed steps per variant")
    parser.setting("--lr", type=float, help="part g: Adam learning rate")
    parser.setting("--train-reference", action=argparse.BooleanOptionalAction,
                   help="part g: time convex_adversarial's training steps too (when it is installed)")
    parser.setting("--memory-batches", type=int, nargs="+", help="part h: batch sizes")
    parser.setting("--max-memory-mib", type=float, help="part h: max_memory of the example-chunked setting, MiB")
    parser.setting("--column-chunk", type=int, help="part h: column_chunk of the column-chunked setting")
    parser.setting("--memory-settings", nargs="+", choices=list(MEMORY_SETTINGS), help="part h: settings to measure")


def training_step(loss_fn, model, optimizer, X, y, eps):
    """One step of provably robust training with ``loss_fn`` (a robust_loss); returns the loss and the
    robust error it reported, before the step."""
    optimizer.zero_grad()
    loss, err = loss_fn(model, eps, X, y)
    loss.backward()
    optimizer.step()
    return loss.item(), err


def part_g(model, X_train, y_train, eps, args, ca=None):
    """Exact against projected robust training steps, interleaved step by step; the reference's too
    (``ca``: convex_adversarial, or None; skipped with --no-train-reference, the --quick value)."""
    k = args.proj
    generator = torch.Generator().manual_seed(args.seed)
    losses = {("ours", "exact"): pl.robust_loss,
              ("ours", "proj"): functools.partial(pl.robust_loss, proj=k, generator=generator)}
    if ca is not None and args.train_reference:  # the reference draws its projections from torch's global generator
        losses[("reference", "exact")] = ca.robust_loss
        losses[("reference", "proj")] = functools.partial(ca.robust_loss, proj=k, norm_type="l1_median")
    copies = {key: copy.deepcopy(model).train() for key in losses}
    optimizers = {key: torch.optim.Adam(m.parameters(), lr=args.lr) for key, m in copies.items()}
    B = args.batch
    wall, cpu, first = {key: [] for key in losses}, {key: [] for key in losses}, {}
    for step in tqdm(range(args.train_steps + 1), desc="g: training steps", leave=False):
        X, y = X_train[step * B:(step + 1) * B], y_train[step * B:(step + 1) * B]
        for key in (list(losses) if step % 2 == 0 else list(losses)[::-1]):
            start, start_cpu = time.perf_counter(), time.process_time()
            result = training_step(losses[key], copies[key], optimizers[key], X, y, eps)
            if step == 0:  # untimed warm-up; all copies hold the same weights: compare the losses
                first[key] = result
                continue
            wall[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)
    med = {key: statistics.median(v) for key, v in wall.items()}
    med_cpu = {key: statistics.median(v) for key, v in cpu.items()}
    names = {"exact": "exact", "proj": f"proj={k}"}
    what = f"batches of {B}, ε={eps}, {args.threads} thread(s)"
    skipped = "" if ca is not None and args.train_reference else (
        ("; reference skipped (--quick)" if args.quick else "; reference skipped (--no-train-reference)")
        if ca is not None else "; convex_adversarial not installed: reference skipped")

    def with_reference(row, values):
        if ("reference", "exact") in losses:
            row.update({"convex_adversarial": values["reference"],
                        "reference / ours": values["reference"] / values["ours"]})
        else:
            row["note"] += skipped
        return row

    rows = []
    for variant in ("exact", "proj"):
        rows.append(with_reference(
            {"part": "g", "quantity": f"robust training step ({names[variant]}), s (wall, {what})",
             "polytope_lab": med["ours", variant],
             "note": f"median of {len(wall['ours', variant])} step(s); robust_loss fwd+bwd + Adam step; process "
                     f"CPU time {med_cpu['ours', variant]:.3g} s/step (ours)"},
            {who: med[who, variant] for who in ("ours", "reference") if (who, variant) in med}))
    speedup = {who: med[who, "exact"] / med[who, "proj"] for who in ("ours", "reference") if (who, "proj") in med}
    row = {"part": "g", "quantity": f"training step speed-up with proj={k} (exact / projected, wall)",
           "polytope_lab": speedup["ours"],
           "note": f"target ≥ {RATIO_TARGET:g}; ours by process CPU time "
                   f"{med_cpu['ours', 'exact'] / med_cpu['ours', 'proj']:.3g}"}
    if "reference" in speedup:
        row["convex_adversarial"] = speedup["reference"]
    else:
        row["note"] += skipped
    rows.append(row)
    steps_per_epoch = TRAIN_SET_SIZE / B
    for variant in ("exact", "proj"):
        rows.append(with_reference(
            {"part": "g", "quantity": f"s per MNIST epoch ({TRAIN_SET_SIZE:,} images), {names[variant]}, extrapolated",
             "polytope_lab": med["ours", variant] * steps_per_epoch,
             "note": f"median step × {steps_per_epoch:g} steps; target ≤ {EPOCH_TARGET_S:g} s with projections "
                     f"on 2 cores"},
            {who: med[who, variant] * steps_per_epoch for who in ("ours", "reference") if (who, variant) in med}))
    for variant in ("exact", "proj"):
        loss, err = first["ours", variant]
        row = {"part": "g", "quantity": f"robust loss on the first batch ({names[variant]})", "polytope_lab": loss,
               "note": f"pretrained weights, {B} training images; robust error {err:.3g} (ours)"
                       + (" — an estimate, not a certified error" if variant == "proj" else "")}
        if ("reference", variant) in first:
            row["convex_adversarial"] = first["reference", variant][0]
        rows.append(row)
    return rows


def memory_settings(args):
    """Part h's chosen settings: label -> DualBounder options."""
    every = {
        "unchunked": ("unchunked", {}),
        "examples": (f"example chunks (max_memory {args.max_memory_mib:g} MiB)",
                     {"max_memory": int(args.max_memory_mib * 2 ** 20)}),
        "columns": (f"column chunks (column_chunk {args.column_chunk})", {"column_chunk": args.column_chunk}),
    }
    return dict(every[key] for key in MEMORY_SETTINGS if key in args.memory_settings)


def part_h(X, y, eps, args):
    """Peak memory of the exact bound on the first test images, per batch size and chunking setting."""
    rows, results = [], {}
    settings = memory_settings(args)
    jobs = [(B, name) for B in args.memory_batches for name in settings]
    with tempfile.TemporaryDirectory() as tmp:
        for B, name in tqdm(jobs, desc="h: peak memory", leave=False):
            inputs = Path(tmp) / f"images_{B}.pt"
            if not inputs.exists():
                torch.save((X[:B].cpu().clone(), y[:B].cpu().clone()), inputs)
            results[B, name] = r = measure_memory.in_fresh_process(Path(args.model).resolve(), inputs, eps,
                                                                    args.threads, settings[name])
            how = "peak RSS (reset before the call) − RSS before" if r["exact_peak"] else "growth of ru_maxrss"
            rows.append({"part": "h", "quantity": f"exact bound, batch {B}, {name}: peak memory, MiB",
                         "polytope_lab": r["peak_mib"],
                         "note": f"{r['seconds']:.3g} s; {r['examples_per_chunk']} example(s) per chunk; "
                                 f"{r['certified']}/{B} certified; {how}"})
    for B in args.memory_batches if "unchunked" in settings else []:
        for name in list(settings)[1:]:
            rows.append({"part": "h", "quantity": f"batch {B}: peak memory unchunked / {name.split(' (')[0]}",
                         "polytope_lab": results[B, "unchunked"]["peak_mib"] / max(results[B, name]["peak_mib"], 1e-3),
                         "note": f"time ratio (chunked / unchunked) "
                                 f"{results[B, name]['seconds'] / results[B, 'unchunked']['seconds']:.3g}"})
    return rows


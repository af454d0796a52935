"""Peak memory of one exact dual bound, measured in this (fresh) process: benchmark part h runs it once
per setting, each in its own interpreter, because a process's peak resident set size cannot be undone.

    python -m experiments.measure_memory --model PATH --inputs images.pt --eps 0.1 --options '{"column_chunk": 64}'

Loads the paper's MNIST ConvNet from ``--model`` and ``(X, y)`` from ``--inputs`` (``torch.save``d), bounds
the margins ``e_y − e_j`` over ``LinfBall(X, eps)`` with ``Bounder.create("dual", **options)`` under
``torch.no_grad`` and prints one JSON line: ``peak_mib`` (the peak resident size during the call minus
the resident size just before; Linux: the peak is reset through /proc/self/clear_refs, elsewhere
``ru_maxrss``, which may include earlier peaks), ``seconds``, ``exact_peak``, ``examples_per_chunk``,
``certified``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import polytope_lab as pl
from polytope_lab import models

N_CLASSES = 10
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="state_dict of the paper's MNIST ConvNet (.pth)")
    parser.add_argument("--inputs", required=True, help="a torch.save'd (X, y): the images and their labels")
    parser.add_argument("--eps", type=float, required=True, help="L∞ radius (ball not clipped)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--options", default="{}", help="DualBounder options as a JSON object")
    return parser.parse_args(argv)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def _reset_peak() -> bool:
    """Reset this process's peak RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure(model: str, inputs: str, eps: float, threads: int, options: dict) -> dict:
    """In this process: bound the images in ``inputs``; peak RSS growth (MiB), seconds and the verdicts."""
    torch.set_num_threads(threads)
    network = pl.from_torch(models.load_state(models.mnist_convnet(), model), (1, 28, 28))
    X, y = torch.load(inputs, weights_only=True)
    region, C = pl.LinfBall(X, eps), pl.margin_matrix(y, N_CLASSES)
    bounder = pl.Bounder.create("dual", **options)
    exact_peak = _reset_peak()
    before = _status_kib("VmRSS") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    start = time.perf_counter()
    with torch.no_grad():
        bounds = bounder.bound(network, region, C)
    seconds = time.perf_counter() - start
    after = _status_kib("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": (after - before) / 1024, "seconds": seconds, "exact_peak": exact_peak,
            "examples_per_chunk": bounder.chunk_size(network, len(X)), "certified": int(bounds.certified.sum())}


def in_fresh_process(model, inputs, eps: float, threads: int, options: dict) -> dict:
    """:func:`measure` in a fresh interpreter (``python -m experiments.measure_memory``); its JSON result."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    argv = ["--model", str(model), "--inputs", str(inputs), "--eps", repr(float(eps)), "--threads", str(threads),
            "--options", json.dumps(options)]
    out = subprocess.run([sys.executable, "-m", "experiments.measure_memory", *argv], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement failed for {options}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    result = measure(args.model, args.inputs, args.eps, args.threads, json.loads(args.options))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""Shared plumbing for the experiments: argument parsing, table output, timing. No maths here."""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
from tabulate import tabulate
from tqdm.auto import tqdm


def base_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """A parser with the options every experiment has: --seed, --device, --out, --quick."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--device", default="cpu", help="torch device for the bounds, e.g. cpu or cuda")
    parser.add_argument("--out", default=default_out, help="directory for the CSV/Markdown/JSON outputs")
    parser.add_argument("--quick", action="store_true", help="a small, fast run (for CI)")
    return parser


def to_markdown(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """``df`` as a GitHub-flavoured Markdown table (tabulate); NaN shows empty, ``|`` is escaped."""
    def cell(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        return v.replace("|", "\\|") if isinstance(v, str) else v
    rows = [[cell(v) for v in row] for row in df.itertuples(index=False, name=None)]
    return tabulate(rows, headers=[str(c) for c in df.columns], tablefmt="pipe", floatfmt=floatfmt,
                    missingval="") + "\n"


def write_table(df: pd.DataFrame, out_dir, name: str, meta: dict | None = None, json_too: bool = False) -> list:
    """Write ``df`` as ``<out_dir>/<name>.csv`` and ``.md`` (and ``.json`` with ``meta``); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.csv", out / f"{name}.md"]
    df.to_csv(paths[0], index=False)
    paths[1].write_text(to_markdown(df))
    if json_too:
        records = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                   for r in df.to_dict(orient="records")]
        paths.append(out / f"{name}.json")
        paths[2].write_text(json.dumps({"meta": meta or {}, "rows": records}, indent=2, default=str) + "\n")
    return paths


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device="cpu"):
    """(result, seconds) of ``fn()``."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def time_interleaved(fns: dict, n_batches: int, reps: int = 3, device="cpu", warmup: bool = True, desc=""):
    """Time several ``fn(batch_index)`` side by side, batch by batch.

    For each batch every function runs ``reps`` times, the functions interleaved (their order reversed on
    every other repetition) so that drifting machine load hits them alike; a batch's time is the median
    of its repetitions. With ``warmup`` each function first runs once on batch 0, untimed.
    Returns ``{name: (results per batch from the last repetition, total seconds)}``.
    """
    names = list(fns)
    if warmup and n_batches:
        for name in names:
            fns[name](0)
    results = {name: [None] * n_batches for name in names}
    totals = dict.fromkeys(names, 0.0)
    for k in tqdm(range(n_batches), desc=desc or "timing", leave=False):
        times = {name: [] for name in names}
        for r in range(reps):
            for name in (names if r % 2 == 0 else names[::-1]):
                results[name][k], seconds = time_call(lambda: fns[name](k), device)
                times[name].append(seconds)
        for name in names:
            totals[name] += statistics.median(times[name])
    return {name: (results[name], totals[name]) for name in names}


def machine_load() -> dict:
    """The 1-minute load average and the CPU count (to judge whether timings were disturbed)."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not on every platform
        load = float("nan")
    return {"loadavg_1min": round(load, 2), "cpu_count": os.cpu_count()}

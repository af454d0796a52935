"""Shared plumbing for the experiments: one parser base, one quick mode, the result store, table output,
timing. No maths here.

Every experiment builds its parser with :class:`ExperimentParser`, which gives the options all of them take
(``--data-dir``, ``--model``, ``--threads``, ``--device``, ``--seed``, ``--out``, ``--quick``), and declares
its settings in two dicts: ``DEFAULTS`` (every setting, flag or not) and ``QUICK`` (the values of a small,
fast run). After parsing, every key of ``DEFAULTS`` is an attribute of the namespace: the flag's value when
given on the command line, else the ``QUICK`` value under ``--quick``, else that of an active preset (e.g.
``--paper``), else the default. Explicit flags always win.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from tabulate import tabulate
from tqdm.auto import tqdm

from polytope_lab.store import ResultStore

#: the result store of every experiment: ``<out>/results.sqlite``, one table per experiment part
STORE_FILE = "results.sqlite"
DATA_HELP = "directory holding mnist/ (default: $POLYTOPE_LAB_DATA, else ~/.cache/polytope_lab)"


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default, except where it is None (its help says what happens then)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class ExperimentParser(argparse.ArgumentParser):
    """The parser base of every experiment (module docstring): common options, settings, quick mode.

    ``defaults``/``quick``: the experiment's ``DEFAULTS`` and ``QUICK``; ``out``: the default ``--out``;
    ``model_help``: what ``--model`` means there. ``threads``, ``seed`` and ``device`` are settings too
    (defaults None — torch's own thread count —, 0 and "cpu" unless ``defaults`` says otherwise).
    """

    def __init__(self, description: str, out: str, defaults: dict | None = None, quick: dict | None = None,
                 model_help: str = "state_dict of the paper's MNIST ConvNet (.pth)", **kwargs):
        super().__init__(description=description, formatter_class=_Formatter, **kwargs)
        self.defaults_, self.quick_, self.presets_ = {}, {}, []
        self.add_settings({"threads": None, "seed": 0, "device": "cpu", **(defaults or {})}, quick or {})
        self.add_argument("--data-dir", default=None, help=DATA_HELP)
        self.add_argument("--model", default=None, help=model_help)
        self.setting("--threads", type=int, help="torch intra-op threads (restored on return; none: torch's default)")
        self.setting("--device", help="torch device for the bounds, e.g. cpu or cuda")
        self.setting("--seed", type=int, help="random seed")
        self.add_argument("--out", default=out, help="directory for the outputs and the result store")
        self.add_argument("--quick", action="store_true", help="a small, fast run (for CI): the --quick values")

    def add_settings(self, defaults: dict, quick: dict | None = None) -> None:
        """Declare more settings (e.g. a benchmark part's own ``DEFAULTS``/``QUICK``)."""
        quick = quick or {}
        clash = sorted(set(defaults) & set(self.defaults_))
        extra = sorted(set(quick) - set(defaults))
        if clash or extra:
            raise ValueError(f"settings declared twice: {clash}; QUICK keys without a default: {extra}")
        self.defaults_.update(defaults)
        self.quick_.update(quick)

    def setting(self, *flags, **kwargs):
        """``add_argument`` for a declared setting: its default, quick and preset values come from the dicts
        (and are shown in ``--help``)."""
        action = super().add_argument(*flags, default=argparse.SUPPRESS, **kwargs)
        if action.dest not in self.defaults_:
            raise ValueError(f"{flags[0]}: setting {action.dest!r} has no entry in DEFAULTS")
        shown = [f"default: {_show(self.defaults_[action.dest])}"]
        if action.dest in self.quick_:
            shown.append(f"--quick: {_show(self.quick_[action.dest])}")
        shown += [f"{flag}: {_show(values[action.dest])}" for flag, values in self.presets_ if action.dest in values]
        action.help = f"{action.help or ''} ({'; '.join(shown)})".strip()
        return action

    def preset(self, flag: str, values: dict, help: str) -> None:
        """A flag that, when given, replaces the defaults of ``values`` (``--quick`` and explicit flags win);
        declare it before the settings it changes, so that their help shows it."""
        extra = sorted(set(values) - set(self.defaults_))
        if extra:
            raise ValueError(f"{flag}: settings without a default: {extra}")
        self.add_argument(flag, action="store_true", help=help)
        self.presets_.append((flag, dict(values)))

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        for key, default in self.defaults_.items():
            if hasattr(ns, key):
                continue                                                   # given on the command line
            value = default
            for flag, values in self.presets_:
                if getattr(ns, flag.lstrip("-").replace("-", "_"), False) and key in values:
                    value = values[key]
            if getattr(ns, "quick", False) and key in self.quick_:
                value = self.quick_[key]
            setattr(ns, key, list(value) if isinstance(value, list) else value)
        return ns, rest

    def settings(self, args) -> dict:
        """The resolved value of every declared setting, in declaration order."""
        return {key: getattr(args, key) for key in self.defaults_}


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with ``n`` torch intra-op threads (None: leave them), restored afterwards."""
    before = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise SystemExit(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def result_store(out, table: str) -> ResultStore:
    """The experiment's result store: table ``table`` of ``<out>/results.sqlite``."""
    return ResultStore(Path(out) / STORE_FILE, table)


def record_rows(out, table: str, rows, key: list) -> None:
    """Put a finished table's rows (dicts) into the result store, each under its values of ``key``: every
    experiment's results in one machine-readable place (the tables that resume are written row by row)."""
    with result_store(out, table) as store:
        for row in rows:
            store.put(tuple(row[k] for k in key), dict(row))


def command(module: str, argv) -> str:
    """The command line that ran ``module`` (for the metadata of the outputs)."""
    return f"python -m experiments.{module} " + " ".join(sys.argv[1:] if argv is None else argv)


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

"""``python -m experiments.vnncomp bench``: a VNN-COMP instance list, resumable, with a summary and a cactus plot.

Each instance (``onnx,vnnlib,timeout`` relative to the list's folder or ``--root``; a missing final
newline is fine) runs in this process exactly as ``run`` would (same budget rule: its load time counts
against its timeout; a network is loaded once for all its instances, the first pays for it), for each
configuration of ``--configs``. Its row (verdict, seconds, stage that decided) goes to the result store
(table ``vnncomp_instances`` of ``<out>/results.sqlite``) as soon as it finishes, so a rerun skips what is
done; its results file to ``<out>/results/<config>/<onnx stem>__<vnnlib stem>.txt``. Then the tables
``vnncomp_instances`` and ``vnncomp_summary`` (.csv, .md) and ``vnncomp_cactus.png``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from experiments.cli import ExperimentParser, result_store, to_markdown, torch_threads, write_table

TABLE = "vnncomp_instances"
COLUMNS = ["config", "onnx", "vnnlib", "timeout", "verdict", "seconds", "stage", "message"]
DEFAULTS = {"timeout_scale": 1.0, "limit": None, "configs": ["default"]}
QUICK = {"timeout_scale": 0.1, "limit": 2}
#: the cactus plot's time axis starts here (log scale)
FASTEST = 0.01


def read_instances(path, root=None) -> list:
    """``[(onnx path, vnnlib path, timeout)]`` of an instances CSV; blank lines skipped, a missing final
    newline tolerated; paths relative to ``root`` (default: the CSV's folder). A malformed line raises
    ValueError naming it."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        try:
            if len(parts) != 3:
                raise ValueError
            timeout = float(parts[2])
        except ValueError:
            raise ValueError(f"{path}, line {number}: expected 'onnx,vnnlib,timeout', got {line!r}") from None
        rows.append((root / parts[0], root / parts[1], timeout))
    return rows


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``bench`` subcommand on the subparsers ``sub`` (an :class:`ExperimentParser`)."""
    from experiments import vnncomp_instance
    parser = sub.add_parser("bench", help="run an instances CSV: results table, summary, cactus plot",
                            experiment=True, description=__doc__.split("\n\n")[1].replace("\n", " "),
                            out="out/vnncomp", defaults=DEFAULTS, quick=QUICK,
                            model_help="unused (the networks are named in the instances CSV)")
    parser.add_argument("instances", help="the instances CSV (onnx,vnnlib,timeout per line)")
    parser.add_argument("--root", default=None, help="folder the CSV's paths are relative to (default: its own)")
    parser.setting("--timeout-scale", type=float, help="multiplies every instance's timeout")
    parser.setting("--limit", type=int, help="only the first N instances (default: all)")
    parser.setting("--configs", type=lambda s: [c for c in s.split(",") if c],
                   help=f"comma-separated configurations, of {sorted(vnncomp_instance.CONFIGS)}")
    parser.set_defaults(func=cmd_bench)
    return parser


def run_one(onnx, vnnlib, timeout: float, config: str, args, networks: dict):
    """One instance as ``run`` does it, in this process: (Outcome, results text)."""
    from experiments import vnncomp_instance
    start = time.monotonic()
    try:
        inst = vnncomp_instance.load_instance(onnx, vnnlib, networks)
        out = vnncomp_instance.solve(inst, vnncomp_instance.budget(timeout, time.monotonic() - start), config, args.seed,
                            args.threads)
        out.seconds = time.monotonic() - start
    except Exception as e:  # as in run: any failure is an "error" row
        out = vnncomp_instance.Outcome("error", None, time.monotonic() - start, vnncomp_instance.results_text("error"),
                              f"{type(e).__name__}: {e}")
    return out


def cmd_bench(args) -> int:
    from experiments import vnncomp_instance
    unknown = sorted(set(args.configs) - set(vnncomp_instance.CONFIGS))
    if unknown or not args.configs:
        raise SystemExit(f"--configs: unknown {unknown}; choose among {sorted(vnncomp_instance.CONFIGS)}")
    instances = read_instances(args.instances, args.root)[:args.limit]
    root = Path(args.root) if args.root else Path(args.instances).parent
    out, networks = Path(args.out), {}
    with torch_threads(args.threads), result_store(out, TABLE) as store:
        for config in args.configs:
            for onnx, vnnlib, timeout in instances:
                limit = timeout * args.timeout_scale
                key = (config, str(onnx.relative_to(root)), str(vnnlib.relative_to(root)), limit)
                if key in store:
                    continue
                res = run_one(onnx, vnnlib, limit, config, args, networks)
                path = out / "results" / config / f"{onnx.stem}__{vnnlib.stem}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                vnncomp_instance.write_results(path, res.text)
                store.put(key, dict(zip(COLUMNS, (*key, res.verdict, res.seconds, res.stage, res.message))))
                print(f"{config}: {vnnlib.name}: {res.verdict} ({res.stage}, {res.seconds:.2f} s)", flush=True)
        df = store.frame(COLUMNS)
    df = df[df["config"].isin(args.configs)]
    write_table(df, out, TABLE)
    summary = summarise(df)
    write_table(summary, out, "vnncomp_summary")
    cactus(df, out / "vnncomp_cactus.png")
    print(to_markdown(summary))
    print(f"wrote {out}/")
    return 0


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per configuration: instances, the count of each verdict, median seconds (all and decided ones),
    and how many instances each stage decided."""
    from experiments import vnncomp_instance
    rows = []
    for config, g in df.groupby("config", sort=False):
        decided = g[g["verdict"].isin(["sat", "unsat"])]
        counts = g["verdict"].value_counts()
        stages = decided["stage"].fillna("?").value_counts()
        rows.append({"config": config, "instances": len(g), **{v: int(counts.get(v, 0)) for v in vnncomp_instance.VERDICTS},
                     "median seconds": g["seconds"].median(),
                     "median seconds (decided)": decided["seconds"].median() if len(decided) else float("nan"),
                     "stages (decided)": ", ".join(f"{s} {n}" for s, n in stages.items())})
    return pd.DataFrame(rows)


def cactus(df: pd.DataFrame, path: Path) -> None:
    """The cactus plot: instances decided (sat or unsat) within t seconds against t, one line per config."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for config, g in df.groupby("config", sort=False):
        times = sorted(max(t, FASTEST) for t in g[g["verdict"].isin(["sat", "unsat"])]["seconds"])
        end = max([float(g["timeout"].max()), *times]) if len(g) else 1.0
        ax.step([FASTEST, *times, end], [0, *range(1, len(times) + 1), len(times)], where="post",
                label=f"{config} ({len(times)}/{len(g)})")
    ax.set_xscale("log")
    ax.set_xlabel("time limit t (seconds, log scale)")
    ax.set_ylabel("instances decided within t")
    ax.set_title("VNN-COMP instances decided (sat or unsat)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Verify MNIST test images, one verdict each, with any backend on a Dask cluster; resumable.

    python -m experiments.verify --model ../shared/models/wong_kolter_mnist_eps0.1.pth --arch mnist_convnet \\
        --eps 0.1 --clip 0 1 --backend exact --data-dir ../shared/data     # all 10,000: the exact adversarial error
    python -m experiments.verify --model net.onnx --eps 0.02 --backend dual --first 1000 --scheduler tcp://host:8786

The network: an ONNX file (``--model FILE.onnx``) or a state_dict (``--model WEIGHTS.pth``) of a zoo
architecture (``--arch``). The images: the first ``--first`` MNIST test images, shaped as the network's
input, each certified on the L∞ ball of radius ``--eps`` (∩ ``--clip``) for its label by ``--backend``
(``exact``: the fastest exact backend registered, bab if there is one, else the MILP) with its
``--option``s, through ``polytope_lab.verify_dataset``: an embedded cluster of ``--workers`` processes, or
the scheduler at ``--scheduler``. Each image's result goes to the result store (``--store``, table
``verify``) as its chunk completes; a rerun with the same settings computes only the images not stored yet,
so an interrupted run resumes where it stopped. Writes ``<out>/verify-<settings>.csv`` and ``.md`` (one row
per image) and ``<out>/verify-<settings>-summary.csv`` / ``.md``, and prints the summary: robust error,
counterexamples, the images left undecided, total time.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import torch

import polytope_lab as pl
from polytope_lab import data, models, runs

from .cli import STORE_FILE, ExperimentParser, command, torch_threads, write_table

FULL_TEST = 10_000
#: zoo architectures for a state_dict: name → (model builder, input shape); also ``mlp:784-100-10``
ARCHS = {"mnist_convnet": (models.mnist_convnet, (1, 28, 28))}
MLP = re.compile(r"mlp:(\d+(?:-\d+)+)")
EXACT = "exact"
DEFAULTS = dict(eps=0.1, first=FULL_TEST, chunk_size=None, batch_size=1, retries=3)
QUICK = dict(first=20)


def exact_backend() -> str:
    """The fastest exact backend registered: branch and bound when there is one, else the MILP."""
    return "bab" if "bab" in pl.Bounder.available() else "milp"


def option(text: str):
    """``KEY=VALUE`` → (key, value), the value read as JSON when it parses (numbers, true, null), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise ValueError(f"--option takes KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_args(argv=None):
    parser = ExperimentParser(__doc__.strip().splitlines()[0], out="figures/verify", defaults=DEFAULTS, quick=QUICK,
                              model_help="the network: FILE.onnx, or a state_dict WEIGHTS.pth with --arch (required)")
    parser.add_argument("--arch", default=None,
                        help=f"zoo architecture of a .pth state_dict: {', '.join(ARCHS)}, or mlp:784-100-10 (a "
                             "models.mlp with those widths)")
    parser.setting("--eps", type=float, help="L∞ radius")
    parser.add_argument("--clip", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="intersect the ball with [LO, HI] (default: not clipped)")
    parser.add_argument("--backend", default="dual", choices=pl.Bounder.available() + [EXACT],
                        help=f"the verifier (registered backends; {EXACT}: bab if registered, else milp)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a backend option, e.g. time_limit=60 (repeatable; values read as JSON)")
    parser.setting("--first", type=int, help="the first N MNIST test images")
    parser.add_argument("--store", default=None, help=f"the result store (default: <out>/{STORE_FILE})")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="a running Dask scheduler, e.g. tcp://host:8786 (default: an embedded cluster)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes of the embedded cluster (default: one per core)")
    parser.setting("--chunk-size", type=int, help="images per task (none: about 8 tasks per worker, at most 32)")
    parser.setting("--batch-size", type=int,
                   help="images per certify call (the dual bound is faster in batches; a setting of the run)")
    parser.setting("--retries", type=int, help="reruns of a task whose worker died (embedded cluster)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error("--model is required: FILE.onnx, or WEIGHTS.pth with --arch")
    if not Path(args.model).is_file():
        parser.error(f"--model: no file at {args.model}")
    onnx = args.model.endswith(".onnx")
    if onnx == (args.arch is not None):
        parser.error("--arch goes with a .pth state_dict (and only with one)")
    if args.arch is not None and args.arch not in ARCHS and not MLP.fullmatch(args.arch):
        parser.error(f"--arch takes {', '.join(ARCHS)} or mlp:W0-W1-...; got {args.arch!r}")
    if args.scheduler is not None and args.workers is not None:
        parser.error("--workers sizes the embedded cluster; a --scheduler's cluster has its own workers")
    if min(args.first, args.batch_size, args.workers or 1, args.chunk_size or 1) < 1 or args.retries < 0:
        parser.error("--first, --workers, --chunk-size and --batch-size must be >= 1, --retries >= 0")
    try:
        args.options = dict(option(text) for text in args.option)
    except ValueError as exc:
        parser.error(str(exc))
    if args.device != "cpu":
        args.options.setdefault("device", args.device)
    args.backend = exact_backend() if args.backend == EXACT else args.backend
    args.first = min(args.first, FULL_TEST)
    return args


def load_model(path: str, arch: str | None):
    """(model, input shape): an ONNX file as a Network, or the state_dict at ``path`` in the zoo's ``arch``."""
    if arch is None:
        network = pl.load_onnx(path)
        return network, tuple(network.input_shape)
    if arch in ARCHS:
        build, shape = ARCHS[arch]
        return models.load_state(build(), path), shape
    sizes = [int(w) for w in MLP.fullmatch(arch).group(1).split("-")]
    return models.load_state(models.mlp(sizes), path), (sizes[0],)


def report(frame, args) -> dict:
    """The summary of a run as one row (printed and written)."""
    s = runs.summary(frame)
    row = {"images": s["examples"], "backend": args.backend, "eps": args.eps,
           "clip": "none" if args.clip is None else f"[{args.clip[0]:g}, {args.clip[1]:g}]",
           "certified": s["certified"], "counterexamples": s["counterexamples"], "undecided": s["undecided"],
           "errors": s["errors"], "robust error %": 100 * s["robust_error"],
           "adversarial error ≥ %": 100 * s["adversarial_error_at_least"],
           "certify s (sum)": s["certify_seconds"], "wall s": frame.attrs["wall_seconds"],
           "computed": frame.attrs["computed"], "reused": frame.attrs["reused"],
           "settings": frame.attrs["settings"][:12]}
    print(f"{row['images']} images, {args.backend} {args.options or ''}, eps {args.eps}, clip {row['clip']} "
          f"(settings {row['settings']})")
    print(f"  robust error {row['robust error %']:.2f}% (not certified); adversarial error ≥ "
          f"{row['adversarial error ≥ %']:.2f}% ({row['counterexamples']} counterexamples); "
          f"{row['undecided']} undecided ({row['errors']} errors)")
    print(f"  total time {row['wall s']:.1f} s wall ({row['computed']} computed, {row['reused']} from the store); "
          f"{row['certify s (sum)']:.1f} s of certify summed over the images")
    return row


def main(argv=None):
    args = parse_args(argv)
    with torch_threads(args.threads):
        torch.manual_seed(args.seed)
        model, shape = load_model(args.model, args.arch)
        X, y = data.mnist("test", root=args.data_dir)
        X, y = X[:args.first].reshape(-1, *shape), y[:args.first]
        store = args.store or Path(args.out) / STORE_FILE
        try:
            frame = pl.verify_dataset(model, X, y, args.eps, clip=args.clip, backend=args.backend,
                                      options=args.options, client=args.scheduler, workers=args.workers, store=store,
                                      progress=not args.no_progress, chunk_size=args.chunk_size,
                                      batch_size=args.batch_size, retries=args.retries)
        except KeyboardInterrupt:
            raise SystemExit(f"interrupted: the results finished so far are in {store}; "
                             "the same command resumes from them") from None
    row = report(frame, args)
    stem = Path(args.out) / f"verify-{row['settings']}"
    paths = runs.export_results(frame, stem)
    summary = pd.DataFrame([{**row, "command": command("verify", argv)}])
    paths += write_table(summary, args.out, stem.name + "-summary")
    print("wrote " + ", ".join(str(p) for p in paths))
    return frame


if __name__ == "__main__":
    main()

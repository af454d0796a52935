"""Demo: bound a network with every registered backend and compare them.

    python -m experiments.demo                                  # random small MLP, no data needed
    python -m experiments.demo --model ../shared/models/wong_kolter_mnist_eps0.1.pth --data-dir ../shared/data

Prints a table (model, method, mean lower margin, certified count, seconds) and writes it as
``demo.csv`` and ``demo.md`` to ``--out`` (and its rows to the result store ``results.sqlite``, table
``demo``). An image is certified when every lower bound of
``f_y − f_j`` (j ≠ y) is positive; the margin column is the mean over images of the smallest one.
"""
from __future__ import annotations

import pandas as pd
import torch
from tqdm.auto import tqdm

import polytope_lab as pl
from polytope_lab import data, models

from .cli import ExperimentParser, record_rows, to_markdown, torch_threads, write_table

N_CLASSES = 10
DEFAULTS = dict(n_images=5)
QUICK = dict(n_images=3)


def parse_args(argv=None):
    parser = ExperimentParser(__doc__.strip().splitlines()[0], out="figures/demo", defaults=DEFAULTS, quick=QUICK,
                              model_help="state_dict of the paper's MNIST ConvNet; bounds it on MNIST test images too")
    parser.setting("--n-images", type=int, help="inputs to bound per model")
    parser.add_argument("--eps", type=float, default=None,
                        help="L∞ radius (default: 0.02 for the random MLP, 0.1 for the MNIST ConvNet)")
    parser.add_argument("--methods", nargs="*", default=None,
                        help="backends to run (default: every registered one, plus dual with optimised α)")
    return parser.parse_args(argv)


def bounders(names, device):
    """(label, Bounder) for every backend in ``names`` (every backend takes ``device``), plus the dual with
    optimised α."""
    out = []
    for name in names:
        out.append(pl.Bounder.create(name, device=device))
        if name == "dual":
            out.append(pl.Bounder.create("dual", alpha="optimized", device=device))
    return out


def run_model(label, model, X, y, eps, methods, device):
    region = pl.LinfBall(X, eps)
    C = pl.margin_matrix(y, N_CLASSES)
    rows = []
    for bounder in tqdm(methods, desc=label, leave=False):
        b = bounder.bound(model, region, C)
        rows.append({
            "model": label,
            "method": b.method,
            "eps": eps,
            "images": len(X),
            "mean lower margin": b.lower.min(dim=1).values.mean().item(),
            "certified": int(b.certified.sum()),
            "seconds": b.seconds,
        })
    return rows


def main(argv=None):
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args):
    torch.manual_seed(args.seed)
    names = args.methods if args.methods else pl.Bounder.available()
    unknown = sorted(set(names) - set(pl.Bounder.available()))
    if unknown:
        raise SystemExit(f"unknown backend(s) {unknown}; available: {pl.Bounder.available()}")
    methods = bounders(names, args.device)
    n = args.n_images

    # a random MLP on random inputs in [0, 1]^20, labelled by its own predictions
    net = models.mlp([20, 50, 50, N_CLASSES]).eval()
    X = torch.rand(n, 20)
    with torch.no_grad():
        y = net(X).argmax(1)
    rows = run_model("random MLP 20-50-50-10", net, X, y, args.eps or 0.02, methods, args.device)

    if args.model:
        convnet = models.load_state(models.mnist_convnet(), args.model)
        X, y = data.mnist("test", root=args.data_dir)
        rows += run_model("MNIST ConvNet (pretrained)", convnet, X[:n], y[:n], args.eps or 0.1, methods,
                          args.device)

    df = pd.DataFrame(rows)
    paths = write_table(df, args.out, "demo")
    record_rows(args.out, "demo", rows, key=["model", "method"])
    print(to_markdown(df))
    print("wrote " + ", ".join(str(p) for p in paths))
    return df


if __name__ == "__main__":
    main()

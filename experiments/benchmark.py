"""Benchmark: polytope_lab's dual bounds against the reference implementation (convex_adversarial 0.4.4)
on the paper's pretrained MNIST ConvNet at ε = 0.1 (L∞ ball, not clipped to [0, 1], as in the reference).

    python -m experiments.benchmark --model ../shared/models/wong_kolter_mnist_eps0.1.pth --data-dir ../shared/data

Parts, all measured in one run and written to ``<out>/results.csv``, ``.md`` and ``.json`` (and the rows to the
result store ``<out>/results.sqlite``, table ``benchmark``):
  a. dual bounds (objective rows e_y − e_j, under torch.no_grad) on the first N test images: ms/image for
     both implementations, their ratio, the largest relative difference of the bounds, robust errors;
  b. ``robust_loss`` forward + backward, ms/image, and the difference of the loss values;
  c. time to certify the 10,000 test images, extrapolated from (a) (``--full``: measured as well);
  d. on the first 200 images: certified counts and ms/image for fixed and optimised α, next to the
     figures other tools reached on this machine as reported in the issue (not re-measured here);
  e. exact MILP verdicts, f. LP against the optimised dual (ball ∩ [0, 1]): see ``benchmark_exact``;
  g. robust training steps, exact against random projections, h. peak memory of the exact bound against
     the batch size, with and without chunking: see ``benchmark_scaling``;
  i. skip connections: soundness against the MILP and speed, both libraries: see ``benchmark_skip``;
  j. MILP certify of a test set on a Dask cluster, 1 against 2 worker processes: see ``benchmark_cluster``;
  k. tighter dual bounds (slopes, tight mode) on ``--bench-nets`` and the ConvNet: see ``benchmark_tight``;
  l. branch and bound against the MILP (mnistfc, PGD-trained and pretrained ConvNets, the tightness MLP), the
     same time limit per example, resumable (``--resume``): see ``benchmark_bab``.
``--parts`` picks the parts (default all but j, which starts worker processes on every core, k, which takes
minutes, and l, which runs for hours at its default sizes: each only when named).
Timings: a warm-up call first, then per batch the median of ``--reps`` repetitions, the two
implementations interleaved. Other processes on the machine distort them; the load average is recorded.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import platform
import time

import pandas as pd
import torch
from tqdm.auto import tqdm

import polytope_lab as pl
from polytope_lab import data, models

from polytope_lab.dual import FINAL_ALPHA_ONLY
from polytope_lab.evaluation import robust_errors

from . import benchmark_bab, benchmark_cluster, benchmark_exact, benchmark_scaling, benchmark_skip, benchmark_tight
from .cli import (ExperimentParser, command, machine_load, record_rows, time_interleaved, to_markdown, torch_threads,
                  write_table)

EPS = 0.1
N_CLASSES = 10
TEST_SET_SIZE = 10_000
REPORTED = "reported by the issue, not re-measured"
# figures other tools reached on the first 200 test images on this machine, as given in the issue
REPORTED_FIGURES = {
    "reference": "192/200 certified, 39 ms/image",
    "crown": "auto_LiRPA CROWN: 193/200 certified, 48 ms/image",
    "alpha_crown": "auto_LiRPA α-CROWN: 193/200 certified, ≈1540 ms/image",
    "robust_errors_500": "32 on the first 500",
}
PARTS = "abcdefghijkl"
DEFAULT_PARTS = "abcdefghi"  # j starts worker processes on every core, k takes minutes, l hours: by name
COLUMNS = ["part", "quantity", "polytope_lab", "convex_adversarial", "reference / ours", REPORTED, "note"]
DEFAULTS = dict(threads=2, n_images=500, n_compare=200, batch=50, reps=3)
QUICK = dict(n_images=20, n_compare=20, batch=10, reps=1)


def parse_args(argv=None):
    parser = ExperimentParser(__doc__.strip().splitlines()[0], out="figures/benchmark", defaults=DEFAULTS,
                              quick=QUICK, model_help="state_dict of the paper's MNIST ConvNet (.pth; required)")
    parser.setting("--n-images", type=int, help="test images for parts a and b")
    parser.setting("--n-compare", type=int, help="test images for part d")
    parser.setting("--batch", type=int, help="images per batch")
    parser.setting("--reps", type=int, help="timed repetitions per batch (median taken)")
    parser.add_argument("--full", action="store_true", help="part c: certify all 10,000 test images")
    parser.add_argument("--parts", default=DEFAULT_PARTS, help="which parts to run, e.g. 'ad' or 'ef' (j, k, l: only "
                                                            "when named)")
    benchmark_exact.add_arguments(parser)
    benchmark_scaling.add_arguments(parser)
    benchmark_skip.add_arguments(parser)
    benchmark_cluster.add_arguments(parser)
    benchmark_bab.add_arguments(parser)
    benchmark_tight.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error("--model is required: the state_dict of the paper's MNIST ConvNet")
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"--parts takes letters from {PARTS!r}, got {args.parts!r}")
    return args


def package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def optional_module(name):
    """The module ``name``, or (None, reason) when it does not import."""
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # ImportError, or an incompatible install failing at import time
        return None, f"{type(exc).__name__}: {exc}"


def reference_objective(y, n_classes=N_CLASSES):
    """The reference's objective matrix ``c``: rows e_y − e_j for every j (row y is zero), (B, n, n)."""
    eye = torch.eye(n_classes, device=y.device)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


def other_classes(t, y):
    """Drop column y of each row of ``t`` (B, n) -> (B, n − 1), keeping the order of the others."""
    keep = torch.arange(t.shape[1], device=t.device)[None, :] != y[:, None]
    return t[keep].reshape(t.shape[0], t.shape[1] - 1)


def reference_errors(J, y):
    """Robust errors by convex_adversarial.robust_loss's rule: argmax of −J is not the label."""
    return int(((-J).max(1)[1] != y).sum())


def ms_per_image(seconds, n):
    return 1000.0 * seconds / n


def batches(X, y, size):
    return [(X[s:s + size], y[s:s + size]) for s in range(0, len(X), size)]


def part_a(model, data_batches, args, ca):
    """Exact dual bounds, no gradient: timing, agreement, robust errors."""
    bounder = pl.Bounder.create("dual", device=args.device)
    objectives = [reference_objective(yb) for _, yb in data_batches]

    def ours(k):
        Xb, _ = data_batches[k]
        return bounder.bound(model, pl.LinfBall(Xb, EPS), objectives[k]).lower

    fns = {"ours": ours}
    if ca is not None:
        fns["reference"] = lambda k: ca.DualNetwork(model, data_batches[k][0], EPS)(objectives[k])
    with torch.no_grad():
        timed = time_interleaved(fns, len(data_batches), args.reps, args.device, desc="a: dual bounds")
    n = sum(len(yb) for _, yb in data_batches)
    y = torch.cat([yb for _, yb in data_batches])
    J_ours = torch.cat(timed["ours"][0])
    ours_errors = int((~(other_classes(J_ours, y) > 0).all(1)).sum())
    with torch.no_grad():
        clean_errors = int(sum((model(Xb).argmax(1) != yb).sum() for Xb, yb in data_batches))
    result = {"ms_ours": ms_per_image(timed["ours"][1], n), "ours_errors": ours_errors}
    rows = [
        {"part": "a", "quantity": f"clean errors / {n}", "polytope_lab": clean_errors,
         "note": "plain forward pass of the model"},
    ]
    if ca is None:
        rows += [
            {"part": "a", "quantity": f"dual bounds, ms/image (batches of {args.batch})",
             "polytope_lab": result["ms_ours"], "note": "convex_adversarial not installed: reference skipped"},
            {"part": "a", "quantity": f"robust errors / {n}", "polytope_lab": ours_errors,
             REPORTED: REPORTED_FIGURES["robust_errors_500"]},
        ]
        return rows, result
    J_ref = torch.cat(timed["reference"][0])
    diff = (other_classes(J_ours, y) - other_classes(J_ref, y)).abs()
    scale = other_classes(J_ref, y).abs().clamp(min=1e-3)
    result["ms_ref"] = ms_per_image(timed["reference"][1], n)
    rows += [
        {"part": "a", "quantity": f"dual bounds, ms/image (batches of {args.batch})",
         "polytope_lab": result["ms_ours"], "convex_adversarial": result["ms_ref"],
         "reference / ours": result["ms_ref"] / result["ms_ours"],
         "note": f"median of {args.reps} interleaved repetition(s) per batch after a warm-up; torch.no_grad"},
        {"part": "a", "quantity": "max relative difference of the bounds",
         "polytope_lab": (diff / scale).max().item(),
         "note": f"over rows j ≠ y, |J_ours − J_ref| / max(|J_ref|, 1e-3); max absolute difference "
                 f"{diff.max().item():.3g}"},
        {"part": "a", "quantity": f"robust errors / {n}", "polytope_lab": ours_errors,
         "convex_adversarial": reference_errors(J_ref, y), REPORTED: REPORTED_FIGURES["robust_errors_500"],
         "note": "ours: some lower bound of f_y − f_j ≤ 0; reference: its robust_loss rule (argmax of −J ≠ y)"},
    ]
    return rows, result


def part_b(model, data_batches, args, ca):
    """robust_loss forward + backward with gradients."""

    def run(loss_fn, k):
        Xb, yb = data_batches[k]
        model.zero_grad(set_to_none=True)
        loss, _ = loss_fn(model, EPS, Xb, yb)
        loss.backward()
        return loss.item()

    fns = {"ours": lambda k: run(pl.robust_loss, k)}
    if ca is not None:
        fns["reference"] = lambda k: run(ca.robust_loss, k)
    timed = time_interleaved(fns, len(data_batches), args.reps, args.device, desc="b: robust_loss fwd+bwd")
    model.zero_grad(set_to_none=True)
    n = sum(len(yb) for _, yb in data_batches)
    ms_ours = ms_per_image(timed["ours"][1], n)
    row = {"part": "b", "quantity": f"robust_loss forward+backward, ms/image (batches of {args.batch})",
           "polytope_lab": ms_ours, "note": f"median of {args.reps} interleaved repetition(s) per batch"}
    if ca is None:
        row["note"] += "; convex_adversarial not installed: reference skipped"
        return [row]
    ms_ref = ms_per_image(timed["reference"][1], n)
    row.update({"convex_adversarial": ms_ref, "reference / ours": ms_ref / ms_ours})
    loss_diff = max(abs(a - b) for a, b in zip(timed["ours"][0], timed["reference"][0]))
    return [row, {"part": "b", "quantity": "robust loss value, max |ours − reference| over batches",
                  "polytope_lab": loss_diff, "note": "mean cross-entropy of −J per batch"}]


def part_c(model, X, y, args, ca, result_a):
    """Certifying the whole test set: extrapolated from (a), or measured with --full."""
    rows = [{"part": "c", "quantity": f"time to certify the {TEST_SET_SIZE:,} test images, s (extrapolated)",
             "polytope_lab": result_a["ms_ours"] * TEST_SET_SIZE / 1000,
             "note": f"ms/image of part a × {TEST_SET_SIZE:,}"}]
    if "ms_ref" in result_a:
        rows[0]["convex_adversarial"] = result_a["ms_ref"] * TEST_SET_SIZE / 1000
        rows[0]["reference / ours"] = result_a["ms_ref"] / result_a["ms_ours"]
    if not args.full:
        return rows
    bounder = pl.Bounder.create("dual", device=args.device)
    full = batches(X, y, args.batch)
    times, errors = {}, {}
    with torch.no_grad():
        start = time.perf_counter()
        errors["ours"] = int(robust_errors(model, X, y, EPS, bounder=bounder, n_classes=N_CLASSES,
                                           batch_size=args.batch, progress=True).sum())
        times["ours"] = time.perf_counter() - start
        if ca is not None:
            start, errors["ref"] = time.perf_counter(), 0
            for Xb, yb in tqdm(full, desc="c: full test set, convex_adversarial", leave=False):
                errors["ref"] += reference_errors(ca.DualNetwork(model, Xb, EPS)(reference_objective(yb)), yb)
            times["ref"] = time.perf_counter() - start
    measured = {"part": "c", "quantity": f"time to certify the {len(X):,} test images, s (measured, --full)",
                "polytope_lab": times["ours"], "note": "one pass, no repetitions"}
    err_row = {"part": "c", "quantity": f"robust errors / {len(X):,}", "polytope_lab": errors["ours"],
               "note": "published (seed README): 5.8% robust error"}
    if ca is not None:
        measured.update({"convex_adversarial": times["ref"], "reference / ours": times["ref"] / times["ours"]})
        err_row["convex_adversarial"] = errors["ref"]
    return rows + [measured, err_row]


def part_d(model, X, y, args, ca):
    """First n_compare images: fixed and optimised α, next to the issue's figures for other tools."""
    data_batches = batches(X[:args.n_compare], y[:args.n_compare], args.batch)
    n = sum(len(yb) for _, yb in data_batches)
    fixed = pl.Bounder.create("dual", device=args.device)
    optimized = pl.Bounder.create("dual", **FINAL_ALPHA_ONLY, device=args.device)
    margins = [pl.margin_matrix(yb, N_CLASSES) for _, yb in data_batches]

    def certify(bounder):
        return lambda k: bounder.bound(model, pl.LinfBall(data_batches[k][0], EPS), margins[k]).certified

    fns = {"ours": certify(fixed)}
    if ca is not None:
        fns["reference"] = lambda k: ca.DualNetwork(model, data_batches[k][0], EPS)(
            reference_objective(data_batches[k][1]))
    with torch.no_grad():
        timed = time_interleaved(fns, len(data_batches), args.reps, args.device, desc="d: dual, fixed α")
    opt = time_interleaved({"ours": certify(optimized)}, len(data_batches), 1, args.device,
                           desc="d: dual, optimised α")

    def certified(results):
        return int(torch.cat(results).sum())

    rows = [
        {"part": "d", "quantity": f"dual, fixed α: certified / {n}", "polytope_lab": certified(timed["ours"][0]),
         REPORTED: "reference " + REPORTED_FIGURES["reference"]},
        {"part": "d", "quantity": "dual, fixed α: ms/image", "polytope_lab": ms_per_image(timed["ours"][1], n),
         REPORTED: "reference " + REPORTED_FIGURES["reference"],
         "note": f"median of {args.reps} interleaved repetition(s) per batch"},
        {"part": "d", "quantity": f"dual, optimised α ({optimized.steps} Adam steps): certified / {n}",
         "polytope_lab": certified(opt["ours"][0]), REPORTED: REPORTED_FIGURES["alpha_crown"],
         "note": "α of every ReLU layer optimised per objective row in the final objective; intermediate bounds from fixed α"},
        {"part": "d", "quantity": f"dual, optimised α ({optimized.steps} Adam steps): ms/image",
         "polytope_lab": ms_per_image(opt["ours"][1], n), REPORTED: REPORTED_FIGURES["alpha_crown"],
         "note": "one repetition per batch; the bounder also optimises the upper bounds (−C)"},
    ]
    if ca is not None:
        ref_errors = sum(reference_errors(J, yb) for J, (_, yb) in zip(timed["reference"][0], data_batches))
        ms_ref = ms_per_image(timed["reference"][1], n)
        rows[0]["convex_adversarial"] = n - ref_errors
        rows[1].update({"convex_adversarial": ms_ref, "reference / ours": ms_ref / rows[1]["polytope_lab"]})
    rows += crown_rows(model, data_batches, args)
    return rows


def crown_rows(model, data_batches, args):
    """auto_LiRPA CROWN when auto_LiRPA imports; otherwise the issue's figures only."""
    lirpa, why = optional_module("auto_LiRPA")
    n = sum(len(yb) for _, yb in data_batches)
    rows = [{"part": "d", "quantity": f"auto_LiRPA CROWN: certified / {n}", REPORTED: REPORTED_FIGURES["crown"]},
            {"part": "d", "quantity": "auto_LiRPA CROWN: ms/image", REPORTED: REPORTED_FIGURES["crown"]}]
    if lirpa is None:
        note = f"not measured: auto_LiRPA does not import here ({why})"
        rows[0]["note"] = rows[1]["note"] = note
        return rows
    try:
        bounded = lirpa.BoundedModule(model, torch.empty_like(data_batches[0][0]), device=args.device)
        ptb = lirpa.PerturbationLpNorm(norm=float("inf"), eps=EPS)
        margins = [pl.margin_matrix(yb, N_CLASSES) for _, yb in data_batches]

        def crown(k):
            x = lirpa.BoundedTensor(data_batches[k][0], ptb)
            lower, _ = bounded.compute_bounds(x=(x,), C=margins[k], method="CROWN")
            return (lower > 0).all(1)

        with torch.no_grad():
            timed = time_interleaved({"crown": crown}, len(data_batches), args.reps, args.device,
                                     desc="d: auto_LiRPA CROWN")
        rows[0]["other tool (measured)"] = int(torch.cat(timed["crown"][0]).sum())
        rows[1]["other tool (measured)"] = ms_per_image(timed["crown"][1], n)
        rows[0]["note"] = rows[1]["note"] = "measured with auto_LiRPA; value in 'other tool (measured)'"
    except Exception as exc:  # an auto_LiRPA version with another API must not sink the benchmark
        rows[0]["note"] = rows[1]["note"] = f"auto_LiRPA imports but CROWN failed: {type(exc).__name__}: {exc}"
    return rows


def main(argv=None):
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args, argv)


def run(args, argv):
    torch.manual_seed(args.seed)
    load_start = machine_load()
    ca, ca_why = optional_module("convex_adversarial")
    model = models.load_state(models.mnist_convnet(), args.model).to(args.device)
    X, y = data.mnist("test", root=args.data_dir)
    X, y = X.to(args.device), y.to(args.device)
    started = time.perf_counter()

    rows, first = [], batches(X[:args.n_images], y[:args.n_images], args.batch)
    if "a" in args.parts or "c" in args.parts:
        rows_a, result_a = part_a(model, first, args, ca)
        rows += rows_a if "a" in args.parts else []
    if "b" in args.parts:
        rows += part_b(model, first, args, ca)
    if "c" in args.parts:
        rows += part_c(model, X, y, args, ca, result_a)
    if "d" in args.parts:
        rows += part_d(model, X, y, args, ca)
    if "e" in args.parts:
        rows += benchmark_exact.part_e(model, X, y, EPS, args)
    if "f" in args.parts or "g" in args.parts:
        X_train, y_train = data.mnist("train", root=args.data_dir)
    if "f" in args.parts:
        mlp = benchmark_exact.trained_mlp(X_train, y_train, EPS, args)
        rows += benchmark_exact.part_f({"ConvNet": (model, X, y), "MLP 784-100-100-10": (mlp, X.flatten(1), y)},
                                       EPS, args)
    if "g" in args.parts:
        rows += benchmark_scaling.part_g(model, X_train, y_train, EPS, args, ca)
    if "h" in args.parts:
        rows += benchmark_scaling.part_h(X, y, EPS, args)
    if "i" in args.parts:
        rows += benchmark_skip.part_i(X, y, args, ca)
    if "j" in args.parts:
        rows += benchmark_cluster.part_j(model, X, y, EPS, args)
    if "l" in args.parts:
        rows += benchmark_bab.part_l(model, X, y, args)
    if "k" in args.parts:
        rows += benchmark_tight.part_k(args, model, X, y)

    df = pd.DataFrame(rows)
    df = df.reindex(columns=COLUMNS + [c for c in df.columns if c not in COLUMNS])
    load_end = machine_load()
    meta = {
        "command": command("benchmark", argv),
        "eps": EPS, "n_images": args.n_images, "n_compare": args.n_compare, "batch": args.batch,
        "reps": args.reps, "threads": args.threads, "device": args.device, "quick": args.quick,
        "full": args.full, "parts": args.parts,
        "milp_images": args.milp_images, "milp_solvers": args.milp_solvers,
        "milp_time_limit": args.milp_time_limit, "lp_images": args.lp_images, "mlp_images": args.mlp_images,
        "mlp_epochs": args.mlp_epochs, "seconds_total": round(time.perf_counter() - started, 1),
        "proj": args.proj, "train_steps": args.train_steps, "memory_batches": args.memory_batches,
        "max_memory_mib": args.max_memory_mib, "column_chunk": args.column_chunk,
        "memory_settings": args.memory_settings, "skip_images": args.skip_images, "skip_batch": args.skip_batch,
        "cluster_images": args.cluster_images, "cluster_chunk": args.cluster_chunk,
        **({k: getattr(args, k) for k in [*benchmark_bab.DEFAULTS, "vnncomp_dir"]} if "l" in args.parts else {}),
        "bench_nets": args.bench_nets, "tight_reps": args.tight_reps, "tight_images": args.tight_images,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "convex_adversarial": package_version("convex_adversarial") if ca else f"missing ({ca_why})",
        "load_at_start": load_start, "load_at_end": load_end,
    }
    paths = write_table(df, args.out, "results", meta=meta, json_too=True)
    record_rows(args.out, "benchmark", df.to_dict("records"), key=["part", "quantity"])
    print(to_markdown(df))
    busiest = max(load_start["loadavg_1min"], load_end["loadavg_1min"])
    if busiest > args.threads + 0.5:
        print(f"warning: load average reached {busiest} with {args.threads} thread(s) requested on "
              f"{load_end['cpu_count']} CPUs: other processes may have slowed the timings")
    print(f"total {meta['seconds_total']} s; wrote " + ", ".join(str(p) for p in paths))
    return df


if __name__ == "__main__":
    main()

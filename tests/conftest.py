"""Shared helpers and fixtures for the polytope_lab test suite.

* random networks (MLPs and small convnets) built under ``torch.manual_seed``;
* ``bounder_factories``: every registered backend (``Bounder.available()``) with its option variants, so a
  backend that registers itself later (``lp``, ``milp``) joins the contract suite automatically;
* samplers and a small PGD attack over a region, used to check that bounds are sound;
* the real MNIST test set and the pretrained Wong–Kolter model (skipped with a reason when
  ``POLYTOPE_LAB_DATA`` / ``POLYTOPE_LAB_MODELS`` are unset or point nowhere; failed instead when
  ``POLYTOPE_LAB_REQUIRE_DATA=1``, as in CI).
"""
from __future__ import annotations

import functools
import gzip
import itertools
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import polytope_lab as pl
from polytope_lab import data, models, relaxation

_DEFAULT_THREADS = torch.get_num_threads()
# no test may reach the internet: with no mirrors, a missing MNIST file is an error, never a download
os.environ[data.MIRRORS_ENV_VAR] = ""


@pytest.fixture(autouse=True)
def _torch_threads(request):
    """One intra-op thread for ordinary tests (their networks are tiny: threading only adds overhead,
    5-15x on a loaded 2-core machine); every core for tests marked slow. Overrides:
    POLYTOPE_LAB_TEST_THREADS, POLYTOPE_LAB_SLOW_THREADS."""
    before = torch.get_num_threads()
    if request.node.get_closest_marker("slow"):
        n = int(os.environ.get("POLYTOPE_LAB_SLOW_THREADS", str(_DEFAULT_THREADS)))
    else:
        n = int(os.environ.get("POLYTOPE_LAB_TEST_THREADS", "1"))
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


#: multiplies every hypothesis test's example count (e.g. POLYTOPE_LAB_TEST_SCALE=20 for a thorough run)
TEST_SCALE = float(os.environ.get("POLYTOPE_LAB_TEST_SCALE", "1"))


def n_examples(n: int) -> int:
    return max(1, int(round(n * TEST_SCALE)))


# --------------------------------------------------------------------------------------------------
# bounders
# --------------------------------------------------------------------------------------------------

#: option variants per registered bounder name: (test id, options). Names not listed run once with
#: default options under their own name.
BOUNDER_VARIANTS = {
    "interval": [("interval", {})],
    "dual": [
        ("dual", {}),
        ("dual-optimized", {"alpha": "optimized", "steps": 10}),
        ("dual-backward", {"strategy": "backward"}),
        ("dual-forward", {"strategy": "forward"}),
    ],
    "lp": [("lp", {}), ("lp-all", {"intermediate": "lp"})],
    # one solver thread: the contract nets are tiny (CBC, time limits, progressive: see test_milp.py)
    "milp": [("milp", {"threads": 1})],
    # branch and bound: ReLU splits on every net (input bisection is exponential in the input count)
    "bab": [("bab", {"split": "relu", "attack_steps": 20})],
}


#: backends whose values are a solver's optimum, correct to the solver's tolerances
#: (``relaxation.SOLVER_TOLERANCE``: HiGHS primal/dual feasibility 1e-7, MIP feasibility 1e-6): two
#: independent solves of one problem, or of its negation, agree to ``relaxation.solver_slack`` (10× the MIP
#: feasibility tolerance, relative to max(1, |value|)), not to float64 rounding
SOLVER_BACKENDS = ("lp", "milp", "bab")
SOLVER_AGREEMENT = {"rtol": relaxation.solver_slack(0.0), "atol": relaxation.solver_slack(0.0)}
EXACT_ARITHMETIC_AGREEMENT = {"rtol": 1e-6, "atol": 1e-7}


def agreement(bounder) -> dict:
    """``assert_close`` tolerances for two independent computations of the same bound by ``bounder``."""
    return SOLVER_AGREEMENT if bounder.name in SOLVER_BACKENDS else EXACT_ARITHMETIC_AGREEMENT


def _bounder_factories():
    out = []
    for name in pl.Bounder.available():
        for test_id, options in BOUNDER_VARIANTS.get(name, [(name, {})]):
            out.append((test_id, functools.partial(pl.Bounder.create, name, **options)))
    return out


#: [(id, factory)]: ``factory()`` returns a fresh Bounder.
bounder_factories = _bounder_factories()


# --------------------------------------------------------------------------------------------------
# random networks
# --------------------------------------------------------------------------------------------------


def make_mlp(sizes, seed=0, dtype=torch.float64):
    """Linear-ReLU-...-Linear with layer widths ``sizes`` (input first), default init under ``seed``."""
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).to(dtype).eval()


def make_convnet(in_shape=(1, 6, 6), channels=(3, 4), n_out=3, seed=0, dtype=torch.float64):
    """Conv(k3,s1,p1)-ReLU-Conv(k3,s2,p1)-ReLU-Flatten-Linear on ``in_shape`` inputs."""
    torch.manual_seed(seed)
    c, h, w = in_shape
    c1, c2 = channels
    conv1 = nn.Conv2d(c, c1, 3, stride=1, padding=1)
    conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
    h2, w2 = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    model = nn.Sequential(conv1, nn.ReLU(), conv2, nn.ReLU(), nn.Flatten(), nn.Linear(c2 * h2 * w2, n_out))
    return model.to(dtype).eval()


def make_resnet(kind="mlp", seed=0, dtype=torch.float64):
    """Small nets with skip connections (``models.DenseSequential``), each with its input shape:
    "mlp": residual_mlp(width 6, 2 blocks, 3 -> 2); "conv": a conv residual block with a skip from the
    input over two layers and a skip over two steps (Dense(conv, None, conv)), then Linear;
    "input-skip": a skip from the input straight to the output layer, plus a Flatten inside a Dense."""
    torch.manual_seed(seed)
    if kind == "mlp":
        return models.residual_mlp(6, 2, 3, 2).to(dtype).eval(), (3,)
    if kind == "conv":
        net = models.DenseSequential(
            nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(),
            models.Dense(nn.Conv2d(2, 2, 1), None, nn.Conv2d(2, 2, 3, padding=1)), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * 5 * 5, 3))
        return net.to(dtype).eval(), (1, 5, 5)
    if kind == "input-skip":
        net = models.DenseSequential(
            nn.Flatten(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(),
            models.Dense(nn.Sequential(nn.Flatten(), nn.Linear(8, 3)), None, None, None, nn.Linear(5, 3)))
        return net.to(dtype).eval(), (2, 4)
    raise ValueError(kind)


RESNET_KINDS = ("mlp", "conv", "input-skip")


def random_inputs(input_shape, batch=3, seed=1, dtype=torch.float64, low=0.0, high=1.0):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(batch, *input_shape, generator=g, dtype=dtype)


def output_of(model, x):
    """``f(x)`` flattened to (N, n_out)."""
    with torch.no_grad():
        return model(x).reshape(x.shape[0], -1)


def apply_C(C, f):
    """``C f`` for C (m, n) or (B, m, n) and f (B, n) -> (B, m)."""
    C = torch.as_tensor(C, dtype=f.dtype)
    if C.dim() == 2:
        return f @ C.t()
    return torch.einsum("bmn,bn->bm", C, f)


# --------------------------------------------------------------------------------------------------
# points in a region and a small attack
# --------------------------------------------------------------------------------------------------


def sample_region(region, n, seed=0, vertices=True):
    """``n`` points per example in ``region``: (n, B, *input_shape). For a Box (an L∞ ball ∩ clip) uniform
    points plus random vertices of the box (and all vertices when there are at most 64); for an L2 ball
    uniform points in the ball plus points on its sphere."""
    g = torch.Generator().manual_seed(seed)
    x = region.x
    B, shape = x.shape[0], x.shape[1:]
    d = int(np.prod(shape))
    dt = x.dtype
    if isinstance(region, pl.Box):
        lo, hi = region.box()
        u = torch.rand(n, B, *shape, generator=g, dtype=dt)
        pts = [lo + (hi - lo) * u]
        if vertices:
            if d <= 6:
                signs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)), dtype=dt)
                signs = signs.reshape(-1, 1, *shape).expand(-1, B, *shape)
            else:
                signs = torch.randint(0, 2, (n, B, *shape), generator=g).to(dt)
            pts.append(lo + (hi - lo) * signs)
        return torch.cat(pts)
    if isinstance(region, pl.L2Ball):
        eps = region.eps.reshape(1, B, *([1] * len(shape)))
        v = torch.randn(n, B, d, generator=g, dtype=dt)
        v = v / v.norm(dim=-1, keepdim=True)
        r = torch.rand(n, B, 1, generator=g, dtype=dt) ** (1.0 / d)
        inside = x + eps * (r * v).reshape(n, B, *shape)
        sphere = x + eps * v.reshape(n, B, *shape) * (1 - 1e-12)
        return torch.cat([inside, sphere])
    raise TypeError(type(region))


def sampled_values(model, region, C, n=500, seed=0):
    """``C f(x')`` at sampled ``x'``: (N, B, m)."""
    pts = sample_region(region, n, seed)
    N, B = pts.shape[:2]
    f = output_of(model, pts.reshape(N * B, *pts.shape[2:])).reshape(N, B, -1)
    if C is None:
        return f
    C = torch.as_tensor(C, dtype=f.dtype)
    if C.dim() == 2:
        return f @ C.t()
    return torch.einsum("bmn,Nbn->Nbm", C, f)


def pgd_extremes(model, region, C=None, steps=40, restarts=2, seed=0):
    """Attack every row of ``C f(x')``: returns (min found, max found), each (B, m).

    Sign-gradient steps (L∞) or normalised-gradient steps (L2) projected with ``region.project``, from
    the centre and from random starts; each (example, row) pair is attacked on its own copy of the
    region (``region.select`` with repeated indices).
    """
    x = region.x
    B = x.shape[0]
    with torch.no_grad():
        n_out = output_of(model, x[:1]).shape[1]
    if C is None:
        C = torch.eye(n_out, dtype=x.dtype)
    C = torch.as_tensor(C, dtype=x.dtype)
    if C.dim() == 2:
        C = C.expand(B, *C.shape)
    m = C.shape[1]
    idx = torch.arange(B).repeat_interleave(m)
    rep = region.select(idx)
    rows = C.reshape(B * m, -1)
    shape = x.shape[1:]
    eps = rep.eps.reshape(-1, *([1] * len(shape)))
    if isinstance(region, pl.Box):
        lo, hi = rep.box()
        span = (hi - lo).reshape(B * m, -1).amax(1).reshape(-1, *([1] * len(shape)))
    else:
        span = 2 * eps
    g = torch.Generator().manual_seed(seed)
    results = []
    for sign in (+1.0, -1.0):  # +1: minimise, -1: maximise
        best = torch.full((B * m,), float("inf"), dtype=x.dtype)
        for r in range(restarts + 1):
            if r == 0:
                z = rep.x.clone()
            else:
                z = rep.project(rep.x + eps * (2 * torch.rand(rep.x.shape, generator=g, dtype=x.dtype) - 1))
            for t in range(steps):
                step = span * (0.5 * (1 - t / steps) + 0.02)
                z = z.detach().requires_grad_(True)
                val = sign * (model(z).reshape(B * m, -1) * rows).sum(1)
                best = torch.minimum(best, val.detach())
                (grad,) = torch.autograd.grad(val.sum(), z)
                with torch.no_grad():
                    if isinstance(region, pl.Box):
                        z = z - step * grad.sign()
                    else:
                        gn = grad.reshape(B * m, -1).norm(dim=1).clamp(min=1e-30)
                        z = z - step * grad / gn.reshape(-1, *([1] * len(shape)))
                    z = rep.project(z)
            with torch.no_grad():
                val = sign * (model(z).reshape(B * m, -1) * rows).sum(1)
                best = torch.minimum(best, val)
        results.append(sign * best.reshape(B, m))
    return results[0], results[1]


def assert_within(values, lower, upper, tol=1e-5, what="sampled C f(x')"):
    """values (..., B, m) within [lower - tol, upper + tol] (B, m) everywhere."""
    below = (values < lower - tol)
    above = (values > upper + tol)
    if below.any() or above.any():
        worst_lo = (lower - values).max().item()
        worst_hi = (values - upper).max().item()
        raise AssertionError(f"{what} escapes the bounds: by {worst_lo:.3g} below lower, {worst_hi:.3g} above upper")


# --------------------------------------------------------------------------------------------------
# real data and the pretrained model
# --------------------------------------------------------------------------------------------------

MNIST_FILES = {
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
}
PRETRAINED = "wong_kolter_mnist_eps0.1.pth"


def read_idx(path) -> np.ndarray:
    """Read a gzipped IDX file (big-endian header: 0, 0, type code, ndim; then ndim uint32 sizes)."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (header {zero}, {code:#x})")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {dims} bytes of data, found {arr.size}")
    return arr.reshape(dims)


#: POLYTOPE_LAB_REQUIRE_DATA=1 (CI's strict mode): a missing data file fails the test instead of skipping it
STRICT_DATA = os.environ.get("POLYTOPE_LAB_REQUIRE_DATA") == "1"


def real_path(var: str, *parts: str, what: str) -> Path:
    """``$var/parts…``, the real data or weights a test needs; skipped with a one-line reason when the variable
    is unset or the path is missing (a fresh clone without ``../shared``), failed instead in strict mode."""
    root = os.environ.get(var)
    path = Path(root, *parts) if root else None
    if path is not None and path.exists():
        return path
    reason = (f"{var} is not set: point it at the directory holding {what}" if path is None
              else f"{path} does not exist ({var} should hold {what})")
    if STRICT_DATA:
        pytest.fail(f"POLYTOPE_LAB_REQUIRE_DATA=1 and {reason}")
    pytest.skip(reason)


def real_mnist_dir() -> Path:
    """``$POLYTOPE_LAB_DATA/mnist`` with the four MNIST IDX files (skip or strict-mode failure otherwise)."""
    d = real_path("POLYTOPE_LAB_DATA", "mnist", what="mnist/ (the four MNIST IDX .gz files)")
    for name in MNIST_FILES.values():
        real_path("POLYTOPE_LAB_DATA", "mnist", name, what="mnist/ (the four MNIST IDX .gz files)")
    return d


def pretrained_path() -> Path:
    """``$POLYTOPE_LAB_MODELS/wong_kolter_mnist_eps0.1.pth`` (skip or strict-mode failure otherwise)."""
    return real_path("POLYTOPE_LAB_MODELS", PRETRAINED, what=f"the seed authors' {PRETRAINED}")


@pytest.fixture(scope="session")
def mnist_test():
    """(X, y): the 10,000 MNIST test images as float32 (N, 1, 28, 28) in [0, 1], labels int64."""
    d = real_mnist_dir()
    images, labels = read_idx(d / MNIST_FILES["test_images"]), read_idx(d / MNIST_FILES["test_labels"])
    X = torch.from_numpy(images.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(labels.astype(np.int64))
    return X, y


def wong_kolter_mnist_model():
    """The paper's MNIST ConvNet architecture (untrained)."""
    return models.mnist_convnet()


@pytest.fixture(scope="session")
def pretrained_model():
    """The Wong–Kolter MNIST model trained at eps = 0.1 (CPU, eval mode)."""
    path = pretrained_path()
    model = wong_kolter_mnist_model()
    model.load_state_dict(torch.load(path, map_location="cpu"))
    return model.eval()

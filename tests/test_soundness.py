"""Property tests (hypothesis) on random networks: bounds are sound against sampling and a PGD attack;
optimised α is never looser than fixed α; the intermediate-bound strategies agree."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
from hypothesis import assume, HealthCheck, given, settings
from hypothesis import strategies as st

import polytope_lab as pl

from conftest import assert_within, bounder_factories, n_examples, pgd_extremes, sample_region, sampled_values

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                derandomize=True)
B = 2


@st.composite
def problems(draw, kinds=("mlp", "conv")):
    """(model, region, C) with a random MLP or small convnet and a random L∞ / L∞∩clip / L2 region."""
    seed = draw(st.integers(0, 2 ** 16))
    kind = draw(st.sampled_from(kinds))
    torch.manual_seed(seed)
    if kind == "mlp":
        d_in = draw(st.integers(2, 6))
        hidden = draw(st.lists(st.integers(3, 12), min_size=1, max_size=3))
        n_out = draw(st.integers(2, 4))
        sizes = [d_in, *hidden, n_out]
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        model = nn.Sequential(*layers[:-1])
        shape = (d_in,)
    else:
        # a chain of 1-3 convolutions (square: exercises the receptive-field "patches" path of the dual),
        # then an optional hidden dense layer
        c = draw(st.integers(1, 2))
        side = draw(st.integers(4, 8))
        shape = (c, side, side)
        layers = []
        for _ in range(draw(st.integers(1, 3))):
            k = draw(st.integers(1, min(4, side + 2)))
            p = draw(st.integers(0, min(2, k)))
            s = draw(st.integers(1, 3))
            if side + 2 * p < k:
                break
            c_out = draw(st.integers(1, 3))
            layers += [nn.Conv2d(c, c_out, k, stride=s, padding=p), nn.ReLU()]
            c, side = c_out, (side + 2 * p - k) // s + 1
        n_out = draw(st.integers(2, 4))
        layers.append(nn.Flatten())
        if draw(st.booleans()):
            layers += [nn.Linear(c * side * side, 6), nn.ReLU(), nn.Linear(6, n_out)]
        else:
            layers.append(nn.Linear(c * side * side, n_out))
        model = nn.Sequential(*layers)
    model = model.double().eval()
    x = torch.rand(B, *shape, dtype=torch.float64)
    eps = draw(st.floats(0.01, 0.5))
    norm = draw(st.sampled_from(["linf", "linf-clip", "l2"]))
    if norm == "linf":
        region = pl.LinfBall(x, eps)
    elif norm == "linf-clip":
        region = pl.LinfBall(x, eps, clip=(0.0, 1.0))
    else:
        region = pl.L2Ball(x, eps)
    m = draw(st.integers(1, 4))
    C = torch.randn(m, n_out, dtype=torch.float64)
    return model, region, C


#: a time limit for the exact searches: these random nets can need long searches, and a time-limited bound
#: is still sound, which is all that these tests check (the contract suite runs them without one)
SEARCH_LIMITS = {"bab": {"time_limit": 1.0}}
factory_params = pytest.mark.parametrize(
    "factory", [functools.partial(f, **SEARCH_LIMITS.get(i, {})) for i, f in bounder_factories],
    ids=[i for i, _ in bounder_factories])


@factory_params
@settings(max_examples=n_examples(30), **SETTINGS)
@given(problems())
def test_sampled_points_within_bounds(factory, problem):
    model, region, C = problem
    bounder = factory()
    assume(bounder.supports(region))  # e.g. the MILP takes L∞ balls only
    b = bounder.bound(model, region, C=C)
    assert (b.lower <= b.upper + 1e-9).all()
    assert_within(sampled_values(model, region, C, n=400), b.lower, b.upper, tol=1e-5)


@factory_params
@settings(max_examples=n_examples(25), **SETTINGS)
@given(problems())
def test_pgd_never_beats_the_bounds(factory, problem):
    model, region, C = problem
    bounder = factory()
    assume(bounder.supports(region))  # e.g. the MILP takes L∞ balls only
    b = bounder.bound(model, region, C=C)
    lo, hi = pgd_extremes(model, region, C, steps=25, restarts=1)
    assert (lo >= b.lower - 1e-5).all(), f"attack found {lo} below the lower bound {b.lower}"
    assert (hi <= b.upper + 1e-5).all(), f"attack found {hi} above the upper bound {b.upper}"


@settings(max_examples=n_examples(30), **SETTINGS)
@given(problems())
def test_intermediate_bounds_hold_for_sampled_points(problem):
    model, region, C = problem
    network = pl.from_torch(model, region.input_shape)
    pts = sample_region(region, 200)
    N = pts.shape[0]
    pre = network.pre_activations(pts.reshape(N * B, *pts.shape[2:]))[:-1]
    for factory in (lambda: pl.Bounder.create("dual"), lambda: pl.Bounder.create("interval")):
        b = factory().bound(model, region, C=C)
        for (l, u), z in zip(b.intermediate, pre):
            z = z.detach().reshape(N, *l.shape)
            assert_within(z, l, u, tol=1e-6, what="pre-activation")


@settings(max_examples=n_examples(30), **SETTINGS)
@given(problems())
def test_optimized_alpha_never_looser_than_fixed(problem):
    model, region, C = problem
    fixed = pl.Bounder.create("dual").bound(model, region, C=C)
    opt = pl.Bounder.create("dual", alpha="optimized", steps=10).bound(model, region, C=C)
    assert (opt.lower >= fixed.lower - 1e-6).all()
    assert (opt.upper <= fixed.upper + 1e-6).all()


@settings(max_examples=n_examples(40), **SETTINGS)
@given(problems())
def test_strategies_agree(problem):
    model, region, C = problem
    results = {s: pl.Bounder.create("dual", strategy=s).bound(model, region, C=C)
               for s in ("auto", "forward", "backward")}
    ref = results["backward"]
    scale = max(1.0, ref.lower.abs().max().item(), ref.upper.abs().max().item())
    for s in ("auto", "forward"):
        torch.testing.assert_close(results[s].lower, ref.lower, rtol=1e-4, atol=1e-6 * scale)
        torch.testing.assert_close(results[s].upper, ref.upper, rtol=1e-4, atol=1e-6 * scale)
        for (l, u), (l0, u0) in zip(results[s].intermediate, ref.intermediate):
            torch.testing.assert_close(l, l0, rtol=1e-4, atol=1e-6 * scale)
            torch.testing.assert_close(u, u0, rtol=1e-4, atol=1e-6 * scale)


@settings(max_examples=n_examples(20), **SETTINGS)
@given(problems(), st.integers(1, 4))
def test_chunking_does_not_change_results(problem, chunk):
    """``max_memory`` only chunks the batch: results are unchanged (here every example in its own chunk)."""
    model, region, C = problem
    whole = pl.Bounder.create("dual").bound(model, region, C=C)
    tiny = pl.Bounder.create("dual", max_memory=chunk).bound(model, region, C=C)
    torch.testing.assert_close(tiny.lower, whole.lower, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(tiny.upper, whole.upper, rtol=1e-9, atol=1e-9)


@settings(max_examples=n_examples(40), **SETTINGS)
@given(problems(kinds=("conv",)))
def test_strategies_agree_on_conv_chains(problem):
    test_strategies_agree.hypothesis.inner_test(problem)


# --------------------------------------------------------------------------------------------------
# the helpers above must be strong enough for "never beats the bounds" to mean something
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["linf", "linf-clip", "l2"])
def test_attack_and_sampler_reach_the_exact_range_of_a_linear_net(norm):
    """On a ReLU-free net the dual bound is exact: PGD must reach it (and, for an L∞ box in ≤ 6
    dimensions, so must the vertex sampler)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)).double()
    x = torch.rand(2, 5, dtype=torch.float64)
    region = {"linf": lambda: pl.LinfBall(x, 0.2), "linf-clip": lambda: pl.LinfBall(x, 0.3, clip=(0.0, 1.0)),
              "l2": lambda: pl.L2Ball(x, 0.4)}[norm]()
    C = torch.randn(2, 3, dtype=torch.float64)
    b = pl.Bounder.create("dual").bound(model, region, C=C)
    lo, hi = pgd_extremes(model, region, C, steps=25, restarts=1)
    torch.testing.assert_close(lo, b.lower, rtol=0, atol=1e-4)
    torch.testing.assert_close(hi, b.upper, rtol=0, atol=1e-4)
    if norm != "l2":
        vals = sampled_values(model, region, C, n=10)
        torch.testing.assert_close(vals.min(0).values, b.lower, rtol=0, atol=1e-9)
        torch.testing.assert_close(vals.max(0).values, b.upper, rtol=0, atol=1e-9)


def test_attack_finds_the_one_neuron_minimum():
    """relu(x) on [-1, 1] starting from the centre 0 where the gradient is 0 or 1: min 0, max 1."""
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1)).double()
    with torch.no_grad():
        for lin in (model[0], model[2]):
            lin.weight.fill_(1.0)
            lin.bias.fill_(0.0)
    lo, hi = pgd_extremes(model, pl.LinfBall(torch.zeros(1, 1, dtype=torch.float64), 1.0))
    assert lo.item() == pytest.approx(0.0, abs=1e-12) and hi.item() == pytest.approx(1.0, abs=1e-9)

"""The Bounder contract, checked on every registered backend and option variant (see conftest), like
scikit-learn's estimator checks: shapes, soundness on samples, ε monotonicity, batching, dtypes, the base
class's checks (regions, options, statuses, detached results, device) and ``certify``.

The exact backends (LP, MILP) get the small nets (``EXACT_NETS``): each of their cases is a solver run.
Comparisons of two independent solves use ``agreement(bounder)`` (conftest): exact arithmetic for the
dual and interval bounds, the solvers' documented tolerances for the LP and MILP."""
from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn as nn

import polytope_lab as pl
from polytope_lab.interval import IntervalBounder

from conftest import (agreement, apply_C, assert_within, bounder_factories, make_convnet, make_mlp, make_resnet,
                      output_of, random_inputs, sampled_values)

B = 3


def _mlp():
    return make_mlp([4, 8, 8, 3], seed=0), (4,)


def _conv():
    return make_convnet((1, 6, 6), channels=(3, 4), n_out=3, seed=0), (1, 6, 6)


def _bn(n, two_d=False):
    bn = (nn.BatchNorm2d if two_d else nn.BatchNorm1d)(n)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


def _zoo_mlp():
    """Leading ReLU, eval BatchNorm, two affines without a ReLU between, Dropout, trailing ReLU."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.ReLU(), nn.Linear(4, 6), _bn(6), nn.Linear(6, 5), nn.ReLU(), nn.Dropout(0.3),
                          nn.Linear(5, 3), nn.ReLU())
    return model.double().eval(), (4,)


def _zoo_conv():
    """BatchNorm2d after a conv, a conv-conv composition, a strided dilated conv, a custom-free Flatten."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), _bn(2, True), nn.ReLU(),
                          nn.Conv2d(2, 3, 3, stride=2, padding=2, dilation=2), nn.Conv2d(3, 2, 1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
    return model.double().eval(), (1, 6, 6)


def _small_conv():
    return make_convnet((1, 4, 4), channels=(2, 2), n_out=3, seed=0), (1, 4, 4)


NETS = {"mlp-4-8-8-3": _mlp, "conv-1x6x6": _conv, "zoo-mlp": _zoo_mlp, "zoo-conv": _zoo_conv,
        "resnet-conv": lambda: make_resnet("conv"), "input-skip": lambda: make_resnet("input-skip"),
        "conv-1x4x4": _small_conv}
#: the nets of the exact backends (a solver run per case) and of the others
EXACT_NETS = ("mlp-4-8-8-3", "conv-1x4x4", "zoo-mlp", "input-skip")
FAST_NETS = tuple(n for n in NETS if n != "conv-1x4x4")
EXACT_BACKENDS = ("lp", "milp", "bab")


def nets_for(test_id: str) -> tuple:
    return EXACT_NETS if test_id.split("-")[0] in EXACT_BACKENDS else FAST_NETS


def pytest_generate_tests(metafunc):
    """Parametrise over every (bounder variant, net) case this backend runs, or over the variants alone."""
    if "bounder" not in metafunc.fixturenames:
        return
    if "net" in metafunc.fixturenames:
        cases = [(i, f, n) for i, f in bounder_factories for n in nets_for(i)]
        metafunc.parametrize(("bounder", "net"), [(f, n) for _, f, n in cases], indirect=True,
                             ids=[f"{i}-{n}" for i, _, n in cases])
    else:
        metafunc.parametrize("bounder", [f for _, f in bounder_factories], indirect=True,
                             ids=[i for i, _ in bounder_factories])


@pytest.fixture
def bounder(request):
    return request.param()


@pytest.fixture
def net(request):
    model, shape = NETS[request.param]()
    x = random_inputs(shape, batch=B, seed=1)
    return model, shape, x


def _C(m=5, n=3, seed=2, batch=None):
    g = torch.Generator().manual_seed(seed)
    shape = (m, n) if batch is None else (batch, m, n)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_shapes(bounder, net):
    model, shape, x = net
    network = pl.from_torch(model, shape)
    start = time.perf_counter()
    b = bounder.bound(model, pl.LinfBall(x, 0.05))
    elapsed = time.perf_counter() - start
    assert isinstance(b, pl.Bounds)
    assert b.lower.shape == (B, 3) and b.upper.shape == (B, 3)
    assert len(b.status) == B
    assert 0 < b.seconds <= elapsed
    assert len(b.intermediate) == network.n_relu_layers
    for (l, u), a in zip(b.intermediate, network.affines):
        assert l.shape == (B, *a.out_shape) and u.shape == (B, *a.out_shape)
        assert (l <= u + 1e-9).all()
    b5 = bounder.bound(model, pl.LinfBall(x, 0.05), C=_C(5))
    assert b5.lower.shape == (B, 5) and b5.upper.shape == (B, 5)


def test_network_and_sequential_agree(bounder, net):
    model, shape, x = net
    region = pl.LinfBall(x, 0.05)
    a = bounder.bound(model, region, C=_C())
    b = bounder.bound(pl.from_torch(model, shape), region, C=_C())
    torch.testing.assert_close(a.lower, b.lower, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(a.upper, b.upper, rtol=1e-7, atol=1e-9)


def test_eps_zero_is_exact(bounder, net):
    model, shape, x = net
    C = _C()
    b = bounder.bound(model, pl.LinfBall(x, 0.0), C=C)
    expected = apply_C(C, output_of(model, x))
    torch.testing.assert_close(b.lower, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(b.upper, expected, rtol=0, atol=1e-5)


def test_eps_zero_intermediate_bounds_are_the_pre_activations(bounder, net):
    model, shape, x = net
    b = bounder.bound(model, pl.LinfBall(x, 0.0))
    pre = pl.from_torch(model, shape).pre_activations(x)[:-1]
    for (l, u), z in zip(b.intermediate, pre):
        torch.testing.assert_close(l, z.detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(u, z.detach(), rtol=0, atol=1e-5)


def test_first_layer_intermediate_bounds_are_exact(bounder, net):
    """The first affine layer's range over an L∞ ball is W x + b ± eps |W| 1, whatever the backend."""
    model, shape, x = net
    eps = 0.07
    b = bounder.bound(model, pl.LinfBall(x, eps))
    A = pl.from_torch(model, shape).affines[0]
    W = torch.as_tensor(A.as_matrix().toarray())
    centre = (x.reshape(B, -1) @ W.t() + A.bias().detach().reshape(-1))
    rad = eps * W.abs().sum(1)
    l, u = b.intermediate[0]
    torch.testing.assert_close(l.reshape(B, -1), centre - rad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(u.reshape(B, -1), centre + rad, rtol=1e-6, atol=1e-6)


def test_bounds_widen_with_eps(bounder, net):
    model, shape, x = net
    C = _C()
    prev = None
    for eps in (0.0, 0.01, 0.05, 0.1):
        b = bounder.bound(model, pl.LinfBall(x, eps), C=C)
        if prev is not None:
            assert (b.lower <= prev.lower + 1e-6).all(), f"lower bound rose when eps grew to {eps}"
            assert (b.upper >= prev.upper - 1e-6).all(), f"upper bound fell when eps grew to {eps}"
        prev = b


def test_lower_le_upper(bounder, net):
    model, shape, x = net
    for eps in (0.0, 0.02, 0.15):
        b = bounder.bound(model, pl.LinfBall(x, eps), C=_C())
        assert (b.lower <= b.upper + 1e-7).all()


def test_batch_equals_per_example(bounder, net):
    model, shape, x = net
    eps = torch.tensor([0.02, 0.05, 0.1], dtype=x.dtype)
    C = _C(batch=B)
    whole = bounder.bound(model, pl.LinfBall(x, eps), C=C)
    for i in range(B):
        one = bounder.bound(model, pl.LinfBall(x[i:i + 1], float(eps[i])), C=C[i:i + 1])
        torch.testing.assert_close(whole.lower[i:i + 1], one.lower, **agreement(bounder))
        torch.testing.assert_close(whole.upper[i:i + 1], one.upper, **agreement(bounder))
        for (l, u), (l1, u1) in zip(whole.intermediate, one.intermediate):
            torch.testing.assert_close(l[i:i + 1], l1, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(u[i:i + 1], u1, rtol=1e-6, atol=1e-7)


def test_model_is_not_modified(bounder, net):
    model, shape, x = net
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = [(n, p, p.requires_grad) for n, p in model.named_parameters()]
    modules_before = list(model)
    training_before = [m.training for m in model.modules()]
    x_before = x.clone()
    bounder.bound(model, pl.LinfBall(x, 0.1), C=_C())
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), f"parameter {k} changed"
    assert [(n, p, p.requires_grad) for n, p in model.named_parameters()] == params_before
    assert all(a is b for a, b in zip(model, modules_before)) and len(model) == len(modules_before)
    assert [m.training for m in model.modules()] == training_before
    assert torch.equal(x, x_before)


def test_model_gradients_are_not_touched(bounder, net):
    """Bounding is not a training step: it must not write (or accumulate into) the parameters' ``.grad``."""
    model, shape, x = net
    bounder.bound(model, pl.LinfBall(x, 0.1), C=_C())
    touched = [n for n, p in model.named_parameters() if p.grad is not None]
    assert not touched, f"bound() wrote .grad of {touched}"


def test_works_under_no_grad(bounder, net):
    """Evaluation code runs under ``torch.no_grad()``: same bounds, plain tensors, no .grad written."""
    model, shape, x = net
    region = pl.LinfBall(x, 0.05)
    ref = bounder.bound(model, region, C=_C())
    with torch.no_grad():
        b = bounder.bound(model, region, C=_C())
    assert not b.lower.requires_grad and not b.upper.requires_grad
    torch.testing.assert_close(b.lower, ref.lower.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b.upper, ref.upper.detach(), rtol=1e-9, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())


def test_bounder_is_reusable(bounder, net):
    """``bound`` depends only on its arguments: calling again (after another call) gives the same result."""
    model, shape, x = net
    r1 = pl.LinfBall(x, 0.05)
    first = bounder.bound(model, r1, C=_C())
    bounder.bound(make_mlp([2, 5, 2], seed=9), pl.LinfBall(torch.zeros(2, 2, dtype=torch.float64), 0.3))
    again = bounder.bound(model, r1, C=_C())
    torch.testing.assert_close(first.lower, again.lower, rtol=0, atol=1e-9)
    torch.testing.assert_close(first.upper, again.upper, rtol=0, atol=1e-9)


def test_C_2d_and_3d_agree(bounder, net):
    model, shape, x = net
    C = _C()
    region = pl.LinfBall(x, 0.05)
    a = bounder.bound(model, region, C=C)
    b = bounder.bound(model, region, C=C.expand(B, *C.shape).clone())
    torch.testing.assert_close(a.lower, b.lower, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(a.upper, b.upper, rtol=1e-7, atol=1e-9)


def test_C_none_is_identity(bounder, net):
    model, shape, x = net
    region = pl.LinfBall(x, 0.05)
    a = bounder.bound(model, region)
    b = bounder.bound(model, region, C=torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(a.lower, b.lower, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(a.upper, b.upper, rtol=1e-7, atol=1e-9)


def test_per_example_C_rows_are_used(bounder, net):
    """A (B, m, n) C with a different matrix per example: row i of the result uses C[i]."""
    model, shape, x = net
    C = _C(batch=B, seed=5)
    region = pl.LinfBall(x, 0.05)
    whole = bounder.bound(model, region, C=C)
    for i in range(B):
        one = bounder.bound(model, region, C=C[i])
        torch.testing.assert_close(whole.lower[i], one.lower[i], **agreement(bounder))
        torch.testing.assert_close(whole.upper[i], one.upper[i], **agreement(bounder))


def test_negating_C_swaps_bounds(bounder, net):
    model, shape, x = net
    C = _C()
    region = pl.LinfBall(x, 0.05)
    a = bounder.bound(model, region, C=C)
    b = bounder.bound(model, region, C=-C)
    torch.testing.assert_close(a.lower, -b.upper, **agreement(bounder))
    torch.testing.assert_close(a.upper, -b.lower, **agreement(bounder))


def test_bounds_hold_for_sampled_points(bounder, net):
    model, shape, x = net
    C = _C()
    region = pl.LinfBall(x, 0.1)
    b = bounder.bound(model, region, C=C)
    assert_within(sampled_values(model, region, C, n=300), b.lower, b.upper)


def test_clip_box(bounder, net):
    model, shape, x = net
    C = _C()
    x = x.clone()
    x.reshape(B, -1)[:, 0] = 0.0  # some coordinates on the edge of the box
    x.reshape(B, -1)[:, 1] = 1.0
    region = pl.LinfBall(x, 0.1, clip=(0.0, 1.0))
    b = bounder.bound(model, region, C=C)
    assert b.lower.shape == (B, 5)
    assert (b.lower <= b.upper + 1e-7).all()
    assert_within(sampled_values(model, region, C, n=300), b.lower, b.upper)
    # the clip box that contains the whole ball changes nothing
    wide = bounder.bound(model, pl.LinfBall(x, 0.1, clip=(-5.0, 5.0)), C=C)
    plain = bounder.bound(model, pl.LinfBall(x, 0.1), C=C)
    torch.testing.assert_close(wide.lower, plain.lower, **agreement(bounder))
    torch.testing.assert_close(wide.upper, plain.upper, **agreement(bounder))


def test_clip_box_degenerate_is_exact(bounder, net):
    """x on the corner of a box of zero width: only x itself is admissible."""
    model, shape, x = net
    C = _C()
    x0 = torch.zeros_like(x)
    b = bounder.bound(model, pl.LinfBall(x0, 0.2, clip=(0.0, 0.0)), C=C)
    expected = apply_C(C, output_of(model, x0))
    torch.testing.assert_close(b.lower, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(b.upper, expected, rtol=0, atol=1e-5)


def test_box_equal_to_a_clipped_ball_gives_the_same_bounds(bounder, net):
    """Box(lo, hi) with the bounds of a clipped LinfBall is the same set: the same bounds."""
    model, shape, x = net
    C = _C()
    x = x.clone()
    x.reshape(B, -1)[:, 0] = 0.0
    ball = pl.LinfBall(x, 0.1, clip=(0.0, 1.0))
    box = pl.Box(*ball.box())
    a, b = bounder.bound(model, ball, C=C), bounder.bound(model, box, C=C)
    torch.testing.assert_close(b.lower, a.lower, **agreement(bounder))
    torch.testing.assert_close(b.upper, a.upper, **agreement(bounder))


def _skewed_box(x, seed=5):
    """A genuinely non-cubic box around x: per-coordinate half-widths in [0, 0.2], a few of them 0."""
    g = torch.Generator().manual_seed(seed)
    rad = 0.2 * torch.rand(x.shape, generator=g, dtype=x.dtype)
    rad.reshape(x.shape[0], -1)[:, ::3] = 0.0
    shift = 0.05 * torch.randn(x.shape, generator=g, dtype=x.dtype)
    return pl.Box(x + shift - rad, x + shift + rad)


def test_box_bounds_hold_for_sampled_points(bounder, net):
    model, shape, x = net
    C = _C()
    box = _skewed_box(x)
    b = bounder.bound(model, box, C=C)
    assert b.lower.shape == (B, 5) and (b.lower <= b.upper + 1e-7).all()
    assert_within(sampled_values(model, box, C, n=300), b.lower, b.upper)


def test_box_degenerate_is_exact(bounder, net):
    """lo = hi: the box is a point, the bounds are its values."""
    model, shape, x = net
    C = _C()
    b = bounder.bound(model, pl.Box(x, x), C=C)
    expected = apply_C(C, output_of(model, x))
    torch.testing.assert_close(b.lower, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(b.upper, expected, rtol=0, atol=1e-5)


def test_box_certify_is_sound(bounder, net):
    """certify over a Box: "certified" examples have no sampled point of another class."""
    model, shape, x = net
    box = _skewed_box(x, seed=6)
    y = output_of(model, box.x).argmax(1)
    cert = bounder.certify(model, box, y)
    n_out = output_of(model, x[:1]).shape[1]
    worst = sampled_values(model, box, pl.margin_matrix(y, n_out), n=200).amin(dim=(0, 2))
    for i, s in enumerate(cert.status):
        if s == "certified":
            assert worst[i] > 0
        if s == "counterexample":
            assert box.select([i]).contains(cert.counterexample[i:i + 1]).all()


def test_l2_ball(bounder, net):
    model, shape, x = net
    C = _C()
    region = pl.L2Ball(x, 0.2)
    if not bounder.supports(region):  # the base class refuses it, naming the backend and what it takes
        with pytest.raises(ValueError, match=f"{bounder.name}.*does not support L2Ball.*LinfBall"):
            bounder.bound(model, region, C=C)
        return
    b = bounder.bound(model, region, C=C)
    assert b.lower.shape == (B, 5)
    assert (b.lower <= b.upper + 1e-7).all()
    assert_within(sampled_values(model, region, C, n=300), b.lower, b.upper)
    zero = bounder.bound(model, pl.L2Ball(x, 0.0), C=C)
    expected = apply_C(C, output_of(model, x))
    torch.testing.assert_close(zero.lower, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(zero.upper, expected, rtol=0, atol=1e-5)


def test_float32_model_and_region(bounder, net):
    model, shape, x = net
    model32 = copy.deepcopy(model).float()
    x32 = x.float()
    C = _C().float()
    b = bounder.bound(model32, pl.LinfBall(x32, 0.05), C=C)
    assert b.lower.dtype == torch.float32 and b.upper.dtype == torch.float32
    b64 = bounder.bound(model, pl.LinfBall(x, 0.05), C=C.double())
    torch.testing.assert_close(b.lower.double(), b64.lower, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.upper.double(), b64.upper, rtol=1e-4, atol=1e-4)


def test_empty_batch(bounder):
    """A batch of zero examples (e.g. after filtering out what is already certified) gives (0, m) bounds
    and no verdicts."""
    model = make_mlp([4, 6, 3], seed=0)
    region = pl.LinfBall(torch.zeros(0, 4, dtype=torch.float64), 0.1)
    b = bounder.bound(model, region, C=_C())
    assert b.lower.shape == (0, 5) and b.upper.shape == (0, 5) and b.status == []
    assert [tuple(l.shape) for l, _ in b.intermediate] == [(0, 6)]
    cert = bounder.certify(model, region, torch.zeros(0, dtype=torch.long))
    assert cert.status == [] and cert.counterexample.shape == (0, 4)



# --------------------------------------------------------------------------------------------------
# the base class's checks, the same for every backend
# --------------------------------------------------------------------------------------------------


def test_unknown_option_is_a_value_error_naming_it(bounder):
    cls = type(bounder)
    with pytest.raises(ValueError, match=r"no option\(s\) \['colour'\]; valid options: \[.*'device'"):
        cls(colour="red")


def test_every_backend_takes_device(bounder):
    assert "device" in type(bounder).options()
    model, shape = _mlp()
    x = random_inputs(shape, batch=2, seed=1)
    on_cpu = copy.copy(bounder)  # the same variant, asked to compute on the CPU
    on_cpu.device = torch.device("cpu")
    a = bounder.bound(model, pl.LinfBall(x, 0.05), C=_C())
    b = on_cpu.bound(model, pl.LinfBall(x, 0.05), C=_C())
    torch.testing.assert_close(a.lower, b.lower, rtol=0, atol=1e-9)
    assert b.lower.device == x.device


def test_results_are_detached_even_from_parameters_that_need_grad(bounder):
    model, shape = _mlp()
    x = random_inputs(shape, batch=2, seed=1).requires_grad_(True)
    b = bounder.bound(model, pl.LinfBall(x, 0.05), C=_C())
    assert any(p.requires_grad for p in model.parameters())
    assert not b.lower.requires_grad and not b.upper.requires_grad
    assert not any(t.requires_grad for lu in b.intermediate for t in lu)


def test_statuses_are_in_the_vocabulary(bounder, net):
    model, shape, x = net
    b = bounder.bound(model, pl.LinfBall(x, 0.05), C=_C())
    assert all(s in pl.bounds.BOUND_STATUSES or s.startswith("error: ") for s in b.status), b.status


def test_a_backend_breaking_the_status_vocabulary_is_caught():
    class Sloppy(IntervalBounder):
        def _bound(self, network, region, C):
            out = super()._bound(network, region, C)
            out.status = ["user_limit"] * len(out.status)
            return out
    model, shape = _mlp()
    with pytest.raises(RuntimeError, match="user_limit"):
        Sloppy().bound(model, pl.LinfBall(random_inputs(shape, batch=2), 0.1))


def test_bad_region_type_is_refused_with_the_types_it_takes(bounder):
    model, shape = _mlp()
    with pytest.raises(ValueError, match="must be a Region"):
        bounder.bound(model, random_inputs(shape, batch=2))


def test_certify_verdicts_are_sound(bounder, net):
    """A "certified" example has no sampled point of another class; a counterexample lies in the region and
    is misclassified; y=None certifies the prediction at the centre."""
    model, shape, x = net
    n_out = output_of(model, x[:1]).shape[1]
    for eps in (0.001, 0.3):
        region = pl.LinfBall(x, eps)
        y = output_of(model, x).argmax(1)
        cert = bounder.certify(model, region, y)
        assert torch.equal(cert.y, y)
        assert len(cert.status) == B and len(cert.seconds) == B
        assert all(s in pl.bounds.VERDICTS or s.startswith("error: ") for s in cert.status), cert.status
        samples = sampled_values(model, region, pl.margin_matrix(y, n_out), n=200)  # (N, B, n_out - 1)
        worst = samples.amin(dim=(0, 2))
        for i, s in enumerate(cert.status):
            if s == "certified":
                assert worst[i] > 0 and cert.margin[i] > 0
                assert cert.margin[i] <= worst[i] + 1e-6
            if s == "counterexample":
                point = cert.counterexample[i:i + 1]
                assert region.select([i]).contains(point).all()
                f = output_of(model, point)[0]
                assert f[y[i]] <= f.max() and (f.argmax() != y[i] or cert.counterexample_margin[i] <= 0)
            else:
                assert torch.isnan(cert.counterexample[i]).all()
        assert cert.certified.sum() + cert.refuted.sum() <= B
    unlabeled = bounder.certify(model, pl.LinfBall(x, 0.001))
    assert torch.equal(unlabeled.y, output_of(model, x).argmax(1))


def test_certify_flags_a_misclassified_centre(bounder):
    model, shape = _mlp()
    x = random_inputs(shape, batch=2, seed=1)
    wrong = (output_of(model, x).argmax(1) + 1) % 3
    cert = bounder.certify(model, pl.LinfBall(x, 0.0), wrong)
    assert cert.status == ["counterexample"] * 2
    assert (cert.counterexample_margin <= 0).all()


def test_solvers_are_silent(bounder, capfd):
    model, shape = _mlp()
    x = random_inputs(shape, batch=1, seed=1)
    bounder.bound(model, pl.LinfBall(x, 0.05), C=_C())
    bounder.certify(model, pl.LinfBall(x, 0.05))
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)

"""regions.py and input validation: bad inputs raise ValueError naming the problem; eps forms; support."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import polytope_lab as pl

from conftest import make_convnet, make_mlp, random_inputs


DT = torch.float64


@pytest.fixture
def mlp():
    return make_mlp([4, 6, 3], seed=0)


@pytest.fixture
def x():
    return random_inputs((4,), batch=3, seed=1)


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("Ball", [pl.LinfBall, pl.L2Ball])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_x_raises(Ball, bad, x):
    x = x.clone()
    x[1, 2] = bad
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        Ball(x, 0.1)


@pytest.mark.parametrize("Ball", [pl.LinfBall, pl.L2Ball])
@pytest.mark.parametrize("eps", [-0.1, torch.tensor([0.1, -0.2, 0.1], dtype=DT), torch.tensor(-1e-9)])
def test_negative_eps_raises(Ball, eps, x):
    with pytest.raises(ValueError, match=">= 0"):
        Ball(x, eps)


@pytest.mark.parametrize("Ball", [pl.LinfBall, pl.L2Ball])
@pytest.mark.parametrize("eps", [float("nan"), float("inf"), torch.tensor([0.1, float("nan"), 0.1]),
                                 np.float64("nan")])
def test_non_finite_eps_raises(Ball, eps, x):
    with pytest.raises(ValueError, match="eps contains NaN or inf"):
        Ball(x, eps)


@pytest.mark.parametrize("Ball", [pl.LinfBall, pl.L2Ball])
@pytest.mark.parametrize("eps", [torch.full((4,), 0.1), torch.full((2,), 0.1), torch.full((3, 1), 0.1),
                                 np.full((2,), 0.1)])
def test_eps_wrong_shape_raises(Ball, eps, x):
    with pytest.raises(ValueError, match=r"eps has shape .*expected"):
        Ball(x, eps)


@pytest.mark.parametrize("eps", ["0.1", None, [0.1, 0.1, 0.1]])
def test_eps_wrong_type_raises(eps, x):
    with pytest.raises(ValueError, match="eps must be"):
        pl.LinfBall(x, eps)


def test_unbatched_x_raises():
    with pytest.raises(ValueError, match="batched"):
        pl.LinfBall(torch.zeros(4), 0.1)


def test_x_outside_clip_raises(x):
    with pytest.raises(ValueError, match="outside the clip box"):
        pl.LinfBall(x + 2.0, 0.1, clip=(0.0, 1.0))


@pytest.mark.parametrize("clip", [(1.0, 0.0), (0.0, float("inf")), (float("nan"), 1.0)])
def test_bad_clip_raises(clip, x):
    with pytest.raises(ValueError, match="clip"):
        pl.LinfBall(x, 0.1, clip=clip)


def test_region_network_shape_mismatch_raises(mlp):
    region = pl.LinfBall(torch.zeros(2, 5, dtype=DT), 0.1)
    for name in pl.Bounder.available():
        with pytest.raises(ValueError, match=r"expects 4 inputs|shape"):
            pl.Bounder.create(name).bound(mlp, region)


def test_region_network_shape_mismatch_with_network_object():
    conv = make_convnet((1, 6, 6))
    net = pl.from_torch(conv, (1, 6, 6))
    flat = pl.LinfBall(torch.zeros(2, 36, dtype=DT), 0.1)      # same size, wrong shape
    wrong = pl.LinfBall(torch.zeros(2, 1, 5, 5, dtype=DT), 0.1)
    for name in pl.Bounder.available():
        with pytest.raises(ValueError, match="shape"):
            pl.Bounder.create(name).bound(net, flat)
        with pytest.raises(ValueError, match="shape"):
            pl.Bounder.create(name).bound(net, wrong)
        with pytest.raises(ValueError):
            pl.Bounder.create(name).bound(conv, flat)


@pytest.mark.parametrize("C", [torch.zeros(2, 4), torch.zeros(3), torch.zeros(2, 2, 3), torch.zeros(3, 2, 3, 1),
                               torch.zeros(4, 2, 3)])
def test_C_wrong_shape_raises(C, mlp, x):
    for name in pl.Bounder.available():
        with pytest.raises(ValueError, match=r"C has shape"):
            pl.Bounder.create(name).bound(mlp, pl.LinfBall(x, 0.1), C=C)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_C_non_finite_raises(bad, mlp, x):
    C = torch.eye(3, dtype=DT)
    C[0, 1] = bad
    for name in pl.Bounder.available():
        with pytest.raises(ValueError, match="C contains NaN or inf"):
            pl.Bounder.create(name).bound(mlp, pl.LinfBall(x, 0.1), C=C)


def test_region_must_be_a_region(mlp, x):
    with pytest.raises(ValueError, match="region"):
        pl.Bounder.create("dual").bound(mlp, x)


def test_unknown_bounder_raises():
    with pytest.raises(ValueError, match=r"unknown bounder 'simplex'.*available"):
        pl.Bounder.create("simplex")


def test_available_lists_the_core_backends():
    assert {"interval", "dual"} <= set(pl.Bounder.available())
    assert pl.Bounder.available() == sorted(pl.Bounder.available())


@pytest.mark.parametrize("alpha", ["adaptive", None, 0.5, "Fixed"])
def test_bad_alpha_option_raises(alpha):
    with pytest.raises(ValueError, match="alpha must be 'fixed' or 'optimized'"):
        pl.Bounder.create("dual", alpha=alpha)


def test_bad_strategy_option_raises(mlp, x):
    with pytest.raises(ValueError, match="strategy"):
        pl.Bounder.create("dual", strategy="sideways").bound(mlp, pl.LinfBall(x, 0.1))


def test_unknown_option_raises():
    with pytest.raises(ValueError, match=r"no option\(s\) \['alpah'\]; valid options: \['alpha', 'device'"):
        pl.Bounder.create("dual", alpah="optimized")
    with pytest.raises(ValueError, match=r"'interval'.*\['steps'\].*valid options: \['device'\]"):
        pl.Bounder.create("interval", steps=3)


def test_margin_matrix():
    y = torch.tensor([0, 2, 1])
    C = pl.margin_matrix(y, 3)
    assert C.shape == (3, 2, 3)
    expected = torch.tensor([[[1., -1, 0], [1, 0, -1]],
                             [[-1, 0, 1], [0, -1, 1]],
                             [[-1, 1, 0], [0, 1, -1]]])
    torch.testing.assert_close(C, expected)
    with pytest.raises(ValueError, match="labels"):
        pl.margin_matrix(torch.tensor([3]), 3)
    with pytest.raises(ValueError, match="labels"):
        pl.margin_matrix(torch.tensor([-1]), 3)


# --------------------------------------------------------------------------------------------------
# eps forms and per-example eps
# --------------------------------------------------------------------------------------------------

EPS_FORMS = {
    "float": 0.1,
    "numpy float64": np.float64(0.1),
    "0-d tensor": torch.tensor(0.1),
    "0-d float64 tensor": torch.tensor(0.1, dtype=DT),
    "numpy float32": np.float32(0.1),
    "numpy 0-d array": np.array(0.1),
    "(B,) tensor": torch.full((3,), 0.1),
    "(B,) numpy": np.full((3,), 0.1),
}


@pytest.mark.parametrize("form", list(EPS_FORMS))
@pytest.mark.parametrize("Ball", [pl.LinfBall, pl.L2Ball])
def test_eps_forms_agree(form, Ball, mlp, x):
    ref_region = Ball(x, 0.1)
    region = Ball(x, EPS_FORMS[form])
    assert region.eps.shape == (3,) and region.eps.dtype == x.dtype
    torch.testing.assert_close(region.eps, ref_region.eps, rtol=1e-6, atol=0)  # np.float32 rounds
    for name in ("interval", "dual"):  # every backend reads only region.eps, checked above
        ref = pl.Bounder.create(name).bound(mlp, ref_region)
        b = pl.Bounder.create(name).bound(mlp, region)
        torch.testing.assert_close(b.lower, ref.lower, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.upper, ref.upper, rtol=1e-5, atol=1e-6)


def test_integer_eps_and_integer_x():
    r = pl.LinfBall(torch.tensor([[0, 1]]), 1)
    assert r.x.is_floating_point() and r.eps.is_floating_point()
    lo, hi = r.box()
    torch.testing.assert_close(lo, torch.tensor([[-1.0, 0.0]]))
    torch.testing.assert_close(hi, torch.tensor([[1.0, 2.0]]))


@pytest.mark.parametrize("Ball", [pl.LinfBall, pl.L2Ball])
def test_per_example_eps(Ball, mlp, x):
    eps = torch.tensor([0.0, 0.05, 0.2], dtype=DT)
    for name in pl.Bounder.available():
        if not pl.Bounder.registry[name].supports(Ball(x, eps)):
            continue
        whole = pl.Bounder.create(name).bound(mlp, Ball(x, eps))
        for i in range(3):
            one = pl.Bounder.create(name).bound(mlp, Ball(x[i:i + 1], float(eps[i])))
            torch.testing.assert_close(whole.lower[i:i + 1], one.lower, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(whole.upper[i:i + 1], one.upper, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(whole.lower[0], whole.upper[0], rtol=0, atol=1e-6)  # eps = 0: a point


@pytest.mark.parametrize("Ball", [pl.LinfBall, pl.L2Ball])
def test_region_is_not_changed_by_later_in_place_updates_of_x(Ball, mlp, x):
    """A region is a value: updating the caller's tensor in place afterwards (an attack loop, a reused
    buffer) must not move its centre away from its box, nor change its bounds."""
    r = Ball(x, 0.1)
    x0, lo0 = r.x.clone(), r.box()[0].clone()
    ref = pl.Bounder.create("dual").bound(mlp, r)
    x.add_(1.0)
    assert torch.equal(r.box()[0], lo0)
    assert torch.equal(r.x, x0), "the region aliases the caller's x"
    b = pl.Bounder.create("dual").bound(mlp, r)
    torch.testing.assert_close(b.lower, ref.lower)


# --------------------------------------------------------------------------------------------------
# support, box, contains, project
# --------------------------------------------------------------------------------------------------

def _vertices(lo, hi):
    """All vertices of the box [lo, hi] (1-d tensors of length d): (2^d, d)."""
    d = lo.numel()
    bits = torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)), dtype=lo.dtype)
    return lo + (hi - lo) * bits


@pytest.mark.parametrize("clip", [None, (0.0, 1.0), (0.2, 0.7)])
def test_linf_support_is_the_max_over_vertices(clip):
    g = torch.Generator().manual_seed(0)
    x = 0.3 + 0.3 * torch.rand(2, 2, 3, generator=g, dtype=DT)   # x in [0.3, 0.6]: inside every clip box
    eps = torch.tensor([0.25, 0.05], dtype=DT)
    r = pl.LinfBall(x, eps, clip=clip)
    v = torch.randn(2, 4, 2, 3, generator=g, dtype=DT)
    s = r.support(v)
    assert s.shape == (2, 4)
    for b in range(2):
        lo = (x[b] - eps[b]).reshape(-1)
        hi = (x[b] + eps[b]).reshape(-1)
        if clip is not None:
            lo, hi = lo.clamp(min=clip[0]), hi.clamp(max=clip[1])
        verts = _vertices(lo, hi)                                   # (64, 6)
        brute = (v[b].reshape(4, -1) @ verts.t()).max(1).values
        torch.testing.assert_close(s[b], brute, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r.deviation(v)[b], brute - (v[b].reshape(4, -1) * r.center[b].reshape(1, -1)).sum(1))
    if clip is None:
        closed = (v * x.unsqueeze(1)).reshape(2, 4, -1).sum(-1) + eps[:, None] * v.reshape(2, 4, -1).abs().sum(-1)
        torch.testing.assert_close(s, closed)


def test_linf_support_broadcasts_over_batch():
    x = torch.rand(3, 4, dtype=DT)
    r = pl.LinfBall(x, 0.1)
    v = torch.randn(1, 2, 4, dtype=DT)
    torch.testing.assert_close(r.support(v), r.support(v.expand(3, 2, 4)))
    r2 = pl.L2Ball(x, 0.1)
    torch.testing.assert_close(r2.support(v), r2.support(v.expand(3, 2, 4)))


def test_l2_support_closed_form_and_attained():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, generator=g, dtype=DT)
    eps = torch.tensor([0.3, 1.5], dtype=DT)
    r = pl.L2Ball(x, eps)
    v = torch.randn(2, 3, 5, generator=g, dtype=DT)
    s = r.support(v)
    closed = (v * x.unsqueeze(1)).sum(-1) + eps[:, None] * v.norm(dim=-1)
    torch.testing.assert_close(s, closed)
    # attained at x + eps v/‖v‖, and no random point of the ball exceeds it
    best = x.unsqueeze(1) + eps[:, None, None] * v / v.norm(dim=-1, keepdim=True)
    torch.testing.assert_close((v * best).sum(-1), s)
    d = torch.randn(1000, 2, 5, generator=g, dtype=DT)
    d = d / d.norm(dim=-1, keepdim=True) * torch.rand(1000, 2, 1, generator=g, dtype=DT) * eps[None, :, None]
    pts = x + d
    vals = torch.einsum("bmn,Nbn->Nbm", v, pts)
    assert (vals <= s + 1e-12).all()


@pytest.mark.parametrize("clip", [None, (0.0, 1.0)])
def test_linf_box_contains_project(clip):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 1, 2, 2, generator=g, dtype=DT)
    r = pl.LinfBall(x, 0.2, clip=clip)
    lo, hi = r.box()
    assert lo.shape == x.shape and hi.shape == x.shape
    if clip is None:
        torch.testing.assert_close(lo, x - 0.2)
        torch.testing.assert_close(hi, x + 0.2)
    else:
        assert (lo >= 0).all() and (hi <= 1).all()
        torch.testing.assert_close(lo, (x - 0.2).clamp(min=0))
    assert r.contains(x).all()
    far = x + 1.0
    assert not r.contains(far).any()
    p = r.project(far)
    assert r.contains(p).all()
    torch.testing.assert_close(p, hi)
    inside = lo + (hi - lo) * torch.rand(x.shape, generator=g, dtype=DT)
    torch.testing.assert_close(r.project(inside), inside)
    assert r.input_shape == (1, 2, 2) and r.batch_size == 3


def test_l2_box_contains_project():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 4, generator=g, dtype=DT)
    eps = torch.tensor([0.1, 0.5, 0.0], dtype=DT)
    r = pl.L2Ball(x, eps)
    lo, hi = r.box()
    torch.testing.assert_close(hi - lo, 2 * eps[:, None].expand(3, 4))
    pts = x + torch.randn(3, 4, generator=g, dtype=DT)
    p = r.project(pts)
    assert r.contains(p).all()
    torch.testing.assert_close((p - x).norm(dim=1), torch.minimum((pts - x).norm(dim=1), eps))
    # projection is along the ray towards x
    d, dp = pts - x, p - x
    cos = (d * dp).sum(1) / (d.norm(dim=1) * dp.norm(dim=1)).clamp(min=1e-30)
    assert torch.allclose(cos[:2], torch.ones(2, dtype=DT))
    inside = x + 0.5 * eps[:, None] * torch.tensor([1.0, 0, 0, 0], dtype=DT)
    torch.testing.assert_close(r.project(inside), inside)


@pytest.mark.parametrize("Ball", [pl.LinfBall, pl.L2Ball])
def test_select_and_to(Ball):
    x = torch.rand(4, 3, dtype=DT)
    eps = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=DT)
    r = Ball(x, eps)
    s = r.select(torch.tensor([2, 0, 2]))
    assert type(s) is Ball
    torch.testing.assert_close(s.x, x[[2, 0, 2]])
    torch.testing.assert_close(s.eps, eps[[2, 0, 2]])
    s2 = r.select(slice(1, 3))
    torch.testing.assert_close(s2.eps, eps[1:3])
    r32 = r.to(dtype=torch.float32)
    assert r32.x.dtype == torch.float32 and r32.eps.dtype == torch.float32


def test_select_keeps_clip():
    r = pl.LinfBall(torch.rand(3, 2, dtype=DT), 0.5, clip=(0.0, 1.0))
    s = r.select(slice(0, 2))
    assert s.clip == (0.0, 1.0)
    torch.testing.assert_close(s.box()[0], r.box()[0][:2])
    assert r.to(dtype=torch.float32).clip == (0.0, 1.0)


@pytest.mark.parametrize("model_dtype, x_dtype", [(torch.float32, DT), (DT, torch.float32)],
                         ids=["model32-x64", "model64-x32"])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_dtype_mismatch_is_handled(model_dtype, x_dtype, kind):
    """A region whose dtype differs from the model's either works (as if cast to the model's dtype) or
    raises a ValueError naming the dtypes, not an internal RuntimeError from a matmul/conv."""
    model, shape = (make_mlp([4, 6, 3]), (4,)) if kind == "mlp" else (make_convnet((1, 6, 6)), (1, 6, 6))
    model = model.to(model_dtype)
    x = torch.rand(2, *shape, dtype=x_dtype)
    for name in ("interval", "dual"):  # the base class casts the region for every backend
        try:
            b = pl.Bounder.create(name).bound(model, pl.LinfBall(x, 0.1))
        except ValueError as e:
            assert "dtype" in str(e) or "float" in str(e), str(e)
            continue
        ref = pl.Bounder.create(name).bound(model, pl.LinfBall(x.to(model_dtype), 0.1))
        torch.testing.assert_close(b.lower.to(model_dtype), ref.lower, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Box
# --------------------------------------------------------------------------------------------------

def test_box_validation():
    lo = torch.zeros(2, 3, dtype=DT)
    with pytest.raises(ValueError, match=r"empty box: lo > hi at index \(1, 2\)"):
        hi = torch.ones(2, 3, dtype=DT)
        hi[1, 2] = -0.5
        pl.Box(lo, hi)
    with pytest.raises(ValueError, match="NaN or inf"):
        pl.Box(lo, torch.full((2, 3), float("inf"), dtype=DT))
    with pytest.raises(ValueError, match="batched"):
        pl.Box(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="do not broadcast"):
        pl.Box(torch.zeros(2, 3), torch.ones(2, 4))


def test_box_broadcasts_and_is_not_changed_by_the_caller():
    lo = torch.zeros(1, 3, dtype=DT)
    hi = torch.tensor([[1.0, 2.0, 0.0]], dtype=DT).expand(4, 3)
    r = pl.Box(lo, np.asarray(hi))
    assert r.batch_size == 4 and r.input_shape == (3,)
    torch.testing.assert_close(r.x, hi / 2)
    torch.testing.assert_close(r.radius, hi / 2)
    torch.testing.assert_close(r.eps, torch.ones(4, dtype=DT))
    lo += 5.0
    assert (r.box()[0] == 0).all()


def test_box_support_is_the_max_over_vertices():
    g = torch.Generator().manual_seed(4)
    lo = torch.rand(2, 2, 3, generator=g, dtype=DT)
    hi = lo + torch.rand(2, 2, 3, generator=g, dtype=DT) * torch.tensor([0.0, 1.0, 0.3], dtype=DT)
    r = pl.Box(lo, hi)
    v = torch.randn(2, 4, 2, 3, generator=g, dtype=DT)
    for b in range(2):
        verts = _vertices(lo[b].reshape(-1), hi[b].reshape(-1))
        brute = (v[b].reshape(4, -1) @ verts.t()).max(1).values
        torch.testing.assert_close(r.support(v)[b], brute, rtol=1e-12, atol=1e-12)
        centre = (v[b].reshape(4, -1) * r.center[b].reshape(1, -1)).sum(1)
        torch.testing.assert_close(r.deviation(v)[b], brute - centre)


@pytest.mark.parametrize("clip", [None, (0.0, 1.0)])
def test_linf_ball_is_a_box_with_its_own_centre(clip):
    x = torch.rand(3, 4, dtype=DT)
    ball = pl.LinfBall(x, 0.3, clip=clip)
    box = pl.Box(*ball.box())
    assert isinstance(ball, pl.Box) and ball.cubic == (clip is None) and not box.cubic
    assert torch.equal(ball.x, x) and torch.equal(ball.eps, torch.full((3,), 0.3, dtype=DT))
    torch.testing.assert_close(box.center, ball.center)
    torch.testing.assert_close(box.radius, ball.radius)
    v = torch.randn(3, 2, 4, dtype=DT)
    torch.testing.assert_close(box.support(v), ball.support(v))
    pts = x + torch.randn(3, 4, dtype=DT)
    torch.testing.assert_close(box.project(pts), ball.project(pts))
    assert torch.equal(box.contains(pts), ball.contains(pts))


def test_box_select_contains_project_and_outward_cast():
    lo = torch.tensor([[0.1, -1.0], [0.2, 0.0], [0.3, 0.5]], dtype=DT)
    hi = lo + torch.tensor([[0.2, 0.0]], dtype=DT)
    r = pl.Box(lo, hi)
    s = r.select(torch.tensor([2, 0, 2]))
    assert type(s) is pl.Box
    torch.testing.assert_close(s.box()[0], lo[[2, 0, 2]])
    far = hi + 1.0
    assert not r.contains(far).any() and r.contains(r.project(far)).all()
    torch.testing.assert_close(r.project(far), hi)
    r32 = r.to(dtype=torch.float32)
    assert r32.x.dtype == torch.float32
    lo32, hi32 = r32.box()
    assert (lo32.double() <= lo).all() and (hi32.double() >= hi).all()   # 0.1 etc. round outward
    assert (lo32.double() < lo).any() and (hi32.double() > hi).any()


def test_box_runs_through_the_bounders(mlp):
    """interval and dual give the same bounds on a Box as on the LinfBall it equals (clip=None)."""
    x = random_inputs((4,), batch=3, seed=1)
    ball = pl.LinfBall(x, 0.1)
    box = pl.Box(x - 0.1, x + 0.1)
    for name in ("interval", "dual"):
        a, b = (pl.Bounder.create(name).bound(mlp, r) for r in (ball, box))
        torch.testing.assert_close(a.lower, b.lower)
        torch.testing.assert_close(a.upper, b.upper)


@pytest.mark.parametrize("clip", [None, (0.0, 1.0)])
def test_narrowing_cast_of_a_ball_contains_the_original(clip):
    """A float64 ball given to a float32 network is cast: the cast ball must contain the original one
    (eps grows by how far x moved, rounded up), never a slightly smaller set."""
    x = torch.rand(4, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ball = pl.LinfBall(x, 0.0123456789, clip=clip)
    cast = ball.to(dtype=torch.float32)
    lo, hi = ball.box()
    c_lo = torch.maximum(cast.x.double() - cast.eps.double()[:, None], torch.tensor(clip[0] if clip else -1e9))
    c_hi = torch.minimum(cast.x.double() + cast.eps.double()[:, None], torch.tensor(clip[1] if clip else 1e9))
    assert (c_lo <= lo).all() and (c_hi >= hi).all()
    l2 = pl.L2Ball(x, 0.3).to(dtype=torch.float32)
    assert (l2.eps.double() >= 0.3 + (l2.x.double() - x).norm(dim=1)).all()
    same = ball.to(dtype=torch.float64)
    assert torch.equal(same.eps, ball.eps) and torch.equal(same.x, ball.x)


def test_a_centre_rounded_just_outside_the_clip_box_gives_a_nonempty_box():
    ball = pl.LinfBall(torch.tensor([[-5e-13, 0.5]], dtype=torch.float64), 0.0, clip=(0.0, 1.0))
    lo, hi = ball.box()
    assert (lo <= hi).all() and (ball.radius >= 0).all()

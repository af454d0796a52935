"""The extension API (docs/extending.md): the document's code runs as written, and the two worked
examples — an average-pool affine layer and LeakyReLU — are exact in the normal form and bounded soundly
(and, for LeakyReLU, as tightly as its convex hull allows) by every backend."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import polytope_lab as pl
from polytope_lab import convert

from conftest import assert_within, output_of, pgd_extremes, random_inputs, sampled_values

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


@pytest.fixture(scope="module")
def doc():
    """The namespace after running every ```python block of the document, in order (this registers
    AvgPool2d and LeakyReLU); both are unregistered afterwards."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 4, "docs/extending.md lost its examples"
    namespace = {}
    try:
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)
        yield namespace
    finally:
        convert.unregister_layer(nn.AvgPool2d)
        convert.unregister_layer(nn.LeakyReLU)


def _pool_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 4), nn.ReLU(), nn.Linear(4, 2)).double().eval(), (1, 7, 7)


def _leaky_net(seed=0, slope=0.1, width=6):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, width), nn.LeakyReLU(slope), nn.Linear(width, width), nn.LeakyReLU(slope),
                         nn.Linear(width, 2)).double().eval(), (2,)


def test_avg_pool_transpose_is_the_adjoint(doc):
    op = doc["AvgPoolOp"]((3, 7, 7), 2, torch.zeros((), dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 7, 7, generator=g, dtype=torch.float64)
    y = torch.randn(4, *op.out_shape, generator=g, dtype=torch.float64)
    assert torch.allclose((op.linear(x) * y).sum((1, 2, 3)), (x * op.transpose(y)).sum((1, 2, 3)))
    W = torch.as_tensor(op.as_matrix().toarray())                               # the default, from linear
    assert torch.allclose(x.reshape(4, -1) @ W.t(), op.linear(x).reshape(4, -1))


@pytest.mark.parametrize("make", [_pool_net, _leaky_net], ids=["avg-pool", "leaky-relu"])
def test_normal_form_is_exact(doc, make):
    model, shape = make()
    x = random_inputs(shape, batch=5, seed=2, low=-1.0)
    assert torch.allclose(pl.from_torch(model, shape)(x), output_of(model, x), atol=1e-12)


@pytest.mark.parametrize("make", [_pool_net, _leaky_net], ids=["avg-pool", "leaky-relu"])
@pytest.mark.parametrize("name, options", [("interval", {}), ("dual", {}), ("dual", {"alpha": "optimized"}),
                                           ("lp", {}), ("milp", {"threads": 1})])
def test_every_backend_is_sound(doc, make, name, options):
    model, shape = make()
    region = pl.LinfBall(random_inputs(shape, batch=2, seed=3), 0.1)
    lo, hi = pgd_extremes(model, region)
    values = torch.cat([sampled_values(model, region, None, n=300), lo[None], hi[None]])
    b = pl.Bounder.create(name, **options).bound(model, region)
    assert_within(values, b.lower, b.upper, tol=1e-6, what=f"{name} {options}")


def test_leaky_relu_unit_is_exact(doc):
    """One LeakyReLU unit of a 1-D input: its range [a·l, u] (monotone, l < 0 < u) is the relaxation's,
    reached by the dual with optimised α (α = 0 picks the facet z ≥ 0); the fixed α = u/(u − l) stays
    below a·l (sound, looser) and reaches u."""
    lin = nn.Linear(1, 1).double()
    with torch.no_grad():
        lin.weight.fill_(2.0)
        lin.bias.fill_(-0.5)
    a = 0.2
    model = nn.Sequential(lin, nn.LeakyReLU(a)).eval()
    x = torch.tensor([[0.3]], dtype=torch.float64)
    region = pl.LinfBall(x, 0.25)
    l, u = 2.0 * 0.05 - 0.5, 2.0 * 0.55 - 0.5                                   # ẑ over x' ∈ [0.05, 0.55]
    fixed = pl.Bounder.create("dual").bound(model, region)
    assert fixed.lower.item() < a * l and fixed.upper.item() == pytest.approx(u, abs=1e-12)
    for b in (pl.Bounder.create("dual", alpha="optimized", steps=50).bound(model, region),
              pl.Bounder.create("lp").bound(model, region)):
        assert b.lower.item() == pytest.approx(a * l, abs=1e-7) and b.upper.item() == pytest.approx(u, abs=1e-7)


def test_leaky_relu_lp_is_the_optimised_dual_and_milp_is_exact(doc):
    """The LP of the relaxation and the dual with optimised α agree (strong duality); the MILP matches a
    dense grid of the 2-D input box within the grid's resolution."""
    model, shape = _leaky_net(seed=4)
    x = random_inputs(shape, batch=1, seed=5)
    eps = 0.15
    region = pl.LinfBall(x, eps)
    lp = pl.Bounder.create("lp").bound(model, region)
    opt = pl.Bounder.create("dual", alpha="optimized", steps=200, lr=0.05).bound(model, region)
    assert (opt.lower <= lp.lower + 1e-6).all() and (lp.lower - opt.lower).max() < 1e-2
    milp = pl.Bounder.create("milp", threads=1).bound(model, region)
    t = torch.linspace(-eps, eps, 301, dtype=torch.float64)
    grid = x[0] + torch.cartesian_prod(t, t)                                       # (301², 2)
    f = output_of(model, grid)
    assert (milp.lower[0] <= f.min(0).values + 1e-7).all() and (milp.upper[0] >= f.max(0).values - 1e-7).all()
    spacing = 2 * eps / 300
    lipschitz = output_of(model, grid).diff(dim=0).abs().max() / spacing      # along the grid's fast axis
    slack = 2 * lipschitz * spacing
    assert (f.min(0).values - milp.lower[0] <= slack).all() and (milp.upper[0] - f.max(0).values <= slack).all()
    assert (lp.lower <= milp.lower + 1e-6).all() and (lp.upper >= milp.upper - 1e-6).all()


def test_registration_errors(doc):
    with pytest.raises(ValueError, match="nn.Module subclass"):
        pl.register_layer(int, lambda *a: None)
    with pytest.raises(ValueError, match="callable"):
        pl.register_layer(nn.Tanh, 3)
    assert "LeakyReLU (registered)" in convert.supported_layers()
    pl.register_layer(nn.Tanh, lambda layer, expr, builder: None)
    try:
        with pytest.raises(ValueError, match="returned NoneType, not an Expression"):
            pl.from_torch(nn.Sequential(nn.Linear(2, 2), nn.Tanh()), (2,))
    finally:
        convert.unregister_layer(nn.Tanh)


def test_unregistered_layer_error_points_to_the_api():
    with pytest.raises(ValueError, match="register_layer"):
        pl.from_torch(nn.Sequential(nn.Linear(2, 2), nn.Hardswish()), (2,))

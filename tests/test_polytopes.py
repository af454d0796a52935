"""polytope_lab.polytopes: 2-D outer polygons from support values, the image of a box, and its area."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import polytope_lab as pl
from polytope_lab import models, polytopes as P


def square_bounds(k, half=1.0):
    """Support values of the square [−half, half]²: lower bounds of cᵀz and upper bounds, per row of C."""
    C = P.unit_directions(k)
    h = half * C.abs().sum(1)
    return C, -h, h


def test_unit_directions_cover_half_circle_with_axes():
    C = P.unit_directions(8)
    assert C.shape == (8, 2) and C.dtype == torch.float64
    assert torch.allclose(C.norm(dim=1), torch.ones(8, dtype=torch.float64))
    assert torch.allclose(C[0], torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(C[4], torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-15)
    angles = torch.atan2(C[:, 1], C[:, 0])
    assert torch.allclose(angles.diff(), torch.full((7,), math.pi / 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 2"):
        P.unit_directions(1)


def test_scaled_directions_follow_an_elongated_set():
    """An ellipse 100× wider than tall: directions spread in its own scale give a much tighter polygon."""
    a, b = 100.0, 1.0

    def polygon_area(C):                                       # support of the ellipse: √((a c₁)² + (b c₂)²)
        h = torch.sqrt((a * C[:, 0]) ** 2 + (b * C[:, 1]) ** 2)
        return P.polygon_area(P.outer_polygon(C, -h, h))

    plain, scaled = P.unit_directions(16), P.unit_directions(16, scale=(a, b))
    assert torch.allclose(scaled.norm(dim=1), torch.ones(16, dtype=torch.float64))
    assert torch.allclose(scaled[[0, 8]], plain[[0, 8]], atol=1e-15)      # the axes stay
    assert torch.allclose(P.unit_directions(16, scale=(3.0, 3.0)), plain)
    assert polygon_area(scaled) == pytest.approx(math.pi * a * b, rel=0.03)
    assert polygon_area(plain) > 1.2 * polygon_area(scaled)
    with pytest.raises(ValueError, match="positive"):
        P.unit_directions(4, scale=(1.0, 0.0))


def test_outer_polygon_of_square_support_is_the_square():
    C, lo, hi = square_bounds(8, half=0.5)
    v = P.outer_polygon(C, lo, hi)
    assert P.polygon_area(v) == pytest.approx(1.0, rel=1e-9)
    assert np.allclose(np.sort(np.abs(v).max(axis=1)), 0.5)
    x, y = v[:, 0], v[:, 1]                             # counter-clockwise: positive signed area
    assert 0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) > 0


def test_outer_polygon_of_disc_converges_from_outside():
    """Half-planes tangent to the unit disc: the polygon contains the disc and its area falls to π."""
    areas = []
    for k in (4, 16, 64):
        C = P.unit_directions(k)
        v = P.outer_polygon(C, -torch.ones(k, dtype=torch.float64), torch.ones(k, dtype=torch.float64))
        areas.append(P.polygon_area(v))
    assert areas[0] > areas[1] > areas[2] > math.pi
    assert areas[0] == pytest.approx(2 * 4 * math.tan(math.pi / 8), rel=1e-9)   # regular octagon
    assert areas[2] == pytest.approx(math.pi, rel=2e-3)


def test_outer_polygon_lower_bounds_only_and_errors():
    C = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    v = P.outer_polygon(C, torch.tensor([0.0, 0.0, -1.0]))  # the triangle x, y ≥ 0, x + y ≤ 1
    assert P.polygon_area(v) == pytest.approx(0.5, rel=1e-9)
    with pytest.raises(ValueError, match="bound"):
        P.outer_polygon(C[:2], torch.zeros(2))                  # a quadrant: unbounded
    with pytest.raises(ValueError, match="empty"):
        P.outer_polygon(C, torch.tensor([1.0, 1.0, -1.0]))      # x, y ≥ 1 and x + y ≤ 1: a point at most
    with pytest.raises(ValueError, match=r"\(m, 2\)"):
        P.outer_polygon(torch.ones(3, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        P.outer_polygon(C, torch.tensor([0.0, float("nan"), -1.0]))


def test_inside_reads_the_half_planes():
    C = P.unit_directions(4)                                       # the octagon tangent to the unit disc
    lo, hi = -torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    pts = np.array([[0.0, 0.0], [0.99, -0.3], [1.01, 0.0], [0.8, 0.8]])
    assert P.inside(pts, C, lo, hi).tolist() == [True, True, False, False]  # (0.8, 0.8) is cut by the 45° row
    assert P.inside(pts, C, lo, hi, tol=0.02).tolist() == [True, True, True, False]
    assert P.inside(pts, C, lo).tolist() == [True, True, True, True]     # lower bounds only: a half-open set


def test_polygon_and_hull_area():
    square = np.array([[0, 0], [2, 0], [2, 1], [0, 1]], dtype=float)
    assert P.polygon_area(square) == 2.0 and P.polygon_area(square[::-1]) == 2.0
    assert P.polygon_area(square[:2]) == 0.0
    rng = np.random.default_rng(0)
    pts = np.vstack([square, rng.uniform([0, 0], [2, 1], (100, 2))])
    assert P.hull_area(pts) == pytest.approx(2.0)
    assert P.hull_area(np.array([[0, 0], [1, 1], [2, 2]], dtype=float)) == 0.0


def test_input_grid_triangulates_the_box():
    pts, tri = P.input_grid([0.0, 1.0], [2.0, 2.0], 5)
    assert pts.shape == (25, 2) and tri.shape == (32, 3)
    assert pts.min(0).tolist() == [0.0, 1.0] and pts.max(0).tolist() == [2.0, 2.0]
    a, b, c = (pts[tri[:, i]] for i in range(3))
    areas = 0.5 * np.abs((b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0])
    assert areas.sum() == pytest.approx(2.0) and (areas > 0).all()
    with pytest.raises(ValueError, match="2-D"):
        P.input_grid([0, 0, 0], [1, 1, 1], 3)


@pytest.mark.parametrize("resolution", [50, 400])
def test_coverage_of_an_affine_image_is_its_area(resolution):
    """An affine map sends the box to a parallelogram of area |det A|·area(box); a fold (ReLU) halves it."""
    A = np.array([[2.0, 1.0], [0.5, 1.5]])
    pts, tri = P.input_grid([0, 0], [1, 1], 21)     # 0.5 on the grid: the fold below is exact
    _, _, area = P.coverage(pts @ A.T, tri, resolution)
    assert area == pytest.approx(abs(np.linalg.det(A)), rel=8 / resolution)
    folded = np.abs(pts - 0.5)                                   # the box folded onto [0, ½]² (4 layers)
    mask, extent, area = P.coverage(folded, tri, resolution)
    assert area == pytest.approx(0.25, rel=8 / resolution) and mask.shape == (resolution, resolution)
    assert extent == pytest.approx((0.0, 0.5, 0.0, 0.5))
    _, _, zero = P.coverage(np.column_stack([pts[:, 0], pts[:, 0]]), tri)   # a segment
    assert zero == 0.0


def _mlp(sizes):
    return models.mlp(sizes).double()


@pytest.mark.parametrize("seed", [0, 1])
def test_image_of_box_lies_in_every_outer_polygon(seed):
    net = _mlp((2, 20, 20, 2))
    torch.manual_seed(seed)
    for p in net.parameters():
        nn.init.normal_(p, 0.0, 0.7)
    region = pl.LinfBall(torch.rand(1, 2, dtype=torch.float64), 0.2)
    inputs, outputs, tri = P.image_of_box(net, region, 60)
    lo, hi = (t[0].numpy() for t in region.box())
    assert inputs.min(0) == pytest.approx(lo) and inputs.max(0) == pytest.approx(hi)
    with torch.no_grad():
        assert np.allclose(outputs, net(torch.from_numpy(inputs)).numpy())
    C = P.unit_directions(16)
    area_true = P.coverage(outputs, tri)[2]
    areas = []
    for name in ("lp", "dual"):
        b = pl.Bounder.create(name).bound(net, region, C)
        assert P.inside(outputs, C, b.lower[0], b.upper[0], tol=1e-7).all()
        areas.append(P.polygon_area(P.outer_polygon(C, b.lower[0], b.upper[0])))
    box = pl.Bounder.create("interval").bound(net, region, torch.eye(2, dtype=torch.float64))
    area_box = float((box.upper - box.lower).detach().prod())
    assert area_true <= P.hull_area(outputs) * (1 + 1e-2) <= areas[0] * (1 + 1e-2)
    assert areas[0] <= areas[1] * (1 + 1e-9) <= area_box * (1 + 1e-9)


def test_image_of_box_needs_one_2d_example():
    net = _mlp((2, 5, 2))
    with pytest.raises(ValueError, match="one example"):
        P.image_of_box(net, pl.LinfBall(torch.zeros(2, 2, dtype=torch.float64), 0.1))


def test_slack_per_half_plane():
    C = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    pts = np.array([[0.0, 1.0], [2.0, 3.0]])
    s = P.slack(pts, C, torch.tensor([-1.0, 1.0]), torch.tensor([2.5, 2.0]))
    # x ≥ −1, y ≥ 1 (touched), x ≤ 2.5, y ≤ 2 (violated)
    assert s.tolist() == pytest.approx([1.0, 0.0, 0.5, -1.0])
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        P.slack(np.zeros((3, 3)), C, torch.zeros(2))

"""interval.py: interval bound propagation against closed forms, brute force and the dual."""
from __future__ import annotations

import itertools

import torch

import polytope_lab as pl
from conftest import make_mlp, make_resnet, random_inputs
from polytope_lab.dual import intermediate_bounds
from polytope_lab.interval import affine_boxes, interval_bounds, interval_step


def test_one_layer_is_the_closed_form():
    """For f = W x + b over the ε-ball the box is exactly W x + b ± ε |W| 1."""
    model = make_mlp([3, 4], seed=2)
    x = random_inputs((3,), batch=2)
    b = pl.Bounder.create("interval").bound(model, pl.LinfBall(x, 0.2))
    W, bias = model[0].weight.detach(), model[0].bias.detach()
    centre, radius = x @ W.t() + bias, 0.2 * W.abs().sum(1)
    torch.testing.assert_close(b.lower, centre - radius, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.upper, centre + radius, rtol=0, atol=1e-12)


def test_helpers_return_the_same_layers_as_the_dual():
    model, shape = make_resnet("mlp")
    network = pl.from_torch(model, shape)
    region = pl.LinfBall(random_inputs(shape, batch=2), 0.1)
    boxes, relu_layers, dual = affine_boxes(network, region), interval_bounds(network, region), \
        intermediate_bounds(network, region)
    assert len(boxes) == network.n_relu_layers + 1 and len(relu_layers) == len(dual) == network.n_relu_layers
    for (l, u), (ld, ud) in zip(relu_layers, dual):
        assert l.shape == ld.shape
        assert (l <= ld + 1e-9).all() and (u >= ud - 1e-9).all(), "the dual is never looser than intervals"


def test_box_contains_every_vertex_image():
    """Each output over all 2^n vertices of a small box lies in the interval bound (and the first layer's
    bound is attained at vertices)."""
    model = make_mlp([3, 5, 5, 2], seed=4)
    x = random_inputs((3,), batch=1)
    region = pl.LinfBall(x, 0.3)
    b = pl.Bounder.create("interval").bound(model, region)
    lo, hi = region.box()
    corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)), dtype=x.dtype)
    points = lo + (hi - lo) * corners
    with torch.no_grad():
        f = model(points)
    assert (f >= b.lower - 1e-12).all() and (f <= b.upper + 1e-12).all()
    first = pl.from_torch(model, (3,)).affines[0].forward(points)
    l1, u1 = b.intermediate[0]
    torch.testing.assert_close(first.min(0).values, l1[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(first.max(0).values, u1[0], rtol=0, atol=1e-12)


def test_one_interval_step_over_the_interval_bounds_is_the_interval_bound():
    """interval_step from the interval bounds below gives back affine_boxes' layer, skips included; from
    tighter bounds below (the dual's, intersected with the boxes: the fixed-slope dual need not be inside
    them) it is tighter and still contains every sampled pre-activation."""
    for kind in ("mlp", "conv", "input-skip"):
        model, shape = make_resnet(kind)
        network = pl.from_torch(model, shape)
        region = pl.LinfBall(random_inputs(shape, batch=2), 0.1)
        boxes, dual = affine_boxes(network, region), intermediate_bounds(network, region)
        points = region.center + 0.1 * (2 * torch.rand(64, *region.center.shape, dtype=region.center.dtype) - 1)
        pre = network.pre_activations(points.reshape(-1, *shape))
        for i in range(1, len(boxes)):
            l, u = interval_step(network, region, boxes, i)
            torch.testing.assert_close(l, boxes[i][0], rtol=0, atol=1e-12)
            torch.testing.assert_close(u, boxes[i][1], rtol=0, atol=1e-12)
            if i < len(dual):
                both = [(torch.maximum(a, c), torch.minimum(b, d)) for (a, b), (c, d) in zip(dual, boxes)]
                l, u = interval_step(network, region, both, i)
                assert (l >= boxes[i][0] - 1e-12).all() and (u <= boxes[i][1] + 1e-12).all(), kind
                z = pre[i].reshape(64, *l.shape)
                assert (z >= l - 1e-9).all() and (z <= u + 1e-9).all(), f"{kind}: layer {i} not contained"

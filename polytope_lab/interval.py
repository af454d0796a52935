"""Naive layerwise (interval) bounds: push the input box through each layer as centre ± radius."""
from __future__ import annotations

import torch

from .bounds import Bounder, Bounds
from .network import Network
from .regions import Region


def affine_box(network: Network, i: int, boxes: list):
    """(l, u) of affine i's output from the (centre, radius) boxes of z_0 … z_i (its input and the
    inputs of its skip terms), by interval arithmetic."""
    center, radius = network.affines[i].interval(*boxes[i])
    for j, S in network.skips_into(i):  # skip terms: add their boxes
        c, r = S.interval(*boxes[j])
        center, radius = center + c.reshape(center.shape), radius + r.reshape(radius.shape)
    return center - radius, center + radius


def relu_box(l: torch.Tensor, u: torch.Tensor):
    """(centre, radius) of ``relu(ẑ)`` for ``l ≤ ẑ ≤ u``."""
    l, u = l.clamp(min=0), u.clamp(min=0)
    return (u + l) / 2, (u - l) / 2


def input_box(region: Region):
    """(centre, radius) of the region's bounding box."""
    lo, hi = region.box()
    return (hi + lo) / 2, (hi - lo) / 2


def affine_boxes(network: Network, region: Region) -> list:
    """(l, u) of every affine output, the last being ``f``, by interval arithmetic."""
    boxes = [input_box(region)]  # (centre, radius) of z_0, z_1, ...
    layers = []
    for i in range(len(network.affines)):
        layers.append(affine_box(network, i, boxes))
        if i < network.n_relu_layers:
            boxes.append(relu_box(*layers[-1]))
    return layers


def interval_step(network: Network, region: Region, bounds: list, i: int):
    """(l, u) of affine i's output by one interval step from the bounds ``bounds`` (l, u) of the ReLU
    layers below it (any sound bounds): the reference that CROWN's sparse intermediate bounds start from."""
    return affine_box(network, i, [input_box(region)] + [relu_box(l, u) for l, u in bounds[:i]])


def interval_bounds(network: Network, region: Region) -> list:
    """Per ReLU layer, (l, u) of its pre-activations, as ``dual.intermediate_bounds`` returns them."""
    return affine_boxes(network, region)[:-1]


class IntervalBounder(Bounder):
    """Interval bound propagation: the loosest, cheapest sound bound."""

    name = "interval"

    def _bound(self, network, region, C):
        layers = affine_boxes(network, region)
        l, u = (t.reshape(t.shape[0], -1) for t in layers[-1])
        center, radius = (u + l) / 2, (u - l) / 2
        c = torch.einsum("bmn,bn->bm", C, center)
        r = torch.einsum("bmn,bn->bm", C.abs(), radius)
        return Bounds(c - r, c + r, intermediate=layers[:-1], status=["ok"] * region.batch_size,
                      method="interval")

"""Naive layerwise (interval) bounds: push the input box through each layer as centre ± radius."""
from __future__ import annotations

import torch

from .bounds import Bounder, Bounds
from .network import Network
from .regions import Region


def affine_boxes(network: Network, region: Region) -> list:
    """(l, u) of every affine output, the last being ``f``, by interval arithmetic."""
    lo, hi = region.box()
    boxes = [((hi + lo) / 2, (hi - lo) / 2)]  # (centre, radius) of z_0, z_1, ...
    layers = []
    for i, a in enumerate(network.affines):
        center, radius = a.interval(*boxes[-1])
        for j, S in network.skips_into(i):  # skip terms: add their boxes
            c, r = S.interval(*boxes[j])
            center, radius = center + c.reshape(center.shape), radius + r.reshape(radius.shape)
        l, u = center - radius, center + radius
        layers.append((l, u))
        if i < network.n_relu_layers:
            l, u = l.clamp(min=0), u.clamp(min=0)
            boxes.append(((u + l) / 2, (u - l) / 2))
    return layers


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

"""Exact dual intermediate bounds in chunks (the reference's ``robust_loss_parallel``): for one example
whose forward columns (or, with skip connections, backward rows) do not fit in memory at once, optionally
spread over several devices. Same formula as :func:`~polytope_lab.dual.intermediate_bounds`, equal results.
"""
from __future__ import annotations

import torch

from .backward import unit_bounds
from .columns import basis, unit_columns
from .relu import relu_slopes, relu_terms, unstable_units
from ..network import Network
from ..regions import Box, L2Ball, Region


def _push_up(network: Network, slopes: list, M: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Columns kept as images, M (B|1, c, n), at the output of affine ``start`` carried through D and A up
    to the output of affine ``stop``: (B, c, n')."""
    for s in range(start + 1, stop + 1):
        A, d = network.affines[s], slopes[s - 1]
        M = A.linear((d.unsqueeze(1) * M).reshape(-1, *A.in_shape)).reshape(d.shape[0], M.shape[1], -1)
    return M


def _input_chunk(net: Network, slopes: list, eye: torch.Tensor, i: int, weight) -> torch.Tensor:
    """The share of c input columns ``eye`` (c, n_0) (of A_1·I, pushed up to affine i) in every unit's
    radius: ``Σ rad·|F|`` with ``weight`` (B, c, 1) their radii, or ``Σ F²`` for an L2 ball (weight None)."""
    c = eye.shape[0]
    M = net.affines[0].linear(eye.reshape(c, *net.input_shape)).reshape(1, c, -1)
    M = _push_up(net, slopes, M, 0, i)                                          # (1|B, c, n_i)
    return M.square().sum(1) if weight is None else (M.abs() * weight).sum(1)


def _units_chunk(net: Network, slopes: list, units, j: int, i: int):
    """The terms ``Σ_q l_q [∓G_q]₊`` (lower, upper) of a chunk ``units`` = (order, dI, lI), each (B, c),
    of ReLU layer j's unstable units: the columns ``d_q e_q`` enter at affine j + 1, pushed up to affine i."""
    order, dI, lI = units
    G = unit_columns(net.affines[j + 1], order, 0).transpose(1, 2) * dI.unsqueeze(2)  # (B, c, n_{j+1})
    G = _push_up(net, slopes, G, j + 1, i)                                      # (B, c, n_i)
    return relu_terms(G.transpose(1, 2), lI)


def column_chunked_bounds(network: Network, region: Region, column_chunk: int, devices=None) -> list:
    """Algorithm 1's intermediate bounds (fixed α), exact, never holding more than ``column_chunk`` of the
    forward columns at once: for one example too large for :func:`intermediate_bounds` (the reference's
    ``robust_loss_parallel``). Returns (l, u) per ReLU layer, each (B, *shape), on the region's device.

    The columns — the input identity and, for each ReLU layer, ``d_q e_q`` for its unstable units q — are
    split into chunks. For the bounds of layer i each chunk is pushed from where it starts up to layer i
    and reduced at once to its share of the sums (Σ rad·|F| or Σ F² for the input, Σ l[·]₊ for the units),
    which add up over chunks; the chunk is then dropped and recomputed for the next layer. Memory:
    O(B · column_chunk · widest layer) per device; time: each column is pushed once per layer above its
    origin, so about depth/2 times the work of ``strategy="forward"``. ``devices``: torch devices that take
    the chunks in turn (default: the region's); on CUDA they run concurrently (kernel launches are
    asynchronous), on the CPU one after another. A network with skip connections is chunked over
    backward rows instead (:func:`_row_chunked_bounds`).
    """
    if isinstance(column_chunk, bool) or not isinstance(column_chunk, int) or column_chunk < 1:
        raise ValueError(f"column_chunk must be an integer >= 1, got {column_chunk!r}")
    if not isinstance(region, (Box, L2Ball)):
        raise ValueError(f"column chunking needs a Box (LinfBall) or an L2Ball, got {type(region).__name__}")
    main = region.x.device
    devices = [torch.device(d) for d in (devices or [main])]
    if network.has_skips:
        return _row_chunked_bounds(network, region, column_chunk, devices)
    nets = {device: network.to(device) for device in set(devices)}
    B, n0 = region.batch_size, network.input_size
    weight = region.radius.reshape(B, n0) if isinstance(region, Box) else None    # None: L2, Σ F² then √
    h = network.affines[0].forward(region.center).reshape(B, -1)                       # (B, n_i)
    bounds, slopes, units = [], [], []  # units[j]: (order, dI, lI), each (B, q_j), of ReLU layer j
    for i in range(network.n_relu_layers):
        A = network.affines[i]
        if i:
            h = A.forward((slopes[-1] * h).reshape(B, *A.in_shape)).reshape(B, -1)
        on = {device: [t.to(device) for t in slopes] for device in nets}
        jobs = [(None, start) for start in range(0, n0, column_chunk)]
        jobs += [(j, start) for j in range(i) for start in range(0, units[j][0].shape[1], column_chunk)]
        radius, lo, up = [], [], []                                                     # parts, each (B|1, n_i)
        for t, (j, start) in enumerate(jobs):
            device = devices[t % len(devices)]
            net = nets[device]
            if j is None:  # input columns start..start + c of A_1·I
                c = min(column_chunk, n0 - start)
                w = None if weight is None else weight[:, start:start + c].to(device).unsqueeze(2)
                eye = basis(n0, start, c, device, region.x.dtype)
                radius.append(_input_chunk(net, on[device], eye, i, w))
            else:  # unstable units start..start + c of ReLU layer j
                chunk = [x[:, start:start + column_chunk].to(device) for x in units[j]]
                terms = _units_chunk(net, on[device], chunk, j, i)
                lo.append(terms[0])
                up.append(terms[1])
        rad = sum(p.to(main) for p in radius)
        if weight is None:
            rad = region.eps[:, None] * rad.sqrt()
        lower = h - rad + sum(p.to(main) for p in lo)
        upper = h + rad - sum(p.to(main) for p in up)
        bounds.append((lower.reshape(B, *A.out_shape), upper.reshape(B, *A.out_shape)))
        if i + 1 < network.n_relu_layers:
            d, unstable = relu_slopes(lower, upper)
            slopes.append(d)
            units.append(unstable_units(d, unstable, lower))
    return bounds


def _row_chunked_bounds(network: Network, region: Region, chunk: int, devices: list) -> list:
    """The same bounds for a network with skip connections, from backward rows (eq. 22 with c = ±e_j)
    taken ``chunk`` units at a time: O(B · chunk · widest layer) memory per device."""
    main, B = region.x.device, region.batch_size
    on = {device: (network.to(device), region.to(device)) for device in set(devices)}
    bounds = []
    for i in range(network.n_relu_layers):
        A = network.affines[i]
        n, lows, ups = A.out_features, [], []
        for t, start in enumerate(range(0, n, chunk)):
            device = devices[t % len(devices)]
            net, reg = on[device]
            below = [(l.to(device), u.to(device)) for l, u in bounds]
            l, u = unit_bounds(net, reg, below, i, start, min(chunk, n - start))
            lows.append(l.to(main))
            ups.append(u.to(main))
        bounds.append((torch.cat(lows, 1).reshape(B, *A.out_shape), torch.cat(ups, 1).reshape(B, *A.out_shape)))
    return bounds


__all__ = ["column_chunked_bounds"]

"""Algorithm 1 (Wong & Kolter 2018): the pre-activation bounds ``l_i ≤ ẑ_i ≤ u_i`` of every ReLU layer,
layer by layer with the fixed α = u/(u−l), each layer's bounds being J (eq. 23) with c = ±e_j.

Per layer the cheaper of advancing the forward frontier (:class:`~.frontier.Frontier`) and backward
rows that jump through it (:func:`~.backward.unit_bounds`); with skip connections forward columns
through every skip (:class:`~.skips.SkipFrontier`) or backward rows to the input.
"""
from __future__ import annotations

from .backward import unit_bounds
from .frontier import Frontier
from .projections import check_proj
from .skips import SkipFrontier
from ..network import Network
from ..regions import Region

FLOAT_BYTES = 4
SKIP_FORWARD_BYTES = 2 ** 31  # "auto" on a skip net: forward columns only while they fit in this

STRATEGIES = ("auto", "forward", "backward")


def _advance_pays(network: Network, frontier: Frontier, i: int) -> bool:
    """Whether to advance the frontier to layer i (else: backward rows from i down to the frontier)."""
    A = network.affines[i]
    s = frontier.layer
    if s == 0:
        backward = A.out_features * sum(a.cost for a in network.affines[: i + 1])
    else:
        jump = frontier.width * frontier.columns
        backward = A.out_features * (sum(a.cost for a in network.affines[s + 1: i + 1]) + jump)
    return frontier.advance_cost() <= backward


def intermediate_bounds(network: Network, region: Region, strategy: str = "auto", return_frontier=False,
                        proj=None, generator=None):
    """Algorithm 1: (l, u) of every ReLU layer's pre-activations, each (B, *shape), with fixed α.

    ``strategy``: "auto" (per layer, the cheaper of advancing the forward frontier and backward rows that
    jump through it), "forward" (always advance) or "backward" (rows all the way to the input).
    With ``return_frontier``, also returns the frontier (None for "backward" or without ReLU layers) for
    :func:`~polytope_lab.dual.dual_objective`.
    ``proj=k``: the frontier's blocks of more than k columns are replaced by k random projections (see
    :class:`~.frontier.Frontier`) drawn from ``generator`` (torch's global one when None); the bounds are
    then estimates, not sound (``frontier.estimated``). Rows that never reach the frontier stay exact.
    A network with skip connections: forward columns through the skips ("forward"; "auto" while they
    fit in ``SKIP_FORWARD_BYTES``; ``proj`` as above) or backward rows ("backward"); the frontier returned
    is then a :class:`~.skips.SkipFrontier` (None for backward rows), which the final objective does not
    jump through: it runs to the input.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be 'auto', 'forward' or 'backward', got {strategy!r}")
    check_proj(proj)
    if network.has_skips:
        bounds, frontier = _skip_bounds(network, region, strategy, proj, generator)
        return (bounds, frontier) if return_frontier else bounds
    bounds = []
    use_frontier = strategy != "backward" and network.n_relu_layers > 0
    frontier = Frontier(network, region, proj, generator) if use_frontier else None
    B = region.batch_size
    for i in range(network.n_relu_layers):
        A = network.affines[i]
        behind = frontier is not None and frontier.layer < i
        if behind and (strategy == "forward" or _advance_pays(network, frontier, i)):
            frontier.advance(*bounds[frontier.layer])
        if frontier is not None and frontier.layer == i:
            l, u = frontier.bounds()
        else:
            l, u = unit_bounds(network, region, bounds, i, frontier=frontier)
        bounds.append((l.reshape(B, *A.out_shape), u.reshape(B, *A.out_shape)))
    return (bounds, frontier) if return_frontier else bounds


def first_layer_bounds(network: Network, region: Region) -> list:
    """[(l, u)] of layer 0's pre-activations (an affine map of the region: exact, whatever the slopes),
    each (B, *shape), from the first frontier (A_1's columns, shared by the batch); [] without ReLU
    layers. All that CROWN's chain (:func:`~.tight.slope_bounds`, "adaptive") takes from Algorithm 1."""
    if network.n_relu_layers == 0:
        return []
    l, u = (SkipFrontier if network.has_skips else Frontier)(network, region).bounds()
    shape = network.affines[0].out_shape
    return [(l.reshape(-1, *shape), u.reshape(-1, *shape))]


def _skip_bounds(network: Network, region: Region, strategy: str, proj=None, generator=None):
    """(bounds, frontier) of a network with skip connections: forward columns through every skip
    (:class:`~.skips.SkipFrontier`; "forward", and "auto" while its columns at every layer would take at
    most ``SKIP_FORWARD_BYTES``) or backward rows to the input (frontier None)."""
    B, bounds = region.batch_size, []
    sizes = [network.layer_size(j) for j in range(network.n_relu_layers)]      # z_0 .. z_{k-1}
    blocks = sizes if proj is None else [min(n, proj) for n in sizes]          # columns per block, at most
    columns = FLOAT_BYTES * B * sum(n * sum(blocks[:j]) for j, n in enumerate(sizes) if j)  # worst case
    forward = strategy == "forward" or (strategy == "auto" and columns <= SKIP_FORWARD_BYTES)
    frontier = SkipFrontier(network, region, proj, generator) if forward else None
    for i in range(network.n_relu_layers):
        A = network.affines[i]
        if frontier is not None:
            if i:
                frontier.advance(*bounds[-1])
            l, u = frontier.bounds()
        else:
            l, u = unit_bounds(network, region, bounds, i)
        bounds.append((l.reshape(B, *A.out_shape), u.reshape(B, *A.out_shape)))
    return bounds, frontier


__all__ = ["intermediate_bounds", "first_layer_bounds", "FLOAT_BYTES", "SKIP_FORWARD_BYTES", "STRATEGIES"]

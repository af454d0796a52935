"""The dual backend: :class:`DualBounder`, Wong–Kolter bounds behind the :class:`~polytope_lab.Bounder`
contract; its result is an :class:`~polytope_lab.bounds.EstimatedBounds` when random projections estimated
a term."""
from __future__ import annotations

import torch

from .alpha import optimize_alpha
from .backward import dual_objective
from .chunked import column_chunked_bounds
from .intermediate import FLOAT_BYTES, first_layer_bounds, intermediate_bounds
from .projections import check_proj
from .tight import SLOPES, ascend, optimized_bounds, optimized_layers, slope_bounds
from ..bounds import Bounder, Bounds, EstimatedBounds
from ..network import Network
from ..solvers import Budget, time_limit_seconds

#: options of the final-objective-only optimiser (α of the final objective over the fixed-slope
#: intermediate bounds, 20 steps): the dual of the LP over the *same* bounds, so it never passes that LP
FINAL_ALPHA_ONLY = {"alpha": "optimized", "slopes": "fixed", "optimize_intermediate": False}
#: default ascent steps of each intermediate layer in tight mode (the final objective takes ``steps``, 40):
#: on the bench ConvNet 40 instead of 20 narrows the width by 0.04–0.08% at 1.6–1.8× the time
INTERMEDIATE_STEPS = 20


class DualBounder(Bounder):
    """Wong–Kolter dual bounds.

    Options: ``alpha`` "fixed" (Algorithm 1's α = u/(u−l)) or "optimized" (projected gradient ascent, one
    α per objective row and ReLU layer); ``slopes`` "fixed" | "adaptive" | "best", the lower slopes of the
    intermediate bounds (:func:`~.tight.slope_bounds`; default "fixed", "best" with alpha="optimized");
    ``optimize_intermediate`` (default: True with alpha="optimized") also optimises the α of every
    intermediate layer's bounds, layer by layer (:func:`~.tight.optimized_bounds`; per layer i about
    ``8·4·B·2q_i·r_i`` bytes, r_i a row's floats below layer i (its receptive-field patches below a conv
    chain), chunked under ``max_memory``, and ``intermediate_steps`` backward passes of its 2q_i unstable
    rows with their gradient); ``intermediate_layers`` which of them: "auto" (default: those
    whose rows are cheap, :func:`~.tight.optimized_layers`), an int k (the last k) or None (all).
    ``alpha="optimized"`` with no further options is the tight
    mode: best slopes, optimised intermediate and final α, ``steps`` 40 for the final objective and
    ``intermediate_steps`` (default min(steps, 20)) for each intermediate layer, ``lr`` 0.5, ``decay`` 0.98
    (lr factor per step), early stop; alpha="optimized", slopes="fixed", optimize_intermediate=False is the
    final-objective-only optimiser over the paper's intermediate bounds (20 steps, lr 0.2, no decay), whose bound
    never passes the LP over those bounds. Whenever the slopes are not "fixed" the final objective is the
    per-row best of fixed and adaptive α (optimised from there); with "best" also never looser than the
    fixed-α dual, while "adaptive" is CROWN's chain alone (no fixed-slope chain is computed, so it takes
    neither ``proj`` nor ``column_chunk``, and a row may come out looser than the fixed dual's);
    ``Bounds.intermediate`` holds the intermediate bounds used. Every choice is sound for every region
    and for skip connections (the rows are pushed back through the skips); ``proj`` estimates stay
    estimates (the tightened bounds are then labelled estimated too). ``device`` (default: where the region's ``x`` lives, so CPU
    unless you pass CUDA tensors or ``device="cuda"``; results come back on ``x``'s device);
    ``max_memory`` bytes per chunk of examples (chunking bounds peak memory, results are unchanged);
    ``strategy`` "auto" | "forward" | "backward" for the intermediate bounds. ``time_limit`` (None: none)
    seconds per example for the ascents of alpha="optimized" (a call on B examples gets B × time_limit in
    all): when it passes, every row keeps its best iterate so far (a sound bound) and the examples whose
    chunk ran past it get status "time_limit" (the others "ok"). Results carry no gradient
    (the base class detaches them):
    use :func:`polytope_lab.robust_loss` or :func:`dual_objective` to differentiate through the bound.

    ``proj=k``: estimate the intermediate bounds with k random projections (Wong et al. 2018b; Cauchy
    with the median estimator for L∞ and the ReLU terms, Gaussian with the root mean square for an L2
    ball's input term). A block of columns is projected only when k is smaller than its number of
    columns (n_0 for the input, the batch's largest count of unstable units for a ReLU layer), otherwise
    it stays exact. Given the intermediate bounds the final objective is exact. If anything was
    estimated the result is an :class:`EstimatedBounds` (``method`` e.g. "dual-proj50", ``sound`` False,
    never ``certified``); ``seed`` (int) draws the projections from a fresh generator on every call, so
    a call is reproducible (None: torch's global generator).

    ``column_chunk=c``: exact intermediate bounds holding at most c forward columns at once
    (:func:`column_chunked_bounds`), for an example too big for memory; ``devices`` (a list of torch
    devices) spreads the chunks. ``max_memory`` chunks over examples, ``column_chunk`` within one.

    Networks with skip connections (``models.DenseSequential``): the dual transposes through the skips;
    intermediate bounds come from forward columns kept at every layer a skip reads ("auto", "forward") or
    from backward rows ("backward"); ``proj`` sketches the forward columns (backward rows stay exact), and
    ``column_chunk`` chunks backward rows.
    """

    name = "dual"

    def __init__(self, alpha="fixed", device=None, max_memory=2 ** 32, strategy="auto", steps=None, lr=None,
                 proj=None, seed=0, column_chunk=None, devices=None, slopes=None, optimize_intermediate=None,
                 decay=None, intermediate_layers="auto", intermediate_steps=None, time_limit=None):
        if alpha not in ("fixed", "optimized"):
            raise ValueError(f"alpha must be 'fixed' or 'optimized', got {alpha!r}")
        tight = alpha == "optimized"
        slopes = ("best" if tight else "fixed") if slopes is None else slopes
        if slopes not in SLOPES:
            raise ValueError(f"slopes must be one of {SLOPES}, got {slopes!r}")
        self.slopes = slopes
        self.optimize_intermediate = tight if optimize_intermediate is None else bool(optimize_intermediate)
        if self.optimize_intermediate and not tight:
            raise ValueError("optimize_intermediate needs alpha='optimized'")
        self.final_only = tight and slopes == "fixed" and not self.optimize_intermediate  # the old optimiser
        lr = (0.2 if self.final_only else 0.5) if lr is None else lr
        steps = (20 if self.final_only or not tight else 40) if steps is None else steps
        self.decay = (1.0 if self.final_only else 0.98) if decay is None else decay
        if intermediate_steps is not None and (isinstance(intermediate_steps, bool) or not isinstance(
                intermediate_steps, int) or intermediate_steps < 0):
            raise ValueError(f"intermediate_steps must be None or an integer >= 0, got {intermediate_steps!r}")
        self.intermediate_steps = min(steps, INTERMEDIATE_STEPS) if intermediate_steps is None else intermediate_steps
        if not (intermediate_layers in (None, "auto") or (isinstance(intermediate_layers, int)
                                                           and not isinstance(intermediate_layers, bool))):
            raise ValueError(f"intermediate_layers must be None, 'auto' or an int, got {intermediate_layers!r}")
        self.intermediate_layers = intermediate_layers
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be None or an integer, got {seed!r}")
        if column_chunk is not None and (isinstance(column_chunk, bool) or not isinstance(column_chunk, int)
                                         or column_chunk < 1):
            raise ValueError(f"column_chunk must be None or an integer >= 1, got {column_chunk!r}")
        if devices is not None and (column_chunk is None or isinstance(devices, (str, torch.device))
                                    or len(devices) == 0):
            raise ValueError("devices must be a non-empty list of devices, used with column_chunk")
        if check_proj(proj) is not None and column_chunk is not None:
            raise ValueError("proj (estimated bounds) and column_chunk (exact bounds) exclude each other")
        if slopes == "adaptive" and (proj is not None or column_chunk is not None):
            raise ValueError("proj and column_chunk act on the fixed-slope chain, which slopes='adaptive' "
                             "does not compute (its rows are chunked under max_memory)")
        super().__init__(device=device)
        self.time_limit = time_limit_seconds(time_limit)
        self.alpha, self.max_memory = alpha, max_memory
        self.strategy, self.steps, self.lr = strategy, steps, lr
        self.proj, self.seed, self.column_chunk, self.devices = proj, seed, column_chunk, devices

    def chunk_size(self, network: Network, batch: int) -> int:
        """Examples per chunk so that the per-example blocks (rows or columns of the dual network,
        at most ``max width × (n_0 + Σ n_i)`` floats) stay under ``max_memory``."""
        sizes = [a.out_features for a in network.affines]
        widest = max(sizes[1:] or sizes)
        per_example = FLOAT_BYTES * widest * (network.input_size + sum(sizes))
        return max(1, min(batch, int(self.max_memory // max(per_example, 1))))

    def _final(self, network, region, bounds, frontier, C, budget=None):
        """(lower, upper, intermediate bounds used) of C f(x') for one chunk of examples; ``budget`` ends
        the ascents early."""
        m = C.shape[1]
        if self.alpha == "fixed" and self.slopes == "fixed":
            with torch.no_grad():
                lo, up = dual_objective(network, region, bounds, C, frontier=frontier)
            return lo, up, bounds
        if self.final_only:
            both = optimize_alpha(network, region, bounds, torch.cat([C, -C], 1), self.steps, self.lr, budget=budget)
            return both[:, :m], -both[:, m:], bounds
        crown = self.slopes == "adaptive"   # CROWN's chain alone: no fixed-slope bound to intersect
        with torch.no_grad():
            if not crown:
                lo0, up0 = dual_objective(network, region, bounds, C, frontier=frontier)  # the paper's bound
            bounds = slope_bounds(network, region, bounds, self.slopes, self.max_memory)
        if self.optimize_intermediate:
            layers = optimized_layers(network, region, bounds, self.intermediate_layers)
            bounds = optimized_bounds(network, region, bounds, self.intermediate_steps, self.lr, self.decay,
                                      self.max_memory, layers, budget)
        steps = self.steps if self.alpha == "optimized" else 0   # 0: the better of fixed and adaptive α
        rows = torch.cat([C, -C], 1).reshape(C.shape[0], 2 * m, *network.affines[-1].out_shape)
        both = ascend(network, region, bounds, rows, len(network.affines) - 1, steps, self.lr, self.decay, budget)
        if crown:
            return both[:, :m], -both[:, m:], bounds
        return torch.maximum(both[:, :m], lo0), torch.minimum(-both[:, m:], up0), bounds

    def _bound(self, network, region, C):
        generator = None if self.proj is None or self.seed is None else torch.Generator().manual_seed(self.seed)
        step = self.chunk_size(network, region.batch_size)
        lowers, uppers, layers, statuses, estimated = [], [], [], [], False
        budget = None if self.time_limit is None else Budget(self.time_limit * region.batch_size)
        for start in range(0, region.batch_size, step):
            idx = slice(start, start + step)
            sub = region.select(idx)
            with torch.no_grad():
                if self.slopes == "adaptive":
                    bounds, frontier = first_layer_bounds(network, sub), None
                elif self.column_chunk is not None:
                    bounds, frontier = column_chunked_bounds(network, sub, self.column_chunk, self.devices), None
                else:
                    bounds, frontier = intermediate_bounds(network, sub, self.strategy, return_frontier=True,
                                                           proj=self.proj, generator=generator)
            estimated = estimated or (frontier is not None and frontier.estimated)
            lo, up, bounds = self._final(network, sub, bounds, frontier, C[idx], budget)
            statuses += ["time_limit" if budget is not None and budget.expired else "ok"] * sub.batch_size
            lowers.append(lo.detach())
            uppers.append(up.detach())
            layers.append(bounds)
        intermediate = [tuple(torch.cat([ch[j][k] for ch in layers]) for k in range(2))
                        for j in range(network.n_relu_layers)]
        method = "dual" if self.alpha == "fixed" else "dual-optimized"
        result = EstimatedBounds if estimated else Bounds
        return result(torch.cat(lowers), torch.cat(uppers), intermediate,
                      statuses, method=method + (f"-proj{self.proj}" if estimated else ""))


__all__ = ["DualBounder", "FINAL_ALPHA_ONLY"]

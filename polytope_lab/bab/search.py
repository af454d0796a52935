"""The branch-and-bound search of one example: best-first on the subdomain lower bound, batches of
subdomains bounded by one batched dual call per optimisation step (:func:`polytope_lab.dual.split_dual`).

A search holds P *problems* over one input box, each ``max_k (C_p,k f − offset_p,k)`` with K rows:

* ``decide``: the sign of its minimum. A subdomain closes once its lower bound is > ``BOUND_TOL`` (the
  bound is computed in float64; its rounding error on these networks is ~1e-12, far below); a problem is
  "found" once a point checked on the float64 network has value ≤ 0 (then the search stops: a
  counterexample decides the example).
* otherwise: its minimum within ``tolerance``. Every checked point's value is an incumbent U; a subdomain
  closes once its lower bound is ≥ U − tolerance·max(1, |U|).

Subdomains: ReLU splits (``split="relu"``: signs per unit, the α/β of their bound kept as the children's
warm start) or input boxes (``split="input"``: bisection of one coordinate). Branching (ReLU): "babsr",
the intercept term ``d_j (−l_j) [−ω̂_j]₊`` (d = u/(u−l)) that unit j's upper relaxation costs J at the
current α (Bunel et al. 2020's BaBSR estimate: splitting removes exactly that term, to first order), or
"widest", the relaxation's height ``d_j (−l_j)`` alone. Input: the coordinate j with the largest input
term ``Σ_k |ω̂_1,k,j| (hi_j − lo_j)``. Candidates: each subdomain's relaxation minimiser (the box corner
ω̂_1 points to) is checked on the network; a subdomain whose unstable units are all split is a leaf,
solved exactly as an LP (:mod:`.leaves`).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch

from .leaves import attack, leaf_slack, row_maximum, solve_leaf
from ..dual.intermediate import intermediate_bounds
from ..dual.splits import split_dual, tightened_bounds
from ..regions import Box

#: a float64 dual bound decides a sign only when it is above this (its rounding error is ~1e-12 here)
BOUND_TOL = 1e-9
BRANCHING = ("babsr", "widest")
SPLITS = ("auto", "relu", "input")
#: split="auto" branches on input coordinates for networks with at most this many inputs
INPUT_SPLIT_MAX = 8


@dataclass
class Settings:
    """The search's options (see :class:`~polytope_lab.bab.BaBBounder`)."""

    batch: int = 256
    branching: str = "babsr"
    split: str = "relu"
    max_memory: int = 2 ** 30
    tolerance: float = 1e-5
    steps: int = 4
    root_steps: int = 30
    tighten_steps: int = 8
    attack_steps: int = 50
    attack_restarts: int = 4
    local_attack: int = 8
    local_attack_steps: int = 20
    lr: float = 0.1
    lr_beta: float = 0.05
    lp_probes: int = 16
    stall_steps: int = 3


class Node:
    """One subdomain: its problem ``p``, proven ``lower`` bound of the problem's objective on it, the
    split ``signs`` (flat int8) or its box ``lo``/``hi`` (flat), warm-start ``alpha``/``beta`` (K, n)
    float32 and the unit or coordinate to ``branch`` on next (−1: a leaf)."""

    __slots__ = ("p", "lower", "signs", "lo", "hi", "alpha", "beta", "branch")

    def __init__(self, p, lower, signs=None, lo=None, hi=None, alpha=None, beta=None, branch=-1):
        self.p, self.lower, self.signs, self.lo, self.hi = p, lower, signs, lo, hi
        self.alpha, self.beta, self.branch = alpha, beta, branch


class Search:
    """One example's search (module docstring). ``net``: float64 network; ``region``: a float64 Box of one
    example; C (P, K, n_out), offset (P, K) float64; ``budget``: a :class:`~polytope_lab.solvers.Budget`."""

    def __init__(self, net, region: Box, C, offset, decide: bool, settings: Settings, budget, progress=None):
        self.net, self.region, self.C, self.offset = net, region, C, offset
        self.decide, self.s, self.budget, self.bar = decide, settings, budget, progress
        lo, hi = region.box()
        self.lo, self.hi = lo.reshape(-1), hi.reshape(-1)
        with torch.no_grad():
            self.root = intermediate_bounds(net, region)
        self.tightened = False
        if not decide:   # bound: the minima need the search anyway (certify tightens only when needed, in run)
            self.tighten()
        self.shapes = [l.shape[1:] for l, _ in self.root]
        self.sizes = [int(np.prod(s)) if len(s) else 1 for s in self.shapes]
        split = settings.split
        self.input_mode = split == "input" or (split == "auto" and net.input_size <= INPUT_SPLIT_MAX)
        P, K = C.shape[:2]
        self.U = torch.full((P,), math.inf, dtype=torch.float64)
        self.U_x = [None] * P
        self.proven = torch.full((P,), math.inf, dtype=torch.float64)
        self.state = ["open"] * P
        self.heap, self.count, self.visited, self.memory_hit = [], 0, 0, False
        n = net.input_size if self.input_mode else sum(self.sizes)
        per_node = 16 * n if self.input_mode else 8 * K * n + n + 200
        self.cap = max(4 * settings.batch, int(settings.max_memory // per_node))
        self.ops = None
        self.failed = {}    # problem -> status of a leaf LP that failed ("time_limit", "error: …")
        self.stalled, self.best_low = 0, -math.inf    # steps since the lowest open bound last rose

    def tighten(self):
        """Tighten the root's intermediate bounds by optimised α (once; dearer than a root bound on conv nets)."""
        if self.s.tighten_steps and not self.tightened:
            self.root = tightened_bounds(self.net, self.region, self.root, self.s.tighten_steps, budget=self.budget)
        self.tightened = True

    # ---------------------------------------------------------------- incumbents and closing

    def threshold(self, p: int) -> float:
        """A subdomain of problem p with a lower bound above this is closed."""
        if self.decide:
            return BOUND_TOL
        U = float(self.U[p])
        return U - self.s.tolerance * max(1.0, abs(U)) if math.isfinite(U) else math.inf

    def close(self, node: Node) -> bool:
        """Close ``node`` if its bound settles it (its bound joins the problem's proven bound)."""
        if self.state[node.p] in ("open", "unknown") and node.lower <= self.threshold(node.p):
            return False
        self.proven[node.p] = min(float(self.proven[node.p]), node.lower)
        return True

    def offer(self, p: int, value: float, point: torch.Tensor):
        """A point of the box with objective ``value`` for problem p (attained on the float64 network)."""
        if value < float(self.U[p]):
            self.U[p], self.U_x[p] = value, point.detach().reshape(-1).clone()
        if self.decide and value <= 0:
            self.state[p] = "found"

    @property
    def found(self) -> bool:
        return "found" in self.state

    def push(self, node: Node):
        if not self.close(node):
            self.count += 1
            heapq.heappush(self.heap, (node.lower, self.count, node))
            self.memory_hit = self.memory_hit or len(self.heap) > self.cap

    # ---------------------------------------------------------------- the loop

    def run(self):
        """Roots, attack, then batches of subdomains until every problem is settled or a limit strikes."""
        P = self.C.shape[0]
        roots = [Node(p, -math.inf, lo=self.lo, hi=self.hi) if self.input_mode else
                 Node(p, -math.inf, signs=torch.zeros(sum(self.sizes), dtype=torch.int8)) for p in range(P)]
        self.bound(roots, 0 if self.decide else self.s.root_steps, roots=True)
        if self.decide:   # cheapest first: fixed-α dual, optimised α/β, the attack, then tightened bounds
            self.root_stage(False)
            self.run_attack()
            self.root_stage(True)
        else:
            self.run_attack()
        while self.heap and not (self.found or self.budget.expired or self.memory_hit):
            self.step()
        return self

    def root_stage(self, tighten: bool):
        """Re-bound the open roots with ``root_steps`` of α/β (``tighten``: on tightened intermediate bounds
        first); each keeps the best of its sound bounds. Skipped once decided or out of time."""
        if not self.heap or self.found or self.budget.expired:
            return
        if tighten:
            self.tighten()
        roots = [heapq.heappop(self.heap)[2] for _ in range(len(self.heap))]
        self.bound(roots, self.s.root_steps, roots=True)

    def run_attack(self):
        """PGD with restarts on the problems with open subdomains; its points are offered as incumbents."""
        open_p = sorted({n.p for _, _, n in self.heap})
        if open_p and self.s.attack_steps and not self.found and not self.budget.expired:
            values, points = attack(self.net, self.lo, self.hi, self.C[open_p], self.offset[open_p],
                                    self.s.attack_steps, self.s.attack_restarts)
            for p, v, x in zip(open_p, values.tolist(), points):
                self.offer(p, v, x)

    def pop(self, count: int) -> list:
        """Up to ``count`` open subdomains with the smallest lower bounds (closing those now settled)."""
        out = []
        while self.heap and len(out) < count:
            node = heapq.heappop(self.heap)[2]
            if not self.close(node):
                out.append(node)
        return out

    def step(self):
        if self.stall():
            self.probe()
        nodes = self.pop(max(1, self.s.batch // 2))
        for leaf in [n for n in nodes if n.branch < 0]:
            if self.budget.expired:
                self.push(leaf)
            else:
                self.leaf(leaf)
        parents = [n for n in nodes if n.branch >= 0]
        if parents:
            self.bound([c for n in parents for c in self.children(n)], self.s.steps)
        if self.bar is not None:
            self.bar.update(len(parents))
            self.bar.set_postfix(open=len(self.heap), lower=f"{self.heap[0][0]:.4g}" if self.heap else "-")

    def stall(self) -> bool:
        """Whether the lowest open bound has not risen for ``stall_steps`` steps (then reset the count)."""
        if not self.heap or self.input_mode or not self.s.lp_probes:
            return False
        low = self.heap[0][0]
        self.stalled = self.stalled + 1 if low <= self.best_low else 0
        self.best_low = max(self.best_low, low)
        if self.stalled < self.s.stall_steps:
            return False
        self.stalled = 0
        return True

    def probe(self):
        """Solve the LP of the non-leaves among the ``lp_probes`` lowest open subdomains (the relaxation with
        their splits; :meth:`lp`): an empty one is pruned; else its bound rises to the LP's (sound: the LP relaxes the subdomain) and its
        minimiser, a point that satisfies the splits in the relaxation, is checked on the network and starts
        the local attack. Where the dual stalls, its subdomains are often infeasible split patterns that a
        few β steps cannot expose, or its box-corner candidates miss a counterexample inside."""
        nodes = self.pop(self.s.lp_probes)
        points = []
        for node in nodes:
            if self.budget.expired:      # the rest go back untouched
                break
            if node.branch >= 0:         # a leaf's LP is exact: the step solves it as a leaf
                out = self.lp(node)
                if out.status == "optimal":
                    points.append((node, torch.from_numpy(out.point)))
        if points:
            x = torch.stack([pt for _, pt in points])
            idx = torch.tensor([n.p for n, _ in points])
            v = row_maximum(self.net, x.reshape(len(x), *self.net.input_shape), self.C[idx], self.offset[idx])
            for (node, pt), value in zip(points, v.tolist()):
                self.offer(node.p, value, pt)
            self.local_attack([n for n, _ in points], x, v, self.C[idx], self.offset[idx])
        for node in nodes:
            self.push(node)

    def children(self, node: Node) -> list:
        j = node.branch
        if self.input_mode:
            mid = 0.5 * (node.lo[j] + node.hi[j])
            hi1, lo2 = node.hi.clone(), node.lo.clone()
            hi1[j], lo2[j] = mid, mid
            return [Node(node.p, node.lower, lo=node.lo, hi=hi1), Node(node.p, node.lower, lo=lo2, hi=node.hi)]
        out = []
        for sign in (1, -1):
            signs = node.signs.clone()
            signs[j] = sign
            out.append(Node(node.p, node.lower, signs=signs, alpha=node.alpha, beta=node.beta))
        return out

    # ---------------------------------------------------------------- bounding a batch

    def bound(self, nodes: list, steps: int, roots: bool = False):
        """Bound ``nodes`` (one batched dual per step), check their relaxation minimisers, choose their
        branching, and push the open ones. ``roots``: the nodes are the roots, whose subdomain is the whole
        box: once all are closed in decide mode, no point of the box can be a counterexample, and nothing
        more is done."""
        if not nodes:
            return
        self.visited += len(nodes)
        idx = torch.tensor([n.p for n in nodes])
        C, offset = self.C[idx], self.offset[idx]
        if self.input_mode:
            lo, hi = torch.stack([n.lo for n in nodes]), torch.stack([n.hi for n in nodes])
            shape = self.net.input_shape
            region = Box(lo.reshape(-1, *shape), hi.reshape(-1, *shape))
            with torch.no_grad():
                bounds = intermediate_bounds(self.net, region)
            signs = [torch.zeros(l.shape, dtype=torch.int8) for l, _ in bounds]
            out = split_dual(self.net, region, bounds, signs, C, steps=steps, lr=self.s.lr, budget=self.budget)
        else:
            lo, hi = self.lo.expand(len(nodes), -1), self.hi.expand(len(nodes), -1)
            region = self.region.select(torch.zeros(len(nodes), dtype=torch.long))
            flat = torch.stack([n.signs for n in nodes])
            signs = [t.reshape(len(nodes), *s) for t, s in zip(flat.split(self.sizes, 1), self.shapes)]
            bounds = [(l.expand(len(nodes), *s), u.expand(len(nodes), *s)) for (l, u), s in zip(self.root, self.shapes)]
            warm = nodes[0].alpha is not None
            alpha, beta = (self.layers([n.alpha for n in nodes]), self.layers([n.beta for n in nodes])) if warm \
                else (None, None)
            out = split_dual(self.net, region, bounds, signs, C, alpha, beta, steps, self.s.lr, self.s.lr_beta,
                             budget=self.budget)
        values = (out.lower - offset).amax(1)
        still_open = torch.tensor([max(n.lower, float(v)) <= self.threshold(n.p) for n, v in zip(nodes, values.tolist())])
        if roots and self.decide and not still_open.any():
            for node, v in zip(nodes, values.tolist()):
                node.lower = max(node.lower, v)
                self.push(node)                                             # closes it
            return
        self.candidates(nodes, out.omega_input, lo, hi, C, offset, still_open)
        branch = self.input_branch(out.omega_input, lo, hi) if self.input_mode else self.relu_branch(out, bounds, signs)
        if not self.input_mode:
            a_flat = torch.cat([a.reshape(len(nodes), a.shape[1], -1) for a in out.alpha], 2).float()
            b_flat = torch.cat([b.reshape(len(nodes), b.shape[1], -1) for b in out.beta], 2).float()
        for i, node in enumerate(nodes):
            node.lower = max(node.lower, float(values[i]))
            node.branch = int(branch[i])
            if not self.input_mode:
                node.alpha, node.beta = a_flat[i], b_flat[i]
            self.push(node)

    def layers(self, flats: list) -> list:
        """Per-node flat (K, n) float32 tensors -> per ReLU layer (N, K, *shape) float64."""
        t = torch.stack(flats).double()
        return [a.reshape(len(flats), t.shape[1], *s) for a, s in zip(t.split(self.sizes, 2), self.shapes)]

    def candidates(self, nodes, omega_input, lo, hi, C, offset, still_open):
        """Each subdomain's relaxation minimiser per row (the corner of its box that ω̂_1 points to), checked
        on the network; those of the subdomains the new bound leaves open (``still_open``) start the local
        attack."""
        N, K = C.shape[:2]
        w = omega_input.reshape(N, K, -1)
        x = torch.where(w > 0, lo[:, None, :], hi[:, None, :]).reshape(N * K, -1)
        v = row_maximum(self.net, x.reshape(N * K, *self.net.input_shape), C.repeat_interleave(K, 0),
                        offset.repeat_interleave(K, 0)).reshape(N, K)
        best, k = v.min(1)
        for i in torch.nonzero(best < self.U[[n.p for n in nodes]]).reshape(-1).tolist():
            self.offer(nodes[i].p, float(best[i]), x.reshape(N, K, -1)[i, k[i]])
        self.local_attack(nodes, x.reshape(N, K, -1)[torch.arange(N), k], torch.where(still_open, best, math.inf),
                          C, offset)

    def local_attack(self, nodes, points, values, C, offset):
        """PGD from the best relaxation minimisers of the batch (``local_attack`` of them, the lowest
        objective first; an infinite value: the subdomain is closed, no start): a counterexample often lies
        near the corner of a subdomain whose relaxation points at it, off the PGD paths from the box's
        centre and random starts (decide mode only)."""
        m = min(self.s.local_attack, int(torch.isfinite(values).sum()))
        if not (self.decide and m and self.s.local_attack_steps) or self.found or self.budget.expired:
            return
        pick = torch.argsort(values)[:m]
        got, at = attack(self.net, self.lo, self.hi, C[pick], offset[pick], self.s.local_attack_steps,
                         starts=points[pick])
        for i, v, x in zip(pick.tolist(), got.tolist(), at):
            self.offer(nodes[i].p, v, x)

    def relu_branch(self, out, bounds, signs) -> torch.Tensor:
        """Per subdomain, the flat index of the unit to split (−1: none unstable left, a leaf)."""
        scores = []
        for (l, u), s, w in zip(bounds, signs, out.omega_hat):
            N = l.shape[0]
            eligible = (l < 0) & (u > 0) & (s == 0)
            height = torch.where(eligible, u * (-l) / torch.where(eligible, u - l, torch.ones_like(u)),
                                 torch.zeros_like(u))
            if self.s.branching == "babsr":
                w = w.reshape(N, w.shape[1], *l.shape[1:])
                score = height * ((-w).clamp(min=0).sum(1) + 1e-4 * w.abs().sum(1))
            else:
                score = height
            scores.append(torch.where(eligible, score, torch.full_like(score, -1.0)).reshape(N, -1))
        if not scores:
            return torch.full((len(out.lower),), -1, dtype=torch.long)
        best, j = torch.cat(scores, 1).max(1)
        return torch.where(best >= 0, j, torch.full_like(j, -1))

    def input_branch(self, omega_input, lo, hi) -> torch.Tensor:
        """Per box, the coordinate to bisect (−1: the box is a point, a leaf)."""
        width = hi - lo
        score = omega_input.reshape(len(lo), omega_input.shape[1], -1).abs().sum(1) * width
        j = torch.where(score.max(1).values > 0, score.argmax(1), width.argmax(1))
        return torch.where(width.max(1).values > 0, j, torch.full_like(j, -1))

    # ---------------------------------------------------------------- leaves

    def leaf(self, node: Node):
        """Decide a leaf exactly: an LP over its linear region (ReLU splits) or the point itself (input)."""
        C, offset = self.C[node.p], self.offset[node.p]
        if self.input_mode:   # a point: the network's value is exact
            v = float(row_maximum(self.net, node.lo.reshape(1, *self.net.input_shape), C[None], offset[None])[0])
            node.lower = v
            self.offer(node.p, v, node.lo)
        else:
            self.solve_lp(node)
        if not self.close(node):    # settled all the same: its bound is exact (or the dual's, if the LP failed)
            self.proven[node.p] = min(float(self.proven[node.p]), node.lower)
            if self.decide and self.state[node.p] == "open":
                self.state[node.p] = "unknown"     # the minimum is 0 within the leaf's tolerance

    def lp(self, node: Node):
        """Solve the LP of ``node``'s subdomain (:func:`.leaves.solve_leaf`: the relaxation over the root's
        bounds clipped by its splits, plus the split rows; exact on a leaf, a relaxation elsewhere) and
        raise its bound: ∞ if empty, else the LP's optimum less :func:`.leaves.leaf_slack` (sound either
        way); a failed LP leaves it. Returns the LP's result."""
        if self.ops is None:
            self.ops = self.net.matrices()
        flat = node.signs.numpy()
        signs = np.split(flat, np.cumsum(self.sizes)[:-1])
        clipped = []
        for (l, u), s in zip(self.root, signs):
            l, u = l.reshape(-1).numpy(), u.reshape(-1).numpy()
            clipped.append((np.where(s > 0, np.maximum(l, 0), l), np.where(s < 0, np.minimum(u, 0), u)))
        C, offset = self.C[node.p], self.offset[node.p]
        out = solve_leaf(self.ops, self.lo.numpy(), self.hi.numpy(), clipped, signs, C.numpy(), offset.numpy(),
                         self.budget.remaining())
        if out.status == "empty":
            node.lower = math.inf
        elif out.status == "optimal":
            node.lower = max(node.lower, out.value - leaf_slack(out.value))
        return out

    def solve_lp(self, node: Node):
        """A leaf's LP: its minimiser is offered; a failed LP leaves the problem not settled exactly."""
        out = self.lp(node)
        if out.status == "optimal":
            x = torch.from_numpy(out.point)
            v = float(row_maximum(self.net, x.reshape(1, *self.net.input_shape), self.C[node.p][None],
                                  self.offset[node.p][None])[0])
            self.offer(node.p, v, x)
        elif out.status != "empty":    # the subdomain's dual bound stands
            self.failed[node.p] = out.status

    # ---------------------------------------------------------------- results

    def lower(self) -> torch.Tensor:
        """(P,) proven lower bounds: the closed subdomains' and the open ones'."""
        out = self.proven.clone()
        for lower, _, node in self.heap:
            out[node.p] = min(float(out[node.p]), lower)
        return out

    def open_problems(self) -> set:
        """Problems with open subdomains left."""
        return {node.p for _, _, node in self.heap}

    def limit_status(self) -> str:
        return "memory_limit" if self.memory_hit and not self.budget.expired else "time_limit"


__all__ = ["Search", "Settings", "Node", "BOUND_TOL", "BRANCHING", "SPLITS", "INPUT_SPLIT_MAX"]

"""The branch-and-bound backend: :class:`BaBBounder` (``Bounder.create("bab", ...)``), exact like the MILP.

Everything runs on a float64 CPU copy of the network (as the MILP's solver does): the guarantee is for the
network's weights evaluated in exact arithmetic. ``certify`` and ``find_point`` decide a sign only with a
margin: every subdomain's bound must exceed ``CERTIFY_TOL · max(1, |value at the centre|)`` (+ ``BOUND_TOL``
for a dual bound, + the leaf LP's own slack), which covers the float64 rounding of the dual and HiGHS's
tolerances scaled by the problem's magnitude (docs/bab.md, "The guarantee").
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from .leaves import leaf_slack, row_maximum
from .search import BRANCHING, SPLITS, Search, Settings
from ..bounds import Bounder, Bounds, Certification, certified_labels, check_objective, error_status, margin_matrix
from ..milp import PointSearch
from ..network import Network
from ..regions import Box, LinfBall
from ..solvers import Budget, time_limit_seconds


#: certify/find_point decide a sign only above this · max(1, |value at the centre|) (the leaf LP's
#: tolerance, :func:`leaves.leaf_slack`, scaled by the problem's magnitude)
CERTIFY_TOL = leaf_slack(0.0)


def decide_offsets(values: torch.Tensor) -> torch.Tensor:
    """Per problem, the margin ``CERTIFY_TOL · max(1, |value|)`` its minimum must exceed to be decided."""
    return CERTIFY_TOL * values.abs().clamp(min=1.0)


def _progress(enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(desc=desc, unit="subdomain", leave=False)


class BaBBounder(Bounder):
    """Exact bounds and verdicts by branch and bound over ReLU splits (or input coordinates), each
    subdomain bounded by the dual network with split multipliers β (:func:`polytope_lab.dual.split_dual`).

    Options: ``time_limit`` seconds per example (None: none); ``batch`` subdomains bounded per step;
    ``branching`` "babsr" | "widest"; ``split`` "auto" (input coordinates for ≤ 8 inputs, else ReLUs) |
    "relu" | "input"; ``max_memory`` bytes for stored subdomains (their cap; status "memory_limit" when it
    binds); ``progress`` a tqdm bar per example; ``tolerance`` of ``bound``'s minima (relative to
    max(1, |value|)); ``steps``/``root_steps`` α/β steps per subdomain batch and at the root;
    ``tighten_steps`` the α steps per layer of the root's intermediate bounds (tight mode's ascent, once;
    default 8: 30 gave the same subdomains at 1.5× the time on the PGD-trained ConvNet's open images);
    ``attack_steps``/``attack_restarts`` for the PGD attack before branching; ``lp_probes`` the lowest
    open subdomains whose LP (HiGHS) is solved when the lowest bound has not risen for 3 steps (0: never;
    ReLU splits only); ``device`` (ignored: the search runs on the CPU in float64).

    ``bound``: status "optimal" (lower ≥ the minimum − tolerance, the minimum attained within it), else
    "time_limit"/"memory_limit" with the minimum over the open subdomains (sound). ``certify`` decides
    each margin's sign and stops there; ``find_point`` decides a conjunction ``A f ≤ b`` (the pipeline's
    exact stage).
    """

    name = "bab"
    supported_regions = (LinfBall, Box)
    #: subdomains bounded by every search of this process so far (a tally the benchmarks read)
    subdomains_bounded = 0

    def __init__(self, time_limit=None, batch=256, branching="babsr", split="auto", max_memory=2 ** 30,
                 progress=False, tolerance=Settings.tolerance, steps=4, root_steps=30, attack_steps=50, attack_restarts=4,
                 device=None, tighten_steps=Settings.tighten_steps, lp_probes=Settings.lp_probes):
        super().__init__(device=device)
        time_limit = time_limit_seconds(time_limit)
        if branching not in BRANCHING:
            raise ValueError(f"branching must be one of {BRANCHING}, got {branching!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if int(batch) < 2 or not float(max_memory) > 0 or not float(tolerance) > 0:
            raise ValueError("batch must be >= 2, max_memory and tolerance > 0")
        if min(int(steps), int(root_steps), int(tighten_steps), int(attack_steps), int(lp_probes)) < 0 \
                or int(attack_restarts) < 1:
            raise ValueError("steps, root_steps, tighten_steps, attack_steps, lp_probes must be >= 0 and "
                             "attack_restarts >= 1")
        self.time_limit = time_limit
        self.progress = bool(progress)
        self.settings = Settings(int(batch), branching, split, int(max_memory), float(tolerance), int(steps),
                                 int(root_steps), int(tighten_steps), int(attack_steps), int(attack_restarts),
                                 lp_probes=int(lp_probes))

    def _search(self, net64, region64, C, offset, decide, budget, desc):
        bar = _progress(self.progress, desc)
        try:
            search = Search(net64, region64, C, offset, decide, self.settings, budget, bar).run()
            BaBBounder.subdomains_bounded += search.visited
            return search
        finally:
            if bar is not None:
                bar.close()

    @staticmethod
    def float64(network: Network, region: Box):
        cpu = dict(device="cpu", dtype=torch.float64)
        with torch.no_grad():
            return network.to(**cpu), region.to(**cpu)

    # ---------------------------------------------------------------- bound

    def _bound(self, network, region, C):
        net64, reg64 = self.float64(network, region)
        C64 = C.detach().to(device="cpu", dtype=torch.float64)
        B, m = C.shape[:2]
        lower, upper = torch.zeros(B, m, dtype=torch.float64), torch.zeros(B, m, dtype=torch.float64)
        statuses, layers = [], []
        for b in range(B):
            rows = torch.cat([C64[b], -C64[b]]).unsqueeze(1)                 # min c f, then min −c f
            search = self._search(net64, reg64.select([b]), rows, torch.zeros(2 * m, 1, dtype=torch.float64),
                                  False, Budget(self.time_limit), f"bab bound {b}")
            low = search.lower()
            lower[b], upper[b] = low[:m], -low[m:]
            failed = set(search.failed.values())
            if search.open_problems():
                statuses.append(search.limit_status())
            elif failed:
                statuses.append("time_limit" if failed == {"time_limit"} else error_status("a leaf LP failed"))
            else:
                statuses.append("optimal")
            layers.append(search.root)
        dt, dev = region.x.dtype, region.x.device
        intermediate = [tuple(torch.cat([ex[j][k] for ex in layers]).to(device=dev, dtype=dt) for k in range(2))
                        for j in range(network.n_relu_layers)]
        return Bounds(lower.to(device=dev, dtype=dt), upper.to(device=dev, dtype=dt), intermediate, statuses,
                      method="bab")

    # ---------------------------------------------------------------- certify

    def certify(self, model, region: Box, y=None) -> Certification:
        """Is every point of ``region`` classified as ``y`` (None: the prediction at the centre)? Per
        example the margins ``f_y − f_j`` are searched together, each closing once its lower bound is
        > δ + ``BOUND_TOL``, δ = :func:`decide_offsets` of its value at the centre; a point of the region
        with some margin ≤ 0 on the float64 network is a counterexample (and ends the example), one with a
        margin in (0, δ] makes it "unknown". "certified" only when every margin closed."""
        asked = self.exact_region(region)
        dt, dev = region.x.dtype, region.x.device                                # results in the caller's dtype
        network, region = self.prepare(model, region)
        y = certified_labels(network, region, y)
        B, shape = region.batch_size, network.input_shape
        net64, reg64 = self.float64(network, region)
        C = check_objective(margin_matrix(y, network.output_size), net64, reg64)
        margin = torch.full((B,), -math.inf, dtype=torch.float64)
        cex = torch.full((B, *shape), math.nan, dtype=torch.float64)
        cex_margin = torch.full((B,), math.nan, dtype=torch.float64)
        statuses, seconds = [], []
        for b in range(B):
            start = time.perf_counter()
            rows = C[b].unsqueeze(1)
            centre = reg64.select([b]).project(reg64.x[b:b + 1])
            at = row_maximum(net64, centre.expand(len(rows), *shape), rows, torch.zeros(len(rows), 1,
                                                                                       dtype=torch.float64))
            if float(at.min()) <= 0:
                statuses.append("counterexample")
                cex[b], cex_margin[b] = centre[0], float(at.min())
            else:
                delta = decide_offsets(at)
                search = self._search(net64, reg64.select([b]), rows, delta.reshape(-1, 1),
                                      True, Budget(self.time_limit), f"bab certify {b}")
                statuses.append(self._verdict(search, net64, C[b], asked.select([b]), dt, b, cex, cex_margin))
                margin[b] = float((search.lower() + delta).min())
            seconds.append(time.perf_counter() - start)
        return Certification(statuses, margin.to(device=dev, dtype=dt), cex.to(device=dev, dtype=dt),
                             cex_margin.to(device=dev, dtype=dt), y, seconds, method="bab")

    @staticmethod
    def _verdict(search: Search, net64, rows, asked, dtype, b, cex, cex_margin) -> str:
        """One example's verdict from its margins' search; a counterexample is projected onto the caller's
        region ``asked`` (float64; the search ran on its cast to the network's dtype, which may be wider by
        rounding), rounded inwards to the caller's ``dtype`` and re-run on the network there: the witness
        check, with no tolerance."""
        for p, state in enumerate(search.state):
            if state == "found":
                x = asked.representable_point(search.U_x[p].reshape(1, *net64.input_shape), dtype)
                with torch.no_grad():
                    value = float((rows @ net64(x)[0]).min())
                inside = bool(asked.contains(x, tol=0.0).all())
                if value <= 0 and inside:   # the witness check
                    cex[b], cex_margin[b] = x[0], value
                    return "counterexample"
                return "unknown" if inside else error_status("a counterexample failed the witness check")
        if search.open_problems():
            return search.limit_status() if search.limit_status() == "time_limit" else "unknown"
        if any(s.startswith("error") for s in search.failed.values()):
            return error_status("a leaf LP failed")
        if search.failed or any(state == "unknown" for state in search.state):
            return "time_limit" if "time_limit" in search.failed.values() else "unknown"
        return "certified"

    # ---------------------------------------------------------------- a conjunction, jointly

    def find_point(self, model, region: Box, A, b, time_limit=None) -> PointSearch:
        """Is there ``x'`` in ``region`` (one example) with ``A f(x') ≤ b`` in every row jointly? Branch and
        bound on ``max_k (A_k f − b_k)``: "refuted" once every subdomain has a row whose lower bound is
        > δ + ``BOUND_TOL`` (δ = :func:`decide_offsets` of the value at the centre; ``bound``: the proven
        minimum), "found" with a point checked on the float64 network (value ≤ 0), else
        "time_limit"/"unknown" (the minimum is within δ of 0).
        Same answer as :meth:`MILPBounder.find_point`."""
        return self.find_points(model, region, [(A, b)], time_limit)[0]

    def find_points(self, model, region: Box, disjuncts, time_limit=None) -> list:
        """:meth:`find_point` for several conjunctions ``[(A_d, b_d)]`` over one ``region`` in one search:
        the root's intermediate bounds (tightened), the attack and every batch are shared, each disjunct a
        problem ``max_k (A_d,k f − b_d,k)`` of its own (rows padded by repeating the disjunct's first row,
        which leaves the maximum unchanged). The search stops at the first point found; a disjunct not
        decided by then is "unknown" (the property is decided by that point). One :class:`PointSearch`
        per disjunct."""
        asked = self.exact_region(region)
        network, region = self.prepare(model, region)
        if region.batch_size != 1:
            raise ValueError(f"find_point takes a region of one example, got {region.batch_size}")
        if not len(disjuncts):
            return []
        net64, reg64 = self.float64(network, region)
        C, offset = self.stacked(net64, reg64, disjuncts)
        limit = self.time_limit if time_limit is None else time_limit
        centres = reg64.project(reg64.x).expand(len(C), *net64.input_shape)
        delta = decide_offsets(row_maximum(net64, centres, C, offset))
        search = self._search(net64, reg64, C, offset + delta[:, None], True, Budget(limit), "bab find_point")
        return [self._point_result(search, net64, asked, p, offset[p:p + 1], float(delta[p])) for p in range(len(C))]

    @staticmethod
    def stacked(net64, reg64, disjuncts) -> tuple:
        """(C (P, K, n_out), offset (P, K)) float64 of the conjunctions, padded to K rows each by repeating
        their first row."""
        rows = []
        for A, b in disjuncts:
            A = check_objective(A, net64, reg64)
            b64 = torch.as_tensor(np.asarray(b, dtype=np.float64)).reshape(-1)
            if A.shape[1] == 0 or len(b64) != A.shape[1] or not torch.isfinite(b64).all():
                raise ValueError(f"b must hold one finite value per row of A ({A.shape[1]} >= 1), "
                                 f"got {tuple(b64.shape)}")
            rows.append((A[0], b64))
        K = max(len(b) for _, b in rows)
        C = torch.stack([torch.cat([A, A[:1].expand(K - len(A), -1)]) for A, _ in rows])
        offset = torch.stack([torch.cat([b, b[:1].expand(K - len(b))]) for _, b in rows])
        return C, offset

    @staticmethod
    def _point_result(search: Search, net64, asked, p: int, offset: torch.Tensor, delta: float) -> PointSearch:
        """Problem p's answer (searched with its offset raised by δ); a found point, projected onto the
        caller's region ``asked`` (float64), is re-run on the network against the original offset (the
        witness check, no tolerance): value ≤ 0 is "found", in (0, δ] "unknown"."""
        bound = float(search.lower()[p]) + delta
        C = search.C[p:p + 1]
        if search.state[p] == "found":
            x = asked.project(search.U_x[p].reshape(1, *net64.input_shape)).reshape(-1)
            value = float(row_maximum(net64, x.reshape(1, *net64.input_shape), C, offset)[0])
            inside = bool(asked.contains(x.reshape(1, *net64.input_shape), tol=0.0).all())
            if value <= 0 and inside:
                return PointSearch("found", bound, x.numpy().copy(), value)
            if inside:    # attained within δ above 0: the sign is not decided
                return PointSearch("unknown", bound, x.numpy().copy(), value)
            return PointSearch(error_status("a point failed the witness check"))
        last = {} if search.U_x[p] is None else dict(point=search.U_x[p].numpy().copy(),
                                                     value=float(search.U[p]) + delta)
        if p in search.open_problems():
            return PointSearch("unknown" if search.found else "time_limit", bound, **last)
        failed = search.failed.get(p)
        if failed is not None:
            return PointSearch(error_status("a leaf LP failed") if failed.startswith("error") else "time_limit",
                               bound, **last)
        if search.state[p] == "unknown":
            return PointSearch("unknown", bound, **last)
        return PointSearch("refuted", bound)


__all__ = ["BaBBounder", "CERTIFY_TOL", "decide_offsets"]

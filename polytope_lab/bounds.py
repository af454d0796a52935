"""The shared entry signature and its contract, enforced here for every backend.

``Bounder.create(name, **options).bound(model, region, C) -> Bounds`` and
``Bounder.create(name, **options).certify(model, region, y) -> Certification``.

Status vocabulary (one for every backend):

* ``Bounds.status``, per example: ``"ok"`` (sound, not claimed exact), ``"optimal"`` (exact within the
  solver's stated tolerance), ``"time_limit"``, ``"memory_limit"``, ``"infeasible"``, ``"error: …"``.
  Whatever the status, ``lower``/``upper`` are sound (a backend that fails falls back to a sound bound).
* ``Certification.status``, per example (a verdict): ``"certified"``, ``"counterexample"`` (with a point
  of the region checked on the network), ``"unknown"`` (the bounds cannot decide), ``"time_limit"``,
  ``"error: …"``. VNN-COMP reads them as unsat, sat, unknown, timeout, error.

Numerical honesty of ``certify`` (every backend): "certified" needs every margin's lower bound, computed
in float64, above ``certify_tol · max(1, scale)`` (``scale``: the largest |lower| or |upper| of the
example's margins). A network in a lower precision is certified by its float32 bound only after a float64
recheck of that bound on the same weights (cheap: only the examples the float32 bound certifies); a
margin within the tolerance of 0 is "unknown". :data:`CERTIFY_TOL` (1e-9) covers the float64 rounding of
a bound that sums up to ~10⁶ terms of the bound's magnitude; a solver backend states its own (the LP's is
its feasibility tolerance, the MILP's and BaB's are in docs/bab.md "The guarantee").
"""
from __future__ import annotations

import functools
import inspect
import math
import time
from dataclasses import dataclass, field

import torch

from .convert import as_network
from .network import Network
from .regions import Region

#: every ``Bounds.status`` is one of these or starts with ``ERROR_PREFIX``
BOUND_STATUSES = ("ok", "optimal", "time_limit", "memory_limit", "infeasible")
#: every ``Certification.status`` is one of these or starts with ``ERROR_PREFIX``
VERDICTS = ("certified", "counterexample", "unknown", "time_limit")
ERROR_PREFIX = "error: "
#: "certified" needs a float64 margin bound above this · max(1, scale) (module docstring)
CERTIFY_TOL = 1e-9


def certify_margin(scale, tol: float = CERTIFY_TOL):
    """The margin ``tol · max(1, |scale|)`` a lower bound must exceed to certify (elementwise for tensors)."""
    if isinstance(scale, torch.Tensor):
        return tol * scale.abs().clamp(min=1.0)
    return tol * max(1.0, abs(float(scale)))


def bound_scale(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """(B,) the magnitude of each example's bounds: ``max_j max(|lower_j|, |upper_j|)`` (finite entries)."""
    mag = torch.maximum(lower.abs(), upper.abs())
    return torch.where(torch.isfinite(mag), mag, torch.zeros_like(mag)).amax(dim=1)


def error_status(detail: str) -> str:
    """The status of a failed computation, e.g. ``error: solver failed``."""
    return ERROR_PREFIX + str(detail)


def check_statuses(statuses, allowed, batch: int, who: str) -> list:
    """``statuses`` as a list, or RuntimeError if a backend broke the vocabulary (a bug, not bad input)."""
    statuses = list(statuses)
    bad = [s for s in statuses if not (s in allowed or str(s).startswith(ERROR_PREFIX))]
    if bad or len(statuses) != batch:
        raise RuntimeError(f"{who} returned statuses {statuses[:5]}... for {batch} examples; each must be one "
                           f"of {allowed} or start with {ERROR_PREFIX!r}")
    return statuses


@dataclass
class Bounds:
    """Bounds on ``C f(x')`` over every ``x'`` in the region, per example.

    ``lower``/``upper``: (B, m). ``intermediate``: per ReLU layer, (l, u) of its pre-activations, each
    (B, *shape). ``status``: one string per example (see the module docstring). ``seconds``: wall time of
    the call. ``sound``: False only for :class:`EstimatedBounds`. Tensors are detached: differentiate
    through :func:`polytope_lab.robust_loss` instead.
    """

    lower: torch.Tensor
    upper: torch.Tensor
    intermediate: list = field(default_factory=list)
    status: list = field(default_factory=list)
    seconds: float = 0.0
    method: str = ""
    sound: bool = True

    @property
    def certified(self) -> torch.Tensor:
        """Per example: every row's lower bound is > 0 (with a margin matrix: provably correct class).
        Estimates never certify."""
        if not self.sound:
            return torch.zeros(self.lower.shape[0], dtype=torch.bool, device=self.lower.device)
        return (self.lower > 0).all(dim=1)

    def detached(self) -> "Bounds":
        """These bounds with every tensor detached (the contract's return form)."""
        self.lower, self.upper = self.lower.detach(), self.upper.detach()
        self.intermediate = [tuple(t.detach() for t in lu) for lu in self.intermediate]
        return self

    def to(self, device) -> "Bounds":
        """These bounds with ``lower``, ``upper`` and ``intermediate`` on ``device``."""
        self.lower, self.upper = self.lower.to(device), self.upper.to(device)
        self.intermediate = [tuple(t.to(device) for t in lu) for lu in self.intermediate]
        return self


@dataclass
class EstimatedBounds(Bounds):
    """Bounds from random-projection estimates (``DualBounder(proj=k)``): close to the exact dual bounds for
    large k, but NOT sound — an estimate can be tighter than the truth. ``sound`` is False, so
    ``certified`` is all False and no exact backend accepts them; generic code tests ``b.sound``.
    ``(b.lower > 0).all(1)`` is the estimate's own verdict if you explicitly want it."""

    sound: bool = False


@dataclass
class Certification:
    """Robustness verdicts for the margins ``f_y − f_j`` (j ≠ y), per example.

    ``status``: the verdict (module docstring). ``margin`` (B,): a proven lower bound of
    ``min_j min_x' f_y − f_j`` over the region (> 0 when certified; −inf where none). ``counterexample``
    (B, *input_shape): a point of the region where some ``f_j ≥ f_y``, checked on the network; NaN rows
    where none. ``counterexample_margin`` (B,): ``min_j f_y − f_j`` there (NaN where none). ``y`` (B,):
    the labels certified. ``seconds``: wall time per example.
    """

    status: list
    margin: torch.Tensor
    counterexample: torch.Tensor
    counterexample_margin: torch.Tensor
    y: torch.Tensor
    seconds: list
    method: str = ""

    @property
    def certified(self) -> torch.Tensor:
        """Per example: the verdict is "certified"."""
        return torch.tensor([s == "certified" for s in self.status], dtype=torch.bool)

    @property
    def refuted(self) -> torch.Tensor:
        """Per example: the verdict is "counterexample"."""
        return torch.tensor([s == "counterexample" for s in self.status], dtype=torch.bool)


def check_options(cls, init):
    """``init`` that turns an unknown keyword option into a ValueError naming it and the valid ones."""
    valid = [p for p in inspect.signature(init).parameters if p != "self"]

    @functools.wraps(init)
    def checked(self, *args, **options):
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"{type(self).__name__} ({self.name!r}) has no option(s) {unknown}; "
                             f"valid options: {valid}")
        init(self, *args, **options)
    checked.checks_options = True
    return checked


class Bounder:
    """Base class, registry and contract.

    A backend subclasses this with a ``name``, the region types it takes (``supported_regions``), an
    ``__init__`` that only stores options (it must take ``device``) and ``_bound(network, region, C)``.
    The base class checks the region, shapes and options, moves the problem to ``device`` and back,
    checks the status vocabulary and detaches the results, for every backend alike.
    """

    registry: dict = {}
    name = ""
    #: region types the backend accepts (a subclass narrows it, e.g. the MILP takes boxes (L∞ balls) only)
    supported_regions: tuple = (Region,)
    #: where ``bound`` computes (None: where the region's ``x`` lives); results come back there
    device = None
    #: relative margin the base ``certify`` requires of this backend's float64 bound (module docstring)
    certify_tol = CERTIFY_TOL

    def __init__(self, device=None):
        self.device = None if device is None else torch.device(device)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not getattr(cls.__init__, "checks_options", False):
            cls.__init__ = check_options(cls, cls.__init__)
        if cls.__dict__.get("name"):  # a subclass that does not name itself is not registered
            Bounder.registry[cls.name] = cls

    @classmethod
    def supports(cls, region) -> bool:
        """Whether this backend can bound over ``region``."""
        return isinstance(region, cls.supported_regions)

    @classmethod
    def options(cls) -> list:
        """The option names ``create`` accepts for this backend."""
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @classmethod
    def create(cls, name: str, **options) -> "Bounder":
        """The bounder registered under ``name`` (see ``Bounder.available()``), built with ``options``."""
        if name not in cls.registry:
            raise ValueError(f"unknown bounder {name!r}; available: {sorted(cls.registry)}")
        return cls.registry[name](**options)

    @classmethod
    def available(cls) -> list:
        return sorted(cls.registry)

    def check_region(self, region) -> Region:
        """``region``, or ValueError naming this backend and the region types it takes."""
        if not isinstance(region, Region):
            raise ValueError(f"region must be a Region (Box, LinfBall, L2Ball), got {type(region).__name__}")
        if not self.supports(region):
            takes = ", ".join(t.__name__ for t in self.supported_regions)
            raise ValueError(f"the {self.name!r} backend does not support {type(region).__name__} regions; "
                             f"it takes: {takes}")
        return region

    def exact_region(self, region) -> Region:
        """The caller's ``region``, checked, on the CPU in float64 (exact for float32 and float64 inputs): the
        region a witness must lie in, whatever the network's dtype the search ran in."""
        return self.check_region(region).to(device="cpu", dtype=torch.float64)

    def prepare(self, model, region):
        """(network, region in the network's dtype) after the contract's checks."""
        region = self.check_region(region)
        network = as_network(model, region.input_shape)
        if region.x.dtype != network.dtype:  # bounds are computed in the network's precision
            region = region.to(dtype=network.dtype)
        return network, region

    def bound(self, model, region: Region, C=None) -> Bounds:
        """Bounds on ``C f(x')`` for ``x'`` in ``region``; ``model`` is an nn.Sequential or a Network."""
        network, region = self.prepare(model, region)
        C = check_objective(C, network, region)
        home = region.x.device
        start = time.perf_counter()
        if region.batch_size == 0:
            empty = C.new_zeros(0, C.shape[1])
            layers = [(C.new_zeros(0, *a.out_shape),) * 2 for a in network.affines[:-1]]
            return Bounds(empty, empty.clone(), layers, [], time.perf_counter() - start, self.name)
        device = home if self.device is None else self.device
        if device != home:
            network, region, C = network.to(device), region.to(device), C.to(device)
        out = self._bound(network, region, C)
        out.status = check_statuses(out.status, BOUND_STATUSES, region.batch_size, f"the {self.name!r} backend")
        out.seconds = time.perf_counter() - start
        return out.detached().to(home)

    def _bound(self, network: Network, region: Region, C: torch.Tensor) -> Bounds:
        raise NotImplementedError

    def certify(self, model, region: Region, y=None) -> Certification:
        """Is every point of ``region`` classified as ``y``? One verdict per example, from the bounds of the
        margins ``f_y − f_j`` (a backend with a faster decision overrides this).

        ``y=None`` certifies the network's own prediction at the centre: an unlabeled input that cannot be
        certified is possibly adversarial (paper §3.5). A centre (projected onto the region) that is not
        classified as ``y`` is a counterexample.
        """
        network, region = self.prepare(model, region)
        y = certified_labels(network, region, y)
        if region.batch_size == 0:
            x = region.x
            return Certification([], x.new_zeros(0), x.clone(), x.new_zeros(0), y, [], method=self.name)
        start = time.perf_counter()
        C = margin_matrix(y, network.output_size)
        b = self.bound(network, region, C)
        point = region.project(region.x)
        with torch.no_grad():
            at_point = centre_margins(network, point, y)
        certified = self.honest(network, region, C, b).tolist()
        status = [certify_verdict(ok, s, m) for ok, s, m in zip(certified, b.status, at_point.tolist())]
        refuted = torch.tensor([s == "counterexample" for s in status], dtype=torch.bool)
        margin = b.lower.min(dim=1).values if b.sound else torch.full_like(at_point, -math.inf)
        nan = torch.full_like(point, math.nan)
        counterexample = torch.where(refuted.reshape(-1, *[1] * (point.dim() - 1)), point, nan)
        seconds = (time.perf_counter() - start) / max(1, region.batch_size)
        return Certification(status, margin, counterexample, torch.where(refuted, at_point, math.nan), y,
                             [seconds] * region.batch_size, method=b.method or self.name)


    def honest(self, network: Network, region: Region, C: torch.Tensor, b: Bounds) -> torch.Tensor:
        """(B,) which examples ``b`` certifies with a float64 margin above :func:`certify_margin` of
        ``certify_tol`` (a float32 bound is rechecked in float64 on the examples it certifies)."""
        ok = b.certified & torch.tensor([not s.startswith(ERROR_PREFIX) for s in b.status], dtype=torch.bool,
                                        device=b.lower.device)
        idx = torch.nonzero(ok).reshape(-1)
        if not len(idx):
            return ok.cpu()
        if network.dtype == torch.float64:
            lower, upper, statuses = b.lower[idx], b.upper[idx], [b.status[i] for i in idx.tolist()]
        else:
            f64 = dict(dtype=torch.float64)
            sel = idx.to(region.x.device)
            b64 = self.bound(network.to(**f64), region.select(sel).to(**f64), C[idx.cpu()].to(**f64))
            if not b64.sound:
                return torch.zeros_like(ok).cpu()
            lower, upper, statuses = b64.lower.to(ok.device), b64.upper.to(ok.device), b64.status
        clear = (lower > certify_margin(bound_scale(lower, upper), self.certify_tol)[:, None]).all(dim=1)
        clear &= torch.tensor([not s.startswith(ERROR_PREFIX) for s in statuses], dtype=torch.bool, device=ok.device)
        ok[idx] = clear
        return ok.cpu()


def certified_labels(network: Network, region: Region, y) -> torch.Tensor:
    """``y`` as (B,) class indices checked against the network, or the prediction at the centre if None."""
    if y is None:
        with torch.no_grad():
            return network(region.x).argmax(dim=1).cpu()
    y = torch.as_tensor(y).long().reshape(-1).cpu()
    if len(y) != region.batch_size:
        raise ValueError(f"y has {len(y)} labels for {region.batch_size} examples")
    if len(y) and ((y < 0) | (y >= network.output_size)).any():
        raise ValueError(f"labels must lie in [0, {network.output_size}), got {y.min().item()}..{y.max().item()}")
    return y


def centre_margins(network: Network, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) ``min_j f_y(x) − f_j(x)``, j ≠ y: ≤ 0 means ``x`` is not classified as ``y``."""
    C = margin_matrix(y, network.output_size).to(device=x.device, dtype=x.dtype)
    return torch.einsum("bmn,bn->bm", C, network(x)).min(dim=1).values.cpu()


def certify_verdict(certified: bool, bound_status: str, centre_margin: float) -> str:
    """One example's verdict from its bounds and the margin at the centre."""
    if certified and not bound_status.startswith(ERROR_PREFIX):
        return "certified"
    if centre_margin <= 0:
        return "counterexample"
    if bound_status == "time_limit" or bound_status.startswith(ERROR_PREFIX):
        return bound_status
    return "unknown"


def check_objective(C, network: Network, region: Region) -> torch.Tensor:
    """``C`` as a (B, m, n_out) tensor on the region's device/dtype; None means the identity."""
    B, n_out = region.batch_size, network.output_size
    x = region.x
    if tuple(region.input_shape) != tuple(network.input_shape):
        raise ValueError(f"region inputs have shape {region.input_shape} but the network expects "
                         f"{network.input_shape}")
    if C is None:
        return torch.eye(n_out, device=x.device, dtype=x.dtype).expand(B, n_out, n_out)
    C = torch.as_tensor(C).to(device=x.device, dtype=x.dtype)
    if C.dim() == 2:
        C = C.expand(B, *C.shape)
    if C.dim() != 3 or C.shape[0] != B or C.shape[2] != n_out:
        raise ValueError(f"C has shape {tuple(C.shape)}; expected (m, {n_out}) or ({B}, m, {n_out})")
    if not torch.isfinite(C).all():
        raise ValueError("C contains NaN or inf")
    return C


def require_sound(bounds: Bounds, user: str) -> Bounds:
    """``bounds``, or ValueError if they are estimates: ``user``'s results would silently lose soundness."""
    if not bounds.sound:
        raise ValueError(f"{user} needs sound intermediate bounds, got estimates ({bounds.method}); "
                         f"use an exact bounder (e.g. 'dual' without proj)")
    return bounds


def margin_matrix(y, n_classes: int) -> torch.Tensor:
    """(B, n_classes − 1, n_classes) rows ``e_y − e_j`` for every ``j ≠ y``: certified iff all lower bounds > 0."""
    y = torch.as_tensor(y).long().reshape(-1)
    if ((y < 0) | (y >= n_classes)).any():
        raise ValueError(f"labels must lie in [0, {n_classes}), got {y.min().item()}..{y.max().item()}")
    eye = torch.eye(n_classes)
    C = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # (B, n, n), row y is zero
    others = torch.arange(n_classes).expand(len(y), n_classes)
    keep = others != y[:, None]
    return C[keep].reshape(len(y), n_classes - 1, n_classes)


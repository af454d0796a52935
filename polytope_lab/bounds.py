"""The shared entry signature: ``Bounder.create(name, **options).bound(model, region, C) -> Bounds``."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .convert import as_network
from .network import Network
from .regions import Region


@dataclass
class Bounds:
    """Bounds on ``C f(x')`` over every ``x'`` in the region, per example.

    ``lower``/``upper``: (B, m). ``intermediate``: per ReLU layer, (l, u) of its pre-activations, each
    (B, *shape). ``status``: one string per example. ``seconds``: wall time of the call. ``sound``: False
    only for estimates (random projections), which can neither certify nor feed another backend.
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
        """Per example: every row's lower bound is > 0 (with a margin matrix: provably correct class)."""
        return (self.lower > 0).all(dim=1)


class Bounder:
    """Base class and registry. Subclasses implement ``_bound(network, region, C) -> Bounds``."""

    registry: dict = {}
    name = ""
    #: region types the backend accepts (a subclass narrows it, e.g. the MILP takes L∞ balls only)
    supported_regions: tuple = (Region,)

    @classmethod
    def supports(cls, region) -> bool:
        """Whether this backend can bound over ``region``."""
        return isinstance(region, cls.supported_regions)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            Bounder.registry[cls.name] = cls

    @classmethod
    def create(cls, name: str, **options) -> "Bounder":
        """The bounder registered under ``name`` (see ``Bounder.available()``), built with ``options``."""
        if name not in cls.registry:
            raise ValueError(f"unknown bounder {name!r}; available: {sorted(cls.registry)}")
        return cls.registry[name](**options)

    @classmethod
    def available(cls) -> list:
        return sorted(cls.registry)

    def bound(self, model, region: Region, C=None) -> Bounds:
        """Bounds on ``C f(x')`` for ``x'`` in ``region``; ``model`` is an nn.Sequential or a Network."""
        if not isinstance(region, Region):
            raise ValueError(f"region must be a LinfBall or L2Ball, got {type(region).__name__}")
        network = as_network(model, region.input_shape)
        if region.x.dtype != network.dtype:  # bounds are computed in the network's precision
            region = region.to(dtype=network.dtype)
        C = check_objective(C, network, region)
        start = time.perf_counter()
        if region.batch_size == 0:
            empty = C.new_zeros(0, C.shape[1])
            layers = [(C.new_zeros(0, *a.out_shape),) * 2 for a in network.affines[:-1]]
            return Bounds(empty, empty.clone(), layers, [], time.perf_counter() - start, self.name)
        out = self._bound(network, region, C)
        out.seconds = time.perf_counter() - start
        return out

    def _bound(self, network: Network, region: Region, C: torch.Tensor) -> Bounds:
        raise NotImplementedError


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


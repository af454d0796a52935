"""Algorithm 1's forward state of a sequential network (Wong & Kolter 2018, §3.3): the input identity
and every earlier ReLU layer's unstable units pushed forward through the linearised network (fixed α:
``ν_i = D_i ν̂_i``), so that the bounds of each next layer come from columns reused layer to layer.
Along a chain of convolutions the input columns are built from receptive-field patches (``patches.py``).
"""
from __future__ import annotations

import torch

from . import patches
from .columns import matrix_transpose, push, unit_columns
from .projections import l1_estimate, l2_estimate, sketch_input, sketch_relu
from .relu import max_unstable, relu_slopes, relu_terms, unstable_units
from ..network import Network
from ..regions import Region


def first_columns(A, x) -> torch.Tensor | patches.PatchRows:
    """``A_1·I`` (1, n_1, n_0): receptive-field patches for a convolution they fit (cheaper to build and to
    bound: a row has one kernel's entries), else the dense matrix."""
    if patches.eligible([A]):
        rows = patches.conv_jacobian([A], [])
        if rows.foldable:
            return rows
    return matrix_transpose(A, x.device, x.dtype).t().unsqueeze(0)


class Frontier:
    """Algorithm 1's forward state at the output of affine ``layer`` (ẑ_s), in row layout.

    ``h`` (B, n_s): the linearised network run on the region's centre (biases included).
    ``F`` (B|1, n_s, n_0): ∂ẑ_s/∂x' through the fixed D's (``A_1`` alone is shared by the batch).
    ``G[j]`` (B, n_s, q_j) and ``lI[j]`` (B, q_j): for ReLU layer j < s, the response to ``d_q e_q`` of
    each unstable unit q (padded to the batch maximum, l = 0 on padding) and its lower bound.

    With ``proj=k`` (random projections), a block with more than k columns — the input identity when
    n_0 > k, a ReLU layer's unstable units when some example has more than k — is not kept; its share of
    every row's radius is estimated instead. Since ``Σ_q l_q [a_q]₊ = ½ Σ_q l_q a_q − ½ ‖l ⊙ a‖₁`` (l < 0),
    a row's radius ``Σ rad |F_j| + Σ_layers ½ ‖(lI ⊙ G)_j‖₁`` (rad = ε for a plain ball) is the ℓ1 norm of
    one row of the concatenation ``[rad ⊙ F, ½ lI ⊙ G_1, …]`` of the projected blocks:
    ``S`` (B|1, k, n_s) holds k combinations of those columns with i.i.d. standard Cauchy weights, as k
    images (pushed through convolutions without transposes), and :func:`l1_estimate` over k estimates
    every row's norm; ``shift`` (B, n_s) is the linear half ``−½ Σ G lI``, pushed as one column;
    ``S2`` (B|1, k, n_s) sketches an L2 ball's input term ``ε‖F_j‖₂`` with Gaussian weights
    (:func:`l2_estimate`); ``scale`` (B, 1): a plain ball's ε, not yet applied to the input sketch shared
    by the batch (folded into the slopes at the first advance).
    """

    def __init__(self, network: Network, region: Region, proj=None, generator=None):
        A = network.affines[0]
        n0, B = network.input_size, region.batch_size
        self.network, self.region, self.layer = network, region, 0
        self.proj, self.generator = proj, generator
        x = region.x
        self.h = A.forward(region.center).reshape(B, -1)
        self.F = self.S = self.S2 = self.shift = self.scale = None
        if proj is None or proj >= n0:
            self.F = first_columns(A, x)                                       # (1, n_1, n0): A_1·I
        else:  # S (L∞) or S2 (L2): A_1 applied to k random combinations of the input coordinates
            sketch = sketch_input(region, n0, proj, generator)
            S = A.linear(sketch.R.reshape(-1, *network.input_shape)).reshape(-1, proj, A.out_features)
            self.scale = None if sketch.scale is None else sketch.scale.reshape(B, 1)
            self.S, self.S2 = (S, None) if sketch.kind == "cauchy" else (None, S)
        self.G, self.lI, self.slopes = [], [], []

    def _sketched(self, omega=None):
        """Estimated radius of every row, (B, n_s), or of the rows ``omega`` (B, m, n_s), (B, m); 0 if none."""
        dev = 0.0
        for M, estimate in ((self.S, l1_estimate), (self.S2, l2_estimate)):
            if M is not None:
                dev = dev + (estimate(M, 1) if omega is None else estimate(torch.matmul(omega, M.transpose(1, 2))))
        return dev if self.scale is None else dev * self.scale

    @property
    def estimated(self) -> bool:
        """Whether some term is estimated from random projections (the bounds are then not sound)."""
        return self.S is not None or self.S2 is not None

    @property
    def jumpable(self) -> bool:
        """Whether the final objective may jump through this frontier (only without estimated terms)."""
        return not self.estimated

    @property
    def columns(self) -> int:
        """Columns held per example (exact, sketched and unstable units)."""
        exact = 0 if self.F is None else self.F.shape[2]
        sketched = sum(M.shape[1] for M in (self.S, self.S2) if M is not None)
        return exact + sketched + sum(g.shape[2] for g in self.G)

    @property
    def width(self) -> int:
        """n_s, the width of the current layer."""
        return self.h.shape[1]

    def advance_cost(self) -> int:
        """Multiply-adds per example of :meth:`advance`."""
        A = self.network.affines[self.layer + 1]
        convs = self.network.affines[: self.layer + 2]
        by_patches = patches.cost(convs) if self.F is not None else 0
        if by_patches:
            return by_patches + (self.columns - self.F.shape[2]) * A.cost
        return self.columns * A.cost

    def bounds(self):
        """(l, u) of the current layer's pre-activations, each (B, n_s)."""
        mid = self.h if self.shift is None else self.h + self.shift
        dev = self._sketched()                                                  # (B, n_s), or 0
        F = self.F
        if F is not None:
            dev = dev + (F.deviation(self.region) if isinstance(F, patches.PatchRows) else self.region.deviation(F))
        lower, upper = mid - dev, mid + dev
        for G, lI in zip(self.G, self.lI):
            lo, up = relu_terms(G, lI)
            lower, upper = lower + lo, upper - up
        return lower, upper

    def jump(self, omega):
        """The dual terms of the layers at and below the frontier for rows ``omega`` (B, m, n_s).

        Returns (linear, deviation, relu term for the rows, relu term for the negated rows), each (B, m).
        """
        mid = self.h if self.shift is None else self.h + self.shift
        lin = (omega * mid.unsqueeze(1)).sum(2)                                 # Σ ν^T b + ν̂_1ᵀ x
        dev = self._sketched(omega)
        F = self.F
        if isinstance(F, patches.PatchRows):
            dev = dev + self.region.deviation(F.left_multiply(omega))           # ν̂_1: (B, m, n0)
        elif F is not None:
            dev = dev + self.region.deviation(torch.matmul(omega, F))           # ν̂_1: (B, m, n0)
        lo, up = torch.zeros_like(lin), torch.zeros_like(lin)
        for G, lI in zip(self.G, self.lI):
            terms = relu_terms(torch.matmul(omega, G), lI)                      # ν at the unstable units: (B, m, q)
            lo, up = lo + terms[0], up + terms[1]
        return lin, dev, lo, up

    def advance(self, l, u):
        """Apply D (from the current layer's l, u) and the next affine layer to every column."""
        self.layer += 1
        A = self.network.affines[self.layer]
        B = self.h.shape[0]
        l = l.reshape(B, -1)
        d, unstable = relu_slopes(l, u.reshape(B, -1))
        self.slopes.append(d)
        self.h = A.forward((d * self.h).reshape(B, *A.in_shape)).reshape(B, -1)
        convs = self.network.affines[: self.layer + 1]
        if self.F is not None and patches.cost(convs):
            self.F = patches.conv_jacobian(convs, [s.reshape(B, *c.out_shape) for s, c in zip(self.slopes, convs)])
        elif self.F is not None:
            self.F = push(A, d, self.F)
        self.G = [push(A, d, G) for G in self.G]
        # new columns: A(d_q e_q) for each unstable unit q of this layer, padded to the batch maximum
        q_max = max_unstable(unstable)
        projected = self.proj is not None and q_max > self.proj
        if self.estimated or projected:
            self._advance_sketches(A, d, sketch_relu(d, unstable, l, self.proj, self.generator) if projected else None)
        if q_max > 0 and not projected:
            units = unstable_units(d, unstable, l)
            self.lI.append(units.l)
            self.G.append(unit_columns(A, units.order, B * q_max) * units.d.unsqueeze(1))

    def _advance_sketches(self, A, d, relu=None):
        """Push the sketches and ``shift`` through D and A. With ``relu`` = (w, R) from :func:`sketch_relu`
        (w (B, n) = ½ l_q d_q on this layer's unstable units, 0 elsewhere), first fold those units in (see
        the class docstring): k Cauchy combinations ``w ⊙ R`` into ``S`` and ``−w`` into ``shift``."""
        B, k = d.shape[0], self.proj
        if self.scale is not None:
            d, self.scale = d * self.scale, None
        S, S2 = (None if M is None else d.unsqueeze(1) * M for M in (self.S, self.S2))  # (B, k, n)
        shift = None if self.shift is None else d * self.shift
        if relu is not None:
            w, R = relu
            S = w.unsqueeze(1) * R if S is None else torch.addcmul(S, w.unsqueeze(1), R)
            shift = -w if shift is None else shift - w
        self.S, self.S2 = (None if M is None else A.linear(M.reshape(B * k, *A.in_shape)).reshape(B, k, -1)
                           for M in (S, S2))
        self.shift = None if shift is None else A.linear(shift.reshape(B, *A.in_shape)).reshape(B, -1)


__all__ = ["Frontier"]

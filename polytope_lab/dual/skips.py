"""Algorithm 1's forward columns for networks with skip connections.

A sequential network needs only the columns at the current layer (``frontier.Frontier``). With skips, the
pre-activations of affine i read every earlier ``z_j``:
``ẑ_{i+1} = A_i(z_i) + Σ_j S_ij(z_j)``. So the linearised network's state is kept for every ``z_j``,
post-ReLU (``D_j`` applied): the centre image ``h``, the input columns ``F`` and, per earlier ReLU layer k,
its unstable units' columns. At ``z_{k+1}`` the new units of ReLU layer k are held as a selector
(unit indices, slopes) and become columns only through the operators that read them, which avoids an
(n × q) one-hot block.

With ``proj=k`` the blocks of more than k columns are sketched as in ``frontier.Frontier`` (same estimator,
same draws): every state then also holds ``S`` (B|1, n_j, k), the Cauchy combinations of the projected
blocks (the radius-weighted input columns, ``½ l_q d_q e_q`` for a projected ReLU layer), and ``S2``, an
L2 ball's Gaussian input sketch. The sketches are linear in the columns, so one ``S`` per state carries
every projected block through the skips; a projected layer's linear half ``−½ Σ_q l_q d_q e_q`` is folded
into ``h``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import columns
from .projections import l1_estimate, l2_estimate, sketch_input, sketch_relu
from .relu import max_unstable, relu_slopes, relu_terms, unstable_units
from ..network import Network
from ..regions import Region


class _State(NamedTuple):
    """The linearised network at one layer: centre image, exact input columns (None when sketched),
    exact blocks of unstable units by ReLU layer, Cauchy and Gaussian sketches (None when absent)."""
    h: torch.Tensor
    F: Optional[torch.Tensor]
    blocks: dict
    S: Optional[torch.Tensor]
    S2: Optional[torch.Tensor]


def _apply(op, block, B):
    """``op``'s linear part on a block of columns at its input: a tensor (B|1, n_in, c), or a selector
    (order (B, q), dI (B, q)) standing for the columns ``d_q e_q``; returns (B|1, n_out, c)."""
    if isinstance(block, tuple):
        order, dI = block
        return columns.unit_columns(op, order, B * order.shape[1]) * dI.unsqueeze(1)
    return columns.apply(op, block)


def _add(total, term):
    return term if total is None else total + term


class SkipFrontier:
    """Forward columns of the linearised network (fixed α) through a network with skip terms.

    ``states[j]`` (a :class:`_State`) at ``z_j`` (post-ReLU; ``z_0`` the input), dropped (None) once no
    later affine reads ``z_j``; ``pre`` the same at the output of affine ``layer``; ``lI[k]`` (B, q_k) the
    lower bounds of ReLU layer k's exact unstable units (0 on padding). ``proj``/``generator``: random
    projections (see the module docstring); ``scale`` (B, 1, 1) a plain ball's ε, applied to the input
    sketch (shared by the batch) wherever an affine reads it.
    """

    jumpable = False  # the final objective runs to the input, through the skips

    def __init__(self, network: Network, region: Region, proj=None, generator=None):
        self.network, self.region, self.layer = network, region, 0
        self.proj, self.generator, self.scale = proj, generator, None
        B, n0, x = region.batch_size, network.input_size, region.x
        F = S = S2 = None
        if proj is None or proj >= n0:
            F = torch.eye(n0, device=x.device, dtype=x.dtype).unsqueeze(0)              # (1, n0, n0)
        else:  # k random combinations of the input coordinates as columns (B|1, n0, k)
            sketch = sketch_input(region, n0, proj, generator)
            R = sketch.R.transpose(1, 2)
            S, S2 = (R, None) if sketch.kind == "cauchy" else (None, R)
            self.scale = None if sketch.scale is None else sketch.scale.reshape(B, 1, 1)
        self.estimated = F is None
        self.states = [_State(region.center.reshape(B, -1), F, {}, S, S2)]
        self.lI = {}
        self.last_read = {}  # j: the last affine that reads z_j
        for i in range(len(network.affines)):
            for j in [i] + [j for j, _ in network.skips_into(i)]:
                self.last_read[j] = i
        self.pre = self._affine(0)

    def _affine(self, i):
        """The state at the output of affine i: its main term on z_i plus its skip terms."""
        B = self.region.batch_size
        h, F, blocks, S, S2 = 0, None, {}, None, None
        for j, op in [(i, self.network.affines[i])] + self.network.skips_into(i):
            st = self.states[j]
            h = h + op.forward(st.h.reshape(B, *op.in_shape)).reshape(B, -1)           # biases included
            if st.F is not None:
                F = _add(F, _apply(op, st.F, B))
            for k, block in st.blocks.items():
                blocks[k] = blocks.get(k, 0) + _apply(op, block, B)
            scale = self.scale if j == 0 else None
            sketches = [None if M is None else _apply(op, M, B) for M in (st.S, st.S2)]
            S, S2 = (total if M is None else _add(total, M if scale is None else M * scale)
                     for total, M in zip((S, S2), sketches))
        return _State(h, F, blocks, S, S2)

    def bounds(self):
        """(l, u) of the current layer's pre-activations, each (B, n_s)."""
        h, F, blocks, S, S2 = self.pre
        dev = 0.0 if F is None else self.region.deviation(F)
        if S is not None:
            dev = dev + l1_estimate(S, 2)
        if S2 is not None:
            dev = dev + l2_estimate(S2, 2)
        lower, upper = h - dev, h + dev
        for k, G in blocks.items():
            lo, up = relu_terms(G, self.lI[k])
            lower, upper = lower + lo, upper - up
        return lower, upper

    def advance(self, l, u):
        """Apply D_s (from this layer's l, u), keep the state at z_{s+1}, and move to affine s + 1."""
        B = self.region.batch_size
        h, F, blocks, S, S2 = self.pre
        l, u = l.reshape(B, -1), u.reshape(B, -1)
        d, unstable = relu_slopes(l, u)                                                # (B, n_s)
        D = d.unsqueeze(2)
        post = {k: D * G for k, G in blocks.items()}
        h, F, S, S2 = d * h, None if F is None else D * F, None if S is None else D * S, None if S2 is None else D * S2
        q_max = max_unstable(unstable)
        if self.proj is not None and q_max > self.proj:   # sketch: k Cauchy combinations of w_q e_q
            w, R = sketch_relu(d, unstable, l, self.proj, self.generator)              # (B, n_s), (1, k, n_s)
            S = _add(S, w.unsqueeze(2) * R.transpose(1, 2))
            h = h - w
            self.estimated = True
        elif q_max:
            units = unstable_units(d, unstable, l)
            post[self.layer] = (units.order, units.d)
            self.lI[self.layer] = units.l
        self.states.append(_State(h, F, post, S, S2))
        self.layer += 1
        self.pre = self._affine(self.layer)
        for j in range(self.layer + 1):
            if self.last_read[j] <= self.layer:
                self.states[j] = None

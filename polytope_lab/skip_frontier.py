"""Algorithm 1's forward columns for networks with skip connections.

A sequential network needs only the columns at the current layer (``dual._Frontier``). With skips, the
pre-activations of affine i read every earlier ``z_j``:
``ẑ_{i+1} = A_i(z_i) + Σ_j S_ij(z_j)``. So the linearised network's state is kept for every ``z_j``,
post-ReLU (``D_j`` applied): the centre image ``h``, the input columns ``F`` and, per earlier ReLU layer k,
its unstable units' columns. At ``z_{k+1}`` the new units of ReLU layer k are held as a selector
(unit indices, slopes) and become columns only through the operators that read them, which avoids an
(n × q) one-hot block.
"""
from __future__ import annotations

import torch

from .dual import _columns, relu_slopes
from .network import LinearOp, Network
from .regions import Region


def _apply(op, block, B):
    """``op``'s linear part on a block of columns at its input: a tensor (B|1, n_in, c), or a selector
    (order (B, q), dI (B, q)) standing for the columns ``d_q e_q``; returns (B|1, n_out, c)."""
    if isinstance(block, tuple):
        order, dI = block
        return _columns(op, order, B * order.shape[1]) * dI.unsqueeze(1)
    if isinstance(op, LinearOp):
        return torch.matmul(op.weight, block)
    Bm, _, c = block.shape
    return op.linear(block.transpose(1, 2).reshape(Bm * c, *op.in_shape)).reshape(Bm, c, -1).transpose(1, 2)


class SkipFrontier:
    """Forward columns of the linearised network (fixed α) through a network with skip terms.

    ``states[j]`` = (h (B, n_j), F (B|1, n_j, n0), {k: block}) at ``z_j`` (post-ReLU; ``z_0`` the input),
    dropped (None) once no later affine reads ``z_j``; ``pre`` the same triple at the output of affine
    ``layer``; ``lI[k]`` (B, q_k) the lower bounds of ReLU layer k's unstable units (0 on padding).
    """

    def __init__(self, network: Network, region: Region):
        self.network, self.region, self.layer = network, region, 0
        B, n0, x = region.batch_size, network.input_size, region.x
        eye = torch.eye(n0, device=x.device, dtype=x.dtype).unsqueeze(0)               # (1, n0, n0)
        self.states = [(region.center.reshape(B, -1), eye, {})]
        self.lI = {}
        self.last_read = {}  # j: the last affine that reads z_j
        for i in range(len(network.affines)):
            for j in [i] + [j for j, _ in network.skips_into(i)]:
                self.last_read[j] = i
        self.pre = self._affine(0)

    def _affine(self, i):
        """(h, F, blocks) at the output of affine i: its main term on z_i plus its skip terms."""
        B = self.region.batch_size
        h, F, blocks = 0, 0, {}
        for j, op in [(i, self.network.affines[i])] + self.network.skips_into(i):
            hj, Fj, Gj = self.states[j]
            h = h + op.forward(hj.reshape(B, *op.in_shape)).reshape(B, -1)             # biases included
            F = F + _apply(op, Fj, B)
            for k, block in Gj.items():
                blocks[k] = blocks.get(k, 0) + _apply(op, block, B)
        return h, F, blocks

    def bounds(self):
        """(l, u) of the current layer's pre-activations, each (B, n_s)."""
        h, F, blocks = self.pre
        dev = self.region.deviation(F)
        lower, upper = h - dev, h + dev
        for k, G in blocks.items():
            lI = self.lI[k].unsqueeze(1)
            lower = lower + (lI * (-G).clamp(min=0)).sum(2)
            upper = upper - (lI * G.clamp(min=0)).sum(2)
        return lower, upper

    def advance(self, l, u):
        """Apply D_s (from this layer's l, u), keep the state at z_{s+1}, and move to affine s + 1."""
        B = self.region.batch_size
        h, F, blocks = self.pre
        l, u = l.reshape(B, -1), u.reshape(B, -1)
        d, unstable = relu_slopes(l, u)                                                # (B, n_s)
        post = {k: d.unsqueeze(2) * G for k, G in blocks.items()}
        counts = unstable.sum(1)
        q_max = int(counts.max()) if B else 0
        if q_max:
            order = torch.argsort(unstable.to(torch.int8), dim=1, descending=True, stable=True)[:, :q_max]
            valid = torch.arange(q_max, device=d.device)[None, :] < counts[:, None]   # (B, q_max)
            post[self.layer] = (order, torch.gather(d, 1, order) * valid)
            self.lI[self.layer] = torch.gather(l, 1, order) * valid
        self.states.append((d * h, d.unsqueeze(2) * F, post))
        self.layer += 1
        self.pre = self._affine(self.layer)
        for j in range(self.layer + 1):
            if self.last_read[j] <= self.layer:
                self.states[j] = None

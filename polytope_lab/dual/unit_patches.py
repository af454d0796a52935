"""Backward rows ``±e_j`` of a convolution layer's units kept as receptive-field patches ("patches mode").

A row ``e_j`` at the output of conv i (unit (c, y, x)) is, on conv i's input, the kernel ``W_i[c]`` on the
window at ``(y s_i − p_i, x s_i − p_i)``. Each dual step below keeps it inside the unit's receptive field:
the ReLU step ``ω = α[ω̂]₊ + d[ω̂]₋`` (on I; ``d ω̂`` elsewhere) is elementwise on the window, and
``ν̂ = Wᵀν`` (eq. 22) of a K×K patch is its ``conv_transpose2d`` (no padding), the (K−1)s + k window one
layer down. J (eq. 23) is summed over the windows. Per row this costs the patches' size times the kernel,
not a dense transposed convolution of the whole layer, and α lives on the windows only: on the bench
ConvNet a conv-2 row touches 256 of the 3136 layer-1 units and 100 of the 784 inputs. The bound is the
one :func:`~.backward.backward` gives for the same α (the same formula, tested to rounding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .patches import MAX_TRANSFER, eligible, receptive_fields, transfer_matrix, unfold_windows
from .relu import adaptive_slopes, lower_slope_step, relu_slopes
from ..network import Network
from ..regions import Box, L2Ball, Region


def patch_chain(network: Network, region: Region, top: int) -> bool:
    """Whether the rows of layer ``top`` can run as patches: affines 0 … top a chain of eligible
    convolutions (square kernels and inputs, dilation 1), no skip connections, a box or L2-ball region."""
    convs = network.affines[:top + 1]
    return (top >= 1 and not network.has_skips and isinstance(region, (Box, L2Ball)) and eligible(convs))


def patch_floats(network: Network, top: int) -> int:
    """Floats of one row's patches on the layers below ``top`` and on the input (memory and work per row)."""
    convs = network.affines[:top + 1]
    fields = receptive_fields(convs)
    return sum(conv.in_shape[0] * k * k for conv, (k, _, _) in zip(reversed(convs), fields))


class UnitPatches:
    """The rows ``+e_j`` for the units ``order`` (B, q) of conv layer ``top``, then ``−e_j`` for the same
    units (m = 2q rows), with the ReLU data of every layer below gathered on each row's window.

    α, per ReLU layer j < top (bottom up, as ``bounds``): (B, m, C_j·K_j·K_j) on row windows;
    :attr:`fixed` is Algorithm 1's α = d, :attr:`adaptive` CROWN's. Window entries outside a layer's grid
    have d = 0 and are not in I, so they add nothing.
    """

    def __init__(self, network: Network, region: Region, bounds: list, top: int, order: torch.Tensor):
        self.network, self.region, self.top = network, region, top
        convs = network.affines[:top + 1]
        self.fields = receptive_fields(convs)               # fields[t]: window on the input of affine top − t
        c_top, oh, ow = convs[-1].out_shape
        self.grid = (oh, ow)
        channel, loc = order // (oh * ow), order % (oh * ow)
        B, q = order.shape
        self.channel, self.loc = torch.cat([channel, channel], 1), torch.cat([loc, loc], 1)      # (B, m)
        self.sign = torch.cat([torch.ones_like(order), -torch.ones_like(order)], 1).to(region.x.dtype)
        self.layers, self.fixed, self.adaptive = [], [], []
        for t in range(top):                                  # ReLU layer j = top − 1 − t, top down
            j = top - 1 - t
            l, u = bounds[j]
            d, unstable = relu_slopes(l, u)
            d, mask = self.gather(d, t), self.gather(unstable.to(l.dtype), t)
            ld = self.gather(torch.where(unstable, l, torch.zeros_like(l)), t) * d
            conv, k = convs[j], self.fields[t][0]
            bias = conv.channel_bias.detach().repeat_interleave(k * k)                 # (C_j·K·K,)
            size = conv.out_shape[0] * k * k * conv.in_shape[0] * self.fields[t + 1][0] ** 2
            transfer = transfer_matrix(conv, k).detach() if size <= MAX_TRANSFER else None
            self.layers.append((j, d, mask, ld, bias, transfer))
            self.fixed.insert(0, d)
            self.adaptive.insert(0, self.gather(adaptive_slopes(l, u), t))
        weight = convs[-1].weight.detach().reshape(c_top, -1)
        self.J0 = self.sign * convs[-1].channel_bias.detach()[self.channel]             # ν_{top+1}ᵀ b_top
        self.omega_hat0 = self.sign.unsqueeze(2) * weight[self.channel]                 # W_topᵀ e_j on its window
        self.center = self.gather(region.center, top)

    def gather(self, t: torch.Tensor, stage: int) -> torch.Tensor:
        """``t`` (B, *shape) read through every row's window of ``stage``: (B, m, C·K·K), zero outside."""
        k, s, p = self.fields[stage]
        B = t.shape[0]
        shape = self.network.affines[self.top - stage].in_shape
        windows = unfold_windows(t.reshape(B, *shape), k, s, p, self.grid)           # (B, L, C·K·K)
        return torch.gather(windows, 1, self.loc.unsqueeze(2).expand(-1, -1, windows.shape[2]))

    def lower(self, alpha: list) -> torch.Tensor:
        """J (B, m) of the rows for lower slopes ``alpha`` (one tensor per ReLU layer below ``top``).

        On I, ``[−ω]₊ = d[−ω̂]₊`` whatever α ∈ [0, 1], so the ReLU terms ``Σ_I l [ν]₊`` are ``−Σ l d [ω̂]₋``."""
        B, m = self.channel.shape
        J, omega_hat = self.J0, self.omega_hat0
        for t, (j, d, unstable, ld, bias, transfer) in enumerate(self.layers):
            J = J - (ld * omega_hat.clamp(max=0)).sum(-1)                              # Σ_I l [ν]₊
            omega = lower_slope_step(omega_hat, alpha[j], d, unstable)
            J = J + omega @ bias                                                        # ν_{j+1}ᵀ b_j
            if transfer is not None:                                                    # ν̂_j = W_jᵀ ν_{j+1}
                omega_hat = omega @ transfer
            else:
                conv, k = self.network.affines[j], self.fields[t][0]
                back = F.conv_transpose2d(omega.reshape(B * m, conv.out_shape[0], k, k), conv.weight.detach(),
                                          stride=conv.stride)
                omega_hat = back.reshape(B, m, -1)
        return J + (omega_hat * self.center).sum(-1) - self.deviation(omega_hat)

    def deviation(self, omega_hat: torch.Tensor) -> torch.Tensor:
        """The region's dual norm of ω̂_1 on the input windows (eq. 23's ε‖ν̂_1‖), (B, m)."""
        region = self.region
        if isinstance(region, L2Ball):
            inside = self.gather(region.x.new_ones(region.x.shape), self.top)
            return region.eps[:, None] * (omega_hat.square() * inside).sum(-1).sqrt()
        return (omega_hat.abs() * self.gather(region.radius, self.top)).sum(-1)


__all__ = ["UnitPatches", "patch_chain", "patch_floats"]

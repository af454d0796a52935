"""Jacobians of convolution chains through their receptive fields ("patches").

A row of ``W_i D_{i-1} W_{i-1} … D_1 W_1`` for a chain of convolutions is non-zero only on the unit's
receptive field. Building each row as a small patch — kernel, times the unfolded ``D`` at that place,
mapped down one convolution at a time by a fixed patch-to-patch matrix — costs
``n_i · Σ |patch_j|·|patch_{j−1}|`` instead of ``n_0 · cost(W_i)`` for pushing every input column
through a dense convolution. Used by the dual network to build its forward state (Algorithm 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..network import Conv2dOp, numel
from ..regions import Box, L2Ball, Region

MAX_TRANSFER = 2 ** 24  # entries of a patch-to-patch matrix before we stop using patches


def receptive_fields(convs):
    """(kernel, stride, padding) of the receptive field on each layer below the top, top-down."""
    top = convs[-1]
    k, s, p = top.weight.shape[2], top.stride[0], top.padding[0]
    stages = [(k, s, p)]
    for conv in reversed(convs[:-1]):
        kj, sj, pj = conv.weight.shape[2], conv.stride[0], conv.padding[0]
        k, p, s = (k - 1) * sj + kj, p * sj + pj, s * sj
        stages.append((k, s, p))
    return stages  # stages[t]: receptive field of a top unit on the input of convs[-1-t]


def eligible(convs) -> bool:
    """Whether the chain is square convolutions with dilation 1 (what the patch arithmetic assumes)."""
    for c in convs:
        if not isinstance(c, Conv2dOp):
            return False
        kh, kw = c.weight.shape[2:]
        if kh != kw or c.stride[0] != c.stride[1] or c.padding[0] != c.padding[1] or c.dilation != (1, 1):
            return False
        if c.in_shape[1] != c.in_shape[2]:
            return False
    return True


def cost(convs) -> int:
    """Multiply-adds per example of :func:`conv_jacobian` (0 if not eligible or too large)."""
    if len(convs) < 2 or not eligible(convs):
        return 0
    stages = receptive_fields(convs)
    total = 0
    for t, conv in enumerate(reversed(convs[:-1])):
        k_in, k_out = stages[t][0], stages[t + 1][0]
        size = conv.out_shape[0] * k_in ** 2 * conv.in_shape[0] * k_out ** 2
        if size > MAX_TRANSFER:
            return 0
        total += size
    return total * convs[-1].out_features


def transfer_matrix(conv: Conv2dOp, k_in: int) -> torch.Tensor:
    """Matrix mapping a patch (C_out, k_in, k_in) on conv's output to its image on conv's input."""
    c_out = conv.out_shape[0]
    n = c_out * k_in * k_in
    eye = torch.eye(n, device=conv.weight.device, dtype=conv.weight.dtype).reshape(n, c_out, k_in, k_in)
    return F.conv_transpose2d(eye, conv.weight, stride=conv.stride).reshape(n, -1)


def unfold_windows(t: torch.Tensor, k: int, s: int, p: int, out_hw) -> torch.Tensor:
    """Patches of ``t`` (B, C, H, W) for a top grid of size out_hw: (B, oh*ow, C*k*k), zero outside."""
    B, C, H, W = t.shape
    oh, ow = out_hw
    pad_hi_h = max(0, (oh - 1) * s + k - p - H)
    pad_hi_w = max(0, (ow - 1) * s + k - p - W)
    t = F.pad(t, (p, pad_hi_w, p, pad_hi_h))
    cols = F.unfold(t, k, stride=s)                                     # (B, C*k*k, L')
    gh = (t.shape[2] - k) // s + 1
    gw = (t.shape[3] - k) // s + 1
    cols = cols.reshape(B, C * k * k, gh, gw)[:, :, :oh, :ow]
    return cols.reshape(B, C * k * k, oh * ow).transpose(1, 2)


class PatchRows:
    """Rows of a conv-chain Jacobian (B, n_top, n_0) kept as receptive-field patches.

    ``P`` (B, c_top, L, C0·K·K): row (c, loc) restricted to the K×K window at ``loc·S − pad`` of the
    input; entries falling outside the input are kept in ``P`` and dropped by every method.
    """

    def __init__(self, P, in_shape, k, s, p, out_hw):
        self.P, self.in_shape, self.k, self.s, self.p, self.out_hw = P, tuple(in_shape), k, s, p, tuple(out_hw)
        self.shape = (P.shape[0], P.shape[1] * P.shape[2], numel(in_shape))

    def window(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (B|1, *in_shape) read through every row's window: (B|1, 1, L, C0·K·K), zero outside."""
        return unfold_windows(t, self.k, self.s, self.p, self.out_hw).unsqueeze(1)

    def deviation(self, region: Region) -> torch.Tensor:
        """``region.deviation`` of every row, (B, n_top)."""
        B = region.batch_size
        if isinstance(region, L2Ball):
            inside = self.window(region.x.new_ones(1, *self.in_shape))
            return region.eps[:, None] * (self.P.square() * inside).sum(-1).sqrt().flatten(1)
        if not isinstance(region, Box):
            return region.deviation(self.dense())
        if region.cubic:
            inside = self.window(region.x.new_ones(1, *self.in_shape))
            return region.eps[:, None] * (self.P.abs() * inside).sum(-1).flatten(1)
        return (self.P.abs() * self.window(region.radius)).sum(-1).reshape(B, -1)

    def left_multiply(self, M: torch.Tensor) -> torch.Tensor:
        """``M @ rows`` for M (B, m, n_top): (B, m, n_0), one small product per window, then summed
        into the input by ``fold`` (which drops what falls outside); through :meth:`dense` when ``fold``
        would see another grid of windows (not :attr:`foldable`)."""
        if not self.foldable:
            return torch.matmul(M, self.dense())
        B, m = M.shape[:2]
        c_top, L, kk = self.P.shape[1:]
        C0, H, W = self.in_shape
        per_loc = torch.matmul(M.reshape(B, m, c_top, L).permute(0, 3, 1, 2), self.P.transpose(1, 2))  # (B, L, m, kk)
        cols = per_loc.permute(0, 2, 3, 1).reshape(B * m, kk, L)
        out = F.fold(cols, (H, W), self.k, stride=self.s, padding=self.p)
        return out.reshape(B, m, -1)

    def dense(self) -> torch.Tensor:
        """The rows as a dense (B, n_top, n_0) tensor."""
        B, c_top, L, kk = self.P.shape
        idx = _scatter_index(self.in_shape, self.k, self.s, self.p, self.out_hw, self.P.device)
        out = self.P.new_zeros(B, c_top, L, self.shape[2] + 1)
        out.scatter_(3, idx.expand(B, c_top, *idx.shape), self.P)
        return out[..., :-1].reshape(B, c_top * L, -1)

    @property
    def foldable(self) -> bool:
        """Whether ``fold`` sees exactly our grid of windows (else ``left_multiply`` goes through ``dense``)."""
        H, W = self.in_shape[1:]
        grid = ((H + 2 * self.p - self.k) // self.s + 1, (W + 2 * self.p - self.k) // self.s + 1)
        return grid == self.out_hw


def _scatter_index(shape_in, k, s, p, out_hw, device):
    """Flat input index of every patch entry (oh*ow, C*k*k); out-of-range entries point past the end."""
    C, H, W = shape_in
    oh, ow = out_hw
    oy = torch.arange(oh, device=device) * s - p
    ox = torch.arange(ow, device=device) * s - p
    a = torch.arange(k, device=device)
    yy = oy[:, None, None, None, None] + a[None, None, None, :, None]          # (oh,1,1,k,1)
    xx = ox[None, :, None, None, None] + a[None, None, None, None, :]          # (1,ow,1,1,k)
    cc = torch.arange(C, device=device)[None, None, :, None, None]
    inside = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
    idx = cc * H * W + yy * W + xx
    idx = torch.where(inside, idx, torch.full_like(idx, C * H * W))
    return idx.expand(oh, ow, C, k, k).reshape(oh * ow, C * k * k)


def conv_jacobian(convs, slopes) -> PatchRows:
    """``W_i D_{i−1} … D_1 W_1`` (B, n_i, n_0) as patches, for Conv2dOps ``convs`` and ReLU slopes ``slopes``.

    ``slopes[j]``: (B, *convs[j].out_shape), the diagonal of D after convs[j], for j < len(convs) − 1.
    One convolution alone gives its own matrix, shared by the batch (B = 1).
    """
    top = convs[-1]
    c_top, oh, ow = top.out_shape
    stages = receptive_fields(convs)
    # rows as patches on the top conv's input: the kernel at every position          # (1, c_top, L, C*k*k)
    P = top.weight.reshape(1, c_top, 1, -1).expand(1, c_top, oh * ow, -1)
    for t, conv in enumerate(reversed(convs[:-1])):
        k, s, p = stages[t]
        D = unfold_windows(slopes[len(convs) - 2 - t], k, s, p, (oh, ow))                 # (B, L, C*k*k)
        P = P * D.unsqueeze(1)                                                      # (B, c_top, L, C*k*k)
        P = P @ transfer_matrix(conv, k)                                                  # (B, c_top, L, C'*k'*k')
    k, s, p = stages[-1]
    return PatchRows(P, convs[0].in_shape, k, s, p, (oh, ow))

"""Network normal form: affine operators with a ReLU between each consecutive pair, plus skip terms.

``Network.affines = [A_1, ..., A_{k-1}]`` is the paper's ``W_i, b_i``:
``ẑ_{i+1} = A_i(z_i)``, ``z_{i+1} = ReLU(ẑ_{i+1})`` for every affine but the last, whose output is
``f(x)``. With skip connections (Wong et al. 2018b's dense form) an affine may also read earlier
layers: ``ẑ_{i+1} = A_i(z_i) + Σ_j S_ij(z_j)`` over ``Network.skips[i] = [(j, S_ij), ...]``, j < i, where
``z_0`` is the input (so a residual block is a skip term of identity). Backends see only this form
(never ``nn.Module`` classes; :mod:`polytope_lab.convert` builds this form from PyTorch models). Operators
keep references to the model's parameters, so bounds stay differentiable with respect to them; the model
is never modified.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from .sparse_conv import conv_matrix


def numel(shape) -> int:
    """Number of entries of a tensor of ``shape`` (1 for ``()``)."""
    return math.prod(int(s) for s in shape)


class Affine(ABC):
    """An affine map ``x -> W x + b`` from ``in_shape`` to ``out_shape`` (shapes without batch).

    The extension protocol (docs/extending.md): a new layer implements ``linear`` (the dual's "affine"
    role), its adjoint ``transpose`` ("affine transpose", which the dual network runs backwards), ``bias``
    (its share of the objective, ``ν_{i+1}ᵀ b``) and ``to``; ``as_matrix`` (for the LP and MILP),
    ``interval`` and ``cost`` have generic defaults built from ``linear``, worth overriding for speed.
    """

    in_shape: tuple
    out_shape: tuple

    @property
    def in_features(self) -> int:
        return numel(self.in_shape)

    @property
    def out_features(self) -> int:
        return numel(self.out_shape)

    @abstractmethod
    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``W x`` for ``x`` of shape (N, *in_shape) -> (N, *out_shape)."""

    @abstractmethod
    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        """Adjoint ``Wᵀ y`` for ``y`` of shape (N, *out_shape) -> (N, *in_shape)."""

    @abstractmethod
    def bias(self) -> torch.Tensor:
        """The full bias ``b`` with shape ``out_shape``."""

    @abstractmethod
    def to(self, device=None, dtype=None) -> "Affine":
        """A copy on ``device``/``dtype`` (the copy stays differentiable w.r.t. the original)."""

    def interval(self, center: torch.Tensor, radius: torch.Tensor):
        """Image of the box ``center ± radius`` as (center, radius): ``(W c + b, |W| r)``.
        Default: ``|W|`` from :meth:`as_matrix` (no gradient through the radius)."""
        W = torch.as_tensor(abs(self.as_matrix()).toarray(), dtype=radius.dtype, device=radius.device)
        r = radius.reshape(radius.shape[0], -1) @ W.t()
        return self.forward(center), r.reshape(radius.shape[0], *self.out_shape)

    def as_matrix(self) -> sp.csr_matrix:
        """``W`` as a scipy sparse matrix of shape (out_features, in_features), float64. Default: ``linear``
        (in float64, without gradient) applied to the basis vectors, 1024 at a time."""
        n_in = self.in_features
        op = self.to(device="cpu", dtype=torch.float64)
        blocks = []
        with torch.no_grad():
            for start in range(0, n_in, 1024):
                stop = min(n_in, start + 1024)
                eye = torch.zeros(stop - start, n_in, dtype=torch.float64)
                eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
                cols = op.linear(eye.reshape(stop - start, *self.in_shape)).reshape(stop - start, -1)
                blocks.append(sp.csr_matrix(cols.numpy()).T)
        return sp.hstack(blocks).tocsr()

    @property
    def cost(self) -> int:
        """Multiply-adds of one ``linear`` or ``transpose`` call on one vector (for planning); default dense."""
        return self.in_features * self.out_features

    #: whether :meth:`columns` writes the columns down without calling ``linear`` (then the dual never
    #: builds the dense matrix to gather them from)
    direct_columns = False

    def columns(self, order: torch.Tensor) -> torch.Tensor:
        """The columns ``W e_q`` at the input units ``order`` (B, q), as (B, n_out, q). Default: ``linear``
        on one-hot inputs; worth overriding (with ``direct_columns``) where a column can be written down."""
        B, q = order.shape
        E = self.bias().new_zeros(B, q, self.in_features).scatter(2, order.unsqueeze(2), 1.0)
        return self.linear(E.reshape(B * q, *self.in_shape)).reshape(B, q, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.bias()

    def bias_vector(self) -> np.ndarray:
        return self.bias().detach().reshape(-1).double().cpu().numpy()


class LinearOp(Affine):
    """Dense layer ``W x + b``; flattens its input. ``post``: an eval-BatchNorm folded in (read live)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, in_shape=None, post=None):
        self._w = weight  # (n_out, n_in)
        self._b = bias if bias is not None else weight.new_zeros(weight.shape[0])
        self.post = post
        self.in_shape = tuple(in_shape) if in_shape is not None else (weight.shape[1],)
        self.out_shape = (weight.shape[0],)
        if numel(self.in_shape) != weight.shape[1]:
            raise ValueError(f"Linear layer expects {weight.shape[1]} inputs but receives shape {self.in_shape}")

    @property
    def weight(self) -> torch.Tensor:
        return self._w if self.post is None else self._w * self.post.scale[:, None]

    def with_post(self, post) -> "LinearOp":
        """This layer followed by the eval-BatchNorm ``post`` (a :class:`ChannelAffineOp`), folded in."""
        return LinearOp(self._w, self._b, self.in_shape, post=post)

    def linear(self, x):
        return x.reshape(x.shape[0], -1) @ self.weight.t()

    def transpose(self, y):
        return (y.reshape(y.shape[0], -1) @ self.weight).reshape(y.shape[0], *self.in_shape)

    def bias(self):
        return self._b if self.post is None else self._b * self.post.scale + self.post.shift

    def interval(self, center, radius):
        c = self.forward(center)
        r = radius.reshape(radius.shape[0], -1) @ self.weight.abs().t()
        return c, r

    def as_matrix(self):
        return sp.csr_matrix(self.weight.detach().double().cpu().numpy())

    direct_columns = True

    def columns(self, order):
        return self.weight[:, order].permute(1, 0, 2)

    def to(self, device=None, dtype=None):
        return LinearOp(self.weight.to(device=device, dtype=dtype), self.bias().to(device=device, dtype=dtype),
                        self.in_shape)

    @property
    def cost(self):
        return self.weight.numel()


class Conv2dOp(Affine):
    """2-d convolution (groups=1, zero padding, any stride/dilation) on (C, H, W) inputs."""

    def __init__(self, weight, bias, in_shape, stride=(1, 1), padding=(0, 0), dilation=(1, 1), post=None):
        self._w = weight  # (C_out, C_in, kh, kw)
        self._b = bias if bias is not None else weight.new_zeros(weight.shape[0])
        self.post = post
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.in_shape = tuple(in_shape)
        c_in, h, w = self.in_shape
        if c_in != weight.shape[1]:
            raise ValueError(f"Conv2d expects {weight.shape[1]} input channels but receives shape {self.in_shape}")
        kh, kw = weight.shape[2:]
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        if oh <= 0 or ow <= 0:
            raise ValueError(f"Conv2d kernel {tuple(weight.shape[2:])} does not fit input shape {self.in_shape}")
        self.out_shape = (weight.shape[0], oh, ow)
        # conv_transpose2d needs output_padding to recover the exact input size
        self._output_padding = tuple(
            size - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
            for size, o, s, p, d, k in zip((h, w), (oh, ow), self.stride, self.padding, self.dilation, (kh, kw)))

    @property
    def weight(self) -> torch.Tensor:
        return self._w if self.post is None else self._w * self.post.scale.reshape(-1, 1, 1, 1)

    def with_post(self, post) -> "Conv2dOp":
        """This layer followed by the eval-BatchNorm ``post`` (a :class:`ChannelAffineOp`), folded in."""
        return Conv2dOp(self._w, self._b, self.in_shape, self.stride, self.padding, self.dilation, post=post)

    @property
    def channel_bias(self) -> torch.Tensor:
        return self._b if self.post is None else self._b * self.post.scale + self.post.shift

    def linear(self, x):
        return F.conv2d(x.reshape(x.shape[0], *self.in_shape), self.weight, None,
                        self.stride, self.padding, self.dilation)

    def transpose(self, y):
        y = y.reshape(y.shape[0], *self.out_shape)
        if y.shape[0] > 1:  # channels_last takes the fast oneDNN path for conv_transpose on CPU
            y = y.contiguous(memory_format=torch.channels_last)
        out = F.conv_transpose2d(y, self.weight, None, self.stride, self.padding,
                                 self._output_padding, 1, self.dilation)
        return out.contiguous()

    def bias(self):
        return self.channel_bias.reshape(-1, 1, 1).expand(self.out_shape)

    def interval(self, center, radius):
        c = self.forward(center)
        r = F.conv2d(radius.reshape(radius.shape[0], *self.in_shape), self.weight.abs(), None,
                     self.stride, self.padding, self.dilation)
        return c, r

    def to(self, device=None, dtype=None):
        return Conv2dOp(self.weight.to(device=device, dtype=dtype), self.channel_bias.to(device=device, dtype=dtype),
                        self.in_shape, self.stride, self.padding, self.dilation)

    def as_matrix(self):
        """``W`` from the kernel's index pattern (:func:`~.sparse_conv.conv_matrix`; exact, and far cheaper
        than the default's convolution of every basis vector)."""
        return conv_matrix(self.weight.detach().double().cpu().numpy(), self.in_shape, self.out_shape, self.stride,
                           self.padding, self.dilation)

    @property
    def cost(self):
        return self.out_features * self.weight[0].numel()

    direct_columns = True

    def columns(self, order):
        """Written down: input unit (c, h, w) meets kernel tap (i, j) at the output position (oh, ow) with
        ``oh·s + i·d − p = h`` (and the same across), where its column holds ``W[:, c, i, j]``."""
        B, q = order.shape
        (c_in, h_in, w_in), (c_out, oh, ow) = self.in_shape, self.out_shape
        kh, kw = self._w.shape[2:]
        taps, positions = kh * kw, oh * ow
        c, h, w = order // (h_in * w_in), order // w_in % h_in, order % w_in                 # (B, q) each
        k = torch.arange(taps, device=order.device)
        rows = h.unsqueeze(2) + self.padding[0] - (k // kw) * self.dilation[0]              # oh·s, (B, q, K)
        cols = w.unsqueeze(2) + self.padding[1] - (k % kw) * self.dilation[1]
        i, j = rows.div(self.stride[0], rounding_mode="floor"), cols.div(self.stride[1], rounding_mode="floor")
        hit = (rows % self.stride[0] == 0) & (cols % self.stride[1] == 0) & (i >= 0) & (i < oh) & (j >= 0) & (j < ow)
        channel = torch.arange(c_out, device=order.device) * positions                     # (C_out,)
        flat = i * ow + j                                                                    # (B, q, K)
        index = torch.where(hit.unsqueeze(3), flat.unsqueeze(3) + channel, c_out * positions)  # (B, q, K, C_out)
        kernel = self.weight.permute(1, 2, 3, 0).reshape(c_in * taps, c_out)                # row c·K + k
        values = kernel[c.unsqueeze(2) * taps + k]                                           # (B, q, K, C_out)
        out = values.new_zeros(B, q, c_out * positions + 1)   # the last entry takes the taps off the output
        out = out.scatter(2, index.reshape(B, q, -1), values.reshape(B, q, -1))
        return out[:, :, :-1].transpose(1, 2)


class ChannelAffineOp(Affine):
    """Per-channel (dim 0 of the shape) scale and shift: eval-mode BatchNorm.

    Built from a BatchNorm, ``source`` returns (scale, shift) and is called on every use, so the
    layer's parameters and running statistics are read live, like the other operators' weights.
    """

    def __init__(self, scale, shift, in_shape, source=None):
        self.source = source if source is not None else (lambda: (scale, shift))
        self.in_shape = self.out_shape = tuple(in_shape)
        self._view = (-1,) + (1,) * (len(self.in_shape) - 1)

    @property
    def scale(self) -> torch.Tensor:
        return self.source()[0]

    @property
    def shift(self) -> torch.Tensor:
        return self.source()[1]

    def linear(self, x):
        return x.reshape(x.shape[0], *self.in_shape) * self.scale.reshape(self._view)

    def transpose(self, y):
        return y.reshape(y.shape[0], *self.out_shape) * self.scale.reshape(self._view)

    def bias(self):
        return self.shift.reshape(self._view).expand(self.out_shape)

    def interval(self, center, radius):
        return self.forward(center), radius.reshape(radius.shape[0], *self.in_shape) * self.scale.abs().reshape(
            self._view)

    def as_matrix(self):
        per_unit = self.scale.detach().double().cpu().reshape(self._view).expand(self.in_shape).reshape(-1)
        return sp.diags(per_unit.numpy()).tocsr()

    def to(self, device=None, dtype=None):
        return ChannelAffineOp(self.scale.to(device=device, dtype=dtype), self.shift.to(device=device, dtype=dtype),
                               self.in_shape)

    @property
    def cost(self):
        return self.in_features


class IdentityOp(Affine):
    """``x -> x``: put in front of a leading ReLU or after a trailing one."""

    def __init__(self, shape, reference: torch.Tensor):
        self.in_shape = self.out_shape = tuple(shape)
        self._zero = reference.new_zeros(self.out_shape)

    def linear(self, x):
        return x.reshape(x.shape[0], *self.in_shape)

    def transpose(self, y):
        return y.reshape(y.shape[0], *self.out_shape)

    def bias(self):
        return self._zero

    def interval(self, center, radius):
        return self.linear(center), self.linear(radius)

    def as_matrix(self):
        return sp.identity(self.in_features, format="csr")

    def to(self, device=None, dtype=None):
        return IdentityOp(self.in_shape, self._zero.to(device=device, dtype=dtype))

    @property
    def cost(self):
        return self.in_features


class Network:
    """A ReLU network in normal form: ``affines[0]``, ReLU, ``affines[1]``, ReLU, ..., ``affines[-1]``.

    ``skips`` (optional): {i: [(j, S), ...]}: affine i's output also adds ``S(z_j)`` for each j < i, with
    ``z_0`` the input and ``z_j`` (j ≥ 1) the output of the ReLU after affine j − 1.
    """

    def __init__(self, affines, input_shape, skips=None):
        if not affines:
            raise ValueError("a Network needs at least one affine layer")
        self.affines = list(affines)
        self.input_shape = tuple(input_shape)
        for i, (a, b) in enumerate(zip(self.affines, self.affines[1:])):
            if a.out_features != b.in_features:
                raise ValueError(f"affine {i} gives {a.out_shape} but affine {i + 1} expects {b.in_shape}")
        if self.affines[0].in_features != numel(self.input_shape):
            raise ValueError(f"input shape {self.input_shape} does not match first layer {self.affines[0].in_shape}")
        self.skips = {int(i): list(terms) for i, terms in (skips or {}).items() if terms}
        for i, terms in self.skips.items():
            if not 0 < i < len(self.affines):
                raise ValueError(f"skip terms into affine {i}: there are affines 1..{len(self.affines) - 1} "
                                 "that can take them")
            for j, S in terms:
                if not 0 <= j < i:
                    raise ValueError(f"affine {i} can only read earlier layers z_0..z_{i - 1}, not z_{j}")
                if S.in_features != self.layer_size(j) or S.out_features != self.affines[i].out_features:
                    raise ValueError(f"skip term z_{j} -> affine {i} maps {S.in_shape} -> {S.out_shape}, but z_{j} "
                                     f"has {self.layer_size(j)} units and affine {i} gives {self.affines[i].out_shape}")

    def layer_size(self, j: int) -> int:
        """Number of units of ``z_j`` (``z_0`` the input)."""
        return self.input_size if j == 0 else self.affines[j - 1].out_features

    def skips_into(self, i: int) -> list:
        """[(j, S), ...]: the skip terms added to affine i's output."""
        return self.skips.get(i, [])

    @property
    def has_skips(self) -> bool:
        return bool(self.skips)

    def matrices(self) -> list:
        """Per affine i: ``(b, [(j, W_j), ...])`` with ``ẑ_{i+1} = Σ_j W_j z_j + b`` — the main term first
        (j = i), then the skip terms (their biases added into b, terms on the same z_j summed); W_j are
        scipy csr float64 matrices and b a float64 vector (for the LP and MILP)."""
        out = []
        for i, a in enumerate(self.affines):
            b, parts = a.bias_vector(), {i: a.as_matrix()}
            for j, S in self.skips_into(i):
                b = b + S.bias_vector()
                parts[j] = parts[j] + S.as_matrix() if j in parts else S.as_matrix()
            out.append((b.astype(np.float64), [(j, W.tocsr().astype(np.float64)) for j, W in parts.items()]))
        return out

    @property
    def n_relu_layers(self) -> int:
        return len(self.affines) - 1

    @property
    def output_size(self) -> int:
        return self.affines[-1].out_features

    @property
    def input_size(self) -> int:
        return numel(self.input_shape)

    def pre_activations(self, x: torch.Tensor) -> list:
        """``[ẑ_2, ..., ẑ_k]``: every affine output, the last being ``f(x)`` of shape (B, n_out)."""
        outs, zs = [], [x]
        for i, a in enumerate(self.affines):
            zhat = a.forward(zs[-1])
            for j, S in self.skips_into(i):
                zhat = zhat + S.forward(zs[j]).reshape(zhat.shape)
            outs.append(zhat)
            zs.append(torch.relu(zhat))
        outs[-1] = outs[-1].reshape(x.shape[0], -1)
        return outs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_activations(x)[-1]

    def to(self, device=None, dtype=None) -> "Network":
        skips = {i: [(j, S.to(device, dtype)) for j, S in terms] for i, terms in self.skips.items()}
        return Network([a.to(device, dtype) for a in self.affines], self.input_shape, skips)

    @property
    def device(self):
        return self.affines[0].bias().device

    @property
    def dtype(self):
        return self.affines[0].bias().dtype


__all__ = ["Network", "Affine", "LinearOp", "Conv2dOp", "ChannelAffineOp", "IdentityOp"]

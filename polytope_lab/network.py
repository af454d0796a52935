"""Network normal form: affine operators with a ReLU between each consecutive pair.

``Network.affines = [A_1, ..., A_{k-1}]`` is the paper's ``W_i, b_i``:
``ẑ_{i+1} = A_i(z_i)``, ``z_{i+1} = ReLU(ẑ_{i+1})`` for every affine but the last, whose output is
``f(x)``. Backends see only this form (never ``nn.Module`` classes). Operators keep references to the
model's parameters, so bounds stay differentiable with respect to them; the model is never modified.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED_LAYERS = ("Linear", "Conv2d (groups=1, zero padding)", "ReLU", "Flatten (nn.Flatten or a module named Flatten that flattens)", "Identity",
                    "BatchNorm1d/BatchNorm2d in eval mode", "Dropout in eval mode")


def _numel(shape) -> int:
    return int(np.prod(shape)) if len(shape) else 1


class Affine(ABC):
    """An affine map ``x -> W x + b`` from ``in_shape`` to ``out_shape`` (shapes without batch)."""

    in_shape: tuple
    out_shape: tuple

    @property
    def in_features(self) -> int:
        return _numel(self.in_shape)

    @property
    def out_features(self) -> int:
        return _numel(self.out_shape)

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
    def interval(self, center: torch.Tensor, radius: torch.Tensor):
        """Image of the box ``center ± radius`` as (center, radius): ``(W c + b, |W| r)``."""

    @abstractmethod
    def as_matrix(self) -> sp.csr_matrix:
        """``W`` as a scipy sparse matrix of shape (out_features, in_features), float64."""

    @abstractmethod
    def to(self, device=None, dtype=None) -> "Affine":
        """A copy on ``device``/``dtype`` (the copy stays differentiable w.r.t. the original)."""

    @property
    @abstractmethod
    def cost(self) -> int:
        """Multiply-adds of one ``linear`` or ``transpose`` call on one vector (for planning)."""

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
        if _numel(self.in_shape) != weight.shape[1]:
            raise ValueError(f"Linear layer expects {weight.shape[1]} inputs but receives shape {self.in_shape}")

    @property
    def weight(self) -> torch.Tensor:
        return self._w if self.post is None else self._w * self.post.scale[:, None]

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

    def as_matrix(self):
        # columns of W are the images of the basis vectors: build them in chunks with the real conv
        n_in = self.in_features
        w = self.weight.detach().double().cpu()
        op = Conv2dOp(w, None, self.in_shape, self.stride, self.padding, self.dilation)
        blocks = []
        for start in range(0, n_in, 1024):
            stop = min(n_in, start + 1024)
            eye = torch.zeros(stop - start, n_in, dtype=torch.float64)
            eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            cols = op.linear(eye).reshape(stop - start, -1)  # (chunk, n_out)
            blocks.append(sp.csr_matrix(cols.numpy()).T)
        return sp.hstack(blocks).tocsr()

    def to(self, device=None, dtype=None):
        return Conv2dOp(self.weight.to(device=device, dtype=dtype), self.channel_bias.to(device=device, dtype=dtype),
                        self.in_shape, self.stride, self.padding, self.dilation)

    @property
    def cost(self):
        return self.out_features * self.weight[0].numel()


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


class ComposedOp(Affine):
    """Consecutive affine maps with no ReLU between them, applied in order."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.in_shape, self.out_shape = self.parts[0].in_shape, self.parts[-1].out_shape

    def linear(self, x):
        for p in self.parts:
            x = p.linear(x)
        return x

    def transpose(self, y):
        for p in reversed(self.parts):
            y = p.transpose(y)
        return y

    def bias(self):
        b = self.parts[0].bias()
        for p in self.parts[1:]:
            b = p.forward(b.unsqueeze(0))[0]
        return b

    def interval(self, center, radius):
        for p in self.parts:
            center, radius = p.interval(center, radius)
        return center, radius

    def as_matrix(self):
        m = self.parts[0].as_matrix()
        for p in self.parts[1:]:
            m = p.as_matrix() @ m
        return m.tocsr()

    def to(self, device=None, dtype=None):
        return ComposedOp([p.to(device, dtype) for p in self.parts])

    @property
    def cost(self):
        return sum(p.cost for p in self.parts)


class Network:
    """A ReLU network in normal form: ``affines[0]``, ReLU, ``affines[1]``, ReLU, ..., ``affines[-1]``."""

    def __init__(self, affines, input_shape):
        if not affines:
            raise ValueError("a Network needs at least one affine layer")
        self.affines = list(affines)
        self.input_shape = tuple(input_shape)
        for i, (a, b) in enumerate(zip(self.affines, self.affines[1:])):
            if a.out_features != b.in_features:
                raise ValueError(f"affine {i} gives {a.out_shape} but affine {i + 1} expects {b.in_shape}")
        if self.affines[0].in_features != _numel(self.input_shape):
            raise ValueError(f"input shape {self.input_shape} does not match first layer {self.affines[0].in_shape}")

    @property
    def n_relu_layers(self) -> int:
        return len(self.affines) - 1

    @property
    def output_size(self) -> int:
        return self.affines[-1].out_features

    @property
    def input_size(self) -> int:
        return _numel(self.input_shape)

    def pre_activations(self, x: torch.Tensor) -> list:
        """``[ẑ_2, ..., ẑ_k]``: every affine output, the last being ``f(x)`` of shape (B, n_out)."""
        outs, z = [], x
        for i, a in enumerate(self.affines):
            zhat = a.forward(z)
            outs.append(zhat)
            z = torch.relu(zhat)
        outs[-1] = outs[-1].reshape(x.shape[0], -1)
        return outs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_activations(x)[-1]

    def to(self, device=None, dtype=None) -> "Network":
        return Network([a.to(device, dtype) for a in self.affines], self.input_shape)

    @property
    def device(self):
        return self.affines[0].bias().device

    @property
    def dtype(self):
        return self.affines[0].bias().dtype


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _describe(i, layer):
    return f"layer {i} ({layer.__class__.__name__})"


def _unsupported(i, layer, why=""):
    extra = f": {why}" if why else ""
    return ValueError(f"unsupported {_describe(i, layer)}{extra}. Supported layers: {', '.join(SUPPORTED_LAYERS)}; "
                      "the model must be an nn.Sequential.")


def _conv_padding(i, layer):
    if layer.padding_mode != "zeros":
        raise _unsupported(i, layer, f"padding_mode={layer.padding_mode!r} (only 'zeros')")
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(layer.kernel_size, layer.dilation):
            if (d * (k - 1)) % 2:
                raise _unsupported(i, layer, "padding='same' with an asymmetric padding")
            pads.append(d * (k - 1) // 2)
        return tuple(pads)
    return _pair(layer.padding)


def _is_custom_flatten(layer, shape) -> bool:
    """A parameter-free module named Flatten (as in the reference's model zoo) that flattens a probe input."""
    if layer.__class__.__name__ != "Flatten" or any(True for _ in layer.parameters()):
        return False
    probe = torch.arange(2 * _numel(shape), dtype=torch.float32).reshape(2, *shape)
    try:
        out = layer(probe)
    except Exception:
        return False
    return out.shape == (2, _numel(shape)) and torch.equal(out, probe.reshape(2, -1))


def _batchnorm_scale_shift(i, layer):
    if layer.training or not layer.track_running_stats or layer.running_mean is None:
        raise _unsupported(i, layer, "BatchNorm must be in eval mode with running statistics (call model.eval())")
    scale = torch.rsqrt(layer.running_var + layer.eps)
    if layer.weight is not None:
        scale = scale * layer.weight
    shift = -layer.running_mean * scale
    if layer.bias is not None:
        shift = shift + layer.bias
    return scale, shift


def from_torch(model: nn.Module, input_shape) -> Network:
    """Normalise an ``nn.Sequential`` into a :class:`Network` for inputs of shape ``input_shape`` (no batch)."""
    if isinstance(model, Network):
        return model
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"the model must be an nn.Sequential (got {model.__class__.__name__}); "
                         f"supported layers: {', '.join(SUPPORTED_LAYERS)}")
    shape = tuple(input_shape)
    groups: list[list] = [[]]  # affine parts between ReLUs
    ref = next((p for p in model.parameters()), torch.zeros(()))
    for i, layer in enumerate(model):
        if isinstance(layer, nn.ReLU):
            if groups[-1]:
                groups.append([])
            elif len(groups) == 1:  # leading ReLU: its input is the input itself
                groups[0].append(IdentityOp(shape, ref))
                groups.append([])
            continue  # a ReLU right after a ReLU changes nothing
        if isinstance(layer, nn.Linear):
            if _numel(shape) != layer.in_features:
                raise ValueError(f"{_describe(i, layer)} expects {layer.in_features} inputs but receives shape {shape}")
            groups[-1].append(LinearOp(layer.weight, layer.bias, shape))
            shape = (layer.out_features,)
        elif isinstance(layer, nn.Conv2d):
            if layer.groups != 1:
                raise _unsupported(i, layer, f"groups={layer.groups} (only groups=1)")
            if len(shape) != 3:
                raise ValueError(f"{_describe(i, layer)} needs a (C, H, W) input but receives shape {shape}")
            op = Conv2dOp(layer.weight, layer.bias, shape, _pair(layer.stride), _conv_padding(i, layer),
                          _pair(layer.dilation))
            groups[-1].append(op)
            shape = op.out_shape
        elif isinstance(layer, nn.Flatten):
            if layer.start_dim != 1 or layer.end_dim != -1:
                raise _unsupported(i, layer, "only Flatten(start_dim=1, end_dim=-1)")
            shape = (_numel(shape),)
        elif _is_custom_flatten(layer, shape):
            shape = (_numel(shape),)
        elif isinstance(layer, (nn.Identity,)) or (isinstance(layer, nn.Dropout) and not layer.training):
            continue
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            scale, _ = _batchnorm_scale_shift(i, layer)
            if shape[0] != scale.shape[0]:
                raise ValueError(f"{_describe(i, layer)} has {scale.shape[0]} features but receives shape {shape}")
            if isinstance(layer, nn.BatchNorm1d) and len(shape) != 1:
                raise ValueError(f"{_describe(i, layer)} needs a flat input but receives shape {shape}")
            live = (lambda i=i, layer=layer: _batchnorm_scale_shift(i, layer))
            groups[-1].append(ChannelAffineOp(None, None, shape, source=live))
        else:
            raise _unsupported(i, layer)
    if not groups[-1]:  # trailing ReLU: output is ReLU(...) = identity after it
        groups[-1].append(IdentityOp(shape, ref))
    if all(isinstance(p, IdentityOp) for g in groups for p in g):
        raise ValueError("the model has no Linear or Conv2d layer")
    affines = [_fold(g) for g in groups]
    return Network(affines, input_shape)


def _fold(parts):
    """Fold an eval-BatchNorm into the Linear/Conv2d right before it (same shape), then compose the rest."""
    out = []
    for p in parts:
        prev = out[-1] if out else None
        if (isinstance(p, ChannelAffineOp) and isinstance(prev, (LinearOp, Conv2dOp)) and prev.post is None
                and p.in_shape == prev.out_shape):
            if isinstance(prev, LinearOp):
                out[-1] = LinearOp(prev._w, prev._b, prev.in_shape, post=p)
            else:
                out[-1] = Conv2dOp(prev._w, prev._b, prev.in_shape, prev.stride, prev.padding, prev.dilation, post=p)
        else:
            out.append(p)
    return out[0] if len(out) == 1 else ComposedOp(out)


def as_network(model, input_shape) -> Network:
    """``model`` as a :class:`Network` (accepts a Network or an nn.Sequential)."""
    if isinstance(model, Network):
        if tuple(input_shape) != model.input_shape and _numel(input_shape) != model.input_size:
            raise ValueError(f"input shape {tuple(input_shape)} does not match the network's {model.input_shape}")
        return model
    return from_torch(model, input_shape)


__all__ = ["Network", "from_torch", "as_network", "Affine", "LinearOp", "Conv2dOp", "ChannelAffineOp",
           "IdentityOp", "ComposedOp", "SUPPORTED_LAYERS"]

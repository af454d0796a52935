"""PyTorch models to the normal form (:class:`~polytope_lab.network.Network`), and the extension API.

A plain ``nn.Sequential`` of built-in layers becomes a chain (eval-BatchNorm folded into the layer before
it). Anything else — a :class:`~polytope_lab.models.DenseSequential` with skip connections, nested
Sequentials, layers added with :func:`register_layer` — goes through a :class:`Builder`, which keeps
every intermediate value as an :class:`Expression` (a sum of affine maps of earlier ReLU outputs) and
closes a normal-form layer at each ReLU.

Extending (docs/extending.md has worked examples): a new *affine* layer is an
:class:`~polytope_lab.network.Affine` (``linear``, its adjoint ``transpose``, ``bias``, ``interval``,
``as_matrix``, ``to``, ``cost``) returned through ``builder.affine``; a new *piecewise-linear activation*
is written with ``builder.relu``, ``builder.scale``, ``builder.add`` (e.g. LeakyReLU). Every backend —
interval, dual, LP, MILP, robust training — then supports it with no change to their code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .composite import ComposedOp, LinearPartOp, SumOp
from .models import Dense, DenseSequential
from .network import Affine, ChannelAffineOp, Conv2dOp, IdentityOp, LinearOp, Network, numel

BUILTIN_LAYERS = ("Linear", "Conv2d (groups=1, zero padding)", "ReLU",
                  "Flatten (nn.Flatten or a module named Flatten that flattens)", "Identity",
                  "BatchNorm1d/BatchNorm2d in eval mode", "Dropout in eval mode",
                  "nn.Sequential of these", "Dense (skip connections, inside a models.DenseSequential)")
_CONVERTERS: dict = {}


def register_layer(layer_type: type, convert) -> None:
    """Support ``layer_type`` (and its subclasses) in every backend: ``convert(layer, expr, builder)``
    returns the layer's output as an :class:`Expression`, given its input ``expr``, using
    ``builder.affine`` / ``relu`` / ``scale`` / ``add`` / ``reshape``. Overrides a built-in conversion."""
    if not isinstance(layer_type, type) or not issubclass(layer_type, nn.Module):
        raise ValueError(f"layer_type must be an nn.Module subclass, got {layer_type!r}")
    if not callable(convert):
        raise ValueError(f"convert must be callable (layer, expr, builder) -> Expression, got {convert!r}")
    _CONVERTERS[layer_type] = convert


def unregister_layer(layer_type: type) -> None:
    """Undo :func:`register_layer` (no error if it was not registered)."""
    _CONVERTERS.pop(layer_type, None)


def supported_layers() -> tuple:
    """Names of the layers :func:`from_torch` accepts: the built-in ones and the registered ones."""
    return BUILTIN_LAYERS + tuple(f"{t.__name__} (registered)" for t in _CONVERTERS)


def _converter(layer):
    return next((_CONVERTERS[t] for t in type(layer).__mro__ if t in _CONVERTERS), None)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _describe(i, layer):
    return f"layer {i} ({layer.__class__.__name__})"


def _unsupported(i, layer, why=""):
    extra = f": {why}" if why else ""
    return ValueError(f"unsupported {_describe(i, layer)}{extra}. Supported layers: {', '.join(supported_layers())}; "
                      "the model must be an nn.Sequential or a DenseSequential; other layers can be added with "
                      "polytope_lab.register_layer (docs/extending.md).")


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
    probe = torch.arange(2 * numel(shape), dtype=torch.float32).reshape(2, *shape)
    try:
        out = layer(probe)
    except Exception:
        return False
    return out.shape == (2, numel(shape)) and torch.equal(out, probe.reshape(2, -1))


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


def _layer_op(i, layer, shape):
    """(affine operator or None for a pure reshape/no-op, output shape) of a non-ReLU ``layer``."""
    if isinstance(layer, nn.Linear):
        if numel(shape) != layer.in_features:
            raise ValueError(f"{_describe(i, layer)} expects {layer.in_features} inputs but receives shape {shape}")
        return LinearOp(layer.weight, layer.bias, shape), (layer.out_features,)
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise _unsupported(i, layer, f"groups={layer.groups} (only groups=1)")
        if len(shape) != 3:
            raise ValueError(f"{_describe(i, layer)} needs a (C, H, W) input but receives shape {shape}")
        op = Conv2dOp(layer.weight, layer.bias, shape, _pair(layer.stride), _conv_padding(i, layer),
                      _pair(layer.dilation))
        return op, op.out_shape
    if isinstance(layer, nn.Flatten):
        if layer.start_dim != 1 or layer.end_dim != -1:
            raise _unsupported(i, layer, "only Flatten(start_dim=1, end_dim=-1)")
        return None, (numel(shape),)
    if _is_custom_flatten(layer, shape):
        return None, (numel(shape),)
    if isinstance(layer, nn.Identity) or (isinstance(layer, nn.Dropout) and not layer.training):
        return None, shape
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        scale, _ = _batchnorm_scale_shift(i, layer)
        if shape[0] != scale.shape[0]:
            raise ValueError(f"{_describe(i, layer)} has {scale.shape[0]} features but receives shape {shape}")
        if isinstance(layer, nn.BatchNorm1d) and len(shape) != 1:
            raise ValueError(f"{_describe(i, layer)} needs a flat input but receives shape {shape}")
        live = (lambda i=i, layer=layer: _batchnorm_scale_shift(i, layer))
        return ChannelAffineOp(None, None, shape, source=live), shape
    raise _unsupported(i, layer)


def from_torch(model: nn.Module, input_shape) -> Network:
    """Normalise an ``nn.Sequential`` or a :class:`~polytope_lab.models.DenseSequential` into a
    :class:`Network` for inputs of shape ``input_shape`` (no batch)."""
    if isinstance(model, Network):
        return model
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"the model must be an nn.Sequential or a DenseSequential (got {model.__class__.__name__}); "
                         f"supported layers: {', '.join(supported_layers())}")
    if _is_chain(model):
        return _chain(model, input_shape)
    builder = Builder(input_shape, next((p for p in model.parameters()), torch.zeros(())))
    outputs = [builder.input]
    for i, layer in enumerate(model):
        if isinstance(layer, Dense):
            if not isinstance(model, DenseSequential):
                raise _unsupported(i, layer, "a Dense layer needs a DenseSequential container")
            outputs.append(builder.dense(i, layer, outputs))
        else:
            outputs.append(builder.layer(i, layer, outputs[-1]))
    return builder.finish(outputs[-1])


def _is_chain(model) -> bool:
    """A Sequential of built-in single layers, nothing registered: the chain conversion applies."""
    return not any(isinstance(layer, (Dense, nn.Sequential)) or _converter(layer) is not None for layer in model)


def _chain(model, input_shape) -> Network:
    """The affine layers between ReLUs composed into one operator each (eval-BatchNorm folded)."""
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
        op, shape = _layer_op(i, layer, shape)
        if op is not None:
            groups[-1].append(op)
    if not groups[-1]:  # trailing ReLU: output is ReLU(...) = identity after it
        groups[-1].append(IdentityOp(shape, ref))
    if all(isinstance(p, IdentityOp) for g in groups for p in g):
        raise ValueError("the model has no Linear or Conv2d layer")
    return Network([_fold(g) for g in groups], input_shape)


@dataclass(frozen=True)
class Expression:
    """A value inside the model as ``Σ_j terms[j](z_j)``: {j: Affine from z_j (biases included)}, where
    ``z_0`` is the input and ``z_j`` the output of the j-th normal-form ReLU layer; ``shape`` without batch."""

    terms: dict
    shape: tuple


class Builder:
    """Builds a :class:`Network` from :class:`Expression` s; converters (:func:`register_layer`) get one.

    ``relu(expr)`` closes a normal-form layer: the term on the newest ``z_i`` becomes ``affines[i]`` (a
    zero map when there is none) and the older terms its skip terms; the result is the new ``z_{i+1}``.
    """

    def __init__(self, input_shape, reference: torch.Tensor):
        self.ref = reference
        self.affines, self.skips = [], {}
        self.shapes = [tuple(input_shape)]  # of z_0, z_1, ...
        self.input = Expression({0: IdentityOp(self.shapes[0], reference)}, self.shapes[0])

    def affine(self, expr: Expression, op: Affine, out_shape=None) -> Expression:
        """``op`` applied to ``expr`` (``out_shape``: the result's shape, default ``op.out_shape``)."""
        if op.in_features != numel(expr.shape):
            raise ValueError(f"an affine map on {op.in_shape} cannot take a value of shape {expr.shape}")
        terms = {}
        for n, (j, t) in enumerate(expr.terms.items()):
            part = op if n == 0 else LinearPartOp(op)  # the bias once, with the first term
            terms[j] = part if isinstance(t, IdentityOp) else ComposedOp(_parts(t) + [part])
        return Expression(terms, tuple(op.out_shape if out_shape is None else out_shape))

    def reshape(self, expr: Expression, shape) -> Expression:
        if numel(shape) != numel(expr.shape):
            raise ValueError(f"cannot reshape {expr.shape} to {tuple(shape)}")
        return Expression(expr.terms, tuple(shape))

    def scale(self, expr: Expression, factor: float) -> Expression:
        """``factor · expr``."""
        n = expr.shape[0] if expr.shape else 1
        scale = self.ref.new_full((n,), float(factor)).detach()
        return self.affine(expr, ChannelAffineOp(scale, torch.zeros_like(scale), expr.shape))

    def add(self, *exprs: Expression) -> Expression:
        shape = exprs[0].shape
        if any(e.shape != shape for e in exprs):
            raise ValueError(f"cannot add values of different shapes {[e.shape for e in exprs]}")
        grouped = {}
        for e in exprs:
            for j, t in e.terms.items():
                grouped.setdefault(j, []).append(t)
        return Expression({j: ts[0] if len(ts) == 1 else SumOp(ts) for j, ts in grouped.items()}, shape)

    def relu(self, expr: Expression) -> Expression:
        if len(expr.terms) == 1:
            (j, t), = expr.terms.items()
            if j > 0 and isinstance(t, IdentityOp):  # already a ReLU output
                return expr
        main, skips = self._split(expr)
        i = len(self.affines)
        self.affines.append(main)
        if skips:
            self.skips[i] = skips
        self.shapes.append(expr.shape)
        return Expression({i + 1: IdentityOp(expr.shape, self.ref)}, expr.shape)

    def layer(self, i: int, layer: nn.Module, expr: Expression) -> Expression:
        """The output of module ``layer`` (index i, for messages) on ``expr``."""
        convert = _converter(layer)
        if convert is not None:
            out = convert(layer, expr, self)
            if not isinstance(out, Expression):
                raise ValueError(f"the converter registered for {type(layer).__name__} returned "
                                 f"{type(out).__name__}, not an Expression")
            return out
        if isinstance(layer, nn.ReLU):
            return self.relu(expr)
        if isinstance(layer, Dense):
            raise _unsupported(i, layer, "a Dense layer must sit directly in a DenseSequential")
        if isinstance(layer, nn.Sequential) and not isinstance(layer, DenseSequential):
            for sub in layer:
                expr = self.layer(i, sub, expr)
            return expr
        op, shape = _layer_op(i, layer, expr.shape)
        return self.reshape(expr, shape) if op is None else self.affine(expr, op)

    def dense(self, i: int, layer: Dense, outputs: list) -> Expression:
        """A :class:`~polytope_lab.models.Dense` layer reading the last outputs of its container."""
        k = len(layer.layers)
        if len(outputs) < k:
            raise ValueError(f"{_describe(i, layer)} has {k} modules but only {len(outputs)} earlier outputs "
                             "(the input included) exist")
        read = outputs[len(outputs) - k:]
        return self.add(*(self.layer(i, m, e) for m, used, e in zip(layer.layers, layer.used, read) if used))

    def finish(self, expr: Expression) -> Network:
        """The network whose output is ``expr``."""
        main, skips = self._split(expr)
        i = len(self.affines)
        return Network(self.affines + [main], self.shapes[0], {**self.skips, **({i: skips} if skips else {})})

    def _split(self, expr):
        """(term on the newest z, as the main affine; [(j, term)] on older ones)."""
        newest = len(self.affines)
        main = expr.terms.get(newest)
        if main is None:
            main = LinearOp(self.ref.new_zeros(numel(expr.shape), numel(self.shapes[newest])).detach(), None,
                            self.shapes[newest])
        return main, sorted(((j, t) for j, t in expr.terms.items() if j != newest), key=lambda jt: jt[0])


def _parts(op):
    return list(op.parts) if isinstance(op, ComposedOp) else [op]


def _fold(parts):
    """Fold an eval-BatchNorm into the Linear/Conv2d right before it (same shape), then compose the rest."""
    out = []
    for p in parts:
        prev = out[-1] if out else None
        if (isinstance(p, ChannelAffineOp) and isinstance(prev, (LinearOp, Conv2dOp)) and prev.post is None
                and p.in_shape == prev.out_shape):
            out[-1] = prev.with_post(p)
        else:
            out.append(p)
    return out[0] if len(out) == 1 else ComposedOp(out)


def as_network(model, input_shape) -> Network:
    """``model`` as a :class:`Network` (accepts a Network, an nn.Sequential or a DenseSequential)."""
    if isinstance(model, Network):
        if tuple(input_shape) != model.input_shape and numel(input_shape) != model.input_size:
            raise ValueError(f"input shape {tuple(input_shape)} does not match the network's {model.input_shape}")
        return model
    return from_torch(model, input_shape)


__all__ = ["from_torch", "as_network", "register_layer", "unregister_layer", "supported_layers", "Builder",
           "Expression", "BUILTIN_LAYERS"]

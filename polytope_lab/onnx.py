"""ONNX networks to the normal form (:class:`~polytope_lab.network.Network`); onnxruntime is the test oracle.

``load_onnx(path_or_model)`` interprets the graph once, symbolically: a value that depends on the input is
a :class:`~polytope_lab.convert.Expression` built with the same :class:`~polytope_lab.convert.Builder` as
:func:`~polytope_lab.convert.from_torch` (so residual ``Add`` s become skip terms and each ``Relu`` closes a
layer); every other value is a numpy constant, so the constant subgraphs exporters emit (``Shape`` →
``Gather`` → ``Unsqueeze`` → ``Concat`` → ``Reshape``) fold away. Consecutive affine maps are merged where
that is exact (:func:`polytope_lab.onnx_ops.simplify`): normalisation ``Sub``/``Div`` into the next dense
layer, ``BatchNormalization`` into the convolution before it, ``MatMul`` + ``Add`` into one layer.

Conventions: the graph has one input and one output; the input's leading dimension is the batch (1 or
symbolic; the graph is interpreted at batch size 1) and is dropped, so ``[1, 784, 1]`` gives
``input_shape == (784, 1)``; values inside keep their ONNX shapes, the operators built for them get
per-example shapes (a leading axis of size 1 dropped); the output is flattened in C order (``Y_j`` of
VNN-LIB). A ``Relu`` after the last layer is kept (an identity affine after it: the output is ReLU(f)).
Weights become ``dtype`` tensors (default float64, which holds float32 weights exactly: the network is the
real-valued function of the file's weights; onnxruntime's float32 arithmetic differs by rounding, ~1e-7
relative). ``load_onnx(..., as_torch=True)`` or :func:`to_sequential` gives an equivalent ``nn.Sequential``
(trainable nn.Linear / nn.Conv2d copies of the weights) when the network has no skip connections; the
:class:`Network` itself holds constant tensors.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from .convert import Builder, Expression, register_layer
from .composite import ComposedOp
from .network import Affine, Conv2dOp, IdentityOp, LinearOp, Network, numel
from .onnx_ops import ElementwiseOp, IndexOp, ScatterOp, simplify
from .onnx_constants import (CONSTANT_OPS, REARRANGE_OPS, SUPPORTED_OPS, as_constant, attributes, conv_pads,
                             evaluate_constant, pad_widths, unsupported)


def _as_model(path_or_model) -> onnx.ModelProto:
    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model))
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is only a help: the interpreter computes every shape itself
        return model


def _input_shape(value_info) -> tuple:
    """The per-example shape of the graph input (leading batch dimension 1 or symbolic, dropped)."""
    t = value_info.type.tensor_type
    if t.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
        raise ValueError(f"input {value_info.name!r}: only float inputs are supported "
                         f"(got {onnx.TensorProto.DataType.Name(t.elem_type)})")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    if not dims or dims[0] not in (1, None):
        raise ValueError(f"input {value_info.name!r} has shape {dims}: its leading dimension must be the batch "
                         "(1 or symbolic)")
    if any(d is None or d <= 0 for d in dims[1:]):
        raise ValueError(f"input {value_info.name!r} has dynamic dimensions {dims[1:]} besides the batch: "
                         "only a fixed per-example shape is supported")
    return tuple(dims[1:])


def _check_output(value_info, out: Expression):
    """The declared output shape (where it is static; the batch axis counted as 1) matches the computed one."""
    dims = [d.dim_value if d.HasField("dim_value") else 1 for d in value_info.type.tensor_type.shape.dim]
    if dims and numel(dims) != numel(out.shape):
        raise ValueError(f"the output {value_info.name!r} is declared with shape {dims} but the converted "
                         f"graph computes shape {out.shape}")


def _needed(graph, output: str) -> list:
    """The nodes the output depends on, in graph order (dead branches are never interpreted)."""
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output}
    seen, stack = set(), [output]
    while stack:
        i = producer.get(stack.pop())
        if i is not None and i not in seen:
            seen.add(i)
            stack.extend(n for n in graph.node[i].input if n)
    return [graph.node[i] for i in sorted(seen)]


class _Interpreter:
    """Runs the graph on numpy constants and :class:`Expression` s (the input-dependent values, ONNX shapes)."""

    def __init__(self, graph, dtype):
        self.dtype = dtype
        self.ref = torch.zeros((), dtype=dtype)
        inits = {t.name for t in graph.initializer}
        inputs = [v for v in graph.input if v.name not in inits]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ValueError(f"the graph must have one input and one output, not {len(inputs)} inputs "
                             f"{[v.name for v in inputs]} and {len(graph.output)} outputs "
                             f"{[v.name for v in graph.output]}")
        self.input_shape = _input_shape(inputs[0])
        self.builder = Builder(self.input_shape, self.ref)
        self.values = {t.name: as_constant(numpy_helper.to_array(t)) for t in graph.initializer}
        self.values[inputs[0].name] = self.builder.reshape(self.builder.input, (1,) + self.input_shape)
        self.graph = graph

    def tensor(self, array) -> torch.Tensor:
        return torch.as_tensor(np.array(array, dtype=np.float64), dtype=self.dtype)  # a writable copy

    def inputs_of(self, node) -> list:
        if node.domain not in ("", "ai.onnx"):
            raise unsupported(node, f"operator domain {node.domain!r} (only the default ONNX domain)")
        missing = [n for n in node.input if n and n not in self.values]
        if missing:
            raise unsupported(node, f"it reads {missing}, which no supported node produces")
        return [self.values[n] if n else None for n in node.input]

    def run(self) -> Network:
        out_name = self.graph.output[0].name
        for node in _needed(self.graph, out_name):
            ins = self.inputs_of(node)
            symbolic = any(isinstance(v, Expression) for v in ins)
            if symbolic and node.op_type in _SYMBOLIC:
                outs = [_SYMBOLIC[node.op_type](self, node, ins, attributes(node))]
            elif node.op_type == "Shape" or (not symbolic and node.op_type in CONSTANT_OPS):
                ins = [np.zeros(v.shape) if isinstance(v, Expression) else v for v in ins]
                outs = evaluate_constant(node, ins)
            else:
                raise unsupported(node, "on an input-dependent value" if node.op_type in CONSTANT_OPS else "")
            self.values.update(zip(node.output, outs))
        out = self.values.get(out_name)
        if not isinstance(out, Expression):
            raise ValueError(f"the output {out_name!r} does not depend on the input")
        _check_output(self.graph.output[0], out)
        net = self.builder.finish(out)
        skips = {i: [(j, simplify(S)) for j, S in terms] for i, terms in net.skips.items()}
        return Network([simplify(a) for a in net.affines], self.input_shape, skips)

    def affine(self, expr: Expression, op: Affine, out_shape) -> Expression:
        """``op`` (built on per-example shapes) applied to ``expr``; the result has the ONNX ``out_shape``."""
        return self.builder.affine(expr, op, tuple(int(d) for d in out_shape))

    def elementwise(self, expr, scale, shift) -> Expression:
        s = self.tensor(np.broadcast_to(scale, expr.shape))
        t = self.tensor(np.broadcast_to(shift, expr.shape))
        return self.affine(expr, ElementwiseOp(s, t, example(expr.shape)), expr.shape)


def example(shape) -> tuple:
    """The per-example shape of an ONNX value: without its leading batch axis of size 1 (if it has one)."""
    shape = tuple(int(d) for d in shape)
    return shape[1:] if len(shape) > 1 and shape[0] == 1 else shape


def _rearrange(it, node, ins, attrs):
    """Reshape-like ops (a pure reshape, or an :class:`IndexOp` when entries move) on the data input."""
    x = ins[0]
    if any(isinstance(v, Expression) for v in ins[1:]):
        raise unsupported(node, "only its first input may depend on the network input")
    index = np.arange(numel(x.shape)).reshape(x.shape)
    out = evaluate_constant(node, [index] + list(ins[1:]))[0]
    if np.array_equal(out.reshape(-1), index.reshape(-1)):
        return it.builder.reshape(x, out.shape)
    return it.affine(x, IndexOp(out, example(x.shape), example(out.shape), it.ref), out.shape)


def _arithmetic(it, node, ins, attrs):
    """Add/Sub/Mul/Div/Neg with a constant operand, or Add/Sub of two input-dependent values (residuals)."""
    op = node.op_type
    if op == "Neg":
        return it.elementwise(ins[0], -1.0, 0.0)
    a, b = ins
    if isinstance(a, Expression) and isinstance(b, Expression):
        if op not in ("Add", "Sub"):
            raise unsupported(node, "the product or quotient of two input-dependent values is not affine")
        if a.shape != b.shape:
            raise unsupported(node, f"adding input-dependent values of shapes {a.shape} and {b.shape} "
                                     "(no broadcasting between them)")
        return it.builder.add(a, b if op == "Add" else it.elementwise(b, -1.0, 0.0))
    x, c, first = (a, b, True) if isinstance(a, Expression) else (b, a, False)
    out = np.broadcast_shapes(x.shape, c.shape)
    if numel(out) != numel(x.shape):
        raise unsupported(node, f"the constant of shape {c.shape} would broadcast the value {x.shape}")
    x = it.builder.reshape(x, out)  # only leading axes of size 1 were added
    if op == "Add":
        return it.elementwise(x, 1.0, c)
    if op == "Sub":
        return it.elementwise(x, 1.0, -c) if first else it.elementwise(x, -1.0, c)
    if op == "Mul":
        return it.elementwise(x, c, 0.0)
    if not first:
        raise unsupported(node, "dividing by an input-dependent value is not affine")
    if (c == 0).any():
        raise unsupported(node, "division by zero")
    return it.elementwise(x, 1.0 / c, 0.0)


def _concat(it, node, ins, attrs):
    """Each input-dependent part scattered to its place in the result, summed; constant parts as a shift."""
    offsets = np.cumsum([0] + [numel(np.shape(v) if not isinstance(v, Expression) else v.shape) for v in ins])
    ids = [np.arange(lo, hi).reshape(v.shape) for lo, hi, v in zip(offsets, offsets[1:], ins)]
    out = evaluate_constant(node, ids)[0]
    where = np.argsort(out.reshape(-1))  # where[id]: the position of entry id in the result
    terms, shift = [], np.zeros(out.size)
    for lo, hi, v in zip(offsets, offsets[1:], ins):
        if isinstance(v, Expression):
            op = ScatterOp(where[lo:hi], example(v.shape), example(out.shape), it.ref)
            terms.append(it.affine(v, op, out.shape))
        else:
            shift[where[lo:hi]] = np.asarray(v, dtype=np.float64).reshape(-1)
    total = it.builder.add(*terms)
    return it.elementwise(total, 1.0, shift.reshape(out.shape)) if shift.any() else total


def _constant_operand(node, value, what):
    if value is None or isinstance(value, Expression):
        raise unsupported(node, f"{what} must be a constant (an initializer or a constant subgraph)")
    return value


def _gemm(it, node, ins, attrs):
    a, b = ins[0], _constant_operand(node, ins[1], "operand B")
    if not isinstance(a, Expression):
        raise unsupported(node, "operand B depends on the input; only A may")
    if attrs.get("transA", 0):
        a = _rearrange(it, _transpose_node(node), [a], {})
    w = b.T if attrs.get("transB", 0) else b
    if len(a.shape) != 2 or w.ndim != 2 or w.shape[0] != a.shape[1]:
        raise unsupported(node, f"operands of shapes {a.shape} and {b.shape}")
    out = (a.shape[0], w.shape[1])
    bias = np.zeros(out)
    if len(ins) > 2 and ins[2] is not None:
        bias = attrs.get("beta", 1.0) * np.broadcast_to(_constant_operand(node, ins[2], "operand C"), out)
    weight = np.kron(np.eye(out[0]), attrs.get("alpha", 1.0) * w.T)  # one row of A at a time
    return it.affine(a, LinearOp(it.tensor(weight), it.tensor(bias.reshape(-1)), example(a.shape)), out)


def _transpose_node(node):
    return onnx.helper.make_node("Transpose", [node.input[0]], [node.output[0]], name=node.name, perm=[1, 0])


def _matmul(it, node, ins, attrs):
    """``x @ W`` or ``W @ x`` with a constant 2-d ``W``, on every leading index of ``x``."""
    left = isinstance(ins[0], Expression)  # x @ W, else W @ x
    x, w = ins if left else ins[::-1]
    if isinstance(w, Expression) or w.ndim != 2 or not x.shape:
        raise unsupported(node, "only products of an input-dependent value with a constant matrix are supported"
                                f" (shapes {[np.shape(v) if not isinstance(v, Expression) else v.shape for v in ins]})")
    if len(x.shape) == 1:  # numpy's rule for a vector: (k,) @ (k, n) -> (n,); (m, k) @ (k,) -> (m,)
        x = it.builder.reshape(x, (1, x.shape[0]) if left else (x.shape[0], 1))
        out = _matmul(it, node, [x, w] if left else [w, x], attrs)
        return it.builder.reshape(out, (numel(out.shape),))
    lead = numel(x.shape[:-2])
    if left:  # (..., m, k) @ (k, n)
        if x.shape[-1] != w.shape[0]:
            raise unsupported(node, f"operands of shapes {x.shape} and {w.shape}")
        weight, out = np.kron(np.eye(lead * x.shape[-2]), w.T), x.shape[:-1] + (w.shape[1],)
    else:  # (m, k) @ (..., k, n)
        if x.shape[-2] != w.shape[1]:
            raise unsupported(node, f"operands of shapes {w.shape} and {x.shape}")
        weight, out = np.kron(np.eye(lead), np.kron(w, np.eye(x.shape[-1]))), x.shape[:-2] + (w.shape[0], x.shape[-1])
    return it.affine(x, LinearOp(it.tensor(weight), None, example(x.shape)), out)


def _image(it, node, x) -> tuple:
    if len(x.shape) != 4 or x.shape[0] != 1:
        raise unsupported(node, f"only 2-d images (1, C, H, W) are supported, got shape {x.shape}")
    return tuple(x.shape[1:])


def _conv(it, node, ins, attrs):
    x, w = ins[0], _constant_operand(node, ins[1], "the weight")
    if not isinstance(x, Expression):
        raise unsupported(node, "the weight depends on the input")
    if attrs.get("group", 1) != 1:
        raise unsupported(node, f"group={attrs['group']} (only group=1)")
    shape = _image(it, node, x)
    if w.ndim != 4 or w.shape[1] != shape[0]:
        raise unsupported(node, f"weight of shape {w.shape} on input {x.shape}")
    strides, dilations = tuple(attrs.get("strides", (1, 1))), tuple(attrs.get("dilations", (1, 1)))
    x, pads = _padded(it, x, *conv_pads(node, attrs, shape[1:], w.shape[2:], strides, dilations))
    bias = None if len(ins) < 3 or ins[2] is None else it.tensor(_constant_operand(node, ins[2], "the bias"))
    op = Conv2dOp(it.tensor(w), bias, x.shape[1:], strides, pads, dilations)
    return it.affine(x, op, (1,) + op.out_shape)


def _average_pool(it, node, ins, attrs):
    """AveragePool / GlobalAveragePool as a convolution (a per-position divisor without padded entries)."""
    x = ins[0]
    c, h, w = _image(it, node, x)
    kernel = (h, w) if node.op_type == "GlobalAveragePool" else tuple(attrs["kernel_shape"])
    strides, dilations = tuple(attrs.get("strides", (1, 1))), tuple(attrs.get("dilations", (1, 1)))
    begin, end = conv_pads(node, attrs, (h, w), kernel, strides, dilations)
    x, pads = _padded(it, x, begin, end)
    ones = torch.ones(1, 1, *kernel, dtype=it.dtype)
    weight = torch.eye(c, dtype=it.dtype).reshape(c, c, 1, 1) * ones
    conv = Conv2dOp(weight, None, x.shape[1:], strides, pads, dilations)
    mask = torch.ones(1, 1, h, w, dtype=it.dtype)  # the entries that are not padding
    if pads == (0, 0):
        mask = torch.nn.functional.pad(mask, (begin[1], end[1], begin[0], end[0]))
    counts = torch.nn.functional.conv2d(mask, ones, None, strides, pads, dilations)[0]
    if not attrs.get("count_include_pad", 0) or not any(begin + end):
        divisor = counts.expand(conv.out_shape)
    else:
        divisor = torch.full(conv.out_shape, float(numel(kernel)), dtype=it.dtype)
    y = it.affine(x, conv, (1,) + conv.out_shape)
    return it.elementwise(y, (1.0 / divisor).numpy()[None], 0.0)


def _pad_with(it, x: Expression, width, value: float) -> Expression:
    """``x`` padded by ``width`` [(begin, end)] per axis with ``value`` (a scatter, plus a shift)."""
    padded = np.pad(np.arange(numel(x.shape)).reshape(x.shape), width, constant_values=-1)
    dst = np.flatnonzero(padded.reshape(-1) >= 0)  # C order is kept, so entry k lands at dst[k]
    y = it.affine(x, ScatterOp(dst, example(x.shape), example(padded.shape), it.ref), padded.shape)
    return it.elementwise(y, 1.0, np.where(padded < 0, value, 0.0)) if value else y


def _padded(it, x: Expression, begin, end):
    """(x, symmetric padding for the convolution): asymmetric padding of (1, C, H, W) is made explicit."""
    if tuple(begin) == tuple(end):
        return x, tuple(begin)
    return _pad_with(it, x, [(0, 0), (0, 0)] + list(zip(begin, end)), 0.0), (0, 0)


def _pad(it, node, ins, attrs):
    if any(isinstance(v, Expression) for v in ins[1:]):
        raise unsupported(node, "its pads and value must be constants")
    return _pad_with(it, ins[0], *pad_widths(node, ins, attrs, len(ins[0].shape)))


def _batch_norm(it, node, ins, attrs):
    x = ins[0]
    if attrs.get("training_mode", 0) or len([o for o in node.output if o]) > 1:
        raise unsupported(node, "only inference mode (training_mode=0, one output)")
    scale, bias, mean, var = (_constant_operand(node, v, "its parameters") for v in ins[1:5])
    full = x.shape
    if len(full) < 2 or scale.shape != (full[1],):
        raise unsupported(node, f"{scale.shape} channels on a value of shape {full}")
    s = scale / np.sqrt(var + attrs.get("epsilon", 1e-5))
    view = (1, -1) + (1,) * (len(full) - 2)
    return it.elementwise(x, s.reshape(view), (bias - mean * s).reshape(view))


def _relu(it, node, ins, attrs):
    x = ins[0]  # the new layer's operators get per-example shapes, the value keeps its ONNX shape
    return it.builder.reshape(it.builder.relu(it.builder.reshape(x, example(x.shape))), x.shape)


#: op type -> handler(interpreter, node, inputs, attributes) -> Expression, for nodes reading input-dependent values
_SYMBOLIC = {"Relu": _relu, "Concat": _concat, "Pad": _pad, "Gemm": _gemm, "MatMul": _matmul, "Conv": _conv,
             "BatchNormalization": _batch_norm, "AveragePool": _average_pool, "GlobalAveragePool": _average_pool,
             **{op: _arithmetic for op in ("Add", "Sub", "Mul", "Div", "Neg")},
             **{op: _rearrange for op in REARRANGE_OPS}}


def load_onnx(path_or_model, *, dtype=torch.float64, as_torch: bool = False):
    """The ONNX network at ``path_or_model`` (a path or an ``onnx.ModelProto``) as a :class:`Network` with
    weights in ``dtype`` (``as_torch=True``: an equivalent ``nn.Sequential``, see :func:`to_sequential`).
    An op outside ``SUPPORTED_OPS`` (or used in a way that is not affine), several inputs or outputs, or
    dynamic shapes besides the batch → ``ValueError`` naming the node, its op type and the supported ops."""
    model = _as_model(path_or_model)
    net = _Interpreter(model.graph, dtype).run()
    return to_sequential(net) if as_torch else net


class AffineLayer(nn.Module):
    """An :class:`~polytope_lab.network.Affine` operator as a fixed module (no parameters);
    :func:`~polytope_lab.convert.from_torch` reads it back as that operator."""

    def __init__(self, op: Affine):
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op.forward(x).reshape(x.shape[0], *self.op.out_shape)


register_layer(AffineLayer, lambda layer, expr, builder: builder.affine(expr, layer.op))


def _modules(op: Affine, shape: tuple) -> list:
    """Modules computing ``op`` on inputs of per-example ``shape``: nn.Linear / nn.Conv2d (trainable
    copies of the weights) where they fit, :class:`AffineLayer` otherwise."""
    if isinstance(op, IdentityOp):
        return []
    if isinstance(op, LinearOp):
        layer = nn.Linear(op.in_features, op.out_features, dtype=op.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(op.weight)
            layer.bias.copy_(op.bias())
        return ([nn.Flatten()] if len(shape) != 1 else []) + [layer]
    if isinstance(op, Conv2dOp) and tuple(shape) == op.in_shape:
        c_out, c_in, kh, kw = op.weight.shape
        layer = nn.Conv2d(c_in, c_out, (kh, kw), op.stride, op.padding, op.dilation, dtype=op.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(op.weight)
            layer.bias.copy_(op.channel_bias)
        return [layer]
    return [AffineLayer(op)]


def to_sequential(network: Network) -> nn.Sequential:
    """An ``nn.Sequential`` computing ``network`` (which must have no skip connections): its affine maps
    as nn.Linear / nn.Conv2d where they fit (trainable copies) and :class:`AffineLayer` otherwise, with
    nn.ReLU between them; ``from_torch(to_sequential(net), net.input_shape)`` is ``net`` again."""
    if network.has_skips:
        raise ValueError("a network with skip connections is not a chain: use the Network itself")
    layers, shape = [], network.input_shape
    for i, op in enumerate(network.affines):
        for part in (op.parts if isinstance(op, ComposedOp) else [op]):
            layers += _modules(part, shape)
            shape = part.out_shape
        if i < len(network.affines) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


__all__ = ["load_onnx", "to_sequential", "AffineLayer", "SUPPORTED_OPS"]

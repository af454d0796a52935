"""Numpy evaluation of ONNX nodes on constants (constant folding for :mod:`polytope_lab.onnx`), node
attributes, convolution padding, and the converter's error messages.

The rearranging ops (``REARRANGE_OPS``: Flatten, Reshape, Transpose, Slice, ...) are also evaluated here
on an array of flat indices, which is how the converter turns them into index maps of input-dependent
values.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

SUPPORTED_OPS = ("Add", "AveragePool", "BatchNormalization", "Concat", "Constant", "Conv (2-d, group=1)", "Div",
                 "Dropout (inference)", "Flatten", "Gather", "Gemm", "GlobalAveragePool", "Identity", "MatMul",
                 "Mul", "Neg", "Pad (constant mode)", "Relu", "Reshape", "Shape", "Slice", "Squeeze", "Sub",
                 "Transpose", "Unsqueeze", "and on constants only: Cast, ConstantOfShape, Range")
REARRANGE_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Slice", "Gather", "Dropout")


def describe(node) -> str:
    return f"node {node.name or node.output[0]!r} (op type {node.op_type})"


def unsupported(node, why: str = "") -> ValueError:
    """The converter's error for ``node``: names it, its op type, why, and the supported ops."""
    extra = f": {why}" if why else ""
    return ValueError(f"unsupported ONNX {describe(node)}{extra}. Supported ops: {', '.join(SUPPORTED_OPS)}")


def as_constant(array) -> np.ndarray:
    """A numpy constant; floating point ones in float64."""
    array = np.asarray(array)
    return array.astype(np.float64) if np.issubdtype(array.dtype, np.floating) else array


def attributes(node) -> dict:
    """{name: value} of ``node``'s attributes (tensors as numpy arrays, strings decoded)."""
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, onnx.TensorProto):
            v = numpy_helper.to_array(v)
        elif isinstance(v, bytes):
            v = v.decode()
        out[a.name] = v
    return out


def _ints(value) -> list:
    return [int(v) for v in np.asarray(value).reshape(-1)]


def _axes(node, ins, attrs):
    """The ``axes`` of Squeeze/Unsqueeze: an attribute before opset 13, an optional input since."""
    if "axes" in attrs:
        return _ints(attrs["axes"])
    return _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else None


def _reshape(node, ins, attrs):
    x = ins[0]
    dims = _ints(ins[1]) if len(ins) > 1 else _ints(attrs["shape"])
    if not attrs.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _flatten(node, ins, attrs):
    x = ins[0]
    axis = attrs.get("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis  # ONNX: -r <= axis <= r
    return x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))


def _slice(node, ins, attrs):
    x = ins[0]
    if len(ins) > 1:  # opset >= 10: starts, ends, axes, steps as inputs
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    else:
        starts, ends = _ints(attrs["starts"]), _ints(attrs["ends"])
        axes = _ints(attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[axis] = slice(start, end, step)
    return x[tuple(index)]


def _unsqueeze(node, ins, attrs):
    return np.expand_dims(ins[0], tuple(_axes(node, ins, attrs)))


def _squeeze(node, ins, attrs):
    axes = _axes(node, ins, attrs)
    return np.squeeze(ins[0]) if axes is None else np.squeeze(ins[0], tuple(axes))


def _constant_node(node, ins, attrs):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in attrs:
            return np.asarray(attrs[key])
    raise unsupported(node, f"a Constant with attributes {sorted(attrs)}")


def _divide(node, ins, attrs):
    a, b = ins
    if np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer):
        return np.trunc(a / b).astype(np.result_type(a, b))
    return a / b


def _shape(node, ins, attrs):
    shape = ins[0].shape
    return np.array(shape[attrs.get("start", 0):attrs.get("end", len(shape))], dtype=np.int64)


def _constant_of_shape(node, ins, attrs):
    value = np.asarray(attrs.get("value", np.zeros(1, dtype=np.float32))).reshape(-1)
    return np.full(_ints(ins[0]), value[0], dtype=value.dtype)


def _dropout(node, ins, attrs):
    if len(ins) > 2 and ins[2] is not None and bool(np.asarray(ins[2]).reshape(-1)[0]):
        raise unsupported(node, "training_mode=True (only inference, where Dropout is the identity)")
    return ins[0]


def _cast(node, ins, attrs):
    return ins[0].astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))


def pad_widths(node, ins, attrs, ndim: int):
    """([(begin, end)] per axis, value) of a constant-mode Pad (pads and value as inputs since opset 11, as
    attributes before; ``axes`` since opset 18)."""
    mode = attrs.get("mode", "constant")
    if mode != "constant":
        raise unsupported(node, f"mode={mode!r} (only 'constant')")
    pads = _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else _ints(attrs["pads"])
    value = ins[2] if len(ins) > 2 and ins[2] is not None else attrs.get("value", 0.0)
    axes = [a % ndim for a in _ints(ins[3])] if len(ins) > 3 and ins[3] is not None else list(range(ndim))
    if len(pads) != 2 * len(axes) or min(pads, default=0) < 0:
        raise unsupported(node, f"pads {pads} for axes {axes} (negative pads, i.e. cropping, are not supported)")
    width = [(0, 0)] * ndim
    for i, axis in enumerate(axes):
        width[axis] = (pads[i], pads[i + len(axes)])
    return width, float(np.asarray(value).reshape(-1)[0]) if np.size(value) else 0.0


def _pad(node, ins, attrs):
    width, value = pad_widths(node, ins, attrs, np.ndim(ins[0]))
    return np.pad(ins[0], width, constant_values=value)


CONSTANT_OPS = {
    "Constant": _constant_node,
    "Identity": lambda node, ins, attrs: ins[0],
    "Dropout": _dropout,
    "Shape": _shape,
    "Gather": lambda node, ins, attrs: np.take(ins[0], ins[1], axis=attrs.get("axis", 0)),
    "Concat": lambda node, ins, attrs: np.concatenate(ins, axis=attrs["axis"]),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": lambda node, ins, attrs: np.transpose(ins[0], attrs.get("perm")),
    "Slice": _slice,
    "Cast": _cast,
    "ConstantOfShape": _constant_of_shape,
    "Range": lambda node, ins, attrs: np.arange(ins[0], ins[1], ins[2]),
    "Add": lambda node, ins, attrs: ins[0] + ins[1],
    "Sub": lambda node, ins, attrs: ins[0] - ins[1],
    "Mul": lambda node, ins, attrs: ins[0] * ins[1],
    "Div": _divide,
    "Neg": lambda node, ins, attrs: -ins[0],
    "MatMul": lambda node, ins, attrs: np.matmul(ins[0], ins[1]),
    "Relu": lambda node, ins, attrs: np.maximum(ins[0], 0),
    "Pad": _pad,
}


def evaluate_constant(node, ins) -> list:
    """The outputs of ``node`` on the numpy arrays ``ins`` (None for an omitted optional input)."""
    fn = CONSTANT_OPS.get(node.op_type)
    if fn is None:
        raise unsupported(node)
    try:
        out = fn(node, ins, attributes(node))
    except ValueError as e:
        if "unsupported ONNX" in str(e):
            raise
        raise unsupported(node, f"cannot evaluate it on inputs of shapes "
                                f"{[None if v is None else np.shape(v) for v in ins]} ({e})") from e
    return [as_constant(out)]


def conv_pads(node, attrs, spatial, kernel, strides, dilations) -> tuple:
    """(begin, end) padding of the spatial axes of a Conv/AveragePool from ``pads`` or ``auto_pad``; a
    ``ceil_mode`` that changes the output size is an error."""
    auto = attrs.get("auto_pad", "NOTSET")
    n = len(spatial)
    if auto in ("NOTSET", "VALID"):
        pads = _ints(attrs.get("pads", [0] * 2 * n)) if auto == "NOTSET" else [0] * 2 * n
        begin, end = pads[:n], pads[n:]
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        total = [max((math.ceil(x / s) - 1) * s + (k - 1) * d + 1 - x, 0)
                 for x, k, s, d in zip(spatial, kernel, strides, dilations)]
        begin = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
        end = [t - b for t, b in zip(total, begin)]
    else:
        raise unsupported(node, f"auto_pad={auto!r}")
    if "kernel_shape" in attrs and tuple(_ints(attrs["kernel_shape"])) != tuple(kernel):
        raise unsupported(node, f"kernel_shape {attrs['kernel_shape']} differs from the weight's {tuple(kernel)}")
    if attrs.get("ceil_mode", 0):
        for x, k, s, d, b, e in zip(spatial, kernel, strides, dilations, begin, end):
            span = x + b + e - d * (k - 1) - 1
            if span % s:
                raise unsupported(node, "ceil_mode=1 where it changes the output size")
    return tuple(begin), tuple(end)


__all__ = ["SUPPORTED_OPS", "REARRANGE_OPS", "CONSTANT_OPS", "describe", "unsupported", "as_constant",
           "attributes", "evaluate_constant", "conv_pads", "pad_widths"]

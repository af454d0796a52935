"""onnx.py: ONNX networks to the normal form, each supported op checked against onnxruntime (the oracle) on
random inputs; the shared VNN-COMP mnistfc network on its 15 property centres; unsupported graphs rejected
with the documented errors; to_sequential; bounds of the converted network contain onnxruntime's outputs."""
from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

import polytope_lab as pl
from polytope_lab.network import Conv2dOp, IdentityOp, LinearOp
from polytope_lab.onnx import load_onnx, to_sequential

from conftest import real_path

RTOL = 1e-5  # relative to the largest output: onnxruntime computes in float32


def rng(seed=0):
    return np.random.default_rng(seed)


def weights(gen, *shape, scale=1.0):
    return (scale * gen.standard_normal(shape)).astype(np.float32)


def onnx_model(nodes, input_shape, inits=None, opset=13, output="y", inputs=None, outputs=None):
    """An ONNX model of ``nodes`` with one float input "x" of ``input_shape`` and output ``output``."""
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))]
    outputs = outputs or [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def ort_outputs(path, x: np.ndarray) -> np.ndarray:
    """onnxruntime's outputs on ``x`` (N, *input_shape), one example at a time (the ONNX input's batch
    dimension may be fixed at 1), flattened to (N, n_out)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.stack([session.run(None, {name: x[i:i + 1]})[0].reshape(-1) for i in range(x.shape[0])])


def _relative_error(ours, reference) -> float:
    return float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-12))


def _check(model, tmp_path, n=5, seed=1):
    """Save ``model``, convert it, compare with onnxruntime on ``n`` random inputs (and the Sequential when
    the network is a chain); returns the converted network."""
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    net = load_onnx(path)
    x = rng(seed).uniform(-1, 1, (n,) + net.input_shape).astype(np.float32)
    reference = ort_outputs(path, x)
    with torch.no_grad():
        ours = net(torch.from_numpy(x).double()).numpy()
    assert ours.shape == reference.shape
    assert _relative_error(ours, reference) <= RTOL
    if not net.has_skips:
        with torch.no_grad():
            seq = to_sequential(net)(torch.from_numpy(x).double()).reshape(n, -1).numpy()
        assert _relative_error(seq, reference) <= RTOL
    return net


# --------------------------------------------------------------------------------------------------
# one small network per supported op
# --------------------------------------------------------------------------------------------------


def test_gemm_attributes_and_trailing_relu(tmp_path):
    r = rng()
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], alpha=0.7, beta=1.3, transB=1),
             helper.make_node("Relu", ["h"], ["z"]),
             helper.make_node("Gemm", ["z", "W2", "b2"], ["o"]),
             helper.make_node("Relu", ["o"], ["y"])]
    inits = {"W1": weights(r, 8, 6), "b1": weights(r, 1, 8), "W2": weights(r, 8, 3), "b2": weights(r, 3)}
    net = _check(onnx_model(nodes, [1, 6], inits), tmp_path)
    assert len(net.affines) == 3 and isinstance(net.affines[-1], IdentityOp)  # ReLU(f): the ReLU is kept


def test_gemm_trans_a_after_transpose(tmp_path):
    r = rng()
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
             helper.make_node("Gemm", ["t", "W"], ["y"], transA=1)]
    _check(onnx_model(nodes, [1, 4], {"W": weights(r, 4, 3)}), tmp_path)


def test_flatten_gemm_on_a_3d_input(tmp_path):
    r = rng()
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=-2),  # = axis 1 of the rank-3 input
             helper.make_node("Gemm", ["f", "W", "b"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["z"]),
             helper.make_node("Gemm", ["z", "W2", "b2"], ["y"], transB=1)]
    inits = {"W": weights(r, 7, 5), "b": weights(r, 7), "W2": weights(r, 2, 7), "b2": weights(r, 2)}
    net = _check(onnx_model(nodes, [1, 5, 1], inits), tmp_path)
    assert net.input_shape == (5, 1)  # the leading 1 is the batch


def test_matmul_add_folds_into_one_dense_layer(tmp_path):
    r = rng()
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m"]), helper.make_node("Add", ["m", "b1"], ["h"]),
             helper.make_node("Relu", ["h"], ["z"]),
             helper.make_node("MatMul", ["z", "W2"], ["m2"]), helper.make_node("Add", ["b2", "m2"], ["y"])]
    inits = {"W1": weights(r, 5, 4), "b1": weights(r, 4), "W2": weights(r, 4, 3), "b2": weights(r, 3)}
    net = _check(onnx_model(nodes, [1, 5], inits), tmp_path)
    assert all(isinstance(a, LinearOp) for a in net.affines)


def test_matmul_with_the_constant_on_the_left(tmp_path):
    r = rng()
    nodes = [helper.make_node("MatMul", ["W", "x"], ["m"]), helper.make_node("Relu", ["m"], ["z"]),
             helper.make_node("Flatten", ["z"], ["f"]), helper.make_node("MatMul", ["f", "W2"], ["y"])]
    _check(onnx_model(nodes, [1, 5, 2], {"W": weights(r, 4, 5), "W2": weights(r, 8, 3)}), tmp_path)


def test_normalisation_folds_into_the_next_dense_layer(tmp_path):
    r = rng()
    nodes = [helper.make_node("Sub", ["x", "mean"], ["s"]), helper.make_node("Div", ["s", "std"], ["d"]),
             helper.make_node("Mul", ["d", "k"], ["m"]), helper.make_node("Sub", ["c", "m"], ["n"]),
             helper.make_node("Neg", ["n"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "W", "b"], ["y"], transB=1)]
    inits = {"mean": np.array([[[[0.13]], [[0.2]]]], np.float32), "std": np.array([0.3], np.float32),
             "k": weights(r, 1, 2, 3, 3), "c": weights(r, 3), "W": weights(r, 4, 18), "b": weights(r, 4)}
    net = _check(onnx_model(nodes, [1, 2, 3, 3], inits), tmp_path)
    assert len(net.affines) == 1 and isinstance(net.affines[0], LinearOp)


@pytest.mark.parametrize("auto_pad,strides", [(None, 2), ("SAME_UPPER", 1), ("SAME_LOWER", 1), ("VALID", 2),
                                              ("SAME_UPPER", 2), ("SAME_LOWER", 2), ("asymmetric", 1)])
def test_conv_strides_pads_dilations(tmp_path, auto_pad, strides):
    r = rng()
    pad = {None: {"pads": [1, 1, 1, 1]}, "asymmetric": {"pads": [0, 1, 2, 1]}}.get(auto_pad, {"auto_pad": auto_pad})
    nodes = [helper.make_node("Conv", ["x", "K1", "c1"], ["a"], strides=[strides] * 2, kernel_shape=[3, 3], **pad),
             helper.make_node("Relu", ["a"], ["z"]),
             helper.make_node("Conv", ["z", "K2"], ["b"], dilations=[2, 2]),
             helper.make_node("Relu", ["b"], ["z2"]),
             helper.make_node("Flatten", ["z2"], ["y"])]
    inits = {"K1": weights(r, 3, 2, 3, 3), "c1": weights(r, 3), "K2": weights(r, 4, 3, 3, 3)}
    net = _check(onnx_model(nodes, [1, 2, 12, 12], inits), tmp_path)
    assert isinstance(net.affines[0], Conv2dOp) == (auto_pad != "asymmetric" and (strides == 1 or "SAME" not in
                                                                                    str(auto_pad)))


@pytest.mark.parametrize("pad", [0, 1])
def test_per_channel_normalisation_before_a_conv(tmp_path, pad):
    """Folded into the convolution without padding; kept as its own operator before a padded one (the
    padded zeros are not normalised), exact either way."""
    r = rng()
    side = 4 + 2 * pad - 2
    nodes = [helper.make_node("Sub", ["x", "mean"], ["s"]), helper.make_node("Div", ["s", "std"], ["d"]),
             helper.make_node("Conv", ["d", "K"], ["a"], pads=[pad] * 4), helper.make_node("Relu", ["a"], ["z"]),
             helper.make_node("Flatten", ["z"], ["f"]), helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)]
    inits = {"mean": np.array([0.5, -0.2], np.float32).reshape(1, 2, 1, 1),
             "std": np.array([0.25, 0.5], np.float32).reshape(1, 2, 1, 1), "K": weights(r, 3, 2, 3, 3),
             "W": weights(r, 2, 3 * side * side)}
    net = _check(onnx_model(nodes, [1, 2, 4, 4], inits), tmp_path)
    assert isinstance(net.affines[0], Conv2dOp) == (pad == 0)


def _bn_inits(r, c, prefix):
    return {f"{prefix}s": weights(r, c), f"{prefix}b": weights(r, c), f"{prefix}m": weights(r, c),
            f"{prefix}v": r.uniform(0.5, 2.0, c).astype(np.float32)}


def test_batch_normalization_after_conv_and_dense_layers(tmp_path):
    r = rng()
    bn = [f"bn{k}" for k in "sbmv"]
    bn1 = [f"bm{k}" for k in "sbmv"]
    nodes = [helper.make_node("Conv", ["x", "K"], ["a"]),
             helper.make_node("BatchNormalization", ["a"] + bn, ["n"], epsilon=1e-3),
             helper.make_node("Relu", ["n"], ["z"]), helper.make_node("Flatten", ["z"], ["f"]),
             helper.make_node("Gemm", ["f", "W"], ["g"], transB=1),
             helper.make_node("BatchNormalization", ["g"] + bn1, ["h"]),
             helper.make_node("Relu", ["h"], ["z2"]), helper.make_node("Gemm", ["z2", "W2"], ["y"], transB=1)]
    inits = {"K": weights(r, 3, 1, 3, 3), "W": weights(r, 5, 12), "W2": weights(r, 2, 5), **_bn_inits(r, 3, "bn"),
             **_bn_inits(r, 5, "bm")}
    net = _check(onnx_model(nodes, [1, 1, 4, 4], inits), tmp_path)
    assert isinstance(net.affines[0], Conv2dOp) and isinstance(net.affines[1], LinearOp)  # folded


@pytest.mark.parametrize("pool", ["plain", "padded", "padded-include", "global", "asymmetric",
                                  "asymmetric-include"])
def test_average_pool(tmp_path, pool):
    r = rng()
    attrs = {"plain": dict(kernel_shape=[2, 2], strides=[2, 2]),
             "padded": dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             "padded-include": dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2], count_include_pad=1),
             "global": {}, "asymmetric": dict(kernel_shape=[2, 2], pads=[0, 1, 1, 0]),
             "asymmetric-include": dict(kernel_shape=[2, 2], pads=[1, 0, 0, 1], count_include_pad=1)}[pool]
    op = "GlobalAveragePool" if pool == "global" else "AveragePool"
    out = {"plain": 2 * 2, "padded": 4 * 4, "padded-include": 2 * 2, "global": 1, "asymmetric": 4 * 4,
           "asymmetric-include": 4 * 4}[pool]
    nodes = [helper.make_node("Conv", ["x", "K"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["z"]),
             helper.make_node(op, ["z"], ["p"], **attrs), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)]
    _check(onnx_model(nodes, [1, 2, 4, 4], {"K": weights(r, 3, 2, 3, 3), "W": weights(r, 2, 3 * out)}), tmp_path)


@pytest.mark.parametrize("opset", [10, 13])
def test_pad_with_a_value(tmp_path, opset):
    r = rng()
    widths = [0, 0, 1, 0, 0, 0, 0, 2]  # begins, then ends, per axis (N, C, H, W)
    pad = (helper.make_node("Pad", ["x"], ["p"], pads=widths, value=0.5) if opset < 11 else
           helper.make_node("Pad", ["x", "pads", "value"], ["p"]))
    nodes = [pad, helper.make_node("Conv", ["p", "K"], ["a"]), helper.make_node("Relu", ["a"], ["z"]),
             helper.make_node("Flatten", ["z"], ["y"])]
    inits = {"K": weights(r, 2, 1, 3, 3)}
    if opset >= 11:
        inits.update(pads=np.array(widths, np.int64), value=np.array(0.5, np.float32))
    _check(onnx_model(nodes, [1, 1, 4, 4], inits, opset=opset), tmp_path)


def test_nhwc_input_through_transpose_and_reshape(tmp_path):
    r = rng()
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "K", "c"], ["a"]), helper.make_node("Relu", ["a"], ["z"]),
             helper.make_node("Transpose", ["z"], ["u"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["u", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)]
    inits = {"K": weights(r, 3, 2, 3, 3), "c": weights(r, 3), "shape": np.array([1, -1], np.int64),
             "W": weights(r, 2, 12)}
    net = _check(onnx_model(nodes, [1, 4, 4, 2], inits), tmp_path)
    assert net.input_shape == (4, 4, 2)


def _unsqueeze(opset, name, data, axis, out):
    """Unsqueeze/Squeeze with ``axes`` as an attribute (opset 11) or as a constant input (opset 13)."""
    if opset < 13:
        return helper.make_node(name, [data], [out], axes=[axis])
    return helper.make_node(name, [data, f"axis{axis}"], [out])


@pytest.mark.parametrize("opset", [11, 13])
def test_constant_shape_subgraph_feeding_reshape_folds_away(tmp_path, opset):
    r = rng()
    const = lambda out, v: helper.make_node("Constant", [], [out], value=numpy_helper.from_array(v))  # noqa: E731
    nodes = [helper.make_node("Shape", ["x"], ["s"]), const("zero", np.array(0, np.int64)),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0), _unsqueeze(opset, "Unsqueeze", "n", 0, "n1"),
             const("minus1", np.array([-1], np.int64)), helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
             helper.make_node("Identity", ["x"], ["xi"]), helper.make_node("Reshape", ["xi", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "W"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["z"]),
             _unsqueeze(opset, "Unsqueeze", "z", 2, "z3"), _unsqueeze(opset, "Squeeze", "z3", 2, "z2"),
             helper.make_node("Gemm", ["z2", "W2"], ["y"], transB=1)]
    inits = {"W": weights(r, 4, 6), "W2": weights(r, 2, 4)}
    if opset >= 13:
        inits.update(axis0=np.array([0], np.int64), axis2=np.array([2], np.int64))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3])]
    _check(onnx_model(nodes, None, inits, opset=opset, inputs=inputs), tmp_path)


def test_slice_and_gather_of_input_dependent_values(tmp_path):
    r = rng()
    nodes = [helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["s"]),
             helper.make_node("Gather", ["s", "idx"], ["g"], axis=1),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)]
    inits = {"starts": np.array([1], np.int64), "ends": np.array([4], np.int64), "axes": np.array([2], np.int64),
             "idx": np.array([2, 0, 0], np.int64), "W": weights(r, 2, 9)}
    _check(onnx_model(nodes, [1, 3, 5], inits), tmp_path)


def test_residual_adds_become_skip_connections(tmp_path):
    r = rng()
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["a"], transB=1), helper.make_node("Relu", ["a"], ["h"]),
             helper.make_node("Add", ["h", "x"], ["r"]),  # the block's input added to its output
             helper.make_node("Gemm", ["r", "W2", "b2"], ["c"], transB=1), helper.make_node("Relu", ["c"], ["h2"]),
             helper.make_node("Sub", ["h2", "h"], ["r2"]),
             helper.make_node("Gemm", ["r2", "W3"], ["y"], transB=1)]
    inits = {"W1": weights(r, 4, 4), "b1": weights(r, 4), "W2": weights(r, 4, 4), "b2": weights(r, 4),
             "W3": weights(r, 3, 4)}
    net = _check(onnx_model(nodes, [1, 4], inits), tmp_path)
    assert net.has_skips


def test_parallel_branches_meet_again(tmp_path):
    r = rng()
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["a"], transB=1), helper.make_node("Relu", ["a"], ["h1"]),
             helper.make_node("Gemm", ["x", "W2"], ["b"], transB=1), helper.make_node("Relu", ["b"], ["h2"]),
             helper.make_node("Add", ["h1", "h2"], ["s"]), helper.make_node("Gemm", ["s", "W3"], ["y"], transB=1)]
    inits = {"W1": weights(r, 5, 4), "W2": weights(r, 5, 4), "W3": weights(r, 2, 5)}
    net = _check(onnx_model(nodes, [1, 4], inits), tmp_path)
    assert net.has_skips


def concat_model():
    r = rng()
    nodes = [helper.make_node("Conv", ["x", "K1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["h1"]),
             helper.make_node("Conv", ["x", "K2"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["h1", "c", "b", "x"], ["cat"], axis=1),  # relu out, constant, pre-act, input
             helper.make_node("Relu", ["cat"], ["z"]), helper.make_node("Conv", ["z", "K3"], ["y0"]),
             helper.make_node("Flatten", ["y0"], ["f"]), helper.make_node("Concat", ["f", "f"], ["y"], axis=0)]
    inits = {"K1": weights(r, 2, 1, 3, 3), "K2": weights(r, 1, 1, 3, 3), "c": weights(r, 1, 1, 4, 4),
             "K3": weights(r, 2, 5, 3, 3)}
    return onnx_model(nodes, [1, 1, 4, 4], inits)


def test_concat_of_branches_and_constants(tmp_path):
    assert _check(concat_model(), tmp_path).has_skips


def test_concat_into_a_dense_layer_folds_away(tmp_path):
    r = rng()
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["a"], transB=1), helper.make_node("Relu", ["a"], ["h"]),
             helper.make_node("Concat", ["x", "h"], ["c"], axis=1), helper.make_node("Gemm", ["c", "W2"], ["y"])]
    net = _check(onnx_model(nodes, [1, 3], {"W1": weights(r, 4, 3), "W2": weights(r, 7, 2)}), tmp_path)
    assert isinstance(net.affines[-1], LinearOp) and isinstance(net.skips[1][0][1], LinearOp)


def test_vectors_dropout_and_broadcasting_constants(tmp_path):
    r = rng()
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["v"]),  # a vector without the batch axis
             helper.make_node("MatMul", ["v", "W1"], ["m"]), helper.make_node("Add", ["m", "b1"], ["h"]),
             helper.make_node("Dropout", ["h"], ["d"]), helper.make_node("Relu", ["d"], ["z"]),
             helper.make_node("MatMul", ["z", "W2"], ["u"]),  # (1, 1, 4) @ (4, 3)
             helper.make_node("Reshape", ["u", "flat"], ["w"]), helper.make_node("MatMul", ["W3", "w"], ["y"])]
    inits = {"flat": np.array([-1], np.int64), "W1": weights(r, 6, 4), "b1": weights(r, 1, 1, 4),
             "W2": weights(r, 4, 3),
             "W3": weights(r, 2, 3)}
    _check(onnx_model(nodes, [1, 2, 3], inits), tmp_path)


class _ResidualConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 1, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1((x - 0.1) / 0.3)))
        h = torch.relu(self.c2(h) + x)
        return self.fc(self.pool(h).reshape(h.shape[0], -1))


@pytest.mark.parametrize("opset,fold", [(9, False), (17, False), (17, True)])
def test_torch_exported_residual_convnet_with_dynamic_batch(tmp_path, opset, fold):
    """Unfolded exports keep BatchNormalization, the Sub/Div normalisation and the Shape/Gather/Concat
    subgraph of the reshape; opset 9 also writes AveragePool's padding as a Pad."""
    torch.manual_seed(0)
    model = _ResidualConv().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    path = tmp_path / "res.onnx"
    torch.onnx.export(model, torch.zeros(1, 1, 4, 4), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}}, opset_version=opset, do_constant_folding=fold)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert fold or {"BatchNormalization", "Sub", "Div", "Shape", "Gather", "Concat"} <= ops
    assert ("Pad" in ops) == (opset == 9)
    assert _check(onnx.load(str(path)), tmp_path).has_skips


# --------------------------------------------------------------------------------------------------
# the real benchmark network
# --------------------------------------------------------------------------------------------------


def property_centre(path) -> np.ndarray:
    """The midpoint of the X_i bounds of a VNN-LIB file (asserts of the form (<= X_i c) / (>= X_i c))."""
    bounds = {}
    for op, i, value in re.findall(r"\(\s*(<=|>=)\s+X_(\d+)\s+([-+0-9.eE]+)\s*\)", path.read_text()):
        bounds.setdefault(int(i), {})[op] = float(value)
    return np.array([(bounds[i]["<="] + bounds[i][">="]) / 2 for i in range(len(bounds))])


def test_mnistfc_matches_onnxruntime_on_the_property_centres():
    folder = real_path("POLYTOPE_LAB_BENCHMARKS", "vnncomp2021", "mnistfc", what="vnncomp2021/mnistfc/")
    path = folder / "mnist-net_256x2.onnx"
    net = load_onnx(path)
    assert net.input_shape == (784, 1) and net.output_size == 10 and len(net.affines) == 3
    x = np.stack([property_centre(folder / f"prop_{i}_0.03.vnnlib") for i in range(15)]).astype(np.float32)
    assert x.shape == (15, 784) and x.min() >= 0 and x.max() <= 1
    reference = ort_outputs(path, x.reshape(15, 784, 1))
    with torch.no_grad():
        ours = net(torch.from_numpy(x).double().reshape(15, 784, 1)).numpy()
    assert _relative_error(ours, reference) <= RTOL
    assert (ours.argmax(1) == reference.argmax(1)).all()


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,attrs", [("MaxPool", {"kernel_shape": [2, 2]}), ("Sigmoid", {})])
def test_unsupported_op_names_the_node_its_type_and_the_supported_set(tmp_path, op, attrs):
    nodes = [helper.make_node(op, ["x"], ["p"], name="the_culprit", **attrs), helper.make_node("Relu", ["p"], ["y"])]
    with pytest.raises(ValueError, match=rf"'the_culprit' \(op type {op}\).*Supported ops: Add, AveragePool"):
        load_onnx(onnx_model(nodes, [1, 1, 4, 4]))


def test_unsupported_uses_of_supported_ops(tmp_path):
    r = rng()
    mul = [helper.make_node("Mul", ["x", "x"], ["y"])]
    with pytest.raises(ValueError, match="Mul.*not affine"):
        load_onnx(onnx_model(mul, [1, 3]))
    grouped = [helper.make_node("Conv", ["x", "K"], ["y"], group=2)]
    with pytest.raises(ValueError, match="group=2"):
        load_onnx(onnx_model(grouped, [1, 2, 4, 4], {"K": weights(r, 2, 1, 3, 3)}))
    reflect = [helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")]
    with pytest.raises(ValueError, match="mode='reflect'"):
        load_onnx(onnx_model(reflect, [1, 1, 4, 4], {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}))
    cast = [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)]
    with pytest.raises(ValueError, match=r"\(op type Cast\): on an input-dependent value"):
        load_onnx(onnx_model(cast, [1, 3]))
    custom = [helper.make_node("Relu", ["x"], ["y"], domain="com.example")]
    with pytest.raises(ValueError, match="domain 'com.example'"):
        load_onnx(onnx_model(custom, [1, 3]))
    dead = [helper.make_node("Sigmoid", ["x"], ["unused"]), helper.make_node("Relu", ["x"], ["y"])]
    assert load_onnx(onnx_model(dead, [1, 3])).output_size == 3  # a dead branch is never interpreted


def test_graph_shape_errors(tmp_path):
    two_in = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3]) for n in ("x", "x2")]
    with pytest.raises(ValueError, match="one input and one output"):
        load_onnx(onnx_model([helper.make_node("Add", ["x", "x2"], ["y"])], None, inputs=two_in))
    two_out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "y2")]
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["y2"])]
    with pytest.raises(ValueError, match="one input and one output"):
        load_onnx(onnx_model(nodes, [1, 3], outputs=two_out))
    dynamic = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "M"])]
    with pytest.raises(ValueError, match="dynamic dimensions"):
        load_onnx(onnx_model([helper.make_node("Relu", ["x"], ["y"])], None, inputs=dynamic))
    with pytest.raises(ValueError, match="leading dimension must be the batch"):
        load_onnx(onnx_model([helper.make_node("Relu", ["x"], ["y"])], [3, 2]))
    declared = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])]
    with pytest.raises(ValueError, match=r"declared with shape \[1, 5\]"):
        load_onnx(onnx_model([helper.make_node("Relu", ["x"], ["y"])], [1, 3], outputs=declared))
    const = [helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(np.ones(2, np.float32)))]
    with pytest.raises(ValueError, match="does not depend on the input"):
        load_onnx(onnx_model(const, [1, 3]))


# --------------------------------------------------------------------------------------------------
# to_sequential (operators and soundness end to end: test_onnx_ops.py)
# --------------------------------------------------------------------------------------------------


def test_to_sequential_round_trip_and_skip_error(tmp_path):
    r = rng()
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "K"], ["a"]), helper.make_node("Relu", ["a"], ["z"]),
             helper.make_node("Flatten", ["z"], ["f"]), helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)]
    model = onnx_model(nodes, [1, 4, 4, 1], {"K": weights(r, 2, 1, 3, 3), "W": weights(r, 3, 8)})
    net = load_onnx(model)
    seq = load_onnx(model, as_torch=True)
    assert isinstance(seq, nn.Sequential) and any(isinstance(m, nn.Linear) for m in seq)
    back = pl.from_torch(seq, net.input_shape)
    x = torch.rand(3, *net.input_shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(back(x), net(x))
        torch.testing.assert_close(seq(x).reshape(3, -1), net(x))
    loss, _ = pl.robust_loss(seq, 0.05, x, torch.tensor([0, 1, 2]))  # trainable: gradients reach the weights
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in seq.parameters())
    res = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Add", ["h", "x"], ["y"])]
    with pytest.raises(ValueError, match="skip connections"):
        to_sequential(load_onnx(onnx_model(res, [1, 3])))

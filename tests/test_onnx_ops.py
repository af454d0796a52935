"""onnx_ops.py and soundness end to end: the converter's operators are consistent (``transpose`` is the
adjoint, ``as_matrix`` is ``linear``, the interval image contains sampled images) after merging, and the
dual and interval bounds of converted networks contain onnxruntime's outputs on sampled inputs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

import polytope_lab as pl
from polytope_lab import models
from polytope_lab.onnx import load_onnx

from conftest import assert_within, real_path, sample_region
from test_onnx import RTOL, concat_model, onnx_model, ort_outputs, property_centre, rng, weights


def _small_net_for_bounds():
    r = rng(3)
    nodes = [helper.make_node("Sub", ["x", "mean"], ["s"]), helper.make_node("Div", ["s", "std"], ["d"]),
             helper.make_node("Conv", ["d", "K", "c"], ["a"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["a"], ["z"]), helper.make_node("Flatten", ["z"], ["f"]),
             helper.make_node("MatMul", ["f", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["h"]),
             helper.make_node("Relu", ["h"], ["z2"]), helper.make_node("Add", ["z2", "h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], transB=1)]
    inits = {"mean": np.array(0.4, np.float32), "std": np.array(0.2, np.float32), "K": weights(r, 2, 1, 3, 3),
             "c": weights(r, 2), "W": weights(r, 8, 5), "b": weights(r, 5), "W2": weights(r, 3, 5), "b2": weights(r, 3)}
    return onnx_model(nodes, [1, 1, 4, 4], inits)


def _nhwc_net_with_trailing_relu():
    r = rng(4)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "K", "c"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["z"]),
             helper.make_node("AveragePool", ["z"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Transpose", ["p"], ["u"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["u", "shape"], ["f"]), helper.make_node("Gemm", ["f", "W"], ["g"], transB=1),
             helper.make_node("Relu", ["g"], ["y"])]
    inits = {"K": weights(r, 2, 2, 3, 3), "c": weights(r, 2), "shape": np.array([1, -1], np.int64),
             "W": weights(r, 3, 8)}
    return onnx_model(nodes, [1, 4, 4, 2], inits)


NETS_FOR_BOUNDS = {"normalised conv, residual": _small_net_for_bounds, "NHWC, pool, trailing relu":
                   _nhwc_net_with_trailing_relu, "concat": concat_model}


@pytest.mark.parametrize("name", NETS_FOR_BOUNDS)
def test_converted_operators_are_consistent(name):
    """Every operator: ``transpose`` is the adjoint of ``linear``, ``as_matrix`` is ``linear``, and the
    interval image contains the images of sampled points (what every backend relies on)."""
    net = load_onnx(NETS_FOR_BOUNDS[name]())
    g = torch.Generator().manual_seed(0)
    ops = list(net.affines) + [S for terms in net.skips.values() for _, S in terms]
    for op in ops:
        x = torch.randn(3, *op.in_shape, generator=g, dtype=torch.float64)
        y = torch.randn(3, *op.out_shape, generator=g, dtype=torch.float64)
        lhs = (op.linear(x).reshape(3, -1) * y.reshape(3, -1)).sum(1)
        torch.testing.assert_close(lhs, (x.reshape(3, -1) * op.transpose(y).reshape(3, -1)).sum(1))
        dense = torch.from_numpy(op.as_matrix().toarray())
        torch.testing.assert_close(x.reshape(3, -1) @ dense.t(), op.linear(x).reshape(3, -1))
        c, rad = op.interval(x[:1], torch.ones_like(x[:1]))
        pts = x[:1] + (2 * torch.rand(50, *op.in_shape, generator=g, dtype=torch.float64) - 1)
        img = op.forward(pts).reshape(50, -1)
        assert (img >= (c - rad).reshape(1, -1) - 1e-9).all() and (img <= (c + rad).reshape(1, -1) + 1e-9).all()


@pytest.mark.parametrize("name", NETS_FOR_BOUNDS)
@pytest.mark.parametrize("backend", ["dual", "interval", "lp"])
def test_bounds_of_the_converted_network_contain_onnxruntime_outputs(tmp_path, backend, name):
    path = tmp_path / "small.onnx"
    onnx.save(NETS_FOR_BOUNDS[name](), str(path))
    net = load_onnx(path)
    x = torch.from_numpy(rng(5).uniform(0, 1, (2,) + net.input_shape))
    region = pl.LinfBall(x, 0.1, clip=(0.0, 1.0))
    b = pl.Bounder.create(backend).bound(net, region)
    points = sample_region(region, 100).float()  # (N, B, *input_shape)
    N, B = points.shape[:2]
    values = ort_outputs(path, points.reshape(N * B, *net.input_shape).numpy()).reshape(N, B, -1)
    scale = max(1.0, float(np.abs(values).max()))
    assert_within(torch.from_numpy(values).double(), b.lower, b.upper, tol=RTOL * scale,
                  what="onnxruntime's outputs")


def test_mnistfc_dual_bounds_contain_onnxruntime_outputs():
    folder = real_path("POLYTOPE_LAB_BENCHMARKS", "vnncomp2021", "mnistfc", what="vnncomp2021/mnistfc/")
    path = folder / "mnist-net_256x2.onnx"
    net = load_onnx(path)
    x = torch.from_numpy(property_centre(folder / "prop_0_0.03.vnnlib")).reshape(1, 784, 1)
    region = pl.LinfBall(x, 0.02, clip=(0.0, 1.0))
    b = pl.Bounder.create("dual").bound(net, region)
    points = sample_region(region, 50).float()
    values = ort_outputs(path, points.reshape(-1, 784, 1).numpy()).reshape(points.shape[0], 1, 10)
    assert_within(torch.from_numpy(values).double(), b.lower, b.upper, tol=1e-4, what="onnxruntime's outputs")
    net32 = load_onnx(path, dtype=torch.float32)
    assert net32.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(net32(x.float()).double(), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NETS_FOR_BOUNDS)
def test_every_backend_agrees_on_converted_networks(name):
    """cross_check's sandwich (dual ≤ LP ≤ MILP exact ≤ PGD attack) holds on each converted network."""
    net = load_onnx(NETS_FOR_BOUNDS[name]())
    x = torch.from_numpy(rng(6).uniform(0, 1, (1,) + net.input_shape))
    table = pl.cross_check(net, pl.LinfBall(x, 0.05, clip=(0.0, 1.0)), C=torch.eye(net.output_size)[:2],
                           attack_steps=20)
    bounds = table[table["status"] != "attack"]  # the attack's rows are the reference
    assert len(bounds) >= 10 and (bounds["verdict"] == "ok").all(), bounds


def test_exported_paper_convnet_gives_the_same_bounds_as_from_torch(tmp_path):
    """torch model → ONNX → load_onnx bounds exactly like from_torch on the model itself."""
    torch.manual_seed(0)
    model = models.mnist_convnet().double().eval()
    path = tmp_path / "convnet.onnx"
    torch.onnx.export(model.float(), torch.zeros(1, 1, 28, 28), str(path), dynamo=False)
    model.double()
    net = load_onnx(path)
    assert [type(a).__name__ for a in net.affines] == ["Conv2dOp", "Conv2dOp", "LinearOp", "LinearOp"]
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    region = pl.LinfBall(x, 0.05, clip=(0.0, 1.0))
    ours, theirs = (pl.Bounder.create("dual").bound(m, region) for m in (net, model))
    torch.testing.assert_close(ours.lower, theirs.lower, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.upper, theirs.upper, rtol=1e-6, atol=1e-6)

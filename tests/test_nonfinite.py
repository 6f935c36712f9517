"""NaN and infinity in weights, statistics and calibration data: no pass quantizes, converts or folds them
silently into something the original model does not compute.

- place-qdq / int8-dynamic: a weight holding NaN/inf stays float, with a warning naming it and the count.
- to-fp16: weights with NaN/inf or values beyond float16's range are named; a NaN never hides a large value.
- calibration data with NaN/inf are refused (InputError naming the input and the counts); observers never
  give a NaN or infinite range.
- fold-bn: a BatchNormalization with var + eps <= 0 or NaN statistics is left, with a note naming it; the
  result equals the unfolded model.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import graphopt
from graphopt.calib import HistogramObserver, MinMaxObserver, ObserverError, compute_range, load_calibration
from graphopt.calib.errors import CalibrationInputError
from graphopt.errors import InputError
from graphopt.ir import OnnxGraph
from graphopt.ir.fx_graph import FxGraph
from graphopt.passes.base import PassContext

RNG = np.random.default_rng(0)


def two_branch_convs(bad_weight: np.ndarray) -> onnx.ModelProto:
    """x -> Conv(wa) -> ya and x -> Conv(wb) -> yb: the branch with the bad weight cannot spoil the other."""
    wb = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "wa"], ["ya"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "wb", "bb"], ["yb"], name="conv_b", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8, 8]) for n in ("ya", "yb")],
        [numpy_helper.from_array(bad_weight, "wa"), numpy_helper.from_array(wb, "wb"),
         numpy_helper.from_array(np.full(4, 0.1, np.float32), "bb")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def bad_conv_weight():
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w[1, 0, 0, 0], w[2, 1, 1, 1], w[3, 2, 2, 2] = np.nan, np.inf, -np.inf
    return w


def producer(graph: OnnxGraph, name: str) -> str | None:
    tensor = graph.gs.tensors()[name]
    return tensor.inputs[0].op if tensor.inputs else None


def test_place_qdq_leaves_a_conv_with_a_nan_weight_float_and_names_it():
    model = two_branch_convs(bad_conv_weight())
    calibration = {"x": RNG.standard_normal((16, 3, 8, 8)).astype(np.float32)}
    ctx = PassContext(calibration=calibration)
    result = graphopt.optimize(model, "int8", check=False, ctx=ctx)
    convs = {n.name: n for n in result.graph.gs.nodes if n.op == "Conv"}
    assert convs["conv_a"].inputs[1].name == "wa"  # the float weight itself, no DequantizeLinear in front
    assert producer(result.graph, convs["conv_b"].inputs[1].name) == "DequantizeLinear"
    warning = next(w for w in ctx.warnings if "'wa'" in w)
    assert "conv_a" in warning and "3 non-finite values" in warning and "of 108" in warning
    x = calibration["x"][:1]
    (ya, yb), (qa, qb) = OnnxGraph.from_model(model).run({"x": x}), result.graph.run({"x": x})
    np.testing.assert_array_equal(np.isnan(qa), np.isnan(ya))  # the NaN/inf channels stay where they were
    finite = np.isfinite(ya)
    np.testing.assert_allclose(qa[finite], ya[finite], atol=0.1 * np.abs(ya[finite]).max())
    np.testing.assert_allclose(qb, yb, atol=0.05 * np.abs(yb).max())  # the other branch is quantized


def test_place_qdq_leaves_a_conv_with_a_nan_bias_float():
    model = two_branch_convs(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32))
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.float32([0.1, np.nan, 0.1, 0.1]), "bb"))
    ctx = PassContext(calibration={"x": RNG.standard_normal((8, 3, 8, 8)).astype(np.float32)})
    result = graphopt.optimize(model, "int8", check=False, ctx=ctx)
    conv_b = next(n for n in result.graph.gs.nodes if n.name == "conv_b")
    assert conv_b.inputs[1].name == "wb"
    assert any("'bb'" in w and "1 non-finite values" in w for w in ctx.warnings)


def matmuls(bad: np.ndarray) -> onnx.ModelProto:
    good = RNG.standard_normal((8, 6)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wa"], ["ya"], name="mm_a"),
         helper.make_node("MatMul", ["x", "wb"], ["yb"], name="mm_b")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 6]) for n in ("ya", "yb")],
        [numpy_helper.from_array(bad, "wa"), numpy_helper.from_array(good, "wb")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_int8_dynamic_leaves_a_matmul_with_a_nan_weight_float_and_names_it():
    w = RNG.standard_normal((8, 6)).astype(np.float32)
    w[0, 0], w[3, 2] = np.nan, np.inf
    ctx = PassContext()
    result = graphopt.optimize(matmuls(w), "int8-dynamic", check=False, ctx=ctx)
    counts = result.graph.op_counts()
    assert counts["MatMul"] == 1 and counts["MatMulInteger"] == 1
    (mm,) = [n for n in result.graph.gs.nodes if n.op == "MatMul"]
    assert mm.name == "mm_a" and mm.inputs[1].name == "wa"
    assert any("'wa'" in w and "2 non-finite values" in w for w in ctx.warnings)
    assert any("NaN/inf" in note for note in result.report.records[0].notes)


def scaled_input_model(w: np.ndarray) -> onnx.ModelProto:
    """y = Relu(x * w): w is read by one op that converts to float16 unless the overflow check keeps it."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["m"], name="mul"), helper.make_node("Relu", ["m"], ["y"], name="relu")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, len(w)])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, len(w)])], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_to_fp16_keeps_a_large_weight_beside_a_nan_in_float32():
    w = np.float32([np.nan, 1e6, 0.5, -2.0])
    x = np.abs(RNG.standard_normal((4, 4))).astype(np.float32) * 1e-3  # the product stays in float16's range
    ctx = PassContext(calibration={"x": x})
    result = graphopt.optimize(scaled_input_model(w), "fp16", check=False, ctx=ctx)
    (y,) = result.graph.run({"x": x})
    (y32,) = OnnxGraph.from_model(scaled_input_model(w)).run({"x": x})
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y32))
    finite = ~np.isnan(y32)
    np.testing.assert_allclose(y[finite], y32[finite], rtol=1e-3)  # not 65504 * x: w stayed float32
    assert result.graph.gs.tensors()["w"].values.dtype == np.float32


def test_to_fp16_names_saturated_and_nonfinite_weights():
    w = np.float32([np.nan, 1e6, 0.5, np.inf])
    ctx = PassContext()
    result = graphopt.optimize(scaled_input_model(w), "to-fp16:check_overflow=false", check=False, ctx=ctx)
    assert result.graph.gs.tensors()["w"].values.dtype == np.float16
    assert any("'w'" in m and "2 non-finite values" in m for m in ctx.warnings)
    assert any("'w'" in m and "1 values beyond float16's range" in m and "saturated" in m for m in ctx.warnings)
    assert any("'w'" in note for note in result.report.records[0].notes)


# -- calibration data ------------------------------------------------------------------------------------------
SPECS = [("x", ("N", 3, 4, 4), np.float32), ("ids", ("N", 2), np.int64)]


def calib(x):
    return {"x": x, "ids": np.zeros((len(x), 2), np.int64)}


@pytest.mark.parametrize("how", ["some", "all", "inf", "float64-overflow"])
def test_nonfinite_calibration_data_refused_naming_input_and_counts(how):
    x = RNG.standard_normal((10, 3, 4, 4))
    if how == "some":
        x[3, 0, 0, 0] = x[3, 1, 2, 3] = x[7, 2, 1, 1] = np.nan
        counts = ("3 non-finite values", "in 2 of samples 0..7", "first: sample 3")
    elif how == "all":
        x[:] = np.nan
        counts = ("384 non-finite values", "in 8 of samples 0..7", "first: sample 0")
    elif how == "inf":
        x[9, 0, 0, 0] = -np.inf
        counts = ("1 non-finite values", "in 1 of samples 8..9", "first: sample 9")
    else:  # finite float64, beyond float32's range once cast to the model's type
        x[5, 0, 0, 0] = 1e39
        counts = ("1 non-finite values", "in 1 of samples 0..7", "first: sample 5")
    data = load_calibration(calib(x if how == "float64-overflow" else x.astype(np.float32)), SPECS)
    with pytest.raises(CalibrationInputError) as info:
        list(data.batches())
    message = str(info.value)
    assert "input 'x'" in message and all(c in message for c in counts), message
    assert "\n" not in message and isinstance(info.value, InputError) and info.value.exit_code == 3


def test_int8_refuses_nan_calibration_data_with_an_input_error():
    x = np.full((8, 3, 8, 8), np.nan, np.float32)
    model = two_branch_convs(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32))
    with pytest.raises(InputError, match=r"input 'x' has 192 non-finite values \(NaN/inf\) in sample 0;"):
        graphopt.optimize(model, "int8", check=False, calibration={"x": x})


values = hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(width=32, allow_nan=True,
                                                                        allow_infinity=True, allow_subnormal=True))


@settings(max_examples=150, deadline=None)
@given(batches=st.lists(values, min_size=1, max_size=3), method=st.sampled_from(["minmax", "percentile", "entropy",
                                                                                  "mse"]),
       symmetric=st.booleans())
def test_observers_never_give_a_nonfinite_range(batches, method, symmetric):
    observer = HistogramObserver(64) if method != "minmax" else MinMaxObserver()
    for batch in batches:
        observer.update(batch)
    finite = np.concatenate([b[np.isfinite(b)] for b in batches]).astype(np.float64)
    if finite.size == 0:
        with pytest.raises(ObserverError, match="no finite values"):
            compute_range(observer, method, symmetric=symmetric)
        return
    low, high = compute_range(observer, method, symmetric=symmetric)
    assert np.isfinite(low) and np.isfinite(high) and low <= high
    assert observer.nonfinite == sum(int(np.size(b) - np.isfinite(b).sum()) for b in batches)
    if method == "minmax" and not symmetric:
        assert (low, high) == (finite.min(), finite.max())


def test_histogram_of_float64_values_near_the_largest_double():
    observer = HistogramObserver(64)
    observer.update(np.array([-1.7e308, 0.0, 1.7e308]))
    assert compute_range(observer, "percentile", percentile=100) == (-1.7e308, 1.7e308)


# -- fold-bn ----------------------------------------------------------------------------------------------------
def conv_bn_relu(var: np.ndarray, eps: float) -> onnx.ModelProto:
    c = len(var)
    tensors = {"w": RNG.standard_normal((c, 2, 3, 3)), "g": RNG.random(c) + 0.5, "b": RNG.standard_normal(c),
               "m": RNG.standard_normal(c), "v": var}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn", epsilon=eps),
         helper.make_node("Relu", ["n"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, c, 6, 6])],
        [numpy_helper.from_array(np.asarray(a, np.float32), k) for k, a in tensors.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


@pytest.mark.parametrize("var,eps,why", [
    ([1.0, -0.5, 2.0], 1e-5, "var + epsilon <= 0"),  # negative: the root of a negative
    ([1.0, 0.0, 2.0], 0.0, "var + epsilon <= 0"),  # zero: an infinite scale (Relu clamps the unfolded -inf)
    ([1.0, -1e-5, 2.0], 1e-5, "var + epsilon <= 0"),  # eps exactly cancels var
    ([1.0, np.nan, 2.0], 1e-5, "NaN/inf scale or shift"),
    ("inf mean", 1e-5, "NaN/inf scale or shift"),
])
def test_fold_bn_leaves_a_batch_norm_with_broken_statistics(registry, var, eps, why):
    model = conv_bn_relu(np.float32([1.0, 1.0, 1.0] if isinstance(var, str) else var), eps)
    if isinstance(var, str):
        model.graph.initializer[3].CopyFrom(numpy_helper.from_array(np.float32([0.0, np.inf, 0.0]), "m"))
    graph = OnnxGraph.from_model(model)
    result = registry.passes["fold-bn"]()(graph.copy())
    assert not result.modified and result.graph.op_counts()["BatchNormalization"] == 1
    (note,) = result.notes
    assert why in note and "(bn)" in note
    x = RNG.standard_normal((2, 2, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(result.graph.run({"x": x})[0], graph.run({"x": x})[0])


def test_fold_bn_leaves_a_fold_that_overflows_float32(registry):
    """var + eps tiny but positive: the scale (2e19) is finite, weights times it overflow float32."""
    model = conv_bn_relu(np.float32([1.0, 1.0, 1.0]), 1e-5)
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[0] = 1e20
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    model.graph.initializer[4].CopyFrom(numpy_helper.from_array(np.float32([1e-39, 1.0, 1.0]), "v"))
    model.graph.node[1].attribute[0].f = 1e-39
    result = registry.passes["fold-bn"]()(OnnxGraph.from_model(model))
    assert not result.modified and "would overflow" in result.notes[0]


@pytest.mark.parametrize("var", [[1.0, 0.5, 2.0], [1.0, np.inf, 2.0]])  # an infinite var: scale 0, exact
def test_fold_bn_still_folds_statistics_with_a_finite_scale_and_shift(registry, var):
    graph = OnnxGraph.from_model(conv_bn_relu(np.float32(var), 1e-5))
    result = registry.passes["fold-bn"]()(graph.copy())
    assert result.stats == {"folded BatchNormalization": 1}
    x = RNG.standard_normal((2, 2, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(result.graph.run({"x": x})[0], graph.run({"x": x})[0], rtol=1e-5, atol=1e-5)


def test_fold_bn_fx_leaves_negative_running_var(registry):
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_var.copy_(torch.tensor([1.0, -0.5, 2.0]))
    x = torch.randn(2, 2, 6, 6)
    graph = FxGraph.from_module(model, (x,))
    result = registry.passes["fold-bn"]()(graph)
    assert not result.modified and "var + epsilon <= 0" in result.notes[0]
    with torch.no_grad():
        torch.testing.assert_close(result.graph.gm(x), model(x), equal_nan=True)


def test_prune_leaves_a_group_whose_weight_holds_nan_whole_and_names_it(registry):
    """Channel scores from a NaN/inf weight rank nothing (argsort puts NaN last, so the NaN channels would be
    kept and the healthy ones dropped): that group is kept whole with the tensor named; the other is pruned."""
    def chain(tag, w):
        return [helper.make_node("Conv", ["x", f"w{tag}"], [f"h{tag}"], name=f"conv_{tag}", pads=[1, 1, 1, 1]),
                helper.make_node("Relu", [f"h{tag}"], [f"r{tag}"]),
                helper.make_node("Conv", [f"r{tag}", f"v{tag}"], [f"y{tag}"], name=f"out_{tag}")]

    weights = {"wa": bad_conv_weight(), "wb": RNG.standard_normal((4, 3, 3, 3)).astype(np.float32),
               "va": RNG.standard_normal((2, 4, 1, 1)).astype(np.float32),
               "vb": RNG.standard_normal((2, 4, 1, 1)).astype(np.float32)}
    graph = helper.make_graph(
        chain("a", weights["wa"]) + chain("b", weights["wb"]), "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(f"y{t}", TensorProto.FLOAT, [1, 2, 8, 8]) for t in "ab"],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = OnnxGraph.from_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    result = registry.passes["prune-channels"]()(model.copy())
    assert any("'wa' holds NaN or infinite values" in note for note in result.notes), result.notes
    shapes = {t.name: t.values.shape for t in result.graph.gs.tensors().values() if hasattr(t, "values")}
    assert shapes["wa"] == (4, 3, 3, 3) and shapes["wb"] == (2, 3, 3, 3)

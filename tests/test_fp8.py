"""fp8 E4M3 Q/DQ: the scheme data (float8e4m3fn TensorQuant, scale = amax / 448, zero point 0, opset 19), the
tensorrt backend's fp8 request and the onnxruntime backend's refusal, and a ResNet-18-like quantized end to end
for TensorRT (Q/DQ on the inputs of its fp8 ops, fused residual Adds). onnxruntime's CPU provider runs float8 Q/DQ
by dequantizing to float32, so the graph's accuracy is measured here."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import graphopt
from graphopt.backends import OnnxRuntimeBackend
from graphopt.backends.scheme import FP8, QuantRequest, TensorQuant, UnsupportedRequestError
from graphopt.backends.tensorrt import TensorRTBackend
from graphopt.calib.qparams import quantize
from graphopt.numeric import sqnr_db

E4M3 = onnx.TensorProto.FLOAT8E4M3FN
FP8_SQNR_DB = 25.0  # issue 10's bar for fp8 mode on onnxruntime


# -- the scheme as data ----------------------------------------------------------------------------------------------
def test_fp8_params_are_amax_over_448_with_a_float8_zero():
    tq = TensorQuant(FP8, symmetric=True)
    scale, zero = tq.params(-3.0, 1.5)
    assert float(scale) == pytest.approx(3.0 / 448, rel=1e-7) and float(scale) >= 3.0 / 448
    assert zero.dtype == np.dtype(ml_dtypes.float8_e4m3fn) and float(zero) == 0.0
    q = tq.quantize(np.array([-3.0, 1.5, 1000.0, 0.0]), scale, zero)
    assert q.dtype == tq.np_dtype
    assert q.astype(np.float32).tolist()[0] == -448.0 and q.astype(np.float32).tolist()[2] == 448.0  # saturates
    # rounds x / scale to the nearest float8 (3 mantissa bits: 1.5 / scale = 224 is exact, 225 -> 224)
    assert float(quantize(np.array([225 * float(scale)]), scale, 0.0, FP8)[0]) == 224.0


def test_float8_is_symmetric_only():
    with pytest.raises(ValueError, match="symmetrically"):
        TensorQuant(FP8, symmetric=False)


def test_tensorrt_fp8_request_gives_fp8_weights_and_activations_at_opset_19():
    s = TensorRTBackend().scheme(QuantRequest(activation_dtype=FP8))
    assert (s.activations.dtype, s.weights.dtype) == (FP8, FP8)
    assert s.activations.symmetric and s.weights.symmetric and s.weights.per_channel
    assert not s.activations.per_channel and s.min_opset == 19
    with pytest.raises(UnsupportedRequestError, match="together"):
        TensorRTBackend().scheme(QuantRequest(activation_dtype=FP8, weight_dtype="int8"))
    with pytest.raises(UnsupportedRequestError, match="symmetric"):
        TensorRTBackend().scheme(QuantRequest(activation_dtype=FP8, activation_symmetric=False))


def test_onnxruntime_backend_refuses_fp8_in_one_line(zoo_onnx):
    with pytest.raises(UnsupportedRequestError, match="no float8 kernels") as info:
        graphopt.optimize(zoo_onnx("tiny_resnet"), "fold,fp8", backend="onnxruntime", check=False)
    assert "\n" not in str(info.value)


# -- onnxruntime keeps a Relu before a float8 Q (graphopt.ir.ort_quirks) ---------------------------------------------
def test_relu_before_a_float8_quantize_is_kept_on_onnxruntime():
    """onnxruntime's ReluQuantRewrite would drop the Relu (it assumes Q clamps at the zero point): the negative
    values must still come out 0."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [8])],
        [numpy_helper.from_array(np.array(0.01, np.float32), "s"),
         numpy_helper.from_array(np.array(0, ml_dtypes.float8_e4m3fn), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    x = np.linspace(-2, 2, 8, dtype=np.float32)
    backend = OnnxRuntimeBackend()
    y = backend.run(backend.session(model), {"x": x})[0]
    assert (y[x < 0] == 0).all() and (y[x > 0] > 0).all()


# -- a ResNet-18-like end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp8_resnet(zoo_onnx):
    rng = np.random.default_rng(0)
    calib = {"input": rng.standard_normal((8, 3, 224, 224)).astype(np.float32)}
    path = zoo_onnx("resnet18_like")
    result = graphopt.optimize(path, "fold,fp8", calibration=calib, check=False, backend="tensorrt")
    return path, result.graph


def test_every_qdq_is_float8_e4m3_with_zero_point_0(fp8_resnet):
    _, graph = fp8_resnet
    model = graph.to_model()
    onnx.checker.check_model(model, full_check=True)
    assert graph.opset >= 19
    inits = {t.name: t for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 40
    for node in qdq:
        zero = inits[node.input[2]]
        assert zero.data_type == E4M3, node.name
        assert not numpy_helper.to_array(zero).astype(np.float32).any(), node.name
    producers = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 20
    stem = convs[0]  # the 7x7 stem stays float: ModelOpt's fp8 rule takes filters of at most 32 taps
    assert stem.input[1] in inits and stem.input[0] not in producers
    for conv in convs[1:]:  # per-channel float8 weights whose largest value per channel lands on 448
        dq = producers[conv.input[1]]
        q = numpy_helper.to_array(inits[dq.input[0]])
        scale = numpy_helper.to_array(inits[dq.input[1]])
        assert inits[dq.input[0]].data_type == E4M3 and scale.shape == (q.shape[0],)
        assert helper.get_attribute_value(next(a for a in dq.attribute if a.name == "axis")) == 0
        peaks = np.abs(q.astype(np.float32)).reshape(q.shape[0], -1).max(axis=1)
        assert (peaks[peaks > 0] == 448).all(), conv.name


def test_fp8_resnet_runs_on_onnxruntime_within_25_db(fp8_resnet):
    """Measured 32.8 dB over 4 inputs that are not calibration samples (TensorRT's form: the classifier, a
    batch-1 matrix-vector product, stays float; 25.7 dB when the logits were quantized too)."""
    path, graph = fp8_resnet
    backend = OnnxRuntimeBackend()
    fp32, fp8 = backend.session(path), backend.session(graph.to_model())
    xs = [np.random.default_rng(10 + i).standard_normal((1, 3, 224, 224)).astype(np.float32) for i in range(4)]
    ref = np.concatenate([backend.run(fp32, {"input": x})[0] for x in xs])
    out = np.concatenate([backend.run(fp8, {"input": x})[0] for x in xs])
    assert sqnr_db(ref, out) >= FP8_SQNR_DB

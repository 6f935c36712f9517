"""The backend layer: the onnxruntime backend's int8 scheme (data place-qdq reads), its sessions, bench and
evaluate, and the metrics in graphopt.report (SQNR, cosine, relative error, top-1, per-layer SQNR)."""

from __future__ import annotations

import copy
import math
import os
import pickle

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.backends import (
    BackendError,
    OnnxRuntimeBackend,
    QuantRequest,
    QuantScheme,
    TensorQuant,
    UnsupportedRequestError,
)
from graphopt.backends.base import DataError, LatencyStats, iter_batches
from graphopt.errors import UsageError
from graphopt.report.metrics import (
    compare_models,
    cosine_similarity,
    match_tensors,
    max_rel_error,
    per_layer_sqnr,
    sqnr_db,
    top1_accuracy,
    top1_agreement,
)


# -- models shared with tests/test_cli_bench_compare.py ----------------------------------------------------------
def export_tiny(path, keep_bn: bool = True) -> str:
    """The zoo's tiny ResNet with a dynamic batch dimension (input 'input', 1x3x32x32 when batch is 1)."""
    from graphopt import zoo

    return zoo.export_onnx(zoo.tiny_resnet(), str(path), (1, 3, 32, 32), keep_bn=keep_bn, dynamic_batch=True)


def quantize_ort(src, dst) -> str:
    """A known int8 model: onnxruntime's own quantize_static (QDQ, uint8 activations, int8 per-channel weights),
    calibrated on four fixed-seed batches."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            self.batches = iter([{"input": rng.standard_normal((4, 3, 32, 32)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return str(dst)


def small_model(inputs, outputs, nodes, initializers=()) -> onnx.ModelProto:
    """A hand-built model (opset 17, an IR version onnxruntime 1.x reads)."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def identity_model(shape) -> onnx.ModelProto:
    """logits in, logits out: evaluate's accuracy is then known exactly."""
    return small_model([helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                       [helper.make_node("Identity", ["x"], ["y"])])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("backend") / "tiny.onnx")


@pytest.fixture(scope="module")
def tiny_folded(tmp_path_factory):
    """BatchNorm folded by the exporter, as one quantizes a model."""
    return export_tiny(tmp_path_factory.mktemp("backend-f") / "tiny.fp32.onnx", keep_bn=False)


@pytest.fixture(scope="module")
def tiny_int8(tiny_folded, tmp_path_factory):
    return quantize_ort(tiny_folded, tmp_path_factory.mktemp("backend-q") / "tiny.int8.onnx")


@pytest.fixture(scope="module")
def ort_backend():
    return OnnxRuntimeBackend(reduce_range=False)  # the scheme of a CPU with VNNI; reduce_range is tested apart


# -- the scheme -----------------------------------------------------------------------------------------------
def test_registered_through_the_plugin_hook(registry):
    backend = registry.backends["onnxruntime"]
    assert isinstance(backend, OnnxRuntimeBackend) and backend.name == "onnxruntime"


def test_onnxruntime_scheme_is_the_fast_x86_form(ort_backend):
    s = ort_backend.scheme()
    # uint8 asymmetric activations x int8 symmetric per-channel weights (int8 activations are slower on x86)
    assert (s.activations.dtype, s.activations.symmetric, s.activations.per_channel) == ("uint8", False, False)
    assert (s.weights.dtype, s.weights.symmetric, s.weights.per_channel) == ("int8", True, True)
    assert (s.weights.qmin, s.weights.qmax) == (-127, 127) and (s.activations.qmin, s.activations.qmax) == (0, 255)
    assert s.format == "QDQ" and s.min_opset >= 13 and s.warnings == ()
    # per-channel axis = the weight's output-channel axis
    assert s.channel_axis("Conv") == 0
    assert s.channel_axis("Gemm", {"transB": 0}, weight_rank=2) == 1
    assert s.channel_axis("Gemm", {"transB": 1}, weight_rank=2) == 0
    assert s.channel_axis("MatMul", weight_rank=2) == 1 and s.channel_axis("MatMul", weight_rank=3) == 2
    assert s.channel_axis("Relu") is None
    assert s.weighted_ops == {"Conv", "Gemm", "MatMul"}
    # int8 kernels that requantize (QLinearAdd for residual Adds), ops that pass int8 through, absorbed Relu
    assert {"Conv", "Gemm", "MatMul", "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool"} <= s.quantized_ops
    passthrough = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather"}
    assert passthrough <= s.passthrough_ops
    assert s.fused_activations == {"Relu", "Clip"}
    assert not s.quantized_ops & s.passthrough_ops
    # no int8 ConvTranspose on onnxruntime's CPU provider; Softmax etc. stay float
    assert not s.takes_int8("ConvTranspose") and not s.takes_int8("Softmax") and s.takes_int8("MaxPool")
    assert s.residual_add_qdq is True
    assert s.bias == "float"  # onnxruntime >= 1.21 folds a float bias to int32 itself (1.31 here)
    assert s.to_dict()["activations"] == {"dtype": "uint8", "symmetric": False, "per_channel": False,
                                          "narrow_range": False, "reduce_range": False}
    assert ort_backend.scheme(QuantRequest()) == s and hash(ort_backend.scheme()) == hash(s)
    assert copy.deepcopy(s) == s and pickle.loads(pickle.dumps(s)) == s  # a context holding it can be copied
    with pytest.raises(TypeError, match="read-only"):
        s.weight_channel_axis["Conv"] = 1


def test_requests_are_honoured_warned_or_refused(ort_backend):
    s = ort_backend.scheme(QuantRequest(activation_dtype="int8"))
    assert s.activations.dtype == "int8" and len(s.warnings) == 1 and "slower than fp32" in s.warnings[0]
    s = ort_backend.scheme(QuantRequest(activation_symmetric=True))
    assert s.activations == TensorQuant("uint8", symmetric=True) and s.warnings == ()
    s = ort_backend.scheme(QuantRequest(per_channel=False))
    assert not s.weights.per_channel and s.channel_axis("Conv") is None
    s = ort_backend.scheme(QuantRequest(weight_symmetric=False))
    assert not s.weights.symmetric and (s.weights.qmin, s.weights.qmax) == (-128, 127)
    s = ort_backend.scheme(QuantRequest(op_types={"Conv", "MaxPool", "Relu"}))
    assert (s.quantized_ops, s.passthrough_ops, s.fused_activations) == ({"Conv"}, {"MaxPool"}, {"Relu"})
    assert dict(s.weight_channel_axis) == {"Conv": 0}
    s = ort_backend.scheme(QuantRequest(exclude_op_types={"Add", "Gemm", "Reshape"}))
    assert not {"Add", "Gemm"} & s.quantized_ops and "Reshape" not in s.passthrough_ops and "Gemm" not in s.weighted_ops
    with pytest.raises(UnsupportedRequestError, match="ConvTranspose.*no int8 ConvTranspose"):
        ort_backend.scheme(QuantRequest(op_types={"Conv", "ConvTranspose"}))
    with pytest.raises(UnsupportedRequestError, match="int4"):
        QuantRequest(activation_dtype="int4")
    with pytest.raises(UnsupportedRequestError, match="symmetric uint8 weights"):
        ort_backend.scheme(QuantRequest(weight_dtype="uint8"))


def test_weights_use_the_reduced_range_where_u8s8_kernels_saturate(monkeypatch):
    """Without VNNI, onnxruntime's uint8 x int8 kernels add two products in an int16 (vpmaddubsw): full-range
    weights saturate it. The backend then asks for weights in [-64, 64]; 255 * 64 * 2 fits in an int16."""
    import graphopt.backends.cpu as cpu_module

    reduced = OnnxRuntimeBackend(reduce_range=True).scheme().weights
    assert (reduced.qmin, reduced.qmax) == (-64, 64) and 255 * reduced.qmax * 2 <= 2**15 - 1
    scale, zero = reduced.params(-1.0, 0.5)
    assert float(scale) == np.float32(1 / 64) and int(zero) == 0
    assert OnnxRuntimeBackend(reduce_range=True).scheme(QuantRequest(per_channel=False)).weights.reduce_range
    for machine, vnni, expected in [("x86_64", False, True), ("x86_64", True, False), ("x86_64", None, True),
                                    ("aarch64", None, False)]:
        monkeypatch.setattr(cpu_module.platform, "machine", lambda machine=machine: machine)
        flags = None if vnni is None else frozenset({"avx512_vnni"} if vnni else {"avx2"})
        monkeypatch.setattr(cpu_module, "cpu_flags", lambda flags=flags: flags)
        assert OnnxRuntimeBackend().reduce_range is expected, (machine, vnni)


def test_tensorrt_like_symmetric_scheme_fits_the_same_data():
    """TensorRT's explicit-quantization rules written as a QuantScheme: nothing TensorRT-specific
    is needed by a reader of the scheme."""
    trt = QuantScheme(
        backend="tensorrt", activations=TensorQuant("int8", symmetric=True, narrow_range=True),
        weights=TensorQuant("int8", symmetric=True, per_channel=True, narrow_range=True),
        weight_channel_axis={"Conv": 0, "ConvTranspose": 1, "Gemm": 1, "MatMul": -1},
        quantized_ops={"Conv", "ConvTranspose", "Gemm", "MatMul", "Add"}, passthrough_ops={"MaxPool"},
        residual_add_qdq=True, bias="float")
    assert trt.channel_axis("ConvTranspose") == 1 and trt.channel_axis("Gemm", {"transB": 1}) == 0
    scale, zero = trt.activations.params(-0.5, 2.0)
    assert zero == 0 and scale == pytest.approx(2.0 / 127)
    with pytest.raises(ValueError, match="quantized_ops"):
        QuantScheme("x", trt.activations, trt.weights, {"Conv": 0}, quantized_ops={"Add"})
    with pytest.raises(ValueError, match="bias"):
        QuantScheme("x", trt.activations, trt.weights, {}, quantized_ops=set(), bias="int8")


def test_quantization_parameters():
    u8 = TensorQuant("uint8", symmetric=False)
    scale, zero = u8.params(-1.0, 3.0)
    assert scale == pytest.approx(4.0 / 255) and zero == 64 and zero.dtype == np.uint8
    step, z = float(scale), int(zero)
    assert (u8.qmin - z) * step == pytest.approx(-1.0, abs=step)
    assert (u8.qmax - z) * step == pytest.approx(3.0, abs=step)
    scale, zero = u8.params(0.5, 2.0)  # the range is widened to contain 0, so zero (padding, Relu) is exact
    assert zero == 0 and scale == pytest.approx(2.0 / 255)
    w = TensorQuant("int8", symmetric=True, per_channel=True, narrow_range=True)
    scale, zero = w.params(np.array([-1.0, -0.1, 0.0]), np.array([0.5, 0.2, 0.0]))
    np.testing.assert_allclose(scale, [1 / 127, 0.2 / 127, 1.0], rtol=1e-6)  # an all-zero channel gets scale 1
    assert zero.dtype == np.int8 and not zero.any()
    assert TensorQuant("uint8", symmetric=True).params(-1, 1)[1] == 128
    with pytest.raises(ValueError, match="dtype"):
        TensorQuant("int16", symmetric=True)


# -- sessions, bench, evaluate --------------------------------------------------------------------------------
class Recording(OnnxRuntimeBackend):
    """Records the shape of every batch run."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def run(self, session, feeds):
        self.shapes.append({k: v.shape for k, v in feeds.items()})
        return super().run(session, feeds)


def test_bench_tiny_resnet_batches_1_and_4(tiny):
    backend = Recording()
    result = backend.bench(tiny, batch_sizes=[1, 4], threads=[1], warmup=2, iters=12)
    assert [(r.batch, r.threads, r.iters) for r in result.rows] == [(1, 1, 12), (4, 1, 12)]
    assert result.size_bytes == os.path.getsize(tiny) and result.backend == "onnxruntime"
    assert result.input_shapes == {1: {"input": [1, 3, 32, 32]}, 4: {"input": [4, 3, 32, 32]}}
    # every warm-up and timed run really fed that batch
    assert backend.shapes == [{"input": (1, 3, 32, 32)}] * 14 + [{"input": (4, 3, 32, 32)}] * 14
    for r in result.rows:
        assert 0 < r.min_ms <= r.p50_ms <= r.p90_ms <= r.p99_ms <= r.max_ms < 5000
        assert r.min_ms <= r.mean_ms <= r.max_ms
        assert r.throughput == pytest.approx(r.batch * 1000 / r.p50_ms)
    data = result.to_dict()
    assert data["latency"][1]["batch"] == 4 and data["size_bytes"] == result.size_bytes
    assert "p99 ms" in result.table().splitlines()[0]


def test_latency_percentiles_from_known_times():
    stats = LatencyStats.from_times(2, 1, [i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert stats.p50_ms == pytest.approx(50.5) and stats.p90_ms == pytest.approx(90.1)
    assert stats.p99_ms == pytest.approx(99.01) and stats.mean_ms == pytest.approx(50.5)
    assert (stats.min_ms, stats.max_ms, stats.iters) == (pytest.approx(1.0), pytest.approx(100.0), 100)


def test_session_threads_and_shapes(ort_backend):
    model = small_model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S"])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S"])],
                        [helper.make_node("Relu", ["x"], ["y"])])
    session = ort_backend.session(model, threads=2)
    assert session.get_session_options().intra_op_num_threads == 2
    spec = ort_backend.input_specs(session)[0]  # symbolic dims keep their names (one InputSpec for all of graphopt)
    assert spec.shape == ("N", "S") and spec.batch_dim is None and spec.dtype == np.float32
    assert spec.concrete(8) == (8, 1) and spec.concrete(8, [None, 5]) == (8, 5)
    backend = Recording()
    result = backend.bench(model, [3], [1], warmup=0, iters=2, shapes={"x": [-1, 7]})
    assert backend.shapes == [{"x": (3, 7)}] * 2 and result.size_bytes == model.ByteSize()
    with pytest.raises(Exception, match="unknown input"):
        backend.bench(model, [1], [1], iters=1, shapes={"nope": [1]})


def test_bench_refuses_a_batch_a_fixed_model_cannot_take(ort_backend):
    with pytest.raises(UsageError, match="fixed batch dimension 1; batch 4"):
        ort_backend.bench(identity_model([1, 3]), [4], [1], warmup=0, iters=1)
    with pytest.raises(BackendError, match="no such file"):
        ort_backend.session("/nonexistent/model.onnx")


@pytest.mark.parametrize("shape, batch_size", [([1, 3], 64), (["N", 3], 2)])
def test_evaluate_counts_exactly(ort_backend, shape, batch_size):
    logits = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 2, 1], [3, 0, 1]], np.float32)
    labels = np.array([1, 0, 2, 2, 0])  # argmax is 1, 0, 2, 1, 0: four of five right
    acc = ort_backend.evaluate(identity_model(shape), {"x": logits}, labels, batch_size=batch_size)
    assert (acc.correct, acc.total) == (4, 5) and acc.accuracy == pytest.approx(0.8)
    with pytest.raises(DataError, match="no array for model input"):
        ort_backend.evaluate(identity_model(shape), {"images": logits}, labels)


def test_batches_pad_a_fixed_batch_and_say_how_many_rows_are_real(ort_backend):
    spec = ort_backend.input_specs(ort_backend.session(identity_model([2, 3])))
    data = {"x": np.arange(15, dtype=np.float32).reshape(5, 3)}
    batches = list(iter_batches(spec, data, 64))
    assert [n for _, n in batches] == [2, 2, 1]
    np.testing.assert_array_equal(batches[-1][0]["x"], data["x"][[4, 4]])


# -- metrics --------------------------------------------------------------------------------------------------
def test_sqnr_of_known_noise_power():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000)
    noise = 0.1 * rng.standard_normal(200_000)  # signal power 1, noise power 0.01: 20 dB
    assert sqnr_db(x, x + noise) == pytest.approx(20.0, abs=0.1)
    assert sqnr_db(x, x + 0.5 * noise) == pytest.approx(20.0 + 20 * math.log10(2), abs=0.1)
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(np.zeros(3), np.ones(3)) == -math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        sqnr_db(np.zeros(3), np.zeros(4))


def test_cosine_relative_error_and_top1():
    assert cosine_similarity([1, 0], [0, 2]) == pytest.approx(0.0)
    assert cosine_similarity([1, 2], [2, 4]) == pytest.approx(1.0)
    assert cosine_similarity([1, 2], [-1, -2]) == pytest.approx(-1.0)
    assert cosine_similarity([0, 0], [0, 0]) == 1.0
    assert max_rel_error([1.0, -4.0], [1.5, -4.0]) == pytest.approx(0.125)
    a = np.array([[1, 2, 0], [3, 0, 0], [0, 0, 1], [0, 5, 1]], np.float32)
    b = np.array([[0, 9, 0], [1, 0, 0], [0, 2, 1], [0, 5, 1]], np.float32)  # the third sample disagrees
    assert top1_agreement(a, b) == 0.75 and top1_agreement(a, a) == 1.0
    assert top1_accuracy(a, [1, 0, 2, 0]) == 0.75


def test_compare_a_model_with_itself(tiny):
    result = compare_models(tiny, tiny, samples=8, per_layer=True)
    (out,) = result.outputs
    assert out.shape == (8, 10) and out.sqnr_db == math.inf and out.cosine == pytest.approx(1.0)
    assert out.max_rel_err == 0.0 and out.top1_agreement == 1.0
    assert "random" in result.inputs and result.samples == 8
    layers = result.per_layer
    nodes = [n for n in onnx.load(tiny).graph.node if n.op_type != "Constant"]
    assert len(layers.rows) == sum(len(n.output) for n in nodes)  # every computed tensor
    assert layers.unmatched == [] and all(r.sqnr_db == math.inf for r in layers.rows)
    assert result.to_dict()["outputs"][0]["sqnr_db"] == "inf"


def test_compare_fp32_with_onnxruntime_int8(tiny_folded, tiny_int8):
    rng = np.random.default_rng(7)
    data = {"input": rng.standard_normal((24, 3, 32, 32)).astype(np.float32)}
    result = compare_models(tiny_folded, tiny_int8, data, per_layer=True, batch_size=8)
    (out,) = result.outputs
    assert 10 < out.sqnr_db < math.inf and 0.9 < out.cosine < 1.0 and out.max_rel_err > 0
    assert out.top1_agreement >= 0.75
    rows = result.per_layer.rows
    assert len(rows) >= 10 and result.per_layer.samples == 24
    assert [r.sqnr_db for r in rows] == sorted(r.sqnr_db for r in rows)  # worst first
    assert all(0 < r.sqnr_db < math.inf for r in rows)
    assert any(r.other.endswith("DequantizeLinear_Output") for r in rows)  # matched through T -> Q -> DQ
    assert "input" in {r.tensor for r in rows}  # the input's own quantization is a row too
    # onnxruntime's quantizer folds each Relu into the Conv / Add before it (the Q after it clamps), so the
    # tensors that fed a Relu exist only in A: exactly those are unmatched
    relu_inputs = {n.input[0] for n in onnx.load(tiny_folded).graph.node if n.op_type == "Relu"}
    assert set(result.per_layer.unmatched) == relu_inputs and len(relu_inputs) == 9


def test_per_layer_matching_rule_and_exact_sqnr(ort_backend):
    """A: x -> Relu -> r -> Neg -> y, plus Sigmoid -> s only in A. B quantizes r (r -> Q -> DQ -> r_dq -> Neg).
    r is compared with B's dequantized copy, y with y, s is unmatched; r's SQNR equals the one computed by hand."""
    scale, zero = np.float32(0.05), np.uint8(0)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])
    a = small_model([x_info], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16]),
                               helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 16])],
                    [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"]),
                     helper.make_node("Sigmoid", ["x"], ["s"])])
    b = small_model([x_info], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
                    [helper.make_node("Relu", ["x"], ["r"]),
                     helper.make_node("QuantizeLinear", ["r", "sc", "zp"], ["r_q"]),
                     helper.make_node("DequantizeLinear", ["r_q", "sc", "zp"], ["r_dq"]),
                     helper.make_node("Neg", ["r_dq"], ["y"])],
                    [onnx.numpy_helper.from_array(np.array(scale), "sc"),
                     onnx.numpy_helper.from_array(np.array(zero), "zp")])
    matches, unmatched = match_tensors(a, b)
    assert {(m.tensor, m.other, m.op_type) for m in matches} == {("r", "r_dq", "Relu"), ("y", "y", "Neg")}
    assert unmatched == ["s"]  # Sigmoid exists only in A; the input B feeds as it is needs no row
    rng = np.random.default_rng(3)
    batches = [{"x": rng.standard_normal((4, 16)).astype(np.float32) * 3} for _ in range(3)]
    table = per_layer_sqnr(a, b, batches, ort_backend)
    r = np.maximum(np.concatenate([f["x"] for f in batches]), 0).astype(np.float64)
    r_dq = np.clip(np.round(r / scale), 0, 255) * scale  # uint8 saturates at 255 * 0.05 = 12.75
    expected = 10 * np.log10(np.sum(r**2) / np.sum((r_dq - r) ** 2))
    assert [row.tensor for row in table.rows] == ["r", "y"] and table.samples == 12
    assert table.rows[0].sqnr_db == pytest.approx(expected, abs=1e-3)
    assert table.rows[1].sqnr_db == pytest.approx(expected, abs=1e-3)  # Neg keeps the noise

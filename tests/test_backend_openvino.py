"""The openvino backend: its scheme, sessions and timing on OpenVINO's CPU plugin, the per-layer int8/float report
read from the execution graph, --save-ir, the PyTorch route to it, and the one-line error without openvino."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.backends.cpu import u8s8_saturates
from graphopt.backends.scheme import QuantRequest, UnsupportedRequestError
from graphopt.cli import main
from graphopt.numeric import sqnr_db

SEED = 0


def small_cnn(path, fc_bias: float = 0.0) -> str:
    """input 1x3x16x16 -> conv_a (3->16) -> Relu -> conv_b (16->16) -> Relu -> conv_c (16->16) -> Relu -> GAP ->
    Flatten -> Gemm (16->10, ``fc_bias`` on class 0): every weighted op wide enough for any int8 kernel."""
    rng = np.random.default_rng(SEED)
    inits, nodes, x = [], [], "input"
    for i, (name, cin) in enumerate((("conv_a", 3), ("conv_b", 16), ("conv_c", 16))):
        w = (rng.standard_normal((16, cin, 3, 3)) * np.sqrt(2 / (cin * 9))).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=name, pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    inits += [numpy_helper.from_array((rng.standard_normal((10, 16)) * 0.3).astype(np.float32), "wf"),
              numpy_helper.from_array(np.eye(10, dtype=np.float32)[0] * fc_bias, "bf")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "wf", "bf"], ["output"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "small_cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                 [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def calib(n=16) -> dict:
    return {"input": np.random.default_rng(1).standard_normal((n, 3, 16, 16)).astype(np.float32)}


@pytest.fixture
def ov():
    return pytest.importorskip("openvino", reason="openvino is not installed (pip install 'graphopt[openvino]')")


@pytest.fixture
def backend(ov):
    from graphopt.backends.openvino import OpenVINOBackend

    return OpenVINOBackend()


def run_all(backend, model, x) -> np.ndarray:
    session = backend.session(model, threads=1)
    return np.concatenate([backend.run(session, {"input": x[i:i + 1]})[0] for i in range(len(x))])


# -- without openvino -------------------------------------------------------------------------------------------
def test_without_openvino_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    model = small_cnn(tmp_path / "m.onnx")
    for argv in (["bench", model, "--backend", "openvino", "--iters", "1"],
                 ["run", model, "--backend", "openvino", "-o", str(tmp_path / "o.onnx")]):
        assert main(argv) == 4  # UnsupportedError, as torchao missing is reported
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "pip install 'graphopt[openvino]'" in err, err
    assert not os.path.exists(tmp_path / "o.onnx")


# -- the scheme ---------------------------------------------------------------------------------------------------
def test_scheme_is_the_measured_one():
    from graphopt.backends.openvino import OpenVINOBackend

    scheme = OpenVINOBackend().scheme()
    assert (scheme.activations.dtype, scheme.activations.symmetric) == ("uint8", False)
    assert scheme.weights.dtype == "int8" and scheme.weights.symmetric and scheme.weights.per_channel
    assert scheme.weights.reduce_range == u8s8_saturates() and scheme.requantize_outputs
    vnni = OpenVINOBackend(reduce_range=False).scheme()  # with VNNI/AMX: signed tensors on the symmetric int8 grid
    assert vnni.signed_activations.dtype == "int8" and vnni.signed_activations.symmetric
    assert vnni.activation_params(-2.0, 1.0)[1].dtype == np.int8 and vnni.activation_params(-2.0, 1.0)[1] == 0
    assert vnni.activation_params(0.0, 3.0)[1].dtype == np.uint8 and vnni.activation_params(0.0, 3.0)[1] == 0
    assert OpenVINOBackend(reduce_range=True).scheme().signed_activations is None  # without VNNI: uint8 for all
    assert OpenVINOBackend(reduce_range=False).scheme(QuantRequest(activation_symmetric=False)).signed_activations \
        is None
    assert OpenVINOBackend(reduce_range=False).scheme().weights.qrange == (-127, 127)
    with pytest.raises(UnsupportedRequestError, match="float8"):
        OpenVINOBackend().scheme(QuantRequest(activation_dtype="float8e4m3fn", weight_dtype="float8e4m3fn"))
    int8_acts = OpenVINOBackend().scheme(QuantRequest(activation_dtype="int8"))
    assert int8_acts.activations.dtype == "int8" and int8_acts.warnings


def test_model_outputs_stay_float_and_gain_their_8_bits(tmp_path, backend):
    """OpenVINO's int8 kernels write float as cheaply as int8, so the scheme leaves the model's outputs float: a Q/DQ
    on the classifier's logits is 8-bit noise on the output itself (measured on the zoo's ResNet-18-like: 39.4 dB
    with it, 43.0 dB without; NNCF's graph leaves it float too). Here one confident class widens the logits' range,
    as a trained classifier's does, so their rounding shows."""
    from dataclasses import replace

    from graphopt.backends.openvino import OpenVINOBackend

    class Requantizing(OpenVINOBackend):
        def default_scheme(self):
            return replace(super().default_scheme(), requantize_graph_outputs=True)

    assert backend.scheme().to_dict()["requantize_graph_outputs"] is False
    model = small_cnn(tmp_path / "m.onnx", fc_bias=8.0)
    x, sqnr = calib(32)["input"], {}
    ref = run_all(backend, model, x)
    for name, target in (("float", backend), ("requantized", Requantizing())):
        out = str(tmp_path / f"m.{name}.onnx")
        graphopt.optimize(model, "int8:guard=off", calibration=calib(), backend=target, output=out, check=False)
        written = onnx.load(out)
        producer = {o: n.op_type for n in written.graph.node for o in n.output}["output"]
        assert producer == ("Gemm" if name == "float" else "DequantizeLinear"), (name, producer)
        zero_points = {n.input[0]: numpy_helper.to_array(next(t for t in written.graph.initializer
                                                               if t.name == n.input[2]))
                       for n in written.graph.node if n.op_type == "QuantizeLinear"}
        signed = np.int8 if backend.scheme().signed_activations is not None else np.uint8  # VNNI/AMX: int8
        assert zero_points["input"].dtype == signed and (signed == np.uint8 or zero_points["input"] == 0)
        assert zero_points["r0"].dtype == np.uint8 and zero_points["r0"] == 0  # after a Relu: uint8
        sqnr[name] = sqnr_db(ref, run_all(backend, out, x))
    assert sqnr["float"] >= sqnr["requantized"] + 1.0, sqnr


# -- running, int8 and the per-layer report ------------------------------------------------------------------------
def test_int8_layers_reported_as_the_execution_graph_runs_them(tmp_path, backend):
    from graphopt.backends.openvino_layers import layer_report, layers_table

    model = small_cnn(tmp_path / "m.onnx")
    out = str(tmp_path / "m.int8.onnx")
    graphopt.optimize(model, "fold,insert-observers,calibrate,place-qdq:exclude_nodes=conv_b", calibration=calib(),
                      backend=backend, output=out)
    session = backend.session(out, threads=1)
    report = layer_report(session.compiled, out)
    assert report["nodes"]["conv_a"] == "int8" and report["nodes"]["conv_b"] == "float"
    assert report["nodes"]["conv_c"] == "int8"
    by_layer = {r["layer"]: r for r in report["layers"]}
    for op in session.compiled.get_runtime_model().get_ordered_ops():  # the report agrees with the graph itself
        if op.get_friendly_name() in by_layer:
            precision = op.get_rt_info()["runtimePrecision"].astype(str)
            assert by_layer[op.get_friendly_name()]["precision"] == precision
    assert report["int8"] >= 3 and report["float"] >= 1
    assert "conv_b" in layers_table(report)
    x = calib(8)["input"]
    ref, q = run_all(backend, model, x), run_all(backend, out, x)
    assert sqnr_db(ref, q) >= 25.0  # measured 34-36 dB


def test_f32_hint_runs_fp32_in_f32(tmp_path, backend):
    from graphopt.backends.openvino_layers import layer_report

    model = small_cnn(tmp_path / "m.onnx")
    session = backend.session(model, threads=1)
    assert backend.settings(session)["precision_hint"] == "f32" and backend.settings(session)["threads"] == 1
    report = layer_report(session.compiled, model)
    assert report["int8"] == 0 and {r["precision"] for r in report["layers"]} == {"f32"}
    specs = backend.input_specs(session)
    assert specs[0].name == "input" and specs[0].shape == (1, 3, 16, 16) and backend.output_names(session) == ["output"]
    import onnxruntime as ort

    x = calib(2)["input"][:1]
    expected = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(backend.run(session, {"input": x})[0], expected, rtol=1e-4, atol=1e-5)


def test_second_compile_comes_from_the_model_cache(tmp_path, backend, monkeypatch, registry):
    """A model compiled twice is imported from OpenVINO's model cache ($GRAPHOPT_CACHE_DIR/openvino) the second
    time, profiled or not, with the same outputs; past ``cache_mb`` the oldest blobs go; ``cache_dir=none``
    compiles every time and writes nothing."""
    from graphopt.backends import get_backend

    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    model = small_cnn(tmp_path / "m.onnx")
    x = {"input": calib(1)["input"]}
    first = backend.session(model, threads=1)
    again = backend.session(model, threads=1, PERF_COUNT=True)
    assert [backend.settings(s)["loaded_from_cache"] for s in (first, again)] == [False, True]
    assert os.listdir(tmp_path / "cache" / "openvino")
    np.testing.assert_array_equal(backend.run(first, x)[0], backend.run(again, x)[0])
    for blob in (tmp_path / "cache" / "openvino").iterdir():  # a damaged blob (a writer killed midway) is compiled
        blob.chmod(0o600)  # again, not an error (OpenVINO writes its blobs read-only)
        blob.write_bytes(blob.read_bytes()[:100])
    damaged = backend.session(model, threads=1)
    assert not backend.settings(damaged)["loaded_from_cache"]
    np.testing.assert_array_equal(backend.run(first, x)[0], backend.run(damaged, x)[0])
    other = small_cnn(tmp_path / "other.onnx", fc_bias=1.0)  # another model: another blob
    backend.session(other, threads=1)
    assert len(os.listdir(tmp_path / "cache" / "openvino")) == 2
    small = get_backend(registry, "openvino:cache_mb=0")  # the oldest blobs go when the folder is past its size
    small.session(model, threads=1)
    assert len(os.listdir(tmp_path / "cache" / "openvino")) == 1
    off = get_backend(registry, "openvino:cache_dir=none")
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "other"))
    assert not off.settings(off.session(model, threads=1))["loaded_from_cache"]
    assert not (tmp_path / "other").exists()


def test_full_range_weights_saturate_without_vnni(tmp_path, backend):
    """Why the scheme narrows weights on CPUs without VNNI: uint8 x int8 products summed in pairs in an int16
    (``vpmaddubsw``) saturate on full-range weights and large activations; the reduced range does not."""
    from graphopt.backends.openvino import OpenVINOBackend

    if not u8s8_saturates():
        pytest.skip("this CPU has VNNI: full-range weights do not saturate")
    rng = np.random.default_rng(SEED)
    w = rng.uniform(0.5, 1.0, (16, 16, 1, 1)).astype(np.float32)  # positive weights, positive inputs: 255 x 127 x 2
    graph = helper.make_graph([helper.make_node("Conv", ["input", "w"], ["output"], name="conv")], "pointwise",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 16, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 16, 8, 8])],
                              [numpy_helper.from_array(w, "w")])
    model = str(tmp_path / "pw.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    x = rng.uniform(0.0, 1.0, (8, 16, 8, 8)).astype(np.float32)
    ref = run_all(backend, model, x)
    sqnr = {}
    for reduce in (False, True):
        out = str(tmp_path / f"pw.{reduce}.onnx")
        graphopt.optimize(model, "int8", calibration={"input": x}, backend=OpenVINOBackend(reduce_range=reduce),
                          output=out, check=False)
        sqnr[reduce] = sqnr_db(ref, run_all(backend, out, x))
    assert sqnr[True] >= 30.0 and sqnr[True] > sqnr[False] + 6.0, sqnr


# -- the command line ------------------------------------------------------------------------------------------------
def test_cli_run_save_ir_json_bench_compare(tmp_path, backend, capsys):
    model = small_cnn(tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **calib())
    np.savez(tmp_path / "e.npz", input=calib(8)["input"], labels=np.arange(8) % 10)
    out, ir = str(tmp_path / "m.int8.onnx"), tmp_path / "ir"
    # --save-ir makes its folder, as --report does (ir does not exist yet)
    assert main(["run", model, "--passes", "fold,int8", "--backend", "openvino", "--calib", str(tmp_path / "c.npz"),
                 "-o", out, "--save-ir", str(ir), "--json", str(tmp_path / "r.json"), "--bench",
                 "--eval", str(tmp_path / "e.npz"), "--ov-precision", "f32"]) == 0
    text = capsys.readouterr().out
    assert "layers int8" in text and "precision_hint f32" in text
    assert (ir / "m.int8.xml").is_file() and (ir / "m.int8.bin").is_file()
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["artifact"]["openvino_layers"]["int8"] > 0
    assert data["comparison"]["outputs"][0]["sqnr_db"] >= 25.0
    # --save-ir into the output's own folder: staged with the ONNX file, moved with it
    assert main(["run", model, "--passes", "fold,int8", "--backend", "openvino", "--calib", str(tmp_path / "c.npz"),
                 "-o", str(tmp_path / "same.onnx"), "--save-ir", str(tmp_path), "-q"]) == 0
    assert (tmp_path / "same.xml").is_file() and not [n for n in os.listdir(tmp_path) if n.startswith(".graphopt")]
    core = backend.read_model(out)
    assert core is not None
    assert main(["bench", out, "--backend", "openvino", "--threads", "1", "--iters", "3", "--warmup", "1"]) == 0
    assert "streams 1" in capsys.readouterr().out
    assert main(["compare", model, out, "--backend", "openvino", "--samples", "4"]) == 0
    assert main(["compare", model, out, "--backend", "onnxruntime", "--ov-precision", "bf16"]) == 2
    assert "--ov-precision is not an option of backend 'onnxruntime'" in capsys.readouterr().err


# -- the PyTorch route ---------------------------------------------------------------------------------------------
def test_torch_module_quantized_for_openvino(tmp_path, backend):
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchao")
    from torch import nn

    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    x = calib(8)["input"]
    out = str(tmp_path / "m.onnx")
    graphopt.optimize(model, "fold,int8", example_inputs=(torch.from_numpy(x[:1]),),
                      calibration=calib(), backend=backend, output=out)
    report_model = onnx.load(out)
    assert any(n.op_type == "QuantizeLinear" for n in report_model.graph.node)
    with torch.no_grad():
        ref = np.concatenate([model(torch.from_numpy(x[i:i + 1])).numpy() for i in range(len(x))])
    got = run_all(backend, out, x)
    assert sqnr_db(ref, got) >= 25.0  # measured ~35 dB


def test_torch_route_takes_the_signed_activation_grid(tmp_path, backend):
    """The PyTorch route places the scheme's ``signed_activations`` grid as place-qdq does on ONNX: the model's
    input (a signed range) on symmetric int8 (zero point 0), a Relu's output on uint8. Forced here, so that the test
    holds on a CPU without VNNI too (where OpenVINO's scheme keeps uint8 everywhere)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchao")
    from dataclasses import replace

    from torch import nn

    from graphopt.backends.openvino import OpenVINOBackend
    from graphopt.backends.scheme import TensorQuant

    class Signed(OpenVINOBackend):
        def default_scheme(self):
            return replace(super().default_scheme(), signed_activations=TensorQuant("int8", symmetric=True))

    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    x = calib(8)["input"]
    out = str(tmp_path / "m.onnx")
    graphopt.optimize(model, "fold,int8", example_inputs=(torch.from_numpy(x[:1]),), calibration=calib(),
                      backend=Signed(), output=out)
    written = onnx.load(out)
    inits = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    producers = {o: n.op_type for n in written.graph.node for o in n.output}
    graph_input = written.graph.input[0].name
    zero_points = {n.input[0]: inits[n.input[2]] for n in written.graph.node if n.op_type == "QuantizeLinear"}
    assert zero_points[graph_input].dtype == np.int8 and zero_points[graph_input] == 0
    after_relu = [z for t, z in zero_points.items() if producers.get(t) == "Relu"]
    assert after_relu and all(z.dtype == np.uint8 for z in after_relu)
    with torch.no_grad():
        ref = np.concatenate([model(torch.from_numpy(x[i:i + 1])).numpy() for i in range(len(x))])
    assert sqnr_db(ref, run_all(backend, out, x)) >= 25.0


def test_an_op_openvino_cannot_read_is_named_in_the_one_line(ov, tmp_path, capsys):
    """OpenVINO's message starts with where in its C++ it was raised; the line that says why (the op) is kept, and
    the run names the output the user gave, not its staging folder."""
    from graphopt.cli import main

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
             helper.make_node("MyRelu", ["y"], ["out"], domain="com.acme", name="custom")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")])
    path = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.acme", 1)]),
              str(path))
    assert main(["bench", str(path), "--backend", "openvino"]) != 0
    assert "No conversion rule found for operations: com.acme.MyRelu" in capsys.readouterr().err
    out = str(tmp_path / "o.onnx")
    assert main(["run", str(path), "--passes", "fold", "--backend", "openvino", "-o", out, "--no-check"]) != 0
    err = capsys.readouterr().err
    assert f"{out}: OpenVINO could not read the model" in err and ".graphopt-" not in err


# -- what OpenVINO computes otherwise ------------------------------------------------------------------------------
def pooled_encoder(path) -> str:
    """x[B,10,32] -> MatMul (32x32) -> LayerNorm -> h (an output), and ReduceMean over axis 1 of the same
    LayerNorm output -> pooled (an output): the mean pooling of a BERT-like encoder, the tensor read by an int8
    MatMul and by a reduction both."""
    rng = np.random.default_rng(SEED)
    inits = [numpy_helper.from_array((rng.standard_normal((32, 32)) / 6).astype(np.float32), "w"),
             numpy_helper.from_array(np.ones(32, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(32, np.float32), "beta"),
             numpy_helper.from_array((rng.standard_normal((32, 32)) / 6).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([1], np.int64), "axes")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="proj"),
             helper.make_node("LayerNormalization", ["m", "gamma", "beta"], ["ln"], name="ln", axis=-1),
             helper.make_node("MatMul", ["ln", "w2"], ["h"], name="head"),
             helper.make_node("ReduceMean", ["ln", "axes"], ["pooled"], name="pool", keepdims=0)]
    graph = helper.make_graph(nodes, "pooled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 10, 32])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["B", 10, 32]),
                               helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["B", 32])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return str(path)


def test_reductions_read_the_float_tensor_where_openvino_gets_int8_wrong(tmp_path, backend):
    """OpenVINO 2026.4 computes a ReduceMean over axis 1 of a 3-D tensor read through a DequantizeLinear as zeros
    past a batch's first sample; the scheme's float_readers keep the reduction on the float tensor, so the written
    model computes on OpenVINO what it computes on onnxruntime, batch 4 included."""
    assert {"ReduceMean", "ReduceSum"} <= backend.default_scheme().float_readers
    model = pooled_encoder(tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((16, 10, 32)).astype(np.float32)
    out = str(tmp_path / "q.onnx")
    graphopt.optimize(model, "int8:guard=off", backend=backend, calibration={"x": x}).save(out)
    pool = next(n for n in onnx.load(out).graph.node if n.op_type == "ReduceMean")
    assert pool.input[0] == "ln"  # the float tensor, not its DequantizeLinear
    feeds = {"x": x[:4]}
    ours = backend.run(backend.session(out, threads=1), feeds)
    theirs = graphopt.ir.OnnxGraph.load(out).run(feeds)
    for a, b in zip(theirs, ours):
        assert sqnr_db(a, b) >= 30.0  # both outputs, all four samples (the bug zeroed samples 1-3)


def test_the_check_runs_the_written_file_on_openvino_too(tmp_path, backend, capsys, monkeypatch):
    """The run's check also runs the written file on the target backend: its line says what OpenVINO computes, and a
    backend that computes the file otherwise than onnxruntime (simulated: outputs scaled by 0.5) is warned about,
    with both numbers, though onnxruntime's run is within the threshold."""
    model = small_cnn(tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **calib())
    out, report = str(tmp_path / "q.onnx"), tmp_path / "r.json"
    args = ["run", model, "--passes", "fold,int8", "--backend", "openvino", "--calib", str(tmp_path / "c.npz"),
            "-o", out, "--json", str(report)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "the written file on openvino: SQNR" in text and "warning" not in text
    there = json.loads(report.read_text())["checks"]["numeric"]["on_backend"]
    assert there["backend"] == "openvino" and there["sqnr_db"] >= 25.0 and "past_threshold" not in there

    from graphopt.backends.openvino import OpenVINOBackend

    real_run = OpenVINOBackend.run_written

    def wrong(self, path, feeds):
        return [0.5 * o for o in real_run(self, path, feeds)]

    monkeypatch.setattr(OpenVINOBackend, "run_written", wrong)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "warning: numeric check: on openvino the written model's outputs moved past the accuracy threshold" \
        in text and "onnxruntime runs the same file at SQNR" in text
    assert json.loads(report.read_text())["checks"]["numeric"]["on_backend"]["past_threshold"] is True


def test_the_backend_is_not_blamed_for_what_the_passes_did(tmp_path, backend, capsys):
    """Pruning without fine-tuning moves the outputs past the threshold on onnxruntime and OpenVINO alike: the
    pass's own warning says so, and the backend is not blamed (it computes the file as onnxruntime does)."""
    model = small_cnn(tmp_path / "m.onnx")
    out, report = str(tmp_path / "p.onnx"), tmp_path / "r.json"
    assert main(["run", model, "--passes", "fold,prune:ratio=0.75", "--backend", "openvino", "-o", out,
                 "--json", str(report)]) == 0
    text = capsys.readouterr().out
    there = json.loads(report.read_text())["checks"]["numeric"]["on_backend"]
    assert there["past_threshold"] and abs(there["sqnr_db"] - there["onnxruntime_sqnr_db"]) < 1.0
    assert "prune-channels: the outputs moved past the accuracy threshold" in text
    assert "openvino computes this model differently" not in text

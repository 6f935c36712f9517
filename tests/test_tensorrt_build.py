"""The TensorRT engine build's logic, checked without TensorRT: profiles, cache keys, builder settings per TensorRT
version, the inspector report, the trtexec command, and what happens when TensorRT is not there.

The build runs against a stand-in ``tensorrt`` module (tests/fake_tensorrt, matching the real 10.x and 11.x
names; see its docstring) put on ``sys.path`` by the ``fake_trt`` fixture only. The real build is the last test:
it runs only where ``tensorrt`` imports and a CUDA device is present.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends import get_backend, tensorrt_build
from graphopt.backends.base import BackendError
from graphopt.backends.tensorrt_build import DeviceFacts
from graphopt.backends.tensorrt_layers import parse_engine_information
from graphopt.backends.tensorrt_plan import BuildOptions, cache_key, model_inputs, parse_shapes, profiles
from graphopt.cli import main
from graphopt.errors import PipelineError, UsageError
from graphopt.plugins import default_registry

FAKE = Path(__file__).parent / "fake_tensorrt"
GPU = DeviceFacts("12.4", "8.9", "Fake GPU")


def tiny_model(path, batch="N", extra_op=None) -> str:
    """x [batch, 3, 8, 8] -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y [batch, 4]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "fc_w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu1"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w"], ["y"], name="fc", transB=1)]
    if extra_op:
        nodes[-1].output[0] = "g"
        nodes.append(helper.make_node(extra_op, ["g"], ["y"], name="odd"))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def tensor(name, dims, fmt):
    return {"Name": name, "Location": "Device", "Dimensions": dims, "Format/Datatype": fmt}


# What get_engine_information(LayerInformationFormat.JSON) returns for a DETAILED engine (TensorRT 10's form:
# "Format/Datatype" texts, "Bindings"), for an int8 Q/DQ model where one Concat-like reformat was needed.
INT8 = "Thirty-two wide channel vectorized row major Int8 format"
FP32 = "Row major linear FP32 format"
ENGINE_JSON_10 = json.dumps({"Layers": [
    {"Name": "Reformatting CopyNode for Input Tensor 0 to conv1", "LayerType": "Reformat",
     "Inputs": [tensor("x", [8, 3, 8, 8], FP32)], "Outputs": [tensor("x_r", [8, 3, 8, 8], INT8)],
     "ParameterType": "Reformat", "Origin": "REFORMAT", "TacticValue": "0x0000000000000000", "StreamId": 0},
    {"Name": "conv1 + relu1", "LayerType": "CaskConvolution", "Inputs": [tensor("x_r", [8, 3, 8, 8], INT8)],
     "Outputs": [tensor("r", [8, 8, 8, 8], INT8)], "ParameterType": "Convolution", "Kernel": [3, 3],
     "Weights": {"Type": "Int8", "Count": 216}, "Activation": "RELU", "HasBias": 0,
     "TacticName": "sm89_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32", "StreamId": 0, "Metadata": ""},
    {"Name": "pool", "LayerType": "CaskPooling", "Inputs": [tensor("r", [8, 8, 8, 8], INT8)],
     "Outputs": [tensor("p", [8, 8, 1, 1], INT8)], "ParameterType": "Pooling", "StreamId": 0},
    {"Name": "fc", "LayerType": "CaskGemmConvolution", "Inputs": [tensor("f", [8, 8, 1, 1], INT8)],
     "Outputs": [tensor("y", [8, 4, 1, 1], FP32)], "ParameterType": "Convolution", "StreamId": 0},
    {"Name": "softmax", "LayerType": "CaskSoftMaxV2", "Inputs": [tensor("y", [8, 4], FP32)],
     "Outputs": [tensor("s", [8, 4], FP32)], "ParameterType": "SoftMax", "StreamId": 0},
], "Bindings": ["x", "s"]})


@pytest.fixture
def fake_trt(monkeypatch, request, tmp_path):
    """The stand-in ``tensorrt`` (version ``request.param``) importable, a fake GPU, a private engine cache."""
    monkeypatch.setenv("FAKE_TENSORRT_VERSION", getattr(request, "param", "10.16.1.11"))
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(FAKE))
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # recorded as absent: removed again after the test
    del sys.modules["tensorrt"]
    import tensorrt

    assert tensorrt.__file__.startswith(str(FAKE))
    tensorrt.ENGINE_INFORMATION = ENGINE_JSON_10
    monkeypatch.setattr(tensorrt_build, "device_facts", lambda: GPU)
    return tensorrt


@pytest.fixture
def no_trt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ModuleNotFoundError


# -- profiles ---------------------------------------------------------------------------------------------------
def test_profiles_from_dynamic_inputs(tmp_path):
    inputs = model_inputs(onnx.load(tiny_model(tmp_path / "m.onnx")))
    (p,) = profiles(inputs, BuildOptions())
    assert (p.name, p.min, p.opt, p.max, p.defaulted) == ("x", (1, 3, 8, 8), (8, 3, 8, 8), (32, 3, 8, 8), True)
    (p,) = profiles(inputs, BuildOptions(dynamic_opt=4, dynamic_max=16))
    assert (p.opt, p.max) == ((4, 3, 8, 8), (16, 3, 8, 8))
    static = model_inputs(onnx.load(tiny_model(tmp_path / "s.onnx", batch=2)))
    assert profiles(static, BuildOptions()) == []  # nothing dynamic: TensorRT needs no profile


def test_profiles_from_shapes(tmp_path):
    inputs = model_inputs(onnx.load(tiny_model(tmp_path / "m.onnx")))
    (p,) = profiles(inputs, BuildOptions(shapes="x:2x3x8x8/4x3x8x8/16x3x8x8"))
    assert (p.min, p.opt, p.max, p.defaulted) == ((2, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8), False)
    assert parse_shapes("'in:0':1x4, y:1x2/2x2/3x2") == {"in:0": ((1, 4),) * 3,
                                                         "y": ((1, 2), (2, 2), (3, 2))}
    with pytest.raises(UsageError, match="dimension 1 is fixed to 3"):
        profiles(inputs, BuildOptions(shapes="x:1x4x8x8/1x4x8x8/1x4x8x8"))
    with pytest.raises(UsageError, match="'z', not an input|z, not an input"):
        profiles(inputs, BuildOptions(shapes="z:1x3"))
    for bad, why in (("x:4x3x8x8/2x3x8x8/8x3x8x8", "min <= opt <= max"), ("x:1x3/2x3", "one shape or three"),
                     ("x1x3", "NAME:MIN/OPT/MAX"), ("x:1xAx8", "not a shape")):
        with pytest.raises(ValueError, match=why):
            BuildOptions(shapes=bad)


# -- the engine cache key ----------------------------------------------------------------------------------------
def test_cache_key_changes_with_each_part_and_only_then(tmp_path):
    inputs = model_inputs(onnx.load(tiny_model(tmp_path / "m.onnx")))
    plan = profiles(inputs, BuildOptions())
    base = ("a" * 64, "10.16.1.11", "12.4", "8.9", {"strongly_typed": True, "workspace": None}, plan)
    key = cache_key(*base)
    assert cache_key(*base) == key and len(key) == 32
    changed = [("b" * 64, *base[1:]), (base[0], "11.4.0.106", *base[2:]), (*base[:2], "12.8", *base[3:]),
               (*base[:3], "9.0", *base[4:]), (*base[:4], {"strongly_typed": True, "workspace": 1 << 30}, plan),
               (*base[:5], profiles(inputs, BuildOptions(dynamic_max=64)))]
    keys = {cache_key(*parts) for parts in changed}
    assert key not in keys and len(keys) == len(changed)


# -- the build against the stand-in, TensorRT 10 and 11 ----------------------------------------------------------
@pytest.mark.parametrize("fake_trt", ["10.0.1", "10.16.1.11", "11.0.0.114", "11.4.0.106"], indirect=True)
def test_build_strongly_typed_then_cache_hit(fake_trt, tmp_path, capsys):
    model = tiny_model(tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    args = ["run", model, "--passes", "fold", "--backend", "tensorrt:workspace=256M", "-o", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    (build,) = fake_trt.BUILDS
    assert build["network_flags"] == 1 << int(fake_trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert build["config_flags"] == 0  # no precision flag: the types come from the graph's Q/DQ
    assert build["verbosity"] == "DETAILED" and build["workspace"] == 256 << 20
    assert build["profiles"] == [{"x": [[1, 3, 8, 8], [8, 3, 8, 8], [32, 3, 8, 8]]}]
    if fake_trt.__version__.startswith("11"):  # the API the code runs on has no weak typing at all
        assert not hasattr(fake_trt.BuilderFlag, "INT8") and not hasattr(fake_trt.BuilderFlag, "FP16")
        assert not hasattr(fake_trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    assert (tmp_path / "out.engine").read_bytes().startswith(b"FAKEENGINE")
    assert json.loads((tmp_path / "out.layers.json").read_text()) == json.loads(ENGINE_JSON_10)
    assert "tensorrt: engine out.engine built in" in printed
    assert "tensorrt: 5 engine layers: 3 int8, 1 fp32, 1 reformat; per layer: out.layers.json" in printed
    assert "dynamic dims without --shapes got min 1 / opt / max defaults: x 1x3x8x8 / 8x3x8x8 / 32x3x8x8" in printed
    timing = tmp_path / "cache" / "tensorrt" / f"timing-trt{fake_trt.__version__}-sm89.cache"
    assert timing.read_bytes() == b"FAKETIMING:+"  # saved after the build

    (tmp_path / "out.engine").unlink()
    assert main(args) == 0  # the same model and settings: the engine comes from the cache, nothing is built
    assert len(fake_trt.BUILDS) == 1
    assert "tensorrt: engine out.engine from the engine cache" in capsys.readouterr().out
    assert (tmp_path / "out.engine").read_bytes().startswith(b"FAKEENGINE")

    assert main(args[:5] + ["tensorrt:workspace=512M"] + args[6:]) == 0  # another setting: another build,
    assert len(fake_trt.BUILDS) == 2 and fake_trt.BUILDS[1]["workspace"] == 512 << 20
    assert fake_trt.BUILDS[1]["timing_cache_in"] == "FAKETIMING:+"  # which starts from the saved timing cache
    assert timing.read_bytes() == b"FAKETIMING:++"


def test_the_engine_cache_keeps_to_its_size(fake_trt, tmp_path, capsys):
    """Past ``cache_mb`` the least recently used engines leave the cache with their layer reports (here 0 MB: only
    the newest engine stays); the timing cache stays; an engine that left is built again."""
    model = tiny_model(tmp_path / "m.onnx")
    cache = tmp_path / "cache" / "tensorrt"

    def build(workspace):
        out = tmp_path / f"out-{workspace}.onnx"
        assert main(["run", model, "--passes", "fold", "--backend", f"tensorrt:workspace={workspace}:cache_mb=0",
                     "-o", str(out), "-q"]) == 0

    build("256M")
    (first,) = cache.glob("*.engine")
    build("512M")  # another engine: the first leaves to make room
    (second,) = cache.glob("*.engine")
    assert second != first and [p.stem for p in cache.glob("*.layers.json")] == [second.stem + ".layers"]
    assert list(cache.glob("timing-*.cache"))
    build("256M")
    assert len(fake_trt.BUILDS) == 3  # built again: it had left the cache
    with pytest.raises(UsageError, match="cache_mb must be >= 0"):
        get_backend(default_registry(), "tensorrt:cache_mb=-1")


def test_build_uses_given_shapes_and_reports_facts(fake_trt, tmp_path, capsys):
    model = tiny_model(tmp_path / "m.onnx")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    assert main(["run", model, "--passes", "fold", "--backend", "tensorrt", "--shapes", "x:1x3x8x8/2x3x8x8/4x3x8x8",
                 "-o", str(out), "--json", str(report)]) == 0
    assert fake_trt.BUILDS[0]["profiles"] == [{"x": [[1, 3, 8, 8], [2, 3, 8, 8], [4, 3, 8, 8]]}]
    assert "defaults" not in capsys.readouterr().out
    artifact = json.loads(report.read_text())["artifact"]
    assert artifact["layers"]["counts"] == {"int8": 3, "fp32": 1} and artifact["layers"]["reformats"] == 1
    assert artifact["device"]["compute_capability"] == "8.9" and artifact["cache_hit"] is False


def test_parser_errors_are_one_line_and_nothing_is_written(fake_trt, tmp_path, capsys):
    fake_trt.UNSUPPORTED_OPS.update({"Softmax"})
    try:
        model = tiny_model(tmp_path / "m.onnx", extra_op="Softmax")
        assert main(["run", model, "--passes", "fold", "--backend", "tensorrt", "-o", str(tmp_path / "o.onnx")]) == 4
    finally:
        fake_trt.UNSUPPORTED_OPS.clear()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "ONNX parser refused o.onnx: node 'odd' (Softmax): No importer registered for op: Softmax" in err
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no ONNX without its engine, no engine


# -- the engine inspector's report -------------------------------------------------------------------------------
def test_inspector_report_counts_precisions_and_reformats():
    report = parse_engine_information(ENGINE_JSON_10)
    assert [la.precision for la in report.layers] == ["fp32", "int8", "int8", "int8", "fp32"]
    assert len(report.reformats) == 1 and report.counts() == {"int8": 3, "fp32": 1}
    # TensorRT 11: "I/O Tensors" objects instead of "Bindings"; types also read from separate fields
    data = json.loads(ENGINE_JSON_10)
    data["I/O Tensors"] = [{"Name": "x", "IOMode": "Input", "DataType": "Float", "Dimensions": [8, 3, 8, 8]}]
    del data["Bindings"]
    for layer in data["Layers"]:
        for t in layer["Inputs"] + layer["Outputs"]:
            fmt = t.pop("Format/Datatype")
            t["Format"], t["Datatype"] = "kCHW32" if "Int8" in fmt else "kLINEAR", "Int8" if "Int8" in fmt else "Float"
    assert parse_engine_information(json.dumps(data)).line() == "tensorrt: 5 engine layers: 3 int8, 1 fp32, 1 reformat"
    names_only = parse_engine_information(json.dumps({"Layers": ["conv1 + relu1", "fc"], "Bindings": ["x", "y"]}))
    assert not names_only.detailed and "precisions are unknown" in names_only.line()
    with pytest.raises(ValueError, match="no 'Layers' list"):
        parse_engine_information('{"Bindings": []}')


# -- --emit-trtexec ----------------------------------------------------------------------------------------------
def test_emit_trtexec_writes_the_command(no_trt, tmp_path, capsys):
    model = tiny_model(tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    assert main(["run", model, "--passes", "fold", "--backend", "tensorrt:workspace=1G", "--emit-trtexec",
                 "--shapes", "x:1x3x8x8/4x3x8x8/8x3x8x8", "-o", str(out)]) == 0
    script = (tmp_path / "out.trtexec.sh").read_text()
    expected = ("trtexec --onnx=out.onnx --stronglyTyped --minShapes=x:1x3x8x8 --optShapes=x:4x3x8x8 "
                "--maxShapes=x:8x3x8x8 --memPoolSize=workspace:1G --timingCacheFile=out.timing.cache "
                "--profilingVerbosity=detailed --exportLayerInfo=out.layers.json --saveEngine=out.engine "
                "--skipInference")
    assert script.splitlines()[-1] == expected and 'cd "$(dirname "$0")"' in script
    assert shlex.split(expected)[1:3] == ["--onnx=out.onnx", "--stronglyTyped"]
    assert os.access(tmp_path / "out.trtexec.sh", os.X_OK) and out.exists() and not (tmp_path / "out.engine").exists()
    assert "tensorrt: wrote out.trtexec.sh" in capsys.readouterr().out


# -- without TensorRT --------------------------------------------------------------------------------------------
def test_without_tensorrt_the_onnx_is_written_and_one_line_says_why(no_trt, tmp_path, capsys):
    model = tiny_model(tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    assert main(["run", model, "--passes", "fold", "--backend", "tensorrt", "-o", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tensorrt:")]
    assert lines == ["tensorrt: no engine built: the tensorrt package is not installed (pip install "
                     "'graphopt[tensorrt]' on a machine with an NVIDIA GPU); the ONNX graph is written"]
    onnx.checker.check_model(str(out))
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "out.onnx"]


def test_bench_without_tensorrt_is_one_error_line(no_trt, tmp_path, capsys):
    model = tiny_model(tmp_path / "m.onnx")
    assert main(["bench", model, "--backend", "tensorrt", "--iters", "1", "--warmup", "0"]) == 4
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "timing needs TensorRT and an NVIDIA GPU (the tensorrt package is not " \
                                    "installed)" in err and "onnxruntime" in err


# -- backend options, generically --------------------------------------------------------------------------------
def test_backend_options_from_spec_and_flags():
    registry = default_registry()
    backend = get_backend(registry, "tensorrt:workspace=1G:shapes=in:0:1x4/2x4/3x4:emit_trtexec=true")
    assert backend.options == BuildOptions(workspace="1G", shapes="in:0:1x4/2x4/3x4", emit_trtexec=True)
    assert registry.backends["tensorrt"].options == BuildOptions()  # the registered instance is unchanged
    flagged = get_backend(registry, "tensorrt", {"shapes": ("--shapes", "x:1x3")})
    assert flagged.options.shapes == "x:1x3"
    with pytest.raises(UsageError, match="--shapes is not an option of backend 'onnxruntime' .its options: none"):
        get_backend(registry, "onnxruntime", {"shapes": ("--shapes", "x:1x3")})
    with pytest.raises(PipelineError, match="backend 'tensorrt' has no option 'workspaces'"):
        get_backend(registry, "tensorrt:workspaces=1G")
    with pytest.raises(PipelineError, match="backend 'tensorrt': workspace '1T' is not a size"):
        get_backend(registry, "tensorrt:workspace=1T")


def test_shapes_flag_on_a_backend_without_it_is_one_line(tmp_path, capsys):
    model = tiny_model(tmp_path / "m.onnx")
    assert main(["run", model, "--shapes", "x:1x3x8x8", "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("graphopt: error: --shapes is not an option of backend 'onnxruntime' (its options: none)")


# -- the real thing, where it exists -----------------------------------------------------------------------------
def _real_tensorrt_reason() -> str | None:
    trt, why = tensorrt_build.import_tensorrt()
    if trt is None:
        return f"tensorrt is {why}"
    if str(getattr(trt, "__file__", "")).startswith(str(FAKE)):
        return "only the stand-in tensorrt is importable"
    return None if tensorrt_build.device_facts() is not None else "no CUDA device"


def test_real_engine_build(tmp_path, monkeypatch):
    reason = _real_tensorrt_reason()
    if reason:
        pytest.skip(f"needs TensorRT and an NVIDIA GPU: {reason}")
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_model(tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    assert main(["run", model, "--passes", "fold", "--backend", "tensorrt", "--shapes", "x:1x3x8x8/2x3x8x8/4x3x8x8",
                 "-o", str(out)]) == 0
    report = parse_engine_information((tmp_path / "out.layers.json").read_text())
    assert report.detailed and report.layers and (tmp_path / "out.engine").stat().st_size > 0
    with pytest.raises(BackendError, match="timing needs TensorRT"):
        get_backend(default_registry(), "tensorrt").bench(str(out))

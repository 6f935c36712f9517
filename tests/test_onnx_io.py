"""ONNX loading and saving: IR < 4 upgrade, inputs with defaults, opset upgrade, atomic saving with external
data, safe external data, custom domains, and one-line load errors. Models are built in code."""

from __future__ import annotations

import errno
import hashlib
import os
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli import main
from graphopt.errors import ModelLoadError, OutputError, UnsupportedError, UsageError
from graphopt.ir import OnnxGraph, external_data_files, onnx_checks, onnx_external, onnx_write

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
LIGHT_MODELS = sorted(f[:-5] for f in os.listdir(LIGHT) if f.endswith(".onnx")) if os.path.isdir(LIGHT) else []
RTOL = 1e-5


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def ort_run(model, feeds, **inputs):
    """Outputs of onnxruntime on a path or ModelProto (its own loader, not graphopt's)."""
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {**feeds, **inputs})


def assert_close(actual, expected, rtol=RTOL):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * float(np.max(np.abs(e))))


def mlp(rows=64, hidden=256, cols=32, seed=0, ir_version=8, opset=17) -> onnx.ModelProto:
    """x[1,rows] -> MatMul W1 -> Add b1 -> Relu -> MatMul W2 -> y[1,cols]; W1, W2 over 1 KB (external when saved so)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((rows, hidden)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((hidden, cols)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def x_feed(rows=64, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((1, rows)).astype(np.float32)}


def save_external(model, path, location=None) -> str:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location or os.path.basename(str(path)) + ".data", size_threshold=1024)
    return str(path)


# -- IR < 4 and initializers listed as inputs ------------------------------------------------------------------
@pytest.mark.skipif(not LIGHT_MODELS, reason="onnx's backend test data (light models) is not in this onnx wheel")
@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_models_are_upgraded_and_saved_valid(name, tmp_path):
    src = os.path.join(LIGHT, name + ".onnx")
    original = onnx.load(src)
    assert original.ir_version < 4 and {i.name for i in original.graph.initializer} <= {
        i.name for i in original.graph.input}
    graph = OnnxGraph.load(src)
    assert graph.gs.ir_version >= 4 and graph.notes and "IR version 3 -> 4" in graph.notes[0]
    assert [t.name for t in graph.gs.inputs] == [i.name for i in original.graph.input
                                                 if i.name not in {t.name for t in original.graph.initializer}]
    out = str(tmp_path / "out.onnx")
    graph.save(out)
    onnx.checker.check_model(out, full_check=True)
    saved = onnx.load(out)
    assert saved.ir_version == 4 and not {i.name for i in saved.graph.initializer} & {i.name for i in saved.graph.input}
    if name in ("light_resnet50", "light_squeezenet", "light_inception_v1", "light_densenet121", "light_shufflenet"):
        feeds = graph.sample_inputs()
        assert_close(ort_run(out, feeds), ort_run(src, feeds))


@pytest.mark.skipif(not LIGHT_MODELS, reason="onnx's backend test data (light models) is not in this onnx wheel")
@pytest.mark.parametrize("passes", ["fold", "eliminate-dead"])  # eliminate-dead changes nothing here
def test_ir3_model_through_the_cli_is_valid_and_equal(passes, tmp_path):
    src = os.path.join(LIGHT, "light_squeezenet.onnx")
    out = str(tmp_path / "sq.onnx")
    before = digest(src)
    assert main(["run", src, "--passes", passes, "-q", "-o", out]) == 0
    onnx.checker.check_model(out, full_check=True)
    feeds = OnnxGraph.load(src).sample_inputs()
    assert_close(ort_run(out, feeds), ort_run(src, feeds))
    assert digest(src) == before and sorted(os.listdir(tmp_path)) == ["sq.onnx"]


def _with_defaults(ir_version=8) -> onnx.ModelProto:
    """y = BatchNorm(Conv(x, w)) where the conv weight ``w`` (1,728 bytes) and the BN scale ``gamma`` are also
    graph inputs: defaults that may be fed."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(0.5, 2, 16).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.5, 2, 16).astype(np.float32), "var")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
              helper.make_tensor_value_info("gamma", TensorProto.FLOAT, [16]),
              helper.make_tensor_value_info("w", TensorProto.FLOAT, [16, 3, 3, 3])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])]
    graph = helper.make_graph(nodes, "d", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=ir_version)


def test_inputs_with_defaults_keep_their_meaning_through_fold(tmp_path):
    import graphopt

    src = tmp_path / "d.onnx"
    onnx.save(_with_defaults(), str(src))
    graph = OnnxGraph.load(str(src))
    assert [t.name for t in graph.gs.inputs] == ["x", "gamma", "w"] and set(graph.defaults) == {"gamma", "w"}
    assert graph.op_counts() == {"Conv": 1, "BatchNormalization": 1} and graph.num_parameters() == 496
    assert set(graph.sample_inputs()) == {"x"}  # the default is what the check runs with
    from graphopt.calib.specs import input_specs

    assert [spec.name for spec in input_specs(graph)] == ["x"]  # calibration data need not carry the default
    out = str(tmp_path / "o.onnx")
    result = graphopt.optimize(str(src), "fold")
    result.graph.verify(result.model)  # also on the export, where the default is an initializer and an input
    result.save(out)
    onnx.checker.check_model(out, full_check=True)
    saved = onnx.load(out)
    assert [i.name for i in saved.graph.input] == ["x", "gamma", "w"]
    assert {"gamma", "w"} <= {i.name for i in saved.graph.initializer}
    assert [n.op_type for n in saved.graph.node] == ["Conv", "BatchNormalization"]  # nothing folded into w
    x = graph.sample_inputs()
    assert_close(ort_run(out, x), ort_run(str(src), x))  # the default
    gamma = {"gamma": np.linspace(-1, 1, 16).astype(np.float32)}
    assert_close(ort_run(out, x, **gamma), ort_run(str(src), x, **gamma))  # and an override still works
    assert not np.allclose(ort_run(str(src), x, **gamma)[0], ort_run(str(src), x)[0])


# -- opset upgrade ---------------------------------------------------------------------------------------------
def _old_opset_model(opset: int) -> onnx.ModelProto:
    """Ops whose signature or semantics change between opsets 9 and 13: Clip/Pad/ReduceSum/Squeeze/Unsqueeze/Split
    attributes that became inputs, Slice (10), TopK (10), Softmax on 4-D (13 stopped coercing to 2-D)."""
    rng = np.random.default_rng(opset)

    def f(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    inits = [numpy_helper.from_array(f(8, 3, 3, 3), "w"), numpy_helper.from_array(f(8), "b"),
             numpy_helper.from_array(np.abs(f(8)) + 0.5, "scale"), numpy_helper.from_array(f(8), "bias"),
             numpy_helper.from_array(f(8), "mean"), numpy_helper.from_array(np.abs(f(8)) + 0.5, "var"),
             numpy_helper.from_array(f(40, 10), "fc"), numpy_helper.from_array(np.array([1, -1], np.int64), "flat")]
    clip = (helper.make_node("Clip", ["bn"], ["cl"], min=-1.0, max=1.5) if opset < 11 else
            helper.make_node("Clip", ["bn", "lo", "hi"], ["cl"]))
    if opset >= 11:
        inits += [numpy_helper.from_array(np.array(-1.0, np.float32), "lo"),
                  numpy_helper.from_array(np.array(1.5, np.float32), "hi")]
    pad = (helper.make_node("Pad", ["p"], ["pd"], pads=[0, 0, 0, 0, 0, 0, 1, 0]) if opset < 11 else
           helper.make_node("Pad", ["p", "pads"], ["pd"]))
    if opset >= 11:
        inits.append(numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 0], np.int64), "pads"))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["bn"]), clip,
             helper.make_node("MaxPool", ["cl"], ["p"], kernel_shape=[2, 2], strides=[2, 2]), pad,
             helper.make_node("Softmax", ["pd"], ["sm"], axis=2),
             helper.make_node("ReduceSum", ["sm"], ["rs"], axes=[3], keepdims=1),
             helper.make_node("Squeeze", ["rs"], ["sq"], axes=[3]),
             helper.make_node("Unsqueeze", ["sq"], ["us"], axes=[1]),
             (helper.make_node("Slice", ["us"], ["sl"], axes=[3], starts=[0], ends=[5]) if opset < 10 else
              helper.make_node("Identity", ["us"], ["sl"])),
             helper.make_node("Reshape", ["sl", "flat"], ["r"]),
             helper.make_node("MatMul", ["r", "fc"], ["m"]),
             helper.make_node("Softmax", ["m"], ["y"], axis=1),
             helper.make_node("Split", ["m"], ["s1", "s2"], axis=1, split=[4, 6])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10]),
               helper.make_tensor_value_info("s1", TensorProto.FLOAT, [1, 4]),
               helper.make_tensor_value_info("sm", TensorProto.FLOAT, [1, 8, 5, 4])]
    if opset < 10:
        nodes.append(helper.make_node("TopK", ["s2"], ["tv", "ti"], k=2))
        outputs.append(helper.make_tensor_value_info("tv", TensorProto.FLOAT, [1, 2]))
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=onnx.helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("opset", [9, 10, 11])
def test_upgrade_opset_to_13_keeps_outputs(opset, tmp_path):
    model = _old_opset_model(opset)
    graph = OnnxGraph.from_model(model)
    weight = graph.gs.tensors()["fc"]._values  # 1,600 bytes: over 1 KB, so the converter never sees it
    feeds = graph.sample_inputs()
    expected = ort_run(model, feeds)
    assert graph.upgrade_opset(13) == f"opset {opset} -> 13 (onnx.version_converter)"
    assert graph.opset == 13 and graph.gs.tensors()["fc"]._values is weight  # weights put back, not copied
    out = str(tmp_path / "up.onnx")
    graph.save(out)
    onnx.checker.check_model(out, full_check=True)
    saved = onnx.load(out)
    assert [(o.domain, o.version) for o in saved.opset_import] == [("", 13)] and saved.ir_version >= 7
    assert {n.op_type for n in saved.graph.node} >= {"Conv", "Softmax", "Split"}
    assert_close(ort_run(out, feeds), expected)


def test_upgrade_opset_refusals():
    graph = OnnxGraph.from_model(_old_opset_model(9))
    with pytest.raises(UnsupportedError, match=r"opset 9 -> 99: onnx .* knows opsets up to \d+ \(upgrade onnx\)"):
        graph.upgrade_opset(99)
    assert graph.opset == 9
    assert graph.upgrade_opset(9) == "opset 9: not converted (already >= 9)"
    bad = helper.make_model(helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"]), helper.make_node("Zap", ["y"], ["z"], domain="com.example")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])]),
        opset_imports=[helper.make_opsetid("", 9), helper.make_opsetid("com.example", 1)], ir_version=4)
    graph = OnnxGraph.from_model(bad)
    with pytest.raises(UnsupportedError) as err:
        graph.upgrade_opset(13)
    message = str(err.value)
    assert message.startswith("opset 9 -> 13: onnx.version_converter failed") and "\n" not in message
    assert "converts only the default domain, the model also has com.example" in message
    assert "(re-export the model at opset 13 or newer)" in message and graph.opset == 9


# -- saving --------------------------------------------------------------------------------------------------------
def test_same_command_twice_with_external_data(tmp_path, monkeypatch):
    src = save_external(mlp(), tmp_path / "in.onnx")
    before = {p: digest(tmp_path / p) for p in os.listdir(tmp_path)}
    unrelated = tmp_path / "cwd" / "out.onnx.data"  # in the current folder: must neither block nor be touched
    unrelated.parent.mkdir()
    unrelated.write_bytes(b"not mine")
    monkeypatch.chdir(unrelated.parent)
    (tmp_path / "other").mkdir()
    out = str(tmp_path / "other" / "out.onnx")
    for _ in range(2):
        assert main(["run", src, "--passes", "fold", "-q", "-o", out]) == 0
        assert sorted(os.listdir(tmp_path / "other")) == ["out.onnx", "out.onnx.data"]
        onnx.checker.check_model(out, full_check=True)
        assert_close(ort_run(out, x_feed()), ort_run(src, x_feed()))
    locations = {e.value for t in onnx.load(out, load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {"out.onnx.data"}
    assert unrelated.read_bytes() == b"not mine" and os.listdir(unrelated.parent) == ["out.onnx.data"]
    assert {p: digest(tmp_path / p) for p in before} == before


def test_save_round_trip_writes_aligned_data_from_the_input_file(tmp_path):
    src = save_external(mlp(rows=512, hidden=1024), tmp_path / "in.onnx")
    graph = OnnxGraph.load(src)
    assert all(isinstance(graph.gs.tensors()[n]._values, onnx_external.ExternalValues) for n in ("W1", "W2"))
    w1 = graph.gs.tensors()["W1"].values  # mapped, read-only: passes cannot change the input's bytes
    assert isinstance(w1, onnx_external.FileArray) and not w1.flags.writeable
    with pytest.raises(ValueError):
        w1[0, 0] = 1.0
    out = str(tmp_path / "out.onnx")
    graph.save(out)
    saved = onnx.load(out, load_external_data=False)
    offsets = {t.name: int(e.value) for t in saved.graph.initializer for e in t.external_data if e.key == "offset"}
    assert sorted(offsets) == ["W1", "W2", "b1"]
    assert offsets["W1"] % 4096 == 0 and offsets["W2"] % 4096 == 0  # 2 MB and 128 KB: on pages, to be mapped
    again = OnnxGraph.load(out)
    for name in ("W1", "b1", "W2"):
        np.testing.assert_array_equal(again.gs.tensors()[name].values, graph.gs.tensors()[name].values)
    feeds = x_feed(512)
    assert_close(again.run(feeds), ort_run(src, feeds))


def test_small_external_tensors_are_packed_not_padded_to_pages(tmp_path):
    """Tensors over 1 KB go to the data file; only those of 64 KB and more start on a 4 KB page. Padding every one
    made a model of 200 tensors of 1.5 KB 2.7x its data (800 KB for 300 KB)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(384).astype(np.float32), f"b{i}") for i in range(200)]
    nodes = [helper.make_node("Add", ["x" if i == 0 else f"h{i - 1}", f"b{i}"], [f"h{i}" if i < 199 else "y"])
             for i in range(200)]
    graph = helper.make_graph(nodes, "adds", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [384])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [384])], inits)
    src = save_external(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "in.onnx")
    out = str(tmp_path / "out.onnx")
    OnnxGraph.load(src).save(out)
    weights = 200 * 384 * 4
    assert os.path.getsize(out + ".data") == weights  # packed end to end
    feeds = {"x": np.ones(384, np.float32)}
    assert_close(ort_run(out, feeds), ort_run(src, feeds))


def test_new_weights_are_written_beside_copied_ones(tmp_path):
    import onnx_graphsurgeon as gs

    src = save_external(mlp(), tmp_path / "in.onnx")
    before = digest(tmp_path / "in.onnx.data")
    graph = OnnxGraph.load(src)
    w2 = graph.gs.tensors()["W2"]
    scaled = gs.Constant("W2_scaled", np.asarray(w2.values) * 2)  # a pass's new weight, in memory
    node = next(n for n in graph.gs.nodes if w2 in n.inputs)
    node.inputs[node.inputs.index(w2)] = scaled
    graph.gs.cleanup()
    expected = [2 * y for y in ort_run(src, x_feed())]
    assert_close(graph.run(x_feed()), expected)  # handed to onnxruntime as an array, W1 mapped from the file
    out = str(tmp_path / "out.onnx")
    graph.save(out)
    onnx.checker.check_model(out, full_check=True)
    assert_close(ort_run(out, x_feed()), expected)
    assert digest(tmp_path / "in.onnx.data") == before


def _nested_model() -> onnx.ModelProto:
    """A Constant node's tensor and an If branch's initializer, both over 1 KB: external data outside the main
    graph's initializers."""
    rng = np.random.default_rng(2)
    big = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "K")
    branch_w = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "Wb")
    then = helper.make_graph([helper.make_node("MatMul", ["x", "Wb"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 32])], [branch_w])
    other = helper.make_graph([helper.make_node("MatMul", ["x", "k"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 32])])
    nodes = [helper.make_node("Constant", [], ["k"], value=big),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "nested", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
                              [numpy_helper.from_array(np.array(0, np.float32), "zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_external_tensors_in_attributes_and_subgraphs(tmp_path):
    src = str(tmp_path / "n.onnx")
    onnx.save_model(_nested_model(), src, save_as_external_data=True, location="n.onnx.data", size_threshold=1024,
                    convert_attribute=True)
    stored = onnx.load(src, load_external_data=False)
    assert stored.graph.node[0].attribute[0].t.data_location == TensorProto.EXTERNAL
    then = next(a.g for a in stored.graph.node[3].attribute if a.name == "then_branch")
    assert then.initializer[0].data_location == TensorProto.EXTERNAL
    graph = OnnxGraph.load(src)
    for sign in (1, -1):  # both branches
        x = {"x": sign * np.abs(x_feed()["x"])}
        assert_close(graph.run(x), ort_run(_nested_model(), x))
    out = str(tmp_path / "o.onnx")
    graph.save(out)
    onnx.checker.check_model(out, full_check=True)
    x = {"x": -np.abs(x_feed()["x"])}
    assert_close(ort_run(out, x), ort_run(_nested_model(), x))


def test_save_refuses_to_overwrite_the_data_it_reads(tmp_path):
    src = save_external(mlp(), tmp_path / "in.onnx")
    before = {p: digest(tmp_path / p) for p in os.listdir(tmp_path)}
    graph = OnnxGraph.load(src)
    with pytest.raises(UsageError, match="in.onnx.data, which the model reads its weights from"):
        graph.save(src)
    assert {p: digest(tmp_path / p) for p in os.listdir(tmp_path)} == before


def test_before_move_checks_the_written_file_before_it_lands(tmp_path):
    from graphopt.errors import EquivalenceError

    src = save_external(mlp(), tmp_path / "in.onnx")
    graph = OnnxGraph.load(src)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    seen = []

    def check(temporary):  # the lead's numeric check: onnxruntime on the file about to be moved into place
        assert os.path.dirname(temporary) != str(out.parent) and not out.exists()
        seen.append(ort_run(temporary, x_feed()))

    graph.save(str(out), before_move=check)
    assert_close(seen[0], ort_run(src, x_feed()))
    assert sorted(os.listdir(out.parent)) == ["o.onnx", "o.onnx.data"]
    before = {p: digest(out.parent / p) for p in os.listdir(out.parent)}

    def refuse(temporary):
        raise EquivalenceError("fold", "outputs moved")

    with pytest.raises(EquivalenceError):
        graph.save(str(out), before_move=refuse)
    assert {p: digest(out.parent / p) for p in os.listdir(out.parent)} == before  # the earlier output untouched


def _write_failures(tmp_path, monkeypatch):
    """(name, path, expected message part, setup): every way writing can fail."""
    (tmp_path / "adir").mkdir()

    def full_disk():
        def no_space(const, out):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(onnx_write, "_write_values", no_space)

    def read_only():
        def refuse(**kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(onnx_write.tempfile, "mkdtemp", refuse)

    def second_move_fails():
        real = os.replace

        def replace(src, dst):
            if dst.endswith("out.onnx"):
                raise OSError(errno.EIO, "Input/output error")
            real(src, dst)
        monkeypatch.setattr(onnx_write.os, "replace", replace)

    return {
        "missing folder": (tmp_path / "nope" / "out.onnx", "folder", None),
        "a directory at the path": (tmp_path / "adir", "it is a directory", None),
        "disk full": (tmp_path / "out.onnx", "No space left on device) (free some disk space)", full_disk),
        "read-only folder": (tmp_path / "out.onnx", "Permission denied) (check the folder's permissions)", read_only),
        "moving the model fails": (tmp_path / "out.onnx", "Input/output error", second_move_fails),
    }


@pytest.mark.parametrize("case", ["missing folder", "a directory at the path", "disk full", "read-only folder",
                                  "moving the model fails"])
def test_write_failures_are_output_errors_and_leave_nothing(case, tmp_path, monkeypatch):
    src = save_external(mlp(), tmp_path / "in.onnx")
    graph = OnnxGraph.load(src)
    (tmp_path / "out.onnx.data").write_bytes(b"an older output's data")  # must survive a failed write
    path, message, setup = _write_failures(tmp_path, monkeypatch)[case]
    listing = sorted(os.listdir(tmp_path))
    hashes = {p: digest(tmp_path / p) for p in listing if (tmp_path / p).is_file()}
    if setup:
        setup()
    with pytest.raises(OutputError) as err:
        graph.save(str(path))
    text = str(err.value)
    assert text.startswith(f"{path}: cannot write") and message in text and "\n" not in text
    assert re.search(r"\(.+\)$", text)
    assert sorted(os.listdir(tmp_path)) == listing
    assert {p: digest(tmp_path / p) for p in hashes} == hashes


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; simulated in the test above")
def test_real_read_only_folder(tmp_path):
    graph = OnnxGraph.from_model(mlp())
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="ro/out.onnx: cannot write"):
            graph.save(str(folder / "out.onnx"))
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o700)


# -- safe external data ----------------------------------------------------------------------------------------
def _external_model(tmp_path, edit=None, name="m.onnx"):
    """``m.onnx`` + ``m.onnx.data`` (W1, W2 external); ``edit(tensor_proto_of_W1)`` may rewrite W1's reference."""
    path = save_external(mlp(), tmp_path / name)
    if edit:
        model = onnx.load(path, load_external_data=False)
        w1 = next(t for t in model.graph.initializer if t.name == "W1")
        info = {e.key: e.value for e in w1.external_data}
        info.update(edit(info, tmp_path) or {})
        del w1.external_data[:]
        for key, value in info.items():
            w1.external_data.add(key=key, value=str(value))
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
    return path


def _symlinked(info, tmp_path):
    os.symlink(tmp_path / "m.onnx.data", tmp_path / "link.data")
    return {"location": "link.data"}


def _symlinked_folder(info, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "w.data").write_bytes((tmp_path / "m.onnx.data").read_bytes())
    os.symlink(tmp_path / "real", tmp_path / "sub")
    return {"location": "sub/w.data"}


def _hard_linked(info, tmp_path):
    os.link(tmp_path / "m.onnx.data", tmp_path / "hard.data")
    return {"location": "hard.data"}


def _outside(info, tmp_path):
    (tmp_path.parent / f"{tmp_path.name}-outside.data").write_bytes((tmp_path / "m.onnx.data").read_bytes())
    return {"location": f"../{tmp_path.name}-outside.data"}


UNSAFE = {
    "absolute path": (lambda info, tmp: {"location": str(tmp / "m.onnx.data")}, "is not a plain relative path"),
    "parent folder": (_outside, "leaves the model's folder"),
    "dot-dot inside": (lambda info, tmp: {"location": "x/../m.onnx.data"}, "leaves the model's folder"),
    "symlink": (_symlinked, "reached through a symlink"),
    "symlinked folder": (_symlinked_folder, "reached through a symlink"),
    "hard link": (_hard_linked, "is a hard link"),
    "past the end": (lambda info, tmp: {"offset": os.path.getsize(tmp / "m.onnx.data") - 8}, "runs past the end"),
    "length past the end": (lambda info, tmp: {"length": 10**9}, "runs past the end"),
    "wrong length": (lambda info, tmp: {"length": 100}, "needs 65536"),
    "negative offset": (lambda info, tmp: {"offset": -4}, "negative offset"),
    "missing file": (lambda info, tmp: {"location": "gone.data"}, "does not exist"),
    "a folder": (lambda info, tmp: os.mkdir(tmp / "d") or {"location": "d"}, "not a regular file"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_external_data_is_refused_before_anything_reads_it(case, tmp_path, monkeypatch, capsys):
    edit, message = UNSAFE[case]
    path = _external_model(tmp_path, edit)

    def must_not_run(*args, **kwargs):
        raise AssertionError("read the external data before it was validated")

    with monkeypatch.context() as m:  # neither onnx's loader, its checker nor onnxruntime may see the data
        for target, attr in ((onnx.checker, "check_model"), (ort, "InferenceSession"),
                             (onnx, "load_external_data_for_model"), (onnx.external_data_helper,
                                                                      "load_external_data_for_tensor")):
            m.setattr(target, attr, must_not_run)
        with pytest.raises(ModelLoadError) as err:
            OnnxGraph.load(path)
        with pytest.raises(ModelLoadError):
            external_data_files(path)
    text = str(err.value)
    assert text.startswith(f"{path}: external data of tensor 'W1'") and message in text and "\n" not in text
    assert text.endswith("copy the data there)")
    assert main(["run", path, "-q", "-o", str(tmp_path / "o.onnx")]) == 3
    assert capsys.readouterr().err.count("\n") == 1
    assert not os.path.exists(tmp_path / "o.onnx")


def test_safe_nested_external_data_loads_and_is_listed(tmp_path):
    (tmp_path / "weights").mkdir()
    model = mlp()
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="weights/w.bin",
                    size_threshold=1024)
    os.rename(tmp_path / "m.onnx", tmp_path / "m2.onnx")
    graph = OnnxGraph.load(str(tmp_path / "m2.onnx"))
    assert_close(graph.run(x_feed()), ort_run(mlp(), x_feed()))  # save_model moved `model`'s weights out
    assert external_data_files(str(tmp_path / "m2.onnx")) == [os.path.realpath(tmp_path / "weights" / "w.bin")]
    (tmp_path / "two").mkdir()  # one file per tensor (onnx names them after the tensors)
    onnx.save_model(mlp(), str(tmp_path / "two" / "two.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=1024)
    files = external_data_files(str(tmp_path / "two" / "two.onnx"))
    assert files == sorted(os.path.realpath(tmp_path / "two" / f) for f in os.listdir(tmp_path / "two")
                           if f != "two.onnx") and len(files) == 3
    assert external_data_files(save_external(mlp(), tmp_path / "plain.onnx")) == [
        os.path.realpath(tmp_path / "plain.onnx.data")]
    onnx.save(mlp(), str(tmp_path / "inline.onnx"))
    assert external_data_files(str(tmp_path / "inline.onnx")) == []


# -- custom domains and versions -------------------------------------------------------------------------------
def _custom_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Identity", ["h"], ["hi"]),
             helper.make_node("Zap", ["hi"], ["y"], domain="com.example", alpha=0.5, mode="fast")]
    graph = helper.make_graph(nodes, "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17),
                                                                 helper.make_opsetid("com.example", 1)])


def test_custom_domain_loads_verifies_and_saves_untouched(tmp_path, capsys):
    src = tmp_path / "c.onnx"
    onnx.save(_custom_model(), str(src))
    graph = OnnxGraph.load(str(src))
    graph.verify()
    graph.infer_shapes()
    with pytest.raises(UnsupportedError, match="com.example:Zap.*custom-op library"):
        graph.run(x_feed(4))
    out = str(tmp_path / "o.onnx")
    assert main(["run", str(src), "--passes", "fold", "--no-check", "-q", "-o", out]) == 0
    saved = onnx.load(out)
    onnx.checker.check_model(saved, full_check=True)
    zap = [n for n in saved.graph.node if n.domain == "com.example"]
    assert len(zap) == 1 and zap[0].op_type == "Zap"
    assert zap[0].attribute == _custom_model().graph.node[2].attribute
    assert ("com.example", 1) in [(o.domain, o.version) for o in saved.opset_import]
    assert [n.op_type for n in saved.graph.node] == ["MatMul", "Zap"]  # the Identity went, the rest stayed


def test_opset_newer_than_onnx_knows_is_one_unsupported_line(tmp_path, capsys):
    newest = onnx.defs.onnx_opset_version()
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]),
        opset_imports=[helper.make_opsetid("", newest + 5)], ir_version=8)
    path = str(tmp_path / "new.onnx")
    onnx.save(model, path)
    with pytest.raises(UnsupportedError, match=rf"opset {newest + 5} is newer than onnx .* \(up to {newest}\)"):
        OnnxGraph.load(path)
    assert main(["run", path, "-o", str(tmp_path / "o.onnx")]) == UnsupportedError.exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and f"re-export the model at opset {newest}" in err
    model.opset_import[0].version = 17
    model.ir_version = onnx.IR_VERSION + 1
    onnx.save(model, path)
    with pytest.raises(UnsupportedError, match=rf"IR version {onnx.IR_VERSION + 1} is newer"):
        OnnxGraph.load(path)


def _optional_models():
    """An optional graph output (``Optional(x)``), and an empty optional made from a type attribute inside an If
    branch (onnx-graphsurgeon drops TYPE_PROTO attributes on import: that branch would come back without it)."""
    opt_out = helper.make_model(helper.make_graph(
        [helper.make_node("Optional", ["x"], ["o"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_value_info("o", helper.make_optional_type_proto(helper.make_tensor_type_proto(1, [2])))]),
        opset_imports=[helper.make_opsetid("", 18)])
    empty = helper.make_graph([helper.make_node("Optional", [], ["e"], type=helper.make_tensor_type_proto(1, [2])),
                               helper.make_node("OptionalHasElement", ["e"], ["h"])], "then", [],
                              [helper.make_tensor_value_info("h", TensorProto.BOOL, [])])
    full = helper.make_graph([helper.make_node("Identity", ["c"], ["k"])], "else", [],
                             [helper.make_tensor_value_info("k", TensorProto.BOOL, [])])
    type_attr = helper.make_model(helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=empty, else_branch=full)], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.BOOL, [])]),
        opset_imports=[helper.make_opsetid("", 18)])
    return {"optional output": (opt_out, "graph input/output 'o' has an optional type"),
            "type attribute": (type_attr, "node 'Optional' (Optional) has a type-valued attribute")}


@pytest.mark.parametrize("case", ["optional output", "type attribute"])
def test_optional_values_and_type_attributes_round_trip(case, tmp_path):
    """What onnx-graphsurgeon cannot carry on its own — an optional-typed graph output (its exporter fails on
    it) and Optional's type-valued attribute (its importer drops it) — comes back as it was: the written model
    passes onnx's full check, keeps the optional type and the attribute, and computes what the original does."""
    model, _ = _optional_models()[case]
    path, out = str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx")
    onnx.save(model, path)
    assert main(["run", path, "--passes", "fold", "-o", out]) == 0
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    types = {vi.name: vi.type.WhichOneof("value") for vi in [*written.graph.input, *written.graph.output]}
    attrs = [a for g in onnx_checks.graphs(written.graph) for n in g.node for a in n.attribute
             if a.type == onnx.AttributeProto.TYPE_PROTO]
    feeds = {"x": np.float32([1, 2])} if case == "optional output" else {"c": np.array(True)}
    expected = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    got = ort.InferenceSession(out).run(None, feeds)
    if case == "optional output":
        assert types["o"] == "optional_type"
        np.testing.assert_array_equal(got[0], expected[0])
    else:
        assert len(attrs) == 1 and attrs[0].name == "type"
        assert got[0] == expected[0] == np.array(False)  # the then-branch: an empty optional has no element


def test_an_optional_inside_a_sequence_is_one_unsupported_line():
    """onnx-graphsurgeon reads a sequence's element as a tensor type: a sequence of optionals cannot be carried."""
    seq = helper.make_sequence_type_proto(helper.make_optional_type_proto(helper.make_tensor_type_proto(1, [2])))
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g", [helper.make_value_info("x", seq)],
        [helper.make_value_info("y", seq)]), opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(UnsupportedError, match="'x' has a type with an optional inside a sequence or map"):
        OnnxGraph.from_model(model)


# -- load errors ----------------------------------------------------------------------------------------------------
def _invalid(tmp_path):
    model = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]> g (float[2] x) => (float[2] y) '
                                    "{ y = Add(x, missing) }")
    return _write(tmp_path / "invalid.onnx", model.SerializeToString())


def _write(path, data):
    path.write_bytes(data)
    return path


LOAD_ERRORS = {
    "missing": (lambda tmp: tmp / "nope.onnx", "no such file"),
    "directory": (lambda tmp: tmp, "is a directory"),
    "empty": (lambda tmp: _write(tmp / "e.onnx", b""), "not an ONNX model"),
    "garbage": (lambda tmp: _write(tmp / "g.onnx", b"\xff\xfe not a model" * 9), "not a readable ONNX model"),
    "truncated": (lambda tmp: _write(tmp / "t.onnx", mlp().SerializeToString()[:500]), "not a readable ONNX model"),
    "invalid graph": (_invalid, "invalid ONNX graph"),
    "missing external data": (lambda tmp: _external_model(tmp, lambda i, t: {"location": "no.bin"}), "does not exist"),
}


@pytest.mark.parametrize("case", sorted(LOAD_ERRORS))
def test_every_load_error_is_one_line_with_path_what_and_what_to_do(case, tmp_path):
    make, what = LOAD_ERRORS[case]
    path = str(make(tmp_path))
    with pytest.raises(ModelLoadError) as err:
        OnnxGraph.load(path)
    text = str(err.value)
    assert err.value.exit_code == 3 and "\n" not in text
    assert text.startswith(f"{path}: ") and what in text and re.search(r" \([^()]*(\([^()]*\)[^()]*)*\)$", text), text


def test_in_memory_model_with_external_references_is_refused():
    model = mlp()
    onnx.external_data_helper.convert_model_to_external_data(model, location="w.bin", size_threshold=1024)
    for t in model.graph.initializer:
        if t.HasField("raw_data") and t.data_location == TensorProto.EXTERNAL:
            t.ClearField("raw_data")
    with pytest.raises(ModelLoadError, match=r"^ModelProto: .*\(load the model by path"):
        OnnxGraph.from_model(model)

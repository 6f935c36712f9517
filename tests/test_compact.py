"""compact: fewer bytes, the same model — outputs bit-identical, interface names kept, onnxruntime's int8 fusions
unchanged, subgraphs renamed consistently, a second run finds nothing to do."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.errors import UsageError
from graphopt.ir import OnnxGraph
from tests.conftest import graph_from_text

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def compact(registry, graph, **options):
    """Run the pass on a copy; outputs must equal the original's bit for bit, and a second run change nothing."""
    cls = registry.passes["compact"]
    result = cls(cls.Options(**options))(graph.copy())
    result.graph.verify()
    feeds = graph.sample_inputs(seed=3)
    for before, after in zip(graph.run(feeds), result.graph.run(feeds), strict=True):
        np.testing.assert_array_equal(before, after)
    again = cls(cls.Options(**{k: v for k, v in options.items() if k != "map"}))(result.graph.copy())
    assert not again.modified, f"second run still changed the graph: {again.stats}"
    return result


def optimized_ops(path: str, tmp_path) -> Counter:
    """The op types of onnxruntime's optimized graph of the model at ``path`` (what its CPU provider runs)."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / f"{os.path.basename(path)}.ort.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_int8_model_smaller_same_outputs_and_kernels(zoo_onnx, tmp_path):
    int8, small = str(tmp_path / "int8.onnx"), str(tmp_path / "small.onnx")
    calib = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    graphopt.optimize(zoo_onnx("tiny_resnet"), "fold,int8", calibration=calib, output=int8)
    result = graphopt.optimize(int8, "compact", output=small, rtol=0.0)
    stats = result.report.records[0].stats
    assert stats["removed default attributes"] > 0 and stats["shortened tensor names"] > 0
    assert os.path.getsize(small) < 0.85 * os.path.getsize(int8)
    before, after = onnx.load(int8).graph, onnx.load(small).graph
    assert [v.name for v in after.input] == [v.name for v in before.input]
    assert [v.name for v in after.output] == [v.name for v in before.output]
    assert Counter(n.op_type for n in after.node) == Counter(n.op_type for n in before.node)
    assert all(n.name == n.output[0] for n in after.node)
    outputs = {v.name for v in after.output}
    assert max(len(n.name) for n in after.node if n.name not in outputs) <= 2
    # onnxruntime fuses the same Q/DQ groups into the same int8 kernels (zero points are kept for that)
    fused = optimized_ops(int8, tmp_path)
    assert fused["QLinearConv"] > 0 and optimized_ops(small, tmp_path) == fused
    x = {before.input[0].name: calib[:1]}
    np.testing.assert_array_equal(*(ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, x)[0]
                                    for p in (int8, small)))


def test_defaults_dropped_others_kept(registry):
    g = graph_from_text(HEADER + """
        g (float[1, 2, 5, 5] x) => (float[1, 2, 5, 5] y, float[1, 2, 5, 5] z)
          <float[2, 1, 3, 3] w = {1.0, -2.0, 3.0, 0.5, 1.0, -1.0, 2.0, 0.0, 1.0, -3.0, 1.0, 2.0, 0.5, -0.5, 1.0, 2.0,
                                  -1.0, 1.0}> {
            c = Conv<group = 2, auto_pad = "NOTSET", pads = [1, 1, 1, 1], dilations = [1, 1]>(x, w)
            y = LeakyRelu<alpha = 0.01>(c)
            z = LeakyRelu<alpha = 0.2>(c)
        }""")
    result = compact(registry, g, names="keep")
    attrs = {n.op + str(i): dict(n.attrs) for i, n in enumerate(result.graph.gs.nodes)}
    # auto_pad and alpha=0.01 restate their defaults; group=2, pads and dilations (no declared default) stay
    assert attrs["Conv0"] == {"group": 2, "pads": [1, 1, 1, 1], "dilations": [1, 1]}
    assert attrs["LeakyRelu1"] == {} and attrs["LeakyRelu2"] == {"alpha": pytest.approx(0.2)}
    assert result.stats == {"removed default attributes": 2}
    assert {t.name for t in result.graph.gs.nodes[0].inputs} == {"x", "w"}  # names=keep renames nothing


def test_short_names_skip_the_interface_names(registry):
    # the model's input is called "1" and its output "0": the short names step around them
    graph = helper.make_graph(
        [helper.make_node("Mul", ["1", "long_weight_name"], ["long_intermediate_name"]),
         helper.make_node("Relu", ["long_intermediate_name"], ["0"])],
        "g", [helper.make_tensor_value_info("1", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("0", TensorProto.FLOAT, [2])],
        [helper.make_tensor("long_weight_name", TensorProto.FLOAT, [2], [1.0, 2.0])])
    g = OnnxGraph.from_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    result = compact(registry, g)
    names = {t.name for t in result.graph.gs.tensors().values()}
    assert names == {"0", "1", "2", "3"}
    assert [t.name for t in result.graph.gs.inputs] == ["1"] and [t.name for t in result.graph.gs.outputs] == ["0"]


def test_subgraph_reads_of_outer_tensors_follow_the_renaming(registry):
    then_branch = helper.make_graph([helper.make_node("Add", ["outer_value", "outer_value"], ["then_out"])], "then",
                                    [], [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [2])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["outer_value"], ["else_out"])], "else", [],
                                    [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [2])])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["outer_value"]),
         helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
         helper.make_node("Greater", ["total", "zero"], ["positive"]),
         helper.make_node("If", ["positive"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    g = OnnxGraph.from_model(model)
    result = compact(registry, g)
    exported = result.graph.to_model()
    onnx.checker.check_model(exported, full_check=True)
    branch = next(a.g for a in exported.graph.node[-1].attribute if a.name == "then_branch")
    relu = exported.graph.node[0]
    assert relu.output[0] != "outer_value" and list(branch.node[0].input) == [relu.output[0]] * 2
    for x in (np.array([1.0, 2.0], np.float32), np.array([-1.0, -2.0], np.float32)):
        np.testing.assert_array_equal(g.run({"x": x})[0], result.graph.run({"x": x})[0])


def test_map_records_the_renaming(registry, tmp_path):
    g = graph_from_text(HEADER + """
        g (float[2] x) => (float[2] y) <float[2] weight = {1.0, 2.0}> {
            product = Mul(x, weight)
            y = Relu(product)
        }""")
    path = tmp_path / "names.json"
    result = compact(registry, g, map=str(path))
    renamed = json.loads(path.read_text())
    assert renamed["tensors"] == {"0": "weight", "1": "product"}
    node_names = {n.name for n in result.graph.gs.nodes}
    assert set(renamed["nodes"]) <= node_names
    with pytest.raises(ValueError, match="needs names=short"):
        registry.passes["compact"].Options(names="keep", map=str(path))


def test_map_onto_the_input_is_refused(tmp_path, zoo_onnx):
    model = zoo_onnx("tiny_resnet")
    with pytest.raises(UsageError):
        graphopt.optimize(model, f"compact:map={model}", output=str(tmp_path / "out.onnx"))
    assert onnx.load(model).graph.node  # still the model it was


def test_a_failed_run_leaves_no_map(tmp_path, zoo_onnx):
    """map= is written once the run succeeds: a run that fails after compact (int8 refuses a float16 model)
    leaves neither the model nor a map of it behind."""
    from graphopt.errors import GraphoptError

    half = str(tmp_path / "half.onnx")
    graphopt.optimize(zoo_onnx("tiny_resnet"), "fold,fp16", output=half)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(GraphoptError, match="float16"):
        graphopt.optimize(half, f"compact:map={tmp_path / 'names.json'},int8", output=str(tmp_path / "out.onnx"))
    assert sorted(os.listdir(tmp_path)) == before
    graphopt.optimize(half, f"compact:map={tmp_path / 'names.json'}", output=str(tmp_path / "out.onnx"))
    assert json.loads((tmp_path / "names.json").read_text())["tensors"]

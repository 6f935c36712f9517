"""Nodes in a domain no runtime here knows (``com.example``) pass through every built-in pass untouched, also
when they are named like standard ops (``com.example:MatMul`` with constant inputs, ``com.example:Identity``,
``com.example:Reshape`` after a Conv), while the rest of the model is processed. The numeric check cannot run
such a model, so the passes run with ``check=False``; calibrating needs onnxruntime to run the model, so
``calibrate`` refuses with one UnsupportedError line naming the op and its domain."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.calib.state import OBSERVERS, RANGES
from graphopt.errors import UnsupportedError
from graphopt.ir import OnnxGraph
from graphopt.passes.base import PassContext

DOMAIN = "com.example"


def f32(name, shape=None, values=None, rng=None):
    values = rng.standard_normal(shape) if values is None else values
    return numpy_helper.from_array(np.asarray(values, np.float32), name)


def custom_model() -> onnx.ModelProto:
    """x -> Conv -> BN -> Foo(., Constant) -> Identity -> Conv -> Reshape* -> Relu -> MatMul -> Add(., MatMul*(a, b))
    -> Identity* -> out, and a dead Neg; * in com.example."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn"], name="bn1"),
        helper.make_node("Constant", [], ["k"], name="k", value=numpy_helper.from_array(np.float32([2.0]))),
        helper.make_node("Foo", ["bn", "k"], ["foo"], name="foo", domain=DOMAIN, alpha=1.5),
        helper.make_node("Identity", ["foo"], ["id"], name="identity"),
        helper.make_node("Conv", ["id", "w2"], ["c2"], name="conv2"),
        helper.make_node("Reshape", ["c2", "shape"], ["rs"], name="my_reshape", domain=DOMAIN),
        helper.make_node("Relu", ["rs"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "wm"], ["mm"], name="matmul"),
        helper.make_node("MatMul", ["ca", "cb"], ["cm"], name="my_matmul", domain=DOMAIN),
        helper.make_node("Add", ["mm", "cm"], ["sum"], name="add"),
        helper.make_node("Identity", ["sum"], ["out"], name="my_identity", domain=DOMAIN),
        helper.make_node("Neg", ["x"], ["dead"], name="dead"),
    ]
    rng = np.random.default_rng(2)
    inits = [f32(name, shape, rng=rng) for name, shape in (("w1", (4, 3, 3, 3)), ("b", (4,)), ("m", (4,)),
                                                          ("w2", (4, 4, 1, 1)), ("wm", (8, 5)), ("ca", (1, 5)),
                                                          ("cb", (5, 5)))]
    inits += [f32("g", values=rng.random(4) + 0.5), f32("v", values=rng.random(4) + 0.5),
              numpy_helper.from_array(np.int64([1, 4, 8, 8]), "shape")]
    graph = helper.make_graph(nodes, "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    onnx.checker.check_model(model, full_check=True)
    return model


CUSTOM = ("foo", "my_reshape", "my_matmul", "my_identity")


def custom_nodes(graph: OnnxGraph) -> dict:
    """name -> (op, domain, attributes, #inputs, #outputs) of the com.example nodes."""
    return {n.name: (n.op, n.domain, dict(n.attrs), len(n.inputs), len(n.outputs))
            for n in graph.gs.nodes if n.domain == DOMAIN}


def io_names(graph: OnnxGraph) -> dict:
    return {n.name: ([t.name for t in n.inputs], [t.name for t in n.outputs])
            for n in graph.gs.nodes if n.domain == DOMAIN}


ORIGINAL = OnnxGraph.from_model(custom_model())


def run(passes, ctx=None):
    result = graphopt.optimize(custom_model(), passes, check=False, ctx=ctx)
    assert custom_nodes(result.graph) == custom_nodes(ORIGINAL)  # every custom node, as it was
    onnx.checker.check_model(result.model, full_check=True)
    return result


def test_the_model_is_one_onnxruntime_cannot_run():
    with pytest.raises(Exception, match="com.example"):  # noqa: B017 - onnxruntime's own error type
        ORIGINAL.session()


@pytest.mark.parametrize("passes", ["eliminate-identity", "fold-constants", "fold-bn", "eliminate-dead"])
def test_canonicalizing_passes_keep_custom_nodes_and_their_wiring(passes):
    result = run(passes)
    assert io_names(result.graph) == io_names(ORIGINAL)
    counts, before = result.graph.op_counts(), ORIGINAL.op_counts()
    if passes == "eliminate-identity":  # the standard Identity goes, com.example:Identity stays
        assert counts["Identity"] == before["Identity"] - 1 == 1
    if passes == "fold-constants":  # the Constant node becomes an initializer; com.example:MatMul is not evaluated
        assert "Constant" not in counts and counts["MatMul"] == before["MatMul"]
    if passes == "fold-bn":
        assert "BatchNormalization" not in counts
    if passes == "eliminate-dead":
        assert "Neg" not in counts


def test_fold_pipeline_processes_the_rest():
    result = run("fold")
    assert result.graph.op_counts() == {"Conv": 2, "Foo": 1, "Reshape": 1, "Relu": 1, "MatMul": 2, "Add": 1,
                                        "Identity": 1}


def test_insert_observers_runs_and_calibrate_refuses_in_one_line():
    ctx = PassContext()
    result = run("insert-observers", ctx)
    assert {"x", "c1", "bn"} <= set(ctx.state[OBSERVERS]) and not result.report.modified
    with pytest.raises(UnsupportedError) as info:
        graphopt.optimize(custom_model(), "int8", check=False)
    message = str(info.value)
    assert info.value.exit_code == 4 and "\n" not in message
    assert message.startswith("pass 'calibrate': onnxruntime cannot run com.example:Foo, com.example:Identity")
    assert "(domain:op)" in message


def test_place_qdq_quantizes_the_standard_ops_only():
    ctx = PassContext(state={RANGES: {name: (-4.0, 4.0) for name in ("x", "c1", "bn", "foo", "id", "c2", "rs", "r",
                                                                        "mm", "cm", "sum")}})
    result = run("fold,place-qdq", ctx)
    g = result.graph.gs
    quantized = {n.name for n in g.nodes if n.op in ("Conv", "MatMul") and n.inputs[0].inputs
                 and n.inputs[0].inputs[0].op == "DequantizeLinear"}
    assert quantized == {"conv1", "conv2", "matmul"}
    reshape = next(n for n in g.nodes if n.name == "my_reshape")  # not treated as a passthrough Reshape
    assert not any(c.op == "QuantizeLinear" for c in reshape.outputs[0].outputs)
    assert "com.example:Foo x1" in " ".join(result.report.records[-1].notes)


def test_int8_dynamic_quantizes_the_standard_matmul_only():
    result = run("int8-dynamic")
    counts = result.graph.op_counts()
    assert counts["MatMulInteger"] == 1 and counts["MatMul"] == 1  # com.example:MatMul stays as it was
    assert io_names(result.graph)["my_matmul"] == io_names(ORIGINAL)["my_matmul"]


def test_to_fp16_keeps_custom_nodes_and_what_reads_their_outputs_in_float32():
    """Custom ops' outputs have no type ONNX can infer: the nodes computing from them stay float32 too (the
    converter would give them float16 weights beside a float32 input); the rest runs in float16."""
    ctx = PassContext()
    result = run("to-fp16", ctx)
    assert any("overflow check skipped" in w and "com.example:Foo" in w for w in ctx.warnings)
    for name in ("conv2", "matmul"):  # float32 weights beside the float32 outputs of Foo
        node = next(n for n in result.graph.gs.nodes if n.name == name)
        assert node.inputs[1].values.dtype == np.float32
    inferred = result.graph.inferred_shapes()
    converted = {name: t.values.dtype for name, t in result.graph.gs.tensors().items() if hasattr(t, "values")}
    assert converted["w1"] == np.float16  # the standard ops before the custom one run in float16
    for node in result.graph.gs.nodes:
        if node.domain == DOMAIN:  # and every custom node reads float32, as before
            for t in node.inputs:
                dtype = converted.get(t.name) or t.dtype or inferred.get(t.name, (None, np.float32))[1]
                assert np.dtype(dtype) in (np.float32, np.int64), (node.name, t.name, dtype)


def test_sparsify_sparsifies_the_standard_layers_only():
    result = run("sparsify")
    tensors = result.graph.gs.tensors()
    assert np.mean(tensors["w1"].values == 0) == pytest.approx(0.5, abs=0.01)
    cb = next(t for t in custom_model().graph.initializer if t.name == "cb")
    np.testing.assert_array_equal(tensors["cb"].values, numpy_helper.to_array(cb))

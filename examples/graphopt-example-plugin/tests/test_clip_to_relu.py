"""Tests for the example plugin; run them with the package installed: ``pytest tests``."""

import graphopt_example_plugin
import numpy as np
import onnx
from graphopt_example_plugin import ClipToRelu
from graphopt_example_plugin.clip_to_relu import ClipToReluOptions
from onnx import TensorProto, helper

import graphopt
from graphopt import OnnxGraph
from graphopt.plugins import load_registry


def clip_model(max_value=None, opset=17, dtype=TensorProto.FLOAT):
    """y = Clip(x, 0[, max]); min comes from a Constant node, max from an initializer."""
    inputs = ["x", "lo"] + (["hi"] if max_value is not None else [])
    nodes = [
        helper.make_node("Constant", [], ["lo"], value=helper.make_tensor("lo_v", dtype, [], [0])),
        helper.make_node("Clip", inputs, ["y"], name="clip"),
    ]
    inits = [helper.make_tensor("hi", dtype, [], [max_value])] if max_value is not None else []
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, [2, 3])],
                              [helper.make_tensor_value_info("y", dtype, [2, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def test_replaces_clip_and_keeps_outputs():
    graph = OnnxGraph.from_model(clip_model())
    x = {"x": np.array([[-1, 0, 2], [-np.inf, np.nan, 0.5]], np.float32)}
    before = graph.run(x)
    result = ClipToRelu()(graph.copy())
    assert result.modified and result.stats == {"replaced Clip": 1}
    assert result.graph.op_counts() == {"Relu": 1}  # the Constant feeding min is gone too
    result.graph.verify()
    np.testing.assert_array_equal(result.graph.run(x)[0], before[0])
    again = ClipToRelu()(result.graph)  # honest `modified`: nothing left to do the second time
    assert not again.modified and again.stats == {}


def test_upper_bounds():
    x = {"x": np.array([[np.inf, -np.inf, np.nan], [-0.0, 1, -1]], np.float32)}
    exact = OnnxGraph.from_model(clip_model(max_value=np.inf))  # Clip(x, 0, +inf) is Relu on every input
    result = ClipToRelu(ClipToReluOptions(strict=True))(exact.copy())
    assert result.modified
    np.testing.assert_array_equal(result.graph.run(x)[0], exact.run(x)[0])
    assert not ClipToRelu(ClipToReluOptions(strict=True))(OnnxGraph.from_model(clip_model())).modified
    assert not ClipToRelu()(OnnxGraph.from_model(clip_model(max_value=6.0))).modified  # that is Relu6


def test_integer_tensors_need_opset_14():
    x = {"x": np.array([[-3, 0, 2], [7, -1, 1]], np.int32)}
    graph = OnnxGraph.from_model(clip_model(dtype=TensorProto.INT32))
    result = ClipToRelu()(graph.copy())
    assert result.stats == {"replaced Clip": 1}
    np.testing.assert_array_equal(result.graph.run(x)[0], graph.run(x)[0])
    old = ClipToRelu()(OnnxGraph.from_model(clip_model(opset=13, dtype=TensorProto.INT32)))
    assert not old.modified and old.notes == ["left 1 Clip(min=0) on types Relu does not take at opset 13"]


def test_registered_through_the_hooks():
    registry = load_registry(autoload=False, modules=[graphopt_example_plugin])
    assert registry.passes["clip-to-relu"] is ClipToRelu
    assert registry.pipelines["example-clean"].text == "fold,clip-to-relu"
    result = graphopt.optimize(clip_model(), "example-clean", registry=registry)
    assert "Clip" not in result.graph.op_counts()
    onnx.checker.check_model(result.model)

"""What the quantization passes need of a model, and what they do without it: float32 compute (a float16 model
is refused in one line that says what to do), and an opset (``min_opset``; a model with nothing to quantize
comes back unchanged whatever its opset)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.calib.state import RANGES
from graphopt.errors import PassError, UnsupportedError
from graphopt.ir import OnnxGraph
from graphopt.passes.base import PassContext

RNG = np.random.default_rng(1)


def conv_matmul(dtype=np.float32, opset=17) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("MatMul", ["f", "wm"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", elem, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", elem, [1, 5])],
        [numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(dtype), "w"),
         numpy_helper.from_array(RNG.standard_normal((64, 5)).astype(dtype), "wm")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("check", [False, True])
def test_int8_refuses_a_float16_model_in_one_line(check):
    with pytest.raises(UnsupportedError) as info:
        graphopt.optimize(conv_matmul(np.float16), "int8", check=check)
    message = str(info.value)
    assert info.value.exit_code == 4 and "\n" not in message
    assert message.startswith("pass 'place-qdq': the model computes in float16") and "quantize the float32 model" \
        in message


def test_int8_refuses_float16_made_inside_a_float32_model():
    """Float16 that only a Cast makes (every initializer and input float32) is found too: place-qdq skips shape
    inference only when nothing in the graph can make float16."""
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["w"], ["w16"], to=TensorProto.FLOAT16),
             helper.make_node("Conv", ["x16", "w16"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
                              [numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedError, match="^pass 'place-qdq': the model computes in float16"):
        graphopt.optimize(model, "int8", check=False)


def test_int8_dynamic_refuses_a_float16_matmul_in_one_line():
    with pytest.raises(UnsupportedError) as info:
        graphopt.optimize(conv_matmul(np.float16), "int8-dynamic", check=False)
    message = str(info.value)
    assert info.value.exit_code == 4 and "\n" not in message
    assert "computes in float16 (weight 'wm')" in message and "quantize the float32 model" in message


def test_the_float32_model_still_quantizes_after_the_refusal():
    result = graphopt.optimize(conv_matmul(), "int8", check=False)
    assert result.graph.op_counts()["QuantizeLinear"] >= 2


def test_min_opset_is_declared(registry):
    assert registry.passes["int8-dynamic"].min_opset == 11
    assert registry.passes["place-qdq"].min_opset == 13


def nothing_to_quantize(opset: int) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_int8_dynamic_on_an_old_model_with_nothing_to_quantize_returns_it_unchanged(registry):
    graph = OnnxGraph.from_model(nothing_to_quantize(9))
    before = graph.to_model().SerializeToString()
    result = registry.passes["int8-dynamic"]()(graph, PassContext(backend=_backend(registry)))
    assert not result.modified and result.graph.to_model().SerializeToString() == before
    assert any("nothing to do" in note for note in result.notes)


def test_int8_dynamic_called_on_an_old_model_with_a_matmul_refuses_readably(registry):
    graph = OnnxGraph.from_model(conv_matmul(opset=10))
    with pytest.raises(PassError, match=r"^pass 'int8-dynamic': DynamicQuantizeLinear needs opset 11\+, the model "
                                        r"has 10 \(convert it"):
        registry.passes["int8-dynamic"]()(graph, PassContext(backend=_backend(registry)))


def test_place_qdq_on_an_old_model_with_nothing_to_quantize_returns_it_unchanged(registry):
    graph = OnnxGraph.from_model(nothing_to_quantize(12))
    ctx = PassContext(backend=_backend(registry), state={RANGES: {"x": (-1.0, 1.0), "r": (0.0, 1.0)}})
    result = registry.passes["place-qdq"]()(graph, ctx)
    assert not result.modified and "QuantizeLinear" not in result.graph.op_counts()
    assert any("nothing to quantize" in note for note in result.notes)


def test_place_qdq_called_on_an_old_model_with_a_conv_refuses_readably(registry):
    graph = OnnxGraph.from_model(conv_matmul(opset=12))
    ranges = {name: (-1.0, 1.0) for name in ("x", "c", "r", "f", "y")}
    ctx = PassContext(backend=_backend(registry), state={RANGES: ranges})
    with pytest.raises(PassError, match=r"^pass 'place-qdq': the onnxruntime scheme needs opset 13\+, the model "
                                        r"has 12"):
        registry.passes["place-qdq"]()(graph, ctx)


def _backend(registry):
    from graphopt.backends import get_backend

    return get_backend(registry, "onnxruntime")

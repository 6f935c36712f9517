"""fold-constants on shape computations: ``Shape(x, start, end)`` and ``Gather`` / ``Slice`` of a shape fold to
what onnxruntime computes for them, or stay; integer shape arithmetic through float Casts is never rewritten.

Each model is built in code; the reference is onnxruntime running the original model (never a value written
here). The pass runs without the numeric check (as ``--no-check`` does), so a wrong fold would be written.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graphopt.ir import OnnxGraph

X_DIMS = [2, "N", 4, 5, 6]  # one dynamic dimension: some slices of the shape are static, some are not
X_VALUE_SHAPE = (2, 3, 4, 5, 6)  # what is fed for N


def shape_model(start=None, end=None, tail=None, opset=17):
    """``y = Add(tail(Shape(x, start, end)), k)``: k, a graph input, keeps the Add (and the graph output) at run
    time, so the shape computation before it can fold. ``tail``: None, ("gather", indices) or ("slice", starts,
    ends, steps)."""
    attrs = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    nodes = [helper.make_node("Shape", ["x"], ["s"], **attrs)]
    inits, v = [], "s"
    if tail and tail[0] == "gather":
        inits.append(onnx.numpy_helper.from_array(np.asarray(tail[1], np.int64), "idx"))
        nodes.append(helper.make_node("Gather", ["s", "idx"], ["v"], axis=0))
        v = "v"
    elif tail and tail[0] == "slice":
        _, starts, ends, steps = tail
        names = []
        for name, values in (("starts", starts), ("ends", ends), ("axes", [0]), ("steps", steps)):
            inits.append(onnx.numpy_helper.from_array(np.asarray(values, np.int64), name))
            names.append(name)
        nodes.append(helper.make_node("Slice", ["s", *names], ["v"]))
        v = "v"
    nodes.append(helper.make_node("Add", [v, "k"], ["y"]))
    rank = max(1, np.ndim(tail[1])) if tail and tail[0] == "gather" else 1
    graph = helper.make_graph(nodes, "shapes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, X_DIMS),
                                                helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, ["M"] * rank)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def run_onnxruntime(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def fold(registry, model):
    cls = registry.passes["fold-constants"]
    result = cls()(OnnxGraph.from_model(model))
    again = cls()(result.graph.copy())
    assert not again.modified, f"a second run still changed the graph: {again.stats}"
    return result


FEEDS = {"x": np.zeros(X_VALUE_SHAPE, np.float32), "k": np.array([100], np.int64)}
BOUNDS = [None, 0, 1, 2, -1, -2, -5, -7, 5, 9]


def check_against_onnxruntime(registry, model):
    """The folded model computes what onnxruntime computes on the original; returns the pass result and the
    expected output (None when onnxruntime itself rejects the original at run time)."""
    try:
        expected = run_onnxruntime(model, FEEDS)
    except Exception:  # noqa: BLE001 - an index out of range: an error at run time, which must stay one
        expected = None
    result = fold(registry, model)
    folded = result.graph.to_model()
    onnx.checker.check_model(folded, full_check=True)
    if expected is None:
        with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own error types
            run_onnxruntime(folded, FEEDS)
    else:
        np.testing.assert_array_equal(run_onnxruntime(folded, FEEDS), expected)
    return result, expected


@pytest.mark.parametrize("start,end", list(itertools.product(BOUNDS, BOUNDS)))
def test_shape_start_end_fold_to_what_onnxruntime_computes(registry, start, end):
    result, expected = check_against_onnxruntime(registry, shape_model(start, end))
    kept = X_DIMS[slice(start, end)]
    if all(isinstance(d, int) for d in kept):  # the slice misses the dynamic dim: it must fold
        assert "Shape" not in result.graph.op_counts()
        np.testing.assert_array_equal(expected, np.array(kept, np.int64) + 100)
    else:
        assert result.graph.op_counts()["Shape"] == 1


@pytest.mark.parametrize("start,end", [(None, None), (1, None), (-3, None), (2, -1), (-9, 3), (0, 9)])
@pytest.mark.parametrize("indices", [0, 1, -1, -2, [0, -1], [[2], [-3]], 3, -4, 7, -8])
def test_gather_of_a_sliced_shape(registry, start, end, indices):
    result, expected = check_against_onnxruntime(registry, shape_model(start, end, ("gather", indices)))
    kept = X_DIMS[slice(start, end)]
    picked = np.asarray(indices).reshape(-1)
    in_range = all(-len(kept) <= i < len(kept) for i in picked)
    assert (expected is not None) == in_range  # onnxruntime refuses only an index out of range
    if in_range and all(isinstance(kept[i], int) for i in picked):
        assert {"Shape", "Gather"}.isdisjoint(result.graph.op_counts())
    else:
        assert result.graph.op_counts()["Gather"] == 1


@pytest.mark.parametrize("start,end", [(None, None), (1, None), (-4, -1), (2, None)])
@pytest.mark.parametrize("starts,ends,steps", [
    ([0], [1], [1]), ([1], [9], [1]), ([-2], [100], [1]), ([-100], [2], [1]), ([2], [0], [-1]),
    ([-1], [-100], [-1]), ([0], [5], [2]), ([3], [1], [1]), ([1], [2], [1]),
])
def test_slice_of_a_sliced_shape(registry, start, end, starts, ends, steps):
    result, expected = check_against_onnxruntime(registry, shape_model(start, end, ("slice", starts, ends, steps)))
    kept = X_DIMS[slice(start, end)][slice(starts[0], ends[0], steps[0])]
    if all(isinstance(d, int) for d in kept):
        assert {"Shape", "Slice"}.isdisjoint(result.graph.op_counts())


def test_the_reported_case_is_not_the_whole_shape(registry):
    """Shape(x, start=1) of a (2, 3, 4, 5) tensor is [3, 4, 5], not onnx-graphsurgeon's [2, 3, 4, 5]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"], start=1), helper.make_node("Add", ["s", "k"], ["y"])], "g",
        [x, helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [3])]), opset_imports=[helper.make_opsetid("", 17)])
    result = fold(registry, model)
    (add,) = result.graph.gs.nodes
    np.testing.assert_array_equal(add.inputs[0].values, [3, 4, 5])


def test_slice_of_shape_in_opset_9_attribute_form(registry):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"]),
         helper.make_node("Slice", ["s"], ["v"], starts=[-2], ends=[100], axes=[0]),
         helper.make_node("Add", ["v", "k"], ["y"])], "g",
        [x, helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [2])]), opset_imports=[helper.make_opsetid("", 9)])
    result = fold(registry, model)
    assert result.graph.op_counts() == {"Add": 1}
    feeds = {"x": np.zeros((7, 3, 4), np.float32), "k": np.array([1], np.int64)}
    np.testing.assert_array_equal(run_onnxruntime(result.graph.to_model(), feeds), run_onnxruntime(model, feeds))


def test_integer_shape_arithmetic_through_float_is_not_rewritten(registry):
    """Cast(shape -> float) -> Mul(0.5) -> Cast(int64): onnx-graphsurgeon's "shape cast elision" turns it into
    an integer Mul by int64(0.5) = 0; the pass must keep computing half the shape."""
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 8, 8] x) => (int64[4] y) <float half = {0.5}> {
            s = Shape(x)
            sf = Cast<to = 1>(s)
            h = Mul(sf, half)
            y = Cast<to = 7>(h)
        }""")
    result = fold(registry, model)
    feeds = {"x": np.zeros((4, 3, 8, 8), np.float32)}
    folded = run_onnxruntime(result.graph.to_model(), feeds)
    np.testing.assert_array_equal(folded, run_onnxruntime(model, feeds))
    np.testing.assert_array_equal(folded, [2, 1, 4, 4])

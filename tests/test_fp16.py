"""to-fp16: a zoo ResNet converted (size, accuracy, I/O types, block lists, no redundant Casts), the overflow
check on a graph whose intermediate leaves float16's range, the registry and the pipeline end to end.

onnxruntime's CPU provider has few float16 kernels and computes most float16 ops in float32 behind Casts of its
own, so an overflow inside the graph does not show on it: the overflow tests run the converted model with
onnx's ReferenceEvaluator, which computes in the declared types (numpy float16)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphopt_plugins.to_fp16 import DEFAULT_OP_BLOCK_LIST, FP16_MAX, ToFloat16
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

import graphopt
from graphopt import PassContext, zoo
from graphopt.ir import OnnxGraph
from graphopt.passes.instruments import relative_error
from graphopt.passes.pipeline import resolve

F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT


# -- helpers ----------------------------------------------------------------------------------------------------
def convert(graph: OnnxGraph, ctx: PassContext | None = None, **options):
    return ToFloat16(ToFloat16.Options(**options))(graph.copy(), ctx or PassContext())


def io_types(graph: OnnxGraph) -> tuple[list[int], list[int]]:
    model = graph.to_model()
    return ([v.type.tensor_type.elem_type for v in model.graph.input],
            [v.type.tensor_type.elem_type for v in model.graph.output])


def weight_bytes(graph: OnnxGraph) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in graph.to_model().graph.initializer)


def cast_pairs(graph: OnnxGraph) -> list[str]:
    """Cast nodes that undo the Cast before them (x -> Cast -> Cast back to x's type)."""
    found = []
    for node in graph.gs.nodes:
        src = node.inputs[0] if node.op == "Cast" else None
        prev = src.inputs[0] if src is not None and len(src.inputs) == 1 else None
        if prev is not None and prev.op == "Cast" and prev.inputs[0].dtype == node.outputs[0].dtype:
            found.append(node.name)
    return found


def nodes_of(graph: OnnxGraph, op: str):
    return [n for n in graph.gs.nodes if n.op == op]


def check_valid(graph: OnnxGraph) -> None:
    onnx.checker.check_model(graph.to_model(), full_check=True)


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    """resnet18_like (dynamic batch, 64x64 input) after the `fold` pipeline: (OnnxGraph, path of the file)."""
    path = str(tmp_path_factory.mktemp("fp16") / "resnet18_like.onnx")
    zoo.export_onnx(zoo.resnet18_like(), path, (1, 3, 64, 64), dynamic_batch=True)
    return graphopt.optimize(path, "fold").graph, path


@pytest.fixture(scope="module")
def tiny(zoo_onnx):
    return graphopt.optimize(zoo_onnx("tiny_resnet"), "fold").graph


# -- the zoo model ------------------------------------------------------------------------------------------------
def test_default_block_list_covers_onnxruntimes():
    from onnxruntime.transformers import float16

    assert set(float16.DEFAULT_OP_BLOCK_LIST) <= set(DEFAULT_OP_BLOCK_LIST)
    assert "ReduceL2" in DEFAULT_OP_BLOCK_LIST and "Conv" not in DEFAULT_OP_BLOCK_LIST


def test_resnet18_halves_size_and_keeps_accuracy(resnet18):
    graph, _ = resnet18
    result = convert(graph)
    out = result.graph
    assert result.modified
    n_weights = len(graph.to_model().graph.initializer)
    assert result.stats["converted initializers"] == n_weights  # every weight feeds a float16 op
    assert result.stats["converted nodes"] == graph.num_nodes() and "kept nodes in fp32" not in result.stats
    assert result.stats["inserted Casts"] == 2  # one at the input, one at the output
    assert weight_bytes(out) < 0.55 * weight_bytes(graph)
    assert any(n.startswith("initializers ") and "(0.50x)" in n for n in result.notes), result.notes
    assert all(t.data_type == F16 for t in out.to_model().graph.initializer)
    check_valid(out)

    x = np.random.default_rng(1).standard_normal((32, 3, 64, 64)).astype(np.float32)
    ref, got = graph.run({"input": x})[0], out.run({"input": x})[0]
    assert got.dtype == np.float32
    err = relative_error([ref], [got])
    assert 0 < err < 1e-2  # float16 weights do change the outputs, by a few 1e-4
    agreement = float(np.mean(ref.argmax(1) == got.argmax(1)))
    assert agreement >= 0.9, agreement

    again = convert(out)
    assert not again.modified and again.stats == {} and "already holds" in again.notes[0]


def test_keep_io_types(tiny):
    kept = convert(tiny).graph
    assert io_types(kept) == ([F32], [F32])
    half = convert(tiny, keep_io_types=False).graph
    assert io_types(half) == ([F16], [F16])
    assert nodes_of(half, "Cast") == []  # float16 end to end: nothing to cast
    check_valid(half)
    x = tiny.sample_inputs()
    ref = tiny.run(x)
    got = half.run({"input": x["input"].astype(np.float16)})
    assert got[0].dtype == np.float16
    assert relative_error(ref, got) < 1e-2
    assert not convert(half, keep_io_types=False).modified


def test_op_block_list_keeps_gemm_in_float32(tiny):
    result = convert(tiny, op_block_list=("Gemm",))
    out = result.graph
    assert result.stats["kept nodes in fp32"] == 1
    assert any("1 Gemm" in n for n in result.notes), result.notes
    (gemm,) = nodes_of(out, "Gemm")
    assert all(t.dtype == np.float32 for t in [*gemm.inputs, *gemm.outputs])
    # a Cast from the float16 Flatten before it; it writes the float32 graph output itself (no Cast pair after)
    assert gemm.inputs[0].inputs[0].op == "Cast"
    assert gemm.outputs[0] is out.gs.outputs[0]
    assert cast_pairs(out) == []
    assert any("redundant Cast pairs" in n for n in result.notes)
    check_valid(out)
    x = tiny.sample_inputs()
    assert relative_error(tiny.run(x), out.run(x)) < 1e-2


def test_adjacent_blocked_ops_share_float32_without_casts(tiny):
    out = convert(tiny, op_block_list=("Flatten", "Gemm", "GlobalAveragePool")).graph
    (flatten,), (gemm,), (pool,) = nodes_of(out, "Flatten"), nodes_of(out, "Gemm"), nodes_of(out, "GlobalAveragePool")
    assert gemm.inputs[0].inputs[0] is flatten and flatten.inputs[0].inputs[0] is pool
    assert len(nodes_of(out, "Cast")) == 2 and cast_pairs(out) == []  # the input's, and the one into the pool
    check_valid(out)


def test_node_block_list_and_unknown_names(tiny):
    conv = nodes_of(tiny, "Conv")[0]
    ctx = PassContext()
    result = convert(tiny, ctx, node_block_list=(conv.name, "no-such-node"))
    (kept,) = [n for n in result.graph.gs.nodes if n.name == conv.name]
    assert kept.inputs[1].dtype == np.float32 and kept.outputs[0].dtype == np.float32
    assert result.stats["kept nodes in fp32"] == 1
    assert any("no-such-node" in w for w in ctx.warnings)
    check_valid(result.graph)


# -- overflow -----------------------------------------------------------------------------------------------------
def scaled_graph(up: float = 1e3) -> OnnxGraph:
    """y = ((x * up) * up) / up**2 + x: the middle tensor leaves float16's range for |x| > 65504 / up**2."""
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[4,8] x) => (float[4,8] y) {
          a = Mul(x, k1)
          b = Mul(a, k2)
          c = Mul(b, k3)
          y = Add(c, x)
        }""")
    model.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), k)
                                   for k, v in (("k1", up), ("k2", up), ("k3", 1 / up**2)))
    return OnnxGraph.from_model(model)


def reference_run(graph: OnnxGraph, feeds) -> np.ndarray:
    return ReferenceEvaluator(graph.to_model()).run(None, feeds)[0]


def test_overflowing_nodes_stay_in_float32():
    graph = scaled_graph()
    x = graph.sample_inputs()
    ref = graph.run(x)[0]
    assert np.abs(x["x"]).max() * 1e6 > FP16_MAX  # the sample data does overflow b

    result = convert(graph)
    out = result.graph
    kept = [n for n in out.gs.nodes if n.op == "Mul" and n.outputs[0].dtype == np.float32]
    assert len(kept) == 2 and result.stats["kept nodes in fp32"] == 2  # b's producer and its reader
    assert all(t.dtype == np.float32 for n in kept for t in [*n.inputs, *n.outputs])
    assert kept[0].outputs[0] is kept[1].inputs[0] and cast_pairs(out) == []
    assert any("exceeds float16's range" in n and "reaches" in n for n in result.notes), result.notes
    assert any("synthetic inputs" in n for n in result.notes)
    check_valid(out)
    got = reference_run(out, x)
    assert np.isfinite(got).all() and relative_error([ref], [got]) < 1e-2
    assert not convert(out).modified

    unchecked = convert(graph, check_overflow=False).graph  # the same conversion without the check overflows
    assert "kept nodes in fp32" not in convert(graph, check_overflow=False).stats
    with np.errstate(over="ignore"):
        assert not np.isfinite(reference_run(unchecked, x)).all()


class Batches:
    def __init__(self, *arrays):
        self.arrays = arrays

    def batches(self):
        for a in self.arrays:
            yield {"x": a}


def test_overflow_check_reads_the_calibration_data():
    graph = scaled_graph(up=100.0)  # synthetic N(0, 1) data peaks near 3e4: in range
    assert "kept nodes in fp32" not in convert(graph).stats
    rng = np.random.default_rng(0)
    big = (rng.standard_normal((4, 8)) * 50).astype(np.float32)  # b peaks near 1e6
    ctx = PassContext(calibration=Batches(rng.standard_normal((4, 8)).astype(np.float32), big))
    result = convert(graph, ctx)
    assert result.stats["kept nodes in fp32"] == 2
    assert any("on 2 batches of the calibration data" in n for n in result.notes), result.notes
    ref = graph.run({"x": big})[0]
    with np.errstate(over="ignore"):
        got = reference_run(result.graph, {"x": big})
    assert np.isfinite(got).all() and relative_error([ref], [got]) < 1e-2


# -- registry and pipelines -----------------------------------------------------------------------------------------
def test_registry_parses_options_and_alias(registry):
    assert registry.passes["to-fp16"] is ToFloat16
    assert registry.pipelines["fp16"].text == "to-fp16"
    text = "to-fp16:keep_io_types=false:op_block_list=Softmax+Gemm"
    (p,) = resolve(text, registry)
    assert isinstance(p, ToFloat16) and repr(p) == text
    assert p.options == ToFloat16.Options(keep_io_types=False, op_block_list=("Softmax", "Gemm"))
    (alias,) = resolve("fp16", registry)
    assert alias.options == ToFloat16.Options()


def test_optimize_fold_fp16_end_to_end(resnet18, registry, tmp_path):
    _, path = resnet18
    result = graphopt.optimize(path, "fold,fp16", registry=registry, verify_each=True)
    record = result.report.records[-1]
    assert record.name == "to-fp16" and record.modified and record.checks["verified"]
    assert 0 < record.checks["max_rel_err"] < 1e-2  # measured, not enforced
    assert record.changes.startswith("converted ")
    out = tmp_path / "out.onnx"
    result.save(str(out))
    onnx.checker.check_model(str(out), full_check=True)
    again = graphopt.optimize(str(out), "fp16", registry=registry)
    assert not again.report.modified


def test_optimize_float16_io_through_numeric_check(zoo_onnx, registry):
    """The numeric check feeds each graph its own input types, so fp16 I/O is measured like the rest."""
    result = graphopt.optimize(zoo_onnx("tiny_resnet"), "fold,to-fp16:keep_io_types=false", registry=registry)
    assert io_types(result.graph) == ([F16], [F16])
    assert result.report.records[-1].checks["max_rel_err"] < 1e-2


def test_optimize_float16_io_without_check(zoo_onnx, registry):
    result = graphopt.optimize(zoo_onnx("tiny_resnet"), "fold,to-fp16:keep_io_types=false", registry=registry,
                               check=False)
    assert io_types(result.graph) == ([F16], [F16])


def test_everything_blocked_is_no_change(tiny):
    ops = tuple(sorted(set(tiny.op_counts())))
    result = convert(tiny, op_block_list=ops)
    assert not result.modified and result.stats == {} and "nothing converted" in result.notes[0]
    assert result.graph.op_counts() == tiny.op_counts()


def test_calibration_given_to_the_api_as_a_mapping(zoo_onnx):
    """optimize(calibration={name: array}) reaches the overflow check as it reaches calibrate."""
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    result = graphopt.optimize(zoo_onnx("tiny_resnet"), "fold,fp16", calibration={"input": x})
    record = result.report.records[-1]
    assert record.stats["converted nodes"] > 0
    assert any("the calibration data" in n for n in record.notes), record.notes


def test_a_constant_shared_by_a_float32_op_and_a_float16_op(tmp_path):
    """An attention mask's fill (scaled_dot_product_attention with a bool mask, as torch's dynamo exporter writes
    it): the scalar 0 is read by a Where kept float32 (its output holds -inf) and by a Where made float16. The
    float32 reader gets the float32 original back instead of a Cast of the float16 copy — that rewiring failed
    with "'list' object has no attribute 'outputs'" (graphsurgeon's input lists take no slice assignment)."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Where", ["mask", "zero", "ninf"], ["bias"], name="fill"),
             helper.make_node("Add", ["x", "bias"], ["scores"], name="add"),
             helper.make_node("Softmax", ["scores"], ["p"], name="softmax", axis=-1),
             helper.make_node("IsNaN", ["p"], ["nan"], name="isnan"),
             helper.make_node("Where", ["nan", "zero", "p"], ["y"], name="clean")]
    graph = helper.make_graph(nodes, "mask", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                                              helper.make_tensor_value_info("mask", TensorProto.BOOL, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                               numpy_helper.from_array(np.array(-np.inf, np.float32), "ninf")])
    path = str(tmp_path / "m.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32),
             "mask": np.array([[True, True, False, True], [True, False, True, True]])}
    result = graphopt.optimize(path, "fp16", calibration=feeds)
    check_valid(result.graph)
    assert relative_error(OnnxGraph.load(path).run(feeds)[0], result.graph.run(feeds)[0]) < 1e-2
    fill = next(n for n in result.graph.gs.nodes if n.name == "fill")
    assert fill.inputs[1].dtype == np.float32 and fill.inputs[1].name != "zero"  # the float32 original, restored

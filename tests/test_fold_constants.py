"""fold-constants: constant subgraphs become initializers / buffers; Q/DQ, random ops and dynamic shapes stay."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch
from torch import nn

import graphopt
from graphopt.errors import PipelineError
from graphopt.ir import OnnxGraph
from graphopt.ir.fx_graph import FxGraph
from graphopt.passes.pipeline import resolve
from tests.conftest import graph_from_text

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def run_pass(registry, graph, name="fold-constants", ulp_close=False, **options):
    """Run the pass on a copy; outputs must equal the original's (bit for bit, or with ``ulp_close`` within
    float32 rounding, where onnxruntime picks another kernel for a constant input), and a second run must
    change nothing."""
    cls = registry.passes[name]
    result = cls(cls.Options(**options))(graph.copy())
    result.graph.verify()
    feeds = graph.sample_inputs(seed=3)
    for before, after in zip(graph.run(feeds), result.graph.run(feeds), strict=True):
        if ulp_close:
            np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(before, after)
    again = cls(cls.Options(**options))(result.graph.copy())
    assert not again.modified, f"second run still changed the graph: {again.stats}"
    return result


def producer_ops(graph: OnnxGraph, tensor) -> list[str]:
    return [n.op for n in tensor.inputs]


def test_constant_feeding_reshape_becomes_initializer(registry):
    g = graph_from_text(HEADER + """
        g (float[2, 3, 4] x) => (float[6, 4] y) {
            shape = Constant<value = int64[2] {6, 4}>()
            y = Reshape(x, shape)
        }""")
    result = run_pass(registry, g)
    assert result.modified and result.stats == {"converted Constant": 1}
    (reshape,) = result.graph.gs.nodes
    assert isinstance(reshape.inputs[1], gs.Constant)
    np.testing.assert_array_equal(reshape.inputs[1].values, [6, 4])


def test_constant_arithmetic_folded(registry):
    g = graph_from_text(HEADER + """
        g (float[3] x) => (float[3] y) <float[3] w = {1.0, 2.0, 3.0}> {
            two = Constant<value = float {2.0}>()
            w2 = Mul(w, two)
            w3 = Sqrt(w2)
            y = Add(x, w3)
        }""")
    result = run_pass(registry, g)
    assert result.stats == {"converted Constant": 1, "folded nodes": 2}
    (add,) = result.graph.gs.nodes
    np.testing.assert_array_equal(add.inputs[1].values, np.sqrt(np.float32([2, 4, 6])))


FLATTEN = HEADER + """
    g (float[{batch}, 8, 2, 2] x) => (float[{batch}, 32] y) {{
        s = Shape(x)
        zero = Constant<value = int64 {{0}}>()
        n = Gather<axis = 0>(s, zero)
        axes = Constant<value = int64[1] {{0}}>()
        n1 = Unsqueeze(n, axes)
        minus1 = Constant<value = int64[1] {{-1}}>()
        shape = Concat<axis = 0>(n1, minus1)
        y = Reshape(x, shape)
    }}"""


def test_cast_like_of_a_constant_folds_on_the_like_type(registry):
    """The torch.onnx dynamo exporter's zero bias: Expand(CastLike(0, x), [C]) depends on x's type only."""
    g = graph_from_text(HEADER + """
        g (float[2, 3] x) => (float[2, 3] y) <int64 zero = {0}, int64[1] c = {3}> {
            z = CastLike(zero, x)
            b = Expand(z, c)
            y = Add(x, b)
        }""")
    result = run_pass(registry, g)
    assert result.stats == {"folded nodes": 2}
    (add,) = result.graph.gs.nodes
    bias = add.inputs[1]
    assert isinstance(bias, gs.Constant) and bias.values.dtype == np.float32 and bias.values.shape == (3,)


def test_shape_of_an_initializer_is_computed_without_running_it(registry):
    """The dynamo exporter's zero conv bias: Expand(CastLike(0, x), Shape(weight, start=0, end=1))."""
    g = graph_from_text('<ir_version: 8, opset_import: ["" : 17]>' + """
        g (float[1, 2, 4, 4] x) => (float[1, 3, 4, 4] y) <float[3, 2, 1, 1] w = {1., 2., 3., 4., 5., 6.},
                                                          int64 zero = {0}> {
            n = Shape<start = 0, end = 1>(w)
            z = CastLike(zero, x)
            b = Expand(z, n)
            y = Conv(x, w, b)
        }""")
    result = run_pass(registry, g, ulp_close=True)  # Conv with a constant bias runs another kernel
    assert result.stats == {"folded nodes": 3}
    (conv,) = result.graph.gs.nodes
    np.testing.assert_array_equal(conv.inputs[2].values, np.zeros(3, np.float32))


def test_static_flatten_shape_chain_folded(registry):
    result = run_pass(registry, graph_from_text(FLATTEN.format(batch=2)))
    assert result.graph.op_counts() == {"Reshape": 1}
    assert result.stats == {"converted Constant": 3, "folded nodes": 4}
    (reshape,) = result.graph.gs.nodes
    np.testing.assert_array_equal(reshape.inputs[1].values, [2, -1])
    # shapes inferred for folding are not left behind in the model
    assert not result.graph.to_model().graph.value_info


def test_dynamic_batch_shape_chain_not_folded(registry):
    result = run_pass(registry, graph_from_text(FLATTEN.format(batch="N")))
    counts = result.graph.op_counts()
    assert counts["Shape"] == 1 and counts["Gather"] == 1 and counts["Concat"] == 1
    assert "Constant" not in counts  # the Constant nodes still become initializers


def test_fold_shapes_false_leaves_shape_nodes(registry):
    result = run_pass(registry, graph_from_text(FLATTEN.format(batch=2)), fold_shapes=False)
    assert result.graph.op_counts()["Shape"] == 1 and result.stats == {"converted Constant": 3}


def test_qdq_on_constant_weight_not_folded(registry):
    g = graph_from_text(HEADER + """
        g (float[1, 4] x) => (float[1, 2] y)
          <float[4, 2] w = {0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8}, float scale = {0.01}, int8 zp = {0}> {
            wq = QuantizeLinear(w, scale, zp)
            wdq = DequantizeLinear(wq, scale, zp)
            y = MatMul(x, wdq)
        }""")
    result = run_pass(registry, g)
    assert not result.modified
    assert result.graph.op_counts() == {"QuantizeLinear": 1, "DequantizeLinear": 1, "MatMul": 1}


def test_random_ops_not_folded(registry):
    g = graph_from_text(HEADER + """
        g (float[2, 2] x) => (float[2, 2] y) {
            noise = RandomNormal<shape = [2, 2], dtype = 1>()
            y = Add(x, noise)
        }""")
    result = registry.passes["fold-constants"]()(g.copy())
    assert not result.modified and result.graph.op_counts() == {"RandomNormal": 1, "Add": 1}


def test_size_limit_keeps_big_tensors_computed(registry):
    text = HEADER + """
        g (float[512, 1024] x) => (float[512, 1024] y) <float one = {1.0}, int64[2] shape = {512, 1024}> {
            big = Expand(one, shape)
            y = Add(x, big)
        }"""
    small = run_pass(registry, graph_from_text(text), size_limit_mb=1.5)  # 2 MB of float32 > 1.5 MB
    assert not small.modified and small.graph.op_counts()["Expand"] == 1
    unlimited = run_pass(registry, graph_from_text(text))
    assert unlimited.stats == {"folded nodes": 1} and unlimited.graph.op_counts() == {"Add": 1}


def test_constant_graph_output_folded(registry):
    g = graph_from_text(HEADER + """
        g (float[2] x) => (float[2] y, float[2] z) <float[2] a = {1.0, 2.0}> {
            y = Relu(x)
            z = Add(a, a)
        }""")
    result = run_pass(registry, g)
    assert result.graph.op_counts() == {"Relu": 1}
    assert [t.name for t in result.graph.gs.outputs] == ["y", "z"]


def test_dead_nodes_counted_apart(registry):
    g = graph_from_text(HEADER + """
        g (float[2] x) => (float[2] y) <float[2] a = {1.0, 2.0}> {
            unused = Neg(x)
            b = Neg(a)
            y = Add(x, b)
        }""")
    result = run_pass(registry, g)
    assert result.stats == {"removed dead nodes": 1, "folded nodes": 1}


def test_subgraph_onnxruntime_cannot_run_is_left_and_the_rest_folded(registry, monkeypatch):
    """onnxruntime is made to refuse any model holding the BitShift (as it would an op it lacks): that chain
    stays, the float Mul still folds, a note says why, and the result still computes what the original did."""
    import onnx
    import onnxruntime

    real = onnxruntime.InferenceSession
    refused = []

    def refusing(model, *args, **kwargs):
        proto = onnx.load_from_string(model) if isinstance(model, bytes) else None
        if proto is not None and any(n.op_type == "BitShift" for n in proto.graph.node):
            refused.append(1)
            raise RuntimeError("refused by the test: no kernel for BitShift")
        return real(model, *args, **kwargs)

    g = graph_from_text(HEADER + """
        g (float[2] x) => (float[2] y) <uint8[2] a = {1, 2}, float[2] b = {1.0, 2.0}> {
            s = BitShift<direction = "LEFT">(a, a)
            f = Cast<to = 1>(s)
            m = Mul(b, b)
            t = Add(x, f)
            y = Add(t, m)
        }""")
    cls = registry.passes["fold-constants"]
    monkeypatch.setattr(onnxruntime, "InferenceSession", refusing)
    result = cls()(g.copy())
    again = cls()(result.graph.copy())
    monkeypatch.undo()
    assert refused, "the folding never asked onnxruntime for the BitShift subgraph"
    assert result.stats == {"folded nodes": 1}
    assert result.graph.op_counts() == {"BitShift": 1, "Cast": 1, "Add": 2}
    assert sum("could not evaluate" in note for note in result.notes) == 1
    assert not again.modified
    feeds = {"x": np.float32([0.5, -1.0])}
    np.testing.assert_array_equal(result.graph.run(feeds)[0], g.run(feeds)[0])
    np.testing.assert_array_equal(g.run(feeds)[0], np.float32([0.5 + 2 + 1, -1.0 + 8 + 4]))


def test_options_from_pipeline_text(registry):
    (p,) = resolve("fold-constants:fold_shapes=false:size_limit_mb=16", registry)
    assert p.options == registry.passes["fold-constants"].Options(fold_shapes=False, size_limit_mb=16.0)
    with pytest.raises(PipelineError, match="size_limit_mb"):
        resolve("fold-constants:size_limit_mb=-1", registry)


def test_mobilenet_constants_gone_and_outputs_match(registry, zoo_onnx):
    graph = OnnxGraph.load(zoo_onnx("mobilenet_v2_like"))
    assert graph.op_counts()["Constant"] > 0  # the exporter's Clip min/max
    current = graph
    for name in ("eliminate-identity", "fold-constants", "eliminate-dead"):
        current = registry.passes[name]()(current.copy()).graph
    current.verify()
    assert "Constant" not in current.op_counts()
    assert current.op_counts()["Clip"] == graph.op_counts()["Clip"]
    feeds = graph.sample_inputs(seed=0)
    for before, after in zip(graph.run(feeds), current.run(feeds), strict=True):
        np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
    again = registry.passes["fold-constants"]()(current.copy())
    assert not again.modified


# -- FX ----------------------------------------------------------------------------------------------------------
def fx_run_pass(registry, module, *example, name="fold-constants"):
    g = FxGraph.from_module(module, example)
    result = registry.passes[name]()(g.copy())
    result.graph.verify()
    with torch.no_grad():
        eager = module.eval()(*example)
        folded = result.graph.gm(*example)
    torch.testing.assert_close(folded, eager, rtol=0, atol=0)
    assert not registry.passes[name]()(result.graph.copy()).modified
    return g, result


def compute_targets(graph: FxGraph) -> list:
    return [n.target for n in graph.compute_nodes()]


class ScaledBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.w = nn.Parameter(torch.randn(3))
        self.b = nn.Parameter(torch.randn(3))

    def forward(self, x):
        scale = self.w * 2  # constant: depends only on parameters
        bias = torch.ones(3) + self.b.exp()  # torch.ones(3) is traced as a tensor constant (get_attr)
        return self.fc(x) * scale + bias


def test_fx_constant_subexpressions_folded(registry):
    import operator

    g, result = fx_run_pass(registry, ScaledBias(), torch.randn(2, 3))
    assert result.modified and result.stats == {"folded nodes": 3, "removed parameters/buffers": 3}
    assert compute_targets(result.graph) == ["fc", operator.mul, operator.add]
    buffers = dict(result.graph.gm.named_buffers())
    assert set(buffers) == {"_folded_mul", "_folded_add"}
    # parameters count every constant tensor the graph reads (ONNX's initializers): w and b are now folded buffers of
    # their size, and torch.ones(3), a tensor constant, is folded away
    assert result.graph.num_parameters() == g.num_parameters() - 3
    module = g.gm
    torch.testing.assert_close(buffers["_folded_mul"], module.w * 2, rtol=0, atol=0)


def test_fx_random_and_runtime_mutated_values_not_folded(registry):
    # built by hand: symbolic_trace would itself run torch.randn and count.add_ once, at trace time
    root = nn.Module()
    root.register_buffer("count", torch.zeros(1))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    noise = graph.call_function(torch.randn, (2,))
    count = graph.get_attr("count")
    graph.call_method("add_", (count, 1))  # a buffer written at run time is not a constant
    doubled = graph.call_function(torch.mul, (graph.get_attr("count"), 2))
    graph.output(graph.call_function(torch.add, (graph.call_function(torch.add, (x, noise)), doubled)))
    g = FxGraph(torch.fx.GraphModule(root, graph), (torch.zeros(2),), "fx")
    result = registry.passes["fold-constants"]()(g.copy())
    assert not result.modified
    assert compute_targets(result.graph) == compute_targets(g)
    torch.manual_seed(0)
    first = result.graph.gm(torch.zeros(2))
    second = result.graph.gm(torch.zeros(2))
    assert not torch.equal(first, second)  # fresh noise and a growing count on every call


def test_fx_constant_graph_output_stays_computed(registry):
    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return x + 1, self.w * 2  # returning a buffer would let a caller overwrite it

    g, result = fx_run_pass(registry, TwoOutputs(), torch.randn(4))
    assert not result.modified


def test_fx_non_tensor_constants_left_to_run_time(registry):
    class Sized(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return x.reshape(self.w.shape[0], -1) + self.w.sum()

    g, result = fx_run_pass(registry, Sized(), torch.randn(6, 2))
    assert result.stats == {"folded nodes": 1}  # sum folded; the int shape stays a run-time value


def test_fx_folded_value_also_returned(registry):
    class AlsoReturned(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):
            scale = self.w * 2
            return x * scale, scale

    g, result = fx_run_pass(registry, AlsoReturned(), torch.randn(4))
    assert result.modified and "_folded_mul" in dict(result.graph.gm.named_buffers())
    out = result.graph.gm(torch.randn(4))[1]
    assert out.data_ptr() != result.graph.gm._folded_mul.data_ptr()  # the output is not the buffer itself


def test_chained_castlikes_fold_in_one_run(registry):
    """The second CastLike's target type comes from shape inference: it must still be readable after the first
    CastLike was folded (found by tests/test_properties.py: fold was not idempotent)."""
    g = graph_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,4] x) => (float[1,4] y) <double d1 = {0.25}, double d2 = {0.5}> {
          c1 = CastLike(d1, x)
          a = Add(x, c1)
          c2 = CastLike(d2, a)
          y = Add(a, c2)
        }""")
    once = graphopt.optimize(g, "fold", check=False, registry=registry)
    assert once.graph.op_counts() == {"Add": 2}
    again = graphopt.optimize(once.graph, "fold", check=False, registry=registry)
    assert not again.report.modified


def test_folding_that_onnxruntime_would_refuse_to_load_is_given_up(registry, monkeypatch):
    """onnx's own affine_grid function body, in small: an If whose condition only folding makes constant hands a
    1-element tensor to Range. onnxruntime loads the original (its inference merges both branches), but, once
    the condition is constant, its optimizer inlines the branch and its inference rejects Range's input. The
    pass gives the folding up with a note instead of returning a model that no longer loads."""
    from graphopt_plugins import fold_constants

    g = graph_from_text(HEADER + """
        g (int64[4] size) => (int64[N] r) {
            n = Size(size)
            four = Constant<value = int64 {4}>()
            cond = Equal(n, four)
            w = If(cond) <then_branch = t () => (int64[1] a) { a = Constant<value = int64[1] {3}>() },
                          else_branch = e () => (int64[1] b) { b = Constant<value = int64[1] {5}>() }>
            zero = Constant<value = int64 {0}>()
            one = Constant<value = int64 {1}>()
            r = Range(zero, w, one)
        }""")
    g.session()  # the original loads, with onnxruntime's optimizations on
    cls = registry.passes["fold-constants"]
    result = cls()(g.copy())
    assert not result.modified
    assert any("onnxruntime would no longer load the folded model" in note and "Range" in note
               for note in result.notes), result.notes
    result.graph.session()
    np.testing.assert_array_equal(result.graph.run({"size": np.int64([1, 1, 2, 3])})[0], np.arange(3))
    # the guard is what keeps it loadable: without it, the folded model does not load
    monkeypatch.setattr(fold_constants, "_load_refusal", lambda folded, original: "")
    folded = cls()(g.copy())
    assert folded.modified
    with pytest.raises(Exception, match="Range"):
        folded.graph.session()

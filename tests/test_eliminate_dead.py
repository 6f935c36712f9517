"""eliminate-dead: nodes and weights no output needs are removed; graph inputs and in-place ops stay."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from graphopt.ir import OnnxGraph
from graphopt.ir.fx_graph import FxGraph
from tests.conftest import graph_from_text

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def run_pass(registry, graph, name="eliminate-dead"):
    """Run the pass on a copy; outputs must equal the original's, and a second run must change nothing."""
    result = registry.passes[name]()(graph.copy())
    result.graph.verify()
    feeds = graph.sample_inputs(seed=2)
    for before, after in zip(graph.run(feeds), result.graph.run(feeds), strict=True):
        np.testing.assert_array_equal(before, after)
    again = registry.passes[name]()(result.graph.copy())
    assert not again.modified, f"second run still changed the graph: {again.stats}"
    return result


def initializer_names(graph: OnnxGraph) -> set[str]:
    return {t.name for t in graph.to_model().graph.initializer}


def test_dead_branch_removed_graph_inputs_kept(registry):
    g = graph_from_text(HEADER + """
        g (float[2, 3] x, float[2, 3] side, float[2, 3] unused) => (float[2, 3] y)
          <float[3] w = {1.0, 2.0, 3.0}, float[3] dead_w = {4.0, 5.0, 6.0}> {
            y = Add(x, w)
            d1 = Mul(side, dead_w)
            d2 = Relu(d1)
            c = Constant<value = float {2.0}>()
        }""")
    result = run_pass(registry, g)
    assert result.modified and result.stats == {"removed nodes": 3, "removed initializers": 1}
    assert result.graph.op_counts() == {"Add": 1}
    assert [t.name for t in result.graph.gs.inputs] == ["x", "side", "unused"]
    assert initializer_names(result.graph) == {"w"}


def test_never_read_initializer_is_gone(registry):
    # onnx-graphsurgeon does not import an initializer no node reads: it is gone (and cannot be counted)
    g = graph_from_text(HEADER + """
        g (float[2] x) => (float[2] y) <float[2] w = {1.0, 2.0}, float[5] orphan = {1.0, 2.0, 3.0, 4.0, 5.0}> {
            y = Add(x, w)
        }""")
    result = run_pass(registry, g)
    assert not result.modified and initializer_names(result.graph) == {"w"}


def test_nothing_dead_is_unmodified(registry):
    g = graph_from_text(HEADER + """
        g (float[4] x) => (float[4] y, float[4] x_again) {
            y = Relu(x)
            x_again = Identity(x)
        }""")
    result = run_pass(registry, g)
    assert not result.modified and result.stats == {}
    assert result.graph.op_counts() == {"Relu": 1, "Identity": 1}


def test_unused_optional_output_of_live_node_left_alone(registry):
    g = graph_from_text(HEADER + """
        g (float[2, 8] x) => (float[2, 8] y) {
            y, mask = Dropout(x)
        }""")
    result = run_pass(registry, g)
    assert not result.modified and len(result.graph.gs.nodes[0].outputs) == 2


def test_dead_nodes_inside_if_branches_removed(registry):
    def branch(name, value):
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [2])
        const = helper.make_node("Constant", [], [f"{name}_c"],
                                 value=helper.make_tensor(f"{name}_v", TensorProto.FLOAT, [2], [value, value]))
        add = helper.make_node("Add", ["x", f"{name}_c"], [f"{name}_out"])
        dead = helper.make_node("Neg", ["x"], [f"{name}_dead"])
        return helper.make_graph([const, add, dead], name, [], [out])

    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", 1.0), else_branch=branch("els", 2.0))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    result = run_pass(registry, OnnxGraph.from_model(model))
    assert result.stats == {"removed nodes": 2}
    (if_node,) = result.graph.gs.nodes
    assert [n.op for n in if_node.attrs["then_branch"].nodes] == ["Constant", "Add"]


# -- FX ----------------------------------------------------------------------------------------------------------
def fx_run_pass(registry, module, example):
    g = FxGraph.from_module(module, (example,))
    result = registry.passes["eliminate-dead"]()(g.copy())
    result.graph.verify()
    with torch.no_grad():
        eager = module.eval()(example.clone())
        after = result.graph.gm(example.clone())
    torch.testing.assert_close(after, eager, rtol=0, atol=0)
    assert not registry.passes["eliminate-dead"]()(result.graph.copy()).modified
    return g, result


class WithDeadCode(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.unused_head = nn.Linear(4, 10)
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        _ = self.unused_head(x)  # computed, never used
        _ = self.w * 3
        _ = x.sum() + 1
        return self.fc(x)


def test_fx_dead_code_and_its_weights_removed(registry):
    g, result = fx_run_pass(registry, WithDeadCode(), torch.randn(2, 4))
    assert result.stats == {"removed nodes": 5, "removed parameters/buffers": 1, "removed modules": 1}
    assert result.graph.op_counts() == {"Linear": 1}
    assert result.graph.input_names() == ["x"]
    assert result.graph.num_parameters() == g.num_parameters() - (4 * 10 + 10) - 4


def test_fx_unused_input_kept(registry):
    class IgnoresSecond(nn.Module):
        def forward(self, x, y):
            return x * 2

    g = FxGraph.from_module(IgnoresSecond(), (torch.randn(2), torch.randn(2)))
    result = registry.passes["eliminate-dead"]()(g.copy())
    assert not result.modified and result.graph.input_names() == ["x", "y"]


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = x * 1
        self.act(h)  # result unused, but h itself is overwritten
        h.add_(1)  # likewise
        torch.nn.functional.relu(h, True)
        return h


def test_fx_in_place_ops_with_unused_results_kept(registry):
    example = torch.randn(8)
    g, result = fx_run_pass(registry, InPlace(), example)
    assert not result.modified
    assert result.graph.op_counts() == g.op_counts()

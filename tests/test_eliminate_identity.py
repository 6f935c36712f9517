"""eliminate-identity: Identity and inference Dropout removed, graph output names kept, used masks kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from graphopt.ir.fx_graph import FxGraph
from tests.conftest import graph_from_text

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def run_pass(registry, graph, name="eliminate-identity", **options):
    """Run the pass on a copy; check outputs equal bit for bit and a second run changes nothing."""
    cls = registry.passes[name]
    result = cls(cls.Options(**options))(graph.copy())
    result.graph.verify()
    feeds = graph.sample_inputs(seed=1)
    for before, after in zip(graph.run(feeds), result.graph.run(feeds), strict=True):
        np.testing.assert_array_equal(before, after)
    again = cls(cls.Options(**options))(result.graph.copy())
    assert not again.modified, f"second run still changed the graph: {again.stats}"
    return result


def test_identity_chain_removed(registry):
    g = graph_from_text(HEADER + """
        g (float[2, 3] x) => (float[2, 3] y) {
            a = Relu(x)
            b = Identity(a)
            c = Identity(b)
            y = Relu(c)
        }""")
    result = run_pass(registry, g)
    assert result.modified and result.stats == {"removed Identity": 2}
    assert result.graph.op_counts() == {"Relu": 2}
    relu2 = result.graph.gs.nodes[1]
    assert relu2.inputs[0] is result.graph.gs.nodes[0].outputs[0]


def test_identity_feeding_graph_output_keeps_output_name(registry):
    g = graph_from_text(HEADER + """
        g (float[4] x) => (float[4] y, float[4] z) {
            a = Relu(x)
            y = Identity(a)
            z = Neg(a)
        }""")
    result = run_pass(registry, g)
    assert result.stats == {"removed Identity": 1}
    gs_graph = result.graph.gs
    assert [t.name for t in gs_graph.outputs] == ["y", "z"]
    relu = next(n for n in gs_graph.nodes if n.op == "Relu")
    neg = next(n for n in gs_graph.nodes if n.op == "Neg")
    assert relu.outputs[0].name == "y" and neg.inputs[0].name == "y"


def test_graph_input_to_graph_output_identity_is_kept(registry):
    g = graph_from_text(HEADER + """
        g (float[4] x) => (float[4] y) {
            y = Identity(x)
        }""")
    result = run_pass(registry, g)
    assert not result.modified and result.stats == {}
    assert result.graph.op_counts() == {"Identity": 1}
    assert any("graph output 'y'" in note for note in result.notes)


def test_identity_between_two_graph_outputs_is_kept(registry):
    g = graph_from_text(HEADER + """
        g (float[4] x) => (float[4] a, float[4] y) {
            a = Relu(x)
            y = Identity(a)
        }""")
    result = run_pass(registry, g)
    assert not result.modified and result.graph.op_counts() == {"Relu": 1, "Identity": 1}


def test_identity_of_initializer_removed(registry):
    g = graph_from_text(HEADER + """
        g (float[3] x) => (float[3] y) <float[3] w = {1.0, 2.0, 3.0}> {
            v = Identity(w)
            y = Add(x, v)
        }""")
    result = run_pass(registry, g)
    assert result.stats == {"removed Identity": 1}
    (add,) = result.graph.gs.nodes
    assert add.inputs[1].name == "w"


def test_dropout_with_unused_mask_removed(registry):
    g = graph_from_text(HEADER + """
        g (float[2, 8] x) => (float[2, 8] y) <float r = {0.5}> {
            a = Relu(x)
            d, mask = Dropout(a, r)
            y = Sigmoid(d)
        }""")
    result = run_pass(registry, g)
    assert result.stats == {"removed Dropout": 1}
    assert result.graph.op_counts() == {"Relu": 1, "Sigmoid": 1}


def test_dropout_with_constant_false_training_mode_removed(registry):
    g = graph_from_text(HEADER + """
        g (float[2, 8] x) => (float[2, 8] y) {
            r = Constant<value = float {0.3}>()
            t = Constant<value = bool {0}>()
            a = Relu(x)
            y = Dropout(a, r, t)
        }""")
    result = run_pass(registry, g)
    assert result.stats == {"removed Dropout": 1}
    assert result.graph.gs.outputs[0].name == "y" and "Dropout" not in result.graph.op_counts()


def test_dropout_with_used_mask_is_kept(registry):
    g = graph_from_text(HEADER + """
        g (float[2, 8] x) => (float[2, 8] y, bool[2, 8] m) {
            a = Relu(x)
            y, m = Dropout(a)
        }""")
    result = run_pass(registry, g)
    assert not result.modified and result.graph.op_counts()["Dropout"] == 1
    # one note per reason, counting the Dropouts and naming each with its mask
    assert result.notes == ["1 Dropout whose mask output is used (removing it would leave the mask undefined): "
                            "left as is ('y': mask 'm')"]


def test_dropout_in_training_mode_is_kept(registry):
    g = graph_from_text(HEADER + """
        g (float[2, 8] x, bool train) => (float[2, 8] y, float[2, 8] z) <float r = {0.5}, bool t = {1}> {
            a = Relu(x)
            y = Dropout(a, r, t)
            z = Dropout(a, r, train)
        }""")
    cls = registry.passes["eliminate-identity"]
    result = cls()(g.copy())  # training-mode Dropout is random: no numeric comparison
    assert not result.modified and result.graph.op_counts()["Dropout"] == 2
    assert any("training_mode is true" in n for n in result.notes)
    assert any("not a compile-time constant" in n for n in result.notes)


# -- FX ----------------------------------------------------------------------------------------------------------
class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.skip = nn.Identity()
        self.drop = nn.Dropout(0.5)
        self.drop2d = nn.Dropout2d(0.1)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        h = self.drop(self.skip(self.fc1(x)))
        h = nn.functional.dropout(h, 0.2, self.training)
        return self.fc2(self.drop2d(h[:, :, None, None]).flatten(1))


def fx_run_pass(registry, module, example, name="eliminate-identity"):
    g = FxGraph.from_module(module, (example,))
    result = registry.passes[name]()(g.copy())
    result.graph.verify()
    with torch.no_grad():
        eager = module.eval()(example)
    torch.testing.assert_close(result.graph.gm(example), eager, rtol=0, atol=0)
    assert not registry.passes[name]()(result.graph.copy()).modified
    return g, result


def test_fx_identity_and_eval_dropout_removed(registry):
    g, result = fx_run_pass(registry, Head(), torch.randn(3, 8))
    assert result.stats == {"removed Identity": 1, "removed Dropout": 3}  # nn.Dropout, F.dropout, nn.Dropout2d
    assert result.graph.op_counts() == {"Linear": 2, "getitem": 1, "flatten": 1}
    names = {name for name, _ in result.graph.gm.named_modules()}
    assert not names & {"skip", "drop", "drop2d"}
    assert result.graph.num_parameters() == g.num_parameters()


def test_fx_dropout_with_literal_training_true_is_kept(registry):
    class AlwaysDrop(nn.Module):
        def forward(self, x):
            return nn.functional.dropout(x, 0.5) + 1  # training defaults to True: random even in eval

    result = registry.passes["eliminate-identity"]()(FxGraph.from_module(AlwaysDrop(), (torch.randn(4),)))
    assert not result.modified and result.graph.op_counts()["dropout"] == 1


def test_fx_export_dropout_and_clone_removed(registry):
    class Exported(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.drop = nn.Dropout(0.3)

        def forward(self, x):
            return self.drop(self.fc(x)).clone() * 2

    module, example = Exported().eval(), torch.randn(2, 4)
    gm = torch.export.export(module, (example,)).module()
    g = FxGraph(gm, (example,), "torch.export")
    result = registry.passes["eliminate-identity"]()(g.copy())
    assert result.stats == {"removed Dropout": 1, "removed clone": 1}
    targets = {n.target for n in result.graph.gm.graph.nodes}
    assert torch.ops.aten.dropout.default not in targets and torch.ops.aten.clone.default not in targets
    torch.testing.assert_close(result.graph.gm(example), module(example), rtol=0, atol=0)
    assert not registry.passes["eliminate-identity"]()(result.graph.copy()).modified


def test_fx_clone_kept_when_graph_mutates(registry):
    class Guarded(nn.Module):
        def forward(self, x):
            y = x.clone()
            y.add_(1)  # the clone keeps x itself unchanged
            return x, y

    example = torch.randn(3)
    gm = torch.fx.symbolic_trace(Guarded())
    clone = next(n for n in gm.graph.nodes if n.target == "clone")
    with gm.graph.inserting_before(clone):  # the ATen clone torch.export would write
        aten_clone = gm.graph.call_function(torch.ops.aten.clone.default, clone.args)
    clone.replace_all_uses_with(aten_clone)
    gm.graph.erase_node(clone)
    gm.recompile()
    result = registry.passes["eliminate-identity"]()(FxGraph(gm, (example,), "fx"))
    assert not result.modified and any("in-place" in n for n in result.notes)
    x = example.clone()
    out_x, out_y = result.graph.gm(x)
    torch.testing.assert_close(out_x, example, rtol=0, atol=0)
    torch.testing.assert_close(out_y, example + 1, rtol=0, atol=0)


@pytest.mark.parametrize("alias", ["fold"])
def test_fold_alias_registered(registry, alias):
    assert registry.pipelines[alias].text == "eliminate-identity,fold-constants,fold-bn,eliminate-dead"

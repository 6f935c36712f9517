"""The rule layer (graphopt.passes.rules): match / skip / apply, counts, reasons, names on new nodes, repeat
sweeps, idempotence, and the structured reasons fold-bn and eliminate-identity now report.

The test rules are what a Q/DQ placement fix looks like to the layer: a pattern over two nodes (a Mul by a
constant whose one reader is another Mul by a constant), reasons for the near misses (the first Mul's output is
read elsewhere; the second factor is not a constant), and a rewrite that replaces both with one new node."""

from __future__ import annotations

import operator

import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch
from torch import nn

from graphopt.errors import PluginError
from graphopt.ir.fx_graph import FxGraph
from graphopt.ir.onnx_graph import fresh_name
from graphopt.passes.base import PassContext
from graphopt.passes.manager import PassManager
from graphopt.passes.rules import RULE_META, Rule, RulePass, Skip, apply_rules
from tests.conftest import graph_from_text

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
SHARED = "whose output is also read elsewhere"
NOT_CONSTANT = "before a Mul by a tensor that is not a constant"


class FuseMuls(Rule):
    """ONNX: Mul(x, a) -> Mul(., b), ``a`` and ``b`` constants, the first output read by the second Mul only:
    one new Mul(x, a * b). Rooted at the first Mul, so the new node is a place to match again (``repeat``)."""

    name, irs, stat, subject = "fuse-muls", frozenset({"onnx"}), "fused Mul pairs", "Mul"

    def match(self, graph, node):
        a = graph.constant_value(node.inputs[1]) if node.op == "Mul" else None
        y = node.outputs[0] if a is not None else None
        nxt = next((r for r in y.outputs if r.op == "Mul"), None) if y is not None else None
        if nxt is None:
            return None  # not a Mul by a constant read by a Mul: none of this rule's business
        label = f"'{node.name or y.name}'"
        if len(y.outputs) > 1 or y in graph.gs.outputs:
            return Skip(SHARED, label)
        other = nxt.inputs[1] if nxt.inputs[0] is y else nxt.inputs[0]
        b = graph.constant_value(other)
        if b is None:
            return Skip(NOT_CONSTANT, label)
        return node, nxt, (a * b).astype(a.dtype)

    def apply(self, graph, plan):
        first, second, factor = plan
        x, out = first.inputs[0], second.outputs[0]
        for n in (first, second):
            n.inputs.clear()
            n.outputs.clear()
        c = gs.Constant(fresh_name(set(graph.gs.tensors()), "fused_factor"), factor)
        self.onnx_node(graph, "Mul", [x, c], [out])


class FuseMulsPass(RulePass):
    name, irs, repeat = "fuse-muls", frozenset({"onnx", "fx"}), True

    def rules(self, graph, ctx):
        return [FuseMuls(), FxFuseMuls()]


CHAINS = graph_from_text(HEADER + """
    g (float[2, 3] x, float[2, 3] w) => (float[2, 3] y, float[2, 3] z, float[2, 3] v)
      <float[1] a = {2.0}, float[1] b = {3.0}, float[1] c = {5.0}> {
        m1 = Mul(x, a)
        m2 = Mul(m1, b)
        m3 = Mul(m2, c)
        y = Relu(m3)
        s = Mul(x, c)
        t = Mul(s, b)
        r = Relu(s)
        z = Add(t, r)
        q = Mul(x, a)
        v = Mul(q, w)
    }""")


def muls(graph) -> list:
    return [n for n in graph.gs.nodes if n.op == "Mul"]


def assert_same_outputs(before, after, rtol=1e-6):
    feeds = before.sample_inputs(seed=3)
    for want, got in zip(before.run(feeds), after.run(feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=0)


def test_one_sweep_applies_skips_and_counts():
    g = CHAINS.copy()
    outcome = apply_rules(g, [FuseMuls()])
    # m1 * m2 fused; the new Mul is not visited in this sweep, so it and m3 stay two Muls
    assert outcome.applied == {"fuse-muls": 1} and outcome.stats == {"fused Mul pairs": 1}
    assert outcome.sweeps == 1 and outcome.modified
    assert outcome.skipped == {f"Mul {SHARED}": 1, f"Mul {NOT_CONSTANT}": 1}
    assert outcome.notes() == [f"1 Mul {SHARED}: left as is ('s')", f"1 Mul {NOT_CONSTANT}: left as is ('q')"]
    assert len(muls(g)) == len(muls(CHAINS)) - 1
    g.verify()  # new nodes were appended: the layer sorted the graph
    assert_same_outputs(CHAINS, g)


def test_repeat_sweeps_until_nothing_applies_and_new_nodes_carry_the_rule_name():
    g = CHAINS.copy()
    outcome = apply_rules(g, [FuseMuls()], repeat=True)
    assert outcome.stats == {"fused Mul pairs": 2} and outcome.sweeps == 3  # the last sweep applies nothing
    # x * 2 * 3 * 5 is one Mul by 30, made by the rule (its second node: the first was fused again)
    (fused,) = [n for n in muls(g) if n.outputs[0].name == "m3"]
    assert fused.name == "fuse-muls/Mul_1" and fused.inputs[0].name == "x"
    assert g.constant_value(fused.inputs[1]).tolist() == [30.0]
    assert outcome.skipped == {f"Mul {SHARED}": 1, f"Mul {NOT_CONSTANT}": 1}  # as the last sweep left them
    g.verify()
    assert_same_outputs(CHAINS, g)


def test_rule_pass_result_and_idempotence():
    result = FuseMulsPass()(CHAINS.copy(), PassContext())
    assert result.modified and result.stats == {"fused Mul pairs": 2}
    assert result.skipped == {f"Mul {SHARED}": 1, f"Mul {NOT_CONSTANT}": 1}
    assert result.notes == [f"1 Mul {SHARED}: left as is ('s')", f"1 Mul {NOT_CONSTANT}: left as is ('q')"]
    assert result.describe() == "fused 2 Mul pairs"
    nodes = [(n.op, n.name) for n in result.graph.gs.nodes]
    again = FuseMulsPass()(result.graph, PassContext())
    assert not again.modified and again.stats == {} and again.notes == result.notes
    assert [(n.op, n.name) for n in again.graph.gs.nodes] == nodes


def test_rule_pass_in_the_manager():
    _, report = PassManager([FuseMulsPass()]).run(CHAINS)
    (record,) = report.records
    assert record.modified and record.changes == "fused 2 Mul pairs" and record.nodes_before - record.nodes_after == 2
    assert record.notes == [f"1 Mul {SHARED}: left as is ('s')", f"1 Mul {NOT_CONSTANT}: left as is ('q')"]
    assert len(muls(CHAINS)) == 7  # the caller's graph untouched


class Always(Rule):
    """A rule with a fixed answer, to see how the layer combines rules at one node."""

    irs, stat = frozenset({"onnx"}), "touched Relu"

    def __init__(self, name, answer):
        self.name, self.answer, self.applied = name, answer, []

    def match(self, graph, node):
        return self.answer if node.op == "Relu" else None

    def apply(self, graph, plan):
        self.applied.append(plan)


def test_the_first_rule_with_a_plan_wins_and_a_skip_it_overrides_is_not_counted():
    g = CHAINS.copy()
    first, second, third = Always("skips", Skip("for no reason")), Always("plans", "plan"), Always("late", "late")
    outcome = apply_rules(g, [first, second, third])
    assert second.applied == ["plan", "plan"] and third.applied == []  # two Relus, the second rule's each time
    assert outcome.applied == {"plans": 2} and outcome.skipped == {}
    only_skips = apply_rules(g, [Always("silent", None), first])
    assert not only_skips.modified and only_skips.skipped == {"Relu for no reason": 2}
    assert only_skips.notes() == ["2 Relu for no reason: left as is"]  # no names given: none listed


def test_rules_for_another_ir_are_not_run():
    g = CHAINS.copy()
    outcome = apply_rules(g, [FxFuseMuls()])
    assert not outcome.modified and outcome.skipped == {} and len(muls(g)) == 7


def test_rules_that_keep_applying_are_a_bug_not_a_hang():
    with pytest.raises(RuntimeError, match="still apply after 100 sweeps"):
        apply_rules(CHAINS.copy(), [Always("forever", "again")], repeat=True)


@pytest.mark.parametrize("name,irs,stat,message", [
    ("", {"onnx"}, "fused Muls", "rule name"), ("fuse muls", {"onnx"}, "fused Muls", "rule name"),
    ("fuse", {"tflite"}, "fused Muls", "irs"), ("fuse", {"onnx"}, "fused", "stat"),
])
def test_malformed_rules_are_refused_by_name(name, irs, stat, message):
    rule = Always(name, None)
    rule.irs, rule.stat = frozenset(irs), stat
    with pytest.raises(PluginError, match=message):
        apply_rules(CHAINS.copy(), [rule])


def test_two_rules_of_one_name_for_one_ir_are_refused():
    with pytest.raises(PluginError, match="share the name 'twin'"):
        apply_rules(CHAINS.copy(), [Always("twin", None), Always("twin", None)])
    assert apply_rules(CHAINS.copy(), [FuseMuls(), FxFuseMuls()]).stats == {"fused Mul pairs": 1}  # two IRs: fine


# -- FX -------------------------------------------------------------------------------------------------------------
class FxFuseMuls(Rule):
    """FX: ``(x * a) * b`` with Python numbers a, b -> ``x * (a * b)``, the first product read only there."""

    name, irs, stat, subject = "fuse-muls", frozenset({"fx"}), "fused Mul pairs", "Mul"

    def match(self, graph, node):
        first = node.args[0] if node.op == "call_function" and node.target is operator.mul else None
        if getattr(first, "target", None) is not operator.mul or not isinstance(node.args[1], (int, float)):
            return None
        if not isinstance(first.args[1], (int, float)):
            return Skip(NOT_CONSTANT, first.name)
        if len(first.users) > 1:
            return Skip(SHARED, first.name)
        return first, node

    def apply(self, graph, plan):
        first, second = plan
        with graph.gm.graph.inserting_before(second):
            fused = self.fx_node(graph, "call_function", operator.mul, (first.args[0], first.args[1] * second.args[1]))
        second.replace_all_uses_with(fused)
        graph.gm.graph.erase_node(second)
        graph.gm.graph.erase_node(first)


class Scales(nn.Module):
    def forward(self, x, w):
        u = x * 2
        shared = x * 5
        return (u * 3) * 7 + 1, shared * 3 + shared, (x * w) * 2


def test_fx_rule_names_its_nodes_and_the_module_runs():
    x, w = torch.randn(2, 3), torch.randn(2, 3)
    graph = FxGraph.from_module(Scales(), (x, w))
    result = FuseMulsPass()(graph.copy(), PassContext())
    assert result.stats == {"fused Mul pairs": 2}  # x*2*3, then the new node *7 (rooted at the second Mul: one sweep)
    assert result.skipped == {f"Mul {SHARED}": 1, f"Mul {NOT_CONSTANT}": 1}
    made = [n for n in result.graph.gm.graph.nodes if RULE_META in n.meta]
    assert [(n.meta[RULE_META], n.args[1]) for n in made] == [("fuse-muls", 42)]
    assert made[0].name.startswith("fuse_muls_mul") and made[0].name in result.graph.gm.code  # recompiled
    for want, got in zip(Scales()(x, w), result.graph.gm(x, w), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not FuseMulsPass()(result.graph, PassContext()).modified


# -- the passes moved onto rules report their reasons as data ------------------------------------------------------
def test_fold_bn_and_eliminate_identity_count_their_reasons(registry):
    g = graph_from_text(HEADER + """
        g (float[1, 3, 4, 4] x) => (float[1, 3, 4, 4] y, float[1, 3, 4, 4] z, float[1, 3, 4, 4] v, bool[1, 3, 4, 4] m)
          <float[3] s = {1.0, 2.0, 3.0}, float[3] o = {0.0, 1.0, 0.5}> {
            a = Relu(x)
            y = BatchNormalization(a, s, o, o, s)
            b = Sigmoid(x)
            z = BatchNormalization(b, s, o, o, s)
            v, m = Dropout(a)
        }""")
    folded = registry.passes["fold-bn"]()(g.copy())
    assert folded.skipped == {"BatchNormalization not after a foldable op (Conv, ConvTranspose, Gemm/Linear)": 2}
    assert folded.notes == ["2 BatchNormalization not after a foldable op (Conv, ConvTranspose, Gemm/Linear): "
                            "left as is"]
    kept = registry.passes["eliminate-identity"]()(g.copy())
    assert kept.skipped == {"Dropout whose mask output is used (removing it would leave the mask undefined)": 1}


def test_to_fp16_cast_rules_remove_pairs_and_keep_an_output_name():
    from graphopt_plugins.to_fp16 import RedundantCast

    g = graph_from_text(HEADER + """
        g (float[2, 3] x) => (float[2, 3] y, float[2, 3] z) {
            a = Relu(x)
            h = Cast<to = 10>(a)
            f = Cast<to = 1>(h)
            y = Relu(f)
            h2 = Cast<to = 10>(x)
            z = Cast<to = 1>(h2)
        }""")
    g.infer_shapes()  # the rules read tensor types, as the converter's output has them
    outcome = apply_rules(g, [RedundantCast(False), RedundantCast(True)], repeat=True)
    g.gs.cleanup()
    assert outcome.stats == {"removed Cast pairs": 2}
    relu = [n for n in g.gs.nodes if n.op == "Relu"][1]
    assert relu.inputs[0].name == "a"  # between two float32 ops: no Cast left
    (cast,) = [n for n in g.gs.nodes if n.op == "Cast"]  # from a graph input to a graph output: a no-op Cast
    assert cast.inputs[0].name == "x" and cast.outputs[0].name == "z"
    x = np.float32([[1.2345678, -1.0, 3.3333333], [0.1, 1e-8, -2.0]])
    y, z = g.run({"x": x})
    np.testing.assert_array_equal(y, np.maximum(x, 0))  # the float16 round trips are gone: no rounding left
    np.testing.assert_array_equal(z, x)
    assert not apply_rules(g, [RedundantCast(False), RedundantCast(True)], repeat=True).modified

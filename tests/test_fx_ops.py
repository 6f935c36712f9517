"""graphopt.ir.fx_ops: the layer-call table (F.* and ATen), FxGraph.kind on both captures, the argument accessor and
the get_attr lookup that fold-bn, sparsity, pruning and the cost report share."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graphopt.ir.fx_graph import FxGraph
from graphopt.ir.fx_ops import CONV, CONV_TRANSPOSE, CONVOLUTION, LINEAR, arg, get_attr, layer_call, set_arg
from graphopt.ir.ops import OpKind


class Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.t = torch.nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.fc = torch.nn.Linear(2, 5)

    def forward(self, x):
        y = F.conv2d(x, self.c.weight, self.c.bias, padding=1, groups=1)
        y = F.conv_transpose2d(y, self.t.weight, self.t.bias, stride=2)
        return F.linear(y.permute(0, 2, 3, 1), self.fc.weight, self.fc.bias)


def _calls(gm) -> dict:
    return {n.name: n for n in gm.graph.nodes if n.op == "call_function" and layer_call(n) is not None}


def test_functional_calls_from_symbolic_trace_have_their_kind_and_names():
    gm = torch.fx.symbolic_trace(Layers())
    found = {str(n.target): layer_call(n) for n in _calls(gm).values()}
    assert sorted(found.values()) == sorted([(OpKind.CONV, CONV), (OpKind.CONV_TRANSPOSE, CONV_TRANSPOSE),
                                             (OpKind.GEMM, LINEAR)])
    graph = FxGraph(gm, (torch.randn(1, 3, 4, 4),))
    assert sorted(graph.kind(n) for n in _calls(gm).values()) == sorted(
        [OpKind.CONV, OpKind.CONV_TRANSPOSE, OpKind.GEMM])


def test_aten_calls_from_torch_export_have_their_kind_and_names():
    x = torch.randn(1, 3, 4, 4)
    gm = torch.export.export(Layers(), (x,)).module()
    calls = _calls(gm)
    targets = sorted(str(n.target) for n in calls.values())
    assert targets == ["aten.conv2d.default", "aten.conv_transpose2d.input", "aten.linear.default"]
    graph = FxGraph(gm, (x,), "torch.export")
    assert sorted(graph.kind(n) for n in calls.values()) == sorted([OpKind.CONV, OpKind.CONV_TRANSPOSE, OpKind.GEMM])
    for node in calls.values():  # the table's parameter names are the op's schema's, in order
        _, names = layer_call(node)
        assert names == tuple(a.name for a in node.target._schema.arguments)
        assert arg(node, names, "weight").op == "get_attr"


def test_aten_convolution_is_a_conv_or_a_conv_transpose_by_its_transposed_argument():
    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 3, 1, 1))

        def forward(self, x):
            a = torch.ops.aten.convolution.default(x, self.w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
            return torch.ops.aten.convolution.default(a, self.w, None, [1, 1], [0, 0], [1, 1], True, [0, 0], 1)

    gm = torch.fx.symbolic_trace(Conv())
    first, second = _calls(gm).values()
    assert layer_call(first) == (OpKind.CONV, CONVOLUTION) and layer_call(second) == (OpKind.CONV_TRANSPOSE,
                                                                                        CONVOLUTION)
    graph = FxGraph(gm, (torch.randn(1, 3, 2, 2),))
    assert (graph.kind(first), graph.kind(second)) == (OpKind.CONV, OpKind.CONV_TRANSPOSE)
    set_arg(second, CONVOLUTION, "transposed", first)  # a transposed computed at run time: the kind is unknown
    assert layer_call(second) == (None, CONVOLUTION) and graph.kind(second) == OpKind.OTHER


def test_other_calls_are_no_layer():
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Flatten()))
    assert all(layer_call(n) is None for n in gm.graph.nodes)
    traced = torch.fx.symbolic_trace(lambda x: torch.relu(x) + 1)
    assert all(layer_call(n) is None for n in traced.graph.nodes)


def test_arg_reads_positional_then_keyword_then_default_and_set_arg_writes_where_it_is():
    gm = torch.fx.symbolic_trace(lambda x, w: F.conv2d(x, w, None, 1, 0, 1, groups=2))
    node = next(iter(_calls(gm).values()))
    assert arg(node, CONV, "bias", "absent") is None  # positional
    assert arg(node, CONV, "groups") == 2  # keyword
    assert arg(node, LINEAR, "groups", 1) == 2  # a name the list lacks: only as a keyword
    assert arg(node, 6, "groups") == 2 and arg(node, 1, "weight").name == "w"  # by position
    set_arg(node, CONV, "padding", 1)
    set_arg(node, CONV, "groups", 1)
    assert node.args[4] == 1 and node.kwargs == {"groups": 1}
    x, w = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)
    gm.recompile()
    assert torch.equal(gm(x, w), F.conv2d(x, w, None, 1, 1, 1, 1))


def test_get_attr_reads_a_nested_path_and_none_where_it_names_nothing():
    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 3)))
    assert get_attr(model, "0.0.weight") is model[0][0].weight
    assert get_attr(model, "0.0.bias") is model[0][0].bias
    assert get_attr(model, "0.1.weight") is None and get_attr(model, "nothing") is None

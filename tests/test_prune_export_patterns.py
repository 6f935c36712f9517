"""prune-channels on the patterns torchvision's models showed it, exported by torch.onnx as a user would.

Each failure seen on a torchvision model (benchmarks/bench_prune_torchvision.py) is rebuilt here as a tiny
plain-torch model, exported with the exporter that showed it. The pruned model must run, be smaller, and — where
no normalization over the pruned channels changes the statistics — equal the original with the removed channels
zeroed instead ("masked", as in test_prune_patterns.py). And whatever goes wrong inside the engine, the pass
keeps the group it cannot prune whole, says why, and prunes the rest.
"""

from __future__ import annotations

import types

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from graphopt import hookimpl, optimize
from graphopt.ir import OnnxGraph
from graphopt.plugins import load_registry
from graphopt.prune import BUILTIN_HANDLERS, prune_view
from graphopt.prune.handlers import conv
from graphopt.prune.importance import l1
from graphopt.prune.onnx_adapter import OnnxChannels
from graphopt.prune.propagate import Tracked
from graphopt.prune.view import Plan
from graphopt.report.cost import model_costs
from graphopt.zoo import export_onnx

TOL = dict(rtol=1e-4, atol=1e-5)


def _export(model: nn.Module, shape, path: str, exporter: str = "torchscript") -> str:
    return export_onnx(model.eval(), path, shape, keep_bn=False, opset=18, exporter=exporter)


def _input(shape) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _pruned_and_masked(graph: OnnxGraph, ratio: float = 0.5):
    """The engine's plan applied to one copy of ``graph`` and, as zeros, to another: (pruned, masked, outcome)."""
    adapter = OnnxChannels(graph)
    view = adapter.view()
    outcome = prune_view(view, handlers=BUILTIN_HANDLERS, criterion=l1, fallback=l1, ratio=ratio)
    plan = outcome.plan
    zeroed: dict[str, np.ndarray] = {}
    for (value, axis), keep in plan.kept.items():
        if outcome.prop.slices[(value, axis)].role == "stat":  # running variance must stay positive
            continue
        array = zeroed.setdefault(value, view.consts[value].copy())
        index = [slice(None)] * array.ndim
        index[axis] = np.setdiff1d(np.arange(array.shape[axis]), keep)
        array[tuple(index)] = 0
    pruned, masked = adapter.fork(), adapter.fork()
    pruned.apply(plan)
    masked.apply(Plan(consts=zeroed))
    pruned.graph.verify()  # strict shape inference: every consumer agrees with its producer
    return pruned.graph, masked.graph, outcome


def _smaller(before: OnnxGraph, after: OnnxGraph) -> None:
    b, a = model_costs(before), model_costs(after)
    assert a.params < b.params and a.macs < b.macs, (b, a)


# -- a constant shared between readers ----------------------------------------------------------------------------
class SharedZeroBias(nn.Module):
    """A LayerNorm over the raw input and a Linear as wide, both with zero biases: the TorchScript exporter keeps
    one of two equal initializers (``fc1.bias = Identity(norm.bias)``), so after ``fold`` one tensor is the bias
    of both. Swin-T's PatchMerging norm and its MLPs' zero biases are exported so."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(16), nn.Linear(16, 16), nn.Linear(16, 4)
        nn.init.zeros_(self.fc1.bias)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.norm(x))))


def test_a_bias_shared_by_a_norm_and_a_pruned_layer_is_sliced_for_that_layer_only(tmp_path):
    path = _export(SharedZeroBias(), (1, 6, 16), str(tmp_path / "shared.onnx"))
    exported = onnx.load(path).graph
    assert {n.op_type for n in exported.node} >= {"Identity"}  # the exporter really shares the two biases
    folded = optimize(path, "fold", check=False).graph
    norm = next(n for n in folded.gs.nodes if n.op == "LayerNormalization")
    readers = {n.name for n in norm.inputs[2].outputs}
    assert len(readers) == 2, readers  # the norm's bias is also fc1's: one initializer, two readers

    pruned, masked, outcome = _pruned_and_masked(folded)
    assert outcome.pruned_groups
    x = {"input": _input((1, 6, 16))}
    np.testing.assert_allclose(pruned.run(x)[0], masked.run(x)[0], **TOL)
    norm = next(n for n in pruned.gs.nodes if n.op == "LayerNormalization")
    assert norm.inputs[1].values.shape == norm.inputs[2].values.shape == (16,)
    _smaller(folded, pruned)

    result = optimize(path, "fold,prune")  # the CLI's pipeline, numeric check on
    assert result.report.records[-1].stats["pruned channel"] == 8
    assert result.graph.run(x)[0].shape == (1, 6, 4)


class TiedConvs(nn.Module):
    """Two convs in different channel groups that read one weight tensor (a tied weight in the file)."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.Conv2d(3, 8, 1, bias=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.a(torch.relu(self.head(x))))
        y = torch.relu(self.a(y))  # the same module twice: its weight is one initializer with two readers
        return self.fc(y.mean((2, 3)))


def test_a_tied_weight_is_pruned_per_reader_and_the_result_equals_the_masked_original(tmp_path):
    torch.manual_seed(0)
    path = _export(TiedConvs(), (1, 3, 8, 8), str(tmp_path / "tied.onnx"))
    graph = OnnxGraph.load(path)
    pruned, masked, outcome = _pruned_and_masked(graph)
    assert len(outcome.pruned_groups) == 3  # head, first use of a, second use of a: each on its own
    x = {"input": _input((1, 3, 8, 8))}
    np.testing.assert_allclose(pruned.run(x)[0], masked.run(x)[0], **TOL)
    widths = sorted(n.inputs[1].values.shape for n in pruned.gs.nodes if n.op == "Conv")
    assert widths == [(4, 3, 1, 1), (4, 4, 3, 3), (4, 4, 3, 3)]
    _smaller(graph, pruned)


# -- LayerNormalization on a permuted tensor (ConvNeXt, Swin) ---------------------------------------------------
class PermutedNorm(nn.Module):
    """A ConvNeXt block: depthwise conv, permute to channels-last, LayerNorm (ONNX: axis=-1), MLP, layer scale,
    permute back, residual; then a Swin-style patch merge (strided slices joined on channels, LayerNorm, Linear)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, stride=2)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(16), nn.Linear(16, 32), nn.Linear(32, 16)
        self.gamma = nn.Parameter(torch.rand(16) + 0.5)
        self.merge_norm, self.reduce = nn.LayerNorm(64), nn.Linear(64, 24, bias=False)
        self.head = nn.Linear(24, 4)
        for norm in (self.norm, self.merge_norm):  # non-trivial scale and bias, so slicing them matters
            nn.init.uniform_(norm.weight, 0.5, 1.5)
            nn.init.uniform_(norm.bias, -0.5, 0.5)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(nn.functional.gelu(self.fc1(self.norm(y)))) * self.gamma
        x = x + y.permute(0, 3, 1, 2)
        x = x.permute(0, 2, 3, 1)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        x = self.reduce(self.merge_norm(x))
        return self.head(x.mean((1, 2)))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_layer_norm_after_a_permute_shrinks_scale_and_bias_together(exporter, tmp_path):
    torch.manual_seed(0)
    model = PermutedNorm().eval()
    path = _export(model, (1, 3, 8, 8), str(tmp_path / f"permuted.{exporter}.onnx"), exporter)
    result = optimize(path, "fold,prune")
    graph = result.graph
    norms = [n for n in graph.gs.nodes if n.op == "LayerNormalization"]
    assert [int(n.attrs.get("axis", -1)) for n in norms] == [-1, -1]
    assert sorted(n.inputs[1].values.shape for n in norms) == sorted(n.inputs[2].values.shape for n in norms)
    assert sorted(n.inputs[1].values.shape[0] for n in norms) == [8, 32]  # 16 -> 8 channels; merged 4 x 8
    x = _input((1, 3, 8, 8))
    original = OnnxGraph.load(path)
    _smaller(original, graph)
    # the same channels as the FX route, whose nn.LayerNorm modules shrink with them
    fx = optimize(model, "prune", example_inputs=(torch.from_numpy(x),), check=False)
    assert tuple(fx.model.get_submodule("merge_norm").weight.shape) == (32,)
    with torch.no_grad():
        np.testing.assert_allclose(graph.run({"input": x})[0], fx.model(torch.from_numpy(x)).numpy(),
                                   rtol=1e-3, atol=1e-4)


# -- the last line of defence ------------------------------------------------------------------------------------
class TwoBranches(nn.Module):
    """Two independent conv chains joined only by the classifier: two channel groups to prune."""

    def __init__(self):
        super().__init__()
        self.a1, self.a2 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b1, self.b2 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        a = self.a2(torch.relu(self.a1(x)))
        b = self.b2(torch.sigmoid(self.b1(x)))
        return self.fc(torch.cat([a, b], 1).mean((2, 3)))


def _registry(op: str, handler):
    plugin = types.SimpleNamespace(graphopt_register_channel_handlers=hookimpl(
        lambda registry: registry.add_channel_handler("onnx", op, handler)))
    return load_registry(autoload=False, modules=[plugin])


def _conv_outputs(graph: OnnxGraph) -> dict[str, int]:
    return {n.name: n.inputs[1].values.shape[0] for n in graph.gs.nodes if n.op == "Conv"}


@pytest.fixture
def two_branches(tmp_path):
    torch.manual_seed(0)
    return _export(TwoBranches(), (1, 3, 8, 8), str(tmp_path / "two.onnx"))


def test_a_handler_that_raises_keeps_its_group_whole_and_the_rest_is_pruned(two_branches):
    def broken(node, prop):
        raise TypeError("object of type 'NoneType' has no len()")

    result = optimize(two_branches, "prune", registry=_registry("Sigmoid", broken))
    record = result.report.records[-1]
    assert _conv_outputs(result.graph) == {"/a1/Conv": 4, "/a2/Conv": 4, "/b1/Conv": 8, "/b2/Conv": 4}
    assert record.stats["contained internal-error"] == 1
    assert any("internal: TypeError: object of type 'NoneType' has no len() (in the channel handler of Sigmoid "
               "'/Sigmoid')" in n for n in record.notes), record.notes
    x = {"input": _input((1, 3, 8, 8))}
    assert result.graph.run(x)[0].shape == (1, 4)


def test_a_handler_whose_plan_does_not_run_loses_only_its_group(two_branches):
    def cuts_the_link(node, prop):  # a buggy Sigmoid handler: its output's channels are new ones, not its input's
        prop.set(node.outputs[0], Tracked((1,), prop.fresh(8)))

    result = optimize(two_branches, "prune", registry=_registry("Sigmoid", cuts_the_link))
    record = result.report.records[-1]
    assert _conv_outputs(result.graph) == {"/a1/Conv": 4, "/a2/Conv": 4, "/b1/Conv": 8, "/b2/Conv": 4}
    assert record.stats["contained internal-error"] == 1
    assert any("internal: RuntimeError: the pruned graph does not run" in n for n in record.notes), record.notes
    assert result.graph.run({"input": _input((1, 3, 8, 8))})[0].shape == (1, 4)


def test_when_every_attempt_fails_the_model_comes_back_unchanged_with_the_reason(two_branches):
    def always_breaks(node, prop):
        prop.edit(node, "no-such-attribute", lambda kept: 0)  # the adapter cannot apply it: every plan fails
        conv(node, prop)

    result = optimize(two_branches, "prune", registry=_registry("Conv", always_breaks))
    record = result.report.records[-1]
    assert not record.modified
    assert _conv_outputs(result.graph) == {"/a1/Conv": 8, "/a2/Conv": 8, "/b1/Conv": 8, "/b2/Conv": 8}
    assert any("cannot set 'no-such-attribute'" in n for n in record.notes), record.notes


# -- torch.export: tensors inside list arguments -----------------------------------------------------------------
class EinsumAttention(nn.Module):
    """MaxViT's attention: q, k, v split into heads and multiplied by ``torch.einsum``, which torch.export records
    as ``aten.einsum(equation, [q, k])``: its operands sit in a list. A conv stem before it prunes freely."""

    heads, head_dim = 2, 4

    def __init__(self):
        super().__init__()
        self.stem, self.mix = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.qkv, self.out, self.fc = nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = self.mix(torch.relu(self.stem(x))).flatten(2).transpose(1, 2)  # (1, 16 tokens, 8)
        q, k, v = (t.reshape(1, 16, self.heads, self.head_dim).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        att = torch.einsum("bhid,bhjd->bhij", q, k * self.head_dim ** -0.5).softmax(-1)
        y = torch.einsum("bhij,bhjd->bhid", att, v).transpose(1, 2).reshape(1, 16, 8)
        return self.fc(self.out(y).mean(1))


def test_torch_export_einsum_blocks_the_operands_in_its_list_and_the_rest_is_pruned():
    from graphopt.ir.fx_graph import FxGraph

    torch.manual_seed(0)
    model, x = EinsumAttention().eval(), torch.randn(1, 3, 4, 4)
    gm = torch.export.export(model, (x,)).module()
    assert any(n.target is torch.ops.aten.einsum.default and isinstance(n.args[1], (list, tuple))
               for n in gm.graph.nodes)  # the operands really come as a list
    result = optimize(FxGraph(gm, (x,), "torch.export"), "prune", check=False)
    shapes = {n: tuple(p.shape) for n, p in result.model.named_parameters()}
    assert shapes["stem.weight"] == (4, 3, 3, 3) and shapes["mix.weight"] == (4, 4, 1, 1)  # free: pruned
    assert shapes["qkv.weight"] == (24, 4)  # q, k and v reach the einsums: kept whole, with the reason
    assert any("einsum" in n and "no channel handler" in n for n in result.report.records[-1].notes)
    with torch.no_grad():
        assert result.model(x).shape == (1, 4)


def test_a_single_channel_reshaped_then_transposed_is_left_alone():
    """One channel flattened and transposed: nothing to prune, and no crash (found by tests/test_properties.py)."""
    import onnx

    import graphopt

    m = onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,1,1,1] x) => (float[1,3] y) <float[1,1,1,1] w = {0.5}, float[1,3] v = {0.1,0.2,0.3}> {
          c = Conv<kernel_shape = [1, 1]>(x, w)
          f = Flatten<axis = 1>(c)
          t = Transpose<perm = [1, 0]>(f)
          y = Gemm<transA = 1>(t, v)
        }''')
    result = graphopt.optimize(m, "prune", check=False)
    assert not result.report.modified

"""Each dependency pattern of structured pruning on a tiny model, through both IRs.

The strongest check here: the pruned ONNX model computes exactly what the *original* model computes when the
pruned channels are zeroed in place ("masked") — weights, scales and biases of each removed channel set to 0,
nothing removed. That holds only if every Concat offset, Split size, Flatten spread, group and head was sliced at
the right indices. The FX route must choose the same channels: its outputs match the ONNX route's.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch

from graphopt import optimize
from graphopt.ir import OnnxGraph
from graphopt.ir.onnx_graph import replace_input
from graphopt.prune import BUILTIN_HANDLERS, prune_view
from graphopt.prune.importance import l1
from graphopt.prune.onnx_adapter import OnnxChannels
from graphopt.zoo import export_onnx
from tests.prune_patterns import PATTERNS

TOL = dict(rtol=1e-4, atol=1e-5)


def _build(name: str, tmp_path):
    cls, shape, expected = PATTERNS[name]
    torch.manual_seed(0)
    model = cls().eval()
    for m in model.modules():  # non-trivial BatchNorm, so its slices matter
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    path = str(tmp_path / f"{name}.onnx")
    export_onnx(model, path, shape, keep_bn=True)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return model, x, expected, path


def _matches(actual: tuple, expected: tuple) -> bool:
    return len(actual) == len(expected) and all(e is None or a == e for a, e in zip(actual, expected))


def _masked(graph: OnnxGraph, view, outcome) -> OnnxGraph:
    """A copy of ``graph`` (as the pruning view saw it) with every removed channel zeroed instead of removed."""
    arrays: dict[str, np.ndarray] = {}
    for (value, axis), keep in outcome.plan.kept.items():
        if outcome.prop.slices[(value, axis)].role == "stat":  # running variance must stay positive
            continue
        array = arrays.setdefault(value, view.consts[value].copy())
        gone = np.setdiff1d(np.arange(array.shape[axis]), keep)
        index = [slice(None)] * array.ndim
        index[axis] = gone
        array[tuple(index)] = 0
    masked = graph.copy()
    tensors = masked.gs.tensors()
    for name, array in arrays.items():
        for consumer in list(tensors[name].outputs):
            replace_input(consumer, tensors[name], gs.Constant(name, array))
    return masked


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_onnx_pattern_prunes_the_right_indices(name, tmp_path):
    _, x, expected, path = _build(name, tmp_path)
    graph = OnnxGraph.load(path)
    adapter = OnnxChannels(graph)
    view = adapter.view()
    outcome = prune_view(view, handlers=BUILTIN_HANDLERS, criterion=l1, fallback=l1, ratio=0.5)
    assert outcome.pruned_groups, outcome.blocked_reasons()
    masked = _masked(graph, view, outcome)
    adapter.apply(outcome.plan)
    graph.verify()  # strict shape inference: every consumer agrees with its producer
    pruned_out, masked_out = graph.run({"input": x}), masked.run({"input": x})
    assert pruned_out[0].shape == masked_out[0].shape
    np.testing.assert_allclose(pruned_out[0], masked_out[0], **TOL)
    consts = {n: t.values.shape for n, t in graph.gs.tensors().items() if isinstance(t, gs.Constant)}
    for param, shape in expected.items():
        if param in consts:  # the exporter renames weights it transposes (Linear on 3-D input): FX checks those
            assert _matches(consts[param], shape), (param, consts[param], shape)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_fx_pattern_matches_the_onnx_route(name, tmp_path):
    model, x, expected, path = _build(name, tmp_path)
    fx = optimize(model, "prune", example_inputs=(torch.from_numpy(x),), check=False)
    params = {n: tuple(p.shape) for n, p in fx.model.named_parameters()}
    for param, shape in expected.items():
        assert _matches(params[param], shape), (param, params[param], shape)
    onnx_route = optimize(path, "prune", check=False)
    with torch.no_grad():
        fx_out = fx.model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(fx_out, onnx_route.graph.run({"input": x})[0], **TOL)
    with torch.no_grad():
        assert fx_out.shape == tuple(model(torch.from_numpy(x)).shape)


def test_attention_heads_count_mode_removes_whole_heads(tmp_path):
    model, x, _, path = _build("attention-size", tmp_path)
    fx = optimize(model, "prune:split=count", example_inputs=(torch.from_numpy(x),), check=False)
    q = dict(fx.model.named_parameters())["q.weight"]
    assert tuple(q.shape) == (16, 16)  # 2 of 4 heads kept, each still 8 wide
    views = [n for n in fx.model.graph.nodes if n.op == "call_method" and n.target == "view"]
    assert all(n.args[3:] == (2, 8) for n in views), [n.args for n in views]
    onnx_route = optimize(path, "prune:split=count", check=False)
    np.testing.assert_allclose(fx.model(torch.from_numpy(x)).detach().numpy(),
                               onnx_route.graph.run({"input": x})[0], **TOL)
    size = optimize(model, "prune", example_inputs=(torch.from_numpy(x),), check=False)
    views = [n for n in size.model.graph.nodes if n.op == "call_method" and n.target == "view"]
    assert all(n.args[3:] == (4, 4) for n in views), [n.args for n in views]  # 4 heads, each 4 wide


def test_grouped_conv_keeps_its_groups_or_loses_whole_ones(tmp_path):
    model, x, _, path = _build("grouped", tmp_path)
    fx = optimize(model, "prune", example_inputs=(torch.from_numpy(x),), check=False)
    assert fx.model.get_submodule("grouped").groups == 4  # each group half as wide
    whole = optimize(model, "prune:split=count", example_inputs=(torch.from_numpy(x),), check=False)
    assert whole.model.get_submodule("grouped").groups == 2
    assert tuple(whole.model.get_submodule("grouped").weight.shape) == (8, 4, 3, 3)
    onnx_route = optimize(path, "prune:split=count", check=False)
    assert [n.attrs["group"] for n in onnx_route.graph.gs.nodes if n.op == "Conv" and n.attrs["group"] > 1] == [2]
    with torch.no_grad():
        np.testing.assert_allclose(whole.model(torch.from_numpy(x)).numpy(), onnx_route.graph.run({"input": x})[0],
                                   **TOL)

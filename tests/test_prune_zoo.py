"""The coverage bar: every zoo architecture pruned at ratio 0.5 on both routes, run, and checked.

Residual, inverted residual, dense concat, grouped, channel split + shuffle, fire modules, depthwise + squeeze-
excite, ConvNeXt (LayerNorm, permutes) and a transformer: each must lose MACs, keep its output shape, and make the
same choices on the ONNX and the FX route (same outputs). On the CNNs without a normalization over channels, the
pruned model must also equal the original with the pruned channels zeroed (see test_prune_patterns.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphopt import optimize, zoo
from graphopt.ir import OnnxGraph
from graphopt.ir.fx_graph import FxGraph
from graphopt.prune import BUILTIN_HANDLERS, prune_view
from graphopt.prune.importance import l1
from graphopt.prune.onnx_adapter import OnnxChannels
from graphopt.report.cost import model_costs
from tests.test_prune_patterns import _masked

MODELS = dict(zoo.PRUNE_ZOO)
MODELS.pop("resnet18_like")  # covered by the same residual pattern as tiny_resnet; the benchmark measures it
MASKABLE = {"tiny_resnet", "mobilenet_v2_like", "densenet_like", "resnext_like", "shufflenet_v2_like",
            "squeezenet_like", "efficientnet_like"}


def _model(name):
    if name == "bert_like":
        return zoo.bert_like(hidden=64, layers=2, heads=4, seq=16).eval(), (1, 16)
    return getattr(zoo, name)().eval(), MODELS[name]


def _input(name, shape):
    if name == "bert_like":
        return np.random.default_rng(0).integers(0, 1000, size=shape).astype(np.int64)
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _export(name, model, shape, path):
    if name == "bert_like":
        zoo.export_transformer_onnx(model, path, seq=shape[1], dynamic=False)
    else:
        zoo.export_onnx(model, path, shape)
    return path


@pytest.mark.parametrize("name", [*sorted(MODELS), "bert_like"])
def test_both_routes_prune_run_and_agree(name, tmp_path):
    model, shape = _model(name)
    x = _input(name, shape)
    path = _export(name, model, shape, str(tmp_path / f"{name}.onnx"))
    original = OnnxGraph.load(path)
    onnx_route = optimize(path, "prune", check=False)
    fx_route = optimize(model, "prune", example_inputs=(torch.from_numpy(x),), check=False)
    assert onnx_route.report.records[-1].stats["pruned channel"] > 0
    feed = {original.gs.inputs[0].name: x}
    want = original.run(feed)[0]
    got = onnx_route.graph.run(feed)[0]
    assert got.shape == want.shape
    with torch.no_grad():
        fx_out = fx_route.model(torch.from_numpy(x)).numpy()
    assert fx_out.shape == want.shape
    if name != "bert_like":  # the ONNX route folds the position embedding lookup into a constant l1 does not score
        np.testing.assert_allclose(fx_out, got, rtol=1e-3, atol=1e-4)  # the same channels, whichever route
    before, after = model_costs(original), model_costs(onnx_route.graph)
    assert after.macs < 0.6 * before.macs and after.params < 0.6 * before.params, (before, after)
    fx_after = model_costs(FxGraph.from_module(fx_route.model, (torch.from_numpy(x),)))
    assert abs(fx_after.macs - after.macs) <= 0.01 * after.macs


@pytest.mark.parametrize("name", sorted(MASKABLE))
def test_pruned_equals_masked_original(name, tmp_path):
    model, shape = _model(name)
    x = _input(name, shape)
    graph = OnnxGraph.load(_export(name, model, shape, str(tmp_path / f"{name}.onnx")))
    adapter = OnnxChannels(graph)
    view = adapter.view()
    outcome = prune_view(view, handlers=BUILTIN_HANDLERS, criterion=l1, fallback=l1, ratio=0.5)
    masked = _masked(graph, view, outcome)
    adapter.apply(outcome.plan)
    graph.verify()
    np.testing.assert_allclose(graph.run({"input": x})[0], masked.run({"input": x})[0], rtol=1e-4, atol=1e-5)


def test_dynamo_exports_channel_split_as_a_sequence(tmp_path):
    """torch's default exporter, optimizer off, writes ``chunk`` as SplitToSequence + SequenceAt."""
    model, shape = _model("shufflenet_v2_like")
    x = _input("shufflenet_v2_like", shape)
    path = zoo.export_onnx(model, str(tmp_path / "dynamo.onnx"), shape, exporter="dynamo", keep_bn=True)
    graph = optimize(path, "fold", check=False).graph  # its zero conv biases are Shape/Expand chains until folded
    assert "SplitToSequence" in graph.op_counts()
    adapter = OnnxChannels(graph)
    view = adapter.view()
    outcome = prune_view(view, handlers=BUILTIN_HANDLERS, criterion=l1, fallback=l1, ratio=0.5)
    assert set(outcome.blocked_reasons()) == {f"graph output '{view.outputs[0]}' keeps its shape"}
    masked = _masked(graph, view, outcome)
    adapter.apply(outcome.plan)
    graph.verify()
    name = graph.gs.inputs[0].name
    np.testing.assert_allclose(graph.run({name: x})[0], masked.run({name: x})[0], rtol=1e-4, atol=1e-5)

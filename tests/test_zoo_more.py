"""The pruning zoo: every model runs at its PRUNE_ZOO shape, traces with torch.fx, and exports to ONNX faithfully."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from graphopt import zoo

NEW = ["densenet_like", "resnext_like", "shufflenet_v2_like", "squeezenet_like", "efficientnet_like", "convnext_like"]


def _reshape_target_sources(model: onnx.ModelProto) -> list[tuple[str, set[str]]]:
    """For each Reshape: the op making its target (``initializer`` if none) and every op type the target depends on
    (``input`` when it reaches a graph input)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    inits = {t.name for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "Reshape":
            continue
        ops, seen, stack = set(), set(), [node.input[1]]
        while stack:
            name = stack.pop()
            if name in seen or name in inits or not name:
                continue
            seen.add(name)
            if name not in producer:
                ops.add("input")
                continue
            ops.add(producer[name].op_type)
            stack.extend(producer[name].input)
        target = node.input[1]
        found.append(("initializer" if target in inits else producer[target].op_type, ops))
    return found


def test_prune_zoo_lists_the_new_models():
    assert set(NEW) <= set(zoo.PRUNE_ZOO)
    assert {"resnet18_like", "mobilenet_v2_like", "tiny_resnet"} <= set(zoo.PRUNE_ZOO)
    assert all(name in zoo.__all__ for name in NEW + ["PRUNE_ZOO"])


@pytest.mark.parametrize("name", list(zoo.PRUNE_ZOO))
def test_runs_at_its_prune_zoo_shape(name):
    model = getattr(zoo, name)(num_classes=7)
    with torch.no_grad():
        out = model(torch.randn(*zoo.PRUNE_ZOO[name]))
    assert out.shape == (1, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NEW)
def test_seeded_and_batchnorm_randomized(name):
    a, b, c = getattr(zoo, name)(seed=0), getattr(zoo, name)(seed=0), getattr(zoo, name)(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    assert not a.training
    for m in a.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert not torch.allclose(m.running_var, torch.ones_like(m.running_var))
        if isinstance(m, torch.nn.LayerNorm):
            assert not torch.allclose(m.weight, torch.ones_like(m.weight))


@pytest.mark.parametrize("name", NEW)
def test_traces_with_torch_fx(name):
    model = getattr(zoo, name)()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(*zoo.PRUNE_ZOO[name])
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("name", NEW)
def test_onnx_export_matches_torch_and_reshape_targets_are_static(name, tmp_path):
    model, shape = getattr(zoo, name)(), zoo.PRUNE_ZOO[name]
    path = zoo.export_onnx(model, str(tmp_path / f"{name}.onnx"), shape, keep_bn=True)
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, atol=1e-4, rtol=1e-3)
    onnx_model = onnx.load(path)
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert ("BatchNormalization" in {n.op_type for n in onnx_model.graph.node}) == has_bn  # keep_bn kept them
    # static input shape: no Reshape target is computed from Shape ops (or anything else) at run time
    for direct, ops in _reshape_target_sources(onnx_model):
        assert ops <= {"Constant", "Unsqueeze", "Concat"}, (direct, ops)


def test_shufflenet_reshape_targets_fold_to_constants(tmp_path):
    """With BatchNorm kept (no constant folding) the channel shuffle's view targets are Concat(Unsqueeze(Constant))
    chains; the exporter's constant folding (keep_bn=False) makes them plain Constants."""
    model, shape = zoo.shufflenet_v2_like(), zoo.PRUNE_ZOO["shufflenet_v2_like"]
    kept = onnx.load(zoo.export_onnx(model, str(tmp_path / "kept.onnx"), shape, keep_bn=True))
    folded = onnx.load(zoo.export_onnx(model, str(tmp_path / "folded.onnx"), shape, keep_bn=False))
    assert len(_reshape_target_sources(kept)) == len(_reshape_target_sources(folded)) == 12  # 6 units x 2 views
    assert all(direct in ("Constant", "initializer") for direct, _ in _reshape_target_sources(folded))

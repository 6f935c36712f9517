"""The two IRs: ONNX load/save (external data, metadata), FX capture (symbolic_trace, torch.export fallback),
shape propagation on both, and the graph protocol's numbers."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch

from graphopt.errors import ModelLoadError, UsageError
from graphopt.ir import OnnxGraph, load_model
from graphopt.ir.fx_graph import FxGraph
from graphopt.zoo import tiny_resnet


def test_onnx_round_trip_keeps_metadata_and_outputs(zoo_onnx, tmp_path):
    model = onnx.load(zoo_onnx("tiny_resnet"))
    onnx.helper.set_model_props(model, {"author": "graphopt-tests"})
    model.doc_string = "a doc"
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    graph = load_model(str(src))
    assert isinstance(graph, OnnxGraph) and graph.ir == "onnx" and graph.opset == 17
    assert graph.num_nodes() == 41 and graph.op_counts()["BatchNormalization"] == 12
    graph.save(str(tmp_path / "out.onnx"))
    again = onnx.load(str(tmp_path / "out.onnx"))
    assert again.doc_string == "a doc"
    assert {p.key: p.value for p in again.metadata_props} == {"author": "graphopt-tests"}
    assert again.ir_version == model.ir_version
    x = graph.sample_inputs(seed=3)
    np.testing.assert_array_equal(graph.run(x)[0], load_model(str(tmp_path / "out.onnx")).run(x)[0])


def test_external_data_is_read_and_written(zoo_onnx, tmp_path):
    model = onnx.load(zoo_onnx("tiny_resnet"))
    src = tmp_path / "ext.onnx"
    onnx.save_model(model, str(src), save_as_external_data=True, location="ext.weights", size_threshold=0)
    assert os.path.getsize(src) < 50_000 < os.path.getsize(tmp_path / "ext.weights")
    graph = load_model(str(src))
    assert graph.external_data
    out = tmp_path / "sub"
    out.mkdir()
    graph.save(str(out / "o.onnx"))
    assert (out / "o.onnx.data").exists()
    x = graph.sample_inputs()
    np.testing.assert_array_equal(graph.run(x)[0], load_model(str(out / "o.onnx")).run(x)[0])


def test_missing_external_data_is_a_load_error(zoo_onnx, tmp_path):
    src = tmp_path / "ext.onnx"
    onnx.save_model(onnx.load(zoo_onnx("tiny_resnet")), str(src), save_as_external_data=True, location="w.bin",
                    size_threshold=0)
    os.remove(tmp_path / "w.bin")
    with pytest.raises(ModelLoadError, match="external data"):
        load_model(str(src))


def test_onnx_shape_inference_fills_value_info(zoo_onnx):
    graph = load_model(zoo_onnx("tiny_resnet"))
    graph.infer_shapes()
    relu = next(n for n in graph.gs.nodes if n.op == "Relu")
    assert relu.outputs[0].shape == [1, 8, 16, 16]


def test_copy_is_independent(zoo_onnx):
    graph = load_model(zoo_onnx("tiny_resnet"))
    clone = graph.copy()
    clone.gs.nodes.clear()
    assert graph.num_nodes() == 41


class NeedsExport(torch.nn.Module):
    """symbolic_trace cannot iterate over range(proxy); torch.export specializes the static shape."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        for _ in range(x.shape[0]):
            y = y + 1
        return y


def test_fx_capture_by_symbolic_trace_keeps_modules():
    model = tiny_resnet()
    x = torch.randn(2, 3, 32, 32)
    graph = load_model(model, example_inputs=(x,))
    assert isinstance(graph, FxGraph) and graph.captured_with == "symbolic_trace"
    assert graph.op_counts()["BatchNorm2d"] == 12 and graph.op_counts()["Conv2d"] == 12
    assert graph.num_parameters() == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(graph.run({"x": x.numpy()})[0], ref, rtol=1e-6, atol=1e-6)
    graph.infer_shapes()
    out_node = next(n for n in graph.gm.graph.nodes if n.op == "output")
    assert tuple(out_node.args[0].meta["tensor_meta"].shape) == (2, 10)


def test_fx_falls_back_to_torch_export():
    model = NeedsExport().eval()
    graph = load_model(model, example_inputs=(torch.randn(1, 3, 8, 8),))
    assert graph.captured_with == "torch.export"
    x = graph.sample_inputs()
    with torch.no_grad():
        ref = model(*[torch.from_numpy(v) for v in x.values()]).numpy()
    np.testing.assert_allclose(graph.run(x)[0], ref, rtol=1e-6, atol=1e-6)


def test_fx_save_and_load_round_trip(tmp_path):
    graph = load_model(tiny_resnet(), example_inputs=(torch.randn(1, 3, 32, 32),))
    graph.save(str(tmp_path / "m.pt"))
    again = load_model(str(tmp_path / "m.pt"))
    x = graph.sample_inputs()
    np.testing.assert_array_equal(graph.run(x)[0], again.run(x)[0])
    graph.save(str(tmp_path / "m.onnx"))
    exported = load_model(str(tmp_path / "m.onnx"))
    np.testing.assert_allclose(exported.run({"x": x["x"]})[0], graph.run(x)[0], rtol=1e-4, atol=1e-5)


def test_fx_needs_example_inputs():
    with pytest.raises(UsageError, match="example inputs"):
        load_model(tiny_resnet())

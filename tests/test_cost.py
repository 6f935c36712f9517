"""Parameters and MACs per layer (graphopt.report.cost): hand-computed counts on a small ONNX graph, the same
module counted through FX and through its ONNX export, ResNet-18 against the published numbers, and the run
report's params/MACs line, JSON fields and per-layer table."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from graphopt import zoo
from graphopt.cli import main
from graphopt.ir import OnnxGraph, load_model
from graphopt.ir.fx_graph import FxGraph
from graphopt.report.cost import (
    LayerCost,
    compare_costs,
    cost_table,
    fmt_count,
    layer_costs,
    model_costs,
    total_costs,
)
from graphopt.report.run_report import cost_report, format_run, measure_costs, measure_run

RESNET18_PARAMS = 11_689_512  # torchvision resnet18
RESNET18_MACS = 1_814_073_344  # convolutions + fc at 224x224 (thop/fvcore's "1.82G" adds BN, ReLU, pooling)


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def small_graph() -> OnnxGraph:
    """x (N, 4, 8, 8) -> grouped Conv -> Relu -> ConvTranspose, and -> GlobalAveragePool -> Flatten -> Gemm and a
    MatMul by a DequantizeLinear'd int8 weight; a (N, 5, 16) -> MatMul(a, a^T) (two activations) -> Reshape."""
    rng = np.random.default_rng(0)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    inits = [
        _init("w", f32(6, 2, 3, 3)), _init("wb", f32(6)),  # Conv, group 2: Cin/groups = 2
        _init("wt", f32(6, 3, 2, 2)),  # ConvTranspose 6 -> 3, kernel 2, stride 2
        _init("wg", f32(10, 6)), _init("cg", f32(10)),  # Gemm, transB
        _init("wq", rng.integers(-127, 128, (6, 4)).astype(np.int8)), _init("sq", np.float32(0.05)),
        _init("shape", np.array([0, 25], np.int64)),  # a shape, not a weight
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "wb"], ["y"], "conv", group=2, kernel_shape=[3, 3]),
        helper.make_node("Relu", ["y"], ["r"], "relu"),
        helper.make_node("ConvTranspose", ["r", "wt"], ["up"], "deconv", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], "pool"),
        helper.make_node("Flatten", ["p"], ["flat"], "flatten"),
        helper.make_node("Gemm", ["flat", "wg", "cg"], ["z"], "fc", transB=1),
        helper.make_node("DequantizeLinear", ["wq", "sq"], ["wdq"], "dq"),
        helper.make_node("MatMul", ["flat", "wdq"], ["q"], "qmatmul"),
        helper.make_node("Transpose", ["a"], ["at"], "transpose", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["a", "at"], ["s"], "scores"),
        helper.make_node("Reshape", ["s", "shape"], ["m"], "reshape"),
    ]
    graph = helper.make_graph(
        nodes, "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8]),
         helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 5, 16])],
        [helper.make_tensor_value_info("up", TensorProto.FLOAT, ["N", 3, 12, 12]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("q", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N", 25])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return OnnxGraph.from_model(model)


def test_hand_computed_costs_on_a_small_onnx_graph():
    rows = {r.name: r for r in layer_costs(small_graph(), all_nodes=True)}
    assert "dq" not in rows  # computes from constants only: weight preprocessing, not a layer
    expected = {  # name: (params, MACs); the symbolic batch N counts as 1
        "conv": (6 * 2 * 3 * 3 + 6, 6 * 6 * 6 * (4 // 2) * 3 * 3),  # out N*6*6*6, times Cin/groups * kh * kw
        "relu": (0, 0),
        "deconv": (6 * 3 * 2 * 2, 6 * 6 * 6 * 3 * 2 * 2),  # input elements times Cout * kh * kw
        "pool": (0, 0), "flatten": (0, 0),
        "fc": (10 * 6 + 10, 10 * 6),  # (N, 10) outputs, reduction 6; the bias adds no MACs
        "qmatmul": (6 * 4, 4 * 6),  # the int8 weight's elements, through DequantizeLinear
        "transpose": (0, 0),
        "scores": (0, 5 * 5 * 16),  # activation x activation: (N, 5, 5) outputs, reduction 16
        "reshape": (0, 0),  # an int64 shape initializer is not a parameter
    }
    assert {name: (r.params, r.macs) for name, r in rows.items()} == expected
    assert rows["conv"].out_shape == ("N", 6, 6, 6) and rows["deconv"].out_shape == ("N", 3, 12, 12)
    assert [r.name for r in layer_costs(small_graph())] == ["conv", "deconv", "fc", "qmatmul", "scores"]
    layer_params, macs = total_costs(rows.values())
    assert macs == 3888 + 2592 + 60 + 24 + 400
    costs = model_costs(small_graph())
    # the model's own count: every initializer, the int64 shape (2) and the DequantizeLinear scale (1) included
    assert costs.params == layer_params + 3 == small_graph().num_parameters()
    assert costs.macs == macs


class Mixed(nn.Module):
    """Conv, grouped conv, Linear on tokens, attention's two activation x activation MatMuls, LayerNorm, and
    scaled_dot_product_attention: no BatchNorm, so FX and ONNX hold the same parameters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.gconv(torch.relu(self.conv(x))))
        t = x.flatten(2).transpose(1, 2)  # (B, 36, 8)
        scores = torch.matmul(self.q(t), self.k(t).transpose(1, 2))
        t = self.norm(torch.matmul(torch.softmax(scores, -1), t))
        t = nn.functional.scaled_dot_product_attention(t, t, t)
        return self.fc(t.mean(1))


def test_fx_and_its_onnx_export_give_the_same_totals(tmp_path):
    torch.manual_seed(0)
    module = Mixed().eval()
    x = torch.randn(2, 3, 6, 6)  # a batch of 2: MACs are per sample (a dynamic batch counts as 1), as on ONNX
    zoo.export_onnx(module, str(tmp_path / "m.onnx"), (1, 3, 6, 6), keep_bn=False)
    onnx_costs = model_costs(load_model(str(tmp_path / "m.onnx")))
    fx_costs = model_costs(FxGraph.from_module(module, (x,)))
    b, s, c = 1, 36, 8
    expected_macs = (b * 8 * 36 * 3 * 9 + b * 8 * 36 * 2 * 9  # conv, grouped conv (Cin/groups = 2)
                     + 2 * b * s * c * c  # q, k
                     + b * s * s * c + b * s * s * c  # Q K^T, P V
                     + b * s * s * (c + c)  # scaled_dot_product_attention: both products
                     + b * 4 * c)  # fc
    assert fx_costs.macs == onnx_costs.macs == expected_macs
    assert fx_costs.params == onnx_costs.params == sum(p.numel() for p in module.parameters())
    program = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    exported = FxGraph(program.module(), (x,), "torch.export")  # ATen-level nodes, exported at batch 2
    assert (model_costs(exported).params, model_costs(exported).macs) == (fx_costs.params, fx_costs.macs)
    by_name = {r.name: r for r in fx_costs.layers}
    assert by_name["gconv"].params == 8 * 2 * 9 + 8 and by_name["gconv"].op == "Conv2d"
    assert by_name["q"].params == 72 and by_name["norm"].params == 16 and by_name["norm"].macs == 0


def test_batchnorm_costs_no_macs_and_its_parameters_are_counted(zoo_onnx):
    module = zoo.tiny_resnet()
    bn_channels = sum(m.num_features for m in module.modules() if isinstance(m, nn.BatchNorm2d))
    fx_costs = model_costs(FxGraph.from_module(module, (torch.randn(1, 3, 32, 32),)))
    kept = model_costs(load_model(zoo_onnx("tiny_resnet", keep_bn=True)))
    folded = model_costs(load_model(zoo_onnx("tiny_resnet", keep_bn=False)))
    assert fx_costs.macs == kept.macs == folded.macs
    bn = [r for r in kept.layers if r.op == "BatchNormalization"]
    assert bn and all(r.macs == 0 for r in bn) and sum(r.params for r in bn) == 4 * bn_channels
    # FX counts gamma and beta (the running statistics are buffers); ONNX keeps all four as initializers;
    # folded, each BatchNorm leaves one bias per channel
    assert kept.params == fx_costs.params + 2 * bn_channels
    assert folded.params == fx_costs.params - bn_channels


@pytest.mark.slow
def test_resnet18_like_matches_torchvision_resnet18(zoo_onnx, tmp_path):
    module = zoo.resnet18_like()
    fx_costs = model_costs(FxGraph.from_module(module, (torch.randn(1, 3, 224, 224),)))
    assert (fx_costs.params, fx_costs.macs) == (RESNET18_PARAMS, RESNET18_MACS)
    assert fmt_count(fx_costs.macs) == "1.81G"
    onnx_costs = model_costs(load_model(zoo_onnx("resnet18_like")))
    assert onnx_costs.macs == RESNET18_MACS
    conv1 = next(r for r in onnx_costs.layers if r.op == "Conv")
    assert (conv1.params, conv1.macs, conv1.out_shape) == (64 * 3 * 7 * 7, 64 * 112 * 112 * 3 * 49, (1, 64, 112, 112))
    dynamic = str(tmp_path / "dynamic.onnx")  # a symbolic batch counts as 1
    zoo.export_onnx(module, dynamic, (1, 3, 224, 224), keep_bn=False, dynamic_batch=True)
    assert model_costs(load_model(dynamic)).macs == RESNET18_MACS


def test_compare_costs_matches_by_name_and_the_table_shows_the_biggest_changes_first():
    before = [LayerCost("a", "Conv", 100, 1000), LayerCost("bn", "BatchNormalization", 8, 0),
              LayerCost("b", "Conv", 50, 400), LayerCost("c", "Gemm", 10, 10)]
    after = [LayerCost("a", "Conv", 50, 500), LayerCost("b", "Conv", 25, 100), LayerCost("c", "Gemm", 10, 10),
             LayerCost("new", "MatMul", 4, 4)]
    rows = compare_costs(before, after)
    assert [(r.name, r.status) for r in rows] == [("a", "kept"), ("bn", "removed"), ("b", "kept"), ("c", "kept"),
                                                  ("new", "added")]
    assert (rows[1].params_after, rows[1].macs_after) == (0, 0) and rows[4].params_before == 0
    assert not rows[3].changed and rows[0].to_dict()["macs"] == {"before": 1000, "after": 500}
    table = cost_table(rows, top=3).splitlines()
    assert table[0].split() == ["layer", "op", "params", "before", "after", "MACs", "before", "after", "MACs"]
    assert [line.split()[0] for line in table[2:]] == ["a", "b", "new"]  # MACs change 500, 300, 4; bn's 0 next
    assert table[2].split()[-1] == "0.50x" and table[4].split()[-1] == "added"
    assert len(cost_table(rows, top=None).splitlines()) == 2 + 4  # the unchanged layer is never shown
    assert (fmt_count(1_814_073_344), fmt_count(57_802_752), fmt_count(960), fmt_count(4.9e8, 1e9)) == (
        "1.81G", "57.80M", "960", "0.49G")


def test_run_report_line_json_and_table_after_a_structural_change(tmp_path):
    from graphopt.zoo.cnn import BasicBlock, ResNet

    wide, narrow = str(tmp_path / "wide.onnx"), str(tmp_path / "narrow.onnx")
    zoo.export_onnx(zoo.tiny_resnet(), wide, (1, 3, 32, 32), keep_bn=False)
    torch.manual_seed(0)  # the same network at half the width: what channel pruning leaves, same layer names
    zoo.export_onnx(ResNet(BasicBlock, [1, 1, 1, 1], 10, width=4).eval(), narrow, (1, 3, 32, 32), keep_bn=False)
    report = measure_run(wide, narrow, None, top=3)
    before, after = model_costs(load_model(wide)), model_costs(load_model(narrow))
    assert report["params"] == {"before": before.params, "after": after.params}
    assert report["macs"] == {"before": before.macs, "after": after.macs} and after.macs < before.macs
    text = format_run(report).splitlines()
    assert text[0].startswith("size: ")
    assert text[1] == (f"params: {before.params:,} -> {after.params:,} ({after.params / before.params:.2f}x); "
                       f"MACs: {fmt_count(before.macs)} -> {fmt_count(after.macs)} ({after.macs / before.macs:.2f}x)")
    assert text[2].startswith("params and MACs per layer, biggest change first (3 of ")
    assert text[5].split()[:2] == ["/conv1/Conv", "Conv"] and len(text) == 8  # the stem conv: most MACs removed
    layers = json.loads(json.dumps(report["layers"]))  # in the JSON as is
    assert layers[0]["name"] == "/conv1/Conv" and layers[0]["params"]["after"] < layers[0]["params"]["before"]


def test_counting_failure_is_one_line_not_a_failed_run():
    class Broken:
        ir = "nonsense"

        def num_parameters(self):
            return 0

    reason = measure_costs(Broken())
    assert isinstance(reason, str) and "nonsense" in reason
    assert format_run(cost_report(reason, reason)) == f"params/MACs: not counted ({reason})"


def test_cli_run_reports_params_and_macs(tmp_path, zoo_onnx, capsys):
    path = tmp_path / "m.onnx"
    shutil.copy(zoo_onnx("tiny_resnet"), path)
    assert main(["run", str(path), "--passes", "fold", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["params"] == {"before": report["input"]["parameters"], "after": report["output"]["parameters"]}
    assert report["macs"]["before"] == report["macs"]["after"] > 0  # folding BatchNorm removes no MACs
    line = next(li for li in out.splitlines() if li.startswith("params: "))
    assert line.endswith(f"MACs: {fmt_count(report['macs']['before'])} -> {fmt_count(report['macs']['after'])} "
                         "(1.00x)")
    removed = [r for r in report["layers"] if r["status"] == "removed"]
    assert len(removed) == 12 and {r["op"] for r in removed} == {"BatchNormalization"}
    assert "params and MACs per layer" not in out  # parameters moved into conv biases: nothing structural


def test_cli_run_on_a_pytorch_file_reports_params_and_macs(tmp_path, capsys):
    program = torch.export.export(zoo.tiny_resnet().eval(), (torch.randn(1, 3, 32, 32),))
    torch.export.save(program, tmp_path / "m.pt2")  # a whole program: it keeps its example inputs
    assert main(["run", str(tmp_path / "m.pt2"), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["params"]["after"] == report["output"]["parameters"] and report["macs"]["after"] > 0
    assert report["macs"]["before"] == report["macs"]["after"]
    assert "params: " in capsys.readouterr().out


def test_sizes_computed_from_shape_ops_are_resolved(tmp_path):
    """torch's export of ``chunk`` computes the split point from Shape ops; shape inference alone leaves the
    branches' sizes symbolic (counted as 1). With static inputs the counter folds a copy and infers again."""
    path = str(tmp_path / "shufflenet.onnx")
    zoo.export_onnx(zoo.shufflenet_v2_like(), path, (1, 3, 64, 64))
    graph = OnnxGraph.load(path)
    nodes = len(graph.gs.nodes)
    fx = FxGraph.from_module(zoo.shufflenet_v2_like(), (torch.randn(1, 3, 64, 64),))
    assert model_costs(graph).macs == model_costs(fx).macs
    assert len(graph.gs.nodes) == nodes  # the graph counted is not changed


def test_macs_say_which_dynamic_dims_they_count_at_one():
    """A dynamic sequence length cannot be resolved by shape inference: the MACs count it as 1, and the run's line
    and JSON say so (a BERT-like model read 102.85K MACs, its figure at sequence 1, with nothing to say why)."""
    w = numpy_helper.from_array(np.ones((16, 16), np.float32), "w")

    def model(dims):
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
        return OnnxGraph.from_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))

    dynamic, static = measure_costs(model(["batch", "seq", 16])), measure_costs(model(["batch", 8, 16]))
    assert dynamic.dims_at_one == ["seq"] and dynamic.macs == 256  # 1 x 16 x 16
    assert static.dims_at_one == [] and static.macs == 8 * 256
    report = cost_report(dynamic, dynamic)
    assert report["macs"]["dims_at_one"] == ["seq"]
    assert "at seq = 1" in format_run(report)
    assert "dims_at_one" not in cost_report(static, static)["macs"]

"""int8 on the PyTorch route: the FX versions of insert-observers / calibrate / place-qdq, placing the backend's
scheme on an ATen graph (graphopt.pt2e.quantizer) and converting with torchao's PT2E."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import graphopt
from graphopt import zoo
from graphopt.errors import UsageError
from graphopt.ir.fx_graph import FxGraph
from graphopt.numeric import sqnr_db
from graphopt.pt2e.quantizer import plan

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")


class SharedRelu(nn.Module):
    """One nn.ReLU module called three times, a residual Add, a max pool: the torchvision pattern on which torchao's
    X86InductorQuantizer fails ("Input partition has more than one output node")."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = self.relu(self.stem(x))
        y = self.conv2(self.relu(self.bn1(self.conv1(x))))
        x = self.pool(self.relu(x + y))
        return self.fc(torch.flatten(x, 1))


def _model():
    torch.manual_seed(0)
    m = SharedRelu().eval()
    m.bn1.running_mean.uniform_(-0.1, 0.1)
    m.bn1.running_var.uniform_(0.5, 2.0)
    return m


def _calib(n=64):
    return {"x": np.random.default_rng(0).standard_normal((n, 3, 8, 8)).astype(np.float32)}


def _aten(model, example=None):
    graph = FxGraph.from_module(model, (example if example is not None else torch.randn(1, 3, 8, 8),)).aten()
    from graphopt.pt2e.prepare import fold_batch_norms

    fold_batch_norms(graph.gm)
    return graph


def _scheme(registry, backend):
    return registry.backends[backend].scheme()


def _by_name(gm):
    return {n.name: n for n in gm.graph.nodes}


def test_x86_placement_quantizes_the_inputs_of_int8_ops_and_fuses_the_residual_add(registry):
    graph = _aten(_model())
    p = plan(graph.gm, _scheme(registry, "x86"))
    edges = {(a.name, b.name) for a, b in p.inputs}
    nodes = _by_name(graph.gm)
    convs = [n for n in graph.gm.graph.nodes if "conv2d" in n.name]
    assert len(convs) == 3 and all(n in p.weights for n in convs) and nodes["linear"] in p.weights
    add = nodes["add"]
    # the Add reads conv2 (fused as oneDNN's sum post-op): only its residual input, the stem's relu, is quantized
    assert [(a.name, b) for a, b in p.inputs if b is add] == [(add.args[0].name, add)]
    assert add.args[1].op == "call_function" and (add.args[1].name, "add") not in edges
    assert not p.outputs  # x86: outputs quantized only where an int8 op reads them
    assert nodes["max_pool2d"] in p.shared and nodes["flatten"] in p.shared  # passthrough before the Linear
    assert all(axis == 0 for _, axis in p.weights.values())


def test_onnxruntime_placement_quantizes_both_add_inputs_and_requantizes_outputs(registry):
    graph = _aten(_model())
    p = plan(graph.gm, _scheme(registry, "onnxruntime"))
    add = _by_name(graph.gm)["add"]
    assert {a.name for a, b in p.inputs if b is add} == {a.name for a in add.args}
    assert {n.name for n in p.outputs} >= {"relu", "add" if "add" in {n.name for n in p.outputs} else "relu_2"}


def test_exclusions_by_module_path_and_first_layer(registry):
    graph = _aten(_model())
    scheme = _scheme(registry, "x86")
    p = plan(graph.gm, scheme, exclude=("conv1",), keep_first=True)
    names = {n.name for n in p.weights}
    assert names == {"conv2d_2", "linear"}, names
    assert p.left_float["Conv"] == 2


def test_shared_relu_module_quantizes_and_lowers_to_onednn_int8_kernels(registry):
    """The whole FX int8 pipeline on a model reusing one nn.ReLU: the Q/DQ graph matches the float model within
    30 dB and inductor's x86 lowering (its freezing passes) turns every conv and the Linear into oneDNN int8 kernels,
    the residual Add fused into its conv. (That the compiled kernels compute the Q/DQ graph's values is the x86
    backend's test.)"""
    from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86

    model = _model()
    x = torch.from_numpy(_calib(8)["x"])
    result = graphopt.optimize(model, "fold,int8", example_inputs=(x[:1],), calibration=_calib(), backend="x86")
    stats = result.report.records[-1].stats
    assert stats["quantized weights"] == 4 and stats["quantized nodes"] == 5
    with torch.no_grad():
        ref, q = model(x).numpy(), result.model(x).numpy()
    assert sqnr_db(ref, q) >= 30
    lowered = lower_pt2e_quantized_to_x86(result.model, (x,))
    ops = [str(n.target) for n in lowered.graph.nodes if n.op == "call_function"]
    assert sum("onednn.qconv" in o for o in ops) == 3 and sum("onednn.qlinear" in o for o in ops) == 1
    assert any("qconv2d_pointwise.binary" in o for o in ops)  # conv + add (+ relu) in one kernel


def test_fx_int8_on_digits_keeps_accuracy_and_exports_to_onnxruntime(digits_trained, tmp_path):
    """Real data: the digits CNN, int8 in onnxruntime's scheme on the FX route, within 1 point of fp32; saved as
    .onnx (QuantizeLinear / DequantizeLinear), onnxruntime runs it within 30 dB of the torch int8 model."""
    import onnx
    import onnxruntime as ort

    model, (x_train, _, x_test, y_test) = digits_trained
    result = graphopt.optimize(model, "fold,int8", example_inputs=(torch.from_numpy(x_test[:1]),),
                               calibration=x_train[:256], backend="onnxruntime")
    with torch.no_grad():
        fp32 = model(torch.from_numpy(x_test)).numpy()
        int8 = result.model(torch.from_numpy(x_test)).numpy()
    assert zoo.accuracy(int8, y_test) >= zoo.accuracy(fp32, y_test) - 0.01
    path = str(tmp_path / "digits.int8.onnx")
    result.save(path)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    session = ort.InferenceSession(path)
    out = session.run(None, {session.get_inputs()[0].name: x_test})[0]  # any batch: the batch dim stayed dynamic
    assert sqnr_db(int8, out) >= 30


def test_fx_and_onnx_int8_routes_agree(registry, tmp_path):
    """The same model quantized on the ONNX route and on the FX route, both in onnxruntime's scheme and on the same
    calibration data: their outputs agree within 25 dB (the two placements differ only where the graphs do)."""
    model = _model()
    x = torch.from_numpy(_calib(16)["x"])
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(model, (x[:1],), path, input_names=["x"], dynamic_axes={"x": {0: "n"}}, dynamo=False)
    onnx_q = graphopt.optimize(path, "fold,int8", calibration=_calib(), backend="onnxruntime")
    fx_q = graphopt.optimize(model, "fold,int8", example_inputs=(x[:1],), calibration=_calib(), backend="onnxruntime")
    onnx_out = onnx_q.graph.run({"x": x.numpy()})[0]
    with torch.no_grad():
        fx_out = fx_q.model(x).numpy()
    assert sqnr_db(onnx_out, fx_out) >= 25


def test_ops_without_an_int8_kernel_on_x86_are_refused(registry):
    with pytest.raises(UsageError, match="no int8 kernel for MatMul"):
        graphopt.optimize(_model(), "insert-observers,calibrate,place-qdq:ops=MatMul", backend="x86",
                          example_inputs=(torch.randn(1, 3, 8, 8),), calibration=_calib())


def test_torchao_missing_is_one_clear_error(monkeypatch):
    import builtins

    import graphopt.pt2e.torchao as ta
    from graphopt.errors import UnsupportedError

    real = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'", name="torchao")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(ta, "_PT2E", None)
    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(UnsupportedError, match=r"needs torchao .*pip install 'graphopt\[torch\]'"):
        ta.pt2e()


@torch.fx.wrap
def _sign_flip(x):
    return x if bool(x.sum() > 0) else -x  # data-dependent control flow: torch.export cannot capture it


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return _sign_flip(self.conv(x))


def test_a_module_torch_export_cannot_capture_is_one_clear_error(tmp_path):
    from graphopt.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match=r"torch.export cannot capture the module: .*make data-dependent"):
        graphopt.optimize(DataDependent().eval(), "int8", backend="x86", example_inputs=(torch.randn(1, 3, 8, 8),),
                          calibration=_calib(8), output=str(tmp_path / "m.pt2"))
    assert not list(tmp_path.iterdir())


def test_per_layer_sqnr_on_fx_matches_tensors_by_node_name(registry):
    """The float ATen graph (as insert-observers leaves it) against its int8 graph: every conv and relu is
    compared, a quantized tensor after its Q/DQ; the weakest layer is above 25 dB, and the table is sorted."""
    from graphopt.passes.instruments import Instrument
    from graphopt.report.metrics import per_layer_sqnr

    kept = {}

    class KeepFloat(Instrument):
        def after_pass(self, pass_, result, record, ctx):
            if pass_.name == "insert-observers":
                kept["float"] = result.graph.copy()

    model = _model()
    result = graphopt.optimize(model, "int8", backend="x86", example_inputs=(torch.randn(1, 3, 8, 8),),
                               calibration=_calib(), instruments=[KeepFloat()])
    data = _calib(32)["x"]
    table = per_layer_sqnr(kept["float"], result.graph, [{"x": data[:16]}, {"x": data[16:]}])
    names = {r.tensor: r for r in table.rows}
    assert {"conv2d", "conv2d_1", "conv2d_2", "relu", "linear"} <= set(names)
    assert names["relu"].other != "relu"  # the stem's relu is quantized: compared after its Q/DQ
    assert names["conv2d_2"].other == "conv2d_2"  # fused into the residual add: float output
    assert table.samples == 32 and not table.unmatched
    sqnrs = [r.sqnr_db for r in table.rows]
    assert sqnrs == sorted(sqnrs) and min(sqnrs) > 25


def test_cli_int8_on_a_static_batch_program_is_checked_and_counted(tmp_path, digits_trained):
    """A torch.export program saved at batch 2 (a user's export, static shapes) through `graphopt run --passes
    fold,int8 --calib --eval`: calibration reads batches of 2, the numeric check compares on the first 2 evaluation
    samples instead of giving up, and the parameter count keeps the int8 weights (ONNX's initializer count)."""
    from graphopt.cli import main

    model, (x_train, _, x_test, y_test) = digits_trained
    torch.export.save(torch.export.export(model, (torch.from_numpy(x_test[:2]),)), str(tmp_path / "m.pt2"))
    np.savez(tmp_path / "calib.npz", x=x_train[:64])
    np.savez(tmp_path / "eval.npz", x=x_test[:64], labels=y_test[:64])
    out, report = tmp_path / "m.int8.pt2", tmp_path / "r.json"
    code = main(["run", str(tmp_path / "m.pt2"), "--passes", "fold,int8", "--calib", str(tmp_path / "calib.npz"),
                 "--eval", str(tmp_path / "eval.npz"), "-o", str(out), "--json", str(report), "-q"])
    assert code == 0 and out.exists()
    import json

    data = json.loads(report.read_text())
    numeric = data["checks"]["numeric"]
    assert numeric["compared"] and "the first 2" in numeric["inputs"]
    assert numeric["comparisons"][-1]["sqnr_db"] > 25
    before, after = data["input"]["parameters"], data["output"]["parameters"]
    assert 0.95 * before < after < 1.05 * before, (before, after)


def test_cli_eval_on_a_pytorch_model_prints_the_per_layer_table(tmp_path, capsys):
    """`graphopt run m.pt2 --passes fold,int8 --eval e.npz` on a backend that runs PyTorch models (here torch's
    eager x86 engine, which needs no compile): accuracy before/after and the per-layer SQNR table, FX node by
    node, worst first, as on ONNX."""
    import json

    from graphopt.cli import main

    model = _model()
    x = _calib(64)["x"]
    torch.export.save(torch.export.export(model, (torch.from_numpy(x[:2]),)), str(tmp_path / "m.pt2"))
    np.savez(tmp_path / "calib.npz", x=x)
    labels = model(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(tmp_path / "eval.npz", x=x, labels=labels)
    report = tmp_path / "r.json"
    code = main(["run", str(tmp_path / "m.pt2"), "--passes", "fold,int8", "--backend", "x86-fx-x86",
                 "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"),
                 "-o", str(tmp_path / "m.int8.pt2"), "--json", str(report)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "per-layer SQNR, worst first" in printed
    layers = json.loads(report.read_text())["comparison"]["per_layer"]["layers"]
    names = {layer["tensor"] for layer in layers}
    assert {"conv2d", "relu", "linear"} <= names and layers[0]["sqnr_db"] <= layers[-1]["sqnr_db"]


def test_a_fusion_torch_cannot_do_is_one_line_and_fold_first_works():
    """torch's conv + BatchNorm weight fusion (torchao's, in prepare_pt2e) breaks on a grouped ConvTranspose: a clear
    UnsupportedError saying what works — graphopt's own fold first."""
    from graphopt.errors import UnsupportedError

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.ConvTranspose2d(16, 8, 3, padding=1, groups=2), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU()).eval()
    x = torch.randn(8, 16, 6, 6)
    for passes in ("int8", "int8-dynamic"):
        with pytest.raises(UnsupportedError, match="run 'fold' first"):
            graphopt.optimize(model, passes, example_inputs=(x[:1],), calibration=x, backend="x86")
    result = graphopt.optimize(model, "fold,int8", example_inputs=(x[:1],), calibration=x, backend="x86")
    assert result.report.checks["numeric"]["compared"]

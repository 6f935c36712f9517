"""sparsify (magnitude) and sparsify-2-4: the zeros on tiny_resnet, scopes and options, shared weights, FX, CLI."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from graphopt_plugins.sparsify_2_4 import Sparsify24
from graphopt_plugins.sparsify_magnitude import SPARSIFIED, ZEROED, SparsifyMagnitude
from onnx import numpy_helper
from torch import nn

import graphopt
from graphopt.cli import main
from graphopt.errors import PipelineError
from graphopt.ir import OnnxGraph
from graphopt.passes.base import PassContext

CONVS = 12  # tiny_resnet: 12 Conv (the first on 3 input channels), then the classifier Gemm /fc/Gemm
X = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)


# -- helpers --------------------------------------------------------------------------------------------------------
def optimize(model, passes, registry, **kwargs):
    """The optimized model, the pass's record and the context (whose state holds the sparsity rows)."""
    ctx = PassContext(registry=registry)
    result = graphopt.optimize(model, passes, check=False, registry=registry, ctx=ctx, **kwargs)
    return result, result.report.records[-1], ctx


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def weight_names(model: onnx.ModelProto) -> dict[str, str]:
    return {n.name or n.output[0]: n.input[1] for n in model.graph.node if len(n.input) > 1}


def outputs(model: onnx.ModelProto) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: X})[0]


def assert_smallest_zeroed(before: np.ndarray, after: np.ndarray) -> None:
    """The zeros of ``after`` are the smallest |w| of ``before``; every other weight is unchanged."""
    zero = after == 0
    assert np.array_equal(after[~zero], before[~zero])
    assert np.abs(before[zero]).max() <= np.abs(before[~zero]).min()


def groups_of_4(w: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(w, axis, -1)
    return moved.reshape(-1, 4)


def assert_2_4(before: np.ndarray, after: np.ndarray, axis: int) -> None:
    """Exactly the 2 largest |w| of every 4 along ``axis`` are kept, unchanged."""
    b, a = groups_of_4(before, axis), groups_of_4(after, axis)
    kept = a != 0
    assert (kept.sum(axis=1) == 2).all()
    assert np.array_equal(a[kept], b[kept])
    mags = np.abs(b)
    assert (np.where(kept, mags, np.inf).min(axis=1) >= np.where(kept, -np.inf, mags).max(axis=1)).all()


def model_from(body: str, inputs: str, outputs_: str, **weights) -> onnx.ModelProto:
    model = onnx.parser.parse_model(
        f'<ir_version: 8, opset_import: ["" : 17]>\ng ({inputs}) => ({outputs_}) {{\n{body}\n}}')
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(zoo_onnx):
    return zoo_onnx("tiny_resnet")


# -- magnitude on ONNX ----------------------------------------------------------------------------------------------
def test_layer_scope_zeroes_the_smallest_half_of_every_layer(tiny, registry):
    result, record, ctx = optimize(tiny, "sparsify:sparsity=0.5", registry)
    original = onnx.load(tiny)
    before, after, weight = inits(original), inits(result.model), weight_names(result.model)
    rows = ctx.state["sparsity"]
    assert len(rows) == CONVS and all(r["op"] == "Conv" for r in rows) and "/fc/Gemm" not in [r["layer"] for r in rows]
    for row in rows:
        w0, w1 = before[weight[row["layer"]]], after[weight[row["layer"]]]
        zeros = int(np.count_nonzero(w1 == 0))
        assert abs(zeros - 0.5 * w0.size) <= 1
        assert row == {"layer": row["layer"], "op": "Conv", "params": w0.size, "zeros_before": 0,
                       "zeros_after": zeros, "sparsity": zeros / w0.size}
        assert_smallest_zeroed(w0, w1)
    assert set(after) == set(before)  # written into the existing initializers: no new names
    sparsified = {weight[r["layer"]] for r in rows}
    for name in set(before) - sparsified:  # biases, the classifier, everything else: untouched
        assert np.array_equal(before[name], after[name]), name
    assert record.modified and record.stats == {SPARSIFIED: CONVS, ZEROED: sum(r["zeros_after"] for r in rows)}
    assert "/conv1/Conv: 50.0% zeros" in record.notes
    assert any(n.startswith("left dense, the classifier") and n.endswith(": /fc/Gemm") for n in record.notes)
    y0, y1 = outputs(original), outputs(result.model)
    assert y1.shape == y0.shape and np.isfinite(y1).all() and not np.allclose(y0, y1)


def test_global_scope_one_threshold_over_all_layers(tiny, registry):
    result, record, ctx = optimize(tiny, "sparsify:sparsity=0.7:scope=global", registry)
    before, after, weight = inits(onnx.load(tiny)), inits(result.model), weight_names(result.model)
    rows = ctx.state["sparsity"]
    w0 = np.concatenate([before[weight[r["layer"]]].ravel() for r in rows])
    w1 = np.concatenate([after[weight[r["layer"]]].ravel() for r in rows])
    assert abs(np.count_nonzero(w1 == 0) - 0.7 * w0.size) <= 1
    assert_smallest_zeroed(w0, w1)
    assert len({round(r["sparsity"], 3) for r in rows}) > 1  # per layer it varies
    assert np.array_equal(before["fc.weight"], after["fc.weight"])
    assert outputs(result.model).shape == (1, 10)


@pytest.mark.parametrize("passes", ["sparsify:sparsity=0.5", "sparsify:sparsity=0.6:scope=global", "sparsify-2-4",
                                    "sparsify:sparsity=0.3:include_classifier=true"])
def test_second_run_changes_nothing(tiny, registry, passes):
    first, record, _ = optimize(tiny, passes, registry)
    assert record.modified
    again, record, ctx = optimize(first.model, passes, registry)
    assert not record.modified and record.stats == {}
    assert all(r["zeros_before"] == r["zeros_after"] for r in ctx.state["sparsity"])
    before, after = inits(first.model), inits(again.model)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_sparsity_zero_changes_nothing(tiny, registry):
    result, record, ctx = optimize(tiny, "sparsify:sparsity=0", registry)
    assert not record.modified and record.stats == {}
    assert all(r["zeros_after"] == 0 for r in ctx.state["sparsity"])
    assert np.array_equal(outputs(result.model), outputs(onnx.load(tiny)))


def test_classifier_ignore_and_min_params(tiny, registry):
    _, record, ctx = optimize(tiny, "sparsify:include_classifier=true", registry)
    fc = [r for r in ctx.state["sparsity"] if r["layer"] == "/fc/Gemm"]
    assert fc and fc[0]["zeros_after"] == 320 and fc[0]["op"] == "Gemm"

    # a node-name scope, a weight name's module path, and an item that matches nothing (warned)
    _, record, ctx = optimize(tiny, "sparsify:ignore=/layer1+layer4.0.conv2+nothing", registry)
    layers = [r["layer"] for r in ctx.state["sparsity"]]
    assert len(layers) == CONVS - 3 and not [n for n in layers if n.startswith("/layer1/") or "layer4.0/conv2" in n]
    assert "left dense, in ignore: /layer1/layer1.0/conv1/Conv, /layer1/layer1.0/conv2/Conv, " \
           "/layer4/layer4.0/conv2/Conv" in record.notes
    assert any("ignore matches no layer: nothing" in w for w in ctx.warnings)

    # globs, from Python (the pipeline text has no '*')
    pass_ = SparsifyMagnitude(SparsifyMagnitude.Options(ignore=("*downsample*",)))
    ctx = PassContext()
    pass_(OnnxGraph.load(tiny), ctx)
    layers = [r["layer"] for r in ctx.state["sparsity"]]
    assert len(layers) == CONVS - 3 and not any("downsample" in n for n in layers)

    _, record, ctx = optimize(tiny, "sparsify:min_params=600", registry)  # 8x8x3x3 = 576, 16x8 = 128, 32x16 = 512
    assert len(ctx.state["sparsity"]) == CONVS - 4
    assert any(n.startswith("left dense, under min_params=600 weights: /layer1/layer1.0/conv1/Conv")
               for n in record.notes)


@pytest.mark.parametrize("options, message", [
    ("sparsity=1", "sparsity must be at least 0 and below 1"), ("sparsity=-0.1", "sparsity must be at least 0"),
    ("scope=model", "expects one of layer, global"), ("min_params=-1", "min_params must be 0 or more"),
])
def test_options_are_validated(registry, options, message):
    with pytest.raises(PipelineError, match=message):
        graphopt.passes.resolve(f"sparsify:{options}", registry)


# -- 2:4 on ONNX -------------------------------------------------------------------------------------------------------
def test_2_4_keeps_the_two_largest_of_every_four_input_channels(tiny, registry):
    result, record, ctx = optimize(tiny, "sparsify-2-4", registry)
    original = onnx.load(tiny)
    before, after, weight = inits(original), inits(result.model), weight_names(result.model)
    rows = ctx.state["sparsity"]
    assert len(rows) == CONVS - 1 and all(r["sparsity"] == 0.5 for r in rows)  # /conv1/Conv: 3 input channels
    for row in rows:
        assert_2_4(before[weight[row["layer"]]], after[weight[row["layer"]]], axis=1)
    for name in ("conv1.weight", "fc.weight"):
        assert np.array_equal(before[name], after[name])
    assert "left dense, reduction dimension not a multiple of 4: /conv1/Conv" in record.notes
    assert record.stats == {SPARSIFIED: CONVS - 1, ZEROED: sum(r["zeros_after"] for r in rows)}
    assert outputs(result.model).shape == outputs(original).shape


def test_2_4_axis_of_gemm_and_matmul(registry):
    w = {"W1": rand(8, 12, seed=1), "W2": rand(8, 12, seed=2), "W3": rand(8, 6, seed=3), "W4": rand(6, 3, seed=4)}
    model = model_from("""
        a = MatMul(x, W1)
        ra = Relu(a)
        b = Gemm <transB = 1> (ra, W2)
        rb = Relu(b)
        c = Gemm (rb, W3)
        rc = Relu(c)
        y = MatMul(rc, W4)""", "float[2, 8] x", "float[2, 3] y", **w)
    result, record, ctx = optimize(model, "sparsify-2-4:include_classifier=true", registry)
    after = inits(result.model)
    assert [r["layer"] for r in ctx.state["sparsity"]] == ["a", "b", "c"]
    assert_2_4(w["W1"], after["W1"], axis=0)  # MatMul B (K, N): along K
    assert_2_4(w["W2"], after["W2"], axis=1)  # Gemm transB B (N, K): along K
    assert_2_4(w["W3"], after["W3"], axis=0)  # Gemm B (K, N)
    assert np.array_equal(w["W4"], after["W4"]) and "left dense, reduction dimension not a multiple of 4: y" \
        in record.notes  # K = 6


# -- shared and Constant-node weights (ONNX) --------------------------------------------------------------------------
SHARED = """
    a = MatMul(x, W)
    b = MatMul(a, W)
    y = MatMul(b, W)"""


def test_shared_weight_is_sparsified_once(registry):
    w = rand(8, 8)
    model = model_from(SHARED, "float[2, 8] x", "float[2, 8] y", W=w)
    result, record, ctx = optimize(model, "sparsify:include_classifier=true", registry)
    assert ctx.state["sparsity"] == [{"layer": "a+b+y", "op": "MatMul", "params": 64, "zeros_before": 0,
                                      "zeros_after": 32, "sparsity": 0.5}]
    assert list(inits(result.model)) == ["W"]  # in place: one weight, its name kept
    assert_smallest_zeroed(w, inits(result.model)["W"])


def test_shared_weight_also_read_densely_gets_a_copy(registry):
    w = rand(8, 8)
    model = model_from(SHARED, "float[2, 8] x", "float[2, 8] y", W=w)
    result, record, ctx = optimize(model, "sparsify", registry)  # y is the classifier: it keeps W dense
    assert [r["layer"] for r in ctx.state["sparsity"]] == ["a+b"]
    after = inits(result.model)
    assert np.array_equal(after["W"], w) and np.count_nonzero(after["W_sparse"] == 0) == 32
    reads = {n.output[0]: n.input[1] for n in result.model.graph.node}
    assert reads == {"a": "W_sparse", "b": "W_sparse", "y": "W"}
    again, record, _ = optimize(result.model, "sparsify", registry)
    assert not record.modified


def test_constant_node_weight_becomes_an_initializer_of_its_name(registry):
    w = np.float32(rand(8, 8, seed=5).round(3))
    model = model_from(f"""
        C = Constant <value = float[8, 8] {{{", ".join(map(str, w.ravel()))}}}> ()
        a = MatMul(x, C)
        r = Relu(a)
        y = MatMul(r, W)""", "float[2, 8] x", "float[2, 4] y", W=rand(8, 4))
    result, record, ctx = optimize(model, "sparsify", registry)
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Relu", "MatMul"]
    assert_smallest_zeroed(w, inits(result.model)["C"])
    assert np.count_nonzero(inits(result.model)["C"] == 0) == 32


# -- FX ----------------------------------------------------------------------------------------------------------------
class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2)  # weight (8, 4, 2, 2): along axis 0, 4 per group
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        y = torch.relu(self.up(torch.relu(self.conv(x))))
        return self.fc2(torch.relu(self.fc1(y.mean((2, 3)))))


def fx_weights(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("passes", ["sparsify:sparsity=0.5", "sparsify-2-4"])
def test_fx_module(registry, passes):
    module, x = Small().eval(), torch.randn(2, 4, 6, 6)
    before = fx_weights(module)
    result, record, ctx = optimize(module, passes, registry, example_inputs=(x,))
    gm = result.model
    after = fx_weights(gm)
    assert [r["layer"] for r in ctx.state["sparsity"]] == ["conv", "up", "fc1"]
    assert [r["op"] for r in ctx.state["sparsity"]] == ["Conv2d", "ConvTranspose2d", "Linear"]
    assert record.stats[SPARSIFIED] == 3
    for name in ("conv", "up", "fc1"):
        w0, w1 = before[f"{name}.weight"], after[f"{name}.weight"]
        if passes == "sparsify-2-4":
            assert_2_4(w0, w1, axis=0 if name == "up" else 1)
        else:
            assert np.count_nonzero(w1 == 0) == w0.size // 2
            assert_smallest_zeroed(w0, w1)
    for name in before:
        if not name.endswith("weight") or name.startswith("fc2"):  # biases and the classifier
            assert np.array_equal(before[name], after[name]), name
    assert fx_weights(module).keys() == before.keys() and all(np.array_equal(before[k], fx_weights(module)[k])
                                                              for k in before)  # the caller's module untouched
    with torch.no_grad():
        assert gm(x).shape == (2, 5)
    again, record, _ = optimize(gm, passes, registry, example_inputs=(x,))
    assert not record.modified


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def test_fx_tied_weights(registry):
    x = torch.randn(2, 8)
    result, record, ctx = optimize(Tied(), "sparsify", registry, example_inputs=(x,))
    gm = result.model
    assert [r["layer"] for r in ctx.state["sparsity"]] == ["a+b"] and ctx.state["sparsity"][0]["zeros_after"] == 32
    assert gm.a.weight is gm.b.weight and int((gm.a.weight == 0).sum()) == 32

    result, record, ctx = optimize(Tied(), "sparsify:ignore=b", registry, example_inputs=(x,))
    gm = result.model
    assert gm.a.weight is not gm.b.weight  # a gets its own sparse copy; b keeps the dense weight
    assert int((gm.a.weight == 0).sum()) == 32 and int((gm.b.weight == 0).sum()) == 0
    assert torch.equal(gm.b.weight, Tied().b.weight)


class Functional(nn.Module):
    """F.conv2d / F.linear on parameters: call_function nodes reading get_attr weights (as torch.export's ATen
    conv / linear calls do)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.conv_w, self.conv_b = nn.Parameter(torch.randn(8, 4, 3, 3)), nn.Parameter(torch.randn(8))
        self.fc = nn.Parameter(torch.randn(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = F.conv2d(x, self.conv_w, self.conv_b)
        return self.head(F.linear(y.mean((2, 3)), weight=self.fc))


def test_fx_function_calls(registry):
    module, x = Functional(), torch.randn(1, 4, 5, 5)
    result, record, ctx = optimize(module, "sparsify-2-4", registry, example_inputs=(x,))
    assert [r["layer"] for r in ctx.state["sparsity"]] == ["conv_w", "fc"]
    assert [r["op"] for r in ctx.state["sparsity"]] == ["conv2d", "linear"]
    after = dict(result.model.named_parameters())
    assert_2_4(module.conv_w.detach().numpy(), after["conv_w"].detach().numpy(), axis=1)
    assert_2_4(module.fc.detach().numpy(), after["fc"].detach().numpy(), axis=1)
    assert torch.equal(after["conv_b"], module.conv_b) and torch.equal(after["head.weight"], module.head.weight)


# -- registry and CLI -------------------------------------------------------------------------------------------------
def test_registered_through_entry_points(registry):
    assert registry.passes["sparsify"] is SparsifyMagnitude and registry.origin["sparsify"] == "sparsify_magnitude"
    assert registry.passes["sparsify-2-4"] is Sparsify24 and registry.origin["sparsify-2-4"] == "sparsify_2_4"


def test_cli(tiny, tmp_path, capsys):
    model, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    shutil.copy(tiny, model)
    assert main(["run", str(model), "--passes", "sparsify:sparsity=0.5", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"sparsified {CONVS} layers" in printed and "note (sparsify): /conv1/Conv: 50.0% zeros" in printed
    w = inits(onnx.load(str(out)))["layer4.0.conv2.weight"]
    assert np.count_nonzero(w == 0) == w.size // 2
    assert outputs(onnx.load(str(out))).shape == (1, 10)

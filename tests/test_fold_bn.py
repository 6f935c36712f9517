"""fold-bn: tiny Before/Expected ONNX graphs, real zoo models, FX (symbolic_trace and torch.export), the registry."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from graphopt_plugins.fold_bn import FOLDED, FoldBatchNorm
from onnx import numpy_helper
from torch import nn

import graphopt
from graphopt import zoo
from graphopt.ir import OnnxGraph
from graphopt.ir.fx_graph import FxGraph
from graphopt.passes.instruments import relative_error

RTOL, ATOL = 1e-5, 1e-6
RNG = np.random.default_rng(0)


# -- helpers ----------------------------------------------------------------------------------------------------
def bn_stats(c, suffix="", seed=0):
    rng = np.random.default_rng(seed)
    return {
        f"s{suffix}": rng.uniform(0.5, 1.5, c).astype(np.float32),
        f"bb{suffix}": rng.normal(0, 0.5, c).astype(np.float32),
        f"m{suffix}": rng.normal(0, 0.5, c).astype(np.float32),
        f"v{suffix}": rng.uniform(0.3, 2.0, c).astype(np.float32),
    }


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def make(body: str, inputs: str, outputs: str, opset: int = 17, **inits) -> OnnxGraph:
    """An OnnxGraph from onnx.parser node text, with numpy initializers."""
    model = onnx.parser.parse_model(
        f'<ir_version: 8, opset_import: ["" : {opset}]>\ng ({inputs}) => ({outputs}) {{\n{body}\n}}')
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
    onnx.checker.check_model(model, full_check=True)
    return OnnxGraph.from_model(model)


def run_fold(graph, **options):
    return FoldBatchNorm(FoldBatchNorm.Options(**options))(graph.copy())


def check_onnx(graph, folded: int, left: int = 0, notes: tuple[str, ...] = ()):
    """Fold; assert the counts, the notes, equal outputs (rtol 1e-5 / atol 1e-6), validity and a no-op rerun."""
    before = graph.op_counts()["BatchNormalization"]
    result = run_fold(graph)
    out = result.graph
    assert result.modified is (folded > 0)
    assert result.stats == ({FOLDED: folded} if folded else {})
    assert out.op_counts()["BatchNormalization"] == before - folded == left
    for text in notes:
        assert any(text in n for n in result.notes), (text, result.notes)
    if not notes:
        assert result.notes == []
    inputs = graph.sample_inputs(seed=1)
    for ref, got in zip(graph.run(inputs), out.run(inputs), strict=True):
        np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    out.verify()
    assert [t.name for t in out.gs.outputs] == [t.name for t in graph.gs.outputs]
    again = run_fold(out)
    assert again.modified is False and again.stats == {}
    return out


def only(graph, op):
    nodes = [n for n in graph.gs.nodes if n.op == op]
    assert len(nodes) == 1
    return nodes[0]


# -- ONNX: Conv ---------------------------------------------------------------------------------------------------
CONV_BN = "c = Conv <pads=[1,1,1,1]> ({conv_inputs})\ny = BatchNormalization <epsilon=0.001> (c, s, bb, m, v)"


def test_conv_with_bias_matches_hand_folded_weights():
    w, b, st = rand(6, 4, 3, 3), rand(6), bn_stats(6)
    g = make(CONV_BN.format(conv_inputs="x, w, b"), "float[2,4,5,5] x", "float[2,6,5,5] y", w=w, b=b, **st)
    out = check_onnx(g, folded=1)
    assert out.op_counts() == {"Conv": 1}
    conv = only(out, "Conv")
    scale = st["s"].astype(np.float64) / np.sqrt(st["v"].astype(np.float64) + 1e-3)
    np.testing.assert_allclose(conv.inputs[1].values, w * scale[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(conv.inputs[2].values, (b - st["m"]) * scale + st["bb"], rtol=1e-6, atol=1e-7)
    assert conv.inputs[1].values.dtype == np.float32 and conv.outputs[0].name == "y"
    np.testing.assert_array_equal(g.gs.tensors()["w"].values, w)  # the input graph's weights are untouched


def test_conv_without_bias_gets_one():
    g = make(CONV_BN.format(conv_inputs="x, w"), "float[1,4,5,5] x", "float[1,6,5,5] y", w=rand(6, 4, 3, 3),
             **bn_stats(6))
    out = check_onnx(g, folded=1)
    assert len(only(out, "Conv").inputs) == 3


@pytest.mark.parametrize("group,cin,cout", [(2, 4, 6), (4, 4, 4), (4, 4, 8)], ids=["grouped", "depthwise", "dw-x2"])
def test_grouped_and_depthwise_conv(group, cin, cout):
    body = f"c = Conv <group={group}, pads=[1,1,1,1]> (x, w)\ny = BatchNormalization (c, s, bb, m, v)"
    g = make(body, f"float[1,{cin},6,6] x", f"float[1,{cout},6,6] y", w=rand(cout, cin // group, 3, 3),
             **bn_stats(cout))
    check_onnx(g, folded=1)


def test_conv1d_and_conv3d():
    g = make(CONV_BN.format(conv_inputs="x, w, b").replace("[1,1,1,1]", "[1,1]"), "float[2,3,9] x",
             "float[2,5,9] y", w=rand(5, 3, 3), b=rand(5), **bn_stats(5))
    check_onnx(g, folded=1)
    body = CONV_BN.format(conv_inputs="x, w").replace("[1,1,1,1]", "[0,0,0,0,0,0]")
    g = make(body, "float[1,2,4,4,4] x", "float[1,3,4,4,4] y", w=rand(3, 2, 1, 1, 1), **bn_stats(3))
    check_onnx(g, folded=1)


def test_weights_from_constant_node_and_chained_bns():
    body = """
      w = Constant <value = float[3,2,1,1] {1.0, -2.0, 0.5, 0.25, 3.0, -1.5}> ()
      c = Conv (x, w)
      t = BatchNormalization (c, s, bb, m, v)
      y = BatchNormalization (t, s2, bb2, m2, v2)"""
    g = make(body, "float[1,2,4,4] x", "float[1,3,4,4] y", **bn_stats(3), **bn_stats(3, "2", seed=1))
    out = check_onnx(g, folded=2)
    assert out.op_counts() == {"Conv": 1}


def test_shared_weight_is_not_changed_for_its_other_user():
    body = "c = Conv (x, w)\ny = BatchNormalization (c, s, bb, m, v)\nz = Conv (x, w)"
    w = rand(3, 2, 1, 1)
    g = make(body, "float[1,2,4,4] x", "float[1,3,4,4] y, float[1,3,4,4] z", w=w, **bn_stats(3))
    out = check_onnx(g, folded=1)
    plain = next(n for n in out.gs.nodes if n.outputs[0].name == "z")
    np.testing.assert_array_equal(plain.inputs[1].values, w)


def test_two_convs_sharing_a_weight_both_fold_into_distinct_constants():
    body = """c = Conv (x, w)
      y = BatchNormalization (c, s, bb, m, v)
      d = Conv (x, w)
      z = BatchNormalization (d, s2, bb2, m2, v2)"""
    g = make(body, "float[1,2,4,4] x", "float[1,3,4,4] y, float[1,3,4,4] z", w=rand(3, 2, 1, 1), **bn_stats(3),
             **bn_stats(3, "2", seed=1))
    out = check_onnx(g, folded=2)
    weights = [n.inputs[1] for n in out.gs.nodes]
    assert weights[0].name != weights[1].name and not np.array_equal(weights[0].values, weights[1].values)


# -- ONNX: ConvTranspose ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose(group, bias):
    cin, cout = 6, 6 if group == 3 else 4
    inputs = "x, w, b" if bias else "x, w"
    body = f"c = ConvTranspose <group={group}, strides=[2,2]> ({inputs})\ny = BatchNormalization (c, s, bb, m, v)"
    inits = dict(w=rand(cin, cout // group, 3, 3), **bn_stats(cout))
    if bias:
        inits["b"] = rand(cout)
    g = make(body, f"float[1,{cin},4,4] x", f"float[1,{cout},9,9] y", **inits)
    out = check_onnx(g, folded=1)
    # expected weights, one output channel at a time: o = g * (cout / group) + j
    st, w = bn_stats(cout), inits["w"]
    scale = st["s"] / np.sqrt(st["v"] + 1e-5)
    per = cout // group
    want = w.copy()
    for o in range(cout):
        rows = slice(o // per * (cin // group), (o // per + 1) * (cin // group))
        want[rows, o % per] *= scale[o]
    np.testing.assert_allclose(only(out, "ConvTranspose").inputs[1].values, want, rtol=1e-6)


# -- ONNX: Gemm ---------------------------------------------------------------------------------------------------
GEMM_C = {"none": None, "vector": (5,), "row": (1, 5), "scalar": ()}


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c", list(GEMM_C))
def test_gemm(trans_b, c):
    attrs = f"transB={trans_b}, alpha=0.5, beta=2.0"
    inputs = "x, wt" if c == "none" else "x, wt, cc"
    inits = dict(wt=rand(5, 3) if trans_b else rand(3, 5), **bn_stats(5))
    if c != "none":
        inits["cc"] = rand(*GEMM_C[c])
    g = make(f"c = Gemm <{attrs}> ({inputs})\ny = BatchNormalization (c, s, bb, m, v)", "float[2,3] x",
             "float[2,5] y", **inits)
    out = check_onnx(g, folded=1)
    gemm = only(out, "Gemm")
    assert gemm.inputs[2].values.shape == (5,) and gemm.attrs["beta"] == 1.0 and gemm.attrs["alpha"] == 0.5


def test_gemm_trans_a_float64_keeps_dtype():
    inits = {k: v.astype(np.float64) for k, v in bn_stats(4).items()}
    g = make("c = Gemm <transA=1> (x, wt, cc)\ny = BatchNormalization (c, s, bb, m, v)", "double[3,2] x",
             "double[2,4] y", wt=rand(3, 4, dtype=np.float64), cc=rand(4, dtype=np.float64), **inits)
    out = check_onnx(g, folded=1)
    assert only(out, "Gemm").inputs[1].values.dtype == np.float64


def test_gemm_with_full_c_or_option_off_is_left():
    body = "c = Gemm (x, wt, cc)\ny = BatchNormalization (c, s, bb, m, v)"
    g = make(body, "float[2,3] x", "float[2,5] y", wt=rand(3, 5), cc=rand(2, 5), **bn_stats(5))
    check_onnx(g, folded=0, left=1, notes=("1 BatchNormalization after a Gemm whose C is not one value per",))
    g = make(body, "float[2,3] x", "float[2,5] y", wt=rand(3, 5), cc=rand(5), **bn_stats(5))
    result = run_fold(g, fold_into_gemm=False)
    assert not result.modified and result.graph.op_counts()["BatchNormalization"] == 1
    assert result.notes == ["1 BatchNormalization after a Gemm/Linear (fold_into_gemm=false): left as is"]


# -- ONNX: left alone ---------------------------------------------------------------------------------------------
def test_bn_graph_output_keeps_its_name_and_other_outputs_survive():
    body = "c = Conv (x, w)\ny = BatchNormalization (c, s, bb, m, v)\nr = Relu (y)"
    g = make(body, "float[1,2,4,4] x", "float[1,3,4,4] y, float[1,3,4,4] r", w=rand(3, 2, 1, 1), **bn_stats(3))
    out = check_onnx(g, folded=1)
    assert [t.name for t in out.gs.outputs] == ["y", "r"]
    assert only(out, "Conv").outputs[0] is out.gs.outputs[0]


def test_bn_after_relu_is_left_with_a_note():
    body = """c = Conv (x, w)
      r = Relu (c)
      y = BatchNormalization (r, s, bb, m, v)
      z = BatchNormalization (x, s2, bb2, m2, v2)"""
    g = make(body, "float[1,3,4,4] x", "float[1,3,4,4] y, float[1,3,4,4] z", w=rand(3, 3, 1, 1), **bn_stats(3),
             **bn_stats(3, "2", seed=1))
    check_onnx(g, folded=0, left=2, notes=("2 BatchNormalization not after a foldable op",))


@pytest.mark.parametrize("extra", ["z = Relu (c)", "z = Identity (c)"])
def test_conv_output_with_two_consumers_is_left(extra):
    body = f"c = Conv (x, w)\ny = BatchNormalization (c, s, bb, m, v)\n{extra}"
    g = make(body, "float[1,2,4,4] x", "float[1,3,4,4] y, float[1,3,4,4] z", w=rand(3, 2, 1, 1), **bn_stats(3))
    check_onnx(g, folded=0, left=1, notes=("1 BatchNormalization after an op whose output is also read",))


def test_conv_output_that_is_a_graph_output_is_left():
    body = "c = Conv (x, w)\ny = BatchNormalization (c, s, bb, m, v)"
    g = make(body, "float[1,2,4,4] x", "float[1,3,4,4] y, float[1,3,4,4] c", w=rand(3, 2, 1, 1), **bn_stats(3))
    check_onnx(g, folded=0, left=1, notes=("output is also read",))


def test_non_constant_weight_or_stats_is_left():
    body = "c = Conv (x, w)\ny = BatchNormalization (c, s, bb, m, v)"
    g = make(body, "float[1,2,4,4] x, float[3,2,1,1] w", "float[1,3,4,4] y", **bn_stats(3))
    check_onnx(g, folded=0, left=1, notes=("not constants",))
    st = bn_stats(3)
    del st["v"]
    g = make(body, "float[1,2,4,4] x, float[3] v", "float[1,3,4,4] y", w=rand(3, 2, 1, 1), **st)
    check_onnx(g, folded=0, left=1, notes=("not constants",))


def test_training_mode_bn_is_left():
    body = "c = Conv (x, w)\ny, rm, rv = BatchNormalization <training_mode=1> (c, s, bb, m, v)"
    g = make(body, "float[2,2,4,4] x", "float[2,3,4,4] y", w=rand(3, 2, 1, 1), **bn_stats(3))
    result = run_fold(g)
    assert not result.modified and result.stats == {}
    assert result.graph.op_counts()["BatchNormalization"] == 1
    assert result.notes == ["1 BatchNormalization in training mode (batch statistics): left as is"]


def test_opset_13_bn_folds():
    g = make(CONV_BN.format(conv_inputs="x, w"), "float[1,4,5,5] x", "float[1,6,5,5] y", opset=13,
             w=rand(6, 4, 3, 3), **bn_stats(6))
    check_onnx(g, folded=1)


# -- ONNX: real models --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18_like", "mobilenet_v2_like"])
def test_zoo_models_fold_every_bn(zoo_onnx, name):
    graph = OnnxGraph.load(zoo_onnx(name))
    n_bn = graph.op_counts()["BatchNormalization"]
    assert n_bn > 15
    result = run_fold(graph)
    assert result.stats == {FOLDED: n_bn} and result.notes == []
    assert result.graph.op_counts()["BatchNormalization"] == 0
    assert result.graph.op_counts()["Conv"] == graph.op_counts()["Conv"]
    inputs = graph.sample_inputs()
    assert relative_error(graph.run(inputs), result.graph.run(inputs)) < 1e-5
    assert result.graph.num_parameters() < graph.num_parameters()
    result.graph.verify()
    assert not run_fold(result.graph).modified


# -- FX -----------------------------------------------------------------------------------------------------------
def check_fx(module, example, folded, left=0, captured="symbolic_trace", notes=(), **options):
    """Fold ``module`` captured as FX; outputs must match the eager module within 1e-5 relative."""
    module = module.eval()
    graph = graphopt.load_model(module, example_inputs=example)
    assert graph.captured_with == captured
    return check_fx_graph(graph, module(example), folded, left, notes, **options)


def check_fx_graph(graph, eager, folded, left=0, notes=(), **options):
    result = run_fold(graph, **options)
    assert result.modified is (folded > 0)
    assert result.stats == ({FOLDED: folded} if folded else {})
    for text in notes:
        assert any(text in n for n in result.notes), (text, result.notes)
    if not notes:
        assert result.notes == []
    names = [name for name, _ in result.graph.op_counts().items() if "batchnorm" in name.lower().replace("_", "")]
    assert sum(result.graph.op_counts()[n] for n in names) == left
    with torch.no_grad():
        got = result.graph.gm(*graph.example_inputs)
    assert relative_error([eager.detach().numpy()], [got.detach().numpy()]) < 1e-5
    result.graph.verify()
    assert not run_fold(result.graph, **options).modified
    return result.graph


def test_fx_resnet18_all_batchnorm_modules_gone():
    model = zoo.resnet18_like()
    out = check_fx(model, torch.randn(2, 3, 32, 32), folded=20)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in out.gm.modules())
    assert out.num_parameters() < sum(p.numel() for p in model.parameters())


def test_fx_mobilenet_depthwise():
    check_fx(zoo.mobilenet_v2_like(num_classes=10), torch.randn(1, 3, 32, 32), folded=52)


class Mixed(nn.Module):
    """ConvTranspose (grouped, no bias) + BN2d, Conv1d + BN1d, Linear + BN1d, Conv3d + BN3d."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, bias=False)
        self.bn_up = nn.BatchNorm2d(6)
        self.c1 = nn.Conv1d(6, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(5)
        self.fc = nn.Linear(5, 7)
        self.bn_fc = nn.BatchNorm1d(7)
        self.c3 = nn.Conv3d(1, 2, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(2)
        _randomize(self)

    def forward(self, x):
        y = self.bn_up(self.up(x)).flatten(2)  # (N, 6, 81)
        y = self.bn1(self.c1(y)).mean(2)  # (N, 5)
        y = self.bn_fc(self.fc(y))
        z = self.bn3(self.c3(y[:, None, :, None, None]))
        return y + z.sum((1, 3, 4))


def _randomize(module):
    gen = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            if m.track_running_stats:
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.3)
            if m.affine:
                m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.data.copy_(torch.randn(c, generator=gen))
    return module


def test_fx_conv_transpose_conv1d_linear_conv3d():
    out = check_fx(Mixed(), torch.randn(2, 4, 4, 4), folded=4)
    assert out.gm.up.bias is not None and out.gm.c3.bias is not None


def test_fx_linear_option_off_and_shared_output_and_no_running_stats():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(3, 4), nn.BatchNorm1d(4)
            self.conv, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
            self.conv2, self.bn3 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)
            _randomize(self)

        def forward(self, x):
            c = self.conv(x)
            y = self.bn2(c) + c  # conv output read twice
            y = self.bn3(self.conv2(y))  # batch statistics
            return self.bn(self.fc(y.mean((2, 3))))

    x = torch.randn(2, 3, 4, 4)
    check_fx(M(), x, folded=1, left=2, notes=("1 BatchNormalization after an op whose output is also read",
                                              "1 BatchNormalization in training mode"))
    check_fx(M(), x, folded=0, left=3, fold_into_gemm=False, notes=("fold_into_gemm=false",))


def test_fx_linear_on_3d_input_is_left():
    class M(nn.Module):  # BatchNorm1d on (N, C, L) normalizes dim 1, not Linear's features: not foldable
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 5), nn.BatchNorm1d(5)
            _randomize(self)

        def forward(self, x):
            return self.bn(self.fc(x))

    check_fx(M(), torch.randn(2, 5, 4), folded=0, left=1, notes=("not (batch, channels, ...)",))


def test_fx_reused_conv_module_and_functional_forms():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
            self.w = nn.Parameter(torch.randn(4, 3, 1, 1))
            self.register_buffer("rm", torch.randn(4))
            self.register_buffer("rv", torch.rand(4) + 0.5)
            self.gamma = nn.Parameter(torch.rand(4) + 0.5)
            _randomize(self)

        def forward(self, x):
            y = self.bn(self.conv(x)) + self.conv(x)  # the module is called twice, folded into one call
            y = F.conv2d(y, self.w)
            return F.batch_norm(y, self.rm, self.rv, self.gamma, None, False, 0.1, 1e-3)

    out = check_fx(M(), torch.randn(2, 3, 5, 5), folded=2)
    assert sum(n.op == "call_module" and isinstance(out.gm.get_submodule(n.target), nn.Conv2d)
               for n in out.gm.graph.nodes) == 2


def test_fx_chained_batch_norms_fold_in_one_run():
    module = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.ReLU()))
    out = check_fx(module, torch.randn(1, 3, 6, 6), folded=2)
    assert [type(m).__name__ for m in out.gm.children()] == ["Conv2d", "ReLU"]


class NeedsExport(nn.Module):
    """``if x.shape[1] == 4`` defeats symbolic_trace (a Proxy in control flow); torch.export specializes it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.up, self.bn_up = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2), nn.BatchNorm2d(4)
        self.fc, self.bn_fc = nn.Linear(4, 3), nn.BatchNorm1d(3)
        _randomize(self)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        if x.shape[1] == 4:
            y = y * 2
        y = self.bn_up(self.up(y))
        return self.bn_fc(self.fc(y.mean((2, 3))))


def test_fx_torch_export_form():
    out = check_fx(NeedsExport(), torch.randn(2, 4, 6, 6), folded=3, captured="torch.export")
    assert not any("bn" in name for name, _ in out.gm.named_modules())


def test_fx_torch_export_decomposed_form():
    module, x = NeedsExport().eval(), torch.randn(2, 4, 6, 6)
    gm = torch.export.export(module, (x,)).run_decompositions().module()
    targets = {str(n.target) for n in gm.graph.nodes}
    assert "aten._native_batch_norm_legit_no_training.default" in targets and "aten.convolution.default" in targets
    # the decomposed Linear (aten.addmm on a permuted weight) is not matched: its BatchNorm stays, with a note
    out = check_fx_graph(FxGraph(gm, (x,), "torch.export"), module(x), folded=2, left=1,
                         notes=("1 BatchNormalization not after a foldable op",))
    (bn,) = [n for n in out.gm.graph.nodes if "batch_norm" in str(n.target)]
    assert str(bn.args[0].target) == "aten.addmm.default"


# -- through the registry -----------------------------------------------------------------------------------------
def test_registry_and_optimize_end_to_end(registry, zoo_onnx, tmp_path):
    assert registry.passes["fold-bn"] is FoldBatchNorm
    path = zoo_onnx("tiny_resnet")
    result = graphopt.optimize(path, "fold-bn", registry=registry, verify_each=True, rtol=1e-5)
    (record,) = result.report.records
    assert record.modified and record.stats == {FOLDED: 12} and record.changes == "folded 12 BatchNormalization"
    assert record.checks["max_rel_err"] < 1e-5
    assert result.graph.op_counts()["BatchNormalization"] == 0
    result.save(tmp_path / "out.onnx")
    again = graphopt.optimize(str(tmp_path / "out.onnx"), "fold-bn", registry=registry)
    assert not again.report.modified and again.report.records[0].changes == "no change"
    off = graphopt.optimize(path, "fold-bn:fold_into_gemm=false", registry=registry)
    assert off.report.records[0].stats == {FOLDED: 12}

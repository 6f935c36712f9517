"""place-qdq in the tensorrt backend's scheme: TensorRT's explicit-quantization form (int8 symmetric, Q/DQ on the
inputs of Conv / ConvTranspose / Gemm / MatMul, fused residual Adds, one scale per Concat, Q/DQ before Pad), the
fusion groups it is decided from, and its accuracy on onnxruntime against the fp32 model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import zoo
from graphopt.backends.fusion import fusion_groups
from graphopt.backends.lint import lint
from graphopt.backends.qdq_plan import too_small
from graphopt.backends.scheme import QuantRequest, UnsupportedRequestError
from graphopt.backends.tensorrt import PER_TENSOR_WARNING, TensorRTBackend
from graphopt.cli import main
from graphopt.ir import OnnxGraph
from graphopt.numeric import sqnr_db
from graphopt.passes.base import PassContext

SCHEME = TensorRTBackend().default_scheme()
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# -- models ------------------------------------------------------------------------------------------------------
def _conv_weight(rng, cout, cin, k):
    return (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2 / (cin * k * k))).astype(np.float32)


def _model(path, nodes, inits, shape, out_shape):
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return str(path)


def concat_model(path):
    """Two conv branches concatenated (one through a MaxPool), a conv, a ConvTranspose, and a 12 -> 10 channel conv
    (too small for TensorRT's int8 kernels: neither side 16 or a multiple of 8)."""
    rng = np.random.default_rng(1)
    inits = {"wa": _conv_weight(rng, 32, 16, 3), "wb": _conv_weight(rng, 24, 16, 1), "wc": _conv_weight(rng, 32, 56, 3),
             "wt": (rng.standard_normal((32, 12, 2, 2)) * 0.2).astype(np.float32),
             "ws": (rng.standard_normal((10, 12, 3, 3)) * 0.1).astype(np.float32),  # 12 -> 10 channels: no int8 kernel
             "bt": np.full(12, 0.1, np.float32)}
    nodes = [
        helper.make_node("Conv", ["input", "wa"], ["a0"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a0"], ["a"], name="relu_a"),
        helper.make_node("Conv", ["input", "wb"], ["b0"], name="conv_b"),
        helper.make_node("MaxPool", ["b0"], ["b"], name="pool_b", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["a", "b"], ["c"], name="concat", axis=1),
        helper.make_node("Conv", ["c", "wc"], ["d"], name="conv_c", pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["d", "wt", "bt"], ["e"], name="deconv", strides=[2, 2]),
        helper.make_node("Conv", ["e", "ws"], ["output"], name="conv_small", pads=[1, 1, 1, 1]),
    ]
    return _model(path, nodes, inits, [2, 16, 8, 8], [2, 10, 16, 16])


def pad_model(path):
    """conv -> relu -> Pad -> conv (no padding of its own) -> Flatten -> Gemm (transB=1), and a conv -> relu -> add
    whose add cannot fuse (the relu stands between)."""
    rng = np.random.default_rng(2)
    inits = {"w1": _conv_weight(rng, 32, 16, 3), "w2": _conv_weight(rng, 32, 32, 3), "w3": _conv_weight(rng, 32, 32, 1),
             "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
             "wf": (rng.standard_normal((20, 32 * 8 * 8)) * 0.02).astype(np.float32),
             "bf": np.zeros(20, np.float32)}
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["x0"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["x0"], ["x"], name="relu1"),
        helper.make_node("Pad", ["x", "pads"], ["xp"], name="pad"),
        helper.make_node("Conv", ["xp", "w2"], ["y0"], name="conv2"),
        helper.make_node("Conv", ["y0", "w3"], ["z0"], name="conv3"),
        helper.make_node("Relu", ["z0"], ["z"], name="relu3"),
        helper.make_node("Add", ["z", "x"], ["s"], name="add_after_relu"),
        helper.make_node("Flatten", ["s"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["output"], name="fc", transB=1),
    ]
    return _model(path, nodes, inits, [2, 16, 8, 8], [2, 20])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (path, feeds maker): the zoo models at small sizes and the two hand-made ones."""
    folder = tmp_path_factory.mktemp("trt")
    made = {}
    for name, shape in (("resnet18_like", (1, 3, 64, 64)), ("mobilenet_v2_like", (1, 3, 64, 64)),
                        ("tiny_resnet", (1, 3, 32, 32))):
        made[name] = (zoo.export_onnx(getattr(zoo, name)(), str(folder / f"{name}.onnx"), shape), shape)
    bert = zoo.bert_like(hidden=64, layers=2, heads=2, seq=32)
    made["bert_like"] = (zoo.export_transformer_onnx(bert, str(folder / "bert.onnx"), seq=16, dynamic=False), None)
    made["concat"] = (concat_model(folder / "concat.onnx"), (2, 16, 8, 8))
    made["pad"] = (pad_model(folder / "pad.onnx"), (2, 16, 8, 8))
    return made


def feeds(shape, n, seed):
    rng = np.random.default_rng(seed)
    if shape is None:  # the BERT-like encoder: token ids, batch 1, 16 tokens
        return [{"input_ids": rng.integers(0, 1000, (1, 16)).astype(np.int64)} for _ in range(n)]
    return [{"input": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def quantize(path, shape, passes="fold,int8"):
    calib = feeds(shape, 8, seed=0)
    calibration = {k: np.concatenate([f[k] for f in calib]) for k in calib[0]}
    ctx = PassContext(calibration=calibration)
    result = graphopt.optimize(path, passes, ctx=ctx, check=False, backend="tensorrt")
    return result, ctx


def outputs(model, samples):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, f)[0] for f in samples])


# -- structure ---------------------------------------------------------------------------------------------------
def _producers(g):
    return {t.name: n for n in g.nodes for t in n.outputs}


def _from_dq(g, tensor, producers):
    """The DequantizeLinear ``tensor`` comes from, through the scheme's passthrough ops, or None."""
    while tensor.name in producers:
        p = producers[tensor.name]
        if p.op == "DequantizeLinear":
            return p
        if p.op not in SCHEME.passthrough_ops:
            return None
        tensor = p.inputs[0]
    return None


def assert_tensorrt_form(float_graph: OnnxGraph, graph: OnnxGraph):
    """Every structural rule of the module docstring, on quantized ``graph`` (``float_graph``: the folded fp32
    graph, which says which weighted ops are too small for int8)."""
    g = graph.gs
    producers = _producers(g)
    shapes = float_graph.inferred_shapes()
    small = {n.name for n in float_graph.gs.nodes if n.op in WEIGHTED and too_small(n, SCHEME, shapes)}
    quantized = 0
    for node in g.nodes:
        if node.op in ("QuantizeLinear", "DequantizeLinear"):
            zero = node.inputs[2].values
            assert zero.dtype == np.int8 and not zero.any(), node.name  # symmetric int8 only
            assert producers.get(node.inputs[0].name) is None or \
                producers[node.inputs[0].name].op not in SCHEME.passthrough_ops, node.name  # Q/DQ before Pad & co.
        if node.op not in WEIGHTED:
            continue
        weight = producers.get(node.inputs[1].name)
        if node.name in small:
            assert not any(_from_dq(g, t, producers) for t in node.inputs), f"{node.name} is too small for int8"
            continue
        quantized += 1
        for t in node.inputs[:2]:  # the activation, and the weight (its own DQ) or the second activation
            assert _from_dq(g, t, producers) is not None, f"{node.name} input {t.name} is not quantized"
        if isinstance(weight.inputs[0], gs.Constant):
            values = weight.inputs[0].values
            assert values.dtype == np.int8 and values.min() >= -127
            expected = {"Conv": 0, "ConvTranspose": 1, "MatMul": values.ndim - 1,
                        "Gemm": 0 if node.attrs.get("transB", 0) else 1}[node.op]
            assert weight.attrs["axis"] == expected, node.name
    assert quantized > 0
    for group in fusion_groups(graph, SCHEME):
        if group.add is None:
            continue
        add = next(n for n in g.nodes if n.name == group.add)
        assert sum(_from_dq(g, t, producers) is not None for t in add.inputs) == 1, f"{add.name}: one DQ'd input"
    for concat in (n for n in g.nodes if n.op == "Concat" and _from_dq(g, n.inputs[0], producers) is not None):
        scales = {float(_from_dq(g, t, producers).inputs[1].values) for t in concat.inputs}
        assert len(scales) == 1, f"{concat.name}: inputs with scales {scales}"
    for out in g.outputs:
        assert out.name not in producers or producers[out.name].op != "DequantizeLinear"
    findings = lint(graph, TensorRTBackend().lint_rules())  # graphopt verify --backend tensorrt agrees
    assert not findings, [f.line() for f in findings]
    return quantized


# measured (random weights, 8 random calibration samples, 4 test samples): 41.6, 28.8, 43.7, 35.9, 32.5 dB
@pytest.mark.parametrize("name, min_sqnr", [("resnet18_like", 38), ("mobilenet_v2_like", 25), ("tiny_resnet", 40),
                                            ("concat", 32), ("pad", 29)])
def test_cnns_take_tensorrts_form_within_sqnr(models, name, min_sqnr):
    path, shape = models[name]
    result, _ = quantize(path, shape)
    folded = graphopt.optimize(path, "fold", check=False).graph
    assert assert_tensorrt_form(folded, result.graph) > 0
    samples = feeds(shape, 4, seed=1)
    measured = sqnr_db(outputs(path, samples), outputs(result.model, samples))
    assert measured >= min_sqnr, f"{name}: {measured:.1f} dB"


def test_bert_like_attention_and_residuals(models):
    path, _ = models["bert_like"]
    result, _ = quantize(path, None)
    folded = graphopt.optimize(path, "fold", check=False).graph
    assert assert_tensorrt_form(folded, result.graph) >= 16  # 12 projections, 4 attention MatMuls, the pooler
    g = result.graph.gs
    producers = _producers(g)
    two_activations = [n for n in g.nodes if n.op == "MatMul"
                       and all(isinstance(_from_dq(g, t, producers).inputs[0], gs.Variable) for t in n.inputs)]
    assert len(two_activations) == 4  # Q·K^T and softmax·V in each of 2 layers, both inputs quantized
    for n in g.nodes:  # Softmax, LayerNormalization, Erf (GELU) run in float: no DQ feeds them
        if n.op in ("Softmax", "LayerNormalization", "Erf"):
            assert all(_from_dq(g, t, producers) is None for t in n.inputs), n.name
    softmax_out = [n.outputs[0] for n in g.nodes if n.op == "Softmax"]
    assert all(any(r.op == "QuantizeLinear" for r in t.outputs) for t in softmax_out)  # as the MatMul's input
    samples = feeds(None, 8, seed=1)
    a, b = outputs(path, samples), outputs(result.model, samples)
    cosine = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
    assert cosine >= 0.999 and sqnr_db(a, b) >= 32, (cosine, sqnr_db(a, b))  # measured: 0.99987, 35.8 dB


def test_pad_and_concat_placement(models):
    path, shape = models["pad"]
    g = quantize(path, shape)[0].graph.gs
    producers = _producers(g)
    conv2 = next(n for n in g.nodes if n.name == "conv2")
    assert producers[conv2.inputs[0].name].op == "Pad"  # nothing between the Pad and the conv
    assert producers[producers[conv2.inputs[0].name].inputs[0].name].op == "DequantizeLinear"
    add = next(n for n in g.nodes if n.name == "add_after_relu")  # conv -> relu -> add: the add does not fuse
    assert producers[add.inputs[0].name].op == "Relu"  # z is not quantized for it (x is, for conv2 through the Pad)
    assert not any(grp.add == "add_after_relu" for grp in fusion_groups(g, SCHEME))
    assert [grp.epilogue for grp in fusion_groups(g, SCHEME) if grp.anchor == "conv3"] == [("relu3",)]
    fc = next(n for n in g.nodes if n.name == "fc")
    assert producers[fc.inputs[1].name].attrs["axis"] == 0  # transB=1: N is axis 0
    path, shape = models["concat"]
    g = quantize(path, shape)[0].graph.gs
    producers = _producers(g)
    concat = next(n for n in g.nodes if n.op == "Concat")
    a, b = concat.inputs
    assert producers[a.name].op == "DequantizeLinear" and producers[b.name].op == "MaxPool"  # Q/DQ before MaxPool
    assert producers[producers[b.name].inputs[0].name].op == "DequantizeLinear"
    small = next(n for n in g.nodes if n.name == "conv_small")
    assert producers[small.inputs[0].name].op == "ConvTranspose"  # 12 -> 10 channels: float, its input too


def test_fusion_groups_on_resnet(models):
    path, shape = models["resnet18_like"]
    folded = graphopt.optimize(path, "fold", check=False).graph
    groups = fusion_groups(folded, SCHEME)
    assert len(groups) == sum(n.op in WEIGHTED for n in folded.gs.nodes) == 21
    fused = [grp for grp in groups if grp.add]
    assert len(fused) == 8 and all(len(grp.epilogue) == 2 for grp in fused)  # the Add, then the Relu after it
    downsample = [grp for grp in groups if "downsample" in grp.anchor]
    assert downsample and all(grp.add is None for grp in downsample)  # the shortcut: quantized, not fused
    by_add = {grp.add: grp.anchor for grp in fused}
    assert all("conv2" in anchor for anchor in by_add.values())  # the longer branch from the common ancestor
    result, _ = quantize(path, shape)
    qgroups = {grp.anchor: grp for grp in fusion_groups(result.graph, SCHEME)}
    conv2 = qgroups[by_add[next(iter(by_add))]]
    kinds = sorted(n.op for n in result.graph.gs.nodes if n.name in conv2.qdq)
    assert kinds == ["DequantizeLinear"] * 3 + ["QuantizeLinear"] * 2  # input, weight, residual


def test_requests_tensorrt_cannot_honour_are_refused_and_per_tensor_warns(models):
    backend = TensorRTBackend()
    for request, words in ((QuantRequest(activation_dtype="uint8"), "activations uint8"),
                           (QuantRequest(weight_dtype="uint8"), "weights uint8"),
                           (QuantRequest(activation_symmetric=False), "asymmetric activations"),
                           (QuantRequest(weight_symmetric=False), "asymmetric weights")):
        with pytest.raises(UnsupportedRequestError, match=words):
            backend.scheme(request)
    path, shape = models["tiny_resnet"]
    result, ctx = quantize(path, shape, "fold,insert-observers,calibrate,place-qdq:per_channel=no")
    assert any(PER_TENSOR_WARNING in w for w in ctx.warnings)
    weights = [n for n in result.graph.gs.nodes if n.op == "DequantizeLinear" and isinstance(n.inputs[0], gs.Constant)]
    assert weights and all(n.inputs[1].values.size == 1 for n in weights)


def test_cli_writes_tensorrts_form(zoo_onnx, tmp_path, capsys):
    path = zoo_onnx("tiny_resnet")
    np.savez(tmp_path / "data.npz", input=np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "out.onnx"
    assert main(["run", path, "--passes", "fold,int8", "--backend", "tensorrt", "--calib", str(tmp_path / "data.npz"),
                 "-o", str(out)]) == 0
    assert "fused 3 residual Adds" in capsys.readouterr().out
    folded = graphopt.optimize(path, "fold", check=False).graph
    # 12 convs and the fc; the two 8-channel convs and the batch-1 fc (a GEMV) stay float
    assert assert_tensorrt_form(folded, OnnxGraph.load(str(out))) == 10


def test_modelopts_exclusions_for_shapes_placement_and_checker_share():
    """too_small is the one home of ModelOpt's exclusions (the placement leaves these float, the checker's small-conv
    and gemv rules flag them when quantized): a dynamic-batch classifier (ModelOpt's single-sample inference sees
    a GEMV), attention past 512 positions in int8, K or N under 16; a wide GEMM and 128-position attention pass."""
    scheme = TensorRTBackend().scheme()

    def matmul(a_shape, b_shape, out_shape, weight=None):
        a = gs.Variable("a", np.float32, a_shape)
        b = gs.Constant("w", weight) if weight is not None else gs.Variable("b", np.float32, b_shape)
        return gs.Node("MatMul", "mm", inputs=[a, b], outputs=[gs.Variable("y", np.float32, out_shape)])

    w = np.zeros((256, 64), np.float32)
    assert "batch 1" in too_small(matmul(["batch", 256], None, ["batch", 64], w), scheme)
    assert too_small(matmul([8, 256], None, [8, 64], w), scheme) is None
    assert too_small(matmul(["batch", 128, 256], None, ["batch", 128, 64], w), scheme) is None  # rank 3: tokens
    assert "N = 8" in too_small(matmul([8, 256], None, [8, 8], np.zeros((256, 8), np.float32)), scheme)
    assert "600 positions" in too_small(matmul([1, 4, 600, 64], [1, 4, 64, 600], [1, 4, 600, 600]), scheme)
    assert too_small(matmul([1, 4, 128, 64], [1, 4, 64, 128], [1, 4, 128, 128]), scheme) is None

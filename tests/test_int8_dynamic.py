"""int8-dynamic: int8 weights per output channel, activations quantized at run time (MatMul / Gemm)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphopt
from graphopt.errors import UsageError
from graphopt.report.metrics import cosine_similarity, expose
from graphopt.zoo.transformer import bert_like, export_transformer_onnx
from tests.conftest import graph_from_text

LAYERS = 2  # the small BERT-like: hidden 64, 2 layers, 4 heads, sequences up to 32


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bert") / "bert.onnx")
    export_transformer_onnx(bert_like(vocab=128, hidden=64, layers=LAYERS, heads=4, seq=32), path, seq=32)
    return path


@pytest.fixture(scope="module")
def quantized(bert, registry):
    return graphopt.optimize(bert, "fold,int8-dynamic", check=False, registry=registry)


def int8(model_or_path, registry, options=""):
    return graphopt.optimize(model_or_path, "fold,int8-dynamic" + options, check=False, registry=registry)


def record(result):
    return next(r for r in result.report.records if r.name == "int8-dynamic")


def session(model):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def constant_weight_ops(model: onnx.ModelProto) -> list[str]:
    constants = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                               for o in n.output}
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in constants]


def test_every_constant_weight_matmul_is_quantized(quantized):
    model, rec = quantized.model, record(quantized)
    ops = [n.op_type for n in model.graph.node]
    assert constant_weight_ops(model) == []
    assert rec.stats == {"quantized MatMul": 6 * LAYERS, "quantized Gemm": 2}  # q, k, v, out, ffn x2; pooler, head
    assert ops.count("MatMulInteger") == 6 * LAYERS + 2
    assert ops.count("DynamicQuantizeLinear") == 4 * LAYERS + 2  # q/k/v share one: 4 per layer, + pooler, head
    assert ops.count("MatMul") == 2 * LAYERS  # attention's Q·Kᵀ and scores·V stay float, and say so
    assert any("stay float" in n and f"MatMul x{2 * LAYERS}" in n and "Q·Kᵀ" in n for n in rec.notes)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMulInteger":
            w = inits[node.input[1]]
            assert w.dtype == np.int8 and np.abs(w).max() <= 127 and len(node.input) == 3  # symmetric: no w zero
    scales = [inits[n.input[1]] for n in model.graph.node
              if n.op_type == "Mul" and n.input[1] in inits and n.input[0].endswith("_scale")]
    assert len(scales) == 6 * LAYERS + 2 and all(s.ndim == 1 and s.size > 1 for s in scales)  # one per column


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("seq", [16, 32])
def test_outputs_close_with_dynamic_batch_and_sequence(bert, quantized, batch, seq):
    last = [n for n in onnx.load(bert).graph.node if n.op_type == "LayerNormalization"][-1].output[0]
    ref, test = session(expose(onnx.load(bert), [last])), session(expose(quantized.model, [last]))
    rng = np.random.default_rng(batch * 100 + seq)
    logits, hidden = [], []
    for _ in range(8):
        ids = {"input_ids": rng.integers(0, 128, (batch, seq)).astype(np.int64)}
        (a, ha), (b, hb) = ref.run(["logits", last], ids), test.run(["logits", last], ids)
        assert b.shape == (batch, 2) and hb.shape == (batch, seq, 64)
        logits.append((a, b))
        hidden.append((ha, hb))
    for pairs in (logits, hidden):  # the logits, and the last encoder layer's output (batch x seq x hidden)
        cos = cosine_similarity(np.concatenate([a for a, _ in pairs]), np.concatenate([b for _, b in pairs]))
        assert cos >= 0.99, cos


def test_model_is_smaller(bert, quantized):
    size = len(quantized.model.SerializeToString())
    assert size < 0.4 * len(onnx.load(bert).SerializeToString())


def test_second_run_changes_nothing(quantized, registry):
    again = graphopt.optimize(quantized.model, "int8-dynamic", check=False, registry=registry)
    assert not record(again).modified and record(again).stats == {}
    assert len(again.model.graph.node) == len(quantized.model.graph.node)


def test_options_are_honoured(bert, registry):
    q_proj = next(n for n in onnx.load(bert).graph.node if n.name.endswith("attention/q/MatMul"))
    excluded = int8(bert, registry, f":exclude_nodes={q_proj.name}")
    assert constant_weight_ops(excluded.model) == [q_proj.name]
    assert record(excluded).stats["quantized MatMul"] == 6 * LAYERS - 1
    assert any("in exclude_nodes" in n and "MatMul x1" in n for n in record(excluded).notes)

    matmul_only = int8(bert, registry, ":ops=MatMul")
    assert sorted(n.op_type for n in matmul_only.model.graph.node if n.op_type == "Gemm") == ["Gemm", "Gemm"]
    assert record(matmul_only).stats == {"quantized MatMul": 6 * LAYERS}

    big_only = int8(bert, registry, ":min_weight_elements=5000")  # 64x64 projections stay, 64x256 FFN go
    assert record(big_only).stats == {"quantized MatMul": 2 * LAYERS}

    per_tensor = int8(bert, registry, ":per_channel=false")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in per_tensor.model.graph.initializer}
    scales = [inits[n.input[1]] for n in per_tensor.model.graph.node
              if n.op_type == "Mul" and n.input[1] in inits and n.input[0].endswith("_scale")]
    assert len(scales) == 6 * LAYERS + 2 and all(s.size == 1 for s in scales)


def test_unknown_op_is_refused(bert, registry):
    with pytest.raises(UsageError, match="ops must be among MatMul, Gemm"):
        int8(bert, registry, ":ops=Conv")


def test_cnn_only_its_gemm_is_quantized(zoo_onnx, registry):
    path = zoo_onnx("tiny_resnet")
    result = int8(path, registry)
    counts = result.graph.op_counts()
    folded = graphopt.optimize(path, "fold", check=False, registry=registry).graph.op_counts()
    assert record(result).stats == {"quantized Gemm": 1}
    assert counts["Conv"] == folded["Conv"] and "Gemm" not in counts and "ConvInteger" not in counts
    assert any("stay float" in n and f"Conv x{folded['Conv']}" in n for n in record(result).notes)
    x = {"input": np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)}
    ref = session(path).run(None, {"input": x["input"][:1]})[0]
    assert cosine_similarity(ref, session(result.model).run(None, {"input": x["input"][:1]})[0]) >= 0.99


@pytest.mark.parametrize("attrs", ["transB = 1", "transB = 0, alpha = 0.5, beta = 2.0"])
def test_gemm_attributes_fold_into_the_weight(registry, attrs):
    trans = "transB = 1" in attrs
    w = np.random.default_rng(0).standard_normal((6, 5) if trans else (5, 6)).astype(np.float32)
    values = ", ".join(f"{v:.6f}" for v in w.ravel())
    g = graph_from_text(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4, 5] x) => (float[4, 6] y)
          <float[{"6, 5" if trans else "5, 6"}] w = {{{values}}}, float[6] c = {{1, -1, 2, -2, 3, -3}}> {{
            y = Gemm<{attrs}>(x, w, c)
        }}""")
    x = {"x": np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)}
    result = graphopt.optimize(g, "int8-dynamic", check=False, registry=registry)
    assert record(result).stats == {"quantized Gemm": 1}
    ref, out = g.run(x)[0], result.graph.run(x)[0]
    assert np.max(np.abs(out - ref)) < 0.05 * np.max(np.abs(ref))


def test_gemm_with_a_scalar_c_and_beta(registry):
    """A 0-d C times beta is a numpy scalar, not an array (found by the random-graph benchmark)."""
    g = graph_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,4] x) => (float[1,3] y)
          <float[4,3] w = {0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0,1.1,1.2}, float c = {0.5}> {
            y = Gemm<beta = 2.0>(x, w, c)
        }""")
    x = {"x": np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)}
    result = graphopt.optimize(g, "int8-dynamic", check=False, registry=registry)
    ref, out = g.run(x)[0], result.graph.run(x)[0]
    assert np.max(np.abs(out - ref)) < 0.05 * np.max(np.abs(ref))


@pytest.mark.parametrize("passes", ["int8-dynamic", "int4-weight"])
def test_matmuls_inside_if_branches_are_named_as_left_float(passes):
    """Weight-only passes rewrite the main graph's MatMuls; those inside If / Loop bodies stay float, and the note
    says so (they were skipped without a word)."""
    from tests.prune_patterns import if_model

    result = graphopt.optimize(if_model(), passes, check=False)
    notes = " ".join(n for r in result.report.records for n in r.notes)
    assert "inside an If/Loop/Scan body" in notes and ("MatMul x2" in notes or "(x2)" in notes), notes


def test_static_int8_on_a_model_with_a_scalar_input_is_unsupported_not_bad_data(tmp_path, capsys):
    """An If's scalar condition input: calibration has no batch axis to go through. That is exit 4 (unsupported),
    said without any --calib, not exit 3 ("unreadable input": the user gave no data)."""
    from graphopt.cli import main
    from tests.prune_patterns import if_model

    path = tmp_path / "if.onnx"
    path.write_bytes(if_model().SerializeToString())
    assert main(["run", str(path), "--passes", "int8", "-o", str(tmp_path / "q.onnx")]) == 4
    err = capsys.readouterr().err
    assert "input 'cond' is a scalar" in err and err.count("\n") == 1

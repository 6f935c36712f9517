"""Transformers on the PyTorch route: a BERT-like encoder through int8-dynamic (dynamic-int8 Linear) and static int8
(attention-safe: Linear layers int8, attention's MatMuls, softmax, LayerNorm and GELU float), with the batch and
sequence dimensions kept dynamic."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt import zoo
from graphopt.numeric import sqnr_db

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return zoo.bert_like(layers=1, hidden=64, heads=4).eval()


def _ids(batch, seq, seed=0):
    return torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _ops(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_int8_dynamic_quantizes_every_linear_and_keeps_batch_and_sequence_dynamic(bert):
    result = graphopt.optimize(bert, "int8-dynamic", example_inputs=(_ids(1, 16),), backend="x86")
    record = result.report.records[-1]
    assert record.stats == {"quantized Gemm": 8}  # q, k, v, out, ffn in/out, pooler, classifier
    assert "MatMul x2" in record.notes[0]  # attention's two products of activations stay float
    ops = _ops(result.model)
    assert sum("choose_qparams" in o for o in ops) == 8 - 2  # q/k/v read one input: quantized once, shared
    for batch, seq in ((1, 16), (3, 9), (2, 40)):
        ids = _ids(batch, seq, seed=batch)
        with torch.no_grad():
            assert sqnr_db(bert(ids).numpy(), result.model(ids).numpy()) >= 25, (batch, seq)


def test_static_int8_is_attention_safe(bert):
    calib = _ids(16, 24, seed=1).numpy()
    result = graphopt.optimize(bert, "int8", example_inputs=(_ids(1, 16),), backend="x86", calibration=calib)
    record = result.report.records[-1]
    assert record.stats["quantized weights"] == 8
    floats = record.notes[0]
    for op in ("MatMul x2", "Softmax x1", "LayerNormalization x3", "Gelu x1"):
        assert op in floats, floats
    # nothing quantizes the attention probabilities or the scores: no quantize reads softmax or the score matmuls
    for node in result.model.graph.nodes:
        if "quantize_per_tensor" in str(node.target) and "dequantize" not in str(node.target):
            assert not any(k in str(node.args[0].target) for k in ("softmax", "bmm", "matmul")), node.args[0]
    for batch, seq in ((2, 24), (1, 50)):
        ids = _ids(batch, seq, seed=batch + 7)
        with torch.no_grad():
            assert sqnr_db(bert(ids).numpy(), result.model(ids).numpy()) >= 20, (batch, seq)

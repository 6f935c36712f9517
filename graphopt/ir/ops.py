"""A small canonical op vocabulary shared by both IRs.

Passes ask ``graph.kind(node)`` instead of matching ONNX op_type strings or torch targets, so one pattern
serves both IRs where the semantics match.
"""

from __future__ import annotations

from enum import Enum


class OpKind(str, Enum):
    CONV = "conv"
    CONV_TRANSPOSE = "conv_transpose"
    GEMM = "gemm"  # fully connected: ONNX Gemm, nn.Linear / F.linear
    MATMUL = "matmul"
    BATCH_NORM = "batch_norm"
    IDENTITY = "identity"
    DROPOUT = "dropout"
    ADD = "add"
    MUL = "mul"
    CONCAT = "concat"
    RELU = "relu"
    RESHAPE = "reshape"
    FLATTEN = "flatten"
    POOL = "pool"
    GLOBAL_POOL = "global_pool"
    QUANTIZE = "quantize"
    DEQUANTIZE = "dequantize"
    CONSTANT = "constant"
    OTHER = "other"


ONNX_KINDS: dict[str, OpKind] = {
    "Conv": OpKind.CONV,
    "ConvTranspose": OpKind.CONV_TRANSPOSE,
    "Gemm": OpKind.GEMM,
    "MatMul": OpKind.MATMUL,
    "BatchNormalization": OpKind.BATCH_NORM,
    "Identity": OpKind.IDENTITY,
    "Dropout": OpKind.DROPOUT,
    "Add": OpKind.ADD,
    "Mul": OpKind.MUL,
    "Concat": OpKind.CONCAT,
    "Relu": OpKind.RELU,
    "Reshape": OpKind.RESHAPE,
    "Flatten": OpKind.FLATTEN,
    "MaxPool": OpKind.POOL,
    "AveragePool": OpKind.POOL,
    "GlobalAveragePool": OpKind.GLOBAL_POOL,
    "GlobalMaxPool": OpKind.GLOBAL_POOL,
    "QuantizeLinear": OpKind.QUANTIZE,
    "DequantizeLinear": OpKind.DEQUANTIZE,
    "Constant": OpKind.CONSTANT,
}


def onnx_kind(op_type: str) -> OpKind:
    return ONNX_KINDS.get(op_type, OpKind.OTHER)


def is_standard_domain(domain: str | None) -> bool:
    """Whether an ONNX node's domain is the default one (``""`` or ``"ai.onnx"``)."""
    return domain in ("", "ai.onnx", None)


def custom_ops(nodes) -> list[str]:
    """``domain:op`` of every node (onnx-graphsurgeon) outside the default ONNX domain, sorted: ops whose
    semantics and kernels graphopt does not know (a runtime here may not have them)."""
    return sorted({f"{n.domain}:{n.op}" for n in nodes if not is_standard_domain(n.domain)})

"""Where onnxruntime's CPU graph optimizer changes what a model computes, and the session options that avoid it.

onnxruntime 1.32's ``ReluQuantRewrite`` and ``ClipQuantRewrite`` (graph optimization level "extended" and up)
remove a Relu or Clip that feeds a QuantizeLinear, on the ground that the quantization clamps at the zero point
anyway. That holds on integer grids whose zero point is their lowest value (uint8 zero point 0), not on float8:
float8 E4M3 with zero point 0 keeps negative values down to -448 x scale, so without the Relu they pass through and
the graph computes something else (a ResNet-18-like fp8 graph: output SQNR -3.9 dB instead of 25.8 dB). Sessions
on a model holding float8 Q/DQ are built with those two rewrites off (:func:`session_kwargs`): they only save a
Relu/Clip kernel, nothing else changes.
"""

from __future__ import annotations

import os

import onnx

__all__ = ["FLOAT8_UNSAFE_OPTIMIZERS", "holds_float8_qdq", "session_kwargs"]

FLOAT8_UNSAFE_OPTIMIZERS = ("ReluQuantRewrite", "ClipQuantRewrite")
_FLOAT8 = frozenset(getattr(onnx.TensorProto, name) for name in (
    "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ") if hasattr(onnx.TensorProto, name))


def holds_float8_qdq(model: onnx.ModelProto) -> bool:
    """Whether a QuantizeLinear of ``model``'s main graph quantizes to a float8 type (by its zero point's type, or
    its ``output_dtype``)."""
    float8 = {t.name for t in model.graph.initializer if t.data_type in _FLOAT8}
    float8 |= {n.output[0] for n in model.graph.node if n.op_type == "Constant" and n.output
               and any(a.name == "value" and a.t.data_type in _FLOAT8 for a in n.attribute)}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        if len(node.input) > 2 and node.input[2] in float8:
            return True
        if any(a.name == "output_dtype" and a.i in _FLOAT8 for a in node.attribute):
            return True
    return False


def session_kwargs(source) -> dict:
    """Extra ``onnxruntime.InferenceSession`` keyword arguments for ``source`` (a path or the serialized model):
    ``disabled_optimizers`` for a model with float8 Q/DQ, else none. A model that cannot be parsed here (onnxruntime
    will say why) gets none."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                source = f.read()
        if b"QuantizeLinear" not in source:
            return {}
        model = onnx.load_from_string(bytes(source))
    except Exception:  # unreadable or unparsable: onnxruntime reports it when it loads the model
        return {}
    return {"disabled_optimizers": list(FLOAT8_UNSAFE_OPTIMIZERS)} if holds_float8_qdq(model) else {}

"""Where onnxruntime's CPU graph optimizer changes what a model computes, and the session options that avoid it.

onnxruntime 1.32's ``ReluQuantRewrite`` and ``ClipQuantRewrite`` (graph optimization level "extended" and up)
remove a Relu or Clip that feeds a QuantizeLinear, on the ground that the quantization clamps at the zero point
anyway. That holds on integer grids whose zero point is their lowest value (uint8 zero point 0), not on float8:
float8 E4M3 with zero point 0 keeps negative values down to -448 x scale, so without the Relu they pass through and
the graph computes something else (a ResNet-18-like fp8 graph: output SQNR -3.9 dB instead of 25.8 dB). Sessions
on a model holding float8 Q/DQ are built with those two rewrites off (:func:`session_kwargs`): they only save a
Relu/Clip kernel, nothing else changes.

:func:`create_session` builds a session with those options and turns onnxruntime's words for "no kernel for this
op" (a custom domain, an opset newer than it knows) into one UnsupportedError line without its source paths.
"""

from __future__ import annotations

import os
import re

import onnx

from graphopt.errors import UnsupportedError

__all__ = ["FLOAT8_UNSAFE_OPTIMIZERS", "create_session", "holds_float8_qdq", "session_kwargs"]

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


# onnxruntime's words for an op it has no kernel for (a custom domain, an opset it does not support yet)
_NO_KERNEL = ("is not a registered function/op", "Could not find an implementation", "NOT_IMPLEMENTED",
              "is under development", "No opset import for domain", "not supported")
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : (Fatal error: )?(Load model from .*? failed:)?")
_ORT_SOURCE = re.compile(r"/onnxruntime_src/\S+:\d+ (?:[^()]*\((?:[^()]|\([^()]*\))*\) )?")  # file:line signature
_ORT_OPSET = re.compile(r"Opset (\d+) is under development.*support for domain (\S+) is till opset (\d+)", re.S)


def create_session(ort, source, options, providers):
    """``ort.InferenceSession`` on ``source`` (a path or serialized model) with :func:`session_kwargs`;
    UnsupportedError when onnxruntime has no kernel for one of its ops, other failures as onnxruntime raised them."""
    try:
        return ort.InferenceSession(source, options, providers=list(providers), **session_kwargs(source))
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / NotImplemented
        text = str(exc)
        if not any(m in text for m in _NO_KERNEL):
            raise
        opset = _ORT_OPSET.search(text)
        if opset:
            version, domain, newest = opset.groups()
            raise UnsupportedError(f"{domain} opset {version} is newer than onnxruntime {ort.__version__} supports "
                                   f"(up to {newest}) (re-export the model at opset {newest} or lower, or upgrade "
                                   f"onnxruntime; --no-check skips running it)") from None
        reason = _ORT_SOURCE.sub("", _ORT_PREFIX.sub("", text.strip().splitlines()[0]))[:300]
        hint = ("its CPU provider has no bfloat16 kernels for most ops: graphopt's check, --eval and compare run "
                "such a model emulated in float32" if _computes_bfloat16(source) else
                "an op outside the standard domains needs its custom-op library; or skip running the model, e.g. "
                "with --no-check")
        raise UnsupportedError(f"onnxruntime cannot run this model: {reason} ({hint})") from None


def _computes_bfloat16(source) -> bool:
    from graphopt.ir.bf16 import computes_bfloat16

    try:
        return computes_bfloat16(onnx.load(source, load_external_data=False) if isinstance(source, (str, os.PathLike))
                                 else onnx.load_from_string(bytes(source)))
    except Exception:  # unreadable here: no hint about it
        return False

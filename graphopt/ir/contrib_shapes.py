"""Shape inference through onnxruntime's contrib ops (``com.microsoft``), which ONNX's own does not know.

ONNX's shape inference leaves a contrib op's outputs untyped, and so everything after it. In a copy of the model
(:func:`with_stand_ins`) each contrib op whose shape rule is known here is replaced by a standard op with the same
output: ``MatMulNBits(X, B, scales...)`` by ``MatMul(X, W)`` for a (K, N) stand-in ``W``, and
``GatherBlockQuantized(data, ids, scales...)`` by ``Gather(table, ids)`` for a stand-in table of the unpacked
shape (uint8 ``data`` holds 8 / bits values a byte along its quantized axis). The stand-ins are graph inputs of
the scales' type (the ops' output type), so ONNX's inference, data propagation included, types what follows
them. (onnxruntime's symbolic shape inference knows these ops too, but took 1.7 s where ONNX takes 0.15 s on a
BERT-like encoder, and mis-shapes a uint8-packed GatherBlockQuantized.)

The same ops hold packed weights: :func:`packed_weights` counts them as the values they stand for, the one rule
for a model's parameter count and a layer's.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

MS_DOMAIN = "com.microsoft"
STAND_IN_SUFFIX = "::graphopt_shape_stand_in"


def with_stand_ins(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with its known contrib ops replaced by standard stand-ins (see the module docstring);
    ``model`` itself when it has none. The stand-ins' names end in :data:`STAND_IN_SUFFIX`."""
    if not any(n.domain == MS_DOMAIN and n.op_type in _STAND_INS for n in model.graph.node):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    types = {i.name: (i.type.tensor_type.elem_type, [d.dim_value for d in i.type.tensor_type.shape.dim])
             for i in out.graph.input}
    types.update({t.name: (t.data_type, list(t.dims)) for t in out.graph.initializer})
    for node in out.graph.node:
        if node.domain == MS_DOMAIN and node.op_type in _STAND_INS:
            _STAND_INS[node.op_type](out.graph, node, types)
    return out


def _replace(graph, node, op: str, inputs: list[str], stand_in: str, elem_type: int, shape: list[int], **attrs):
    graph.input.append(helper.make_tensor_value_info(stand_in, elem_type, shape))
    node.op_type, node.domain = op, ""
    del node.input[:]
    node.input.extend(inputs)
    del node.attribute[:]
    node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())


def _matmul_nbits(graph, node, types) -> None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    elem_type = types.get(node.input[2], (onnx.TensorProto.FLOAT, None))[0]
    stand_in = node.output[0] + STAND_IN_SUFFIX
    _replace(graph, node, "MatMul", [node.input[0], stand_in], stand_in, elem_type, [int(attrs["K"]), int(attrs["N"])])


def _gather_block_quantized(graph, node, types) -> None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    data_type, dims = types.get(node.input[0], (None, None))
    if not dims:
        return  # unknown table: left as it is (untyped after it, as before)
    dims = list(dims)
    axis = int(attrs.get("quantize_axis", len(dims) - 1)) % len(dims)
    if data_type == onnx.TensorProto.UINT8:
        dims[axis] *= 8 // int(attrs.get("bits", 4))
    elem_type = types.get(node.input[2], (onnx.TensorProto.FLOAT, None))[0]
    stand_in = node.output[0] + STAND_IN_SUFFIX
    _replace(graph, node, "Gather", [stand_in, node.input[1]], stand_in, elem_type, dims,
             axis=int(attrs.get("gather_axis", 0)))


_STAND_INS = {"MatMulNBits": _matmul_nbits, "GatherBlockQuantized": _gather_block_quantized}


def packed_input(node):
    """The input of onnxruntime's packed contrib ops that holds their weights (MatMulNBits' B, GatherBlockQuantized's
    table), or None for any other op; ``node`` is an onnx-graphsurgeon node."""
    if node.domain != MS_DOMAIN or not node.inputs:
        return None
    return {"MatMulNBits": node.inputs[1] if len(node.inputs) > 1 else None,
            "GatherBlockQuantized": node.inputs[0]}.get(node.op)


def packed_weights(node, elements_of, dtype_of) -> int | None:
    """The weights a packed contrib op holds, as the values they stand for: MatMulNBits K x N, a uint8
    GatherBlockQuantized table 8 / bits values a byte (their scales, like a DequantizeLinear's, not counted);
    None for any other op. ``elements_of(tensor)`` / ``dtype_of(tensor)`` read a tensor of the caller's graph."""
    packed = packed_input(node)
    if packed is None:
        return None
    if node.op == "MatMulNBits":
        return int(node.attrs["K"]) * int(node.attrs["N"])
    if dtype_of(packed) == np.uint8:
        return elements_of(packed) * (8 // int(node.attrs.get("bits", 4)))
    return None

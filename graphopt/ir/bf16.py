"""bfloat16 models on a CPU that has no bfloat16 kernels: :func:`emulate_bfloat16`.

onnxruntime's CPU provider (1.32) runs Cast and LayerNormalization in bfloat16 and little else (no Add, Mul,
MatMul, Gemm, Conv, Relu, Softmax), so a bfloat16 model cannot be run on it as it is. The emulation rewrites it
into a float32 model that rounds every bfloat16 tensor to bfloat16 where it is written: each op computes in
float32 from bfloat16-exact inputs and its output is rounded (``Cast`` to bfloat16 and back, which onnxruntime
runs), as GPU bfloat16 kernels do (TensorRT's accumulate in float32 and round the output). Not emulated: an op's
internal intermediates stay float32 (a kernel that keeps them in bfloat16 is less accurate than this).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

__all__ = ["computes_bfloat16", "emulate_bfloat16", "emulation"]

BF16, F32 = TensorProto.BFLOAT16, TensorProto.FLOAT


def computes_bfloat16(model: onnx.ModelProto) -> bool:
    """Whether ``model``'s main graph holds bfloat16 weights or casts to bfloat16 (what :func:`emulate_bfloat16`
    is for)."""
    return any(t.data_type == BF16 for t in model.graph.initializer) or \
        any(a.name == "to" and a.i == BF16 for n in model.graph.node for a in n.attribute)


def emulation(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """:func:`emulate_bfloat16` of a model that computes bfloat16; None for any other model, or one the emulation
    cannot take (control flow)."""
    if not computes_bfloat16(model):
        return None
    try:
        return emulate_bfloat16(model)
    except ValueError:
        return None


def emulate_bfloat16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 copy of ``model`` that rounds each bfloat16 tensor to bfloat16 (see the module docstring).
    bfloat16 graph inputs become float32 inputs (feed bfloat16-exact values). Control flow (If/Loop/Scan bodies)
    is not rewritten: ValueError."""
    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for n in model.graph.node for a in n.attribute):
        raise ValueError("emulate_bfloat16: control-flow subgraphs are not rewritten")
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.input, *inferred.graph.value_info,
                                                           *inferred.graph.output]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    del g.value_info[:]
    for t in g.initializer:
        if t.data_type == BF16:
            t.CopyFrom(_float32(t))
    for v in [*g.input, *g.output]:
        if v.type.tensor_type.elem_type == BF16:
            v.type.tensor_type.elem_type = F32
    nodes = []
    for node in g.node:
        for a in node.attribute:
            if a.type == AttributeProto.TENSOR and a.t.data_type == BF16:
                a.t.CopyFrom(_float32(a.t))
        outs = [i for i, name in enumerate(node.output) if name and types.get(name) == BF16]
        if node.op_type == "Cast" and outs:  # rounds by itself: kept, then cast back to float32
            name = node.output[0]
            node.output[0] = f"{name}__bf16"
            nodes += [node, onnx.helper.make_node("Cast", [node.output[0]], [name], to=F32)]
            continue
        casts = []
        for i in outs:  # computed in float32, rounded to bfloat16 where written
            name = node.output[i]
            node.output[i] = f"{name}__fp32"
            casts += [onnx.helper.make_node("Cast", [node.output[i]], [f"{name}__bf16"], to=BF16),
                      onnx.helper.make_node("Cast", [f"{name}__bf16"], [name], to=F32)]
        nodes += [node, *casts]
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(out)
    return out


def _float32(t: TensorProto) -> TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)

"""to-bf16: bfloat16 weights and compute on ONNX (TensorRT's strongly typed bf16 form), risky ops kept float32."""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from graphopt_plugins.to_fp16 import DEFAULT_OP_BLOCK_LIST, ToFloat16
from onnx import AttributeProto, TensorProto, numpy_helper

from graphopt import OnnxGraph, hookimpl

BF16_OPSET = 22  # the first opset whose Conv, ConvTranspose and pooling ops take bfloat16


class ToBfloat16(ToFloat16):
    """Convert initializers and compute to bfloat16, keeping numerically risky ops in float32 behind Casts.

    The form a strongly typed TensorRT network takes as written: every tensor of the converted ops *is*
    bfloat16, and explicit ``Cast`` nodes stand where types change (at float32 graph inputs and outputs, around
    the ops kept in float32). It is ``to-fp16``'s conversion (same placement of Casts, same block lists, same
    cleanup; see that pass) with float16 then written as bfloat16: every float16 initializer becomes the
    bfloat16 rounding of its float32 *original* (never of the float16 value: no double rounding, no saturation at
    ±65504, no flush of tiny values), float16 Constant values, Cast targets, value_info and I/O types become
    bfloat16. No overflow check: bfloat16 has float32's exponent range. It keeps 8 significant bits (relative
    rounding 3.9e-3 per op, 8x float16's), so the block list's sums of squares and exponentials matter more, not
    less. Needs opset 22 (Conv, ConvTranspose and pooling take bfloat16 from there): the pass manager upgrades an
    older model first; called directly on one, the pass refuses.

    Options: ``keep_io_types`` (true), ``op_block_list``, ``node_block_list``, as ``to-fp16``'s.

    Measuring it: onnxruntime's CPU provider has no bfloat16 kernel for most ops (Add, MatMul, Conv, ...), so a
    bfloat16 model does not run there. :func:`graphopt.ir.bf16.emulate_bfloat16` rewrites it into a float32
    model that rounds every bfloat16 tensor where it is written, which onnxruntime runs (the tests check it
    against onnx's ReferenceEvaluator computing in bfloat16 on a small model).
    """

    name = "to-bf16"
    min_opset = BF16_OPSET
    recovery = ("keep the ops that lose precision in float32 (to-bf16:op_block_list=... or node_block_list=...), or "
                "use to-fp16 (3 more mantissa bits) where the values fit float16's range")

    @dataclass(frozen=True)
    class Options:
        keep_io_types: bool = True
        op_block_list: tuple[str, ...] = DEFAULT_OP_BLOCK_LIST
        node_block_list: tuple[str, ...] = ()

    def run_onnx(self, graph, ctx):
        if graph.opset < BF16_OPSET:
            raise self.fail(f"bfloat16 Conv/pooling need opset {BF16_OPSET}+, the model has {graph.opset} (run the "
                            f"pass in a pipeline, which converts it first)")
        return super().run_onnx(graph, ctx)

    def _checks_overflow(self) -> bool:
        return False  # bfloat16 has float32's exponent range

    def _weight_notes(self, ctx, before, after) -> list[str]:
        return []  # values come from the float32 originals: no float16 saturation to report

    def _finish(self, out: OnnxGraph, original: OnnxGraph) -> OnnxGraph:
        model = out.to_model()
        _retype(model.graph, _float32_constants(original))
        return OnnxGraph.from_model(model, external_data=out.external_data)


def _float32_constants(graph: OnnxGraph) -> dict[str, np.ndarray]:
    """The float32 values of the original model's initializers and Constant nodes, by tensor name."""
    found = {name: t.values for name, t in graph.gs.tensors().items()
             if isinstance(t, gs.Constant) and t.values.dtype == np.float32}
    for node in graph.gs.nodes:
        value = node.attrs.get("value") if node.op == "Constant" else None
        if isinstance(value, gs.Constant) and value.values.dtype == np.float32:
            found[node.outputs[0].name] = value.values
    return found


def _retype(graph: onnx.GraphProto, originals: dict[str, np.ndarray]) -> None:
    """float16 -> bfloat16 throughout ``graph`` (and its subgraphs), values from ``originals`` where they exist."""
    for t in graph.initializer:
        _retype_tensor(t, originals.get(t.name))
    for v in [*graph.input, *graph.output, *graph.value_info]:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
            v.type.tensor_type.elem_type = TensorProto.BFLOAT16
    for node in graph.node:
        for a in node.attribute:
            if a.type == AttributeProto.TENSOR:
                _retype_tensor(a.t, originals.get(node.output[0]) if node.op_type == "Constant" else None)
            elif a.type == AttributeProto.INT and a.name in ("to", "dtype", "output_dtype") \
                    and a.i == TensorProto.FLOAT16:
                a.i = TensorProto.BFLOAT16
            elif a.type == AttributeProto.GRAPH:
                _retype(a.g, originals)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    _retype(g, originals)


def _retype_tensor(t: TensorProto, original: np.ndarray | None) -> None:
    if t.data_type != TensorProto.FLOAT16:
        return
    half = numpy_helper.to_array(t)
    values = original if original is not None and original.shape == half.shape else half.astype(np.float32)
    t.CopyFrom(numpy_helper.from_array(np.asarray(values, np.float32).astype(ml_dtypes.bfloat16), t.name))


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(ToBfloat16)


@hookimpl
def graphopt_register_pipelines(registry):
    registry.add_pipeline(
        "bf16", "to-bf16",
        "bfloat16 weights and compute (opset 22), float32 inputs/outputs, numerically risky ops kept in float32",
    )

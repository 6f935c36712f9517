"""TensorRT's Q/DQ placement rules, part 1: what the ONNX parser rejects or mis-reads in a Q/DQ node itself (zero
points, types, scales, weight axes and ranges, unpaired Q or DQ, quantized outputs). Part 2, where Q/DQ nodes
stand relative to the ops TensorRT fuses, is :mod:`graphopt.backends.tensorrt_fusion_rules`.

:func:`tensorrt_rules` gives every rule, built on the backend's :class:`QuantScheme` (the zero point, the int8
types, per-channel weights and their axes, which ops are quantized come from it, not from constants here). Each
rule quotes the passage it rests on: TensorRT's documentation where the stored copies reach it, otherwise the ONNX
parser's source (onnx/onnx-tensorrt, whose error messages are what a user sees) or NVIDIA ModelOpt's quantizer;
where no passage was found the rule says so and what it rests on instead. ``python -m
graphopt.backends.tensorrt_docs`` prints the catalogue (docs/tensorrt_rules.md).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.backends.lint import FixOutcome, LintRule, QdqView, catalogue
from graphopt.ir.onnx_graph import fresh_name, replace_input

PARSER = ("onnx/onnx-tensorrt, `onnxOpImporters.cpp`, `QuantDequantLinearHelper` (ONNX-TensorRT 10.1 GA, "
          "https://github.com/onnx/onnx-tensorrt)")
OPERATORS = "onnx/onnx-tensorrt, `docs/operators.md` (TensorRT 10.x supported ONNX operators)"
QUANTIZED_TYPES = ("TensorRT documentation, *Working with Quantized Types*, "
                   "https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-quantized-types.html")
EXPLICIT = ("TensorRT documentation, *Explicit Quantization*, https://docs.nvidia.com/deeplearning/tensorrt/latest/"
            "inference-library/quantized-types-explicit-quantization.html")
QUANTIZED_TYPES_NOTE = ("INT8, INT4, and FP8 are treated as `Quantized Types` in TensorRT, where support is available "
                        "only through quantization from a floating-point type with higher precision.")

# data-movement ops a DequantizeLinear's value passes through for the rules (TensorRT propagates DQ forward past them;
# past a Concat when every input is dequantized, which the concat-scales rule then wants at one scale)
THROUGH = frozenset({"Pad", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "MaxPool", "Slice",
                     "Concat"})


def _quant_of(view: QdqView, node):
    """The scheme's TensorQuant for Q/DQ ``node``: weights when it (de)quantizes a constant, else activations."""
    weight = view.is_weight_dq(node) if node.op == "DequantizeLinear" else view.is_constant(node.inputs[0])
    return view.scheme.weights if weight else view.scheme.activations


def _qdq_nodes(view: QdqView):
    return view.nodes("QuantizeLinear", "DequantizeLinear")


class ZeroPoint(LintRule):
    id = "zero-point"
    title = "Q/DQ zero point not zero"
    severity = "error"
    reason = ("TensorRT quantizes symmetrically: its parser refuses a QuantizeLinear/DequantizeLinear whose zero point "
              "is not all zeros (asymmetric activations, as onnxruntime's quantizer writes them).")
    passage = ('"TensorRT only supports symmetric quantization. The zero point for the QuantizeLinear/DequantizeLinear '
               'operator must be all zeros." (parser error)\n\n'
               '"TensorRT employs a symmetric quantization scheme, where both activations and weights are mapped to '
               'quantized values centered around zero." (' + QUANTIZED_TYPES + ")")
    source = PARSER
    fix_text = ("requantize symmetric int8 (zero point 0): graphopt run MODEL --passes fold,int8 --backend tensorrt "
                "--calib DATA")

    def check(self, view):
        out = []
        for node in _qdq_nodes(view):
            zero = view.zero_point(node)
            if zero is None or view.quantized_dtype(node) not in ("int8", "uint8"):
                continue
            quant = _quant_of(view, node)
            expected = int(np.asarray(quant.params(-1.0, 1.0)[1]).flat[0]) if quant.dtype == "int8" else 0
            bad = np.asarray(zero).astype(np.int64) != expected
            if bad.any():
                values = sorted(set(np.asarray(zero).astype(np.int64)[bad].ravel().tolist()))[:3]
                out.append(self.finding(node, f"zero point {', '.join(map(str, values))} (TensorRT needs {expected})"))
        return out


class Uint8(LintRule):
    id = "uint8"
    title = "uint8 quantization"
    severity = "error"
    reason = ("TensorRT has no uint8 quantized type: its parser refuses a DequantizeLinear of a uint8 tensor and a "
              "QuantizeLinear with a uint8 zero point (onnxruntime's quantizer writes uint8 activations by default; "
              "a QuantizeLinear without a zero point is uint8 too).")
    passage = ("`CHECK_STATUS(notInvalidType(inputs.at(0), {\"UINT8\"}, node, nodeIdx));` and, for QuantizeLinear, "
               "`CHECK_STATUS(notInvalidType(inputs.at(2), {\"UINT8\"}, node, nodeIdx));`\n\n"
               '"TensorRT doesn\'t support QuantizeLinear/DequantizeLinear with UINT8 zero_point. TensorRT will use '
               'INT8 instead." (parser warning)\n\n'
               "DequantizeLinear: supported types \"INT8, FP8, INT4\" (" + OPERATORS + ")")
    source = PARSER
    fix_text = ("requantize to int8 with zero point 0: graphopt run MODEL --passes fold,int8 --backend tensorrt "
                "--calib DATA")

    def check(self, view):
        out = []
        for node in _qdq_nodes(view):
            dtype = view.quantized_dtype(node)
            expected = _quant_of(view, node).dtype
            if dtype == "uint8" and expected != "uint8":
                out.append(self.finding(node, f"{'writes' if node.op == 'QuantizeLinear' else 'reads'} uint8 "
                                              f"(TensorRT quantizes to {expected})"))
        return out


class Int32Bias(LintRule):
    id = "int32-bias"
    title = "bias quantized to int32 behind a DequantizeLinear"
    severity = "error"
    reason = ("TensorRT dequantizes only int8, fp8 and int4 tensors; it takes a Conv/Gemm bias as float and folds it "
              "itself (the scheme's bias is float). onnxruntime's quantizer writes the bias as int32 behind a "
              "DequantizeLinear.")
    passage = ("DequantizeLinear: supported types \"INT8, FP8, INT4\" (" + OPERATORS + ")")
    source = OPERATORS
    fix_text = "store the bias as the float values it dequantizes to (--fix does; exact)"
    fixable = True

    def _matches(self, view):
        if view.scheme.bias != "float":
            return []
        return [dq for dq in view.nodes("DequantizeLinear")
                if (value := view.graph.constant_value(dq.inputs[0])) is not None and value.dtype == np.int32]

    def check(self, view):
        return [self.finding(dq, f"dequantizes int32 '{dq.inputs[0].name}'") for dq in self._matches(view)]

    def fix(self, view, context):
        outcome = FixOutcome()
        for dq in self._matches(view):
            value = view.graph.constant_value(dq.inputs[0]).astype(np.float64)
            scale, zero = view.scale(dq), view.zero_point(dq)
            if scale is None or dq.outputs[0].name in view.outputs:
                outcome.left.append(f"{dq.name}: not folded (scale not constant, or a graph output)")
                continue
            axis = int(dq.attrs.get("axis", 1))
            shape = [1] * value.ndim
            if np.size(scale) > 1:
                shape[axis] = -1
            zero = np.zeros(1) if zero is None else np.asarray(zero, np.float64)
            floats = ((value - zero.reshape(shape)) * np.asarray(scale, np.float64).reshape(shape)).astype(np.float32)
            constant = gs.Constant(fresh_name(view.names(), f"{dq.outputs[0].name}_float"), floats)
            for reader in list(dq.outputs[0].outputs):
                replace_input(reader, dq.outputs[0], constant)
            dq.outputs.clear()
            outcome.applied.append(f"{dq.name}: bias '{dq.inputs[0].name}' stored as float")
        return outcome


class ScalePositive(LintRule):
    id = "scale-not-positive"
    title = "Q/DQ scale not positive"
    severity = "error"
    reason = "TensorRT's parser refuses a constant scale with a zero, negative or non-finite coefficient."
    passage = '"Scale coefficients must all be positive" (parser error)'
    source = PARSER
    fix_text = "recalibrate the tensor (a zero scale comes from a constant-zero range; give it scale 1)"

    def check(self, view):
        out = []
        for node in _qdq_nodes(view):
            scale = view.scale(node)
            if scale is None:
                continue
            scale = np.asarray(scale, np.float64)
            if not (np.isfinite(scale).all() and (scale > 0).all()):
                out.append(self.finding(node, f"scale {scale.ravel()[np.argmin(scale.ravel())]:g} is not positive"))
        return out


def _weight_dq(view: QdqView, node):
    """The DequantizeLinear that feeds weighted ``node``'s weight (input 1) a constant, or None."""
    if len(node.inputs) < 2:
        return None
    dq = view.producer(node.inputs[1])
    return dq if dq is not None and dq.op == "DequantizeLinear" and view.is_weight_dq(dq) else None


def _weight_shape(view: QdqView, dq) -> tuple[int, ...] | None:
    source = dq.inputs[0]
    q = view.producer(source)
    value = view.graph.constant_value(q.inputs[0] if q is not None and q.op == "QuantizeLinear" else source)
    return None if value is None else tuple(value.shape)


class WeightPerTensor(LintRule):
    id = "weight-per-tensor"
    title = "weight scale per tensor, not per output channel"
    severity = "warning"
    reason = ("The backend's scheme quantizes weights with one scale per output channel; one scale for the whole "
              "weight builds, but every channel shares the largest channel's step (lower accuracy than the scheme "
              "graphopt measures).")
    passage = ('"The quantization process uses per-tensor, per-channel, or block-wise scaling, depending on the layer '
               'and data type, to best preserve model accuracy during conversion." (' + QUANTIZED_TYPES + ")\n\n"
               "No passage requiring per-channel weights found; the rule rests on the backend's scheme (per-channel "
               "int8 weights, as NVIDIA ModelOpt writes them).")
    source = QUANTIZED_TYPES
    fix_text = "requantize the weight per output channel: graphopt run MODEL --passes fold,int8 --backend tensorrt"

    def check(self, view):
        out = []
        if not view.scheme.weights.per_channel:
            return out
        for node in view.nodes(*sorted(view.scheme.weighted_ops)):
            dq = _weight_dq(view, node)
            shape = _weight_shape(view, dq) if dq is not None else None
            scale = view.scale(dq) if dq is not None else None
            if shape is None or scale is None or np.size(scale) != 1:
                continue
            axis = view.scheme.channel_axis(node.op, node.attrs, len(shape))
            if axis is not None and shape[axis] > 1:
                out.append(self.finding(node, f"weight '{node.inputs[1].name}' has one scale for its "
                                              f"{shape[axis]} output channels (axis {axis})"))
        return out


class WeightAxis(LintRule):
    id = "weight-axis"
    title = "per-channel weight scale on the wrong axis"
    severity = "error"
    reason = ("TensorRT reads per-channel weight scales along the output channels (Conv 0, ConvTranspose 1, Gemm 1, "
              "or 0 with transB, MatMul the last axis); scales along another axis are refused when their count "
              "differs, and scale the wrong channels when it happens to match.")
    passage = ('"a quantization-axis attribute was added in opset 13 (required for per-channel quantization)" ('
               + EXPLICIT + ")\n\n"
               '"Per-Channel Quantization. We assume this is weight-quantization with dimensions KCRS (K is # output '
               'channels). Activations-quantization does not support per-axis quantization." and "The number of '
               'scales is not equal to the number of output channels." (' + PARSER + ")")
    source = PARSER
    fix_text = ("requantize the weight along its output-channel axis: graphopt run MODEL --passes fold,int8 "
                "--backend tensorrt")

    def check(self, view):
        out = []
        for node in view.nodes(*sorted(view.scheme.weighted_ops)):
            dq = _weight_dq(view, node)
            shape = _weight_shape(view, dq) if dq is not None else None
            scale = view.scale(dq) if dq is not None else None
            if shape is None or scale is None or np.size(scale) == 1:
                continue
            # the scheme's output-channel axis, asked as if it were per channel (the weight here is)
            per_channel = replace(view.scheme, weights=replace(view.scheme.weights, per_channel=True))
            expected = per_channel.channel_axis(node.op, node.attrs, len(shape))
            axis = int(dq.attrs.get("axis", 1))
            axis = axis + len(shape) if axis < 0 else axis
            if axis != expected:
                out.append(self.finding(node, f"weight '{node.inputs[1].name}' is scaled along axis {axis}; its "
                                              f"output channels are axis {expected}"))
        return out


class WeightRange(LintRule):
    id = "weight-range"
    title = "int8 weight outside [-127, 127]"
    severity = "warning"
    reason = ("TensorRT's int8 weights are symmetric, [-127, 127]; a stored -128 is not on that grid, so the engine "
              "does not compute what onnxruntime measured on the same file.")
    passage = ("No passage of NVIDIA's current guide found in the stored copies. The rule rests on the scheme's "
               "narrow weight range ([-127, 127]: a symmetric grid, where negating a weight cannot overflow) and on "
               "TensorRT's older guide as translated in a stored copy: \"TensorRT仅支持[-128,127]范围内的INT8激活和"
               "[-127,127]范围内的INT8权重\" (TensorRT supports only INT8 activations in [-128, 127] and INT8 weights "
               "in [-127, 127]; https://blog.csdn.net/qq_33287871/article/details/113788834).")
    source = "the backend's QuantScheme (weights: int8 symmetric, narrow range)"
    fix_text = "requantize the weight symmetric in [-127, 127] (graphopt's int8 does)"

    def check(self, view):
        out = []
        qmin, qmax = view.scheme.weights.qrange
        for dq in view.nodes("DequantizeLinear"):
            value = view.graph.constant_value(dq.inputs[0])
            if value is None or value.dtype != np.int8 or value.size == 0:
                continue
            low, high = int(value.min()), int(value.max())
            if low < qmin or high > qmax:
                count = int(((value < qmin) | (value > qmax)).sum())
                out.append(self.finding(dq, f"{count} value(s) of '{dq.inputs[0].name}' outside [{qmin}, {qmax}] "
                                            f"(min {low})"))
        return out


class Unpaired(LintRule):
    id = "unpaired-qdq"
    title = "QuantizeLinear not followed by DequantizeLinear, or DequantizeLinear of a tensor no Q wrote"
    severity = "error"
    reason = ("TensorRT takes int8 activations only as the output of a QuantizeLinear, and an int8 tensor only into "
              "a DequantizeLinear: a Q read by another op or by nothing, or a DQ of a graph input or of another op's "
              "output, has no int8 kernel to run it.")
    passage = f'"{QUANTIZED_TYPES_NOTE}"'
    source = OPERATORS
    fix_text = "remove the stray Q (or DQ), or pair it: Q -> DQ, a DQ reading a Q or a constant"

    def check(self, view):
        out = []
        for node in view.nodes("QuantizeLinear"):
            tensor = node.outputs[0]
            readers = [r for r in tensor.outputs if r.op != "DequantizeLinear"]
            if not tensor.outputs and tensor.name not in view.outputs:
                out.append(self.finding(node, "its output is read by nothing (a dangling QuantizeLinear)",
                                        "remove it"))
            elif readers:
                out.append(self.finding(node, f"its int8 output is read by {readers[0].op} '{readers[0].name}', "
                                              "not a DequantizeLinear"))
        for node in view.nodes("DequantizeLinear"):
            source = node.inputs[0]
            writer = view.producer_op(source)
            if view.is_constant(source) or writer == "QuantizeLinear":
                continue
            what = f"{writer} '{view.producer(source).name}'" if writer else "a graph input"
            out.append(self.finding(node, f"dequantizes '{source.name}', written by {what}, not by a QuantizeLinear",
                                    "feed the float tensor through QuantizeLinear -> DequantizeLinear instead"))
        return out


class QuantizedOutput(LintRule):
    id = "quantized-output"
    title = "graph output quantized"
    severity = "warning"
    reason = ("A Q/DQ pair right before a graph output only rounds the result to 8 bits: no int8 kernel reads it "
              "(an int8 output read by nothing in the engine is worse still).")
    passage = ("No passage found in the stored copies of NVIDIA's guide; the rule rests on the parser's note "
               f"\"{QUANTIZED_TYPES_NOTE}\" ({OPERATORS}) and on what the pair computes.")
    source = OPERATORS
    fix_text = "remove the Q/DQ before the output (graphopt's placement leaves outputs float)"

    def check(self, view):
        out = []
        for tensor in view.gs.outputs:
            node = view.producer(tensor)
            if node is None:
                continue
            if node.op == "QuantizeLinear":
                out.append(self.finding(node, f"graph output '{tensor.name}' is int8"))
            elif node.op == "DequantizeLinear" and view.producer_op(node.inputs[0]) == "QuantizeLinear":
                out.append(self.finding(node, f"graph output '{tensor.name}' is rounded to int8 and back"))
        return out


class NoImporter(LintRule):
    id = "no-importer"
    title = "op TensorRT's ONNX parser cannot import (onnxruntime's integer or contrib formats)"
    severity = "error"
    reason = ("TensorRT reads int8 only as explicit Q/DQ around float ops; onnxruntime's own quantized forms "
              "(int8-dynamic's DynamicQuantizeLinear + MatMulInteger, QOperator's QLinearConv / QLinearMatMul) and "
              "its com.microsoft contrib ops (int4-weight's MatMulNBits, GatherBlockQuantized) have no importer, so "
              "the parser rejects the model.")
    passage = ('"| DynamicQuantizeLinear | N | Not supported." "| MatMulInteger | N |" "| ConvInteger | N |" '
               '"| QLinearConv | N |" "| QLinearMatMul | N |" (the support matrix lists no com.microsoft op)')
    source = OPERATORS
    fix_text = "quantize for TensorRT with static int8 Q/DQ (graphopt run --passes int8 --backend tensorrt)"
    UNSUPPORTED = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul"})

    def check(self, view):
        out = []
        for node in view.gs.nodes:
            domain = node.domain or ""
            if domain in ("", "ai.onnx") and node.op in self.UNSUPPORTED:
                out.append(self.finding(node, f"{node.op} has no importer in TensorRT's ONNX parser"))
            elif domain == "com.microsoft":
                out.append(self.finding(node, f"{node.op} is an onnxruntime contrib op ({domain}): TensorRT's "
                                              f"ONNX parser has no importer for it"))
        return out


def tensorrt_rules(scheme) -> tuple[LintRule, ...]:
    """Every TensorRT placement rule, on ``scheme`` (the backend's QuantScheme)."""
    from graphopt.backends.tensorrt_fusion_rules import FUSION_RULES

    classes = (ZeroPoint, Uint8, Int32Bias, ScalePositive, WeightPerTensor, WeightAxis, WeightRange, Unpaired,
               QuantizedOutput, NoImporter, *FUSION_RULES)
    return tuple(cls(scheme, THROUGH) for cls in classes)


INTRO = ("What `graphopt verify --backend tensorrt MODEL` checks in a Q/DQ ONNX model, whoever made it. **error**: "
         "TensorRT's ONNX parser or builder rejects the graph; **warning**: it builds, but a Q/DQ pair stops a fusion "
         "or runs slower than fp16. `--strict` exits non-zero on any finding; `--fix -o OUT` applies the safe fixes. "
         "Passages are quoted verbatim from NVIDIA's documentation, the ONNX-TensorRT parser's source (its messages "
         "are what a user sees) or NVIDIA ModelOpt's ONNX quantizer; a rule without one says what it rests on.")


def tensorrt_catalogue(rules) -> str:
    """The catalogue of ``rules`` (the backend's, :meth:`TensorRTBackend.lint_rules`) as Markdown."""
    return catalogue("TensorRT", rules, INTRO)

"""TensorRT's Q/DQ placement rules, part 2: where Q/DQ nodes stand relative to the ops TensorRT fuses (a weighted op
half quantized, a residual Add it cannot fuse, a Q/DQ between Pad and Conv, Concat inputs with different scales,
Q/DQ before ops TensorRT runs in float, ModelOpt's small-channel and GEMV exclusions), with the safe fixes.

Part 1 and the rule list are :mod:`graphopt.backends.tensorrt_rules`. Which ops are quantized, which fuse an Add,
and the activation grid a fix quantizes with come from the backend's :class:`QuantScheme`.
"""

from __future__ import annotations

import numpy as np

from graphopt.backends.fusion import RESIDUAL_ANCHORS
from graphopt.backends.lint import FixOutcome, LintRule, QdqView
from graphopt.backends.qdq_plan import too_small
from graphopt.ir.onnx_graph import replace_input

FIGURES = ("TensorRT Developer Guide (https://docs.nvidia.com/deeplearning/tensorrt/developer-guide/index.html), "
           "figure captions of the Q/DQ fusion section, as mirrored at http://m.weizhi.cc/tech/detail-269658.html "
           "(the stored copy of NVIDIA's page does not reach that section)")
EXPLICIT = ("TensorRT documentation, *Explicit Quantization*, https://docs.nvidia.com/deeplearning/tensorrt/latest/"
            "inference-library/quantized-types-explicit-quantization.html")
MODELOPT = ("NVIDIA/TensorRT-Model-Optimizer, `modelopt/onnx/quantization/graph_utils.py` (commit 5a4242fa, "
            "https://github.com/NVIDIA/TensorRT-Model-Optimizer)")
MODELOPT_INT8 = ("NVIDIA/TensorRT-Model-Optimizer, `modelopt/onnx/quantization/int8.py` (commit 5a4242fa, "
                 "https://github.com/NVIDIA/TensorRT-Model-Optimizer)")

MOVERS = ("Pad", "Reshape", "Transpose")  # ops a Q/DQ must stand before, not between them and the Conv
FLOAT_OPS = ("Softmax", "LayerNormalization")  # TensorRT runs these in float: a Q/DQ before them only rounds


def _quantized(view: QdqView, node) -> bool:
    """Whether weighted/quantized ``node`` has any of its two data inputs dequantized."""
    return any(view.dequantized(t) for t in node.inputs[:2])


class InputNotQuantized(LintRule):
    id = "input-not-quantized"
    title = "weighted op half quantized: an input without Q/DQ"
    severity = "warning"
    reason = ("TensorRT runs Conv, ConvTranspose, Gemm and MatMul in int8 only when all their inputs come through "
              "DequantizeLinear: with one input float the op runs in float, its Q/DQ only rounding. (A weighted op "
              "with no Q/DQ at all is a deliberate exclusion and is not reported.)")
    passage = ('"When using pre-quantized weights, an IDequantizeLayer is required between the weights and the linear '
               'operator that uses them." (' + EXPLICIT + ")\n\n"
               '"Figure 3. Two examples of how TensorRT fuses convolutional layers. On the left, only the inputs are '
               'quantized. On the right, both inputs and output are quantized." (' + FIGURES + ")")
    source = EXPLICIT
    fix_text = "quantize the float input too (graphopt run MODEL --passes fold,int8 --backend tensorrt), or neither"

    def check(self, view):
        out = []
        for node in view.nodes(*sorted(view.scheme.weighted_ops)):  # an Add is the residual rule's business
            inputs = node.inputs[:2]
            if len(inputs) < 2 or not _quantized(view, node):
                continue
            floats = [t for t in inputs if not view.dequantized(t)]
            if floats:
                out.append(self.finding(node, f"input '{floats[0].name}' has no Q/DQ while "
                                              f"'{next(t for t in inputs if view.dequantized(t)).name}' has: "
                                              "it runs in float"))
        return out


class ResidualNotQuantized(LintRule):
    id = "residual-not-quantized"
    title = "residual Add with a float input TensorRT cannot fuse"
    severity = "warning"
    reason = ("TensorRT fuses an Add into the weighted op that writes one of its inputs when the other, residual, "
              "input is quantized; the precision of the residual input decides the fused op's output. A float "
              "residual keeps the conv's output float (no int8 output, the next Q not fused), and an Add of a "
              "dequantized tensor and a float one no weighted op writes runs as a separate float layer.")
    passage = ('"Figure 6. The precision of xf1 is floating-point, so the output of the fused convolution is limited '
               'to floating-point, and the trailing Q-layer cannot be fused with the convolution."\n\n'
               '"Figure 7. When xf1 is quantized to INT8, the output of the fused convolution is also INT8, and the '
               'trailing Q-layer is fused with the convolution."\n\n'
               '"Figure 8. An example of quantizing a quantizable-operator. An element-wise addition operator is fused '
               'with the input DQ operators and the output Q operator." (' + FIGURES + ")")
    source = FIGURES
    fix_text = "quantize the residual input from its calibrated range (--fix --calib DATA does)"
    fixable = True

    def _fusable(self, view: QdqView, tensor) -> bool:
        """Written by a quantized convolution (through a bias Add: its epilogue) and read by nothing else."""
        node = view.producer(tensor)
        if node is not None and node.op == "Add" and len(node.inputs) == 2 and len(node.outputs[0].outputs) == 1 \
                and sum(view.is_constant(t) for t in node.inputs) == 1:
            node = view.producer(next(t for t in node.inputs if not view.is_constant(t)))
        return (node is not None and node.op in RESIDUAL_ANCHORS and _quantized(view, node)
                and len(tensor.outputs) == 1 and tensor.name not in view.outputs)

    def _targets(self, view: QdqView):
        """(Add, its float input to quantize, why) for every Add this rule reports."""
        if not view.scheme.fused_add:
            return []
        found = []
        for add in view.nodes("Add"):
            if len(add.inputs) != 2 or any(view.is_constant(t) for t in add.inputs):
                continue
            a, b = add.inputs
            qa, qb = view.dequantized(a), view.dequantized(b)
            if qa and qb:
                continue
            if qa or qb:
                other = b if qa else a
                if not self._fusable(view, other):
                    found.append((add, other, f"input '{other.name}' is float and no weighted op it could fuse "
                                              "into writes it: the Add runs in float"))
            elif self._fusable(view, a) or self._fusable(view, b):
                fused, other = (a, b) if self._fusable(view, a) else (b, a)
                found.append((add, other, f"residual input '{other.name}' is float: "
                                          f"'{view.producer(fused).name}' fuses the Add but its output stays float"))
        return found

    def check(self, view):
        return [self.finding(add, why) for add, _, why in self._targets(view)]

    def fix(self, view, context):
        outcome = FixOutcome()
        targets = self._targets(view)
        if not targets:
            return outcome
        if context.ranges is None:
            outcome.left += [f"{add.name}: quantizing '{t.name}' needs its range: give --calib DATA"
                             for add, t, _ in targets]
            return outcome
        ranges = context.ranges(sorted({t.name for _, t, _ in targets}))
        for add, tensor, _ in targets:
            lo, hi = ranges[tensor.name]
            scale, zero = view.scheme.activations.params(lo, hi)
            view.insert_qdq(tensor, add, scale, zero, f"{add.name}/residual")
            outcome.applied.append(f"{add.name}: quantized input '{tensor.name}' (range [{lo:.4g}, {hi:.4g}], "
                                   f"scale {float(scale):.4g})")
        return outcome


class QdqAfterPad(LintRule):
    id = "qdq-after-pad"
    title = "Q/DQ between Pad (or Reshape/Transpose) and Conv"
    severity = "warning"
    reason = ("TensorRT moves a DequantizeLinear forward past data-movement ops so that the Conv meets its Q/DQ "
              "input (and a Pad becomes the Conv's padding); a Q/DQ pair written after the Pad/Reshape/Transpose "
              "leaves that op running on float data before the int8 Conv instead of fused with it.")
    passage = ('"Figure 2. An illustration depicting a DQ forward-propagation and Q backward-propagation." '
               "(" + FIGURES + ")\n\n"
               "No passage naming Pad found in the stored copies; the rule rests on that propagation: a Q/DQ placed "
               "before the data-movement op is the form TensorRT reaches by itself.")
    source = FIGURES
    fix_text = "move the Q/DQ before the Pad/Reshape/Transpose (--fix does; exact for a per-tensor Q/DQ)"
    fixable = True

    def _matches(self, view: QdqView):
        """(q, dq, mover, conv) for every Q/DQ between a mover and a Conv."""
        found = []
        for conv in view.nodes("Conv", "ConvTranspose"):
            dq = view.producer(conv.inputs[0])
            q = view.producer(dq.inputs[0]) if dq is not None and dq.op == "DequantizeLinear" else None
            mover = view.producer(q.inputs[0]) if q is not None and q.op == "QuantizeLinear" else None
            if mover is not None and mover.op in MOVERS and not view.dequantized(mover.inputs[0]):
                found.append((q, dq, mover, conv))
        return found

    def check(self, view):
        return [self.finding(q, f"Q/DQ between {mover.op} '{mover.name}' and {conv.op} '{conv.name}'")
                for q, dq, mover, conv in self._matches(view)]

    def fix(self, view, context):
        outcome = FixOutcome()
        for q, dq, mover, conv in self._matches(view):
            why = self._unsafe(view, q, dq, mover)
            if why:
                outcome.left.append(f"{q.name}: not moved ({why})")
                continue
            moved, dq_out = mover.outputs[0], dq.outputs[0]
            readers = list(dq_out.outputs)
            q.inputs[0] = mover.inputs[0]  # x -> Q -> DQ -> mover -> readers
            mover.inputs[0] = dq_out
            for reader in readers:
                replace_input(reader, dq_out, moved)
            q.outputs[0].shape = dq_out.shape = None  # they now hold the tensor before the move
            outcome.applied.append(f"{q.name}: moved the Q/DQ before {mover.op} '{mover.name}'")
        return outcome

    @staticmethod
    def _unsafe(view: QdqView, q, dq, mover) -> str | None:
        """Why moving this Q/DQ could change the model (None: it cannot)."""
        if len(mover.outputs[0].outputs) != 1 or mover.outputs[0].name in view.outputs:
            return f"{mover.op} '{mover.name}' has other readers"
        if len(q.outputs[0].outputs) != 1 or dq.outputs[0].name in view.outputs:
            return "the Q/DQ has other readers"
        if any(np.size(view.scale(n)) != 1 for n in (q, dq)):
            return "per-axis scale"
        if mover.op == "Pad":
            value = view.graph.constant_value(mover.inputs[2]) if len(mover.inputs) > 2 and mover.inputs[2].name \
                else None
            if value is not None and np.any(value != 0):
                return "the Pad's value is not 0"
        return None


class ConcatScales(LintRule):
    id = "concat-scales"
    title = "Concat inputs with different scales"
    severity = "warning"
    reason = ("TensorRT moves the Q/DQ of a Concat's inputs across it only when their scales are equal; with "
              "different scales the Concat runs on float (or a reformat per input) instead of copying int8.")
    passage = ('"Figure 10. An example showing scales of Q1 and Q2 are compared for equality, and if equal, they are '
               'allowed to propagate backward." (' + FIGURES + ")")
    source = FIGURES
    fix_text = "give the Concat's inputs one scale, the widest (--fix does)"
    fixable = True

    def _matches(self, view: QdqView):
        found = []
        for cat in view.nodes("Concat"):
            dqs = [view.producer(t) for t in cat.inputs]
            if len(dqs) < 2 or any(d is None or d.op != "DequantizeLinear" for d in dqs):
                continue
            scales = [view.scale(d) for d in dqs]
            zeros = [view.zero_point(d) for d in dqs]
            if any(s is None or np.size(s) != 1 for s in scales):
                continue
            values = [float(np.asarray(s).ravel()[0]) for s in scales]
            same_zero = all(np.array_equal(np.asarray(z if z is not None else 0), np.asarray(
                zeros[0] if zeros[0] is not None else 0)) for z in zeros)
            if len(set(values)) > 1 or not same_zero:
                found.append((cat, dqs, values))
        return found

    def check(self, view):
        return [self.finding(cat, f"input scales {', '.join(f'{v:.4g}' for v in values)} differ")
                for cat, _, values in self._matches(view)]

    def fix(self, view, context):
        outcome = FixOutcome()
        for cat, dqs, values in self._matches(view):
            qs = [view.producer(d.inputs[0]) for d in dqs]
            if any(q is None or q.op != "QuantizeLinear" for q in qs):
                outcome.left.append(f"{cat.name}: not unified (an input is a dequantized constant, not a Q/DQ pair)")
                continue
            widest = np.float32(max(values))
            for q in qs:  # the Q and every DQ reading it: they share the tensor's scale
                for node in [q, *[r for r in q.outputs[0].outputs if r.op == "DequantizeLinear"]]:
                    view.set_scale(node, widest)
            outcome.applied.append(f"{cat.name}: one scale {float(widest):.4g} for its {len(dqs)} inputs "
                                   f"(was {', '.join(f'{v:.4g}' for v in values)})")
        return outcome


class FloatOpQdq(LintRule):
    id = "float-op-qdq"
    title = "Q/DQ before an op TensorRT runs in float (Softmax, LayerNormalization)"
    severity = "warning"
    reason = ("TensorRT runs Softmax and LayerNormalization in float (fp16/fp32): a Q/DQ on their input does not "
              "make them int8, it only rounds their input to 8 bits (and costs a reformat).")
    passage = ('ModelOpt\'s MHA pattern keeps Softmax\'s input float: "Q -> DQ -> BMM1 -> (Mul/Div) -> (Add) -> '
               'Softmax -> (Cast) -> Q -> DQ -> BMM2 -> Q -> DQ." (' + MODELOPT + ", `match_fp8_mha_pattern`)\n\n"
               "No TensorRT passage found for LayerNormalization; the rule rests on ModelOpt leaving it float.")
    source = MODELOPT
    fix_text = "remove the Q/DQ before it (quantize after it, where an int8 op reads)"

    def check(self, view):
        out = []
        for node in view.nodes(*FLOAT_OPS):
            dq = view.producer(node.inputs[0])
            if dq is not None and dq.op == "DequantizeLinear":
                out.append(self.finding(node, f"its input '{node.inputs[0].name}' comes through Q/DQ"))
        return out


def _weight(view: QdqView, node) -> np.ndarray | None:
    """The constant weight of ``node`` (input 1): a float constant, or the int8 one behind its DequantizeLinear."""
    tensor = node.inputs[1] if len(node.inputs) > 1 else None
    if tensor is None:
        return None
    dq = view.producer(tensor)
    if dq is not None and dq.op == "DequantizeLinear":
        tensor = dq.inputs[0]
        q = view.producer(tensor)
        tensor = q.inputs[0] if q is not None and q.op == "QuantizeLinear" else tensor
    return view.graph.constant_value(tensor)


def _float_source(view: QdqView, tensor):
    """The float tensor a Q/DQ pair quantized to make ``tensor`` (``tensor`` itself when it is not one)."""
    dq = view.dequantizer(tensor)
    q = view.producer(dq.inputs[0]) if dq is not None else None
    return q.inputs[0] if q is not None and q.op == "QuantizeLinear" else tensor


class SmallConv(LintRule):
    id = "small-conv"
    title = "quantized Conv with fewer than 16 input or output channels"
    severity = "warning"
    reason = ("TensorRT has no fast int8 kernel for Convs this narrow: NVIDIA ModelOpt leaves them float (fp16), "
              "and an int8 one runs slower than that.")
    passage = ('"The input and output channels should be >= 16. The exception is for Conv layers in INT8 quantization '
               'mode, which supports it if the input or output channel % 8." (' + MODELOPT
               + ", `find_nodes_from_convs_to_exclude`; the exact exceptions are ported from it)")
    source = MODELOPT
    fix_text = "leave this Conv float (graphopt run ... --passes 'fold,int8:exclude_nodes=NAME')"

    def check(self, view):
        inputs = {t.name for t in view.gs.inputs}
        out = []
        for node in view.nodes("Conv"):
            if _quantized(view, node):
                why = too_small(node, view.scheme, view.shapes(), _weight(view, node),
                                _float_source(view, node.inputs[0]).name in inputs)  # ModelOpt: the first layer
                if why:
                    out.append(self.finding(node, f"{why}: int8 is slower than fp16 here"))
        return out


class Gemv(LintRule):
    id = "gemv"
    title = "quantized MatMul/Gemm that is a GEMV (M or N = 1) or a small GEMM (K or N < 16)"
    severity = "warning"
    reason = ("A matrix product with one row or one column cannot use Tensor Cores; its Q/DQ only add work, so "
              "NVIDIA ModelOpt leaves it float.")
    passage = ('"Either of m or n in matmul is 1, this matmul cannot utilize TensorCores. The perf of adding Q/DQ '
               'layers is not good in TRT. Thus, in this case, do not add Q/DQ layers to this matmul." ('
               + MODELOPT_INT8 + "; the shape test is ported from `graph_utils._exclude_matmuls_by_shape_inference`)"
               "\n\n"
               '"K or N is smaller than ``_MIN_MATMUL_DIM`` (16): both INT8 and FP8 Tensor Core kernels need K/N >= 16 '
               'to be efficient, and adding Q/DQ layers on such small GEMMs causes TRT perf regressions." ('
               "NVIDIA ModelOpt 0.47, `modelopt/onnx/quantization/graph_utils.py`, "
               "`find_nodes_from_matmul_to_exclude`)")
    source = MODELOPT
    fix_text = "leave this MatMul/Gemm float (graphopt run ... --passes 'fold,int8:exclude_nodes=NAME')"

    def check(self, view):
        out = []
        for node in view.nodes("MatMul", "Gemm"):
            if _quantized(view, node):
                why = too_small(node, view.scheme, view.shapes(), _weight(view, node))
                if why:
                    out.append(self.finding(node, f"{why}: int8 is slower than fp16 here"))
        return out


FUSION_RULES = (InputNotQuantized, ResidualNotQuantized, QdqAfterPad, ConcatScales, FloatOpQdq, SmallConv, Gemv)

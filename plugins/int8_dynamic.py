"""int8-dynamic: int8 weights per output channel, activations quantized at run time, for MatMul and Gemm."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import Equivalence, Pass, PassResult, hookimpl
from graphopt.backends import QuantRequest
from graphopt.errors import UnsupportedError, UsageError
from graphopt.ir.fx_ops import onnx_op_type
from graphopt.ir.gs_gaps import gs_graphs
from graphopt.ir.onnx_graph import fresh_name
from graphopt.ir.ops import OpKind, is_standard_domain

SUPPORTED_OPS = ("MatMul", "Gemm")
_CONVOLUTIONS = frozenset({OpKind.CONV, OpKind.CONV_TRANSPOSE})  # listed in the note when they stay float


class Int8Dynamic(Pass):
    """Quantize MatMul and Gemm with a constant weight to int8 weights and run-time (dynamic) int8 activations.

    Each such ``Y = X·W (+ bias)`` becomes standard ONNX, the form onnxruntime's ``quantize_dynamic`` writes
    and onnxruntime fuses into ``MatMulIntegerToFloat`` / ``DynamicQuantizeMatMul`` (bias included)::

        DynamicQuantizeLinear(X) -> Xq (uint8), x_scale, x_zero    one per input tensor, shared by its readers
        MatMulInteger(Xq, Wq, x_zero) -> int32                     Wq: int8 initializer, (K, N)
        Cast(float) · Mul(x_scale · w_scale)  (+ bias)             w_scale: one per output column

    Weights are quantized in the backend's weight scheme (onnxruntime: int8, symmetric, narrow range
    [-127, 127], one scale per output channel: MatMul's last axis, Gemm's N; zero points 0, so MatMulInteger
    takes none); activations are asymmetric uint8, the only type ``DynamicQuantizeLinear`` produces and the one
    the x86 VNNI kernels multiply with int8 weights. Gemm's ``alpha`` and ``transB`` are folded into the weight
    and ``beta·C`` becomes an Add. No calibration data is needed; batch and sequence dimensions stay dynamic.

    Why this form (measured on a BERT-like encoder, onnxruntime 1.31, 2 threads): onnxruntime fuses it into the
    same kernels as the contrib ops written directly, while staying plain ONNX any runtime can execute; and no
    shapes are written into the graph: with them, onnxruntime fuses Add + LayerNormalization into
    ``SkipLayerNormalization``, whose CPU kernel is slower than the two ops it replaces.

    Stay float and listed in a note: MatMuls whose both inputs are activations (attention's Q·Kᵀ and scores·V),
    weights that are not float32 or are 1-D, Gemm with ``transA``, nodes excluded by the options, and
    convolutions (no dynamic int8 form here: use the static ``int8`` pipeline). Options: ``ops`` (which of
    MatMul, Gemm), ``exclude_nodes`` (node names), ``per_channel`` (false: one scale per weight),
    ``min_weight_elements`` (smaller weights stay float); the weight scheme is the run's backend's. A second run
    finds nothing left to quantize. Approximate: outputs move by the rounding of weights and activations.

    A weight holding NaN or infinity stays float (no scale represents it), with a warning naming the tensor and
    how many of its values are not finite. A MatMul/Gemm with a float16 weight is refused: quantize the float32
    model. ``DynamicQuantizeLinear`` needs opset 11 (``min_opset``: the pass manager converts an older model
    first); called directly on an older model the pass refuses, unless there is nothing to quantize (then the
    model comes back unchanged, with a note). Nodes outside the default ONNX domain are left alone.

    On a PyTorch model (captured as ATen ops, batch and sequence dimensions dynamic) each Linear and MatMul with a
    constant weight gets the same scheme through PT2E (int8 weights per output channel behind a dequantize, the
    input quantized at run time by ``choose_qparams``): the form the x86 backend lowers to oneDNN's dynamic int8
    Linear, and that exports to ONNX.
    """

    name = "int8-dynamic"
    irs = frozenset({"onnx", "fx"})
    equivalence = Equivalence.APPROXIMATE
    recovery = ("keep the sensitive MatMuls float (int8-dynamic:exclude_nodes=...), or quantize only large weights "
                "(min_weight_elements=...)")
    min_opset = 11  # DynamicQuantizeLinear, MatMulInteger

    @dataclass(frozen=True)
    class Options:
        ops: tuple[str, ...] = SUPPORTED_OPS
        exclude_nodes: tuple[str, ...] = ()
        per_channel: bool = True
        min_weight_elements: int = 0

    def requires(self, graph, ctx):
        self._check_ops()

    def run_onnx(self, graph, ctx):
        scheme = ctx.scheme(QuantRequest(per_channel=self.options.per_channel), self.name)
        if scheme.activations.dtype != "uint8":
            raise UnsupportedError(f"pass '{self.name}': the {scheme.backend} scheme has {scheme.activations.dtype} "
                                   f"activations; DynamicQuantizeLinear produces uint8 only (quantize with int8 for "
                                   f"{scheme.backend})")
        g = graph.gs
        names = set(g.tensors()) | {n.name for n in g.nodes}
        excluded = set(self.options.exclude_nodes)
        missing = sorted(excluded - {n.name for n in g.nodes})
        self.warn_unmatched(ctx, "exclude_nodes", missing)
        floats: dict[str, Counter] = {}
        todo = []
        for node in list(g.nodes):
            if not is_standard_domain(node.domain) or node.op not in SUPPORTED_OPS:
                if graph.kind(node) in _CONVOLUTIONS:
                    why = "no dynamic int8 form here; the static int8 pipeline quantizes them"
                    floats.setdefault(why, Counter())[node.op] += 1
                continue
            weight, why = self._weight(graph, node, excluded, ctx)
            if weight is None:
                floats.setdefault(why, Counter())[node.op] += 1
            else:
                todo.append((node, weight))
        for node in (n for sub in gs_graphs(g)[1:] for n in sub.nodes):
            if node.op in SUPPORTED_OPS:
                floats.setdefault("inside an If/Loop/Scan body, left as it is", Counter())[node.op] += 1
        notes = [f"stay float ({why}): " + ", ".join(f"{op} x{k}" for op, k in c.most_common())
                 for why, c in floats.items()]
        if not todo:
            return PassResult(graph, False, {}, notes + ["no MatMul/Gemm with a constant float32 weight to "
                                                         "quantize: nothing to do"])
        if graph.opset < self.min_opset:
            raise self.fail(f"DynamicQuantizeLinear needs opset {self.min_opset}+, the model has {graph.opset} "
                            f"(convert it with onnx.version_converter, or run the pass in a pipeline, which does)")
        done: Counter = Counter()
        shared_x: dict[int, tuple] = {}
        shared_w: dict[tuple, tuple] = {}
        for node, weight in todo:
            _rewrite(graph, node, weight, scheme, names, shared_x, shared_w)
            done[node.op] += 1
        g.cleanup().toposort()
        return PassResult(graph, True, {f"quantized {op}": done[op] for op in SUPPORTED_OPS if done[op]}, notes)

    def run_fx(self, graph, ctx):
        from graphopt.ir.fx_graph import FxGraph
        from graphopt.pt2e.prepare import convert_ptq
        from graphopt.pt2e.quantizer import SchemeQuantizer, unmatched

        self._check_ops()
        scheme = ctx.scheme(QuantRequest(per_channel=self.options.per_channel), self.name)
        aten = graph.aten()
        self.warn_unmatched(ctx, "exclude_nodes", unmatched(aten.gm, self.options.exclude_nodes),
                            "node or module of the model")
        quantizer = SchemeQuantizer(scheme, {}, exclude=self.options.exclude_nodes, dynamic=dict(
            ops=tuple(self.options.ops), min_weight_elements=self.options.min_weight_elements))
        gm = convert_ptq(aten.gm, aten.example_inputs, quantizer)
        placed = quantizer.plan
        notes = ["stay float: " + ", ".join(f"{op} x{k}" for op, k in placed.left_float.most_common())] \
            if placed.left_float else []
        if not placed.quantized:
            return PassResult(aten, aten is not graph, {}, notes + ["no Linear/MatMul with a constant float weight to "
                                                                    "quantize: nothing to do"])
        done = Counter(onnx_op_type(n) for n in placed.quantized)
        return PassResult(FxGraph(gm, aten.example_inputs, "torch.export"), True,
                          {f"quantized {op}": done[op] for op in SUPPORTED_OPS if done[op]}, notes)

    def _check_ops(self):
        unknown = [op for op in self.options.ops if op not in SUPPORTED_OPS]
        if unknown:
            raise UsageError(f"pass '{self.name}': ops must be among {', '.join(SUPPORTED_OPS)}, not "
                             f"{', '.join(unknown)} (convolutions: the static int8 pipeline, --passes fold,int8)")

    def _weight(self, graph, node, excluded, ctx) -> tuple[np.ndarray | None, str]:
        """The weight as a float32 (..., K, N) array with Gemm's alpha and transB folded in, or why not."""
        if node.op not in self.options.ops:
            return None, f"not in ops={'+'.join(self.options.ops)}"
        if node.name in excluded:
            return None, "in exclude_nodes"
        w = graph.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None:
            return None, "weight not constant: both inputs are activations, e.g. attention's Q·Kᵀ and scores·V"
        label = node.name or node.outputs[0].name
        if w.dtype == np.float16:
            raise UnsupportedError(
                f"pass '{self.name}': {node.op} '{label}' computes in float16 (weight '{node.inputs[1].name}'); "
                f"dynamic int8 quantizes float32 MatMul/Gemm (quantize the float32 model, and convert to fp16 "
                f"neither before nor after int8)")
        if w.dtype != np.float32 or w.ndim < 2:
            return None, "weight not a float32 matrix"
        bad = int(w.size - np.count_nonzero(np.isfinite(w)))
        if bad:
            ctx.warn(f"{self.name}: {node.op} '{label}' stays float: its weight '{node.inputs[1].name}' holds "
                     f"{bad} non-finite values (NaN/inf) of {w.size}")
            return None, "weight holds NaN/inf"
        if w.size < self.options.min_weight_elements:
            return None, f"weight under min_weight_elements={self.options.min_weight_elements}"
        if node.op == "Gemm":
            attrs = node.attrs
            if int(attrs.get("transA", 0)):
                return None, "Gemm with transA"
            if len(node.inputs) > 2 and float(attrs.get("beta", 1.0)) != 1.0 \
                    and graph.constant_value(node.inputs[2]) is None:
                return None, "Gemm with beta != 1 and a non-constant C"
            w = w.T if int(attrs.get("transB", 0)) else w
            w = w * np.float32(attrs.get("alpha", 1.0))
        return np.ascontiguousarray(w, np.float32), ""


def _quantize_weight(w: np.ndarray, scheme) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int8 weight, scale and zero point: per output column (the last axis) when the scheme is per channel."""
    tq = scheme.weights
    per_column = scheme.channel_axis("MatMul", None, w.ndim) is not None
    others = tuple(range(w.ndim - 1)) if per_column else None
    scale, zero = tq.params(w.min(axis=others), w.max(axis=others))
    return tq.quantize(w, scale, zero, -1 if per_column else None), scale, zero


def _rewrite(graph, node, w, scheme, names, shared_x, shared_w) -> None:
    """Replace ``node`` by DynamicQuantizeLinear (shared per input) -> MatMulInteger -> Cast -> Mul (-> Add)."""
    g, x, y = graph.gs, node.inputs[0], node.outputs[0]
    base = node.name or y.name

    def var(suffix, dtype):  # no shapes: see the class docstring (SkipLayerNormalization)
        return gs.Variable(fresh_name(names, f"{base}_{suffix}"), dtype=dtype)

    def add(op, inputs, outputs, **attrs):
        g.nodes.append(gs.Node(op, fresh_name(names, f"{base}/int8_dynamic_{op}"), attrs, inputs, outputs))

    if id(x) not in shared_x:
        xq, xs, xz = (gs.Variable(fresh_name(names, f"{x.name}_{s}"), dtype=d) for s, d in
                      (("quantized", np.uint8), ("scale", np.float32), ("zero_point", np.uint8)))
        g.nodes.append(gs.Node("DynamicQuantizeLinear", fresh_name(names, f"{x.name}_DynamicQuantizeLinear"),
                               inputs=[x], outputs=[xq, xs, xz]))
        shared_x[id(x)] = (xq, xs, xz)
    xq, xs, xz = shared_x[id(x)]
    key = (node.inputs[1].name, node.op, int(node.attrs.get("transB", 0)), float(node.attrs.get("alpha", 1.0)))
    if key not in shared_w:
        q, scale, zero = _quantize_weight(w, scheme)
        wname = node.inputs[1].name
        shared_w[key] = (gs.Constant(fresh_name(names, f"{wname}_quantized"), q),
                         gs.Constant(fresh_name(names, f"{wname}_scale"), scale),
                         gs.Constant(fresh_name(names, f"{wname}_zero_point"), zero) if np.any(zero) else None)
    wq, ws, wz = shared_w[key]
    bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name else None
    node.inputs.clear()
    node.outputs.clear()
    g.nodes.remove(node)
    acc, acc_f, scale, prod = var("int32", np.int32), var("float", np.float32), var("scale", np.float32), \
        (var("output", np.float32) if bias is not None else y)
    add("MatMulInteger", [xq, wq, xz] + ([wz] if wz is not None else []), [acc])
    add("Cast", [acc], [acc_f], to=onnx.TensorProto.FLOAT)
    add("Mul", [xs, ws], [scale])
    add("Mul", [acc_f, scale], [prod])
    if bias is not None:
        beta = float(node.attrs.get("beta", 1.0))
        if beta != 1.0:  # a constant C (checked by _weight)
            bias = gs.Constant(fresh_name(names, f"{bias.name}_beta"),  # asarray: a 0-d C times beta is a scalar
                               np.asarray(graph.constant_value(bias) * np.float32(beta), np.float32))
        add("Add", [prod, bias], [y])


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(Int8Dynamic)

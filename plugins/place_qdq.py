"""place-qdq: put QuantizeLinear/DequantizeLinear pairs where the backend runs int8, from calibrated ranges."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import Equivalence, Pass, PassResult, hookimpl
from graphopt.backends.qdq_plan import BIAS_SLOT, plan_activations, too_small
from graphopt.backends.scheme import FP8_OPSET, Placement
from graphopt.calib.state import CALIBRATION, FLOAT_NODES, RANGES
from graphopt.errors import UnsupportedError
from graphopt.ir.onnx_graph import fresh_name, replace_input
from graphopt.ir.ops import is_standard_domain

# A calibrated range this wide holds a fill value (an attention mask of float32's lowest, -3.4e38), not data: on
# any 8-bit grid the tensor's real values all round to the zero point (scores + mask: a uniform softmax), and its
# ends overflow (OpenVINO's FakeQuantize turns every value into NaN). Such tensors stay float.
FILL_MAGNITUDE = 1e30
_SHAPE_OPS = frozenset({"Shape", "Constant", "ConstantOfShape", "Identity", "QuantizeLinear", "DequantizeLinear"})


class PlaceQdq(Pass):
    """Insert Q/DQ pairs for the backend's int8 scheme, using the ranges ``calibrate`` computed.

    Everything about *where* and *how* comes from the backend's :class:`~graphopt.backends.QuantScheme`, never from
    the backend's name; :func:`graphopt.backends.qdq_plan.plan_activations` decides which activations get a pair, in
    one of two forms. With ``requantize_outputs`` (onnxruntime's): ops in ``quantized_ops`` get a Q/DQ on each float
    input and a Q/DQ on their output (after a ``fused_activations`` Relu/Clip that alone reads it, so the backend
    folds the clamp into the requantization; a model output only where the scheme's ``requantize_graph_outputs``
    says so: onnxruntime's yes, OpenVINO's no); signed activations take the scheme's ``signed_activations`` grid
    where it has one (OpenVINO's with VNNI/AMX: symmetric int8); ``passthrough_ops`` (MaxPool, Reshape, Flatten,
    ...) between quantized tensors reuse their input's scale, so no requantization surrounds them; both inputs of a
    residual Add are quantized. Without (TensorRT's explicit quantization): Q/DQ only on the float inputs of int8
    ops, none on their outputs nor on a graph output; a residual Add fused into the weighted op before it
    (``fused_add``, decided by :func:`graphopt.backends.fusion.fusion_groups`) gets Q/DQ on its other input only; a
    tensor a passthrough op makes is quantized before that op (Q/DQ -> Pad -> Conv), and a Concat's inputs share one
    scale. Weighted ops too small for the backend's kernels (``min_channels``) stay float. Weights of
    ``weight_channel_axis`` ops become int8 initializers (symmetric, per output channel on the op's axis) behind a
    DequantizeLinear; biases stay float for the backend to fold to int32 or, with ``bias="int32"``, are written as
    int32 with scale = input scale × weight scale. Each tensor gets one pair, shared by all its readers.

    Ops the scheme does not cover stay float and are listed in a note. Options: ``ops`` (quantize only these op
    types), ``exclude_ops``, ``exclude_nodes`` (node names), ``keep_first`` / ``keep_last`` (the first / last
    weighted layer stays float), ``activations`` (uint8 / int8) and ``symmetric`` (yes / no) to override the
    backend's activation scheme: the backend honours, warns about (int8 activations are slow on onnxruntime's
    x86 kernels) or refuses such a request, never silently drops it. Approximate: outputs move by the
    quantization error the report measures.

    Left alone: ops outside the default ONNX domain (never quantized, nor treated as passthrough), and weighted
    ops whose weight or bias (which the backend, or ``bias="int32"``, makes int32) holds NaN or infinity: no
    scale represents those, so the node stays float and a warning names the tensor and how many of its values
    are not finite. Refused: a model that computes in float16 (Q/DQ pairs take float32 scales, onnxruntime's
    QDQ kernels float32 tensors): quantize the float32 model. The placement needs the scheme's opset (13 for
    onnxruntime: per-channel DequantizeLinear; 19 for float8 Q/DQ, ``activations=fp8``); ``min_opset`` has the
    pass manager convert an older model first, and called directly on one the pass refuses, unless it finds
    nothing to quantize.

    On a PyTorch model (the ATen graph insert-observers captured) the same scheme and options decide the same
    placement (:mod:`graphopt.pt2e.quantizer`), written by torchao's PT2E prepare / convert: the result is the Q/DQ
    graph (``quantized_decomposed`` ops, int8 weights) that the x86 backend lowers to oneDNN's int8 kernels and that
    exports to ONNX as QuantizeLinear / DequantizeLinear. ``exclude_nodes`` takes FX node names or module paths
    (``layer4``, ``layer1.0.conv1``).
    """

    name = "place-qdq"
    irs = frozenset({"onnx", "fx"})
    equivalence = Equivalence.APPROXIMATE
    recovery = ("calibrate on more, real samples (--calib), try calibrate:method=entropy or percentile, and keep the "
                "most sensitive layers float (place-qdq:exclude_nodes=..., keep_first=true, keep_last=true; graphopt "
                "compare --per-layer shows which)")
    min_opset = 13  # the onnxruntime scheme's (QuantScheme.min_opset); checked again against the run's scheme

    Options = Placement  # ops, exclude_ops, exclude_nodes, keep_first, keep_last, activations, symmetric

    def __init__(self, options=None):
        super().__init__(options)
        if self.options.activations == "fp8":  # float8 QuantizeLinear/DequantizeLinear: the manager upgrades first
            self.min_opset = FP8_OPSET

    def requires(self, graph, ctx):
        if RANGES not in ctx.state:
            raise self.out_of_order("no calibrated ranges: "
                                    "run insert-observers and calibrate first (the int8 alias does)")

    def _scheme(self, ctx):
        scheme = ctx.scheme(self.options.request(), self.name)
        for warning in scheme.warnings:
            ctx.warn(f"{self.name}: {warning}")
        return scheme

    def run_fx(self, graph, ctx):
        from graphopt.ir.fx_graph import FxGraph
        from graphopt.pt2e.prepare import convert_ptq, qdq_counts
        from graphopt.pt2e.quantizer import SchemeQuantizer, unmatched

        scheme = self._scheme(ctx)
        if not graph.is_aten():
            raise self.out_of_order("the PyTorch model is not an ATen graph: run insert-observers and calibrate first "
                            "(the int8 alias does)")
        self.warn_unmatched(ctx, "exclude_nodes", unmatched(graph.gm, self.options.exclude_nodes),
                            "node or module of the model")
        exclude = tuple(dict.fromkeys((*self.options.exclude_nodes, *ctx.state.get(FLOAT_NODES, ()))))  # a budget's
        quantizer = SchemeQuantizer(scheme, ctx.state[RANGES], exclude=exclude,
                                    keep_first=self.options.keep_first, keep_last=self.options.keep_last)
        gm = convert_ptq(graph.gm, graph.example_inputs, quantizer)
        placed = quantizer.plan
        notes = _fx_notes(placed, placed.unranged, ctx)
        if not placed.quantized:
            return PassResult(graph, False, {}, notes + ["no node the scheme quantizes: nothing to quantize"])
        counts = qdq_counts(gm)
        stats = {"quantized nodes": len(placed.quantized), "inserted Q/DQ pairs": counts["quantize"],
                 "quantized weights": len(placed.weights)}
        return PassResult(FxGraph(gm, graph.example_inputs, "torch.export"), True,
                          {k: v for k, v in stats.items() if v}, notes)

    def run_onnx(self, graph, ctx):
        scheme = self._scheme(ctx)
        g = graph.gs
        g.toposort()
        nodes, notes = self._nodes_to_quantize(graph, scheme, ctx)
        if not nodes:
            return PassResult(graph, False, {}, notes + ["no node the scheme quantizes: nothing to quantize"])
        if graph.opset < scheme.min_opset:
            raise self.fail(f"the {scheme.backend} scheme needs opset {scheme.min_opset}+, the model has "
                            f"{graph.opset} (convert it with onnx.version_converter, or run the pass in a pipeline, "
                            f"which does)")
        ranges = ctx.state[RANGES]
        plan = plan_activations(g, scheme, nodes, ranges)
        _refuse_float16(self.name, graph, nodes, plan.tensors)
        params: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        missing = []
        overflow = []
        for name, sources in plan.sources.items():
            known = [ranges[s] for s in sources if s in ranges]
            if not known:
                missing.append(name)
                continue
            lo, hi = min(r[0] for r in known), max(r[1] for r in known)
            if not (abs(lo) < FILL_MAGNITUDE and abs(hi) < FILL_MAGNITUDE):  # (NaN too)
                overflow.append(name)
                continue
            params[name] = scheme.activation_params(lo, hi)
        if missing:
            notes.append(f"{len(missing)} tensors have no calibrated range and stay float: {', '.join(missing[:5])}")
        if overflow:  # an attention mask filled with float32's lowest value (see FILL_MAGNITUDE)
            notes.append(f"{len(overflow)} tensors range near float32's limit (a mask's fill value) and stay float: "
                         f"{', '.join(overflow[:5])}")
        names = set(g.tensors())
        first_input = {id(node): node.inputs[0].name for node in nodes}  # before Q/DQ renames what they read
        for name, (scale, zero) in params.items():
            tensor = plan.tensors[name]
            _insert_qdq(g, tensor, scale, zero, names, plan.int8_readers(tensor, scheme),
                        requantize_output=scheme.requantize_outputs)
        weights = 0
        for node in nodes:
            weights += _quantize_weight(graph, node, scheme, names)
            if scheme.bias == "int32" and first_input[id(node)] in params:
                _quantize_bias(graph, node, params[first_input[id(node)]][0], names)
        g.cleanup().toposort()
        fused = {name for group in plan.groups for name in group.epilogue}
        quantized = set(map(id, plan.quantized))  # by identity: a gs.Node compares field by field, slowly
        left = Counter(n.op if is_standard_domain(n.domain) else f"{n.domain}:{n.op}" for n in g.nodes
                       if id(n) not in quantized and n.name not in fused and n.op not in _SHAPE_OPS
                       and n.op not in scheme.passthrough_ops and n.op not in scheme.fused_activations)
        if left:
            notes.append("stay float (no int8 kernel in the scheme, or excluded): "
                         + ", ".join(f"{op} x{k}" for op, k in left.most_common()))
        calibration = ctx.state.get(CALIBRATION, {})
        if calibration.get("synthetic"):
            notes.append("scales come from synthetic random inputs: not fit for production")
        stats = {"quantized nodes": len(plan.quantized), "inserted Q/DQ pairs": len(params),
                 "quantized weights": weights, "fused residual Adds": plan.fused_adds}
        stats = {k: v for k, v in stats.items() if v}
        return PassResult(graph, bool(params) or weights > 0, stats, notes)

    def _nodes_to_quantize(self, graph, scheme, ctx) -> tuple[list[gs.Node], list[str]]:
        """The nodes to quantize, and notes on the ones left float for their weights."""
        excluded = set(self.options.exclude_nodes) | set(ctx.state.get(FLOAT_NODES, ()))  # a budget's decision
        self.warn_unmatched(ctx, "exclude_nodes", sorted(set(self.options.exclude_nodes)
                                                         - {n.name for n in graph.gs.nodes}))
        nodes = [n for n in graph.gs.nodes if n.op in scheme.quantized_ops and is_standard_domain(n.domain)
                 and n.name not in excluded and not _already_quantized(n)]
        weighted = [n for n in nodes if n.op in scheme.weighted_ops]
        for keep, pick in ((self.options.keep_first, 0), (self.options.keep_last, -1)):
            if keep and weighted and weighted[pick] in nodes:
                nodes.remove(weighted[pick])
        nonfinite = []
        for node in [n for n in nodes if n.op in scheme.weighted_ops]:
            slots = [1] + ([BIAS_SLOT[node.op]] if node.op in BIAS_SLOT else [])  # a float bias: the backend's int32
            for slot in slots:
                value = graph.constant_value(node.inputs[slot]) if len(node.inputs) > slot else None
                bad = _count_nonfinite(value)
                if bad:
                    what, label = "weight" if slot == 1 else "bias", node.name or node.outputs[0].name
                    ctx.warn(f"{self.name}: {node.op} '{label}' stays float: its {what} '{node.inputs[slot].name}' "
                             f"holds {bad} non-finite values (NaN/inf) of {value.size}")
                    nonfinite.append(node)
                    break
        notes = []
        if scheme.min_channels:
            shapes = graph.inferred_shapes()
            small = [(n, why) for n in nodes if (why := too_small(n, scheme, shapes))]
            if small:
                excluded = {id(n) for n, _ in small}
                nodes = [n for n in nodes if id(n) not in excluded]
                notes.append(f"{len(small)} nodes stay float, too small for {scheme.backend}'s int8 kernels: "
                             + "; ".join(f"'{n.name or n.outputs[0].name}' ({why})" for n, why in small[:5]))
        if nonfinite:
            nodes = [n for n in nodes if n not in nonfinite]
            notes.append(f"{len(nonfinite)} nodes stay float, their weights hold NaN/inf: "
                         + ", ".join(f"'{n.name or n.outputs[0].name}'" for n in nonfinite[:5]))
        return nodes, notes


def _fx_notes(placed, unranged, ctx) -> list[str]:
    """What the FX placement left float, and why (the report's notes)."""
    notes = []
    if placed.left_float:
        notes.append("stay float (no int8 kernel in the scheme, or excluded): "
                     + ", ".join(f"{op} x{k}" for op, k in placed.left_float.most_common()))
    if unranged:
        notes.append(f"{len(unranged)} tensors have no calibrated range and stay float: {', '.join(unranged[:5])}")
    if ctx.state.get(CALIBRATION, {}).get("synthetic"):
        notes.append("scales come from synthetic random inputs: not fit for production")
    return notes


def _count_nonfinite(value) -> int:
    """How many values of a float array are NaN or infinite (0 for None and non-float arrays)."""
    if value is None or value.dtype.kind != "f":
        return 0
    return int(value.size - np.count_nonzero(np.isfinite(value)))


def _refuse_float16(pass_name: str, graph, nodes, tensors) -> None:
    """Q/DQ on a float16 tensor is not a graph onnxruntime's QDQ kernels run: refuse, saying what to do."""
    typed, sources = None, None
    for name, tensor in [*tensors.items(), *((n.inputs[1].name, n.inputs[1]) for n in nodes if len(n.inputs) > 1)]:
        dtype = tensor.dtype
        if dtype is None:
            sources = _float16_sources(graph.gs) if sources is None else sources
            if not sources:
                continue  # nothing in the graph makes float16: no need to infer this tensor's type
            typed = graph.inferred_shapes() if typed is None else typed
            dtype = (typed.get(name) or (None, None))[1]
        if dtype is not None and np.dtype(dtype) == np.float16:
            raise UnsupportedError(
                f"pass '{pass_name}': the model computes in float16 (tensor '{name}'); int8 quantization takes "
                f"float32 models (Q/DQ scales and onnxruntime's QDQ kernels are float32) (quantize the float32 "
                f"model, and convert to fp16 neither before nor after int8)")


def _float16_sources(g) -> bool:
    """Whether anything in the graph can make a float16 tensor: a tensor already typed float16, an op whose type
    attribute says float16 (Cast's ``to``, the Random ops' and EyeLike's ``dtype``), a Constant or ConstantOfShape
    holding float16, or an op outside the standard domains (its types are unknown). Without one, no tensor of the
    graph is float16, and shape inference need not run to say so."""
    if any(t.dtype is not None and np.dtype(t.dtype) == np.float16 for t in g.tensors().values()):
        return True
    for node in g.nodes:
        if not is_standard_domain(node.domain):
            return True
        if onnx.TensorProto.FLOAT16 in (node.attrs.get("to"), node.attrs.get("dtype")):
            return True
        value = node.attrs.get("value")
        if value is not None and getattr(getattr(value, "values", value), "dtype", None) == np.float16:
            return True
    return False


def _already_quantized(node: gs.Node) -> bool:
    """Its inputs already come from DequantizeLinear (a second run must change nothing)."""
    return any(t.inputs and t.inputs[0].op == "DequantizeLinear" for t in node.inputs[:1])


def _insert_qdq(g, tensor: gs.Variable, scale, zero, names: set[str], readers: list[gs.Node],
                requantize_output: bool = True) -> None:
    """``tensor -> Q -> DQ``, ``readers`` (those of its readers that read int8) moved to the DQ. A graph output:
    with ``requantize_output`` it keeps its name on the DQ's output (the producer writes a renamed float tensor that
    the Q reads), so the pair survives cleanup and the quantized op before it gets its output Q, as inside the
    graph; without, it stays float (only its readers read the pair)."""
    s = gs.Constant(fresh_name(names, f"{tensor.name}_scale"), np.asarray(scale, np.float32))
    z = gs.Constant(fresh_name(names, f"{tensor.name}_zero_point"), np.asarray(zero))
    q = gs.Variable(fresh_name(names, f"{tensor.name}_quantized"), dtype=np.asarray(zero).dtype, shape=tensor.shape)
    source, dq = tensor, None
    if requantize_output and any(out is tensor for out in g.outputs) and tensor.inputs:
        producer = tensor.inputs[0]
        source = gs.Variable(fresh_name(names, f"{tensor.name}_float"), dtype=tensor.dtype, shape=tensor.shape)
        producer.outputs[producer.outputs.index(tensor)] = source
        dq = tensor
    else:
        dq = gs.Variable(fresh_name(names, f"{tensor.name}_dequantized"), dtype=tensor.dtype or np.float32,
                         shape=tensor.shape)
    g.nodes.append(gs.Node("QuantizeLinear", fresh_name(names, f"{tensor.name}_QuantizeLinear"), inputs=[source, s, z],
                           outputs=[q]))
    g.nodes.append(gs.Node("DequantizeLinear", fresh_name(names, f"{tensor.name}_DequantizeLinear"), inputs=[q, s, z],
                           outputs=[dq]))
    if dq is not tensor:
        for reader in readers:
            replace_input(reader, tensor, dq)


def _quantize_weight(graph, node, scheme, names: set[str]) -> int:
    if node.op not in scheme.weighted_ops or len(node.inputs) < 2:
        return 0
    w = graph.constant_value(node.inputs[1])
    if w is None or w.dtype.kind != "f":
        return 0
    axis = scheme.channel_axis(node.op, node.attrs, w.ndim)
    tq = scheme.weights
    others = None if axis is None else tuple(i for i in range(w.ndim) if i != axis)
    scale, zero = tq.params(w.min(axis=others), w.max(axis=others))
    q = tq.quantize(w, scale, zero, axis)
    node.inputs[1] = _dequantized_constant(graph, names, node.inputs[1].name, w.dtype, q, scale, zero, axis)
    return 1


def _quantize_bias(graph, node, input_scale, names: set[str]) -> None:
    slot = BIAS_SLOT.get(node.op)
    if slot is None or len(node.inputs) <= slot:
        return
    bias = graph.constant_value(node.inputs[slot])
    dq = node.inputs[1].inputs[0] if node.inputs[1].inputs else None
    if bias is None or dq is None or dq.op != "DequantizeLinear" or bias.ndim != 1:
        return
    scale = (np.float32(input_scale) * dq.inputs[1].values).astype(np.float32).reshape(-1)
    scale = np.broadcast_to(scale, bias.shape).astype(np.float32)
    q = np.round(bias / scale).astype(np.int32)
    node.inputs[slot] = _dequantized_constant(graph, names, node.inputs[slot].name, bias.dtype, q, scale,
                                              np.zeros(bias.shape, np.int32), 0)


def _dequantized_constant(graph, names: set[str], base: str, dtype, q, scale, zero, axis: int | None) -> gs.Variable:
    """``DequantizeLinear(q, scale, zero[, axis])``, the stand-in for the float constant named ``base``."""
    out = gs.Variable(fresh_name(names, f"{base}_dequantized"), dtype=dtype, shape=list(q.shape))
    graph.gs.nodes.append(gs.Node(
        "DequantizeLinear", fresh_name(names, f"{base}_DequantizeLinear"),
        attrs={"axis": axis} if axis is not None else {},
        inputs=[gs.Constant(fresh_name(names, f"{base}_quantized"), q),
                gs.Constant(fresh_name(names, f"{base}_scale"), np.asarray(scale, np.float32)),
                gs.Constant(fresh_name(names, f"{base}_zero_point"), np.asarray(zero))],
        outputs=[out]))
    return out


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(PlaceQdq)

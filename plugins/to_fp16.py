"""to-fp16: float16 weights and compute on ONNX, numerically risky ops kept in float32 behind Casts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import Equivalence, OnnxGraph, Pass, PassResult, hookimpl
from graphopt.calib.sources import load_calibration
from graphopt.calib.specs import input_specs
from graphopt.errors import first_line
from graphopt.ir.expose import expose
from graphopt.ir.onnx_graph import fresh_name, replace_input
from graphopt.ir.ops import custom_ops, is_standard_domain
from graphopt.passes.rules import Rule, apply_rules
from graphopt.table import fmt_bytes

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
F32, F16 = np.dtype(np.float32), np.dtype(np.float16)
HALVES = (F16, np.dtype(ml_dtypes.bfloat16))  # a graph holding either was converted already
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_RESTORE_ELEMENTS = 1024  # a blocked op reading a converted initializer this small gets its float32 original back

# onnxruntime.transformers.float16.DEFAULT_OP_BLOCK_LIST (1.31): ops with no float16 kernel or float16 type in
# their schema (the ai.onnx.ml ops, RandomUniformLike, Range, TopK, NonMaxSuppression, RoiAlign, CumSum, Min,
# Max, Upsample); a test keeps this a superset of onnxruntime's list as it evolves.
ORT_BLOCK_LIST = (
    "ArrayFeatureExtractor", "Binarizer", "CastMap", "CategoryMapper", "DictVectorizer", "FeatureVectorizer",
    "Imputer", "LabelEncoder", "LinearClassifier", "LinearRegressor", "Normalizer", "OneHotEncoder",
    "RandomUniformLike", "SVMClassifier", "SVMRegressor", "Scaler", "TreeEnsembleClassifier",
    "TreeEnsembleRegressor", "TreeEnsemble", "ZipMap", "NonMaxSuppression", "TopK", "RoiAlign", "Range",
    "CumSum", "Min", "Max", "Upsample",
)
# Ops whose *internal* values leave float16's range or precision while their inputs and outputs stay inside
# it, so the overflow check (which sees only the tensors between ops) cannot catch them: squares and exps
# summed inside the op.
INTERNAL_RISK = (
    "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp", "ReduceLogSum", "LpNormalization",
    "MeanVarianceNormalization", "InstanceNormalization", "GroupNormalization",
)
DEFAULT_OP_BLOCK_LIST = ORT_BLOCK_LIST + INTERNAL_RISK


class ToFloat16(Pass):
    """Convert initializers and compute to float16, keeping numerically risky ops in float32 behind Casts.

    Built on onnxruntime's maintained converter (``onnxruntime.transformers.float16.convert_float_to_float16``,
    from onnxconverter-common), fed with graphopt's own shape inference (on the weight-free skeleton: the
    weights are never serialized for it) and followed by graphopt's cleanup: the nodes are sorted topologically,
    redundant ``Cast`` pairs are removed (float32 -> float16 -> float32 between two ops kept in float32, or at
    a float32 graph input / output next to one; float16 -> float32 -> float16, which is exact) and ``Cast``s to
    the type their input already has go. Float32 initializers read by at least one float16 op become float16
    (values beyond ±65504 saturate, nonzero values below 6e-8 become ±6e-8; NaN and inf stay: a warning
    names each initializer that saturates or holds NaN/inf); those only blocked ops read stay float32. Nodes
    outside the default ONNX domain are kept in float32 (graphopt cannot know their float16 support), as are
    nodes that read or write a tensor ONNX shape inference cannot type (computed from such a node's output:
    the converter could not cast it) and Constant nodes only kept nodes read. A
    blocked op that reads a small converted initializer (≤ 1024 elements) gets the float32 original instead of
    a ``Cast`` of the rounded one. The result passes the onnx checker's full check (enforced by ``ensures``).

    Options:

    - ``keep_io_types`` (true): float32 graph inputs and outputs stay float32, with Casts at the boundary;
      false makes them float16 (the caller then feeds and reads float16).
    - ``op_block_list``: op types kept in float32. The default is onnxruntime's own default list (ops without
      float16 kernels or float16 in their schema: the ai.onnx.ml ops, TopK, NonMaxSuppression, RoiAlign,
      Range, CumSum, Min, Max, Upsample, RandomUniformLike) plus ops whose *internal* sums of squares or
      exponentials overflow or lose precision in float16 while their inputs and outputs stay in range, which
      the overflow check cannot see: ReduceL2, ReduceSumSquare, ReduceLogSumExp, ReduceLogSum,
      LpNormalization, MeanVarianceNormalization, InstanceNormalization, GroupNormalization. Not blocked by
      default: LayerNormalization (its ``stash_type`` computes mean and variance in float32 by the spec),
      Softmax / LogSoftmax (implementations subtract the maximum first: no exp overflows, the sum is at most
      the axis length), ReduceSum / ReduceMean / Exp / Pow (their results are tensors the overflow check
      sees). Add them (``op_block_list=...+Softmax``) for more margin at the cost of Casts.
    - ``node_block_list``: node names kept in float32 (names not in the graph are warned about).
    - ``check_overflow`` (true): the float32 model is run on the calibration data (``ctx.calibration``; one
      fixed-seed synthetic batch when there is none, said in a note) with every intermediate tensor exposed;
      an op that would compute in float16 and reads or writes a tensor beyond ±65504 is kept in float32
      (named in a note). Reading counts too: the consumers of an overflowing tensor are kept as well, so the
      large values never pass through float16. NaN values do not hide large ones beside them. When
      onnxruntime cannot run the model (an op outside its domains), the check is skipped with a warning.

    A graph that already holds float16 tensors is left alone (modified False, with a note): converting twice
    is not supported, start from the float32 model. Not handled: tensors inside If/Loop bodies are converted
    by the converter but not observed by the overflow check; other float types (float64, bfloat16) are left as
    they are.

    Approximate: float16 keeps about 3 significant digits (relative rounding 4.9e-4 per op). On onnxruntime's
    CPU provider most ops have no float16 kernel and run in float32 behind Casts onnxruntime inserts: the size
    halves, the speed gain is on GPUs.
    """

    name = "to-fp16"
    irs = frozenset({"onnx"})
    equivalence = Equivalence.APPROXIMATE
    recovery = ("keep the ops that lose precision in float32 (to-fp16:op_block_list=... or node_block_list=...), or "
                "give real --calib data to the overflow check")

    @dataclass(frozen=True)
    class Options:
        keep_io_types: bool = True
        op_block_list: tuple[str, ...] = DEFAULT_OP_BLOCK_LIST
        node_block_list: tuple[str, ...] = ()
        check_overflow: bool = True

    def run_onnx(self, graph, ctx) -> PassResult:
        exported = graph.to_model()
        inferred = _infer(graph, exported)
        types = _tensor_types(graph, inferred)
        halves = sorted(name for name, dtype in types.items() if dtype in HALVES)
        if halves:
            return PassResult(graph, False, notes=[
                f"the graph already holds {len(halves)} {types[halves[0]]} tensors (e.g. '{halves[0]}'): left as is; "
                "to convert with other options, start from the float32 model"])
        if not any(dtype == F32 for dtype in types.values()):
            return PassResult(graph, False, notes=["no float32 tensors: nothing to convert"])

        opts, notes = self.options, []
        nodes = list(graph.gs.nodes)
        names = Counter(n.name for n in nodes)
        unknown = [name for name in opts.node_block_list if name not in names]
        self.warn_unmatched(ctx, "node_block_list", unknown)
        blocked = {id(n) for n in nodes if n.op in opts.op_block_list or n.name in opts.node_block_list}
        foreign = [n for n in nodes if not is_standard_domain(n.domain)]
        # the converter casts by tensor types: a node touching a tensor of unknown type (an output of a custom
        # op, and what is computed from it) would get float16 weights beside a float32 input, so it stays
        untyped = [n for n in nodes if is_standard_domain(n.domain)
                   and any(t.name and t.name not in types for t in [*n.inputs, *n.outputs])]
        blocked |= {id(n) for n in [*foreign, *untyped]}
        overflow = {}
        if self._checks_overflow():
            overflow, data_note = self._overflow(graph, ctx, types, nodes, blocked)
            notes.append(data_note)
            blocked |= set(overflow)

        # a Constant node only kept nodes read stays float32 too (not rounded to float16 and cast back)
        consumers = {}
        for n in nodes:
            for t in n.inputs:
                consumers.setdefault(t.name, []).append(n)
        outputs = {t.name for t in graph.gs.outputs}
        for n in nodes:
            readers = consumers.get(n.outputs[0].name) if n.op == "Constant" and n.outputs else None
            if readers and n.outputs[0].name not in outputs and all(id(c) in blocked for c in readers):
                blocked.add(id(n))

        # the converter blocks nodes by name: name the unnamed and duplicate ones it must keep
        used = set(names)
        for n in nodes:
            if id(n) in blocked and n.op not in opts.op_block_list and (not n.name or names[n.name] > 1):
                n.name = fresh_name(used, n.name or f"{n.op}_fp32")
        node_block = sorted({n.name for n in nodes if id(n) in blocked and n.op not in opts.op_block_list})

        exported = graph.to_model()  # again: names may have changed
        _set_types(exported, inferred)
        from onnxruntime.transformers.float16 import convert_float_to_float16

        try:
            converted = convert_float_to_float16(
                exported, keep_io_types=opts.keep_io_types, disable_shape_infer=True,
                op_block_list=list(opts.op_block_list), node_block_list=node_block)
        except Exception as exc:  # the converter asserts and raises plain errors on models it cannot handle
            raise self.fail(f"onnxruntime's float16 converter failed: {first_line(exc)}") from exc
        out = OnnxGraph.from_model(converted, external_data=graph.external_data)
        restored = _restore_constants(out, graph)
        removed = apply_rules(out, [RedundantCast(False), RedundantCast(True)], repeat=True).stats["removed Cast pairs"]
        out.gs.cleanup(remove_unused_graph_inputs=False).toposort()

        # -- what happened ----------------------------------------------------------------------------------
        touches_f32 = [n for n in nodes if any(types.get(t.name) == F32 for t in [*n.inputs, *n.outputs])]
        kept = [n for n in touches_f32 if id(n) in blocked]
        before_inits = {name: t for name, t in graph.gs.tensors().items() if isinstance(t, gs.Constant)}
        after_inits = {name: t for name, t in out.gs.tensors().items() if isinstance(t, gs.Constant)}
        converted_inits = sum(1 for name, t in before_inits.items() if _dtype(t.dtype) == F32
                              and name in after_inits and _dtype(after_inits[name].dtype) == F16)
        casts = out.op_counts()["Cast"] - graph.op_counts()["Cast"]
        if converted_inits == 0 and len(touches_f32) == len(kept):
            return PassResult(graph, False, notes=[f"all {len(kept)} nodes that compute in float32 are kept in "
                                                   "float32 (block lists, overflow): nothing converted"])
        stats = {"converted initializers": converted_inits, "converted nodes": len(touches_f32) - len(kept)}
        if kept:
            stats["kept nodes in fp32"] = len(kept)
        if casts > 0:
            stats["inserted Casts"] = casts
        size_before, size_after = _weight_bytes(graph), _weight_bytes(out)
        notes.insert(0, f"initializers {fmt_bytes(size_before)} -> {fmt_bytes(size_after)} "
                        f"({size_after / max(size_before, 1):.2f}x)")
        reasons = {id(n) for n in [*foreign, *untyped]} | set(overflow)
        by_list = Counter(n.op for n in kept if id(n) not in reasons and n.op != "Constant")
        if foreign:
            notes.append(f"kept {len(foreign)} nodes outside the default ONNX domain in float32 (their float16 "
                         f"support is unknown): {', '.join(custom_ops(foreign))}")
        if untyped:
            notes.append(f"kept {len(untyped)} nodes in float32 that read or write tensors of unknown type (computed "
                         f"from ops outside the default domain): " + ", ".join(n.name or n.op for n in untyped[:8]))
        notes += self._weight_notes(ctx, before_inits, after_inits)
        if by_list:
            notes.append("kept in float32 by op_block_list/node_block_list: "
                         + ", ".join(f"{k} {op}" for op, k in sorted(by_list.items())))
        if overflow:
            shown = sorted(overflow.values(), key=lambda v: -v[2])
            listed = ", ".join(f"{node.name} ('{tensor}' reaches {value:.3g})" for node, tensor, value in shown[:8])
            more = f" and {len(shown) - 8} more" if len(shown) > 8 else ""
            notes.append(f"kept {len(overflow)} nodes in float32 because a tensor they read or write exceeds "
                         f"float16's range (±{FP16_MAX:g}): {listed}{more}")
        if removed:
            notes.append(f"removed {removed} redundant Cast pairs (float32 -> float16 -> float32 between nodes "
                         "kept in float32 or at float32 graph inputs/outputs)")
        if restored:
            notes.append(f"{restored} blocked nodes read float32 copies of small shared initializers")
        return PassResult(self._finish(out, graph), True, stats, notes)

    # -- what a pass for another 16-bit float type (to-bf16) changes ------------------------------------------------
    def _checks_overflow(self) -> bool:
        return self.options.check_overflow

    def _weight_notes(self, ctx, before: dict, after: dict) -> list[str]:
        return _report_weights(self.name, ctx, before, after)

    def _finish(self, out: OnnxGraph, original: OnnxGraph) -> OnnxGraph:
        """The float16 graph as the pass returns it (to-bf16 retypes it)."""
        return out

    def ensures(self, graph, ctx) -> None:
        try:
            graph.verify()
        except ValueError as exc:
            raise self.fail(f"produced an invalid graph: {exc}") from None

    # -- the overflow check ---------------------------------------------------------------------------------------
    def _overflow(self, graph, ctx, types, nodes, blocked) -> tuple[dict, str]:
        """``{id(node): (node, tensor, |max|)}`` for each node not yet blocked that reads or writes a float32
        tensor beyond float16's range on the calibration data; and a note on which data that was."""
        try:
            peaks = _observe(graph, types, _batches(graph, ctx))
        except _CannotRun as exc:
            ctx.warn(f"{self.name}: overflow check skipped: {exc} (check_overflow=false skips it quietly)")
            return {}, f"no overflow check: {exc}"
        found = {}
        for n in nodes:
            if id(n) in blocked:
                continue
            worst = max(((peaks.get(t.name, _const_peak(t)), t.name) for t in [*n.inputs, *n.outputs]
                         if types.get(t.name) == F32), default=(0.0, ""))
            if worst[0] > FP16_MAX:
                found[id(n)] = (n, worst[1], worst[0])
        if not self.options.keep_io_types:
            io = [t.name for t in [*graph.gs.inputs, *graph.gs.outputs]
                  if types.get(t.name) == F32 and peaks.get(t.name, 0.0) > FP16_MAX]
            if io:
                ctx.warn(f"{self.name}: graph inputs/outputs {', '.join(io)} exceed float16's range on the "
                         "calibration data and become float16 (keep_io_types=false): they will overflow")
        n_batches = peaks.pop("", 0)
        source = ("the calibration data" if ctx.calibration is not None
                  else "synthetic inputs (standard normal; pass calibration data for ranges that mean something)")
        return found, (f"overflow check on {n_batches} batch{'es' if n_batches != 1 else ''} of {source}: "
                       f"{len(found)} nodes kept in float32 for overflow")


# -- helpers --------------------------------------------------------------------------------------------------------
def _dtype(value) -> np.dtype | None:
    try:
        return np.dtype(value) if value is not None else None
    except TypeError:  # onnx types numpy lacks (bfloat16, float8)
        return None


def _onnx_dtype(elem_type: int) -> np.dtype | None:
    try:
        return _dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError, TypeError):
        return None


def _infer(graph: OnnxGraph, exported: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference on the weight-free skeleton (the graph's value_info types every tensor)."""
    return onnx.shape_inference.infer_shapes(graph.skeleton(exported), data_prop=True)


def _tensor_types(graph: OnnxGraph, inferred: onnx.ModelProto) -> dict[str, np.dtype]:
    types = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        elem = vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0
        if elem:
            types[vi.name] = _onnx_dtype(elem)
    for init in inferred.graph.initializer:
        types[init.name] = _onnx_dtype(init.data_type)
    for name, t in graph.gs.tensors().items():
        if isinstance(t, gs.Constant):
            types[name] = _dtype(t.dtype)
    return {k: v for k, v in types.items() if v is not None}


def _set_types(model: onnx.ModelProto, inferred: onnx.ModelProto) -> None:
    """Give ``model`` the inferred type of every intermediate tensor (the converter decides what to cast by
    them) and of outputs the export left untyped."""
    inits = {t.name for t in model.graph.initializer}
    io = {v.name for v in [*model.graph.input, *model.graph.output]}
    del model.graph.value_info[:]
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in inits | io)
    typed = {v.name: v for v in inferred.graph.output}
    for out in model.graph.output:
        if not out.type.tensor_type.elem_type and out.name in typed:
            out.CopyFrom(typed[out.name])


def _batches(graph: OnnxGraph, ctx):
    """Feeds for the overflow check: the calibration batches, cast to the inputs' dtypes; else one synthetic
    batch."""
    if ctx.calibration is None:
        yield graph.sample_inputs(ctx.seed)
        return
    wanted = {t.name: _dtype(t.dtype) for t in graph.gs.inputs}
    data = ctx.calibration  # CalibrationData (the CLI), anything with batches(), or what calibrate= takes
    data = data if callable(getattr(data, "batches", None)) else load_calibration(data, input_specs(graph))
    for batch in data.batches():
        yield {k: np.asarray(v, dtype=wanted[k] or None) for k, v in batch.items() if k in wanted}


def _observe(graph: OnnxGraph, types: dict, batches) -> dict[str, float]:
    """max |x| of every float32 graph input and node output over ``batches`` (key "" counts the batches)."""
    inputs = {t.name for t in graph.gs.inputs}
    names = [name for name, t in graph.gs.tensors().items()
             if isinstance(t, gs.Variable) and types.get(name) == F32 and name not in inputs]
    try:
        session = expose(graph, names).session()
    except Exception as exc:  # onnxruntime's own error types: an op it has no kernel for, ...
        raise _CannotRun(_why_not(graph, exc)) from exc
    names = [o.name for o in session.get_outputs()]
    peaks: dict[str, float] = {"": 0}
    for feeds in batches:
        try:
            values = zip(names, session.run(None, feeds))
        except Exception as exc:
            raise _CannotRun(_why_not(graph, exc)) from exc
        for name, value in [*values, *((k, v) for k, v in feeds.items() if types.get(k) == F32)]:
            if value.size and value.dtype == F32:
                peaks[name] = max(peaks.get(name, 0.0), _peak(value))
        peaks[""] += 1
    return peaks


class _CannotRun(Exception):
    """onnxruntime could not run the model for the overflow check (the message says why)."""


def _why_not(graph: OnnxGraph, exc: Exception) -> str:
    ops = custom_ops(graph.gs.nodes)
    if ops:
        return f"onnxruntime cannot run {', '.join(ops)}"
    return f"onnxruntime could not run the model ({first_line(exc)})"


def _peak(values: np.ndarray) -> float:
    """max |x| over the values that are not NaN (a NaN must not hide a large value beside it; inf counts)."""
    return float(np.max(np.abs(values), initial=0.0, where=~np.isnan(values)))


def _const_peak(t) -> float:
    return _peak(t.values) if isinstance(t, gs.Constant) and t.values.size else 0.0


def _report_weights(pass_name: str, ctx, before: dict, after: dict) -> list[str]:
    """Name the float32 initializers made float16 that hold NaN/inf (kept as they are) or finite values beyond
    ±65504 (saturated to ±65504 by the converter): a warning each (the first 8), and a note listing them."""
    found = []
    for name, t in before.items():
        if _dtype(t.dtype) != F32 or name not in after or _dtype(after[name].dtype) != F16:
            continue
        finite = np.isfinite(t.values)
        nonfinite = int(t.values.size - np.count_nonzero(finite))
        over = int(np.count_nonzero(finite & (np.abs(t.values) > FP16_MAX)))
        what = [f"{nonfinite} non-finite values (NaN/inf), which stay NaN/inf"] if nonfinite else []
        if over:
            what.append(f"{over} values beyond float16's range (±{FP16_MAX:g}), saturated to ±{FP16_MAX:g} "
                        f"(check_overflow=true keeps its readers in float32)")
        if what:
            found.append(name)
            if len(found) <= 8:
                ctx.warn(f"{pass_name}: initializer '{name}' made float16 holds {' and '.join(what)}")
    if not found:
        return []
    if len(found) > 8:
        ctx.warn(f"{pass_name}: {len(found) - 8} more initializers made float16 hold NaN/inf or values beyond "
                 f"±{FP16_MAX:g} (the report's notes name up to 32)")
    return [f"{len(found)} initializers made float16 hold NaN/inf or values beyond ±{FP16_MAX:g}: "
            + ", ".join(f"'{n}'" for n in found[:32]) + (" ..." if len(found) > 32 else "")]


def _cast_to(node: gs.Node) -> np.dtype | None:
    return _onnx_dtype(int(node.attrs["to"])) if "to" in node.attrs else None


class RedundantCast(Rule):
    """A float Cast to its input's type, or (``pair``) x -> Cast -> Cast back to x's type: readers read the input /
    x. A pair's second Cast that writes a graph output stays, a no-op Cast of x that keeps the output's name."""

    irs = frozenset({"onnx"})

    def __init__(self, pair: bool):
        self.pair = pair
        self.name, self.stat = ("remove-cast-pair", "removed Cast pairs") if pair else ("remove-cast", "removed Casts")

    def match(self, graph, node):
        if node.op != "Cast" or not node.inputs or not node.outputs or _cast_to(node) not in _FLOATS:
            return None
        to, src = _cast_to(node), node.inputs[0]
        if _dtype(src.dtype) == to:
            return None if self.pair or not graph.can_splice_out(node, src) else (node, src)
        prev = src.inputs[0] if self.pair and len(src.inputs) == 1 else None
        if prev is None or prev.op != "Cast" or _cast_to(prev) not in _FLOATS or _dtype(prev.inputs[0].dtype) != to:
            return None
        return node, prev.inputs[0]

    def apply(self, graph, plan):
        node, keep = plan
        if not graph.splice_out(node, keep):
            node.inputs[0] = keep


def _restore_constants(out: OnnxGraph, original: OnnxGraph) -> int:
    """A Cast to float32 of an initializer the converter made float16 reads back the float32 original (when it
    is small): no rounding for the blocked op that reads it, no Cast at run time."""
    before = {name: t for name, t in original.gs.tensors().items() if isinstance(t, gs.Constant)}
    used = set(out.gs.tensors())
    restored = 0
    for node in list(out.gs.nodes):
        if node.op != "Cast" or _cast_to(node) != F32 or not isinstance(node.inputs[0], gs.Constant):
            continue
        orig = before.get(node.inputs[0].name)
        if orig is None or _dtype(orig.dtype) != F32 or orig.values.size > _RESTORE_ELEMENTS:
            continue
        y = node.outputs[0]
        if y in out.gs.outputs:
            continue
        copy = gs.Constant(fresh_name(used, f"{orig.name}_fp32"), orig.values)
        for consumer in list(y.outputs):
            replace_input(consumer, y, copy)  # (graphsurgeon's input lists take no slice assignment)
        node.inputs.clear()
        node.outputs.clear()
        restored += 1
    return restored


def _weight_bytes(graph: OnnxGraph) -> int:
    return int(sum(np.prod(t.shape, dtype=np.int64) * np.dtype(t.dtype).itemsize
                   for t in graph.gs.tensors().values() if isinstance(t, gs.Constant) and _dtype(t.dtype)))


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(ToFloat16)


@hookimpl
def graphopt_register_pipelines(registry):
    registry.add_pipeline(
        "fp16", "to-fp16",
        "float16 weights and compute, float32 inputs/outputs, numerically risky ops and ops that overflow on "
        "the calibration data kept in float32",
    )

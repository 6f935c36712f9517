"""fold-constants: compute, once, every value that depends only on constants, and store it as a constant."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from graphopt import Pass, PassResult, hookimpl
from graphopt.errors import first_line
from graphopt.ir import onnx_shapes
from graphopt.ir.fx_graph import fresh_attr
from graphopt.ir.fx_ops import get_attr
from graphopt.ir.ops import is_standard_domain

# never evaluated at compile time: Q/DQ must stay for quantization passes; the rest are random
_ONNX_NO_FOLD = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Dropout", "RandomNormal", "RandomUniform",
    "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",

    # sequence and optional values: onnx-graphsurgeon's folding takes every result for an array and fails on them
    "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SequenceAt", "SequenceLength",
    "SequenceMap", "SplitToSequence", "ConcatFromSequence", "Optional", "OptionalGetElement", "OptionalHasElement",
})
_MAX_ROUNDS = 4
# with a constant condition, shape inference (onnx's, and onnxruntime's as it loads a model) types an If's outputs
# by the branch taken alone, and Loop / Scan bodies by their now constant inputs: folding can then expose a
# mismatch the original's inference never saw (onnx's own affine_grid function body feeds Range 1-element
# tensors through an If, which onnxruntime's optimizer inlines once its condition is constant). A graph with
# control flow is loaded by onnxruntime before it is returned folded.
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
# FX targets whose name has a word starting with one of these are random (or uninitialized): never folded
_FX_RANDOM = ("rand", "dropout", "bernoulli", "multinomial", "normal", "uniform", "poisson", "empty", "rrelu",
              "exponential", "geometric", "cauchy")


class FoldConstants(Pass):
    """Evaluate subgraphs whose inputs are all compile-time constants and replace them by their values.

    ONNX (top-level graph; If/Loop bodies are left alone): ``Constant`` nodes become initializers; then
    onnx-graphsurgeon's ``fold_constants`` evaluates, with onnxruntime, every node whose inputs are all
    initializers. ``Shape`` / ``Size`` of an initializer are computed here (onnxruntime would be shipped the
    weight), and with ``fold_shapes`` ``Shape`` (with its opset-15 ``start`` / ``end``) of tensors whose dims
    read are static and ``Gather`` / ``Slice`` of a ``Shape`` that pick static dims
    (:mod:`graphopt.ir.onnx_shapes`, by the ONNX spec), so the exporters' ``Shape -> Gather -> Unsqueeze ->
    Concat -> Reshape`` chains collapse to a constant shape. Shapes for that come from ONNX shape inference
    and are not left in the graph. Nodes left
    unused are removed (dead nodes that were already there are removed first and counted apart).

    Never folded: ``QuantizeLinear``/``DequantizeLinear`` (Q/DQ on constant weights is how a quantized model
    says where int8 runs), ``Dropout`` and random ops, ops outside the default ONNX domain, and results
    larger than ``size_limit_mb`` (0: no limit). A subgraph onnxruntime cannot evaluate is left as it is,
    with a note. A graph with control flow (If / Loop / Scan) is loaded by onnxruntime, as a user loads it,
    before it is returned folded: when it no longer loads (though the input did), nothing is folded, with a note.

    FX: a ``call_function``/``call_method`` node, or a ``call_module`` of a module without parameters or
    buffers, whose inputs are all ``get_attr`` tensors or other such nodes (nothing reaches a placeholder) is
    evaluated once with torch; where such a value is read by the rest of the graph it becomes a buffer
    (``_folded_<name>``) read with ``get_attr``. Skipped: random ops (``rand*``, ``dropout``, ...), in-place
    and side-effecting ops, and non-tensor results (those stay computed at run time). Parameters and buffers
    no longer read are deleted. Exact: onnxruntime / torch compute the same values they computed at run time.
    """

    name = "fold-constants"
    irs = frozenset({"onnx", "fx"})

    @dataclass(frozen=True)
    class Options:
        fold_shapes: bool = True  # fold Shape of statically shaped tensors (ONNX)
        size_limit_mb: float = 0  # do not materialize a folded tensor bigger than this; 0: no limit

        def __post_init__(self):
            if self.size_limit_mb < 0:
                raise ValueError(f"size_limit_mb must be >= 0, got {self.size_limit_mb}")

    def _size_limit_bytes(self) -> int | None:
        return int(self.options.size_limit_mb * 2**20) if self.options.size_limit_mb > 0 else None

    # -- ONNX -------------------------------------------------------------------------------------------------
    @staticmethod
    def _may_fold(node) -> bool:
        """What onnxruntime may evaluate: a node whose inputs are all constants (shapes are folded here)."""
        return not _onnx_never_fold(node) and all(_is_constant(t) for t in node.inputs if t.name)

    def run_onnx(self, graph, ctx):
        g = graph.gs
        stats: Counter = Counter()
        notes: list[str] = []
        original = graph.copy() if any(n.op in _CONTROL_FLOW for n in g.nodes) else None
        count = len(g.nodes)
        _cleanup(g)
        stats["removed dead nodes"] = count - len(g.nodes)
        stats["converted Constant"] = _constant_nodes_to_initializers(graph)
        _cleanup(g)
        before = list(g.nodes)
        variables = {id(t) for t in g.tensors().values() if not _is_constant(t)}
        types = _InferredTypes(graph, notes)
        for _ in range(_MAX_ROUNDS):  # each kind of folding can give the others constant inputs
            changed = _cast_like_to_constants(graph, types)
            changed += onnx_shapes.fold_shapes(graph, types.get, activations=self.options.fold_shapes)
            if changed:
                _cleanup(g)
            if any(self._may_fold(n) for n in g.nodes):  # spare graphsurgeon's graph copy and session
                count = len(g.nodes)
                self._fold_with_onnxruntime(g, notes)
                changed += count - len(g.nodes)
            if not changed:
                break
        after = {id(n) for n in g.nodes}
        gone = [n for n in before if id(n) not in after]
        stats["converted Constant"] += sum(n.op == "Constant" for n in gone)
        stats["folded nodes"] = sum(n.op != "Constant" for n in gone)
        # a node can also lose only some outputs to folding (the others over size_limit_mb)
        now_constant = sum(1 for t in g.tensors().values() if _is_constant(t) and id(t) in variables)
        stats = {k: v for k, v in stats.items() if v}
        changed = bool(stats) or now_constant > 0
        if changed and original is not None:
            refusal = _load_refusal(graph, original)
            if refusal:
                return PassResult(original, False, {}, notes + [
                    f"nothing folded: onnxruntime would no longer load the folded model ({refusal}), though it "
                    f"loads this one; the model is returned unchanged"])
        return PassResult(graph, changed, stats, notes)

    def _fold_with_onnxruntime(self, g, notes: list[str]) -> None:
        import onnxruntime

        onnxruntime.set_default_logger_severity(4)  # its graph optimizer's warnings on the subgraphs are noise here
        g.toposort(recurse_subgraphs=False, recurse_functions=False)
        # fold_shapes=False: graphsurgeon's shape folding ignores Shape's start/end and its "cast elision"
        # rewrites Cast(int -> float) -> Mul(0.5) -> Cast(int) as an integer Mul by 0; graphopt.ir.onnx_shapes does it
        kwargs = dict(fold_shapes=False, recurse_subgraphs=False, flatten_subgraphs=False,
                      recurse_functions=False, size_threshold=self._size_limit_bytes(),
                      should_exclude_node=_onnx_never_fold)
        try:
            g.fold_constants(partitioning=None, error_ok=False, **kwargs)
        except Exception as exc:  # evaluate the foldable parts one by one, keeping what onnxruntime can run
            note = (f"onnxruntime could not evaluate every constant subgraph ({first_line(exc)}); "
                    f"those it could not are left in the graph")
            if note not in notes:
                notes.append(note)
            g.fold_constants(partitioning="recursive", error_ok=True, **kwargs)
        _cleanup(g)

    # -- FX ---------------------------------------------------------------------------------------------------
    def run_fx(self, graph, ctx):
        import torch

        from graphopt.ir.fx_graph import delete_unread_attributes

        gm = graph.gm
        limit = self._size_limit_bytes()
        constant = _fx_constant_nodes(gm)
        values: dict = {}
        folded: list = []
        skipped_big = 0
        notes: list[str] = []
        read_before = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for node in list(gm.graph.nodes):
            if node not in constant:
                continue
            try:
                values[node] = _fx_evaluate(node, gm, values)
            except Exception as exc:  # leave it, and what depends on it, to run time
                notes.append(f"could not evaluate '{node.name}' at compile time ({first_line(exc)}); left as is")
                constant -= {node, *_descendants(node)}
                continue
            readers = [u for u in node.users if u not in constant and u.op != "output"]
            value = values[node]
            if node.op == "get_attr" or not readers or not isinstance(value, torch.Tensor):
                continue  # a value only constants read, or the graph's result, or an int/shape: run time
            if limit is not None and value.numel() * value.element_size() > limit:
                skipped_big += 1
                continue
            name = fresh_attr(gm, f"_folded_{node.name}")
            gm.register_buffer(name, value.detach().clone())
            with gm.graph.inserting_before(node):
                getter = gm.graph.get_attr(name)
            getter.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")})
            node.replace_all_uses_with(getter, delete_user_cb=lambda user: user.op != "output")
            folded.append(node)
        if skipped_big:
            notes.append(f"{skipped_big} constant tensors over size_limit_mb={self.options.size_limit_mb:g} "
                         f"left computed at run time")
        if not folded:
            return PassResult(graph, False, {}, notes)
        erased, used = 0, _ancestors(folded, constant)
        for node in reversed(list(gm.graph.nodes)):  # what computed the folded values, if nothing else reads it
            if node in used and not node.users:
                erased += node.op != "get_attr"
                gm.graph.erase_node(node)
        deleted = delete_unread_attributes(gm, read_before)
        gm.delete_all_unused_submodules()
        # a folded value the graph also returns stays computed for that output: then no node is erased
        stats = {k: v for k, v in (("folded nodes", erased), ("removed parameters/buffers", deleted)) if v}
        gm.recompile()
        return PassResult(graph, True, stats, notes)


# -- ONNX helpers --------------------------------------------------------------------------------------------
def _load_refusal(folded, original) -> str:
    """Why onnxruntime refuses to load ``folded`` when it loads ``original`` ('' when it loads, or when it
    refuses both: then folding took nothing away). With its graph optimizations on, as a user loads it: its own
    constant folding inlines an If whose condition folding made constant."""
    try:
        folded.session()
        return ""
    except Exception as exc:
        reason = first_line(exc)
    try:
        original.session()
    except Exception:
        return ""
    return reason


def _is_constant(tensor) -> bool:
    import onnx_graphsurgeon as gs

    return isinstance(tensor, gs.Constant)


def _constant_nodes_to_initializers(graph) -> int:
    """Replace each ``Constant`` node holding a tensor (``value``) by an initializer of its output's name; the
    other attribute forms (``value_float``, ``value_ints``, ...) are left to onnx-graphsurgeon's folding."""
    import onnx_graphsurgeon as gs

    return sum(graph.fold_to_constant(node, node.attrs["value"].values) for node in graph.gs.nodes
               if node.op == "Constant" and not node.domain and isinstance(node.attrs.get("value"), gs.Constant))


def _cleanup(g) -> None:
    g.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False, recurse_functions=False)


class _InferredTypes:
    """ONNX shape inference's shapes and element types, computed once and only if something asks."""

    def __init__(self, graph, notes: list[str]):
        self.graph, self.notes, self._known = graph, notes, None

    def get(self, name: str):
        if self._known is None:
            try:
                self._known = self.graph.inferred_shapes()
            except Exception as exc:  # a model the inference rejects: fold without static shapes and types
                self.notes.append(f"shape inference failed ({first_line(exc)}); Shape/CastLike of activations "
                                  f"not folded")
                self._known = {}
        return self._known.get(name)


def _cast_like_candidate(node) -> bool:
    return node.op == "CastLike" and not node.domain and len(node.inputs) == 2 and _is_constant(node.inputs[0])


def _cast_like_to_constants(graph, types: _InferredTypes) -> int:
    """``CastLike(constant, like)`` needs only ``like``'s element type, not its value: where that type is known
    (declared, or from shape inference), the result is a constant. The torch.onnx dynamo exporter writes zero
    conv biases as ``Expand(CastLike(0, x), [C])`` and Clip bounds as ``CastLike(6, x)``; once the CastLike is a
    constant, those fold (and fold-bn can fold the BatchNormalization after such a conv)."""
    # every type is read before anything is folded: a folded node is left disconnected until cleanup, and shape
    # inference run on such a graph (for the next CastLike) would fail
    planned = []
    for node in graph.gs.nodes:
        if _cast_like_candidate(node):
            like = node.inputs[1]
            planned.append((node, like.dtype if like.dtype is not None else (types.get(like.name) or (None, None))[1]))
    return sum(graph.fold_to_constant(node, node.inputs[0].values.astype(dtype)) for node, dtype in planned
               if dtype is not None)


def _onnx_never_fold(node) -> bool:
    """Q/DQ, random ops, ops outside the default domain, and nodes whose bodies (If/Loop) hold any of them."""
    if node.op in _ONNX_NO_FOLD or not is_standard_domain(node.domain):
        return True
    return any(_onnx_never_fold(inner) for sub in node.subgraphs() for inner in sub.nodes)


# -- FX helpers ----------------------------------------------------------------------------------------------
def _fx_constant_nodes(gm) -> set:
    """Nodes whose value does not depend on any placeholder and that are safe to evaluate at compile time.
    A tensor some in-place op may write to (a buffer updated at run time) is not constant."""
    import torch

    from graphopt.ir.fx_graph import fx_may_mutate

    def propagate(volatile: set) -> set:
        constant: set = set()
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                if node.target not in volatile and isinstance(get_attr(gm, node.target), torch.Tensor):
                    constant.add(node)
            elif node.op in ("call_function", "call_method", "call_module") and _fx_foldable_op(node, gm):
                if all(n in constant for n in node.all_input_nodes):
                    constant.add(node)
        return constant

    constant = propagate(set())
    written = [n for n in gm.graph.nodes if fx_may_mutate(n, gm)]
    reached = _ancestors([i for n in written for i in n.all_input_nodes if i in constant], constant)
    volatile = {n.target for n in reached if n.op == "get_attr"}
    return propagate(volatile) if volatile else constant


def _descendants(node) -> set:
    seen, stack = set(), list(node.users)
    while stack:
        user = stack.pop()
        if user not in seen:
            seen.add(user)
            stack.extend(user.users)
    return seen


def _ancestors(nodes, within: set) -> set:
    """``nodes`` and every node in ``within`` they are computed from."""
    seen, stack = set(), list(nodes)
    while stack:
        node = stack.pop()
        if node in within and node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


def _fx_foldable_op(node, gm) -> bool:
    """Deterministic and free of side effects: neither random, nor in-place, nor impure."""
    import torch

    from graphopt.ir.fx_graph import fx_may_mutate

    if fx_may_mutate(node, gm):
        return False
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return (not mod.training and not getattr(mod, "_is_impure", False)
                and next(mod.parameters(), None) is None and next(mod.buffers(), None) is None)
    if node.op == "call_method":
        name = node.target
    else:
        if node.is_impure():
            return False
        if isinstance(node.target, torch._ops.OpOverload):
            name = node.target._schema.name.split("::")[-1]
        else:
            name = getattr(node.target, "__name__", "")
    return bool(name) and not any(word.startswith(_FX_RANDOM) for word in re.split(r"[_.:]", name.lower()))


def _fx_evaluate(node, gm, values: dict):
    import torch
    from torch.fx.node import map_arg

    args = map_arg(node.args, lambda n: values[n])
    kwargs = map_arg(node.kwargs, lambda n: values[n])
    with torch.no_grad():
        if node.op == "get_attr":
            return get_attr(gm, node.target)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, node.target)(*rest, **kwargs)
        return gm.get_submodule(node.target)(*args, **kwargs)


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(FoldConstants)

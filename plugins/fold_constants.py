"""fold-constants: compute, once, every value that depends only on constants, and store it as a constant."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from graphopt import Pass, PassResult, hookimpl
from graphopt.errors import first_line
from graphopt.ir.fx_graph import fresh_attr
from graphopt.ir.ops import is_standard_domain

# never evaluated at compile time: Q/DQ must stay for quantization passes; the rest are random
_ONNX_NO_FOLD = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Dropout", "RandomNormal", "RandomUniform",
    "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
})
_MAX_ROUNDS = 4
# FX targets whose name has a word starting with one of these are random (or uninitialized): never folded
_FX_RANDOM = ("rand", "dropout", "bernoulli", "multinomial", "normal", "uniform", "poisson", "empty", "rrelu",
              "exponential", "geometric", "cauchy")


class FoldConstants(Pass):
    """Evaluate subgraphs whose inputs are all compile-time constants and replace them by their values.

    ONNX (top-level graph; If/Loop bodies are left alone): ``Constant`` nodes become initializers; then
    onnx-graphsurgeon's ``fold_constants`` evaluates, with onnxruntime, every node whose inputs are all
    initializers, and with ``fold_shapes``, ``Shape`` (and ``Shape -> Gather/Slice``) of tensors whose shape
    is static, so the exporters' ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` chains collapse to a
    constant shape. Shapes for that come from ONNX shape inference and are not left in the graph. Nodes left
    unused are removed (dead nodes that were already there are removed first and counted apart).

    Never folded: ``QuantizeLinear``/``DequantizeLinear`` (Q/DQ on constant weights is how a quantized model
    says where int8 runs), ``Dropout`` and random ops, ops outside the default ONNX domain, and results
    larger than ``size_limit_mb`` (0: no limit). A subgraph onnxruntime cannot evaluate is left as it is,
    with a note.

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
        count = len(g.nodes)
        _cleanup(g)
        stats["removed dead nodes"] = count - len(g.nodes)
        stats["converted Constant"] = _constant_nodes_to_initializers(graph)
        _cleanup(g)
        before = list(g.nodes)
        variables = {id(t) for t in g.tensors().values() if not _is_constant(t)}
        types = _InferredTypes(graph, notes)
        for _ in range(_MAX_ROUNDS):  # each kind of folding can give the others constant inputs
            changed = _cast_like_to_constants(graph, types) + _fold_shapes(graph, types, self.options.fold_shapes)
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
        return PassResult(graph, bool(stats) or now_constant > 0, stats, notes)

    def _fold_with_onnxruntime(self, g, notes: list[str]) -> None:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)  # its graph optimizer's warnings on the subgraphs are noise here
        g.toposort(recurse_subgraphs=False, recurse_functions=False)
        # fold_shapes=False: graphsurgeon's shape folding ignores Shape's start/end and its "cast elision"
        # rewrites Cast(int -> float) -> Mul(0.5) -> Cast(int) as an integer Mul by 0; _fold_shapes does it here
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
    replaced = 0
    for node in graph.gs.nodes:
        if not _cast_like_candidate(node):
            continue
        source, like = node.inputs
        dtype = like.dtype if like.dtype is not None else (types.get(like.name) or (None, None))[1]
        if dtype is not None:
            replaced += graph.fold_to_constant(node, source.values.astype(dtype))
    return replaced


def _fold_shapes(graph, types: _InferredTypes, activations: bool) -> int:
    """Shapes known at compile time, computed here (not by onnxruntime, which would ship a weight to read its
    shape; the dynamo exporter writes conv biases as ``Expand(0, Shape(weight, start=0, end=1))``):
    ``Shape`` / ``Size`` of an initializer, and with ``activations`` (fold_shapes) of any tensor whose shape
    (declared, or from ONNX shape inference) is static in the dims read, and ``Gather`` / ``Slice`` of a
    ``Shape`` that pick static dims only (``Gather(Shape(x), 1)`` with a dynamic batch). ``Shape``'s opset-15
    ``start`` / ``end`` and ``Gather``'s / ``Slice``'s negative and out-of-range indices follow the ONNX spec,
    which on one axis is Python's slicing; an index out of range (an error at run time) is not folded."""
    import numpy as np

    replaced = 0
    for node in graph.gs.nodes:
        if not node.outputs or not node.inputs or not is_standard_domain(node.domain):
            continue
        x = node.inputs[0]
        if not activations and not _is_constant(x):
            continue
        value = None
        if node.op == "Shape":
            value = _shape_vector(node, types)
        elif node.op == "Size":
            dims = _dims(x, types)
            value = None if dims is None or not _static(dims) else np.prod(dims, dtype=np.int64)
        elif node.op in ("Gather", "Slice") and len(x.inputs) == 1 and x.inputs[0].op == "Shape":
            dims = _shape_vector(x.inputs[0], types, static=False)
            if dims is not None:
                value = (_gather(dims, node) if node.op == "Gather" else _slice(dims, node, graph.opset))
        if value is not None:
            replaced += graph.fold_to_constant(node, np.asarray(value, dtype=np.int64))
    return replaced


def _static(dims) -> bool:
    return all(isinstance(d, int) and d >= 0 for d in dims)


def _dims(tensor, types: _InferredTypes) -> list | None:
    """The dims of ``tensor`` (ints; anything else is dynamic), or None when its rank is unknown."""
    if _is_constant(tensor):
        return list(tensor.values.shape)
    shape = tensor.shape if tensor.shape is not None else (types.get(tensor.name) or (None, None))[0]
    return None if shape is None else [d if isinstance(d, int) and d >= 0 else None for d in shape]


def _shape_vector(shape_node, types: _InferredTypes, static: bool = True) -> list | None:
    """The value of ``Shape(x, start, end)``: x's dims from start to end (None where dynamic; with ``static``,
    None unless every one is known)."""
    if not is_standard_domain(shape_node.domain):
        return None
    dims = _dims(shape_node.inputs[0], types)
    if dims is None:
        return None
    dims = dims[slice(int(shape_node.attrs.get("start", 0)), _opt_int(shape_node.attrs.get("end")))]
    return dims if not static or _static(dims) else None


def _opt_int(value):
    return None if value is None else int(value)


def _gather(dims: list, node):
    """``Gather(shape_vector, indices)`` when the indices are a constant and pick static dims in range."""
    import numpy as np

    if len(node.inputs) < 2 or not _is_constant(node.inputs[1]) or int(node.attrs.get("axis", 0)) not in (0, -1):
        return None
    indices = node.inputs[1].values
    if indices.dtype.kind not in "iu" or np.any(indices < -len(dims)) or np.any(indices >= len(dims)):
        return None
    picked = [dims[int(i)] for i in indices.reshape(-1)]
    return np.array(picked, dtype=np.int64).reshape(indices.shape) if _static(picked) else None


def _slice(dims: list, node, opset: int):
    """``Slice(shape_vector, starts, ends[, axes, steps])`` when its arguments are constants and the dims it
    keeps are static (a shape vector is 1-D: one start, end, step on axis 0)."""
    import numpy as np

    if opset < 10:
        starts, ends, axes = (node.attrs.get(k) for k in ("starts", "ends", "axes"))
        steps = None
    else:
        given = node.inputs[1:5]
        if any(t.name and not _is_constant(t) for t in given):
            return None
        starts, ends, axes, steps = ([t.values if t.name else None for t in given] + [None] * 4)[:4]
    starts, ends, axes, steps = (None if a is None else np.asarray(a).reshape(-1) for a in (starts, ends, axes, steps))
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    if axes is not None and (axes.size != 1 or int(axes[0]) not in (0, -1)):
        return None
    step = 1 if steps is None else int(steps[0]) if steps.size == 1 else 0
    if step == 0:
        return None
    kept = dims[slice(int(starts[0]), int(ends[0]), step)]
    return np.array(kept, dtype=np.int64) if _static(kept) else None


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
                if node.target not in volatile and isinstance(_fetch(gm, node.target), torch.Tensor):
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


def _fetch(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _fx_evaluate(node, gm, values: dict):
    import torch
    from torch.fx.node import map_arg

    args = map_arg(node.args, lambda n: values[n])
    kwargs = map_arg(node.kwargs, lambda n: values[n])
    with torch.no_grad():
        if node.op == "get_attr":
            return _fetch(gm, node.target)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, node.target)(*rest, **kwargs)
        return gm.get_submodule(node.target)(*args, **kwargs)


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(FoldConstants)

"""Parameters and multiply-accumulates (MACs) per layer, for an :class:`OnnxGraph` or an :class:`FxGraph`.

Counted the way thop, fvcore and Torch-Pruning (``tp.utils.count_ops_and_params``) count them:

* Conv: ``N * Cout * Hout * Wout * (Cin / groups) * kh * kw`` (output elements times the weight's size past its
  first axis; the bias adds no MACs). ConvTranspose: input elements times ``(Cout / groups) * kh * kw``.
* Gemm / Linear / MatMul (and their integer and quantized forms MatMulInteger, QLinearMatMul, ConvInteger,
  QLinearConv, onnxruntime's 4-bit MatMulNBits; torch's mm, bmm, addmm, baddbmm, linear, matmul, ATen
  convolution): output elements times the reduction size. A MatMul between two activations (attention's
  ``Q @ K^T`` and ``P @ V``) counts the same way, and so does ``scaled_dot_product_attention`` (both products).
* Everything else (BatchNorm, LayerNorm, activations, elementwise, pooling, Softmax...) counts 0 MACs, and so
  do ops not listed here (Einsum, recurrent layers, ``nn.MultiheadAttention`` as one FX module) and the nodes
  inside ONNX If/Loop subgraphs.

A layer's parameters are the elements of its constant inputs: initializers and values computed from constants
only (a DequantizeLinear of an int8 weight counts as the weight's elements; the 4-bit weights packed two a byte
into MatMulNBits and GatherBlockQuantized count as the weights they hold) for ONNX; the module's parameters for
an FX ``call_module`` node, ``get_attr`` tensors (and values computed from them only) for a ``call_function``.
int64 and bool constants are shapes, axes and indices, not weights: they are not counted. Nodes that compute
only from constants are weight preprocessing, not layers.

Shapes come from ONNX shape inference (dimensions it cannot resolve, such as a symbolic batch, count as 1) or
from running FX's ``ShapeProp`` on the graph's example inputs (whose batch is then counted as given).

The model's parameter total is its own count (:meth:`Graph.num_parameters`: every initializer / every module
parameter; a 4-bit weight packed two a byte counts as the two), which can differ from the sum over layers (shape
constants, BatchNorm buffers, quantization scales); the MAC total is the sum over layers.

The FX counting is in :mod:`graphopt.report.cost_fx`, what both count into (:class:`LayerCost`) and the rules
they share in :mod:`graphopt.report.layer_cost`; this module holds the ONNX counting and the public API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from graphopt.ir.contrib_shapes import packed_weights
from graphopt.ir.onnx_graph import fresh_name
from graphopt.report.cost_fx import fx_costs
from graphopt.report.layer_cost import LayerCost, is_weight_dtype, numel
from graphopt.table import format_table

__all__ = ["LayerCost", "LayerDelta", "ModelCosts", "compare_costs", "cost_table", "dims_at_one", "fmt_count",
           "layer_costs", "model_costs", "total_costs"]


@dataclass
class ModelCosts:
    """A model's totals (``params``: the model's own count; ``macs``: the sum over layers) and its layers."""

    params: int
    macs: int
    layers: list[LayerCost] = field(default_factory=list)
    dims_at_one: list[str] = field(default_factory=list)  # dynamic input dims past the batch, counted as 1


@dataclass
class LayerDelta:
    """One layer before and after; ``status`` is ``kept``, ``removed`` (after = 0) or ``added`` (before = 0)."""

    name: str
    op: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    status: str = "kept"

    @property
    def changed(self) -> bool:
        return (self.status != "kept" or self.params_before != self.params_after
                or self.macs_before != self.macs_after)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op, "status": self.status,
                "params": {"before": self.params_before, "after": self.params_after},
                "macs": {"before": self.macs_before, "after": self.macs_after}}


# -- the public functions -------------------------------------------------------------------------------------
def layer_costs(graph, all_nodes: bool = False) -> list[LayerCost]:
    """Per-layer parameters and MACs of ``graph`` (an OnnxGraph or an FxGraph), in graph order. Only nodes with
    parameters or MACs unless ``all_nodes`` (then every compute node but weight preprocessing)."""
    if graph.ir == "onnx":
        rows = _onnx_costs(graph)
    elif graph.ir == "fx":
        rows = fx_costs(graph)
    else:
        raise ValueError(f"no cost model for the '{graph.ir}' IR")
    return rows if all_nodes else [r for r in rows if r.params or r.macs]


def total_costs(rows: Iterable[LayerCost]) -> tuple[int, int]:
    """(parameters, MACs) summed over ``rows``."""
    params = macs = 0
    for r in rows:
        params += r.params
        macs += r.macs
    return params, macs


def model_costs(graph) -> ModelCosts:
    """The model's parameter count (its own: every initializer / module parameter), MACs summed over its layers,
    and the layers."""
    rows = layer_costs(graph)
    return ModelCosts(int(graph.num_parameters()), total_costs(rows)[1], rows, dims_at_one(graph))


def dims_at_one(graph, given: Iterable[str] = ()) -> list[str]:
    """The ONNX model's dynamic input dimensions past the first (a sequence length, an image size), which shape
    inference cannot resolve and the MACs count as 1 (the batch is per sample by definition), as generated inputs
    (``graphopt bench``) fill them, except on the inputs named in ``given``: their names."""
    if graph.ir != "onnx":
        return []  # FX shapes come from the example inputs, at their real sizes
    skip = set(given) | set(getattr(graph, "defaults", {}))
    found = [str(d) if d not in (None, "") else f"{t.name}[{i}]" for t in graph.gs.inputs if t.name not in skip
             for i, d in enumerate(t.shape or ()) if i > 0 and not isinstance(d, int)]
    return list(dict.fromkeys(found))


def compare_costs(before: Sequence[LayerCost], after: Sequence[LayerCost]) -> list[LayerDelta]:
    """Layers matched by name: ``before``'s in its order (absent after: ``removed``, after = 0), then the layers
    only ``after`` has (``added``, before = 0)."""
    after_by_name = {r.name: r for r in after}
    before_names = set()
    rows = []
    for b in before:
        before_names.add(b.name)
        a = after_by_name.get(b.name)
        if a is None:
            rows.append(LayerDelta(b.name, b.op, b.params, 0, b.macs, 0, "removed"))
        else:
            op = b.op if a.op == b.op else f"{b.op}->{a.op}"
            rows.append(LayerDelta(b.name, op, b.params, a.params, b.macs, a.macs))
    for a in after:
        if a.name not in before_names:
            rows.append(LayerDelta(a.name, a.op, 0, a.params, 0, a.macs, "added"))
    return rows


def cost_table(deltas: Sequence[LayerDelta], top: int | None = 10) -> str:
    """The changed layers as an aligned text table, biggest change first: by how many MACs changed (either way),
    then how many parameters, then graph order; at most ``top`` rows."""
    changed = [(i, d) for i, d in enumerate(deltas) if d.changed]
    changed.sort(key=lambda p: (-abs(p[1].macs_before - p[1].macs_after),
                                -abs(p[1].params_before - p[1].params_after), p[0]))
    shown = [d for _, d in (changed if top is None else changed[:top])]
    table = [("layer", "op", "params before", "after", "MACs before", "after", "MACs")]
    for d in shown:
        if d.status != "kept":
            change = d.status
        else:
            change = _ratio(d.macs_before, d.macs_after) or _ratio(d.params_before, d.params_after) or "-"
        table.append((d.name, d.op, f"{d.params_before:,}", f"{d.params_after:,}", fmt_count(d.macs_before),
                      fmt_count(d.macs_after), change))
    return format_table(table, right=(2, 3, 4, 5, 6))


def fmt_count(n: float, unit: float | None = None) -> str:
    """1814073344 -> '1.81G', 57802752 -> '57.80M', 960 -> '960'. ``unit`` (1e9, 1e6, 1e3) forces a unit."""
    if unit is None:
        unit = next((u for u in (1e9, 1e6, 1e3) if abs(n) >= u), 1)
    suffix = {1e9: "G", 1e6: "M", 1e3: "K"}.get(unit, "")
    return f"{n / unit:.2f}{suffix}" if suffix else f"{int(n):,}"


def _ratio(before: float, after: float) -> str:
    return f"{after / before:.2f}x" if before else ""


# -- ONNX -----------------------------------------------------------------------------------------------------
_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                         "Bernoulli"})


def _static_inputs(g) -> bool:
    return all(t.shape is not None and all(isinstance(d, int) for d in t.shape) for t in g.inputs)


def _shapes_after_folding(graph, known: dict) -> dict:
    """Shapes of a model with static inputs whose inference stops at a size computed from Shape ops (torch's
    export of ``chunk``): inferred again on a copy with its constant subgraphs folded."""
    copy = graph.copy()
    try:
        copy.fold_constant_subgraphs()
        return {**known, **copy.inferred_shapes()}
    except Exception:  # counting must not fail where inference on the original worked: keep what we had
        return known


def _onnx_costs(graph) -> list[LayerCost]:
    import onnx_graphsurgeon as gs

    g = graph.gs
    try:
        known = graph.inferred_shapes()
    except Exception:  # shape inference refuses some graphs (custom ops, bad value_info): use what gs knows
        known = {}

    def unknown(name: str) -> bool:
        return name not in known or not all(isinstance(d, int) for d in known[name][0])

    if _static_inputs(g) and any(unknown(t.name) for node in g.nodes for t in node.outputs):
        known = _shapes_after_folding(graph, known)

    def shape_of(t) -> list | None:
        if isinstance(t, gs.Constant):
            return list(t.values.shape)
        if t.name in known:
            return list(known[t.name][0])
        value = graph.constant_value(t)
        if value is not None:
            return list(np.shape(value))
        return list(t.shape) if t.shape is not None else None

    def dtype_of(t):
        if isinstance(t, gs.Constant):
            return t.values.dtype
        if t.name in known:
            return known[t.name][1]
        return t.dtype

    # tensors known without running the model: initializers and outputs of nodes reading only those
    constant = {name for name, t in g.tensors().items() if isinstance(t, gs.Constant)}
    folded: set[int] = set()
    grew = True
    while grew:  # one sweep on a sorted graph, more on an unsorted one
        grew = False
        for i, node in enumerate(g.nodes):
            if i in folded or node.op in _RANDOM_OPS:
                continue
            if all(not t.name or t.name in constant for t in node.inputs):
                folded.add(i)
                constant.update(o.name for o in node.outputs)
                grew = True

    def params_of(t) -> int:
        if not t.name or t.name not in constant or not is_weight_dtype(dtype_of(t)):
            return 0
        if isinstance(t, gs.Constant):
            return int(t.values.size)
        shape = shape_of(t)
        if shape is not None and all(isinstance(d, int) and d >= 0 for d in shape):
            return numel(shape) if shape else 1
        return _root_constant_elements(t)

    rows, names = [], set()
    for i, node in enumerate(g.nodes):
        if i in folded:
            continue
        seen, params = set(), 0
        for t in node.inputs:
            if t.name not in seen:  # a weight read twice by one node counts once
                seen.add(t.name)
                params += params_of(t)
        params = packed_weights(node, params_of, dtype_of) or params
        out = shape_of(node.outputs[0]) if node.outputs else None
        name = fresh_name(names, node.name or (node.outputs[0].name if node.outputs else "") or f"{node.op}_{i}")
        rows.append(LayerCost(name, node.op, params, _onnx_macs(node, out, shape_of),
                              tuple(out) if out is not None else None))
    return rows


def _root_constant_elements(tensor) -> int:
    """Elements of the (weight-typed) initializers a constant-only value is computed from."""
    import onnx_graphsurgeon as gs

    total, stack, seen = 0, [tensor], set()
    while stack:
        t = stack.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        if isinstance(t, gs.Constant):
            total += int(t.values.size) if is_weight_dtype(t.values.dtype) else 0
        elif len(t.inputs) == 1:
            producer = t.inputs[0]
            if producer.op == "Constant" and isinstance(producer.attrs.get("value"), gs.Constant):
                value = producer.attrs["value"].values
                total += int(value.size) if is_weight_dtype(value.dtype) else 0
            stack.extend(producer.inputs)
    return total


def _onnx_macs(node, out: list | None, shape_of) -> int:
    op, inputs = node.op, node.inputs
    try:
        if op in ("Conv", "ConvInteger", "QLinearConv"):
            w = shape_of(inputs[3 if op == "QLinearConv" else 1])
            return numel(out) * numel(w[1:]) if out is not None and w else 0
        if op == "ConvTranspose":
            x, w = shape_of(inputs[0]), shape_of(inputs[1])
            return numel(x) * numel(w[1:]) if x is not None and w else 0
        if op == "Gemm":
            a = shape_of(inputs[0])
            k = a[0] if node.attrs.get("transA", 0) else a[1]
            return numel(out) * numel([k]) if out is not None else 0
        if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "FusedMatMul"):
            a = shape_of(inputs[0])
            return numel(out) * numel(a[-1:]) if out is not None and a else 0
        if op == "MatMulNBits":  # onnxruntime's 4-bit MatMul: X (..., K) times a (K, N) weight; X's rows count
            a = shape_of(inputs[0])  # as 1 where its shape is unknown, as a symbolic dimension does
            return (numel(a[:-1]) if a else 1) * int(node.attrs["K"]) * int(node.attrs["N"])
    except (IndexError, TypeError):  # a malformed node: no count rather than a failed report
        return 0
    return 0

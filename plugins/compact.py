"""compact: the same model in fewer bytes: short internal names, no attributes that restate their defaults."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import onnx

from graphopt import Pass, PassResult, hookimpl
from graphopt.errors import OutputError
from graphopt.ir.gs_gaps import gs_graphs
from graphopt.ir.ops import is_standard_domain

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


class Compact(Pass):
    """Shrink an ONNX file without changing what it computes; meant as the last pass before deployment.

    In a small model the graph's own bytes weigh as much as its weights: the digits CNN pruned and in int8 holds
    7.9 KB of weights in a 14.8 KB file, most of the rest names like ``dequantize_per_channel_3`` written once
    where a tensor is made and again where each node reads it. This pass

    - renames every internal tensor (the top graph's and its If/Loop/Scan bodies') to a short name (``0``, ``1``,
      …, ``z``, ``10``, … in order of first appearance), and names each node after its first output (unless its
      name is shorter already). The model's inputs and outputs keep their names: they are its interface. Local
      functions keep theirs (their own namespace). With ``names=keep`` nothing is renamed.
    - removes attributes that equal their default in the operator's schema at the model's opset
      (``auto_pad="NOTSET"``, ``group=1``, ``axis=1`` on a DequantizeLinear, …), on standard-domain ops only.

    ``map=names.json`` writes ``{"tensors": {new: old}, "nodes": {new: old}}``, to read reports of the original
    model against the compacted one. All-zero zero points are kept: onnxruntime only fuses Q/DQ pairs and
    weight DequantizeLinear into its int8 kernels (QGemm) when the zero point is given. After this pass, node
    names no longer say which layer is which: run ``sensitivity``, exclusions and recipes on the model before
    it. Exact: only names and spelled-out defaults change; a second run finds nothing to do.
    """

    name = "compact"
    irs = frozenset({"onnx"})

    @dataclass(frozen=True)
    class Options:
        names: Literal["short", "keep"] = "short"
        map: str = ""  # where to write the renaming as JSON ({"tensors": {new: old}, "nodes": {new: old}})

        def __post_init__(self):
            if self.map and self.names == "keep":
                raise ValueError("map= records a renaming: it needs names=short")

    def files(self):
        return [], ([("map", self.options.map)] if self.options.map else [])

    def run_onnx(self, graph, ctx):
        g = graph.gs
        stats = {"removed default attributes": _drop_default_attributes(g, graph.opset)}
        tensors, nodes = _shorten_names(g) if self.options.names == "short" else ({}, {})
        stats["shortened tensor names"] = len(tensors)
        stats["shortened node names"] = len(nodes)
        if self.options.map:  # once the run succeeds: a failed run leaves no map of a model it never wrote
            ctx.write_after(self.options.map, lambda target: _write_map(target, tensors, nodes))
        stats = {k: v for k, v in stats.items() if v}
        return PassResult(graph, bool(stats), stats)


def _drop_default_attributes(g, opset: int) -> int:
    """Remove attributes of standard-domain nodes that equal their schema's default at ``opset``; how many."""
    removed = 0
    for sub in gs_graphs(g):
        for node in sub.nodes:
            if not is_standard_domain(node.domain):
                continue
            try:
                schema = onnx.defs.get_schema(node.op, opset, "")
            except onnx.defs.SchemaError:
                continue
            for key in [k for k, v in node.attrs.items() if _is_default(schema, k, v)]:
                del node.attrs[key]
                removed += 1
    return removed


def _is_default(schema, key: str, value) -> bool:
    """Whether the attribute ``key=value`` (as onnx-graphsurgeon holds it) restates the schema's default."""
    declared = schema.attributes.get(key)
    if declared is None or not declared.default_value.type:
        return False
    default = onnx.helper.get_attribute_value(declared.default_value)
    if isinstance(default, bytes):
        default = default.decode()
    elif isinstance(default, list):
        default = [d.decode() if isinstance(d, bytes) else d for d in default]
    if isinstance(value, (list, tuple)):
        value = list(value)
    return type(value) in (int, float, str, list) and value == default and type(value) is type(default)


def _shorten_names(g) -> tuple[dict[str, str], dict[str, str]]:
    """Rename internal tensors and nodes (top graph and subgraphs) to short names; ``({new: old}, {new: old})``
    of what changed."""
    kept = {t.name for t in [*g.inputs, *g.outputs]}
    order: dict[int, object] = {}  # tensors by first appearance, each once (subgraphs share outer tensors)
    for sub in gs_graphs(g):
        for tensor in sub.tensors().values():
            if tensor.name and tensor.name not in kept:
                order.setdefault(id(tensor), tensor)
    tensors, count = {}, 0
    for tensor in order.values():
        while (new := _short(count)) in kept:
            count += 1
        count += 1
        if tensor.name != new:
            tensors[new] = tensor.name
            tensor.name = new
    nodes = {}
    for sub in gs_graphs(g):
        for node in sub.nodes:
            new = node.outputs[0].name if node.outputs and node.outputs[0].name else node.name
            if new != node.name and (not node.name or len(new) < len(node.name)):  # never longer than it was
                nodes[new] = node.name
                node.name = new
    return tensors, nodes


def _short(i: int) -> str:
    """0 -> "0", 35 -> "z", 36 -> "10": base 36."""
    text = ""
    while True:
        i, digit = divmod(i, 36)
        text = _DIGITS[digit] + text
        if not i:
            return text


def _write_map(path: str, tensors: dict[str, str], nodes: dict[str, str]) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"tensors": tensors, "nodes": nodes}, f, indent=1)
    except OSError as exc:
        raise OutputError(f"compact:map={path}: cannot be written ({exc.strerror})") from None


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(Compact)

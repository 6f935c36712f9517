"""``clip-to-relu``: replace ``Clip(x, min=0)`` that has no upper bound by ``Relu(x)``.

Exporters write ``torch.clamp(x, min=0)`` as a Clip with ``max`` omitted; Relu computes the same thing and is
what backends fuse into a preceding Conv or MatMul. ``Clip(x, 0, +inf)`` equals ``Relu(x)`` on every input, NaN
and -0.0 included. With ``max`` omitted ONNX clips at the largest finite float, so an input of +inf gives that
float where Relu gives +inf; every finite input gives the same result. ``strict=true`` rewrites only the
``+inf`` form. Only the ``min``/``max`` *input* form of Clip (opset 11 and later) is matched: the attribute form
of older opsets always has an upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt import Equivalence, OnnxGraph, Pass, PassContext, PassResult

_FLOATS = (np.float16, np.float32, np.float64)  # Relu takes these in every opset; Clip's min/max input form, from 11
_SIGNED_INTS = (np.int8, np.int16, np.int32, np.int64)  # Relu takes these from opset 14 on


@dataclass(frozen=True)
class ClipToReluOptions:
    strict: bool = False  # rewrite only Clip(x, 0, +inf), leaving Clips whose max is omitted (see the module doc)


class ClipToRelu(Pass):
    """Replace Clip(x, min=0) without an upper bound by Relu(x) (strict=true: only max=+inf)."""

    name = "clip-to-relu"
    irs = frozenset({"onnx"})
    equivalence = Equivalence.EXACT
    Options = ClipToReluOptions

    def run_onnx(self, graph: OnnxGraph, ctx: PassContext) -> PassResult:
        replaced = skipped = 0
        for node in list(graph.gs.nodes):  # a copy: orphaned Constant nodes are removed from the list
            if node.op != "Clip" or node.domain not in ("", "ai.onnx", None) or not self._is_relu(node):
                continue
            dtype = OnnxGraph.constant_value(node.inputs[1]).dtype  # min has the type of x
            if not (dtype in _FLOATS or (dtype in _SIGNED_INTS and graph.opset >= 14)):
                skipped += 1
                continue
            # Rewrite the node in place: it keeps its name and output tensor, so consumers and graph
            # outputs need no rewiring. pop() on gs's synchronized list also unlinks min/max from this node.
            dropped = [node.inputs.pop() for _ in node.inputs[1:]]
            node.op = "Relu"
            for tensor in dropped:
                _remove_if_orphan_constant_node(graph, tensor)
            replaced += 1
        notes = [f"left {skipped} Clip(min=0) on types Relu does not take at opset {graph.opset}"] if skipped else []
        return PassResult(graph, modified=replaced > 0, stats={"replaced Clip": replaced} if replaced else {},
                          notes=notes)

    def _is_relu(self, node) -> bool:
        """Clip(x, 0) with max omitted (unless strict), or Clip(x, 0, +inf); min and max constant scalars."""
        if node.attrs or len(node.inputs) < 2:  # the attribute form (opset < 11), or min omitted
            return False
        low = _scalar(node.inputs[1])
        if low is None or low != 0.0:
            return False
        if len(node.inputs) < 3 or not node.inputs[2].name:  # "" is how ONNX writes an omitted optional input
            return not self.options.strict
        return _scalar(node.inputs[2]) == np.inf


def _scalar(tensor) -> float | None:
    """The value of a one-element constant tensor, else None (an omitted input or a runtime value)."""
    value = OnnxGraph.constant_value(tensor) if tensor.name else None
    return float(value.reshape(())) if value is not None and value.size == 1 else None


def _remove_if_orphan_constant_node(graph: OnnxGraph, tensor) -> None:
    """A Constant node whose only reader was the rewritten Clip is dead now: remove it. (An unused
    initializer needs nothing: graph export writes only the tensors nodes still use.)"""
    if tensor.outputs or tensor in graph.gs.outputs or len(tensor.inputs) != 1 or tensor.inputs[0].op != "Constant":
        return
    producer = tensor.inputs[0]
    producer.outputs.clear()
    graph.gs.nodes.remove(producer)

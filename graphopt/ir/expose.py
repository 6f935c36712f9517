"""Intermediate tensors as graph outputs: how graphopt looks inside a model when it runs it (calibration's
observers, fp16's overflow check, per-layer SQNR). :func:`expose` gives a copy of an :class:`OnnxGraph` whose
outputs also include the named tensors; its ``session()`` runs it on onnxruntime.

Making a tensor a graph output can stop onnxruntime fusing the node that produces it (a QDQ Conv then runs as
float Conv on dequantized values): with ``session(optimized=False)`` nothing is fused at all, so every exposed
value is the one the graph as written computes.
"""

from __future__ import annotations

from typing import Iterable

from graphopt.ir.onnx_graph import OnnxGraph

__all__ = ["expose"]


def expose(graph: OnnxGraph, names: Iterable[str]) -> OnnxGraph:
    """A copy of ``graph`` whose outputs are its own, then the tensors ``names`` (in that order, each once; graph
    inputs may be named). The graph itself is not changed; weights are shared with the copy, not copied."""
    out = graph.copy()
    tensors = out.gs.tensors()
    present = {t.name for t in out.gs.outputs}
    for name in names:
        if name in present:
            continue
        if name not in tensors:
            raise KeyError(f"no tensor '{name}' in the graph to expose as an output")
        out.gs.outputs.append(tensors[name])
        present.add(name)
    return out

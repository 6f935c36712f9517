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


def expose_fx(gm, names: Iterable[str]):
    """A ``torch.fx.GraphModule`` sharing ``gm``'s parameters whose forward takes the placeholders positionally
    and returns a flat tuple: ``gm``'s outputs (flattened), then the values of the nodes ``names`` (in that
    order). ``gm`` itself is not changed."""
    import torch
    from torch.utils._pytree import tree_flatten

    graph = torch.fx.Graph()
    remap: dict = {}
    out = graph.graph_copy(gm.graph, remap, return_output_node=True)  # the output's value, not its node
    outputs = list(tree_flatten(out[0] if isinstance(out, tuple) else out)[0])
    by_name = {n.name: remap[n] for n in gm.graph.nodes if n in remap}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise KeyError(f"no node '{missing[0]}' in the graph to expose as an output")
    graph.output(tuple(outputs) + tuple(by_name[n] for n in names))
    return torch.fx.GraphModule(gm, graph)

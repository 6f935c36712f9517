"""What onnx-graphsurgeon (graphopt's ONNX IR) does not carry on its own, put back around it.

- :func:`copy_gs`: ``graph.copy()`` drops a Variable's ``type`` (a sequence comes back a tensor);
- :func:`export_optional_types`: its exporter fails on values of optional type;
- :func:`restore_type_attributes`: its importer drops type-valued attributes (Optional's ``type``).
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from graphopt.ir.onnx_checks import graphs


def export_optional_types(graph: gs.Graph) -> onnx.ModelProto:
    """``gs.export_onnx(graph)``, also for values of optional type, which onnx-graphsurgeon imports (``type``
    "optional_type", ``dtype`` the element's TypeProto) but cannot export: they go out untyped and their
    ValueInfos (graph and subgraph inputs and outputs) are given the optional type afterwards."""
    optional = {id(t): t for g in gs_graphs(graph) for t in g.tensors().values()
                if isinstance(t, gs.Variable) and getattr(t, "type", "tensor_type") == "optional_type"}
    saved = {t.name: t.dtype for t in optional.values()}
    for t in optional.values():
        t.dtype = None
    try:
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for t in optional.values():
            t.dtype = saved[t.name]
    if saved:
        for g in graphs(model.graph):
            for vi in [*g.input, *g.output, *g.value_info]:
                if vi.name in saved and isinstance(saved[vi.name], onnx.TypeProto):
                    vi.type.CopyFrom(onnx.helper.make_optional_type_proto(saved[vi.name]))
    return model


def gs_graphs(graph: gs.Graph) -> list[gs.Graph]:
    """``graph`` and every subgraph in it (If / Loop / Scan bodies, nested)."""
    return [graph, *(sub for node in graph.nodes for sub in node.subgraphs(recursive=True))]


def copy_gs(graph: gs.Graph) -> gs.Graph:
    """``graph.copy()``, with what onnx-graphsurgeon's copy drops put back: a Variable's ``type`` (a sequence
    input would come back a tensor, and the model an invalid one), in the graph and in every subgraph."""
    out = graph.copy()
    _restore_types(graph, out)
    return out


def _restore_types(source: gs.Graph, copy: gs.Graph) -> None:
    kinds = {name: t.type for name, t in source.tensors().items() if getattr(t, "type", "tensor_type") != "tensor_type"}
    for name, tensor in copy.tensors().items():
        if name in kinds and isinstance(tensor, gs.Variable):
            tensor.type = kinds[name]
    for original, copied in zip(source.nodes, copy.nodes):
        for key, value in original.attrs.items():
            if isinstance(value, gs.Graph) and isinstance(copied.attrs.get(key), gs.Graph):
                _restore_types(value, copied.attrs[key])


def restore_type_attributes(proto: onnx.GraphProto, graph: gs.Graph) -> None:
    """Put back the type-valued attributes (Optional's ``type``) onnx-graphsurgeon's import drops, in the graph and
    every subgraph (its nodes come in the proto's order); its exporter writes a TypeProto value back as one."""
    for source, node in zip(proto.node, graph.nodes):
        for attr in source.attribute:
            if attr.type == onnx.AttributeProto.TYPE_PROTO:
                node.attrs[attr.name] = attr.tp
            elif attr.type == onnx.AttributeProto.TYPE_PROTOS:
                node.attrs[attr.name] = list(attr.tps)
            elif attr.type == onnx.AttributeProto.GRAPH and isinstance(node.attrs.get(attr.name), gs.Graph):
                restore_type_attributes(attr.g, node.attrs[attr.name])
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub, copied in zip(attr.graphs, node.attrs.get(attr.name) or []):
                    if isinstance(copied, gs.Graph):
                        restore_type_attributes(sub, copied)

"""Each fusion group's own int8 noise, from one fully-quantized graph: the cheap proxy of
:mod:`graphopt.report.sensitivity`.

A group's int8 form is cut out of the fully-quantized graph (the Q/DQ of its inputs, its int8 weight, its anchor and
fused epilogue, its requantized output) and run on the float model's values of the tensors it reads; its output is
compared with the float model's. Fed float inputs, a group is charged only for the noise it makes, not for what it
inherits from the groups before it. The difference of per-layer noise ratios (output minus worst input) that this
replaces could not say that: a convolution averages its input's noise down, an Add mixes two inputs, a float
BatchNormalization between a conv and the next group rescales both, so it came out <= 0 (an infinite score, ranked
last) for such groups. Cost: one float run keeping every tensor the groups read and write, one small session per
group.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper

from graphopt.ir.onnx_graph import OnnxGraph

__all__ = ["own_noise_db"]

FLOOR_DB = 300.0  # a group that adds no noise at all (its int8 form is exact on these samples)


def own_noise_db(graph: OnnxGraph, quantized: OnnxGraph, groups, scheme, data: dict[str, np.ndarray], backend
                 ) -> dict[str, float]:
    """Each group's own noise as an SQNR in dB (its name -> dB, at most :data:`FLOOR_DB`): ``graph`` the float
    model, ``quantized`` it fully in int8, ``groups`` its decision groups (name: the anchor node, output: the tensor
    after its epilogue), ``scheme`` the backend's, ``data`` the samples (one batch)."""
    from graphopt.report.metrics import expose, match_tensors

    model, qmodel = graph.to_model(), quantized.to_model()
    counterpart = {m.tensor: m.other for m in match_tensors(model, qmodel)[0]}
    cuts = {grp.name: _group_nodes(qmodel, graph, grp, counterpart.get(grp.output, grp.output), scheme)
            for grp in groups}
    needed = sorted({t for _, inputs, _ in cuts.values() for t in inputs} | {grp.output for grp in groups})
    exposed = expose(model, needed)
    values = dict(zip([o.name for o in exposed.graph.output],
                      backend.run_batched(exposed, data, len(next(iter(data.values()))))))
    out = {}
    for grp in groups:
        nodes, inputs, output = cuts[grp.name]
        feeds = {t: values[t] for t in inputs}
        (got,) = backend.run(backend.session(_submodel(qmodel, nodes, feeds, output)), feeds)
        ref = np.asarray(values[grp.output], np.float64)
        noise, signal = float(np.sum((np.asarray(got, np.float64) - ref) ** 2)), float(np.sum(ref ** 2))
        ratio = noise / signal if signal > 0 else 0.0
        out[grp.name] = min(FLOOR_DB, -10.0 * math.log10(ratio)) if ratio > 0 else FLOOR_DB
    return out


def _group_nodes(quantized, graph: OnnxGraph, grp, output: str, scheme) -> tuple[list, list[str], str]:
    """The nodes of the fully-quantized model ``quantized`` that compute group ``grp``'s ``output`` (its counterpart
    of the group's output tensor), back to the tensors the rest of the graph gives it: (nodes in graph order, those
    input tensors, the output). The walk crosses Q/DQ nodes, the group's own nodes (its anchor and the epilogue
    chain to its output) and a passthrough op that reads a DequantizeLinear (TensorRT's Q/DQ -> Reshape -> MatMul)."""
    kernel = {grp.name}
    readers: dict[str, list] = {}
    for node in graph.gs.nodes:
        for t in node.inputs:
            readers.setdefault(t.name, []).append(node)
    anchor = next(n for n in graph.gs.nodes if n.name == grp.name)
    t = anchor.outputs[0].name
    while t != grp.output and len(readers.get(t, [])) == 1 and len(kernel) < 8:  # the fused epilogue
        kernel.add(readers[t][0].name)
        t = readers[t][0].outputs[0].name
    producer = {o: n for n in quantized.graph.node for o in n.output if o}
    constants = {i.name for i in quantized.graph.initializer}
    taken, inputs, stack = set(), [], [output]
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if not name or name in constants or (node is not None and id(node) in taken):
            continue
        crosses = node is not None and (
            node.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant") or node.name in kernel
            or (node.op_type in scheme.passthrough_ops and node.input
                and getattr(producer.get(node.input[0]), "op_type", "") == "DequantizeLinear"))
        if not crosses:
            if name not in inputs:
                inputs.append(name)
            continue
        taken.add(id(node))
        stack.extend(node.input)
    return [n for n in quantized.graph.node if id(n) in taken], inputs, output


def _submodel(quantized, nodes: list, feeds: dict[str, np.ndarray], output: str):
    """A model of ``nodes`` (of ``quantized``) reading ``feeds`` and writing ``output``."""
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(
        nodes, "group", [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                         for k, v in feeds.items()],
        [helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)],
        [t for t in quantized.graph.initializer if t.name in used])
    return helper.make_model(graph, opset_imports=quantized.opset_import, ir_version=quantized.ir_version)

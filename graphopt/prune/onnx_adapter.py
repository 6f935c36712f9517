"""Show an OnnxGraph to the pruning engine and apply its plan.

The view names values by tensor name; shapes come from ONNX shape inference. Constant-node outputs are lifted to
initializers and subgraphs of constants folded (onnx-graphsurgeon's ``fold_constants``) first, so every weight and
shape target is a ``gs.Constant`` (torch's exporter writes ``MatMul(x, Transpose(W))`` without folding). A constant
several nodes read (torch's TorchScript exporter shares every pair of equal initializers, so with random weights all
zero biases of one size are one tensor) is shown once per reader, under its own name after the first
(``name@node``): each reader is pruned with its own channels, never coupled to, nor sliced for, another. Applying a
plan puts new Constants in the slots of sliced weights (never changing an array in place), writes new Reshape
targets, Split sizes and Slice bounds as fresh Constants (the old ones may be shared) and updates Conv ``group``.
What an If / Loop / Scan subgraph reads from the enclosing graph by name is shown as an input of that node (which
has no handler: those channels stay whole). Inferred shapes of intermediate tensors are dropped; the pass then
checks the result (strict shape inference, a run on onnxruntime).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.onnx_graph import OnnxGraph, fresh_name, replace_input
from graphopt.prune.view import ChannelView, Plan, PNode


class OnnxChannels:
    def __init__(self, graph: OnnxGraph):
        self.graph = graph
        self.nodes: dict[str, gs.Node] = {}
        self.readers: dict[str, tuple[gs.Constant, gs.Node]] = {}  # a constant's view name -> it and its reader
        self.names: dict[tuple[int, str], str] = {}  # (id of a constant, reader) -> the view's name
        self.seen: set[int] = set()

    def _lift_constant_nodes(self) -> None:
        for node in list(self.graph.gs.nodes):
            if node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
                self.graph.fold_to_constant(node, node.attrs["value"].values)  # a graph output stays a node
        self.graph.gs.cleanup()

    def _fold_weight_preprocessing(self) -> None:
        """Fold subgraphs computed from constants alone (a Transpose of a Linear weight, a Reshape target built by
        Concat(Unsqueeze(...)), a chunk's bounds from static shapes), so weights and targets are constants."""
        g = self.graph.gs
        constant = lambda t: isinstance(t, gs.Constant) or not t.name  # noqa: E731
        if any(n.inputs and all(constant(t) for t in n.inputs) or n.op == "Shape" for n in g.nodes):
            self.graph.fold_constant_subgraphs()

    def view(self) -> ChannelView:
        g = self.graph.gs
        self._lift_constant_nodes()
        self._fold_weight_preprocessing()
        self._lift_constant_nodes()
        g.toposort()
        shapes: dict[str, tuple] = {}
        for t in g.inputs:
            shapes[t.name] = tuple(d if isinstance(d, int) else None for d in (t.shape or ())) if t.shape else None
        for name, (dims, _) in self.graph.inferred_shapes().items():
            shapes[name] = tuple(d if isinstance(d, int) and d > 0 else None for d in dims)
        consts: dict[str, np.ndarray] = {}
        names = {n.name for n in g.nodes if n.name}
        values = set(g.tensors())
        nodes = []
        for node in g.nodes:
            if not node.name or node.name in self.nodes:
                node.name = fresh_name(names, f"{node.op}_{len(self.nodes)}")
                names.add(node.name)
            self.nodes[node.name] = node
            inputs = [self._constant(t, node, consts, shapes, values) if isinstance(t, gs.Constant) else t.name or None
                      for t in node.inputs]
            inputs += [name for name in dict.fromkeys(outer_reads(node)) if name not in inputs]
            nodes.append(PNode(node.name, node.op, inputs, [t.name for t in node.outputs], dict(node.attrs)))
        return ChannelView(nodes, shapes, consts, [t.name for t in g.inputs], [t.name for t in g.outputs], "onnx")

    def _constant(self, t: gs.Constant, node: gs.Node, consts: dict, shapes: dict, values: set[str]) -> str:
        """The view's name for constant ``t`` read by ``node``: its own name for its first reader, a fresh one
        (``name@node``) for each other reader; a node that reads it twice reads one value."""
        key = (id(t), node.name)
        if key not in self.names:
            first = id(t) not in self.seen
            self.seen.add(id(t))
            self.names[key] = t.name if first else fresh_name(values, f"{t.name}@{node.name}")
            self.readers[self.names[key]] = (t, node)
        name = self.names[key]
        consts[name], shapes[name] = t.values, tuple(t.values.shape)
        return name

    # -- applying a plan ----------------------------------------------------------------------------------
    def fork(self) -> "OnnxChannels":
        """An adapter over a copy of the graph as :meth:`view` left it (same names), to apply a plan to."""
        twin = OnnxChannels(self.graph.copy())
        by_name = {node.name: node for node in twin.graph.gs.nodes}
        twin.nodes = {name: by_name[name] for name in self.nodes}
        for value, (tensor, reader) in self.readers.items():
            copy = by_name[reader.name]
            twin.readers[value] = (next(t for t in copy.inputs if t.name == tensor.name), copy)
        return twin

    def _const_input(self, node: gs.Node, index: int, values, dtype=np.int64) -> None:
        names = set(self.graph.gs.tensors())
        old = node.inputs[index] if index < len(node.inputs) else None
        dtype = old.values.dtype if isinstance(old, gs.Constant) else dtype
        const = gs.Constant(fresh_name(names, f"{node.name}_{index}"), np.asarray(values, dtype=dtype))
        if old is None:
            while len(node.inputs) < index:
                node.inputs.append(gs.Variable.empty())
            node.inputs.append(const)
        else:
            node.inputs[index] = const

    def apply(self, plan: Plan) -> None:
        g = self.graph.gs
        values = set(g.tensors())
        for name, array in plan.consts.items():
            old, reader = self.readers[name]
            shared = any(consumer is not reader for consumer in old.outputs)  # the other readers keep the original
            new = gs.Constant(fresh_name(values, f"{old.name}_pruned") if shared else old.name,
                              np.ascontiguousarray(array))
            replace_input(reader, old, new)
        for (node_name, key), value in plan.attrs.items():
            node = self.nodes[node_name]
            if key == "group":
                node.attrs["group"] = int(value)
            elif key == "shape":
                self._const_input(node, 1, value)
            elif key == "split":
                if "split" in node.attrs:
                    node.attrs["split"] = [int(v) for v in value]
                else:
                    node.attrs.pop("num_outputs", None)
                    self._const_input(node, 1, value)
            elif key.startswith("input:"):  # a one-element piece of a Reshape target built by Concat
                self._const_input(node, int(key.partition(":")[2]), value)
            elif key == "slice":
                starts, ends = value
                self._const_input(node, 1, starts)
                self._const_input(node, 2, ends)
            else:
                raise ValueError(f"the ONNX pruning adapter cannot set '{key}' on {node.op} '{node_name}'")
        self.graph.forget_shapes()
        g.cleanup()


def outer_reads(node: gs.Node) -> list[str]:
    """The tensors of the enclosing graph that ``node``'s subgraphs (If branches, Loop and Scan bodies) read by
    name without listing them as inputs: shown to the engine as inputs of the node, so their channels are
    blocked (no handler looks inside a subgraph) instead of pruned under a reader that cannot follow."""
    subs = list(node.subgraphs(recursive=True))
    inner = {t.name for sub in subs for t in [*sub.inputs, *(o for n in sub.nodes for o in n.outputs)]}
    return [t.name for sub in subs for n in sub.nodes for t in n.inputs
            if isinstance(t, gs.Variable) and t.name and t.name not in inner]

"""Fusion groups: the kernel a backend builds around each int8 op of an ONNX graph, read off the graph with the
backend's :class:`~graphopt.backends.QuantScheme`.

One group per *anchor*, a weighted op of the scheme (``weight_channel_axis``: Conv, ConvTranspose, Gemm,
MatMul), with what runs in the same kernel: its epilogue and the Q/DQ nodes that feed it. The epilogue, in order:

1. a bias Add (an Add of a constant, which a MatMul exported from a Linear layer has) that alone reads the output;
2. with ``scheme.fused_add``, for a convolution (:data:`RESIDUAL_ANCHORS`), a residual Add (two activation inputs,
   ``Add`` in ``quantized_ops``) that alone reads the output so far: the add runs as the kernel's epilogue on
   float accumulators, so that input stays float and only the *other* one (the residual,
   ``FusionGroup.residual``) is quantized;
3. a ``fused_activations`` op (Relu, Clip, ...) that alone reads the output so far.

The order is TensorRT's: conv -> add -> relu fuses into one kernel, conv -> relu -> add fuses the relu only (the
add then reads an activation, not the conv's accumulator). When both inputs of an Add come from anchors that could
take it, the lowest-common-ancestor rule of NVIDIA ModelOpt (``build_non_residual_input_map``) decides: the branch
whose producer is *further* from the two producers' lowest common ancestor is the main path and takes the add; the
shorter one (the shortcut: a ResNet downsample conv) is the residual and gets Q/DQ. Distances are shortest paths
(breadth first; ModelOpt takes the first depth-first path); a tie gives the add to input 1, as ModelOpt does.

The Q/DQ nodes of a group (on a Q/DQ graph; none on a float one) are the DequantizeLinear nodes the anchor and the
residual read, through passthrough ops (a DQ before a Pad or MaxPool still feeds the conv), with the
QuantizeLinear before each, and the weight's DequantizeLinear. A DQ read by several anchors (a tensor read by
q, k and v projections) is in each of their groups. Falling back part of a group to float only splits a kernel:
automatic compression decides per group, never per node.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable

import onnx_graphsurgeon as gs

from graphopt.backends.scheme import QuantScheme
from graphopt.ir.ops import is_standard_domain

__all__ = ["RESIDUAL_ANCHORS", "FusionGroup", "fusion_groups", "lca_distances"]

# The ops whose kernel takes a residual Add as its epilogue: TensorRT's documented residual fusion is a
# convolution's (its guide's figures 6-7), ModelOpt's "fusible backbones" are Conv and ConvTranspose only
# (``get_fusible_backbone``), and inductor's x86 patterns fuse ``sum`` into oneDNN convolutions only. A residual Add
# after a Gemm/MatMul (a transformer's) is not fused: it stays float, or with ``residual_add_qdq`` reads int8.
RESIDUAL_ANCHORS = frozenset({"Conv", "ConvTranspose"})


@dataclass(frozen=True)
class FusionGroup:
    """One kernel around an int8 op. ``anchor``: its node name; ``op``: its op type; ``epilogue``: the names of the
    nodes fused after it (bias Add, residual Add, activation), in order; ``add``: the residual Add among them, or
    None; ``residual``: the name of that Add's other input (the tensor quantized for it); ``qdq``: the names of the
    Q/DQ nodes feeding the group."""

    anchor: str
    op: str
    epilogue: tuple[str, ...] = ()
    add: str | None = None
    residual: str | None = None
    qdq: tuple[str, ...] = ()

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node of the group: anchor, epilogue, Q/DQ."""
        return (self.anchor, *self.epilogue, *self.qdq)


def fusion_groups(graph, scheme: QuantScheme, anchors: Iterable[str] | None = None) -> list[FusionGroup]:
    """The fusion groups of ``graph`` (an :class:`~graphopt.ir.OnnxGraph` or a ``gs.Graph``, float or Q/DQ'd) under
    ``scheme``, one per anchor in graph order (see the module docstring). ``anchors``: only these node names may
    anchor a group (the ones place-qdq quantizes); None: every weighted op of the scheme on a float graph, every
    one whose input comes from a DequantizeLinear on a graph that has any (a weighted op left float anchors none).
    """
    g = graph if isinstance(graph, gs.Graph) else graph.gs
    allowed = None if anchors is None else set(anchors)
    outputs = {id(t) for t in g.outputs}
    found = [n for n in g.nodes if n.op in scheme.weighted_ops and is_standard_domain(n.domain)
             and (allowed is None or n.name in allowed)]
    if allowed is None and any(n.op == "DequantizeLinear" for n in g.nodes):  # a Q/DQ graph: its int8 ops
        found = [n for n in found if n.inputs and _qdq_before(n.inputs[0], scheme)]

    def single_reader(t: gs.Tensor) -> gs.Node | None:
        return t.outputs[0] if len(t.outputs) == 1 and id(t) not in outputs else None

    heads: dict[int, tuple[gs.Node, list[gs.Node], gs.Tensor]] = {}  # anchor -> (anchor, bias Add, output so far)
    claims: dict[int, list[int]] = {}  # residual Add -> anchors that could take it
    for anchor in found:
        chain, out = [], anchor.outputs[0]
        reader = single_reader(out)
        if reader is not None and _is_bias_add(reader):
            chain.append(reader)
            out = reader.outputs[0]
        heads[id(anchor)] = (anchor, chain, out)
        reader = single_reader(out)
        if scheme.fused_add and anchor.op in RESIDUAL_ANCHORS and reader is not None \
                and _is_residual_add(reader, scheme):
            claims.setdefault(id(reader), []).append(id(anchor))
    taken: dict[int, gs.Node] = {}  # anchor -> the Add it takes
    for candidates in claims.values():
        add = single_reader(heads[candidates[0]][2])
        winner = candidates[0] if len(candidates) == 1 else _main_path(add, [heads[c] for c in candidates])
        taken[winner] = add
    groups = []
    for anchor in found:
        _, chain, out = heads[id(anchor)]
        chain, add, residual = list(chain), taken.get(id(anchor)), None
        if add is not None:
            chain.append(add)
            residual = next(t for t in add.inputs[:2] if t is not out)
            out = add.outputs[0]
        reader = single_reader(out)
        if reader is not None and reader.op in scheme.fused_activations and is_standard_domain(reader.domain):
            chain.append(reader)
        qdq = _feeding_qdq(anchor, scheme) + (_qdq_before(residual, scheme) if residual is not None else [])
        groups.append(FusionGroup(anchor.name, anchor.op, tuple(n.name for n in chain),
                                  add.name if add is not None else None,
                                  residual.name if residual is not None else None,
                                  tuple(dict.fromkeys(n.name for n in qdq))))
    return groups


def lca_distances(a: gs.Node, b: gs.Node) -> tuple[gs.Node | None, int, int]:
    """The lowest common ancestor of nodes ``a`` and ``b`` (the common ancestor nearest to ``a``; a node is its own
    ancestor) and the distances from ``a`` and ``b`` to it, in edges; (None, -1, -1) when they share none."""
    up_a, up_b = _ancestors(a), _ancestors(b)
    common = [n for n in up_a.values() if id(n[0]) in up_b]
    if not common:
        return None, -1, -1
    node, distance = min(common, key=lambda nd: nd[1])
    return node, distance, up_b[id(node)][1]


def _ancestors(node: gs.Node) -> dict[int, tuple[gs.Node, int]]:
    """Every node ``node`` depends on (itself included), with its shortest distance in edges."""
    seen = {id(node): (node, 0)}
    queue = deque([node])
    while queue:
        cur = queue.popleft()
        for t in cur.inputs:
            if isinstance(t, gs.Variable) and t.inputs and id(t.inputs[0]) not in seen:
                seen[id(t.inputs[0])] = (t.inputs[0], seen[id(cur)][1] + 1)
                queue.append(t.inputs[0])
    return seen


def _main_path(add: gs.Node, heads) -> int:
    """Of the anchors that could take residual ``add`` (both its inputs), the one on the longer path from the two
    inputs' lowest common ancestor (ModelOpt's rule: the shorter path is the shortcut, quantized); a tie: input 1's."""
    by_input = {}
    for anchor, _, out in heads:
        by_input[0 if add.inputs[0] is out else 1] = anchor
    producers = [add.inputs[i].inputs[0] for i in (0, 1)]
    _, d0, d1 = lca_distances(producers[0], producers[1])
    return id(by_input[0] if d0 > d1 else by_input[1])


def _is_bias_add(node: gs.Node) -> bool:
    return node.op == "Add" and is_standard_domain(node.domain) and len(node.inputs) == 2 \
        and any(_is_constant(t) for t in node.inputs)


def _is_residual_add(node: gs.Node, scheme: QuantScheme) -> bool:
    return node.op == "Add" and "Add" in scheme.quantized_ops and is_standard_domain(node.domain) \
        and len(node.inputs) == 2 and node.inputs[0] is not node.inputs[1] \
        and not any(_is_constant(t) for t in node.inputs)


def _is_constant(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant) or (len(t.inputs) == 1 and t.inputs[0].op == "Constant")


def _feeding_qdq(anchor: gs.Node, scheme: QuantScheme) -> list[gs.Node]:
    nodes = []
    for t in anchor.inputs[:2]:
        nodes += _qdq_before(t, scheme)
    return nodes


def _qdq_before(t: gs.Tensor, scheme: QuantScheme) -> list[gs.Node]:
    """The DequantizeLinear that tensor ``t`` comes from (through passthrough ops) and the QuantizeLinear before it."""
    seen = 0
    while t.inputs and seen < 64:
        producer = t.inputs[0]
        if producer.op == "DequantizeLinear":
            q = producer.inputs[0].inputs[0] if producer.inputs[0].inputs else None
            return [producer] + ([q] if q is not None and q.op == "QuantizeLinear" else [])
        if producer.op not in scheme.passthrough_ops or not producer.inputs:
            return []
        t, seen = producer.inputs[0], seen + 1
    return []

"""Where a :class:`~graphopt.backends.QuantScheme` puts Q/DQ pairs on an ONNX graph: which activation tensors, and
which calibrated ranges each one's scale covers. ``place-qdq`` writes the plan; this module only decides it.

Two forms, chosen by ``scheme.requantize_outputs``:

- **requantizing** (onnxruntime's QLinear kernels): a Q/DQ on each float input of a quantized op and on its output
  (after a ``fused_activations`` op that alone reads it, whose clamp the Q performs; a model output only with
  ``requantize_graph_outputs``); a passthrough op between
  quantized tensors (MaxPool, Reshape, ...) writes its output with its input's scale, so nothing requantizes
  around it.
- **inputs only** (TensorRT's explicit quantization, x86's oneDNN: the same placement the PT2E route's
  :func:`graphopt.pt2e.quantizer.plan` makes on FX): a Q/DQ only where an int8 kernel reads a tensor, on the
  float inputs of each quantized op, never on its output for its own sake. The Adds are decided by the
  :func:`~graphopt.backends.fusion.fusion_groups`: one fused into a weighted op's epilogue (``fused_add``) gets
  a Q/DQ on its residual input only; another Add gets both with ``residual_add_qdq``, none without. A tensor a
  passthrough op makes is quantized *before* that op instead (Q/DQ -> Pad -> Conv, Q/DQ -> MaxPool -> Conv,
  Q/DQ -> Reshape -> Transpose -> MatMul): quantization commutes with them, and a Q/DQ between a Pad, Reshape or
  Transpose and the Conv or MatMul that reads it keeps TensorRT from fusing them. All inputs of a passthrough
  Concat share one scale (the union of their calibrated ranges), so the concatenation is a copy in int8 with no
  reformat. A graph output is never quantized (its readers read the Q/DQ, the output stays float).

:func:`too_small` is the scheme's ``min_channels`` exclusion (NVIDIA ModelOpt's, for TensorRT's tensor cores).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Container

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.backends.fusion import FusionGroup, fusion_groups
from graphopt.backends.scheme import QuantScheme
from graphopt.ir.onnx_graph import OnnxGraph
from graphopt.ir.ops import is_standard_domain

__all__ = ["BIAS_SLOT", "CHANNEL_ALIGN", "ActivationPlan", "plan_activations", "too_small"]

BIAS_SLOT = {"Conv": 2, "Gemm": 2, "ConvTranspose": 2}
MHA_MAX_SEQUENCE = 512  # ModelOpt leaves int8 attention MatMuls float past this sequence length
CHANNEL_ALIGN = 8  # int8 tensor-core kernels take small channel counts that are multiples of 8 (ModelOpt's rule)


@dataclass
class ActivationPlan:
    """``tensors``: the activation tensors that get a Q/DQ pair (name -> tensor, in graph order); ``sources``:
    for each, the tensors whose calibrated ranges its scale covers (the union; one tensor unless it shares a scale);
    ``quantized``: the nodes that read int8; ``groups``: the fusion groups of the int8 ops, and ``fused_adds`` how
    many residual Adds they take (inputs-only form)."""

    tensors: dict[str, gs.Variable] = field(default_factory=dict)
    sources: dict[str, tuple[str, ...]] = field(default_factory=dict)
    quantized: list[gs.Node] = field(default_factory=list)
    groups: list[FusionGroup] = field(default_factory=list)
    fused_adds: int = 0
    inputs_only: bool = False

    def int8_readers(self, tensor: gs.Variable, scheme: QuantScheme) -> list[gs.Node]:
        """The readers of ``tensor`` that its DequantizeLinear feeds. Requantizing form: all of them (a float op
        reads the int8 tensor dequantized, as onnxruntime's QLinear chain does). Inputs-only form: only the ops
        that read int8 (the planned ones, and passthrough ops on the way to one); a float op that reads the same
        tensor (a LayerNorm or a float Add beside the q/k/v MatMuls) keeps reading it unrounded, as it would on
        the backend, where only the int8 kernel's input is quantized. In either form, the scheme's
        ``float_readers`` read it unrounded."""
        readers = [r for r in tensor.outputs if r.op not in scheme.float_readers]
        if not self.inputs_only:
            return readers
        planned = {id(n) for n in self.quantized}

        def reads_int8(node: gs.Node, depth: int = 0) -> bool:
            if id(node) in planned:
                return True
            if node.op not in scheme.passthrough_ops or not is_standard_domain(node.domain) or depth > 32:
                return False
            return any(reads_int8(r, depth + 1) for out in node.outputs for r in out.outputs)

        return [r for r in readers if reads_int8(r)]


def plan_activations(g: gs.Graph, scheme: QuantScheme, nodes: list[gs.Node], ranged: Container[str]
                     ) -> ActivationPlan:
    """The activation Q/DQ of ``scheme`` for ``nodes`` (the ops chosen for int8, in graph order) on ``g``;
    ``ranged``: the tensors calibration gave a range (a passthrough op's input without one is not moved to)."""
    if scheme.requantize_outputs:
        return _requantizing(g, scheme, nodes)
    return _inputs_only(g, scheme, nodes, ranged)


def _fresh(t) -> bool:
    """A named float variable not already behind a Q/DQ pair."""
    return isinstance(t, gs.Variable) and bool(t.name) and not any(c.op == "QuantizeLinear" for c in t.outputs) \
        and not (t.inputs and t.inputs[0].op == "DequantizeLinear")


def _requantizing(g, scheme, nodes) -> ActivationPlan:
    quantized = set(map(id, nodes))
    plan = ActivationPlan(quantized=list(nodes))

    def add(t):
        if _fresh(t):
            plan.tensors.setdefault(t.name, t)

    for node in nodes:
        for i, t in enumerate(node.inputs):
            if (i == 1 and node.op in scheme.weighted_ops) or i == BIAS_SLOT.get(node.op):
                continue
            add(t)
        out = node.outputs[0]
        readers = out.outputs
        if len(readers) == 1 and readers[0].op in scheme.fused_activations and is_standard_domain(readers[0].domain) \
                and out not in g.outputs:
            out = readers[0].outputs[0]
        if scheme.requantize_graph_outputs or out not in g.outputs:
            add(out)
    shared: dict[str, str] = {}
    for node in g.nodes:  # topological order: chains of passthrough ops share down the chain
        if node.op in scheme.passthrough_ops and is_standard_domain(node.domain) and node.inputs \
                and node.inputs[0].name in plan.tensors:
            out = node.outputs[0]
            if any(id(r) in quantized or (r.op in scheme.passthrough_ops and is_standard_domain(r.domain))
                   for r in out.outputs):
                add(out)
                shared[out.name] = node.inputs[0].name
    for name in plan.tensors:
        source = shared.get(name, name)
        while source in shared:
            source = shared[source]
        plan.sources[name] = (source,)
    return plan


def _inputs_only(g, scheme, nodes, ranged) -> ActivationPlan:
    plan = ActivationPlan(inputs_only=True)
    anchors = [n.name for n in nodes if n.op in scheme.weighted_ops]
    chosen = {n.name for n in nodes}
    plan.groups = fusion_groups(g, scheme, anchors)
    residual = {grp.add: grp.residual for grp in plan.groups if grp.add in chosen}  # an Add excluded stays float
    plan.fused_adds = len(residual)
    graph_outputs = {id(t) for t in g.outputs}

    def is_float(t) -> bool:
        return isinstance(t, gs.Variable) and (t.dtype is None or np.dtype(t.dtype).kind == "f")

    reads = []  # tensors read as int8
    for node in nodes:
        if node.op in scheme.weighted_ops:
            inputs = [t for i, t in enumerate(node.inputs) if i != BIAS_SLOT.get(node.op)
                      and not (i == 1 and OnnxGraph.constant_value(t) is not None)]
        elif node.op == "Add" and node.name in residual:  # fused into a weighted op: only the residual is int8
            inputs = [t for t in node.inputs if t.name == residual[node.name]]
        elif node.op == "Add" and not scheme.residual_add_qdq:
            inputs = []
        else:
            inputs = list(node.inputs)
        inputs = [t for t in inputs if is_float(t) and _fresh(t)]
        if inputs:
            plan.quantized.append(node)
            reads += inputs

    parent: dict[str, str] = {}

    def find(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    def leaves(t: gs.Variable) -> list[gs.Variable]:
        """Where ``t``'s Q/DQ goes: before the passthrough ops that make it."""
        producer = t.inputs[0] if t.inputs else None
        if producer is not None and producer.op in scheme.passthrough_ops and is_standard_domain(producer.domain) \
                and not any(id(o) in graph_outputs for o in producer.outputs):
            data = [x for x in producer.inputs if isinstance(x, gs.Variable) and x.name in ranged and _fresh(x)]
            if data:
                return [leaf for x in data for leaf in leaves(x)]
        return [t]

    for t in reads:
        found = leaves(t)
        for leaf in found:
            plan.tensors.setdefault(leaf.name, leaf)
            parent[find(leaf.name)] = find(found[0].name)
    members: dict[str, list[str]] = {}
    for name in plan.tensors:
        members.setdefault(find(name), []).append(name)
    plan.sources = {name: tuple(members[find(name)]) for name in plan.tensors}
    return plan


def too_small(node: gs.Node, scheme: QuantScheme, shapes: dict | None = None, weight: np.ndarray | None = None,
              reads_input: bool | None = None) -> str | None:
    """Why weighted op ``node`` is too small for ``scheme``'s int8 kernels (``min_channels``), or None.

    NVIDIA ModelOpt's int8 exclusions (``find_nodes_from_convs_to_exclude``, ``find_nodes_from_matmul_to_exclude``):

    - a Conv with fewer than ``min_channels`` input (per group) or output channels, unless TensorRT has int8
      kernels for it: an ungrouped conv with a square kernel whose input or output channels are a multiple of 8
      and that reads the graph's input or has ``min_channels`` on one side; a grouped (depthwise) conv whose output
      channels are a multiple of 8, with a kernel of 3 or more;
    - in fp8, a Conv with ``min_channels`` or fewer input or output channels, or a filter of more than 32 taps;
    - a Gemm/MatMul whose K or N is below ``min_channels`` (tensor cores need 16), or that is a GEMV (an output of
      rank 2 with a dimension 1: a batch-1 classifier, or one whose batch is dynamic, which ModelOpt's
      single-sample shape inference sees as 1; or, for a product of two activations, 1 in either of the last two
      dimensions); in int8, a product of two activations over more than 512 rows (an attention MatMul with a
      longer sequence: ModelOpt's ``find_nodes_from_mha_to_exclude``). ``shapes``: ``OnnxGraph.inferred_shapes()``,
      for the dimensions only they know.

    On a float graph the weight is ``node``'s constant input 1; on a Q/DQ graph (the checker's ``small-conv`` and
    ``gemv`` rules ask the same question) the caller passes it (``weight``) and says whether the node's data input
    is, behind its Q/DQ, the graph's input (``reads_input``).
    """
    limit = scheme.min_channels
    if not limit or node.op not in scheme.weighted_ops or len(node.inputs) < 2:
        return None
    weight = OnnxGraph.constant_value(node.inputs[1]) if weight is None else weight
    if node.op == "Conv":
        if weight is None or weight.ndim < 3:
            return None
        out_ch, in_ch = weight.shape[:2]
        group, kernel = int(node.attrs.get("group", 1)), list(weight.shape[2:])
        if scheme.activations.is_float8:  # ModelOpt's fp8 rule: no small-channel or large-filter fp8 convs
            if out_ch <= limit or in_ch <= limit:
                return f"{in_ch} input channels (per group), {out_ch} output channels: fp8 needs more than {limit}"
            if int(np.prod(kernel)) > 32:
                return f"a {'x'.join(map(str, kernel))} filter: fp8 convolutions take at most 32 taps"
            return None
        if out_ch >= limit and in_ch >= limit:
            return None
        if reads_input is None:
            reads_input = any(not t.inputs and isinstance(t, gs.Variable) for t in node.inputs[:1])
        if group == 1 and (out_ch % CHANNEL_ALIGN == 0 or in_ch % CHANNEL_ALIGN == 0) \
                and (reads_input or out_ch >= limit or in_ch >= limit) and len(set(kernel)) == 1:
            return None
        if group > 1 and out_ch % CHANNEL_ALIGN == 0 and all(k >= 3 for k in kernel):
            return None
        return f"{in_ch} input channels (per group), {out_ch} output channels: under {limit}"
    if node.op not in ("Gemm", "MatMul"):
        return None
    shapes = shapes or {}
    out_dims = list((shapes.get(node.outputs[0].name) or (None, None))[0] or node.outputs[0].shape or [])
    b_dims = list(weight.shape) if weight is not None else \
        list((shapes.get(node.inputs[1].name) or (None, None))[0] or node.inputs[1].shape or [])
    trans_b = node.op == "Gemm" and int(node.attrs.get("transB", 0))
    k = b_dims[-1 if trans_b else -2] if len(b_dims) >= 2 else None
    n = out_dims[-1] if out_dims else None
    known = [d for d in out_dims if isinstance(d, (int, np.integer))]
    if weight is None and len(out_dims) >= 2 and 1 in out_dims[-2:]:
        return f"a matrix-vector product (output {out_dims})"
    rows = out_dims[-2] if weight is None and len(out_dims) >= 2 else None
    if isinstance(rows, (int, np.integer)) and rows > MHA_MAX_SEQUENCE and not scheme.activations.is_float8:
        return f"attention over {rows} positions: int8 attention kernels take at most {MHA_MAX_SEQUENCE}"
    batch_one = len(out_dims) == 2 and not isinstance(out_dims[0], (int, np.integer))  # a dynamic batch: as 1
    if weight is not None and len(out_dims) <= 2 and (1 in known or batch_one):
        return f"a matrix-vector product (output {out_dims}{', at batch 1' if batch_one else ''})"
    small = [f"{label} = {d}" for label, d in (("K", k), ("N", n))
             if isinstance(d, (int, np.integer)) and 0 < d < limit]
    return f"{', '.join(small)}: under {limit}" if small else None

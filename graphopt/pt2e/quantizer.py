"""The backend's :class:`~graphopt.backends.QuantScheme` as PT2E annotations: where Q/DQ go on an ATen graph.

:func:`plan` reads the scheme (ONNX op types; ATen nodes are named in that vocabulary by
:func:`graphopt.ir.fx_ops.onnx_op_type`) and the user's placement options, and decides, node by node, what the
ONNX route's place-qdq decides on an ONNX graph:

- a weighted op (Conv, Linear as Gemm) with a constant float weight: its activation input and its weight (per
  output channel on the scheme's axis) are quantized; its bias stays float (both backends fold it to int32);
- an Add: with ``fused_add``, when one input is the single-use output of a quantized Conv, only the other
  (residual) input is quantized — the add runs as the conv's post-op; otherwise both inputs with
  ``residual_add_qdq``, or none. (Not after a Linear: in a transformer the residual is the LayerNorm output the
  q/k/v projections also read, and inductor merges the dequantize nodes of one tensor, so a quantized residual
  would keep those three projections from matching its int8 Linear pattern: measured, 6 of 14 Linears of a
  BERT-like encoder left in float);
- any other op of ``quantized_ops``: its float inputs;
- ``requantize_outputs``: the output of each quantized op too (after the fused activation that alone reads it);
- a passthrough op (MaxPool, Flatten, ...) whose output an int8 op reads: its input is quantized and its output
  shares that input's parameters, so nothing is requantized around it (a Concat's inputs share one scale).

:class:`SchemeQuantizer` writes the plan as PT2E annotations, torchao's ``prepare_pt2e`` / ``prepare_qat_pt2e``
insert graphopt's observers or fake quantizers (:mod:`graphopt.pt2e.observers`), and its callback gives each
activation observer the range graphopt's calibration computed for the tensor it watches (the union over a shared
group); a tensor calibrated to a signed range takes the scheme's ``signed_activations`` grid where it has one
(OpenVINO's, on CPUs with VNNI: symmetric int8), as place-qdq gives it on ONNX. torchao's own X86InductorQuantizer
was not used: it fails on modules that reuse one ``nn.ReLU`` (its source partitions see one ReLU with several
outputs), it cannot take a range computed by another observer, and it has one fixed scheme where graphopt's comes
from the backend.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from graphopt.backends.scheme import QuantScheme, TensorQuant
from graphopt.ir.fx_ops import computes_float, get_attr, onnx_op_type
from graphopt.pt2e.observers import FakeQuant, PerChannelWeightObserver, RangeObserver
from graphopt.pt2e.torchao import pt2e

_ao = pt2e()
CALIBRATED_AS = "graphopt_calibrated_as"  # node meta: the name its calibrated range is kept under
_TORCH_DTYPES = {"uint8": torch.uint8, "int8": torch.int8}


@dataclass
class Plan:
    """Where Q/DQ go. ``inputs``: quantized input edges (producer, consumer); ``weights``: weighted node ->
    (weight node, channel axis or None); ``outputs``: nodes whose output is quantized; ``shared``: passthrough
    node -> the input edge whose parameters its output takes; ``left_float``: op types of nodes left float."""

    inputs: set = field(default_factory=set)
    weights: dict = field(default_factory=dict)
    outputs: set = field(default_factory=set)
    shared: dict = field(default_factory=dict)
    quantized: list = field(default_factory=list)
    left_float: Counter = field(default_factory=Counter)
    unranged: list = field(default_factory=list)  # tensors left float: no calibrated range


def node_names(node) -> set[str]:
    """What a user may call an ATen node: its FX name and the module path it came from (``layer1.0.conv1``)."""
    names = {node.name}
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            names.add(path)
    return names


def matches(node, patterns) -> bool:
    """``node`` is named by one of ``patterns`` (its FX name, or its module path or a module above it)."""
    names = node_names(node)
    return any(p in names or any(n.startswith(p + ".") for n in names) for p in patterns)


def unmatched(gm, patterns) -> list[str]:
    """The patterns of ``exclude_nodes`` that name no node of ``gm`` (:func:`matches`): a typo, to warn about."""
    nodes = list(gm.graph.nodes)
    return [p for p in patterns if not any(matches(n, (p,)) for n in nodes)]


def _constant_weight(gm, node) -> tuple[torch.fx.Node, torch.Tensor] | None:
    """The ``get_attr`` node of a weighted op's weight and its tensor, when it is a constant float matrix."""
    w = node.args[1] if len(node.args) > 1 else None
    if isinstance(w, torch.fx.Node) and w.op == "get_attr":
        value = get_attr(gm, w.target)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2:
            return w, value
    return None


def plan(gm, scheme: QuantScheme, exclude: tuple[str, ...] = (), keep_first: bool = False,
         keep_last: bool = False, ranged: set[str] | None = None) -> Plan:
    """Where ``scheme`` puts Q/DQ on ATen graph ``gm`` (see the module docstring); ``exclude`` names nodes or
    modules to keep float, ``keep_first`` / ``keep_last`` the first / last weighted layer. ``ranged``: the
    tensors that have a calibrated range (None: all); the others are not quantized, and are listed."""
    nodes = list(gm.graph.nodes)
    ops = {n: onnx_op_type(n) for n in nodes}
    result = Plan()

    def usable(x) -> bool:  # a float tensor with a calibrated range
        if not computes_float(x):
            return False
        if ranged is not None and x.name not in ranged:
            if x.name not in result.unranged:
                result.unranged.append(x.name)
            return False
        return True

    chosen = [n for n in nodes if ops[n] in scheme.quantized_ops and not matches(n, exclude)]
    if scheme.conv_dims:  # a Conv3d where the backend's int8 kernels are 2-D: Q/DQ would add rounding, no speed
        other = [n for n in chosen if ops[n] == "Conv" and _constant_weight(gm, n) is not None
                 and _constant_weight(gm, n)[1].dim() - 2 not in scheme.conv_dims]
        result.left_float.update(f"Conv{_constant_weight(gm, n)[1].dim() - 2}d" for n in other)
        chosen = [n for n in chosen if n not in other]
    weighted = [n for n in chosen if ops[n] in scheme.weighted_ops]
    for keep, pick in ((keep_first, 0), (keep_last, -1)):
        if keep and weighted and weighted[pick] in chosen:
            chosen.remove(weighted[pick])
    chosen_set = set(chosen)
    for n in chosen:
        op = ops[n]
        if op in scheme.weighted_ops:
            weight = _constant_weight(gm, n)
            if weight is None or not usable(n.args[0]):
                continue
            axis = scheme.channel_axis(op, {"transB": 1} if op == "Gemm" else None, weight[1].dim())
            result.weights[n] = (weight[0], axis)
            result.inputs.add((n.args[0], n))
        elif op == "Add":
            tensors = [a for a in n.args[:2] if usable(a)]
            if len(tensors) != 2:
                continue
            fusable = [a for a in tensors if _through_bn(a, ops) in chosen_set
                       and ops[_through_bn(a, ops)] == "Conv" and len(a.users) == 1]
            if scheme.fused_add and fusable:
                result.inputs.add((next(a for a in tensors if a is not fusable[0]), n))
            elif scheme.residual_add_qdq:
                result.inputs.update((a, n) for a in tensors)
            else:
                continue
        else:
            inputs = [a for a in _tensor_args(n) if usable(a)]
            if not inputs:
                continue
            result.inputs.update((a, n) for a in inputs)
        result.quantized.append(n)
    if scheme.requantize_outputs:
        for n in result.quantized:
            out = n
            for follows in ({"BatchNormalization"}, scheme.fused_activations):  # QAT keeps conv -> BN to fold
                users = list(out.users)
                if len(users) == 1 and ops[users[0]] in follows and not matches(users[0], exclude):
                    out = users[0]
            if usable(out) and (scheme.requantize_graph_outputs or all(u.op != "output" for u in out.users)):
                result.outputs.add(out)
    _share_passthrough(nodes, ops, scheme, exclude, result, usable)
    quantized = set(result.quantized) | set(result.shared)
    fused = {u for n in result.quantized for u in n.users if ops[u] in scheme.fused_activations}
    for n in nodes:
        if n.op == "call_function" and n not in quantized and n not in fused and ops[n] is not None \
                and ops[n] not in ("Reshape", "Transpose", "Dropout") and computes_float(n):
            result.left_float[ops[n]] += 1
    return result


def plan_dynamic(gm, scheme: QuantScheme, ops: tuple[str, ...], exclude: tuple[str, ...] = (),
                 min_weight_elements: int = 0) -> Plan:
    """Dynamic int8 (activations quantized at run time): the weighted ops of ``ops`` (Gemm — Linear — and MatMul)
    whose weight is a constant float matrix of at least ``min_weight_elements``; a MatMul of two activations
    (attention's) stays float."""
    result = Plan()
    for n in gm.graph.nodes:
        op = onnx_op_type(n)
        if op not in ops or op not in scheme.weight_channel_axis:
            if op in ("Gemm", "MatMul", "Conv"):
                result.left_float[op] += 1
            continue
        weight = _constant_weight(gm, n)
        if matches(n, exclude) or weight is None or not computes_float(n.args[0]) \
                or weight[1].numel() < min_weight_elements:
            result.left_float[op] += 1
            continue
        axis = scheme.channel_axis(op, {"transB": 1} if op == "Gemm" else None, weight[1].dim())
        result.weights[n] = (weight[0], axis)
        result.inputs.add((n.args[0], n))
        result.quantized.append(n)
    return result


def _through_bn(node, ops):
    """The conv a BatchNorm reads when it alone reads it (QAT keeps conv -> BN until convert folds it), else
    ``node`` itself."""
    if ops.get(node) == "BatchNormalization" and isinstance(node.args[0], torch.fx.Node) \
            and len(node.args[0].users) == 1:
        return node.args[0]
    return node


def _tensor_args(node) -> list:
    args = []
    for a in node.args:
        args.extend(a if isinstance(a, (list, tuple)) else [a])
    return [a for a in args if isinstance(a, torch.fx.Node)]


def _share_passthrough(nodes, ops, scheme, exclude, result: Plan, usable) -> None:
    """A passthrough op whose output is read as int8 runs on int8: its input is quantized and its output shares
    the input's parameters (a Concat: every input shares the first's). Walks backwards, so chains share."""
    read_int8 = {p for p, _ in result.inputs} | result.outputs
    for p in reversed(nodes):
        if ops[p] not in scheme.passthrough_ops or p not in read_int8 or matches(p, exclude):
            continue
        inputs = [a for a in _tensor_args(p) if usable(a)]
        if not inputs or not computes_float(p):
            continue
        for a in inputs:
            result.inputs.add((a, p))
            read_int8.add(a)
        result.shared[p] = (inputs[0], p)


def qspec(tq: TensorQuant, ctr, axis: int | None = None, dynamic: bool = False):
    """A torchao ``QuantizationSpec`` for graphopt's tensor class ``tq`` with observer constructor ``ctr``."""
    per_channel = axis is not None and tq.per_channel
    scheme = (torch.per_channel_symmetric if tq.symmetric else torch.per_channel_affine) if per_channel else \
        (torch.per_tensor_symmetric if tq.symmetric else torch.per_tensor_affine)
    return _ao.QuantizationSpec(dtype=_TORCH_DTYPES[tq.dtype], quant_min=tq.qmin, quant_max=tq.qmax, qscheme=scheme,
                                ch_axis=axis if per_channel else None, is_dynamic=dynamic,
                                observer_or_fake_quant_ctr=ctr)


class SchemeQuantizer(_ao.Quantizer):
    """A PT2E quantizer that annotates :func:`plan`'s placement, with graphopt's observers (``qat=False``) or fake
    quantizers (``qat=True``; ``learn``: LSQ scales), and hands each activation observer its calibrated range
    from ``ranges`` (``{node name: (low, high)}``)."""

    def __init__(self, scheme: QuantScheme, ranges: Mapping[str, tuple[float, float]], *,
                 exclude: tuple[str, ...] = (), keep_first: bool = False, keep_last: bool = False,
                 qat: bool = False, learn: bool = False, dynamic: dict | None = None):
        """``dynamic``: :func:`plan_dynamic`'s options (``ops``, ``min_weight_elements``) for dynamic int8, whose
        activations are quantized at run time (no ranges)."""
        super().__init__()
        self.scheme, self.ranges = scheme, dict(ranges)
        self.options = dict(exclude=tuple(exclude), keep_first=keep_first, keep_last=keep_last)
        self.qat, self.learn, self.dynamic = qat, learn, dynamic
        self.plan: Plan | None = None
        self.unranged: list[str] = []  # QAT: activation tensors no calibration saw (ranged on the first batch)

    def _specs(self):
        """``(activation spec, signed activation spec or None, weight spec per axis)``."""
        acts, weights, signed = self.scheme.activations, self.scheme.weights, self.scheme.signed_activations
        if self.dynamic is not None:
            ctr = _ao.PlaceholderObserver
            return qspec(acts, ctr, dynamic=True), None, lambda axis: qspec(weights, PerChannelWeightObserver, axis)
        if self.qat:
            act_ctr = FakeQuant.with_args(observe=False, learn=self.learn)
            weight_ctr = lambda axis: FakeQuant.with_args(observe=True, learn=self.learn,  # noqa: E731
                                                          ch_axis=axis if axis is not None else 0)
        else:
            act_ctr, weight_ctr = RangeObserver, lambda axis: PerChannelWeightObserver  # noqa: E731
        return (qspec(acts, act_ctr), qspec(signed, act_ctr) if signed is not None else None,
                lambda axis: qspec(weights, weight_ctr(axis), axis))

    def annotate(self, gm):
        if self.dynamic is not None:
            self.plan = p = plan_dynamic(gm, self.scheme, exclude=self.options["exclude"], **self.dynamic)
        else:
            self.plan = p = plan(gm, self.scheme, **self.options, ranged=None if self.qat else set(self.ranges))
        unsigned, signed, weight = self._specs()
        annotations: dict[Any, Any] = {}
        for node in gm.graph.nodes:  # QAT's conv-BN fusion renames the nodes it rebuilds, but keeps their meta
            node.meta.setdefault(CALIBRATED_AS, node.name)

        def act(tensor):  # the scheme's signed grid for a tensor calibrated to a signed range, as place-qdq does
            lo = self.ranges.get(tensor.name, (0.0, 0.0))[0]
            return signed if signed is not None and lo < 0 else unsigned

        def annotation(node):
            if node not in annotations:
                annotations[node] = _ao.QuantizationAnnotation(_annotated=True)
            return annotations[node]

        for producer, consumer in sorted(p.inputs, key=lambda e: (e[1].name, e[0].name)):
            spec = act(producer)
            if producer in p.shared:  # a passthrough's output: the parameters of the edge it shares
                spec = _ao.SharedQuantizationSpec(p.shared[producer])
            elif consumer in p.shared and p.shared[consumer] != (producer, consumer):
                spec = _ao.SharedQuantizationSpec(p.shared[consumer])  # a Concat's other inputs
            annotation(consumer).input_qspec_map[producer] = spec
        for node, (w, axis) in p.weights.items():
            annotation(node).input_qspec_map[w] = weight(axis)
        for node, edge in p.shared.items():
            annotation(node).output_qspec = _ao.SharedQuantizationSpec(edge)
        for node in p.outputs:
            if node not in p.shared:
                annotation(node).output_qspec = act(node)
        for node, value in annotations.items():
            node.meta["quantization_annotation"] = value
        return gm

    def validate(self, gm) -> None:
        pass

    def prepare_obs_or_fq_callback(self, model, edge_or_node_to_obs_or_fq) -> None:
        """Each activation observer gets the union of the calibrated ranges of the tensors it watches."""
        groups: dict[int, tuple[Any, list, str]] = {}  # observer -> its calibrated ranges, a tensor it watches
        for key, obs in edge_or_node_to_obs_or_fq.items():
            if not isinstance(obs, (RangeObserver, FakeQuant)) or getattr(obs, "observe", False):
                continue  # weights (their observers read the weight itself) and dynamic placeholders
            tensor = key[0] if isinstance(key, tuple) else key
            name = tensor.meta.get(CALIBRATED_AS, tensor.name)  # the name calibration knew it by
            _, found, _ = groups.setdefault(id(obs), (obs, [], name))
            if name in self.ranges:
                found.append(self.ranges[name])
        for obs, found, name in groups.values():
            if found:
                obs.set_range(min(r[0] for r in found), max(r[1] for r in found))
            else:
                self.unranged.append(name)

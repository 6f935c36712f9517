"""fold-bn: fold BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it."""

from __future__ import annotations

import copy
import functools
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import Equivalence, OpKind, hookimpl
from graphopt.ir.fx_graph import fresh_attr
from graphopt.ir.fx_ops import arg, get_attr, layer_call, set_arg
from graphopt.ir.onnx_graph import fresh_name
from graphopt.passes.rules import Rule, RulePass, Skip

FOLDABLE = (OpKind.CONV, OpKind.CONV_TRANSPOSE, OpKind.GEMM)
FOLDED = "folded BatchNormalization"

# Why a BatchNormalization is left as is (a Skip): the result's notes count each.
TRAINING = "in training mode (batch statistics)"
STATS_USED = "whose running-statistics outputs are read"
NOT_AFTER_FOLDABLE = "not after a foldable op (Conv, ConvTranspose, Gemm/Linear)"
SHARED = "after an op whose output is also read elsewhere"
NOT_CONSTANT = "with weights or statistics that are not constants"
GEMM_OFF = "after a Gemm/Linear (fold_into_gemm=false)"
GEMM_C = "after a Gemm whose C is not one value per output feature"
CHANNELS = "whose statistics are not one per output channel of the op before it"
SHAPE = "after an op whose output is not (batch, channels, ...) or has an unknown shape"
NONPOSITIVE_VAR = "with var + epsilon <= 0 in some channel (it divides by zero or takes a negative root)"
NONFINITE = "whose statistics give a NaN/inf scale or shift, or whose folded weights would overflow their dtype"


class FoldBatchNorm(RulePass):
    """Fold BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it.

    In inference BatchNormalization is per channel ``y * scale + shift``, ``scale = gamma / sqrt(var + eps)``,
    ``shift = beta - mean * scale``. When its input is the output of a Conv, ConvTranspose or Gemm (Linear)
    that nothing else reads, each output channel's weights are multiplied by ``scale``, the bias becomes
    ``bias * scale + shift`` (added where there was none) and the BatchNormalization is removed. New weights
    are computed in float64 and cast back to the weights' dtype. Chains (Conv -> BN -> BN) fold completely.

    A BatchNormalization stays, counted in a note per reason, when it is in training mode or its statistics
    outputs are read, when its input is not such an op's output or that output is read elsewhere (or is a graph
    output), or when weights or statistics are not compile-time constants. It stays too (the note names it) when
    ``var + epsilon <= 0`` in a channel, when the statistics give a NaN or infinite scale or shift (a NaN
    statistic, an infinite mean or gamma), or when the folded weights or bias would hold an infinity the
    originals do not: folding would put NaN/inf into weights, where the model as written may compute finite
    values (an infinite scale times a zero weight is NaN; the unfolded -inf a Relu clamps to 0 is not).

    ONNX: new Constants replace the weights (never changed in place); the folded op writes the BN's output
    tensor, so its name (perhaps a graph output) is kept. Grouped/depthwise Conv and grouped ConvTranspose are
    handled. A Gemm folds when B is constant and C is absent or per feature (scalar, (N,), (1, N)); beta -> 1.

    FX: ``Conv*d`` / ``ConvTranspose*d`` / ``Linear`` module calls (replaced by a fused copy of the module)
    and ``F.conv*d`` / ``F.conv_transpose*d`` / ``F.linear`` on parameters, then a ``BatchNorm*d`` module in
    eval mode with running statistics or ``F.batch_norm(training=False)`` on buffers. From torch.export:
    ``aten.conv*d`` / ``conv_transpose*d`` / ``convolution`` / ``linear``, then ``aten.batch_norm`` (training
    False) or ``aten._native_batch_norm_legit_no_training`` (only output 0 read); folded weights become new
    parameters. Not matched: a decomposed linear (``aten.addmm`` on a permuted weight). The op's output must be
    (batch, channels, ...) by the recorded or propagated shapes. Unused submodules and attribute reads go.

    Option ``fold_into_gemm=false`` leaves a BatchNormalization after a Gemm / Linear alone.
    """

    name = "fold-bn"
    irs = frozenset({"onnx", "fx"})
    equivalence = Equivalence.EXACT

    @dataclass(frozen=True)
    class Options:
        fold_into_gemm: bool = True

    def rules(self, graph, ctx):
        return [OnnxFold(graph, self.options) if graph.ir == "onnx" else FxFold(graph, self.options)]

    def finish(self, graph, outcome):
        if graph.ir == "onnx":
            graph.gs.cleanup().toposort()


# -- the math, shared by both IRs -------------------------------------------------------------------------------
def bn_affine(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Inference BatchNormalization as ``y * scale + shift`` per channel, in float64 (gamma/beta None: 1/0)."""
    mean, var = (np.asarray(a, np.float64).reshape(-1) for a in (mean, var))
    gamma = np.ones_like(mean) if gamma is None else np.asarray(gamma, np.float64).reshape(-1)
    beta = np.zeros_like(mean) if beta is None else np.asarray(beta, np.float64).reshape(-1)
    with np.errstate(invalid="ignore", divide="ignore"):  # var + eps <= 0, NaN: see unsafe_fold
        scale = gamma / np.sqrt(var + float(eps))
        return scale, beta - mean * scale


def out_channels(kind: OpKind, w_shape: tuple, group: int = 1, trans_b: bool = True) -> int:
    """Output channels of an op from its weight's shape (layouts as in :func:`fold_weights`)."""
    if kind == OpKind.CONV:
        return w_shape[0]
    if kind == OpKind.CONV_TRANSPOSE:
        return w_shape[1] * group
    return w_shape[0] if trans_b else w_shape[1]


def fold_weights(kind: OpKind, w, b, scale, shift, group: int = 1, trans_b: bool = True):
    """Weight and bias of ``op`` such that ``op'(x) == op(x) * scale + shift`` per output channel (scale and
    shift in float64; the weight is scaled in its own dtype, the bias returned in float64).

    Layouts: Conv (out, in/group, k...); ConvTranspose (in, out/group, k...), output channel
    ``g * out/group + j``; Gemm / Linear (out, in) when ``trans_b`` else (in, out). ``b`` None means zeros.
    """
    w = np.asarray(w)
    scale_w = scale.astype(w.dtype)  # the weights are scaled in their own dtype: one rounding, no float64 copy
    if kind == OpKind.CONV:
        w = w * scale_w.reshape((-1,) + (1,) * (w.ndim - 1))
    elif kind == OpKind.CONV_TRANSPOSE:
        grouped = w.reshape((group, w.shape[0] // group) + w.shape[1:])
        w = (grouped * scale_w.reshape((group, 1, -1) + (1,) * (w.ndim - 2))).reshape(w.shape)
    else:
        w = w * (scale_w[:, None] if trans_b else scale_w[None, :])
    b = np.zeros_like(scale) if b is None else np.asarray(b, np.float64).reshape(-1)
    return w, b * scale + shift


@dataclass
class _Fold:
    """A foldable op: its node, kind, weight, bias (None: none; a Gemm's is beta * C), group and layout; as a
    plan, also the batch norm (ONNX node / :class:`_FxNorm`) and the folded weight and bias."""

    op: Any
    kind: OpKind
    weight: Any
    bias: Any
    group: int = 1
    trans_b: bool = True
    call: tuple | None = None  # FX call_function: the call's parameter names; None for a module call
    norm: Any = None
    folded: tuple = ()


def unsafe_fold(var, eps: float, scale, shift, pairs) -> str | None:
    """Why folding a batch norm would change what the model computes, or None. ``var`` as the model holds it
    (``var + eps`` is evaluated in its dtype, as a runtime does), ``scale`` / ``shift`` from :func:`bn_affine`,
    ``pairs`` (original, folded) weight and bias arrays in the dtype they are written in."""
    var = np.asarray(var)
    dtype = var.dtype if var.dtype.kind == "f" else np.dtype(np.float64)
    with np.errstate(invalid="ignore"):
        if np.any(var.astype(dtype) + dtype.type(eps) <= 0):
            return NONPOSITIVE_VAR
    if not (np.isfinite(scale).all() and np.isfinite(shift).all()):
        return NONFINITE
    for before, after in pairs:
        if np.any(np.isfinite(before) & ~np.isfinite(after)):
            return NONFINITE
    return None


# -- ONNX ----------------------------------------------------------------------------------------------------
class OnnxFold(Rule):
    name, irs, stat = "fold-bn", frozenset({"onnx"}), FOLDED

    def __init__(self, graph, options):
        self.into_gemm, self.names = options.fold_into_gemm, set(graph.gs.tensors())

    def match(self, graph, bn: gs.Node) -> _Fold | Skip | None:
        if graph.kind(bn) != OpKind.BATCH_NORM:
            return None
        outputs = graph.gs.outputs
        if bn.attrs.get("training_mode", 0) or (graph.opset < 7 and not bn.attrs.get("is_test", 0)):
            return Skip(TRAINING)
        if any(t.outputs or t in outputs for t in bn.outputs[1:]):
            return Skip(STATS_USED)
        x = bn.inputs[0]
        op = x.inputs[0] if len(x.inputs) == 1 else None
        kind = graph.kind(op) if op is not None else OpKind.OTHER
        if kind not in FOLDABLE:
            return Skip(NOT_AFTER_FOLDABLE)
        if kind == OpKind.GEMM and not self.into_gemm:
            return Skip(GEMM_OFF)
        if len(x.outputs) != 1 or x in outputs:
            return Skip(SHARED)
        stats = [graph.constant_value(t) for t in bn.inputs[1:5]]
        w = graph.constant_value(op.inputs[1])
        has_bias = len(op.inputs) > 2 and op.inputs[2].name != ""
        bias = graph.constant_value(op.inputs[2]) if has_bias else None
        if any(v is None for v in stats) or w is None or (has_bias and bias is None) or w.dtype.kind != "f":
            return Skip(NOT_CONSTANT)
        group, trans_b = int(op.attrs.get("group", 1)), bool(op.attrs.get("transB", 0))
        n = out_channels(kind, w.shape, group, trans_b)
        if any(v.size != n for v in stats):
            return Skip(CHANNELS)
        if kind == OpKind.GEMM and bias is not None:  # beta * C, one value per feature
            if bias.size != 1 and not (bias.ndim <= 2 and bias.size == n and bias.shape[-1] == n):
                return Skip(GEMM_C)
            bias = np.broadcast_to(bias.astype(np.float64).reshape(-1), (n,)) * float(op.attrs.get("beta", 1.0))
        eps = float(bn.attrs.get("epsilon", 1e-5))
        scale, shift = bn_affine(*stats, eps)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow and NaN: unsafe_fold refuses them
            new_w, new_b = fold_weights(kind, w, bias, scale, shift, group, trans_b)
            new_w, new_b = new_w.astype(w.dtype), new_b.astype(w.dtype)
        old_bias = np.zeros(1) if bias is None else bias
        why = unsafe_fold(stats[3], eps, scale, shift, [(w, new_w), (old_bias, new_b)])
        if why:
            return Skip(why, bn.name or "?")
        return _Fold(op, kind, w, bias, group, trans_b, norm=bn, folded=(new_w, new_b))

    def apply(self, graph, plan: _Fold) -> None:
        op, bn, (w, b) = plan.op, plan.norm, plan.folded
        op.inputs[1] = gs.Constant(fresh_name(self.names, f"{op.inputs[1].name}_bnfold"), w)
        bias = gs.Constant(fresh_name(self.names, f"{op.name or op.outputs[0].name}_bias_bnfold"), b)
        if len(op.inputs) > 2:
            op.inputs[2] = bias
        else:
            op.inputs.append(bias)
        if plan.kind == OpKind.GEMM:
            op.attrs["beta"] = 1.0
        y = bn.outputs[0]  # the op now writes the BN's output tensor: its name (maybe a graph output) is kept
        bn.inputs.clear()
        bn.outputs.clear()
        op.outputs[0] = y


# -- FX matching ------------------------------------------------------------------------------------------------
_COMPUTED = object()  # a weight or statistic computed at run time, not a parameter or buffer
_F_BN = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_ATEN_BN = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled")
_ATEN_BN_EVAL = ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps")


@functools.cache
def _fx_norms() -> dict:
    """Function targets of batch norms -> parameter names."""
    import torch

    F, aten = torch.nn.functional, torch.ops.aten
    return {F.batch_norm: _F_BN, aten.batch_norm.default: _ATEN_BN,
            aten._native_batch_norm_legit_no_training.default: _ATEN_BN_EVAL}


def _param(gm, node) -> Any:
    """The tensor a ``get_attr`` node reads; None for None; ``_COMPUTED`` for anything else."""
    if node is None:
        return None
    if getattr(node, "op", None) == "get_attr":
        return get_attr(gm, node.target)
    return _COMPUTED


@dataclass
class _FxNorm:
    node: Any
    x: Any  # the normalized node
    outs: list  # the nodes whose value is the normalized tensor
    stats: tuple = ()  # gamma, beta, mean, var (gamma / beta may be None)
    eps: float = 1e-5
    reason: str | None = None


def _fx_batch_norm(graph, node) -> _FxNorm | None:
    """``node`` as a batch norm (with the reason it cannot fold, if any), or None if it is none."""
    gm = graph.gm
    if node.op == "call_module" and graph.kind(node) == OpKind.BATCH_NORM:
        m = gm.get_submodule(node.target)
        if m.training or m.running_mean is None or m.running_var is None:
            return _FxNorm(node, None, [node], reason=TRAINING)
        return _FxNorm(node, node.args[0], [node], (m.weight, m.bias, m.running_mean, m.running_var), m.eps)
    norms = _fx_norms()
    if node.op != "call_function" or node.target not in norms:
        return None
    names = norms[node.target]
    outs = [node]
    if names is _ATEN_BN_EVAL:  # returns (output, saved mean, saved invstd)
        outs = list(node.users)
        if not all(u.target is operator.getitem and u.args[1] == 0 for u in outs):
            return _FxNorm(node, None, outs, reason=STATS_USED)
    stats = tuple(_param(gm, arg(node, names, k)) for k in ("weight", "bias", "running_mean", "running_var"))
    eps = arg(node, names, "eps", 1e-5)
    training = "training" in names and arg(node, names, "training", False) is not False
    if training or stats[2] is None or stats[3] is None:
        return _FxNorm(node, None, outs, reason=TRAINING)
    if not isinstance(eps, (int, float)):
        return _FxNorm(node, None, outs, reason=NOT_CONSTANT)
    return _FxNorm(node, arg(node, names, "input"), outs, stats, float(eps))


def _fx_foldable_op(graph, node) -> _Fold | str:
    """``node`` as a Conv / ConvTranspose / Linear with its parameters, or why it is not one."""
    gm = graph.gm
    if getattr(node, "op", None) == "call_module" and graph.kind(node) in FOLDABLE:
        m = gm.get_submodule(node.target)
        return _Fold(node, graph.kind(node), m.weight, m.bias, getattr(m, "groups", 1))
    layer = layer_call(node)
    if layer is None:
        return NOT_AFTER_FOLDABLE
    kind, names = layer
    if kind is None:  # an aten.convolution whose ``transposed`` is not a constant
        return NOT_CONSTANT
    weight, bias = _param(gm, arg(node, names, "weight")), _param(gm, arg(node, names, "bias"))
    group = arg(node, names, "groups", 1)
    if weight is None or weight is _COMPUTED or not isinstance(group, int):
        weight = None  # FxFold.match skips it: NOT_CONSTANT
    return _Fold(node, kind, weight, bias, group if isinstance(group, int) else 1, call=names)


class _Shapes:
    """Output ranks: as torch.export recorded them, else from FX ShapeProp (run once, when first needed)."""

    def __init__(self, graph):
        self.graph, self.tried = graph, False

    def rank(self, node) -> int | None:
        val, meta = node.meta.get("val"), node.meta.get("tensor_meta")
        if hasattr(val, "dim") or hasattr(meta, "shape"):
            return val.dim() if hasattr(val, "dim") else len(meta.shape)
        if self.tried:
            return None
        self.tried = True
        try:
            self.graph.infer_shapes()
        except Exception:  # noqa: BLE001 - running the model failed: shapes unknown, the batch norm stays
            return None
        return self.rank(node)


# -- FX ------------------------------------------------------------------------------------------------------
class FxFold(Rule):
    name, irs, stat = "fold-bn", frozenset({"fx"}), FOLDED

    def __init__(self, graph, options):
        self.into_gemm, self.shapes = options.fold_into_gemm, _Shapes(graph)

    def match(self, graph, node) -> _Fold | Skip | None:
        import torch

        bn = _fx_batch_norm(graph, node)  # as the graph is now: an earlier fold may have rewired its input
        if bn is None:
            return None
        if bn.reason:
            return Skip(bn.reason)
        op = _fx_foldable_op(graph, bn.x)
        if isinstance(op, str):
            return Skip(op)
        if op.kind == OpKind.GEMM and not self.into_gemm:
            return Skip(GEMM_OFF)
        if len(op.op.users) != 1:
            return Skip(SHARED)
        if op.weight is None or op.bias is _COMPUTED or any(s is _COMPUTED for s in bn.stats):
            return Skip(NOT_CONSTANT)
        if any(s.numel() != out_channels(op.kind, tuple(op.weight.shape), op.group) for s in bn.stats if s is not None):
            return Skip(CHANNELS)
        if self.shapes.rank(op.op) != (2 if op.kind == OpKind.GEMM else op.weight.dim()):
            return Skip(SHAPE)

        def numpy(t):
            return None if t is None else t.detach().cpu().to(torch.float64).numpy()

        stats = [numpy(t) for t in bn.stats]
        scale, shift = bn_affine(*stats, bn.eps)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow and NaN: unsafe_fold refuses them
            w, b = fold_weights(op.kind, numpy(op.weight), numpy(op.bias), scale, shift, op.group)
        written = [numpy(torch.from_numpy(a).to(op.weight.dtype)) for a in (w, b)]  # as the parameters hold them
        var = bn.stats[3].detach().cpu()
        var = var.numpy() if var.dtype in (torch.float32, torch.float64) else stats[3]  # var + eps in its dtype
        old_bias = np.zeros(1) if op.bias is None else numpy(op.bias)
        why = unsafe_fold(var, bn.eps, scale, shift, [(numpy(op.weight), written[0]), (old_bias, written[1])])
        if why:
            return Skip(why, node.name)
        op.norm, op.folded = bn, (w, b)
        return op

    def apply(self, graph, op: _Fold) -> None:
        import torch

        def parameter(a):
            ref = op.weight
            return torch.nn.Parameter(torch.from_numpy(a).to(ref.dtype).to(ref.device), requires_grad=ref.requires_grad)

        gm, node, bn, (w, b) = graph.gm, op.op, op.norm, op.folded
        if op.call is None:  # a module call: a fused copy of the module takes its place
            fused = copy.deepcopy(gm.get_submodule(node.target))
            fused.weight, fused.bias = parameter(w), parameter(b)
            if any(n is not node and n.op == "call_module" and n.target == node.target for n in gm.graph.nodes):
                node.target = fresh_attr(gm, node.target.replace(".", "_") + "_bnfold")  # the module is reused
            gm.add_submodule(node.target, fused)
        else:  # a function call on parameters: new parameters, read by new get_attr nodes
            with gm.graph.inserting_before(node):
                for name, value in (("weight", w), ("bias", b)):
                    old = arg(node, op.call, name)
                    base = old.target if old is not None else f"{node.name}.{name}"
                    attr = fresh_attr(gm, base.replace(".", "_") + "_bnfold")
                    gm.register_parameter(attr, parameter(value))
                    set_arg(node, op.call, name, self.fx_node(graph, "get_attr", attr))
        for out in bn.outs:
            out.replace_all_uses_with(node)
        for out in bn.outs:
            if out is not bn.node:
                gm.graph.erase_node(out)
        gm.graph.erase_node(bn.node)


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(FoldBatchNorm)

"""eliminate-identity: remove ops that pass their input through unchanged (Identity, inference-mode Dropout)."""

from __future__ import annotations

import numpy as np

from graphopt import OpKind, hookimpl
from graphopt.ir.fx_graph import fx_may_mutate
from graphopt.ir.fx_ops import arg
from graphopt.passes.rules import Rule, RulePass, Skip


class EliminateIdentity(RulePass):
    """Remove Identity and inference-mode Dropout, rewiring their consumers to the input.

    ONNX (top-level graph, not If/Loop bodies):

    - ``Identity`` is removed.
    - ``Dropout`` is removed when it is in inference mode: its ``training_mode`` input is absent, empty or a
      compile-time constant false (and, before opset 7, ``is_test`` is not 0). A Dropout in training mode or
      with a non-constant ``training_mode`` stays. A Dropout whose ``mask`` output is read (by a node or as a
      graph output) stays too, with a note: removing it would leave the mask undefined.
    - Graph output names are preserved (the producer is renamed to write the output). Where that cannot be
      done without a copy -- a graph input, an initializer or another graph output fed straight to a graph
      output -- the node stays, and a note says so.

    FX:

    - ``call_module`` ``nn.Identity``, and ``nn.Dropout``/``Dropout1d/2d/3d``/``AlphaDropout``/
      ``FeatureAlphaDropout`` in eval mode.
    - ``call_function`` ``F.dropout`` (and its 1d/2d/3d/alpha variants, ``torch.dropout``) whose ``training``
      argument is literally ``False``; ``aten.dropout`` with ``train=False`` from ``torch.export``.
    - ``aten.clone`` / ``aten.alias`` from ``torch.export``, only when the graph has no in-place op (a clone
      protects its input from later mutation) and the clone keeps the default memory format.

    Each is replaced by its input (one rule per op, :mod:`graphopt.passes.rules`); submodules left unused are
    deleted. What stays is counted in a note per reason, naming the nodes. Exact: outputs are bit-identical.
    """

    name = "eliminate-identity"
    irs = frozenset({"onnx", "fx"})

    def rules(self, graph, ctx):
        return [SpliceOut(OpKind.IDENTITY, "Identity"), SpliceOut(OpKind.DROPOUT, "Dropout", _onnx_dropout_blocker),
                *(PassThrough(what) for what in ("Identity", "Dropout", "clone", "alias"))]


class SpliceOut(Rule):
    """ONNX: a node of ``kind`` (op ``op``) its ``blocker`` (if any) finds nothing against, replaced by its input."""

    irs = frozenset({"onnx"})

    def __init__(self, kind: OpKind, op: str, blocker=None):
        self.kind, self.blocker = kind, blocker
        self.name, self.stat = f"remove-{op.lower()}", f"removed {op}"

    def match(self, graph, node):
        if graph.kind(node) != self.kind or not node.inputs or not node.outputs:
            return None
        label = node.name or node.outputs[0].name
        skip = self.blocker(graph, node, label) if self.blocker else None
        if skip is None and not graph.can_splice_out(node, node.inputs[0]):
            skip = Skip("that copies a graph input, initializer or output to a graph output (the output name is "
                        "part of the interface)", f"'{label}' to graph output '{node.outputs[0].name}'")
        return skip or node

    def apply(self, graph, node):
        graph.splice_out(node, node.inputs[0])


def _onnx_dropout_blocker(graph, node, label: str) -> Skip | None:
    """Why this ONNX Dropout cannot be removed, or None when it is an inference-mode pass-through."""
    if graph.opset < 7 and node.attrs.get("is_test", 0) == 0:
        return Skip("in training mode (is_test=0, opset < 7)", f"'{label}'")
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        value = graph.constant_value(node.inputs[2])
        if value is None:
            return Skip("whose training_mode is not a compile-time constant", f"'{label}'")
        if np.any(value):
            return Skip("in training mode (training_mode is true)", f"'{label}'")
    if len(node.outputs) > 1 and not node.outputs[1].is_empty():
        mask = node.outputs[1]
        if mask.outputs or mask in graph.gs.outputs:
            return Skip("whose mask output is used (removing it would leave the mask undefined)",
                        f"'{label}': mask '{mask.name}'")
    return None


class PassThrough(Rule):
    """FX: an identity-like node (see :func:`_fx_identity_like`) replaced by its input."""

    irs = frozenset({"fx"})

    def __init__(self, what: str):
        self.what, self.mutates = what, None
        self.name, self.stat = f"remove-{what.lower()}", f"removed {what}"

    def match(self, graph, node):
        import torch

        if _fx_identity_like(node, graph.gm) != self.what:
            return None
        if self.what in ("clone", "alias"):
            if self.mutates is None:  # removing nodes adds no in-place op: once per graph
                self.mutates = any(fx_may_mutate(n, graph.gm) for n in graph.gm.graph.nodes)
            if self.mutates:
                return Skip("in a graph with in-place ops the copy may guard against", f"'{node.name}'")
        return node if node.args and isinstance(node.args[0], torch.fx.Node) else None

    def apply(self, graph, node):
        node.replace_all_uses_with(node.args[0])
        graph.gm.graph.erase_node(node)


_DROPOUT_MODULES = ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout")
_DROPOUT_FUNCTIONS = ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout")


def _fx_identity_like(node, gm) -> str | None:
    """What identity-like op ``node`` is ("Identity", "Dropout", "clone" or "alias"), or None."""
    import torch
    import torch.nn.functional as F

    nn = torch.nn
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.Identity) and len(node.args) == 1 and not node.kwargs:
            return "Identity"
        dropouts = tuple(getattr(nn, name) for name in _DROPOUT_MODULES if hasattr(nn, name))
        if isinstance(mod, dropouts) and not mod.training and len(node.args) == 1:
            return "Dropout"
        return None
    if node.op != "call_function":
        return None
    target = node.target
    functional = {getattr(F, name) for name in _DROPOUT_FUNCTIONS if hasattr(F, name)}
    if target in functional:
        # F.dropout(input, p=0.5, training=True, inplace=False): training defaults to True
        return "Dropout" if arg(node, 2, "training", True) is False else None
    if target in (torch.dropout, torch.alpha_dropout, torch.feature_alpha_dropout):
        return "Dropout" if arg(node, 2, "train", True) is False else None
    aten = torch.ops.aten
    if target is aten.dropout.default:
        return "Dropout" if arg(node, 2, "train", True) is False else None
    if target is aten.clone.default:
        fmt = node.kwargs.get("memory_format")
        return "clone" if fmt in (None, torch.preserve_format) else None
    if target is aten.alias.default:
        return "alias"
    return None


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(EliminateIdentity)

"""eliminate-identity: remove ops that pass their input through unchanged (Identity, inference-mode Dropout)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from graphopt import OpKind, Pass, PassResult, hookimpl


class EliminateIdentity(Pass):
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

    Each is replaced by its input; submodules left unused are deleted. Exact: outputs are bit-identical.
    """

    name = "eliminate-identity"
    irs = frozenset({"onnx", "fx"})

    # -- ONNX -------------------------------------------------------------------------------------------------
    def run_onnx(self, graph, ctx):
        stats: Counter = Counter()
        notes: list[str] = []
        removed: set[int] = set()
        for node in list(graph.gs.nodes):
            kind = graph.kind(node)
            if kind not in (OpKind.IDENTITY, OpKind.DROPOUT) or not node.inputs or not node.outputs:
                continue
            if kind == OpKind.DROPOUT:
                reason = _onnx_dropout_blocker(graph, node)
                if reason:
                    notes.append(f"kept Dropout '{_label(node)}': {reason}")
                    continue
            if not graph.splice_out(node, node.inputs[0]):
                notes.append(f"kept {node.op} '{_label(node)}': it copies a graph input, initializer or output "
                             f"to graph output '{node.outputs[0].name}' (the output name is part of the interface)")
                continue
            removed.add(id(node))
            stats[f"removed {node.op}"] += 1
        if removed:
            graph.gs.nodes = [n for n in graph.gs.nodes if id(n) not in removed]
        return PassResult(graph, bool(removed), dict(stats), notes)

    # -- FX ---------------------------------------------------------------------------------------------------
    def run_fx(self, graph, ctx):
        import torch

        from graphopt.ir.fx_graph import fx_may_mutate

        gm = graph.gm
        stats: Counter = Counter()
        notes: list[str] = []
        may_mutate = any(fx_may_mutate(n, gm) for n in gm.graph.nodes)
        for node in list(gm.graph.nodes):
            what = _fx_identity_like(node, gm)
            if what is None:
                continue
            if what in ("clone", "alias") and may_mutate:
                notes.append(f"kept {what} '{node.name}': the graph has in-place ops the copy may guard against")
                continue
            source = node.args[0] if node.args else None
            if not isinstance(source, torch.fx.Node):
                continue
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            stats[f"removed {what}"] += 1
        if stats:
            gm.delete_all_unused_submodules()
            gm.recompile()
        return PassResult(graph, bool(stats), dict(stats), notes)


def _label(node) -> str:
    return node.name or node.outputs[0].name


def _onnx_dropout_blocker(graph, node) -> str | None:
    """Why this ONNX Dropout cannot be removed, or None when it is an inference-mode pass-through."""
    if graph.opset < 7 and node.attrs.get("is_test", 0) == 0:
        return "is_test=0 (training mode, opset < 7)"
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        value = graph.constant_value(node.inputs[2])
        if value is None:
            return "training_mode is not a compile-time constant"
        if np.any(value):
            return "training_mode is true"
    if len(node.outputs) > 1 and not node.outputs[1].is_empty():
        mask = node.outputs[1]
        if mask.outputs or mask in graph.gs.outputs:
            return f"its mask output '{mask.name}' is used"
    return None


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
        return "Dropout" if _arg(node, 2, "training", True) is False else None
    if target in (torch.dropout, torch.alpha_dropout, torch.feature_alpha_dropout):
        return "Dropout" if _arg(node, 2, "train", True) is False else None
    aten = torch.ops.aten
    if target is aten.dropout.default:
        return "Dropout" if _arg(node, 2, "train", True) is False else None
    if target is aten.clone.default:
        fmt = node.kwargs.get("memory_format")
        return "clone" if fmt in (None, torch.preserve_format) else None
    if target is aten.alias.default:
        return "alias"
    return None


def _arg(node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(EliminateIdentity)

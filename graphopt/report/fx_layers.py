"""Per-layer SQNR of two PyTorch graphs (FX), by node name: the FX side of :func:`graphopt.report.metrics.
per_layer_sqnr`, with the same rule as on ONNX.

For every float tensor A computes (a ``call_function`` node, or a graph input) B's counterpart is the output of
the dequantize that follows the quantize of B's node of the same name — the value B's next layer reads — or
else B's node of that name; A's nodes B lacks are unmatched. A quantized ATen graph (place-qdq, qat, int8-dynamic)
keeps its float ops' names, so A is the float graph the quantization passes started from (after insert-observers:
BatchNorm folded, so names carry the same values).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from graphopt.ir.fx_ops import aten_name, computes_float
from graphopt.report.layers import LayerSQNR, LayerTable
from graphopt.report.layers import count_samples as _count

_QDQ = ("quantize_per_tensor", "quantize_per_channel", "dequantize_per_tensor", "dequantize_per_channel",
        "choose_qparams")


def _packet(node) -> str:
    return aten_name(node) or str(node.target)


def match_nodes(gm_a, gm_b) -> tuple[list[tuple[str, str, str, int]], list[str]]:
    """``(name in A, name in B, op, index)`` for each float tensor of A, and A's names left unmatched."""
    b_nodes = {n.name: n for n in gm_b.graph.nodes}

    def dequantized(node) -> str | None:
        for q in node.users:
            if q.op == "call_function" and _packet(q).startswith("quantize_per"):
                for dq in q.users:
                    if _packet(dq).startswith("dequantize_per"):
                        return dq.name
        return None

    matches, unmatched = [], []
    for index, node in enumerate(gm_a.graph.nodes):
        if not computes_float(node) or _packet(node) in _QDQ:
            continue
        other = b_nodes.get(node.name)
        name = (dequantized(other) or (other.name if node.op != "placeholder" else None)) if other is not None \
            else None
        op = "input" if node.op == "placeholder" else _packet(node)
        if name is None:
            if node.op != "placeholder":
                unmatched.append(node.name)
        else:
            matches.append((node.name, name, op, index if node.op != "placeholder" else -1))
    return matches, unmatched


def per_layer_sqnr_fx(graph_a, graph_b, batches: Iterable[Mapping[str, np.ndarray]]) -> LayerTable:
    """Per-layer SQNR of FX graph B against FX graph A over ``batches`` (dicts input name -> array)."""
    import torch

    from graphopt.ir.expose import expose_fx

    matches, unmatched = match_nodes(graph_a.gm, graph_b.gm)
    run_a = expose_fx(graph_a.gm, [m[0] for m in matches])
    run_b = expose_fx(graph_b.gm, [m[1] for m in matches])
    acc = {m[0]: LayerSQNR(*m) for m in matches}
    skipped: dict[str, str] = {}
    samples, names = 0, graph_a.input_names()
    for feeds in batches:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names]
        with torch.no_grad():
            outs_a = run_a(*args)[-len(matches):] if matches else ()
            outs_b = run_b(*args)[-len(matches):] if matches else ()
        samples += _count(feeds)
        for (name, _, _, _), ra, xb in zip(matches, outs_a, outs_b):
            if name in skipped:
                continue
            if ra.shape != xb.shape:
                skipped[name] = f"shapes differ ({tuple(ra.shape)} / {tuple(xb.shape)})"
            else:
                acc[name].add(ra.numpy(), xb.numpy())
    rows = sorted((r for n, r in acc.items() if n not in skipped), key=lambda r: (r.sqnr_db, r.index))
    return LayerTable(rows, unmatched, skipped, samples)

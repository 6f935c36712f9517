"""What OpenVINO ran in int8 and what in float, per layer, mapped back to the ONNX graph's nodes.

A compiled model's runtime model (``compiled.get_runtime_model()``) is its execution graph: one op per layer the
CPU plugin runs, with ``rt_info`` giving its ``layerType`` (Convolution, Eltwise, FullyConnected, ...), its
``runtimePrecision`` (``u8``/``i8``: an int8 kernel; ``f32``/``bf16``: float), ``outputPrecisions``, and
``originalLayersNames``: the ops of the read model fused into it, named after the ONNX nodes they came from (an
op the frontend split off a node, a Gemm's ``.../WithoutBiases``, carries the node's name as a prefix). Layers
that only hold or move data (Const, Input, Output, Reorder, Reshape) are not counted.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import onnx

from graphopt.table import format_table

DATA_LAYERS = frozenset({"Const", "Input", "Output", "Reorder", "Reshape", "Parameter", "Result"})
INT8 = frozenset({"u8", "i8"})
QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})


def _text(value) -> str:
    return value.astype(str) if hasattr(value, "astype") else str(value)


def _onnx_node(name: str, nodes: dict[str, str]) -> str | None:
    """The ONNX node an OpenVINO op name comes from: the name itself, or the longest node name it extends."""
    if name in nodes:
        return name
    best = None
    for candidate in nodes:
        if name.startswith(candidate + "/") and (best is None or len(candidate) > len(best)):
            best = candidate
    return best


def layer_report(compiled, onnx_path: str) -> dict[str, Any]:
    """The compiled model's compute layers: ``layers`` (one row per layer: name, type, precision, output
    precision, the ONNX nodes fused into it, Q/DQ nodes left out), ``nodes`` (ONNX node -> ``int8``/``float``:
    the precision of the layer that ran it), counts and a ``summary`` line."""
    graph = onnx.load(onnx_path, load_external_data=False).graph
    nodes = {n.name: n.op_type for n in graph.node if n.name}
    layers, per_node = [], {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = _text(info["layerType"])
        if kind in DATA_LAYERS:
            continue
        precision = _text(info["runtimePrecision"])
        origin = [n for n in _text(info["originalLayersNames"]).split(",") if n]
        onnx_nodes = []
        for name in origin:
            node = _onnx_node(name, nodes)
            if node is not None and nodes[node] not in QDQ and node not in onnx_nodes:
                onnx_nodes.append(node)
        klass = "int8" if precision in INT8 else "float"
        layers.append({"layer": op.get_friendly_name(), "type": kind, "precision": precision,
                       "output_precision": _text(info["outputPrecisions"]), "class": klass, "onnx_nodes": onnx_nodes})
        for node in onnx_nodes:
            per_node[node] = klass
    counts = Counter(row["class"] for row in layers)
    floats = Counter(row["type"] for row in layers if row["class"] == "float")
    detail = ", ".join(f"{n} {t}" for t, n in floats.most_common())
    summary = f"openvino: {counts['int8']} layers int8, {counts['float']} float" + (f" ({detail})" if detail else "")
    return {"int8": counts["int8"], "float": counts["float"], "summary": summary, "layers": layers,
            "nodes": per_node}


def layers_table(report: dict[str, Any], limit: int | None = None) -> str:
    """The per-layer report as a table (float layers first), as ``graphopt compare --per-layer`` prints SQNR."""
    rows = sorted(report["layers"], key=lambda r: r["class"] != "float")[:limit]
    return format_table([("layer", "type", "precision", "ONNX nodes")]
                        + [(r["layer"], r["type"], r["precision"], ", ".join(r["onnx_nodes"]) or "-") for r in rows])

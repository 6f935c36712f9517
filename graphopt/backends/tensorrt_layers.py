"""What a built TensorRT engine runs, per layer: read from the engine inspector's JSON
(``EngineInspector.get_engine_information(LayerInformationFormat.JSON)``, or trtexec's ``--exportLayerInfo``
file), for an engine built with ``profiling_verbosity=DETAILED``.

The JSON holds ``"Layers"``: one object per engine layer with ``"Name"``, ``"LayerType"``, ``"Inputs"`` and
``"Outputs"`` (tensors with ``"Name"``, ``"Dimensions"`` and ``"Format/Datatype"``, a text such as ``"Row major
linear FP32 format"`` or ``"Thirty-two wide channel vectorized row major Int8 format"``), then ``"Bindings"``
(TensorRT 10: the I/O tensor names) or ``"I/O Tensors"`` (TensorRT 11: objects). TensorRT 11's migration guide
also describes tensors whose format and data type come in separate fields (``"Format"``, ``"Datatype"`` /
``"DataType"``): both forms are read. An engine built with less verbosity lists layer names only (strings):
then the precision of each layer is unknown, and the report says so.

A layer's precision is the type of its activation inputs: int8 when one is int8 (a fused Q/DQ convolution reads
int8 and may write float), else fp8 / fp16 / bf16 / fp32. ``Reformat`` layers convert layouts or types between
layers: each one is time spent because a Q/DQ placement or a format did not line up (the issue's "Concat inputs
with different scales force reformat layers").
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# (keyword in the upper-cased type text, precision), first match wins: BFLOAT16 before FLOAT, FP8 before FP16/32
_TYPES = (("INT8", "int8"), ("FP8", "fp8"), ("E4M3", "fp8"), ("BF16", "bf16"), ("BFLOAT16", "bf16"),
          ("FP16", "fp16"), ("HALF", "fp16"), ("FP32", "fp32"), ("FLOAT", "fp32"), ("INT4", "int4"),
          ("FP4", "fp4"), ("INT32", "int32"), ("INT64", "int64"), ("BOOL", "bool"), ("UINT8", "uint8"))
FLOAT_TYPES = ("fp32", "fp16", "bf16")
REFORMAT_TYPES = ("Reformat",)


def tensor_type(tensor: dict) -> str | None:
    """The data type of one tensor entry: from ``Datatype``/``DataType`` (TensorRT 11) or ``Format/Datatype``."""
    text = tensor.get("Datatype") or tensor.get("DataType") or tensor.get("Format/Datatype") or ""
    upper = str(text).upper()
    for key, name in _TYPES:
        if key in upper:
            return name
    return None


@dataclass
class LayerInfo:
    name: str
    type: str
    precision: str  # int8, fp8, fp16, bf16, fp32, other (no typed input), unknown (names-only report)


@dataclass
class LayerReport:
    layers: list[LayerInfo] = field(default_factory=list)
    detailed: bool = True

    @property
    def reformats(self) -> list[LayerInfo]:
        return [layer for layer in self.layers if layer.type in REFORMAT_TYPES]

    def counts(self) -> Counter:
        """Layers per precision, Reformat layers apart."""
        return Counter(layer.precision for layer in self.layers if layer.type not in REFORMAT_TYPES)

    def line(self) -> str:
        """``tensorrt: 42 engine layers: 30 int8, 10 fp32, 2 reformat``."""
        if not self.detailed:
            return (f"tensorrt: {len(self.layers)} engine layers (names only: the engine was not built with "
                    f"detailed profiling verbosity, so their precisions are unknown)")
        counts = self.counts()
        order = ["int8", "fp8", "fp16", "bf16", "fp32"]
        parts = [f"{counts[p]} {p}" for p in order if counts[p]]
        parts += [f"{n} {p}" for p, n in sorted(counts.items()) if p not in order]
        parts.append(f"{len(self.reformats)} reformat")
        return f"tensorrt: {len(self.layers)} engine layers: " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"detailed": self.detailed, "counts": dict(self.counts()), "reformats": len(self.reformats),
                "layers": [{"name": la.name, "type": la.type, "precision": la.precision} for la in self.layers]}


def layer_precision(layer: dict) -> str:
    types = [t for t in (tensor_type(x) for x in layer.get("Inputs") or [] if isinstance(x, dict)) if t]
    if not types:  # a layer with no typed input (a constant): its outputs say what it makes
        types = [t for t in (tensor_type(x) for x in layer.get("Outputs") or [] if isinstance(x, dict)) if t]
        if not types:
            return "other"
    for precision in ("int8", "fp8", "int4", "fp4", "fp16", "bf16", "fp32"):
        if precision in types:
            return precision
    return types[0]


def parse_engine_information(text: str) -> LayerReport:
    """The per-layer report from the inspector's JSON (``ValueError`` when it is not that JSON)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the engine inspector's output is not JSON ({exc.msg})") from None
    layers = data.get("Layers") if isinstance(data, dict) else data
    if not isinstance(layers, list):
        raise ValueError("the engine inspector's JSON has no 'Layers' list")
    report = LayerReport()
    for i, layer in enumerate(layers):
        if isinstance(layer, str):  # LAYER_NAMES_ONLY
            report.detailed = False
            report.layers.append(LayerInfo(layer, "?", "unknown"))
        elif isinstance(layer, dict):
            report.layers.append(LayerInfo(str(layer.get("Name", f"layer {i}")), str(layer.get("LayerType", "?")),
                                           layer_precision(layer)))
    return report

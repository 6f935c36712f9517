"""What a layer costs (:class:`LayerCost`) and the counting rules the ONNX and FX counters share: how many
elements a shape has (unknown dimensions count as 1) and which constants are weights (not int64 / bool shapes,
axes and indices). See :mod:`graphopt.report.cost` for how each op is counted."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["LayerCost", "is_weight_dtype", "numel"]


@dataclass
class LayerCost:
    """One node: its unique ``name`` in the graph (ONNX node name, FX node name), ``op`` (ONNX op type, FX module
    class or function name), ``params`` and ``macs`` as :mod:`graphopt.report.cost` counts them, and its first
    output's shape where known (symbolic ONNX dimensions as strings)."""

    name: str
    op: str
    params: int
    macs: int
    out_shape: tuple | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op, "params": self.params, "macs": self.macs,
                "out_shape": list(self.out_shape) if self.out_shape is not None else None}


def numel(dims) -> int:
    """Elements of a shape; unknown and symbolic dimensions count as 1."""
    return math.prod(int(d) if isinstance(d, (int, np.integer)) and d > 0 else 1 for d in dims)


_NOT_WEIGHTS = (np.dtype(np.int64), np.dtype(np.bool_))


def is_weight_dtype(dtype) -> bool:
    if dtype is None:
        return True
    try:
        return np.dtype(dtype) not in _NOT_WEIGHTS
    except TypeError:
        return True

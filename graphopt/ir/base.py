"""The graph protocol both IRs implement.

Passes, instruments and the pass manager talk to a model only through this surface; what differs between
ONNX and FX lives in :mod:`graphopt.ir.onnx_graph` and :mod:`graphopt.ir.fx_graph`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from typing import Any

import numpy as np


class Graph(ABC):
    """A model held in one of graphopt's IRs. ``ir`` names it: ``"onnx"`` or ``"fx"``."""

    ir: str = ""

    @abstractmethod
    def copy(self) -> "Graph":
        """A deep copy that passes may mutate freely."""

    @abstractmethod
    def op_counts(self) -> Counter:
        """How many compute nodes of each op type (ONNX op_type, or the FX module/function name)."""

    def num_nodes(self) -> int:
        return sum(self.op_counts().values())

    @abstractmethod
    def infer_shapes(self) -> None:
        """Propagate shapes and dtypes through the graph (onnx shape inference / FX ShapeProp)."""

    @abstractmethod
    def export(self) -> Any:
        """The model in its native form: ``onnx.ModelProto`` / ``torch.fx.GraphModule``."""

    @abstractmethod
    def verify(self, exported: Any = None) -> None:
        """Raise :class:`ValueError` with a readable reason if the graph is invalid (checker / lint).
        ``exported``: this graph's :meth:`export`, when the caller has it already."""

    @abstractmethod
    def sample_inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Fixed-seed inputs fit for a numeric comparison (dynamic dimensions become 1)."""

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Execute the graph (onnxruntime / eager torch) and return its outputs as numpy arrays."""

    @abstractmethod
    def save(self, path: str) -> None:
        """Write the model to ``path``."""

    def num_parameters(self) -> int:
        return 0

    def describe(self) -> dict[str, Any]:
        return {"ir": self.ir, "nodes": self.num_nodes(), "parameters": self.num_parameters()}

"""graphopt's two IRs behind one protocol: :class:`OnnxGraph` (onnx-graphsurgeon) and :class:`FxGraph` (torch.fx)."""

from __future__ import annotations

import os
from typing import Any

from graphopt.errors import ModelLoadError
from graphopt.ir.base import Graph
from graphopt.ir.onnx_graph import OnnxGraph
from graphopt.ir.onnx_io import external_data_files
from graphopt.ir.ops import OpKind

TORCH_SUFFIXES = (".pt", ".pth", ".pt2")


def load_model(model: Any, example_inputs: Any = None) -> Graph:
    """A path (``.onnx``, ``.pt``), an ``onnx.ModelProto``, an ``nn.Module`` or an existing Graph -> Graph."""
    if isinstance(model, Graph):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if path.endswith(TORCH_SUFFIXES):
            from graphopt.ir.fx_graph import FxGraph

            return FxGraph.load(path, example_inputs)
        return OnnxGraph.load(path)
    if type(model).__name__ == "ModelProto":
        return OnnxGraph.from_model(model)
    if hasattr(model, "named_parameters") and hasattr(model, "forward"):
        from graphopt.ir.fx_graph import FxGraph

        return FxGraph.from_module(model, example_inputs)
    raise ModelLoadError(f"cannot load a {type(model).__name__} as a model (give a path, ModelProto or nn.Module)")


__all__ = ["Graph", "OnnxGraph", "OpKind", "external_data_files", "load_model"]

"""graphopt's two IRs behind one protocol: :class:`OnnxGraph` (onnx-graphsurgeon) and :class:`FxGraph` (torch.fx)."""

from __future__ import annotations

import os
from typing import Any

from graphopt.errors import ModelLoadError, UsageError
from graphopt.ir.base import Graph
from graphopt.ir.onnx_graph import OnnxGraph
from graphopt.ir.onnx_io import external_data_files
from graphopt.ir.ops import OpKind
from graphopt.ir.torch_files import looks_like_torch_file
from graphopt.paths import require_regular

TORCH_SUFFIXES = (".pt", ".pth", ".pt2")


def load_model(model: Any, example_inputs: Any = None, *, trust_pickle: bool = False) -> Graph:
    """A path, an ``onnx.ModelProto``, an ``nn.Module``, a ``torch.export.ExportedProgram`` or a Graph -> Graph.

    A path ending in ``.pt``/``.pth``/``.pt2``, or whose content is a zip archive or a pickle, is a PyTorch file
    (a torch.export program, or a ``torch.save``d module: see :mod:`graphopt.ir.torch_files`); any other is ONNX.
    ``trust_pickle`` lets a pickled nn.Module load, which runs the code the file carries: only for files you trust.
    """
    if isinstance(model, Graph):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        require_regular(path, "model")  # before anything opens it: a pipe is read once, a device never ends
        suffix = path.lower()  # X.PT2 is a .pt2
        if suffix.endswith(TORCH_SUFFIXES) or (not suffix.endswith(".onnx") and looks_like_torch_file(path)):
            from graphopt.ir.fx_graph import FxGraph

            return FxGraph.load(path, example_inputs, trust_pickle=trust_pickle)
        return OnnxGraph.load(path)
    if type(model).__name__ == "ModelProto":  # a copy: exporting renames the tensors the graph shares with it
        own = type(model)()
        own.CopyFrom(model)
        return OnnxGraph.from_model(own)
    if type(model).__name__ == "ExportedProgram":
        from graphopt.ir.fx_graph import FxGraph

        return FxGraph.from_exported(model, example_inputs)
    if hasattr(model, "named_parameters") and hasattr(model, "forward"):
        from graphopt.ir.fx_graph import FxGraph

        return FxGraph.from_module(model, example_inputs)
    raise ModelLoadError(f"cannot load a {type(model).__name__} as a model (give a path, ModelProto, nn.Module or "
                         f"ExportedProgram)")


def model_reads(what: str, path: str) -> list[tuple[str, str]]:
    """``(what, path)`` of every file a run reads for the model at ``path``: the file, and for an ONNX model that
    exists its external data (for :class:`graphopt.paths.IOPlan`: none is ever written)."""
    path = os.fspath(path)
    reads = [(what, path)]
    if not path.lower().endswith(TORCH_SUFFIXES) and os.path.isfile(path):
        reads += [(f"{what}'s external data", data) for data in external_data_files(path)]
    return reads


def refuse_suffix(graph: Graph, path: str | None, flag: str) -> None:
    """An ONNX model written under a PyTorch suffix (.pt2, .pt, .pth) would be read back as a PyTorch file and
    refused: said before anything runs."""
    if path is not None and graph.ir == "onnx" and os.fspath(path).lower().endswith(TORCH_SUFFIXES):
        raise UsageError(f"{flag} {path}: an ONNX model is written as .onnx (graphopt reads "
                         f"{', '.join(TORCH_SUFFIXES)} files as PyTorch ones)")


__all__ = ["Graph", "OnnxGraph", "OpKind", "external_data_files", "load_model", "model_reads", "refuse_suffix"]

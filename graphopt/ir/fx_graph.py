"""FxGraph: a PyTorch model held as a ``torch.fx.GraphModule``.

An ``nn.Module`` is captured with ``torch.fx.symbolic_trace`` (module calls stay ``call_module`` nodes, so
parameters keep their names); where tracing fails (data-dependent control flow, unsupported Python), with
``torch.export`` (ATen-level ``call_function`` nodes). Shapes come from FX's ``ShapeProp`` on the example
inputs. Saved as ``.pt`` (the module with its example inputs) or exported to ``.onnx``.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from typing import Any, Sequence

import numpy as np

from graphopt.errors import ModelLoadError, UsageError, first_line
from graphopt.ir.base import Graph
from graphopt.ir.ops import OpKind

FORMAT_KEY = "graphopt_fx"


def _torch():
    try:
        import torch
        import torch.fx  # noqa: F401
    except ImportError:  # pragma: no cover - exercised only without the torch extra
        raise ModelLoadError("PyTorch models need torch: pip install 'graphopt[torch]'") from None
    return torch


class FxGraph(Graph):
    ir = "fx"

    def __init__(self, gm, example_inputs: Sequence[Any], captured_with: str = "symbolic_trace"):
        self.gm = gm
        self.example_inputs = tuple(example_inputs)
        self.captured_with = captured_with

    # -- capture, loading and saving --------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module, example_inputs: Sequence[Any]) -> "FxGraph":
        torch = _torch()
        if not isinstance(module, torch.nn.Module):
            raise ModelLoadError(f"expected a torch.nn.Module, got {type(module).__name__}")
        if example_inputs is None:
            raise UsageError("a PyTorch model needs example inputs (example_inputs=... / --input-shape)")
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        module = copy.deepcopy(module).eval()
        if isinstance(module, torch.fx.GraphModule):
            return cls(module, example_inputs, "fx")
        try:
            gm = torch.fx.symbolic_trace(module)
            how = "symbolic_trace"
        except Exception as trace_error:  # dynamic control flow etc.: torch.export handles more
            try:
                gm = torch.export.export(module, tuple(example_inputs)).module()
                how = "torch.export"
            except Exception as export_error:
                raise ModelLoadError(
                    f"could not capture {type(module).__name__}: symbolic_trace failed "
                    f"({first_line(trace_error)}) and torch.export failed ({first_line(export_error)})"
                ) from None
        return cls(gm, example_inputs, how)

    @classmethod
    def load(cls, path: str, example_inputs: Sequence[Any] | None = None) -> "FxGraph":
        torch = _torch()
        if not os.path.exists(path):
            raise ModelLoadError(f"{path}: no such file")
        try:  # a pickled module: only load files you trust, as with torch.load itself
            obj = torch.load(path, weights_only=False, map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a readable PyTorch file ({first_line(exc)})") from None
        if isinstance(obj, dict) and FORMAT_KEY in obj:
            return cls(obj["module"], example_inputs or obj["example_inputs"], obj.get("captured_with", "fx"))
        if isinstance(obj, torch.nn.Module):
            return cls.from_module(obj, example_inputs)
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a torch.nn.Module")

    def save(self, path: str) -> None:
        torch = _torch()
        if str(path).endswith(".onnx"):
            torch.onnx.export(self.gm, self.example_inputs, path, input_names=self.input_names(), dynamo=False)
        else:
            torch.save({FORMAT_KEY: 1, "module": self.gm, "example_inputs": self.example_inputs,
                        "captured_with": self.captured_with}, path)

    def copy(self) -> "FxGraph":
        return FxGraph(copy.deepcopy(self.gm), self.example_inputs, self.captured_with)

    # -- the protocol -------------------------------------------------------------------------------------------
    def compute_nodes(self):
        return [n for n in self.gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]

    def op_name(self, node) -> str:
        if node.op == "call_module":
            return type(self.gm.get_submodule(node.target)).__name__
        if node.op == "call_function":
            return getattr(node.target, "__name__", str(node.target))
        return str(node.target)

    def kind(self, node) -> OpKind:
        torch = _torch()
        nn, F = torch.nn, torch.nn.functional
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            for types_, kind in (
                ((nn.Conv1d, nn.Conv2d, nn.Conv3d), OpKind.CONV),
                ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), OpKind.CONV_TRANSPOSE),
                ((nn.Linear,), OpKind.GEMM),
                ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), OpKind.BATCH_NORM),
                ((nn.Identity,), OpKind.IDENTITY),
                ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout), OpKind.DROPOUT),
                ((nn.ReLU,), OpKind.RELU),
                ((nn.Flatten,), OpKind.FLATTEN),
            ):
                if isinstance(mod, types_):
                    return kind
        if node.op == "call_function":
            table = {
                F.conv1d: OpKind.CONV, F.conv2d: OpKind.CONV, F.conv3d: OpKind.CONV, F.linear: OpKind.GEMM,
                F.batch_norm: OpKind.BATCH_NORM, F.dropout: OpKind.DROPOUT, F.relu: OpKind.RELU,
                torch.relu: OpKind.RELU, torch.add: OpKind.ADD, torch.matmul: OpKind.MATMUL,
                torch.cat: OpKind.CONCAT, torch.flatten: OpKind.FLATTEN,
            }
            import operator

            table[operator.add] = OpKind.ADD
            return table.get(node.target, OpKind.OTHER)
        return OpKind.OTHER

    def op_counts(self) -> Counter:
        return Counter(self.op_name(n) for n in self.compute_nodes())

    def num_parameters(self) -> int:
        return int(sum(p.numel() for p in self.gm.parameters()))

    def input_names(self) -> list[str]:
        return [n.target for n in self.gm.graph.nodes if n.op == "placeholder"]

    def infer_shapes(self) -> None:
        from torch.fx.passes.shape_prop import ShapeProp

        ShapeProp(self.gm).propagate(*self.example_inputs)

    def export(self):
        return self.gm

    def verify(self, exported=None) -> None:
        try:
            self.gm.graph.lint()
            self.gm.recompile()
        except Exception as exc:
            raise ValueError(f"FX lint: {first_line(exc)}") from exc

    def sample_inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        torch = _torch()
        gen = torch.Generator().manual_seed(seed)
        feeds = {}
        for name, ex in zip(self.input_names(), self.example_inputs):
            if ex.is_floating_point():
                feeds[name] = torch.randn(ex.shape, generator=gen, dtype=ex.dtype).numpy()
            else:
                feeds[name] = ex.detach().cpu().numpy().copy()
        return feeds

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = _torch()
        args = [torch.from_numpy(np.ascontiguousarray(inputs[name])) for name in self.input_names()]
        with torch.no_grad():
            out = self.gm(*args)
        flat, _ = torch.utils._pytree.tree_flatten(out)
        return [t.detach().cpu().numpy() for t in flat if isinstance(t, torch.Tensor)]


# -- FX helpers passes share ----------------------------------------------------------------------------------
_INPLACE_OPERATORS = frozenset({"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor",
                      "ilshift", "irshift", "imatmul"})


def fx_may_mutate(node, gm) -> bool:
    """True when ``node`` may write to one of its inputs: an in-place method (``x.add_()``), function
    (``torch.relu_``, ``operator.iadd``, ``inplace=True``), ATen op with a mutable schema, or a module with
    ``inplace=True``. ``Node.is_impure()`` misses most of these; removing or reordering them is unsafe."""
    import inspect

    import torch

    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return getattr(mod, "inplace", False) is True
    if node.op != "call_function":
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    name = getattr(node.target, "__name__", "")
    if (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_OPERATORS:
        return True
    if node.kwargs.get("inplace") is True:
        return True
    try:  # F.relu(x, True), F.hardtanh(x, 0, 6, True): bind positionally against the signature
        bound = inspect.signature(node.target).bind_partial(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("inplace") is True


def delete_unread_attributes(gm, candidates) -> int:
    """Delete the tensors named in ``candidates`` (``get_attr`` targets) that no ``get_attr`` reads now and
    no called module owns. Returns how many were deleted."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    deleted = 0
    for target in sorted(set(candidates) - read):
        owner_path, _, attr = target.rpartition(".")
        if owner_path and any(owner_path == c or owner_path.startswith(c + ".") for c in called):
            continue  # the module still runs and reads its own parameters
        try:
            owner = gm.get_submodule(owner_path) if owner_path else gm
        except AttributeError:
            continue
        if hasattr(owner, attr):
            delattr(owner, attr)
            deleted += 1
    return deleted


def fresh_attr(gm, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ...: the first name no attribute of ``gm`` has."""
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name

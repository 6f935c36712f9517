"""FxGraph: a PyTorch model held as a ``torch.fx.GraphModule``.

An ``nn.Module`` is captured with ``torch.fx.symbolic_trace`` (module calls stay ``call_module`` nodes, so
parameters keep their names); where tracing fails (data-dependent control flow, unsupported Python), with
``torch.export`` (ATen-level ``call_function`` nodes). Shapes come from FX's ``ShapeProp`` on the example
inputs. Files are read by :mod:`graphopt.ir.torch_files` (no pickled code runs unless the user trusts the file);
saved as a torch.export program (``torch.export.save`` of the module and its example inputs, whatever the suffix:
it reloads without trusting a pickle) or exported to ``.onnx``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections import Counter
from typing import Any, Sequence

import numpy as np

from graphopt.errors import ModelLoadError, OutputError, UnsupportedError, UsageError, first_line
from graphopt.ir.base import Graph
from graphopt.ir.fx_export import (
    _torch,
    check_program_inputs,
    dynamic_dims,
    export_dynamic,
    program_inputs,
)
from graphopt.ir.fx_onnx import save_onnx
from graphopt.ir.fx_ops import get_attr, layer_call
from graphopt.ir.identity import retie, storage_key
from graphopt.ir.ops import OpKind


class FxGraph(Graph):
    ir = "fx"

    def __init__(self, gm, example_inputs: Sequence[Any], captured_with: str = "symbolic_trace"):
        self.gm = gm
        self.example_inputs = tuple(example_inputs)
        self.captured_with = captured_with
        self.notes: list[str] = []  # what capturing changed, for the report

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
        training = module.training
        module = copy.deepcopy(module).eval()
        try:  # inputs the module cannot take are the caller's mistake, said once, before any capture
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                expected = module(*example_inputs)
        except Exception as exc:
            shapes = ", ".join("x".join(map(str, t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
                               for t in example_inputs)
            raise UsageError(f"{type(module).__name__} does not run on the example inputs ({shapes}): "
                             f"{first_line(exc)} (give --input-shape / example_inputs= it takes)") from None
        notes = [f"{type(module).__name__} was in train() mode: it is captured and optimized in eval mode (dropout "
                 f"off, BatchNorm with its running statistics); the module itself is left as it was"] \
            if training else []
        if isinstance(module, torch.fx.GraphModule):
            return cls(module, example_inputs, "fx").noted(notes)
        try:
            gm = torch.fx.symbolic_trace(module)
            how = "symbolic_trace"
            _same_outputs(gm, example_inputs, expected)
        except Exception as trace_error:  # dynamic control flow, a branch on an argument left out: torch.export
            from graphopt.quiet import quiet_torch_logs

            try:
                with quiet_torch_logs(), contextlib.redirect_stderr(io.StringIO()):  # torch prints the failing graph
                    gm = export_dynamic(module, example_inputs).module()
                how = "torch.export"
            except Exception as export_error:
                raise UnsupportedError(
                    f"could not capture {type(module).__name__}: symbolic_trace failed "
                    f"({first_line(trace_error, 120)}) and torch.export failed ({first_line(export_error, 160)}) "
                    f"(make data-dependent branches torch.cond, or move them out of forward; or export the model to "
                    f"ONNX yourself and optimize that)") from None
        return cls(gm, example_inputs, how).noted(notes)

    def noted(self, notes: list[str]) -> "FxGraph":
        self.notes += notes
        return self

    @classmethod
    def from_exported(cls, program, example_inputs: Sequence[Any] | None = None, where: str = "the program"):
        """An ``ExportedProgram`` as its FX module; example inputs from ``example_inputs``, else the program's
        own, else random ones made from its static input specs."""
        torch = _torch()
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        if example_inputs is not None:
            check_program_inputs(program, tuple(example_inputs), where)
        inputs = tuple(example_inputs) if example_inputs is not None else program_inputs(program)
        if inputs is None:
            raise UsageError(f"{where}: the program keeps no example inputs and its input shapes are not static "
                             f"(give example inputs: --input-shape 1x3x224x224 / example_inputs=...)")
        try:
            gm = program.module()
        except Exception as exc:
            raise ModelLoadError(f"{where}: torch.export could not rebuild the program's module "
                                 f"({first_line(exc)})") from None
        return cls(gm, inputs, "torch.export")

    @classmethod
    def load(cls, path: str, example_inputs: Sequence[Any] | None = None, *, trust_pickle: bool = False) -> "FxGraph":
        """A torch.export ``.pt2`` program, or (``trust_pickle`` only) a ``torch.save``d nn.Module: see
        :func:`graphopt.ir.torch_files.read_torch_file`. The file is told by its content, not its suffix."""
        torch = _torch()
        from graphopt.ir.torch_files import read_torch_file

        obj = read_torch_file(path, trust_pickle=trust_pickle)
        if isinstance(obj, torch.export.ExportedProgram):
            return cls.from_exported(obj, example_inputs, where=path)
        module = obj
        if isinstance(obj, tuple):  # graphopt's pickled format of before: the module and its example inputs
            module, saved_inputs = obj
            example_inputs = example_inputs if example_inputs is not None else saved_inputs
        if example_inputs is None:
            raise UsageError(f"{path}: a pickled nn.Module needs example inputs (--input-shape 1x3x224x224 / "
                             f"example_inputs=...)")
        return cls.from_module(module, example_inputs)

    def save(self, path: str) -> None:
        """``.onnx``: :func:`graphopt.ir.fx_onnx.save_onnx` (batch and sequence dims dynamic where the module allows,
        outputs named, no exporter debug notes; Q/DQ ops become QuantizeLinear / DequantizeLinear). Any other
        suffix: a torch.export program
        of the module and its example inputs (``torch.export.save``, batch dimension dynamic where the module
        allows), which graphopt reloads without trusting a pickle."""
        torch = _torch()
        if str(path).lower().endswith(".onnx"):
            save_onnx(self.gm, self.example_inputs, path, aten=self.is_aten())
            return
        try:
            program = export_dynamic(self.gm, self.example_inputs)
        except Exception as exc:
            raise UnsupportedError(f"{path}: torch.export cannot capture the optimized module ({first_line(exc)}) "
                                   f"(write it as .onnx instead, or keep the Python API's result.model)") from None
        try:
            with open(path, "wb") as f:
                torch.export.save(program, f)
        except OSError as exc:
            raise OutputError(f"{path}: cannot be written ({exc.strerror or first_line(exc)})") from None

    def copy(self) -> "FxGraph":
        with warnings.catch_warnings():  # torch 2.13's own graph deepcopy trips its LeafSpec deprecation
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            twin = copy.deepcopy(self.gm)
        retie(self.gm, twin)
        return FxGraph(twin, self.example_inputs, self.captured_with)

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
            layer = layer_call(node)  # conv / conv_transpose / linear, F.* and ATen
            if layer is not None:
                return layer[0] or OpKind.OTHER  # OTHER: an aten.convolution of unknown ``transposed``
            table = {
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
        """Elements of the module's parameters, and of the other tensors its graph reads as constants (what a
        quantized graph holds its int8 weights and scales in; BatchNorm statistics read by an ATen graph): the
        count ONNX's initializers give."""
        torch = _torch()

        seen = {storage_key(p): p.numel() for p in self.gm.parameters()}  # a tied weight once
        for node in self.gm.graph.nodes:
            if node.op == "get_attr" and not str(node.target).endswith("num_batches_tracked"):  # a counter
                value = get_attr(self.gm, node.target)
                if isinstance(value, torch.Tensor):
                    seen.setdefault(storage_key(value), value.numel())
        return int(sum(seen.values()))

    def input_names(self) -> list[str]:
        return [n.target for n in self.gm.graph.nodes if n.op == "placeholder"]

    def input_specs(self) -> list:
        """The inputs as :class:`graphopt.ir.feeds.InputSpec`: placeholder names, the example inputs' shapes (None
        for a dimension torch.export kept symbolic, and for the batch dimension of a traced module) and numpy
        dtypes."""
        from graphopt.ir.feeds import InputSpec

        torch = _torch()
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        specs = []
        for node, example in zip(placeholders, self.example_inputs):
            if not isinstance(example, torch.Tensor):  # a dict / list of tensors as one argument
                raise UnsupportedError(f"input '{node.target}' is a {type(example).__name__}, not a tensor: data for "
                                       f"it (calibration, checks, ONNX export) needs one tensor per argument; wrap the "
                                       f"module so that forward takes tensors (forward(self, img, meta))")
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):  # recorded by torch.export: its symbolic dims are dynamic
                shape = tuple(d if isinstance(d, int) else None for d in val.shape)
            else:  # a traced module: the dimensions export_dynamic makes dynamic
                dynamic = dynamic_dims(example)
                shape = tuple(None if i in dynamic else d for i, d in enumerate(example.shape))
            dtype = torch.empty((), dtype=example.dtype).numpy().dtype
            specs.append(InputSpec(node.target, shape, dtype))
        return specs

    def as_arrays(self, data: Any) -> Any:
        """Tensors given for the model's inputs as numpy arrays by input name: a tensor (one-input models), a
        tuple / list of tensors in input order (for a one-input model, a list of several tensors is a list of its
        batches), or a mapping of tensors. Anything else is returned as it is (the
        calibration readers take paths, arrays and iterables)."""
        torch = _torch()
        names = self.input_names()
        if isinstance(data, torch.Tensor):
            data = (data,)
        if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
            if isinstance(data, list) and len(names) == 1 and len(data) > 1:  # a list of batches of the one input
                return [t.detach().cpu().numpy() for t in data]
            if len(data) != len(names):
                raise UsageError(f"{len(data)} tensors given for a model with {len(names)} inputs "
                                 f"({', '.join(names)})")
            data = dict(zip(names, data))
        if isinstance(data, dict) and any(isinstance(v, torch.Tensor) for v in data.values()):
            return {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in data.items()}
        return data

    def is_aten(self) -> bool:
        """Whether the graph is made of ATen ops, as torch.export records them (what PT2E quantization takes)."""
        calls = [n for n in self.gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
        return all(n.op == "call_function" or (n.op == "call_module" and n.target == "_guards_fn") for n in calls) \
            and any(getattr(n.target, "namespace", None) == "aten" for n in calls)

    def aten(self) -> "FxGraph":
        """This graph as ATen ops (itself when it already is): :func:`export_dynamic` of its module."""
        if self.is_aten():
            return self
        try:
            program = export_dynamic(self.gm, self.example_inputs)
        except Exception as exc:
            raise UnsupportedError(
                f"torch.export cannot capture the module: {type(exc).__name__}: {first_line(exc, 200)} (quantizing a "
                f"PyTorch model needs one torch.export can capture: make data-dependent branches torch.cond or move "
                f"them out of forward, or export it to ONNX and quantize that)") from None
        return FxGraph(program.module(), self.example_inputs, "torch.export")

    def infer_shapes(self) -> None:
        from torch.fx.passes.shape_prop import ShapeProp

        with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints a failing node's traceback, then raises
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


def _same_outputs(gm, example_inputs: Sequence[Any], expected) -> None:
    """Raise unless the traced ``gm`` computes the module's ``expected`` outputs on its example inputs: a trace
    follows the branch a placeholder takes (``if mask is not None`` with ``mask`` left to its default), which may
    not be the one the example inputs take."""
    torch = _torch()
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        got = gm(*example_inputs)
    flat = [torch.utils._pytree.tree_leaves(o) for o in (got, expected)]
    if len(flat[0]) != len(flat[1]) or not all(
            torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else a == b
            for a, b in zip(*flat)):
        raise ValueError("the traced module computes other outputs than the module on the example inputs")


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

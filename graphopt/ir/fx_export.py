"""Capturing a PyTorch module with ``torch.export`` with its batch (and token sequence) dimensions dynamic: the one
home of graphopt's rule for which dims are dynamic (:func:`dynamic_dims`) and of the checked export
(:func:`export_with_dims`), used by the FX IR's capture, its ``.pt2`` / ``.onnx`` saving and the x86 lowering; and
an exported program's example inputs (:func:`program_inputs`, :func:`check_program_inputs`)."""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from typing import Any, Sequence

from graphopt.errors import UnsupportedError, UsageError, first_line


def _torch():
    try:
        import torch
        import torch.fx  # noqa: F401
    except ImportError:  # pragma: no cover - exercised only without the torch extra
        raise UnsupportedError("PyTorch models need torch: pip install 'graphopt[torch]'") from None
    return torch


def dynamic_dims(example) -> list[int]:
    """The dimensions graphopt keeps dynamic for an example input: the batch (0) of every tensor, and the sequence
    (1) of an integer (B, S) tensor (token ids)."""
    torch = _torch()
    if not isinstance(example, torch.Tensor) or example.dim() == 0:
        return []
    return [0] + ([1] if example.dim() == 2 and not example.is_floating_point() else [])


def export_with_dims(module, example_inputs: Sequence[Any], dims: Sequence[Sequence[int]]):
    """``torch.export.export`` of ``module`` asking for ``dims`` (per input) as ``Dim.AUTO``, checked: returns
    ``(program, {input index: its dynamic dims}, "")``, or ``(None, {}, why)`` when no asked dim came out dynamic
    and working. torch specializes a dim whose example size is 1, so such examples are repeated to 2 for tracing
    (the values do not matter to the program). The program is then run on inputs one larger in every dim it made
    dynamic: a graph that holds a size of its example inputs (a view to ``[2, 8, 4, 16]`` holds only while batch x
    sequence = 16; a loop over the batch) keeps it as a guard, not a static dim, and fails that probe."""
    torch = _torch()
    from torch.export import Dim

    traced = []
    for x, ds in zip(example_inputs, dims):
        for d in ds:
            if x.shape[d] == 1:
                x = x.repeat_interleave(2, dim=d)
        traced.append(x)
    spec = tuple({d: Dim.AUTO for d in ds} or None for ds in dims)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(module, tuple(traced), dynamic_shapes=spec)
        except Exception as exc:
            return None, {}, f"torch.export could not free them: {first_line(exc, 160)}"
    user_inputs = set(program.graph_signature.user_inputs)
    values = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    dynamic = {i: [d for d, size in enumerate(getattr(v, "shape", ())) if not isinstance(size, int)]
               for i, v in enumerate(values)}
    if not any(dynamic.values()):
        return None, {}, "the model fixes every dim torch.export was asked to free"
    bounded = _bounded_dims(program)
    if bounded:  # a branch on a size (if seq > 8) kept as a range: files written from the graph would lose it
        return None, {}, f"torch.export keeps {bounded} only: the model branches on that size"
    probe = grown(traced, dynamic)
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")  # and FX's print of a failing call's source: a failed probe is an answer
            gm = program.module()
            for inputs in (probe, example_inputs):  # one larger, and the example's own sizes (traced at >= 2)
                if not _agree(gm(*inputs), module(*inputs)):
                    return None, {}, (f"the graph traced at sizes {_sizes(traced)} computes other outputs than the "
                                      f"module at {_sizes(inputs)}: the model branches on a size")
    except Exception as exc:
        return None, {}, f"the graph holds a size of its example inputs: {first_line(exc, 120)}"
    return program, {i: d for i, d in dynamic.items() if d}, ""


AGREE_DB = 20 * math.log10(50)  # a difference of at most 2 % of the output's norm


def _bounded_dims(program) -> str:
    """The symbolic sizes torch.export kept within bounds other than [2, inf) (a guard like ``s0 >= 9``), as text."""
    out = []
    for symbol, bounds in getattr(program, "range_constraints", {}).items():
        lower, upper = bounds.lower, bounds.upper
        if (lower.is_number and int(lower) > 2) or str(upper) not in ("oo", "int_oo"):
            out.append(f"{symbol} in [{lower}, {upper}]")
    return ", ".join(out)


def _agree(got, expected) -> bool:
    """Whether two outputs (tensors, or nests of them) are the same computation: each within 2 % of the other in
    norm, SQNR >= 34 dB (another branch is far off; a quantized graph's re-roundings are not)."""
    from graphopt.numeric import sqnr_db

    torch = _torch()
    a, b = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)
    return len(a) == len(b) and all(
        x.shape == y.shape and sqnr_db(y.double().numpy(), x.double().numpy()) >= AGREE_DB
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y for x, y in zip(a, b))


def _sizes(inputs) -> str:
    return ", ".join("x".join(map(str, x.shape)) for x in inputs if hasattr(x, "shape"))


def export_dynamic(module, example_inputs: Sequence[Any]):
    """``torch.export.export`` of ``module`` with :func:`dynamic_dims` dynamic where the model allows
    (:func:`export_with_dims`): one program for any batch size and sequence length; the batch alone when the
    sequence cannot be freed with it (a position table). A model that needs its example sizes is exported as it
    is, with static shapes."""
    torch = _torch()
    wanted = [dynamic_dims(x) for x in example_inputs]
    for dims in [wanted] + ([[d[:1] for d in wanted]] if any(len(d) > 1 for d in wanted) else []):
        program, _, _ = export_with_dims(module, example_inputs, dims)  # all of them, then the batch alone
        if program is not None:
            return program
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module, tuple(example_inputs))


def grown(inputs: Sequence[Any], dims: dict[int, list[int]]) -> list[Any]:
    """``inputs`` one larger in each of their ``dims`` (input index -> dims), each by its first slice repeated (token
    ids stay valid): what a graph that really frees those dims must take."""
    torch = _torch()
    out = []
    for i, x in enumerate(inputs):
        for d in dims.get(i, []):
            x = torch.cat([x, x.narrow(d, 0, 1)], dim=d)
        out.append(x)
    return out


def check_program_inputs(program, inputs: tuple, where: str) -> None:
    """Example inputs that cannot fit the program — their count, a rank, a static size — refused in one line
    (UsageError) before anything traces the program with them."""
    import torch

    user_inputs = set(program.graph_signature.user_inputs)
    specs = [(n.name, n.meta.get("val")) for n in program.graph.nodes
             if n.op == "placeholder" and n.name in user_inputs]
    if len(inputs) != len(specs):
        raise UsageError(f"{where}: {len(inputs)} example input(s) given; the program takes {len(specs)} "
                         f"({', '.join(name for name, _ in specs)})")
    for (name, val), given in zip(specs, inputs):
        if not isinstance(val, torch.Tensor) or not isinstance(given, torch.Tensor):
            continue
        want = [d if isinstance(d, int) else None for d in val.shape]  # a symbolic size: dynamic
        if given.dim() != len(want) or any(w is not None and w != g for w, g in zip(want, given.shape)):
            takes = "x".join("N" if w is None else str(w) for w in want) or "a scalar"
            raise UsageError(f"{where}: example input '{name}' has shape {'x'.join(map(str, given.shape))}; the "
                             f"program takes {takes} (N: any size); give --input-shape / example_inputs= that fit")


def program_inputs(program) -> tuple | None:
    """The example inputs saved with an ExportedProgram, or random ones from its input specs when every input
    is a tensor of static shape; None when neither is there."""
    import torch

    saved = program.example_inputs
    if saved is not None:
        args, kwargs = saved
        if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
            return tuple(args)
    user_inputs = set(program.graph_signature.user_inputs)
    specs = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    if not specs or not all(isinstance(v, torch.Tensor) and all(isinstance(d, int) for d in v.shape) for v in specs):
        return None
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point()
                 else torch.zeros(v.shape, dtype=v.dtype) for v in specs)

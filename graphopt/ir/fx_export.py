"""Capturing a PyTorch module with ``torch.export`` with its batch (and token sequence) dimensions dynamic: the one
home of graphopt's rule for which dims are dynamic (:func:`dynamic_dims`) and of the checked export
(:func:`export_with_dims`), used by the FX IR's capture, its ``.pt2`` / ``.onnx`` saving and the x86 lowering."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from graphopt.errors import ModelLoadError, first_line


def _torch():
    try:
        import torch
        import torch.fx  # noqa: F401
    except ImportError:  # pragma: no cover - exercised only without the torch extra
        raise ModelLoadError("PyTorch models need torch: pip install 'graphopt[torch]'") from None
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
    probe = []
    for i, x in enumerate(traced):
        for d in dynamic.get(i, []):
            x = torch.cat([x, x.narrow(d, 0, 1)], dim=d)  # its first slice repeated: token ids stay valid
        probe.append(x)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program.module()(*probe)
    except Exception as exc:
        return None, {}, f"the graph holds a size of its example inputs: {first_line(exc, 120)}"
    return program, {i: d for i, d in dynamic.items() if d}, ""


def export_dynamic(module, example_inputs: Sequence[Any]):
    """``torch.export.export`` of ``module`` with :func:`dynamic_dims` dynamic where the model allows
    (:func:`export_with_dims`): one program for any batch size and sequence length. A model that needs its
    example sizes is exported as it is, with static shapes."""
    torch = _torch()
    program, _, _ = export_with_dims(module, example_inputs, [dynamic_dims(x) for x in example_inputs])
    if program is not None:
        return program
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module, tuple(example_inputs))



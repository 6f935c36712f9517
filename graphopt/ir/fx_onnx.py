"""Writing an FX graph as ONNX: an ATen graph (what torch.export and the int8 passes make, Q/DQ ops included)
through the dynamo exporter, a traced module through the TorchScript exporter; either way with the dims of
:func:`graphopt.ir.fx_export.dynamic_dims` dynamic and called ``batch`` / ``sequence``, outputs named (``output``,
``output_0``…, or a dict's keys), and without the exporter's per-node debug notes."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from graphopt.errors import OutputError, UnsupportedError, first_line
from graphopt.ir.fx_export import _torch, dynamic_dims, export_dynamic, grown


def save_onnx(gm, example_inputs: Sequence[Any], path: str, *, aten: bool) -> None:
    """Write ``gm`` (an ATen graph when ``aten``, else a traced module) to ``path`` as ONNX; UnsupportedError when
    torch.onnx cannot export it, OutputError when the file cannot be written."""
    torch = _torch()
    from graphopt.quiet import quiet_torch_logs

    outputs = onnx_output_names(gm, example_inputs)
    try:
        with quiet_torch_logs():
            if not aten:
                _save_traced(gm, example_inputs, path, outputs)
                return
            program = torch.onnx.export(export_dynamic(gm, example_inputs), (), dynamo=True, verbose=False,
                                        output_names=outputs)
    except OSError:
        raise
    except Exception as exc:
        raise UnsupportedError(f"{path}: torch.onnx cannot export the module ({first_line(exc)}) (keep it as a "
                               f".pt2 program, or the Python API's result.model)") from None
    import onnx

    model = program.model_proto
    for node in model.graph.node:  # the exporter's debug notes (stack traces, module paths): most of a small file
        del node.metadata_props[:]
    del model.graph.value_info[:]  # intermediate shapes: onnxruntime infers them
    name_dynamic_dims(model, example_inputs)
    kept = [p for p in model.graph.metadata_props if not p.key.startswith("pkg.torch.")]  # the graph signature
    del model.graph.metadata_props[:]
    model.graph.metadata_props.extend(kept)
    try:
        onnx.save_model(model, path, save_as_external_data=model.ByteSize() > 2**31 - 2**20)
    except OSError as exc:
        raise OutputError(f"{path}: cannot be written ({exc.strerror or first_line(exc)})") from None


def _save_traced(gm, example_inputs: Sequence[Any], path: str, outputs: list[str] | None) -> None:
    """A traced module through the TorchScript exporter, with the dims of :func:`dynamic_dims` dynamic when the
    written model then runs inputs one larger in them to the module's outputs; with the example inputs' static
    shapes when it does not (a size the trace kept)."""
    torch = _torch()
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    dims = {i: dynamic_dims(x) for i, x in enumerate(example_inputs) if dynamic_dims(x)}
    axes = {names[i]: {d: DIM_NAMES[d] for d in ds} for i, ds in dims.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(gm, tuple(example_inputs), path, input_names=names, output_names=outputs,
                          dynamic_axes=axes or None, dynamo=False)
        if axes and not _runs(gm, path, grown(example_inputs, dims)):
            torch.onnx.export(gm, tuple(example_inputs), path, input_names=names, output_names=outputs, dynamo=False)


def _runs(gm, path: str, inputs: list) -> bool:
    """Whether onnxruntime runs the ONNX file at ``path`` on ``inputs`` to ``gm``'s outputs (1e-3 relative)."""
    import onnxruntime as ort

    from graphopt.numeric import max_difference

    torch = _torch()
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = session.run(None, {i.name: x.detach().numpy() for i, x in zip(session.get_inputs(), inputs)})
        with torch.no_grad():
            want = [t.numpy() for t in torch.utils._pytree.tree_flatten(gm(*inputs))[0]]
    except Exception:
        return False
    return max_difference(want, got).max_rel_err <= 1e-3


def onnx_output_names(module, example_inputs: Sequence[Any]) -> list[str] | None:
    """Names for ``module``'s ONNX outputs: a dict's keys, ``output`` for one tensor, ``output_0``, ``output_1``, …
    for several; None (the exporter's own names) when an output is not a tensor or nests."""
    torch = _torch()
    from torch.utils._pytree import tree_flatten

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = module(*example_inputs)
    leaves, _ = tree_flatten(out)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        return None
    if isinstance(out, dict):
        keys = list(out)
        return keys if len(keys) == len(leaves) and all(isinstance(k, str) and k for k in keys) else None
    if isinstance(out, (tuple, list)) and len(out) != len(leaves):
        return None
    return ["output"] if len(leaves) == 1 else [f"output_{i}" for i in range(len(leaves))]


DIM_NAMES = {0: "batch", 1: "sequence"}  # what the dims of dynamic_dims are called in a written ONNX model


def name_dynamic_dims(model, example_inputs: Sequence[Any]) -> None:
    """Call the exported ONNX ``model``'s dynamic input dims by what they are (``batch``, ``sequence``) instead of
    the exporter's symbols (``s77``), on its inputs and on every output sharing a symbol; a second symbol for
    the same kind of dim gets ``batch_1``."""
    rename: dict[str, str] = {}
    for vi, x in zip(model.graph.input, example_inputs):
        dims = vi.type.tensor_type.shape.dim
        for d in dynamic_dims(x):
            symbol = dims[d].dim_param if d < len(dims) else ""
            if symbol and symbol not in rename:
                base = DIM_NAMES[d]
                taken = set(rename.values())
                rename[symbol] = next(n for n in (base, *(f"{base}_{k}" for k in range(1, 99))) if n not in taken)
    for vi in [*model.graph.input, *model.graph.output]:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]

"""Writing an FX graph as ONNX: an ATen graph (what torch.export and the int8 passes make, Q/DQ ops included)
through the dynamo exporter, a traced module through the TorchScript exporter; either way with the dims of
:func:`graphopt.ir.fx_export.dynamic_dims` dynamic and called ``batch`` / ``sequence``, outputs named (``output``,
``output_0``…, or a dict's keys), and without the exporter's per-node debug notes."""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Any, Sequence

import numpy as np

from graphopt.errors import OutputError, UnsupportedError, first_line
from graphopt.ir.fx_export import _torch, dynamic_dims, export_dynamic, grown


def save_onnx(gm, example_inputs: Sequence[Any], path: str, *, aten: bool) -> None:
    """Write ``gm`` (an ATen graph when ``aten``, else a traced module) to ``path`` as ONNX; UnsupportedError when
    torch.onnx cannot export it, OutputError when the file cannot be written."""
    torch = _torch()
    from graphopt.quiet import quiet_torch_logs

    dynamic_int8 = [n.name for n in gm.graph.nodes if "choose_qparams" in str(n.target)]
    if dynamic_int8:
        raise UnsupportedError(f"{path}: a PyTorch model with dynamic int8 (int8-dynamic: its activations' scales "
                               f"are chosen at run time) has no ONNX form in torch's exporter; write it as .pt2 (or an "
                               f"x86 package), or export the fp32 model to ONNX and run int8-dynamic on that")
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
    _check_written(path)


def _check_written(path: str) -> None:
    """The exporter's file passes onnx's checker, or UnsupportedError (nothing is moved into place)."""
    import onnx

    try:
        onnx.checker.check_model(path)
    except Exception as exc:
        raise UnsupportedError(f"{path}: torch.onnx wrote a model that is not valid ONNX ({first_line(exc)}) "
                               f"(keep it as a .pt2 program, or the Python API's result.model)") from None


def _save_traced(gm, example_inputs: Sequence[Any], path: str, outputs: list[str] | None) -> None:
    """A traced module through the TorchScript exporter, with the dims of :func:`dynamic_dims` dynamic when the
    written model then runs inputs one larger in them to the module's outputs; with the example inputs' static
    shapes when it does not (a size the trace kept)."""
    torch = _torch()
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    wanted = {i: dynamic_dims(x) for i, x in enumerate(example_inputs) if dynamic_dims(x)}
    attempts = [wanted, {i: ds[:1] for i, ds in wanted.items()}] if any(len(d) > 1 for d in wanted.values()) \
        else [wanted]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dims in [*(d for d in attempts if d), {}]:  # all dynamic dims, the batch only, static
            axes = {names[i]: {d: DIM_NAMES[d] for d in ds} for i, ds in dims.items()}
            torch.onnx.export(gm, tuple(example_inputs), path, input_names=names, output_names=outputs,
                              dynamic_axes=axes or None, dynamo=False)
            if not dims or _runs(gm, path, grown(example_inputs, dims)):
                break
    _check_written(path)


def _runs(gm, path: str, inputs: list) -> bool:
    """Whether onnxruntime runs the ONNX file at ``path`` on ``inputs`` to ``gm``'s outputs (1e-3 relative)."""
    import onnxruntime as ort

    from graphopt.numeric import max_difference

    torch = _torch()
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a model that fails the probe is expected here: not an error to print
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feeds = [np.asarray(x.detach().numpy() if isinstance(x, torch.Tensor) else x) for x in inputs]
        got = session.run(None, {i.name: x for i, x in zip(session.get_inputs(), feeds)})
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # FX prints a failing call's source
            want = [t.numpy() for t in torch.utils._pytree.tree_flatten(gm(*inputs))[0] if isinstance(t, torch.Tensor)]
    except Exception:
        return False
    return max_difference(want, got).max_rel_err <= 1e-3


def onnx_output_names(module, example_inputs: Sequence[Any]) -> list[str] | None:
    """Names for ``module``'s ONNX outputs, its tensors in order: a flat dict's keys, ``output`` for one tensor,
    ``output_0``, ``output_1``, … otherwise (nested structures, other values beside them; a key that is also an
    input's name too). None when it returns no tensor."""
    torch = _torch()
    from torch.utils._pytree import tree_flatten

    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        out = module(*example_inputs)
    tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    if not tensors:
        return None
    inputs = {n.target for n in module.graph.nodes if n.op == "placeholder"} if hasattr(module, "graph") else set()
    if isinstance(out, dict) and len(out) == len(tensors) and all(isinstance(v, torch.Tensor) for v in out.values()):
        keys = list(out)
        if all(isinstance(k, str) and k for k in keys) and not inputs & set(keys):
            return keys
    names = ["output"] if len(tensors) == 1 else [f"output_{i}" for i in range(len(tensors))]
    return names if not inputs & set(names) else [f"{n}_" for n in names]


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

"""Model inputs as calibration reads them: :func:`input_specs` gives the :class:`~graphopt.ir.feeds.InputSpec` s of
a model, a session or a description of its inputs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from graphopt.ir.feeds import Dim, InputSpec, session_input_specs

__all__ = ["Dim", "InputSpec", "input_specs", "quoted_names"]


def input_specs(model) -> tuple[InputSpec, ...]:
    """The inputs of ``model`` as :class:`InputSpec` s.

    ``model``: a sequence of InputSpec or of ``(name, shape, dtype)`` tuples; a mapping ``{name: (shape, dtype)}``;
    an ``onnx.ModelProto`` or a path to one (initializers listed as inputs are skipped); a graphopt ``OnnxGraph`` or
    ``FxGraph``;
    an onnxruntime ``InferenceSession``.
    """
    if isinstance(model, InputSpec):
        return (model,)
    if isinstance(model, Mapping):
        specs = []
        for name, value in model.items():
            if isinstance(value, InputSpec):
                specs.append(value)
            else:
                shape, dtype = value
                specs.append(InputSpec(name, tuple(shape), dtype))
        return tuple(specs)
    if isinstance(model, (list, tuple)) and all(isinstance(s, (InputSpec, tuple, list)) for s in model):
        return tuple(s if isinstance(s, InputSpec) else InputSpec(*s) for s in model)
    if hasattr(model, "get_inputs"):  # onnxruntime.InferenceSession
        return tuple(session_input_specs(model))
    if callable(getattr(model, "input_specs", None)):  # graphopt OnnxGraph, FxGraph
        return tuple(model.input_specs())
    import onnx

    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model), load_external_data=False)
    if isinstance(model, onnx.ModelProto):
        inits = {i.name for i in model.graph.initializer}
        specs = []
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
            specs.append(InputSpec(vi.name, dims, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)))
        return tuple(specs)
    raise TypeError(f"cannot read model inputs from a {type(model).__name__}")


def quoted_names(specs: Sequence[InputSpec]) -> str:
    """``'image', 'mask'``: the input names for messages."""
    return ", ".join(f"'{s.name}'" for s in specs)

"""Model inputs as calibration sees them: :class:`InputSpec` (a name, a shape whose dims are fixed ints or
symbolic, a numpy dtype) and :func:`input_specs`, which reads them from a model, a session or a description."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from graphopt.calib.errors import CalibrationInputError

__all__ = ["InputSpec", "input_specs"]


Dim = Union[int, str, None]


def _norm_dim(d) -> Dim:
    if isinstance(d, (int, np.integer)) and not isinstance(d, bool):
        return int(d) if d > 0 else None  # -1 / 0: unknown, as some tools write it
    if isinstance(d, str) and d:
        return d
    return None


def _dim_str(d: Dim) -> str:
    return str(d) if d is not None else "?"


@dataclass(frozen=True)
class InputSpec:
    """One model input: ``name``, ``shape`` (ints are fixed, strings or None symbolic) and numpy ``dtype``."""

    name: str
    shape: tuple
    dtype: np.dtype = field(default=np.dtype(np.float32))

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(_norm_dim(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @property
    def batch_dim(self) -> int | None:
        """The fixed size of the first (batch) dimension, or None when it is symbolic."""
        return self.shape[0] if self.shape and isinstance(self.shape[0], int) else None

    def shape_str(self, dims=None) -> str:
        dims = self.shape if dims is None else dims
        return "(" + ", ".join(_dim_str(d) for d in dims) + ")"

    def __str__(self) -> str:
        return f"'{self.name}' {self.dtype} {self.shape_str()}"


_ORT_TYPES = {"float": "float32", "double": "float64", "float16": "float16", "int8": "int8", "uint8": "uint8",
              "int16": "int16", "uint16": "uint16", "int32": "int32", "uint32": "uint32", "int64": "int64",
              "uint64": "uint64", "bool": "bool"}


def input_specs(model) -> tuple[InputSpec, ...]:
    """The inputs of ``model`` as :class:`InputSpec` s.

    ``model``: a sequence of InputSpec or of ``(name, shape, dtype)`` tuples; a mapping ``{name: (shape, dtype)}``;
    an ``onnx.ModelProto`` or a path to one (initializers listed as inputs are skipped); a graphopt ``OnnxGraph``;
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
        specs = []
        for arg in model.get_inputs():
            kind = arg.type[len("tensor("):-1] if arg.type.startswith("tensor(") else arg.type
            if kind not in _ORT_TYPES:
                raise CalibrationInputError(f"model input '{arg.name}' has type {arg.type}, which calibration "
                                            "does not support")
            specs.append(InputSpec(arg.name, tuple(arg.shape), _ORT_TYPES[kind]))
        return tuple(specs)
    if hasattr(model, "gs") and hasattr(model.gs, "inputs"):  # graphopt OnnxGraph (inputs with defaults skipped)
        defaults = getattr(model, "defaults", {})
        return tuple(InputSpec(t.name, tuple(t.shape or ()), t.dtype if t.dtype is not None else np.float32)
                     for t in model.gs.inputs if t.name not in defaults)
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


def _names(specs: Sequence[InputSpec]) -> str:
    return ", ".join(f"'{s.name}'" for s in specs)

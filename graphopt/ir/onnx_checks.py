"""What onnx's checker lets through but graphopt refuses when it loads a model: damage that would otherwise
surface deep inside a pass or onnxruntime, or only when the result is written.

- :func:`check_tensor_sizes`: a tensor whose data does not fill its shape (``raw_data`` of another length, or
  another count of typed values);
- :func:`check_text`: a string field that is not UTF-8 (protobuf hands it back as bytes; onnx-graphsurgeon
  fails on it when the model is exported);
- :func:`check_value_types`: a value (graph input, output, value_info, in any subgraph) whose type is set but
  empty, or opaque (onnx-graphsurgeon imports it, then fails to export it: "unhashable type: 'Opaque'").

They read metadata only: no tensor's payload is copied. :func:`graphs` walks a graph and its subgraphs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from graphopt.errors import ModelLoadError, UnsupportedError
from graphopt.ir.onnx_external import RAW_NUMPY, is_external, model_tensors

# byte-aligned types whose element count is checked: itemsize in bytes (sub-byte types are packed; left to onnx)
_ITEMSIZE = {**{k: np.dtype(v).itemsize for k, v in RAW_NUMPY.items()}, TensorProto.BFLOAT16: 2,
             **{getattr(TensorProto, n): 1 for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ",
                                                     "FLOAT8E8M0") if hasattr(TensorProto, n)}}


def check_tensor_sizes(model: onnx.ModelProto, where: str) -> None:
    """ModelLoadError for a tensor stored in the model whose data does not fill its shape (``raw_data`` of
    another length, or another count of typed values): the onnx checker lets them through, and they fail later,
    deep inside a pass or onnxruntime."""
    for t, _ in model_tensors(model):
        checked = t.data_type in _ITEMSIZE or t.data_type == TensorProto.STRING
        if is_external(t) or t.HasField("segment") or not checked:
            continue
        if any(d < 0 for d in t.dims):
            problem = f"has a negative dimension {list(t.dims)}"
        else:
            count = int(np.prod(t.dims, dtype=np.int64))
            if t.HasField("raw_data"):
                need, got, unit = count * _ITEMSIZE.get(t.data_type, 0), len(t.raw_data), "bytes"
            else:
                field = onnx.helper.tensor_dtype_to_field(t.data_type)
                per = 2 if t.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128) else 1
                need, got, unit = count * per, len(getattr(t, field)), f"values in {field}"
            if t.data_type == TensorProto.STRING and t.HasField("raw_data"):
                problem = "is a string tensor with raw_data (strings go in string_data)"
            elif need == got:
                continue
            else:
                problem = (f"holds {got} {unit}, but a {list(t.dims)} "
                           f"{onnx.helper.tensor_dtype_to_string(t.data_type)} tensor needs {need}")
        raise ModelLoadError(f"{where}: tensor '{t.name}' {problem} (the file is damaged or was written wrongly; "
                             f"re-export the model)")


def check_text(model: onnx.ModelProto, where: str) -> None:
    """ModelLoadError naming the first string field of ``model`` that is not UTF-8 text."""
    bad = _not_text(model)
    if bad:
        raise ModelLoadError(f"{where}: {bad} is not UTF-8 text (the file is damaged or was written wrongly; "
                             f"re-export the model)")


def _not_text(message, where: str = "") -> str | None:
    """The first string field of ``message`` (recursively) that is not valid UTF-8, as a path of field names, or
    None. Tensors are checked by name only (their payload is bytes, and reading it would copy the weights)."""
    for field, value in message.ListFields():
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == 3
        values = list(value) if repeated else [value]
        name = f"{where}.{field.name}" if where else field.name
        if field.type == field.TYPE_STRING and any(isinstance(v, bytes) for v in values):
            return name
        if field.type != field.TYPE_MESSAGE:
            continue
        for i, item in enumerate(values):
            label = f"{name}[{i}]" if repeated else name
            if isinstance(item, TensorProto):
                if isinstance(item.name, bytes):
                    return f"{label}.name"
                continue
            found = _not_text(item, label)
            if found:
                return found
    return None


def graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph in it, depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from graphs(attr.g)
            for g in attr.graphs:
                yield from graphs(g)


def check_value_types(model: onnx.ModelProto, where: str) -> None:
    """ModelLoadError for a value whose type is present but empty; UnsupportedError for an opaque one."""
    for graph in graphs(model.graph):
        for vi in [*graph.input, *graph.output, *graph.value_info]:
            if not vi.HasField("type"):
                continue
            kind = vi.type.WhichOneof("value")
            if kind is None:
                raise ModelLoadError(f"{where}: value '{vi.name}' of graph '{graph.name}' has a type with nothing in "
                                     f"it (the file is damaged or was written wrongly; re-export the model)")
            if kind == "opaque_type":
                raise UnsupportedError(f"{where}: value '{vi.name}' of graph '{graph.name}' has an opaque type, "
                                       f"which graphopt cannot handle (give a model of tensors)")


"""Shape computations of an ONNX graph evaluated at compile time, by the ONNX spec.

onnx-graphsurgeon's own shape folding (``fold_constants(fold_shapes=True)``) ignores ``Shape``'s opset-15
``start`` / ``end`` (``Shape(x, start=1)`` folds to the whole shape, also under a ``Gather`` or ``Slice``) and
its "shape cast elision" rewrites ``Cast(int -> float) -> Mul(0.5) -> Cast(int)`` as an integer ``Mul`` by 0;
:func:`fold_shapes` is the replacement: call graphsurgeon with ``fold_shapes=False`` and this first. ``Shape``'s
``start`` / ``end`` and ``Gather``'s / ``Slice``'s negative and out-of-range indices follow the spec, which on one
axis is Python's slicing; an index out of range (an error at run time) is not folded.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.ops import is_standard_domain


def _is_constant(tensor) -> bool:
    return isinstance(tensor, gs.Constant)


def fold_shapes(graph, inferred: Callable[[str], tuple | None], activations: bool = True) -> int:
    """Replace by constants (:meth:`OnnxGraph.fold_to_constant`; returns how many) the shapes known at compile
    time: ``Shape`` / ``Size`` of an initializer, and with ``activations`` of any tensor whose shape (declared,
    or ``inferred(name)`` -> (dims, dtype) or None, e.g. from ONNX shape inference) is static in the dims
    read, and ``Gather`` / ``Slice`` of a ``Shape`` that pick static dims only (``Gather(Shape(x), 1)`` with a
    dynamic batch). The folded nodes are left disconnected (``cleanup()`` drops them)."""
    replaced = 0
    for node in graph.gs.nodes:
        if not node.outputs or not node.inputs or not is_standard_domain(node.domain):
            continue
        x = node.inputs[0]
        if not activations and not _is_constant(x):
            continue
        value = None
        if node.op == "Shape":
            value = _shape_vector(node, inferred)
        elif node.op == "Size":
            dims = _dims(x, inferred)
            value = None if dims is None or not _static(dims) else np.prod(dims, dtype=np.int64)
        elif node.op in ("Gather", "Slice") and len(x.inputs) == 1 and x.inputs[0].op == "Shape":
            dims = _shape_vector(x.inputs[0], inferred, static=False)
            if dims is not None:
                value = (_gather(dims, node) if node.op == "Gather" else _slice(dims, node, graph.opset))
        if value is not None:
            replaced += graph.fold_to_constant(node, np.asarray(value, dtype=np.int64))
    return replaced


def _static(dims) -> bool:
    return all(isinstance(d, int) and d >= 0 for d in dims)


def _dims(tensor, inferred) -> list | None:
    """The dims of ``tensor`` (ints; anything else is dynamic), or None when its rank is unknown."""
    if _is_constant(tensor):
        return list(tensor.values.shape)
    shape = tensor.shape if tensor.shape is not None else (inferred(tensor.name) or (None, None))[0]
    return None if shape is None else [d if isinstance(d, int) and d >= 0 else None for d in shape]


def _shape_vector(shape_node, inferred, static: bool = True) -> list | None:
    """The value of ``Shape(x, start, end)``: x's dims from start to end (None where dynamic; with ``static``,
    None unless every one is known)."""
    if not is_standard_domain(shape_node.domain):
        return None
    dims = _dims(shape_node.inputs[0], inferred)
    if dims is None:
        return None
    dims = dims[slice(int(shape_node.attrs.get("start", 0)), _opt_int(shape_node.attrs.get("end")))]
    return dims if not static or _static(dims) else None


def _opt_int(value):
    return None if value is None else int(value)


def _gather(dims: list, node):
    """``Gather(shape_vector, indices)`` when the indices are a constant and pick static dims in range."""
    if len(node.inputs) < 2 or not _is_constant(node.inputs[1]) or int(node.attrs.get("axis", 0)) not in (0, -1):
        return None
    indices = node.inputs[1].values
    if indices.dtype.kind not in "iu" or np.any(indices < -len(dims)) or np.any(indices >= len(dims)):
        return None
    picked = [dims[int(i)] for i in indices.reshape(-1)]
    return np.array(picked, dtype=np.int64).reshape(indices.shape) if _static(picked) else None


def _slice(dims: list, node, opset: int):
    """``Slice(shape_vector, starts, ends[, axes, steps])`` when its arguments are constants and the dims it
    keeps are static (a shape vector is 1-D: one start, end, step on axis 0)."""
    if opset < 10:
        starts, ends, axes = (node.attrs.get(k) for k in ("starts", "ends", "axes"))
        steps = None
    else:
        given = node.inputs[1:5]
        if any(t.name and not _is_constant(t) for t in given):
            return None
        starts, ends, axes, steps = ([t.values if t.name else None for t in given] + [None] * 4)[:4]
    starts, ends, axes, steps = (None if a is None else np.asarray(a).reshape(-1) for a in (starts, ends, axes, steps))
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    if axes is not None and (axes.size != 1 or int(axes[0]) not in (0, -1)):
        return None
    step = 1 if steps is None else int(steps[0]) if steps.size == 1 else 0
    if step == 0:
        return None
    kept = dims[slice(int(starts[0]), int(ends[0]), step)]
    return np.array(kept, dtype=np.int64) if _static(kept) else None

"""What a graph is, for checking what a pass claims about it: its interface and a digest of its content; and what
makes two tensors one weight (a tied embedding under two names).

The pass manager does not take a plugin's word for it: a pass from outside graphopt that says it changed nothing
is checked against :func:`digest` (structure and every weight), and one that says it left its input alone (a
functional pass) too; an exact pass must keep the model's :func:`interface` (what a caller feeds and reads).
"""

from __future__ import annotations

import hashlib

import numpy as np

from graphopt.ir.base import Graph


def digest(graph: Graph) -> str:
    """A hash of the graph's structure and weights: two graphs with the same digest are the same model (up to the
    order onnx-graphsurgeon / torch.fx write them in, which a pass that changes nothing keeps)."""
    h = hashlib.blake2b(digest_size=16)
    if graph.ir == "onnx":
        from graphopt.ir.gs_gaps import export_optional_types

        skeleton, values = graph._skeleton_graph()  # the structure, and the weights over 1 KB by name
        h.update(export_optional_types(skeleton).SerializeToString())
        for name in sorted(values):
            value = values[name]
            array = value.load() if hasattr(value, "load") else value  # external data: read to hash it
            h.update(name.encode())
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()
    import torch

    h.update(graph.gm.code.encode())
    tensors = dict(graph.gm.state_dict(keep_vars=True))
    for node in graph.gm.graph.nodes:  # constants the graph reads that are not parameters or buffers
        if node.op == "get_attr" and node.target not in tensors:
            value = graph.gm
            for part in str(node.target).split("."):
                value = getattr(value, part, None)
            if isinstance(value, torch.Tensor):
                tensors[node.target] = value
    for name in sorted(tensors):
        t = tensors[name].detach().cpu()
        t = (t.int_repr() if t.is_quantized else t).contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensors[name].shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def interface(graph: Graph) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """What a caller of an ONNX model feeds and reads: ``(inputs, outputs)`` as ``(name, dtype)`` (dtype ``?``
    where it is unknown). An FX graph's is not compared (capturing a module renames its placeholders): empty."""
    if graph.ir != "onnx":
        return [], []

    def pairs(tensors) -> list[tuple[str, str]]:
        return [(t.name, str(np.dtype(t.dtype)) if t.dtype is not None and _is_numpy(t.dtype) else "?")
                for t in tensors]

    return pairs(graph.gs.inputs), pairs(graph.gs.outputs)


def _is_numpy(dtype) -> bool:
    try:
        np.dtype(dtype)
    except TypeError:  # onnx types numpy lacks (bfloat16, float8)
        return False
    return True


def storage_key(t) -> tuple:
    """What makes two tensors one weight: the same memory, shape and strides (torch.export's module gives a tied
    weight one Parameter object per name, over one storage)."""
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else ("empty", id(t))


def retie(original, twin) -> None:
    """Parameters that share memory in module ``original`` share it in its deepcopy ``twin`` too (deepcopy does not
    keep that for Parameters)."""
    first: dict[tuple, object] = {}
    twins = dict(twin.named_parameters(remove_duplicate=False))
    for name, param in original.named_parameters(remove_duplicate=False):
        key = storage_key(param)
        if key not in first:
            first[key] = twins[name]
        elif twins[name] is not first[key]:
            owner, _, attr = name.rpartition(".")
            setattr(twin.get_submodule(owner) if owner else twin, attr, first[key])

"""The FX side of :mod:`graphopt.report.cost`: parameters and MACs per node of an :class:`FxGraph`, counted as that
module's docstring says, with shapes from running FX's ``ShapeProp`` on the graph's example inputs. Use
:func:`graphopt.report.cost.layer_costs`, which calls :func:`fx_costs` for an FX graph.
"""

from __future__ import annotations

from graphopt.ir.fx_ops import arg, get_attr, layer_call
from graphopt.ir.ops import OpKind
from graphopt.report.layer_cost import LayerCost, is_weight_dtype, numel

_MATMUL = ("matmul", "mm", "bmm", "__matmul__", "__rmatmul__")
_ADDMM = ("addmm", "baddbmm")
_SDPA = ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
         "_scaled_dot_product_cudnn_attention")


def fx_costs(graph) -> list[LayerCost]:
    """Every compute node of an FxGraph (``get_attr`` values and what is computed from them only excluded), in
    graph order, with its parameters, MACs and output shape."""
    import torch
    from torch.fx.passes.shape_prop import ShapeProp

    gm = graph.gm
    try:
        dynamic = [spec.shape[:1] == (None,) for spec in graph.input_specs()]
    except Exception:  # an input that is no tensor
        dynamic = []
    try:
        with torch.no_grad():  # per sample, as the ONNX count (a dynamic batch at 1), whatever the example's batch
            inputs = [(x[:1] if i < len(dynamic) and dynamic[i] else x).clone() if isinstance(x, torch.Tensor) else x
                      for i, x in enumerate(graph.example_inputs)]
            ShapeProp(gm).propagate(*inputs)  # on copies: a model may write to its inputs in place
    except Exception:  # a graph ShapeProp cannot run: the shapes already recorded, if any
        pass

    constant: set = set()  # nodes whose value needs no input: get_attr and what is computed from them only
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            constant.add(node)
        elif node.op in ("call_function", "call_method") and all(n in constant for n in node.all_input_nodes):
            constant.add(node)

    def params_of(node) -> int:
        if node not in constant:
            return 0
        if node.op == "get_attr":
            value = get_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                return value.numel() if is_weight_dtype(_np_dtype(value.dtype)) else 0
            return 0
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            return 0
        return numel(meta.shape) if is_weight_dtype(_np_dtype(meta.dtype)) else 0

    rows = []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or node in constant:
            continue
        if node.op == "call_module":
            params = sum(p.numel() for p in gm.get_submodule(node.target).parameters())
        else:
            params = sum(params_of(n) for n in dict.fromkeys(node.all_input_nodes))
        out = _fx_shape(node)
        rows.append(LayerCost(node.name, graph.op_name(node), int(params), int(_fx_macs(gm, node, out)),
                              tuple(out) if out is not None else None))
    return rows


def _np_dtype(torch_dtype):
    import torch

    try:
        return torch.empty((), dtype=torch_dtype).numpy().dtype
    except (TypeError, RuntimeError):  # bfloat16, float8: weights
        return None


def _fx_shape(arg) -> list | None:
    meta = getattr(arg, "meta", {}).get("tensor_meta") if hasattr(arg, "meta") else None
    shape = getattr(meta, "shape", None)
    return list(shape) if shape is not None else None


def _fx_key(gm, node) -> str:
    if node.op == "call_method":
        return node.target
    schema = getattr(node.target, "_schema", None)  # an ATen OpOverload (torch.export graphs)
    if schema is not None:
        return schema.name.split("::")[-1]
    return getattr(node.target, "__name__", str(node.target))


def _fx_macs(gm, node, out: list | None) -> int:
    from torch import nn

    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        x = _fx_shape(node.args[0]) if node.args else None
        if isinstance(mod, nn.modules.conv._ConvNd):
            w = list(mod.weight.shape)
            if mod.transposed:
                return numel(x) * numel(w[1:]) if x is not None else 0
            return numel(out) * numel(w[1:]) if out is not None else 0
        if isinstance(mod, nn.Linear):
            return numel(out) * mod.in_features if out is not None else 0
        if isinstance(mod, nn.Bilinear):
            return numel(out) * mod.in1_features * mod.in2_features if out is not None else 0
        return 0
    layer = layer_call(node)
    if layer is not None:
        kind, names = layer
        w = _fx_shape(arg(node, names, "weight"))
        if kind == OpKind.GEMM:
            return numel(out) * numel(w[-1:]) if out is not None and w else 0
        if not w:
            return 0
        if kind == OpKind.CONV_TRANSPOSE or (kind is None and bool(arg(node, names, "transposed"))):
            x = _fx_shape(arg(node, names, "input"))
            return numel(x) * numel(w[1:]) if x is not None else 0
        return numel(out) * numel(w[1:]) if out is not None else 0
    key = _fx_key(gm, node)
    if key in _MATMUL or key in _ADDMM:
        a = _fx_shape(arg(node, 1 if key in _ADDMM else 0, "mat1" if key == "addmm" else "input"))
        return numel(out) * numel(a[-1:]) if out is not None and a else 0
    if key in _SDPA:
        q, k, v = (_fx_shape(arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
        if q is None or k is None or v is None:
            return 0
        return numel(q[:-1]) * numel(k[-2:-1]) * (numel(q[-1:]) + numel(v[-1:]))
    return 0

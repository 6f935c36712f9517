"""ATen ops, as ``torch.export`` captures them, shown to the pruning engine like their ``torch.nn`` counterparts.

Where ``symbolic_trace`` fails (Python control flow on shapes, ...) FxGraph captures a module with ``torch.export``:
every op is a ``call_function`` on an ATen overload (``aten.conv2d.default(x, weight, bias, stride, padding,
dilation, groups)``) and parameters are ``get_attr`` nodes under their qualified names, so the adapter slices them
as it does a module's. :data:`OPS` names each known op in ONNX's vocabulary, keyed by ``"packet.overload"`` or by
the packet alone for every overload (conv, conv_transpose and linear come from :mod:`graphopt.ir.fx_ops`); arguments
are read through the op's schema. Applying a plan rewrites arguments instead of module attributes: ``groups`` of a
conv, the size list of ``view``/``reshape``, the sizes of a split (``chunk`` and ``split`` become
``split_with_sizes``), the bounds of a ``slice``, and the ``normalized_shape`` of a ``layer_norm`` whose weight
shrank.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt.ir import fx_ops
from graphopt.ir.fx_graph import _torch
from graphopt.ir.fx_ops import get_attr, layer_call, layer_params
from graphopt.ir.ops import OpKind
from graphopt.prune.view import PNode

torch = _torch()
aten = torch.ops.aten

_UNARY = (
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "silu", "silu_", "gelu", "sigmoid", "sigmoid_", "tanh",
    "tanh_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "leaky_relu", "leaky_relu_", "elu", "elu_",
    "mish", "softplus", "exp", "sqrt", "rsqrt", "abs", "neg", "erf", "clone", "contiguous", "alias", "detach",
    "lift_fresh_copy", "dropout", "feature_dropout", "to", "_to_copy", "type_as", "softmax", "_softmax", "log_softmax",
    "_log_softmax", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "max_pool1d_with_indices",
    "max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "clamp.default", "clamp_.default", "pow.Tensor_Scalar",
)  # pooling with indices returns (values, indices): the values carry the channels
OPS: dict[str, str] = {
    **{name: "Unary" for name in _UNARY},
    **{name: "Add" for name in ("add", "add_")}, **{name: "Sub" for name in ("sub", "sub_", "rsub")},
    **{name: "Mul" for name in ("mul", "mul_")}, **{name: "Div" for name in ("div", "div_")},
    "pow.Tensor_Tensor": "Pow", "maximum": "Max", "minimum": "Min", "where.self": "Where",
    "matmul": "MatMul", "mm": "MatMul", "bmm": "MatMul",
    "batch_norm": "BatchNormalization", "_native_batch_norm_legit_no_training": "BatchNormalization",
    "layer_norm": "LayerNormalization", "native_layer_norm": "LayerNormalization", "embedding": "Gather",
    "group_norm": "GroupNorm", "scaled_dot_product_attention": "ScaledDotProductAttention",
    "cat": "Concat", "concat": "Concat", "view": "Reshape", "reshape": "Reshape", "_unsafe_view": "Reshape",
    **{name: "Flatten" for name in ("flatten", "unsqueeze", "squeeze")},
    **{name: "Transpose" for name in ("permute", "transpose", "t")},
    "mean": "ReduceMean", "sum": "ReduceSum", "amax": "ReduceMax", "amin": "ReduceMin",
    **{name: "Split" for name in ("split", "split_with_sizes", "chunk")},
    "slice.Tensor": "Slice", "select.int": "Gather", "pad": "Pad", "constant_pad_nd": "Pad",
}
_LAYERS = {OpKind.CONV: "Conv", OpKind.CONV_TRANSPOSE: "ConvTranspose", OpKind.GEMM: "Linear", None: "Conv"}
_ARITY = {"Where": 3}  # elementwise ops read their first two arguments unless listed
_INT64_MAX = 2 ** 63 - 1


def op_of(target) -> str | None:
    """The op name of an ATen overload, None for anything else (or an ATen op this table does not know)."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    layer = layer_params(target)  # conv, conv_transpose, linear: graphopt.ir.fx_ops knows them
    if layer is not None:
        return _LAYERS[layer[0]]
    packet = target.overloadpacket.__name__
    return OPS.get(f"{packet}.{target._overloadname}", OPS.get(packet))


def _names(node) -> tuple[str, ...]:
    return tuple(a.name for a in node.target._schema.arguments)


def arg(node, name: str, default: Any = None) -> Any:
    """Argument ``name`` of an ATen call, positional or keyword, else ``default``."""
    return fx_ops.arg(node, _names(node), name, default)


def set_arg(node, name: str, value: Any) -> None:
    fx_ops.set_arg(node, _names(node), name, value)


def _outputs(node) -> list[str]:
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape"):  # a tuple of tensors
        return [f"{node.name}[{i}]" for i in range(len(meta))]
    return [node.name]


def describe(fx, node) -> PNode | None:
    """``node`` (a ``call_function`` on an ATen overload) as a PNode; None when :data:`OPS` does not know it."""
    op = op_of(node.target)
    if op is None:
        return None
    val = lambda a, i=0: fx._value(a, node.name, i)  # noqa: E731
    const = lambda suffix, values: _const(fx, f"{node.name}#{suffix}", values)  # noqa: E731
    name, out, x = node.name, _outputs(node), val(node.args[0])
    packet = node.target.overloadpacket.__name__
    rank = len(fx.shapes.get(x) or ())
    if op == "Unary":
        return PNode(name, op, [x], out)
    if op in ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where"):
        return PNode(name, op, [val(a, i) for i, a in enumerate(node.args[:_ARITY.get(op, 2)])], out)
    if op in ("Conv", "ConvTranspose"):
        op = _LAYERS[layer_call(node)[0]]  # aten.convolution: by its ``transposed`` argument
        return PNode(name, op, [x, val(arg(node, "weight"), 1), val(arg(node, "bias"), 2)], out,
                     {"group": int(arg(node, "groups", 1))})
    if op == "Linear":
        return PNode(name, op, [x, val(arg(node, "weight"), 1), val(arg(node, "bias"), 2)], out)
    if op == "MatMul":
        return PNode(name, op, [x, val(node.args[1], 1)], out)
    if op == "BatchNormalization":
        return PNode(name, op, [x, *(val(arg(node, k), i + 1) for i, k in enumerate(
            ("weight", "bias", "running_mean", "running_var")))], out)
    if op == "LayerNormalization":
        if arg(node, "weight") is None:
            return PNode(name, packet, [x], out)  # normalized_shape could not follow the channels: no handler
        return PNode(name, op, [x, val(arg(node, "weight"), 2), val(arg(node, "bias"), 3)], out,
                     {"axis": -len(arg(node, "normalized_shape"))})
    if op == "GroupNorm":
        if arg(node, "weight") is None:
            return PNode(name, packet, [x], out)
        return PNode(name, op, [x, val(arg(node, "weight"), 2), val(arg(node, "bias"), 3)], out,
                     {"num_groups": int(arg(node, "num_groups"))})
    if op == "ScaledDotProductAttention":
        mask = arg(node, "attn_mask")
        return PNode(name, op, [x, val(arg(node, "key"), 1), val(arg(node, "value"), 2),
                                *([val(mask, 3)] if mask is not None else [])], out, {"scale": arg(node, "scale")})
    if op == "Gather":
        if packet == "embedding":
            return PNode(name, op, [x, val(node.args[1], 1)], out, {"axis": 0})
        return PNode(name, op, [x, val(arg(node, "index"), 1)], out, {"axis": arg(node, "dim")})
    if op == "Concat":
        return PNode(name, op, [val(a, i) for i, a in enumerate(node.args[0])], out, {"axis": arg(node, "dim", 0)})
    if op == "Reshape":
        target = [d if isinstance(d, int) else 0 for d in node.args[1]]  # 0: a size computed at run time
        return PNode(name, op, [x, const("shape", target)], out)
    if op == "Flatten":
        return PNode(name, op, [x], out)
    if op == "Transpose":
        if packet == "permute":
            perm = list(arg(node, "dims"))
        else:
            perm = list(range(rank))
            if packet == "transpose":
                a, b = arg(node, "dim0") % rank, arg(node, "dim1") % rank
                perm[a], perm[b] = perm[b], perm[a]
            else:
                perm.reverse()
        return PNode(name, op, [x], out, {"perm": [p % rank for p in perm]})
    if op.startswith("Reduce"):
        dims = arg(node, "dim")
        return PNode(name, op, [x], out, {"axes": [dims] if isinstance(dims, int) else (list(dims) if dims else None),
                                          "keepdims": int(bool(arg(node, "keepdim", False)))})
    if op == "Split":
        return PNode(name, op, [x], out, {"axis": arg(node, "dim", 0)})
    if op == "Slice":
        bounds = (arg(node, "start", 0), arg(node, "end", _INT64_MAX), arg(node, "step", 1))
        if not all(isinstance(b, int) or b is None for b in bounds):
            return PNode(name, packet, [x], out)  # bounds computed at run time
        start, end, step = (d if b is None else b for b, d in zip(bounds, (0, _INT64_MAX, 1)))
        return PNode(name, op, [x, const("starts", [start]), const("ends", [min(end, _INT64_MAX)]),
                                const("axes", [arg(node, "dim", 0)]), const("steps", [step])], out)
    if op == "Pad":
        pad = list(arg(node, "pad"))
        if not all(isinstance(p, int) for p in pad) or arg(node, "value") not in (None, 0, 0.0):
            return PNode(name, packet, [x], out)
        onnx_pads = [0] * (2 * rank)  # torch: (begin, end) pairs from the last axis; ONNX: all begins, all ends
        for i in range(len(pad) // 2):
            onnx_pads[rank - 1 - i], onnx_pads[2 * rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
        return PNode(name, op, [x, const("pads", onnx_pads)], out)
    raise AssertionError(f"no description for ATen op '{op}'")  # pragma: no cover - OPS and the branches agree


def _const(fx, name: str, values: list[int]) -> str:
    fx.consts[name] = np.array(values, dtype=np.int64)
    fx.shapes[name] = (len(values),)
    return name


# -- applying a plan ----------------------------------------------------------------------------------------------
def apply_edit(node, key: str, value: Any) -> bool:
    """Rewrite the arguments of ATen call ``node`` for plan edit ``key``; False for an edit it does not know."""
    if key == "group":
        set_arg(node, "groups", int(value))
    elif key == "shape":
        size_arg = node.target._schema.arguments[1].name
        set_arg(node, size_arg, [int(v) if isinstance(d, int) else d for d, v in zip(node.args[1], value)])
    elif key == "split":
        x, dim = node.args[0], arg(node, "dim", 0)
        node.target = aten.split_with_sizes.default
        node.args, node.kwargs = (x, [int(v) for v in value], dim), {}
    elif key == "slice":
        starts, ends = value
        set_arg(node, "start", int(starts[0]))
        set_arg(node, "end", int(ends[0]))
    elif key == "scale":
        set_arg(node, "scale", float(value))
    else:
        return False
    return True


def fix_sizes(gm) -> None:
    """Size arguments that describe parameter shapes, after the parameters were sliced (``layer_norm``)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and op_of(node.target) == "LayerNormalization":
            weight = arg(node, "weight")
            if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
                set_arg(node, "normalized_shape", list(get_attr(gm, weight.target).shape))

"""What graphopt knows of torch.fx calls, in one place: the layer calls (conv, conv_transpose, linear) with their
kind and parameter names, how to read and write an argument of a call, and how to read what a ``get_attr`` names.

A layer call is a ``call_function`` on ``torch.nn.functional`` (``F.conv2d``, ``F.conv_transpose2d``, ``F.linear``,
what ``symbolic_trace`` records) or on an ATen op (``aten.conv2d.default``, ``aten.conv_transpose2d.input``,
``aten.convolution.default``, ``aten.linear.default``, ..., what ``torch.export`` records; every overload of the op,
whose leading parameters are the same). ``aten.convolution`` / ``aten._convolution`` are a Conv or a ConvTranspose
by their ``transposed`` argument. torch is imported only when a table is first needed (the ONNX route never is).
"""

from __future__ import annotations

import functools
from typing import Any

from graphopt.ir.ops import OpKind

# Parameter names, in order, of each kind of layer call (F.* and ATen agree).
CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
CONV_TRANSPOSE = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
CONVOLUTION = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
LINEAR = ("input", "weight", "bias")


@functools.cache
def _layer_calls() -> dict:
    """Function or ATen op packet -> (kind, parameter names); kind None: by the ``transposed`` argument."""
    import torch

    F, aten = torch.nn.functional, torch.ops.aten
    calls: dict = {}
    for d in "123":
        calls[getattr(F, f"conv{d}d")] = calls[getattr(aten, f"conv{d}d")] = (OpKind.CONV, CONV)
        calls[getattr(F, f"conv_transpose{d}d")] = calls[getattr(aten, f"conv_transpose{d}d")] = (
            OpKind.CONV_TRANSPOSE, CONV_TRANSPOSE)
    calls[aten.convolution] = calls[aten._convolution] = (None, CONVOLUTION)
    calls[F.linear] = calls[aten.linear] = (OpKind.GEMM, LINEAR)
    return calls


def layer_params(target) -> tuple[OpKind | None, tuple[str, ...]] | None:
    """``(kind, parameter names)`` of a conv / conv_transpose / linear function or ATen overload (kind CONV,
    CONV_TRANSPOSE or GEMM; None for ``aten.convolution``, which its ``transposed`` argument decides); None for
    any other target."""
    target = getattr(target, "overloadpacket", target)  # an ATen OpOverload: every overload of the op
    try:
        return _layer_calls().get(target)
    except TypeError:  # an unhashable target
        return None


def layer_call(node) -> tuple[OpKind | None, tuple[str, ...]] | None:
    """``(kind, parameter names)`` of a ``call_function`` conv / conv_transpose / linear node, ``aten.convolution``
    resolved from its ``transposed`` argument (kind None where that is not a constant bool); None for any other
    node."""
    layer = layer_params(node.target) if getattr(node, "op", None) == "call_function" else None
    if layer is None or layer[0] is not None:
        return layer
    transposed = arg(node, layer[1], "transposed")
    if not isinstance(transposed, bool):
        return layer
    return (OpKind.CONV_TRANSPOSE if transposed else OpKind.CONV), layer[1]


def _position(names: tuple[str, ...] | int, name: str) -> int | None:
    if isinstance(names, int):
        return names
    return names.index(name) if name in names else None


def arg(node, names: tuple[str, ...] | int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of call ``node``: positional, at its place in ``names`` (the callee's parameter names in
    order, or that place as an int), else keyword, else ``default``."""
    i = _position(names, name)
    if i is not None and i < len(node.args):
        return node.args[i]
    return node.kwargs.get(name, default)


def set_arg(node, names: tuple[str, ...] | int, name: str, value: Any) -> None:
    """Set argument ``name`` of call ``node`` (``names`` as for :func:`arg`): in place where it is given
    positionally, else as a keyword."""
    i = _position(names, name)
    if i is not None and i < len(node.args):
        node.args = (*node.args[:i], value, *node.args[i + 1:])
    else:
        node.update_kwarg(name, value)


def get_attr(gm, target: str) -> Any:
    """What a ``get_attr`` node of ``target`` (a dotted path: ``layer1.0.conv.weight``) reads in module ``gm``: a
    parameter, buffer, constant or submodule; None where the path names nothing."""
    value = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


# -- ATen ops in ONNX's op vocabulary (quantization schemes name ONNX op types) ---------------------------------
# ATen packet name -> ONNX op type, for the ops a quantization scheme can name. Conv / ConvTranspose / Gemm come
# from the layer table above (``aten.linear`` is a Gemm with ``transB=1``: its weight is (out, in)).
_ATEN_ONNX = {
    "add": "Add", "add_": "Add", "mul": "Mul", "mul_": "Mul", "sub": "Sub", "div": "Div",
    "matmul": "MatMul", "mm": "MatMul", "bmm": "MatMul",
    "relu": "Relu", "relu_": "Relu", "hardtanh": "Clip", "hardtanh_": "Clip", "clamp": "Clip", "relu6": "Clip",
    "hardswish": "HardSwish", "hardswish_": "HardSwish", "sigmoid": "Sigmoid", "silu": "Silu", "gelu": "Gelu",
    "tanh": "Tanh", "leaky_relu": "LeakyRelu", "softmax": "Softmax", "_softmax": "Softmax",
    "max_pool1d": "MaxPool", "max_pool2d": "MaxPool", "max_pool3d": "MaxPool",
    "avg_pool1d": "AveragePool", "avg_pool2d": "AveragePool", "avg_pool3d": "AveragePool",
    "adaptive_avg_pool1d": "GlobalAveragePool", "adaptive_avg_pool2d": "GlobalAveragePool",
    "mean": "ReduceMean", "flatten": "Flatten", "view": "Reshape", "reshape": "Reshape", "_unsafe_view": "Reshape",
    "permute": "Transpose", "transpose": "Transpose", "t": "Transpose", "cat": "Concat", "concat": "Concat",
    "layer_norm": "LayerNormalization", "native_layer_norm": "LayerNormalization",
    "batch_norm": "BatchNormalization", "_native_batch_norm_legit_no_training": "BatchNormalization",
    "embedding": "Gather", "scaled_dot_product_attention": "Attention", "dropout": "Dropout",
}
_LAYER_ONNX = {OpKind.CONV: "Conv", OpKind.CONV_TRANSPOSE: "ConvTranspose", OpKind.GEMM: "Gemm"}


def aten_name(node) -> str:
    """The name of the ATen op a ``call_function`` node calls, every overload alike (``conv2d``, ``batch_norm``,
    ``quantize_per_tensor``); "" for any other node."""
    if getattr(node, "op", None) != "call_function":
        return ""
    return getattr(getattr(node.target, "overloadpacket", None), "__name__", "")


def computes_float(node) -> bool:
    """Whether ``node`` is a graph input or a ``call_function`` whose recorded value (``meta["val"]``, as
    torch.export records it) is a float tensor: an activation quantization can observe."""
    if getattr(node, "op", None) not in ("placeholder", "call_function"):
        return False
    import torch

    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def onnx_op_type(node) -> str | None:
    """The ONNX op type of a ``call_function`` node on an ATen op (``aten.conv2d`` -> ``"Conv"``,
    ``aten.linear`` -> ``"Gemm"``, ``aten.max_pool2d`` -> ``"MaxPool"``, ...); None for anything else. A
    ``max_pool2d_with_indices`` or an ``adaptive_avg_pool2d`` to a size other than 1 is None (no ONNX twin)."""
    if getattr(node, "op", None) != "call_function":
        return None
    layer = layer_call(node)
    if layer is not None:
        return _LAYER_ONNX.get(layer[0])
    packet = aten_name(node)
    if not packet or getattr(node.target, "namespace", None) != "aten":
        return None
    op = _ATEN_ONNX.get(packet)
    if op == "GlobalAveragePool":
        size = node.args[1] if len(node.args) > 1 else None
        if not (isinstance(size, (list, tuple)) and all(s == 1 for s in size)):
            return "AdaptiveAveragePool"
    return op

"""Deliberately broken Q/DQ graphs for the TensorRT placement checker, one (or more) per rule, each with its
correct twin; written before the rules.

Every case is a small model built with ``onnx.helper``: ``CASES[name] = (build, planted)`` where ``build()`` returns
the ModelProto and ``planted`` the set of ``(rule id, node name)`` findings the checker must report on it, exactly
(an empty set: the correct twin, on which nothing may be reported). The base block is what TensorRT fuses: a
symmetric int8 per-tensor Q/DQ on the activation, an int8 per-channel weight (axis 0) behind a DequantizeLinear,
the Conv's output left float; 16 channels, so ModelOpt's small-channel exclusion does not apply.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)
C = 16  # channels of the base block


class Net:
    """A graph under construction: ``add`` a node, ``qdq`` a tensor, ``weight`` an int8 initializer behind a DQ."""

    def __init__(self, opset: int = 13):
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.opset = opset

    def input(self, name: str, shape, dtype=TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def add(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def qdq(self, x: str, name: str, scale=0.05, zero=0, dtype=np.int8) -> str:
        """``x`` through QuantizeLinear ``<name>_q`` and DequantizeLinear ``<name>_dq`` (per tensor)."""
        s = self.const(f"{name}_scale", np.float32(scale))
        z = self.const(f"{name}_zero", np.asarray(zero, dtype))
        q = self.add("QuantizeLinear", [x, s, z], f"{name}_q")
        return self.add("DequantizeLinear", [q, s, z], f"{name}_dq")

    def weight(self, name: str, shape, axis: int | None = 0, low: int = -127, values=None) -> str:
        """An int8 weight of ``shape`` behind DequantizeLinear ``<name>_dq``: one scale per index of ``axis``
        (None: one scale for the tensor)."""
        q = values if values is not None else RNG.integers(low, 128, size=shape).astype(np.int8)
        self.const(f"{name}_int8", q)
        if axis is None:
            scale, zero, attrs = np.float32(0.01), np.int8(0), {}
        else:
            n = shape[axis]
            scale, zero, attrs = np.full(n, 0.01, np.float32), np.zeros(n, np.int8), {"axis": axis}
        self.const(f"{name}_scale", scale)
        self.const(f"{name}_zero", zero)
        return self.add("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero"], f"{name}_dq", **attrs)

    def conv(self, x: str, name: str, cin: int = C, cout: int = C, k: int = 3, axis: int | None = 0,
             int32_bias: bool = False, **kw) -> str:
        w = self.weight(f"{name}_w", (cout, cin, k, k), axis=axis, **kw)
        if int32_bias:  # onnxruntime's form: int32 with scale input scale x weight scale, behind a DQ
            b = self.const(f"{name}_b_int32", RNG.integers(-500, 500, size=cout).astype(np.int32))
            s = self.const(f"{name}_b_scale", np.full(cout, 0.05 * 0.01, np.float32))
            z = self.const(f"{name}_b_zero", np.zeros(cout, np.int32))
            b = self.add("DequantizeLinear", [b, s, z], f"{name}_b_dq", axis=0)
        else:
            b = self.const(f"{name}_b", RNG.standard_normal(cout).astype(np.float32) * 0.1)
        return self.add("Conv", [x, w, b], name, pads=[k // 2] * 4)

    def output(self, x: str) -> None:
        self.outputs.append(x)

    def model(self, extra_domains: dict | None = None, outputs: dict | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "case", self.inputs, [], self.inits)
        opsets = [helper.make_opsetid("", self.opset),
                  *(helper.make_opsetid(d, v) for d, v in (extra_domains or {}).items())]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 8
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
        model.graph.output.extend(inferred[name] for name in self.outputs)
        for name, (dtype, shape) in (outputs or {}).items():  # outputs of ops onnx cannot infer (contrib domains)
            model.graph.output.append(helper.make_tensor_value_info(name, dtype, shape))
        if not extra_domains:
            onnx.checker.check_model(model)
        return model


def _conv_block(net: Net, x: str, name: str = "conv", act: str | None = None, **kw) -> str:
    return net.conv(net.qdq(x, act or f"{name}_in"), name, **kw)


# -- the correct base block and its broken variants ---------------------------------------------------------------
def good_conv():
    net = Net()
    x = net.input("x", [1, C, 8, 8])
    net.output(net.add("Relu", [_conv_block(net, x)], "relu"))
    return net.model()


def float_conv():
    """A Conv left float on purpose (no Q/DQ at all): an exclusion, not a finding."""
    net = Net()
    x = net.input("x", [1, C, 8, 8])
    w = net.const("w", RNG.standard_normal((C, C, 3, 3)).astype(np.float32))
    net.output(net.add("Conv", [x, w], "conv", pads=[1, 1, 1, 1]))
    return net.model()


def nonzero_zero_point():
    net = Net()
    x = net.input("x", [1, C, 8, 8])
    net.output(net.conv(net.qdq(x, "conv_in", zero=3), "conv"))
    return net.model()


def uint8_activation():
    net = Net()
    x = net.input("x", [1, C, 8, 8])
    net.output(net.conv(net.qdq(x, "conv_in", zero=0, dtype=np.uint8), "conv"))
    return net.model()


def negative_scale():
    net = Net()
    x = net.input("x", [1, C, 8, 8])
    net.output(net.conv(net.qdq(x, "conv_in", scale=-0.05), "conv"))
    return net.model()


def per_tensor_weight():
    net = Net()
    x = net.input("x", [1, C, 8, 8])
    net.output(_conv_block(net, x, axis=None))
    return net.model()


def wrong_axis_conv():
    net = Net()
    x = net.input("x", [1, C, 8, 8])
    net.output(_conv_block(net, x, axis=1))
    return net.model()


def _gemm(axis: int):
    net = Net()
    x = net.input("x", [4, 32])
    w = net.weight("fc_w", (C, 32), axis=axis)  # transB=1: (N, K), the output channels on axis 0
    net.output(net.add("Gemm", [net.qdq(x, "fc_in"), w], "fc", transB=1))
    return net.model()


def good_gemm_transb():
    return _gemm(0)


def wrong_axis_gemm_transb():
    return _gemm(1)


def good_matmul():
    net = Net()
    x = net.input("x", [4, 32])
    w = net.weight("mm_w", (32, C), axis=1)  # MatMul: the last axis
    net.output(net.add("MatMul", [net.qdq(x, "mm_in"), w], "mm"))
    return net.model()


def weight_out_of_range():
    net = Net()
    x = net.input("x", [1, C, 8, 8])
    values = RNG.integers(-100, 100, size=(C, C, 3, 3)).astype(np.int8)
    values[3, 0, 1, 1] = -128
    net.output(_conv_block(net, x, values=values))
    return net.model()


def int32_bias():
    net = Net()
    x = net.input("x", [1, C, 8, 8])
    net.output(_conv_block(net, x, int32_bias=True))
    return net.model()


def input_without_qdq():
    """A Conv with an int8 weight but a float activation: half-quantized."""
    net = Net()
    x = net.input("x", [1, C, 8, 8])
    net.output(net.conv(x, "conv"))
    return net.model()


def _residual(quantize_skip: bool):
    net = Net()
    x = net.input("x", [1, C, 8, 8])
    y = _conv_block(net, x)
    skip = net.qdq(x, "skip") if quantize_skip else x
    net.output(net.add("Relu", [net.add("Add", [y, skip], "add")], "relu"))
    return net.model()


def good_residual():
    return _residual(True)


def float_residual():
    """Conv output + a float residual: the residual is not quantized, so the conv's output stays float."""
    return _residual(False)


def dq_plus_float():
    """An Add of a dequantized tensor and a float one that no weighted op writes: nothing to fuse it into."""
    net = Net()
    x = net.input("x", [1, C, 8, 8])
    y = net.add("Sigmoid", [x], "gate")
    net.output(net.add("Add", [net.qdq(x, "a"), y], "add"))
    return net.model()


def _padded(qdq_first: bool, op: str = "Pad"):
    net = Net()
    x = net.input("x", [1, C, 8, 8])
    if op == "Pad":
        pads = net.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
        move = lambda t: net.add("Pad", [t, pads], "pad")  # noqa: E731
    else:
        move = lambda t: net.add("Transpose", [t], "transpose", perm=[0, 1, 3, 2])  # noqa: E731
    t = move(net.qdq(x, "conv_in")) if qdq_first else net.qdq(move(x), "conv_in")
    net.output(net.conv(t, "conv", k=3 if op != "Pad" else 3))
    return net.model()


def good_pad_conv():
    return _padded(True)


def qdq_between_pad_and_conv():
    return _padded(False)


def good_transpose_conv():
    return _padded(True, "Transpose")


def qdq_between_transpose_and_conv():
    return _padded(False, "Transpose")


def _concat(scales):
    net = Net()
    a, b = net.input("a", [1, C, 8, 8]), net.input("b", [1, C, 8, 8])
    cat = net.add("Concat", [net.qdq(a, "a", scale=scales[0]), net.qdq(b, "b", scale=scales[1])], "cat", axis=1)
    net.output(net.conv(net.qdq(cat, "conv_in", scale=max(scales)), "conv", cin=2 * C))
    return net.model()


def good_concat():
    return _concat((0.05, 0.05))


def concat_different_scales():
    return _concat((0.02, 0.05))


def dangling_q():
    """A QuantizeLinear nobody dequantizes (left over from an edit)."""
    net = Net()
    x = net.input("x", [1, C, 8, 8])
    y = _conv_block(net, x)
    s, z = net.const("left_scale", np.float32(0.05)), net.const("left_zero", np.int8(0))
    net.add("QuantizeLinear", [y, s, z], "left_q")
    net.output(y)
    return net.model()


def dq_of_int8_input():
    """A DequantizeLinear of an int8 graph input: TensorRT takes int8 only from a QuantizeLinear."""
    net = Net()
    x = net.input("x", [1, C, 8, 8], TensorProto.INT8)
    s, z = net.const("x_scale", np.float32(0.05)), net.const("x_zero", np.int8(0))
    net.output(net.conv(net.add("DequantizeLinear", [x, s, z], "x_dq"), "conv"))
    return net.model()


def quantized_output():
    net = Net()
    x = net.input("x", [1, C, 8, 8])
    net.output(net.qdq(_conv_block(net, x), "out"))
    return net.model()


def _softmax(qdq: bool):
    net = Net()
    x = net.input("x", [4, 32])
    net.output(net.add("Softmax", [net.qdq(x, "sm_in") if qdq else x], "softmax", axis=-1))
    return net.model()


def good_softmax():
    return _softmax(False)


def qdq_before_softmax():
    return _softmax(True)


def qdq_before_layernorm():
    net = Net(opset=17)
    x = net.input("x", [4, 32])
    g, b = net.const("ln_g", np.ones(32, np.float32)), net.const("ln_b", np.zeros(32, np.float32))
    net.output(net.add("LayerNormalization", [net.qdq(x, "ln_in"), g, b], "ln", axis=-1))
    return net.model()


def small_conv():
    net = Net()
    x = net.input("x", [1, 4, 8, 8])
    h = net.add("Relu", [x], "pre")  # not reading the graph input: ModelOpt's first-layer exception is off
    net.output(net.conv(net.qdq(h, "conv_in"), "conv", cin=4, cout=4))
    return net.model()


def _matmul_rows(rows: int, n: int = 32):
    net = Net()
    x = net.input("x", [rows, 64])
    w = net.weight("mm_w", (64, n), axis=1)
    net.output(net.add("MatMul", [net.qdq(x, "mm_in"), w], "mm"))
    return net.model()


def good_gemm_rows():
    return _matmul_rows(8)


def gemv():
    return _matmul_rows(1)


def small_gemm():
    """N = 8 output columns: under the 16 int8 tensor-core kernels need."""
    return _matmul_rows(8, n=8)


# name -> (builder, planted findings {(rule id, node name)}); an empty set is a correct twin
def dynamic_int8_matmul():
    """int8-dynamic's form: DynamicQuantizeLinear + MatMulInteger (onnxruntime's integer ops), and an int4 MatMulNBits
    (its com.microsoft contrib op): none has an importer in TensorRT's parser."""
    net = Net()
    x = net.input("x", [4, C])
    net.nodes.append(helper.make_node("DynamicQuantizeLinear", [x], ["xq", "xs", "xz"], name="dql"))
    w = net.const("w_int8", RNG.integers(-127, 128, size=(C, C)).astype(np.int8))
    acc = net.add("MatMulInteger", ["xq", w, "xz"], "mmi")
    net.output(acc)
    packed = net.const("w4", RNG.integers(0, 255, size=(C, 1, 8)).astype(np.uint8))
    scales = net.const("w4_scale", np.full((C,), 0.01, np.float32))
    net.nodes.append(helper.make_node("MatMulNBits", [x, packed, scales], ["nbits_out"], name="nbits",
                                      domain="com.microsoft", K=C, N=C, bits=4, block_size=16))
    return net.model(extra_domains={"com.microsoft": 1}, outputs={"nbits_out": (TensorProto.FLOAT, [4, C])})


CASES = {
    "good_conv": (good_conv, set()),
    "float_conv": (float_conv, set()),
    "nonzero_zero_point": (nonzero_zero_point, {("zero-point", "conv_in_q"), ("zero-point", "conv_in_dq")}),
    "uint8_activation": (uint8_activation, {("uint8", "conv_in_q"), ("uint8", "conv_in_dq")}),
    "negative_scale": (negative_scale, {("scale-not-positive", "conv_in_q"), ("scale-not-positive", "conv_in_dq")}),
    "per_tensor_weight": (per_tensor_weight, {("weight-per-tensor", "conv")}),
    "wrong_axis_conv": (wrong_axis_conv, {("weight-axis", "conv")}),
    "good_gemm_transb": (good_gemm_transb, set()),
    "wrong_axis_gemm_transb": (wrong_axis_gemm_transb, {("weight-axis", "fc")}),
    "good_matmul": (good_matmul, set()),
    "weight_out_of_range": (weight_out_of_range, {("weight-range", "conv_w_dq")}),
    "int32_bias": (int32_bias, {("int32-bias", "conv_b_dq")}),
    "input_without_qdq": (input_without_qdq, {("input-not-quantized", "conv")}),
    "good_residual": (good_residual, set()),
    "float_residual": (float_residual, {("residual-not-quantized", "add")}),
    "dq_plus_float": (dq_plus_float, {("residual-not-quantized", "add")}),
    "good_pad_conv": (good_pad_conv, set()),
    "qdq_between_pad_and_conv": (qdq_between_pad_and_conv, {("qdq-after-pad", "conv_in_q")}),
    "good_transpose_conv": (good_transpose_conv, set()),
    "qdq_between_transpose_and_conv": (qdq_between_transpose_and_conv, {("qdq-after-pad", "conv_in_q")}),
    "good_concat": (good_concat, set()),
    "concat_different_scales": (concat_different_scales, {("concat-scales", "cat")}),
    "dangling_q": (dangling_q, {("unpaired-qdq", "left_q")}),
    "dq_of_int8_input": (dq_of_int8_input, {("unpaired-qdq", "x_dq")}),
    "quantized_output": (quantized_output, {("quantized-output", "out_dq")}),
    "good_softmax": (good_softmax, set()),
    "qdq_before_softmax": (qdq_before_softmax, {("float-op-qdq", "softmax")}),
    "qdq_before_layernorm": (qdq_before_layernorm, {("float-op-qdq", "ln")}),
    "small_conv": (small_conv, {("small-conv", "conv")}),
    "good_gemm_rows": (good_gemm_rows, set()),
    "gemv": (gemv, {("gemv", "mm")}),
    "small_gemm": (small_gemm, {("gemv", "mm")}),
    "dynamic_int8_matmul": (dynamic_int8_matmul, {("no-importer", "dql"), ("no-importer", "mmi"),
                                                  ("no-importer", "nbits")}),
}

"""Random *valid* ONNX graphs (opset 17) of the ops graphopt supports, built forward with every shape tracked.

One builder, two sources of choices: :func:`onnx_graphs` is a hypothesis strategy (a failure shrinks to a small
graph), :func:`random_graph` draws the same choices from a seeded numpy generator (the robustness benchmark,
``benchmarks/bench_random_graphs.py``, which needs 1,000 graphs from one seed without hypothesis' search).
Structure comes from the choices; weight *values* from a numpy generator seeded by one drawn integer, so
shrinking works on structure and the weights stay a few bytes of the example.

The graph is a chain of blocks over a current value, 4-D (N, C, H, W) or 2-D (N, F); the batch stays on axis 0
(a Transpose permutes the other axes only), so a graph with a dynamic batch (``N``) runs for any batch size.
Blocks: Conv (groups, strides, pads, dilations), ConvTranspose, BatchNormalization (4-D and 2-D), Relu / Clip /
Sigmoid / LeakyRelu, MaxPool / AveragePool / GlobalAveragePool, Add / Mul / Sub with a broadcast constant (an
initializer, a ``Constant`` node, a ``CastLike`` of a double constant, or a constant subgraph), residual
branches, Concat, a squeeze-excite Mul, channel shuffle (Reshape, Transpose, Reshape), Transpose, MatMul,
Flatten / Reshape (a constant target or the exporter's Shape -> Gather -> Unsqueeze -> Concat chain) to 2-D, then
Gemm (transA / transB / alpha / beta / C), MatMul, Identity, inference Dropout, and dead branches. Some
intermediate values also become graph outputs. ``tests/test_properties.py`` checks that every generated model
passes the onnx checker's full check and runs on onnxruntime with exactly the tracked output shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # what opset 17 shipped with: every onnxruntime here loads it

BLOCKS_4D = ("conv", "conv_transpose", "batchnorm", "activation", "pool", "global_pool", "binary", "residual",
             "concat", "squeeze_excite", "shuffle", "transpose", "matmul", "identity", "dropout", "dead",
             "flatten")
BLOCKS_2D = ("gemm", "matmul", "batchnorm", "activation", "binary", "residual", "identity", "dropout", "dead")
ALL_BLOCKS = frozenset(BLOCKS_4D + BLOCKS_2D)


# -- where the choices come from ------------------------------------------------------------------------------
class Choices:
    """The builder's only source of decisions (``lo`` and ``hi`` inclusive)."""

    def int(self, lo: int, hi: int) -> int: ...

    def pick(self, seq: Sequence) -> Any: ...

    def flag(self, p: float = 0.5) -> bool: ...

    def real(self, lo: float, hi: float) -> float: ...


class NumpyChoices(Choices):
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def int(self, lo, hi):
        return int(self.rng.integers(lo, hi + 1))

    def pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def flag(self, p=0.5):
        return bool(self.rng.random() < p)

    def real(self, lo, hi):
        return round(float(self.rng.uniform(lo, hi)), 3)


class HypothesisChoices(Choices):
    def __init__(self, draw):
        from hypothesis import strategies as st

        self.draw, self.st = draw, st

    def int(self, lo, hi):
        return self.draw(self.st.integers(lo, hi))

    def pick(self, seq):
        return self.draw(self.st.sampled_from(list(seq)))

    def flag(self, p=0.5):  # shrinks towards False, the simpler graph (no extra output, no bias, ...)
        return self.draw(self.st.integers(0, 99)) >= round(100 * (1 - p))

    def real(self, lo, hi):
        return round(self.draw(self.st.floats(lo, hi, allow_nan=False, allow_infinity=False)), 3)


# -- what may be generated --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    max_blocks: int = 6
    blocks: frozenset = ALL_BLOCKS
    max_channels: int = 8
    max_spatial: int = 8
    max_features: int = 16
    dynamic_batch: bool = True  # some graphs get a symbolic batch dimension
    extra_outputs: bool = True  # some intermediate values become graph outputs too
    constant_forms: tuple = ("initializer", "constant_node", "castlike", "subgraph")
    first: str | None = None  # the block every graph starts with (a Conv gives pruning a source to follow)
    head: bool | None = None  # end with a 1x1 Conv or a Gemm classifier (None: some graphs), which leaves the
    # channels before it free to prune (a graph output's own channels never are)
    min_channels: int = 1  # the fewest channels (features) the input and every Conv / Gemm / MatMul output has


@dataclass
class RandomGraph:
    model: onnx.ModelProto
    input_shape: tuple[int, ...]  # with batch 1
    output_shapes: dict[str, tuple[int, ...]]  # with batch 1
    blocks: list[str]  # the blocks, in order (a readable summary of the graph)
    dynamic_batch: bool
    seed: int  # the weights' seed
    calibration: dict[str, np.ndarray] = field(default_factory=dict)  # a few random samples for int8

    def __repr__(self) -> str:
        ops = [n.op_type for n in self.model.graph.node]
        return (f"RandomGraph(blocks={self.blocks}, input={self.input_shape}, dynamic_batch={self.dynamic_batch}, "
                f"seed={self.seed}, {len(ops)} nodes: {' '.join(ops)})")

    def _repr_pretty_(self, printer, cycle) -> None:  # what hypothesis prints for a failing example
        printer.text(repr(self))


# -- the builder ----------------------------------------------------------------------------------------------
class _Builder:
    def __init__(self, c: Choices, spec: Spec, seed: int):
        self.c, self.spec = c, spec
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.outputs: list[str] = []  # intermediate values that are graph outputs too
        self.count = 0

    def fresh(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def init(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) / math.sqrt(max(fan_in, 1))).astype(np.float32)

    def node(self, op: str, inputs: list[str], shape: tuple[int, ...] | None = None, outputs: int = 1,
             **attrs) -> str:
        names = [self.fresh(op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=f"/{op}_{self.count}", **attrs))
        if shape is not None:
            self.shapes[names[0]] = tuple(shape)
        return names[0]

    def float_constant(self, array: np.ndarray, like: str) -> str:
        """A float32 constant in one of the forms exporters write (fold-constants turns each into an initializer)."""
        array = np.asarray(array, np.float32)
        form = self.c.pick(self.spec.constant_forms)
        if form == "constant_node":
            return self.node("Constant", [], value=numpy_helper.from_array(array, self.fresh("value")))
        if form == "castlike":  # a double constant cast to the activation's type, as torch's dynamo exporter does
            return self.node("CastLike", [self.init("double", array.astype(np.float64)), like])
        if form == "subgraph":  # computed from two initializers: a constant subgraph
            half = (array / 2).astype(np.float32)
            return self.node("Add", [self.init("half", half), self.init("half", array - half)])
        return self.init("const", array)

    def int64s(self, values: Sequence[int]) -> str:
        if self.c.flag():
            return self.node("Constant", [], value=numpy_helper.from_array(np.array(values, np.int64),
                                                                            self.fresh("ints")))
        return self.init("shape", np.array(values, np.int64))

    def reshape(self, x: str, rest: Sequence[int], shape: tuple[int, ...]) -> str:
        """Reshape ``x`` to (batch, *rest): a constant target with 0 for the batch, or the exporter's chain
        Shape -> Gather(0) -> Unsqueeze -> Concat(batch, rest) that fold-constants folds for a static batch."""
        if self.c.flag():
            target = self.int64s([0, *rest])
        else:
            dims = self.node("Shape", [x])
            batch = self.node("Gather", [dims, self.init("index", np.array(0, np.int64))], axis=0)
            batch = self.node("Unsqueeze", [batch, self.init("axes", np.array([0], np.int64))])
            target = self.node("Concat", [batch, self.int64s(list(rest))], axis=0)
        return self.node("Reshape", [x, target], shape)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _conv_out(size: int, kernel: int, stride: int, dilation: int, begin: int, end: int) -> int:
    return (size + begin + end - (kernel - 1) * dilation - 1) // stride + 1


# -- 4-D blocks: x has shape (N, C, H, W) -----------------------------------------------------------------------
def _conv(b: _Builder, x: str, out: int | None = None, same: bool = False) -> str:
    n, c, h, w = b.shapes[x]
    groups = 1 if same or out is not None else b.c.pick(_divisors(c))
    if out is None:
        per = b.c.int(-(-b.spec.min_channels // groups), max(1, b.spec.max_channels // groups))
        out = groups * per
    kh, kw = (b.c.pick((1, 3)),) * 2 if same else (b.c.int(1, 3), b.c.int(1, 3))
    if same:  # spatial size kept: stride 1, pads (k - 1) / 2 * dilation
        d = b.c.int(1, 2)
        strides, dil, pads = [1, 1], [d, d], [d * (kh // 2), d * (kw // 2)] * 2
    else:
        strides = [b.c.int(1, 2), b.c.int(1, 2)]
        dil = [b.c.int(1, 2), b.c.int(1, 2)]
        pads = [b.c.int(0, kh - 1), b.c.int(0, kw - 1), b.c.int(0, kh - 1), b.c.int(0, kw - 1)]
    oh = _conv_out(h, kh, strides[0], dil[0], pads[0], pads[2])
    ow = _conv_out(w, kw, strides[1], dil[1], pads[1], pads[3])
    if oh < 1 or ow < 1:  # the window does not fit: a 1x1 conv always does
        kh = kw = 1
        dil, pads = [1, 1], [0, 0, 0, 0]
        oh, ow = _conv_out(h, 1, strides[0], 1, 0, 0), _conv_out(w, 1, strides[1], 1, 0, 0)
    inputs = [x, b.init("weight", b.weight((out, c // groups, kh, kw), c // groups * kh * kw))]
    if b.c.flag():
        inputs.append(b.init("bias", b.weight((out,), 4)))
    return b.node("Conv", inputs, (n, out, oh, ow), kernel_shape=[kh, kw], strides=strides, pads=pads,
                  dilations=dil, group=groups)


def _conv_transpose(b: _Builder, x: str) -> str:
    n, c, h, w = b.shapes[x]
    groups = b.c.pick(_divisors(c))
    out = groups * b.c.int(-(-b.spec.min_channels // groups), max(1, b.spec.max_channels // groups))
    k = b.c.int(1, 3)
    stride = b.c.int(1, 2) if max(h, w) * 2 <= b.spec.max_spatial else 1
    dil = b.c.int(1, 2)
    reach = (k - 1) * dil
    pads = [b.c.int(0, reach // 2) for _ in range(4)]
    out_pad = b.c.int(0, stride - 1)
    oh = stride * (h - 1) + out_pad + reach + 1 - pads[0] - pads[2]
    ow = stride * (w - 1) + out_pad + reach + 1 - pads[1] - pads[3]
    inputs = [x, b.init("weight", b.weight((c, out // groups, k, k), c // groups * k * k))]
    if b.c.flag():
        inputs.append(b.init("bias", b.weight((out,), 4)))
    return b.node("ConvTranspose", inputs, (n, out, oh, ow), kernel_shape=[k, k], strides=[stride, stride],
                  pads=pads, dilations=[dil, dil], output_padding=[out_pad, out_pad], group=groups)


def _batchnorm(b: _Builder, x: str) -> str:
    c = b.shapes[x][1]
    r = b.rng
    params = [r.uniform(0.5, 1.5, c), r.uniform(-0.5, 0.5, c), r.uniform(-0.5, 0.5, c), r.uniform(0.5, 1.5, c)]
    names = [b.init(k, p.astype(np.float32)) for k, p in zip(("scale", "bn_bias", "mean", "var"), params)]
    return b.node("BatchNormalization", [x, *names], b.shapes[x], epsilon=b.c.pick((1e-5, 1e-3)))


def _activation(b: _Builder, x: str) -> str:
    kind = b.c.pick(("Relu", "Sigmoid", "LeakyRelu", "Clip"))
    if kind == "LeakyRelu":
        return b.node(kind, [x], b.shapes[x], alpha=b.c.real(0.01, 0.3))
    if kind == "Clip":
        low = b.c.pick((0.0, -1.0, None))
        high = b.c.pick((6.0, 1.0, None))
        inputs = [x, "" if low is None else b.init("min", np.array(low, np.float32))]
        if high is not None:
            inputs.append(b.init("max", np.array(high, np.float32)))
        while inputs[-1] == "":
            inputs.pop()
        return b.node(kind, inputs, b.shapes[x])
    return b.node(kind, [x], b.shapes[x])


def _pool(b: _Builder, x: str) -> str:
    n, c, h, w = b.shapes[x]
    op = b.c.pick(("MaxPool", "AveragePool"))
    kh, kw = min(b.c.int(1, 3), h), min(b.c.int(1, 3), w)
    strides = [b.c.int(1, 2), b.c.int(1, 2)]
    pads = [b.c.int(0, kh - 1), b.c.int(0, kw - 1), b.c.int(0, kh - 1), b.c.int(0, kw - 1)]
    shape = (n, c, _conv_out(h, kh, strides[0], 1, pads[0], pads[2]), _conv_out(w, kw, strides[1], 1, pads[1], pads[3]))
    attrs = dict(kernel_shape=[kh, kw], strides=strides, pads=pads)
    if op == "AveragePool":
        attrs["count_include_pad"] = b.c.int(0, 1)
    return b.node(op, [x], shape, **attrs)


def _global_pool(b: _Builder, x: str) -> str:
    n, c = b.shapes[x][:2]
    return b.node("GlobalAveragePool", [x], (n, c, 1, 1))


def _binary(b: _Builder, x: str) -> str:
    shape = b.shapes[x]
    op = b.c.pick(("Add", "Mul", "Sub"))
    if len(shape) == 4:
        n, c, h, w = shape
        const_shape = b.c.pick([(), (1,), (w,), (c, 1, 1), (1, c, 1, 1), (1, 1, h, w)])
    else:
        const_shape = b.c.pick([(), (1,), (shape[1],), (1, shape[1])])
    values = b.rng.uniform(0.5, 1.5, const_shape) if op == "Mul" else b.rng.uniform(-0.5, 0.5, const_shape)
    const = b.float_constant(values, x)
    inputs = [const, x] if b.c.flag() else [x, const]
    return b.node(op, inputs, shape)


def _residual(b: _Builder, x: str) -> str:
    """x + f(x) (or x - f(x), x * f(x)) with f of one or two shape-keeping blocks."""
    branch = x
    for _ in range(b.c.int(1, 2)):
        kind = b.c.pick(("conv", "batchnorm", "activation")) if len(b.shapes[x]) == 4 else b.c.pick(
            ("gemm", "batchnorm", "activation"))
        if kind == "conv":
            branch = _conv(b, branch, out=b.shapes[x][1], same=True)
        elif kind == "gemm":
            branch = _gemm(b, branch, out=b.shapes[x][1])
        else:
            branch = BLOCKS[kind](b, branch)
    op = b.c.pick(("Add", "Add", "Mul", "Sub"))
    inputs = [branch, x] if b.c.flag() else [x, branch]
    return b.node(op, inputs, b.shapes[x])


def _concat(b: _Builder, x: str) -> str:
    n, c, h, w = b.shapes[x]
    if b.c.flag(0.2):  # along a spatial axis: the same tensor twice
        axis = b.c.pick((2, 3))
        shape = list(b.shapes[x])
        shape[axis] *= 2
        return b.node("Concat", [x, _activation(b, x)], tuple(shape), axis=axis)
    other = _conv(b, x, out=b.c.int(b.spec.min_channels, b.spec.max_channels), same=True)
    inputs = [other, x] if b.c.flag() else [x, other]
    return b.node("Concat", inputs, (n, c + b.shapes[other][1], h, w), axis=b.c.pick((1, -3)))


def _squeeze_excite(b: _Builder, x: str) -> str:
    n, c, h, w = b.shapes[x]
    s = _global_pool(b, x)
    s = _conv(b, s, out=max(b.spec.min_channels, c // 2), same=True)
    s = b.node("Relu", [s], b.shapes[s])
    s = _conv(b, s, out=c, same=True)
    s = b.node("Sigmoid", [s], b.shapes[s])
    return b.node("Mul", [x, s], b.shapes[x])


def _shuffle(b: _Builder, x: str) -> str:
    n, c, h, w = b.shapes[x]
    groups = b.c.pick([g for g in _divisors(c) if g > 1] or [1])
    y = b.reshape(x, [groups, c // groups, h, w], (n, groups, c // groups, h, w))
    y = b.node("Transpose", [y], (n, c // groups, groups, h, w), perm=[0, 2, 1, 3, 4])
    return b.reshape(y, [c, h, w], (n, c, h, w))


def _transpose(b: _Builder, x: str) -> str:
    shape = b.shapes[x]
    perm = [0, *b.c.pick([p for p in _permutations(list(range(1, len(shape))))])]
    return b.node("Transpose", [x], tuple(shape[i] for i in perm), perm=perm)


def _permutations(items: list[int]) -> list[list[int]]:
    if len(items) <= 1:
        return [items]
    return [[items[i], *rest] for i in range(len(items)) for rest in _permutations(items[:i] + items[i + 1:])]


def _matmul(b: _Builder, x: str) -> str:
    shape = b.shapes[x]
    k = shape[-1]
    out = b.c.int(b.spec.min_channels, b.spec.max_features if len(shape) == 2 else b.spec.max_spatial)
    y = b.node("MatMul", [x, b.init("weight", b.weight((k, out), k))], (*shape[:-1], out))
    if len(shape) == 2 and b.c.flag():  # a Linear as torch exports it: MatMul then Add of the bias
        y = b.node("Add", [y, b.init("bias", b.weight((out,), 4))], b.shapes[y])
    return y


def _identity(b: _Builder, x: str) -> str:
    return b.node("Identity", [x], b.shapes[x])


def _dropout(b: _Builder, x: str) -> str:
    inputs = [x]
    if b.c.flag():
        inputs.append(b.init("ratio", np.array(b.c.pick((0.1, 0.5)), np.float32)))
        if b.c.flag():  # training_mode given, and false: still inference
            inputs.append(b.init("training_mode", np.array(False)))
    return b.node("Dropout", inputs, b.shapes[x], outputs=b.c.pick((1, 2)))  # a mask output nobody reads


def _dead(b: _Builder, x: str) -> str:
    """A branch nothing reads (eliminate-dead removes it); the value flows on unchanged."""
    (_conv(b, x) if len(b.shapes[x]) == 4 else _gemm(b, x))
    return x


def _flatten(b: _Builder, x: str) -> str:
    n, c, h, w = b.shapes[x]
    if c * h * w > 64:
        x = _global_pool(b, x)
        h = w = 1
    how = b.c.pick(("Flatten", "reshape", "reshape-minus-one"))
    if how == "Flatten":
        return b.node("Flatten", [x], (n, c * h * w), axis=1)
    return b.reshape(x, [c * h * w] if how == "reshape" else [-1], (n, c * h * w))


# -- 2-D blocks: x has shape (N, F) -----------------------------------------------------------------------------
def _gemm(b: _Builder, x: str, out: int | None = None) -> str:
    n, f = b.shapes[x]
    out = out or b.c.int(b.spec.min_channels, b.spec.max_features)
    # onnxruntime 1.32's basic graph optimizations cannot load Transpose -> Gemm(transA) -> [a graph output] ->
    # Transpose -> Gemm(transA) ("Failed to find node output ... producing output"): no transA on a graph output
    trans_a = 0 if x in b.outputs else b.c.int(0, 1)
    trans_b = b.c.int(0, 1)
    a = b.node("Transpose", [x], (f, n), perm=[1, 0]) if trans_a else x
    weight = b.weight((out, f) if trans_b else (f, out), f)
    inputs = [a, b.init("weight", weight)]
    c_shape = b.c.pick([None, (out,), (1, out), (1,), ()])
    if c_shape is not None:
        inputs.append(b.init("bias", b.weight(c_shape, 4)))
    attrs = dict(transA=trans_a, transB=trans_b)
    if b.c.flag():
        attrs.update(alpha=b.c.real(0.5, 2.0), beta=b.c.real(0.5, 2.0))
    return b.node("Gemm", inputs, (n, out), **attrs)


BLOCKS: dict[str, Callable[[_Builder, str], str]] = {
    "conv": _conv, "conv_transpose": _conv_transpose, "batchnorm": _batchnorm, "activation": _activation,
    "pool": _pool, "global_pool": _global_pool, "binary": _binary, "residual": _residual, "concat": _concat,
    "squeeze_excite": _squeeze_excite, "shuffle": _shuffle, "transpose": _transpose, "matmul": _matmul,
    "identity": _identity, "dropout": _dropout, "dead": _dead, "flatten": _flatten, "gemm": _gemm,
}


def _fits(b: _Builder, x: str, kind: str) -> bool:
    """Keep graphs small: nothing that grows a value past the spec's limits."""
    shape = b.shapes[x]
    if len(shape) == 4:
        c, h, w = shape[1:]
        if kind == "conv_transpose":
            return max(h, w) <= b.spec.max_spatial
        if kind == "concat":
            return c <= b.spec.max_channels
    return True


def build(c: Choices, spec: Spec = Spec()) -> RandomGraph:
    seed = c.int(0, 2**16)
    b = _Builder(c, spec, seed)
    shape = (1, c.int(spec.min_channels, spec.max_channels), c.int(1, spec.max_spatial), c.int(1, spec.max_spatial))
    dynamic = spec.dynamic_batch and c.flag()
    b.shapes["input"] = shape
    x, kinds, outputs = "input", [], b.outputs
    for i in range(c.int(1, spec.max_blocks)):
        allowed = BLOCKS_4D if len(b.shapes[x]) == 4 else BLOCKS_2D
        choices = [k for k in allowed if k in spec.blocks and _fits(b, x, k)]
        if not choices:
            break
        kind = spec.first if i == 0 and spec.first else c.pick(choices)
        kinds.append(kind)
        x = BLOCKS[kind](b, x)
        if spec.extra_outputs and x != "input" and x not in outputs and c.flag(0.15):
            outputs.append(x)  # an intermediate value is a graph output too (it keeps feeding the rest)
    if spec.head or (spec.head is None and c.flag(0.3)):
        kinds.append("head")
        if len(b.shapes[x]) == 4 and c.flag():
            x = _conv(b, x, out=c.int(spec.min_channels, spec.max_channels), same=True)
        else:
            x = _gemm(b, x if len(b.shapes[x]) == 2 else _flatten(b, x))
    if x == "input" or x in outputs:  # an output must be computed by a node of its own
        x = _identity(b, x) if x == "input" else b.node("Relu", [x], b.shapes[x])
    outputs.append(x)
    batch = "N" if dynamic else 1
    value = lambda name, s: helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, *s[1:]])  # noqa: E731
    graph = helper.make_graph(b.nodes, "random", [value("input", shape)], [value(o, b.shapes[o]) for o in outputs],
                              b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="tests.random_graphs")
    samples = b.rng.standard_normal((c.int(1, 4), *shape[1:])).astype(np.float32)
    return RandomGraph(model, shape, {o: b.shapes[o] for o in outputs}, kinds, dynamic, seed, {"input": samples})


def random_graph(seed: int, spec: Spec = Spec()) -> RandomGraph:
    """The graph numpy's generator draws for ``seed`` (the benchmark's source)."""
    return build(NumpyChoices(seed), spec)


def onnx_graphs(spec: Spec = Spec()):
    """A hypothesis strategy of :class:`RandomGraph`."""
    from hypothesis import strategies as st

    return st.composite(lambda draw: build(HypothesisChoices(draw), spec))()


# -- tolerances -------------------------------------------------------------------------------------------------
FP16_ROUNDOFF = 2.0**-11  # float16's unit roundoff: 4.9e-4, the relative error of rounding one value
FP16_ERROR_PER_OP = 4  # roundoffs per op on the longest path; on 1,000 graphs: median 0.08, max 1.0


def depth(model: onnx.ModelProto) -> int:
    """Nodes on the longest path from a graph input or constant to a graph output."""
    level: dict[str, int] = {}
    for node in model.graph.node:  # the builder writes nodes in topological order
        d = 1 + max((level.get(name, 0) for name in node.input if name), default=0)
        for name in node.output:
            level[name] = d
    return max(level.get(o.name, 0) for o in model.graph.output)


def fp16_tolerance(model: onnx.ModelProto) -> float:
    """The budget for :func:`unit_scale_error` after ``to-fp16``: FP16_ERROR_PER_OP roundoffs per op on the longest
    path. Every weight and every op's output is rounded to float16 (relative error up to 4.9e-4 each); the
    errors of a chain add up, each op's relative to the values it sums (a dot product of K random-signed terms
    has about sqrt(K) times the rounding of its result), so the budget grows with the depth."""
    return FP16_ERROR_PER_OP * FP16_ROUNDOFF * depth(model)


def unit_scale_error(reference: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """``max|a - r| / max(max|r|, 1)``: relative to the outputs' scale, but never to a scale below 1. The builder
    keeps values near unit scale (weights drawn with variance 1/fan-in), so outputs much smaller than 1 come from
    cancellation (or a Relu of negatives: all zero), and they carry the error of the unit-scale values they were
    computed from, which an approximation (fp16, int8) does not make smaller."""
    worst = 0.0
    for r, a in zip(reference, actual):
        r64, a64 = np.asarray(r, np.float64), np.asarray(a, np.float64)
        if r64.shape != a64.shape:
            return float("inf")
        if r64.size:
            worst = max(worst, float(np.max(np.abs(a64 - r64))) / max(float(np.max(np.abs(r64))), 1.0))
    return worst if len(reference) == len(actual) else float("inf")

"""int4-weight: 4-bit block-wise weight-only quantization of MatMul/Gemm weights (and, on request, embedding
tables) as onnxruntime's contrib ops ``com.microsoft::MatMulNBits`` and ``com.microsoft::GatherBlockQuantized``.

For a model's size: on CPU these kernels are slower than int8-dynamic's (measured 1.4-2.5x on a BERT-like
encoder), so the pass is what to choose when the file must be small, not when it must be fast.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import Equivalence, Pass, PassResult, hookimpl
from graphopt.ir.onnx_graph import fresh_name
from graphopt.ir.ops import is_standard_domain

MS_DOMAIN = "com.microsoft"
BITS = 4
DEFAULT_ZERO = 1 << (BITS - 1)  # both ops' zero point when none is given: 8


class Int4Weight(Pass):
    """Quantize constant float32 weights to 4 bits, block-wise along the reduced axis, as onnxruntime's contrib ops.

    ``Y = X·W`` with a constant 2-D ``W`` (K, N) becomes ``MatMulNBits(X, B, scales[, zero_points])`` (bits=4):
    ``W`` is cut into blocks of ``block_size`` values along K (K padded with zeros to whole blocks), each block
    of each column with one float32 scale (and, asymmetric, one 4-bit zero point); ``B`` is uint8
    (N, K/block, block/2), two values a byte, the first in the low nibble; ``scales`` is (N, K/block); zero points
    are packed the same way, (N, ceil((K/block)/2)). The packing is onnxruntime's own
    (``quantize_matmul_4bits``, the kernel its ``MatMulNBitsQuantizer`` calls): symmetric blocks take
    scale = m / -8 for m the value of largest magnitude, and the default zero point 8; asymmetric blocks span
    [min(w, 0), max(w, 0)] in 15 steps. ``Gemm`` (no ``transA``) is rewritten to MatMul + Add first: ``transB``
    and ``alpha`` are folded into the weight, and ``beta·C`` stays a float Add.

    With ``embeddings=true`` a Gather (axis 0) on a constant float32 table (V, H) becomes
    ``GatherBlockQuantized`` in its uint8 form (the MatMulNBits convention: quantize_axis 1, blocks of
    ``block_size`` along H, two values a byte, low nibble first, default zero point 8); H must be a multiple
    of ``block_size``, and every reader of the table must be such a Gather (a table also read by a MatMul,
    tied weights, would stay in the file as float anyway).

    Options: ``block_size`` (16, 32, 64, 128: smaller blocks are more accurate and larger: about 4 + 32/block
    bits a weight, + 4/block asymmetric), ``symmetric``, ``accuracy_level`` (MatMulNBits' hint: 0 unset, 4 lets
    onnxruntime quantize X to int8 per block, faster on CPU, slightly less accurate), ``embeddings``,
    ``exclude_nodes``. Left float, counted by reason in ``skipped`` and said in a note: weights that are not
    constant (attention's Q·Kᵀ), not float32, not 2-D, hold NaN/inf, Gemm with ``transA`` or with
    ``beta != 1`` on a non-constant C, excluded nodes. Approximate: outputs move by the weights' rounding.
    The result runs on onnxruntime (its CPU provider has both kernels); a second run finds nothing to do.
    """

    name = "int4-weight"
    irs = frozenset({"onnx"})
    equivalence = Equivalence.APPROXIMATE
    recovery = ("use smaller blocks (int4-weight:block_size=16), asymmetric blocks (symmetric=false), keep the "
                "sensitive MatMuls float (exclude_nodes=...), or int8-dynamic")

    @dataclass(frozen=True)
    class Options:
        block_size: Literal[16, 32, 64, 128] = 32
        symmetric: bool = True
        accuracy_level: Literal[0, 1, 2, 3, 4] = 0
        embeddings: bool = False
        exclude_nodes: tuple[str, ...] = ()

    def run_onnx(self, graph, ctx):
        g, opts = graph.gs, self.options
        names = set(g.tensors()) | {n.name for n in g.nodes}
        excluded = set(opts.exclude_nodes)
        missing = sorted(excluded - {n.name for n in g.nodes})
        if missing:
            ctx.warn(f"{self.name}: exclude_nodes names no node in the graph: {', '.join(missing)}")
        skipped: Counter = Counter()
        todo = []
        for node in list(g.nodes):
            if not is_standard_domain(node.domain):
                continue
            if node.op in ("MatMul", "Gemm"):
                weight, why = self._matmul_weight(graph, node, excluded, ctx)
            elif node.op == "Gather" and opts.embeddings and _float_constant(graph, node.inputs[0]):
                weight, why = self._table(graph, node, excluded)
            else:
                continue
            if weight is None:
                skipped[f"{node.op} {why}"] += 1
            else:
                todo.append((node, weight))
        notes = ["stay float: " + ", ".join(f"{what} (x{k})" for what, k in skipped.most_common())] if skipped else []
        if not todo:
            return PassResult(graph, False, {}, notes + ["no MatMul/Gemm with a constant float32 2-D weight"
                                                         + (" nor embedding table" if opts.embeddings else "")
                                                         + " to quantize: nothing to do"], dict(skipped))
        done: Counter = Counter()
        shared: dict[tuple, list[gs.Constant]] = {}
        size = [0, 0]  # bytes of the float weights replaced, of their 4-bit form (each shared weight once)
        for node, weight in todo:
            key = (node.inputs[0 if node.op == "Gather" else 1].name, node.op, int(node.attrs.get("transB", 0)),
                   float(node.attrs.get("alpha", 1.0)))
            if key not in shared:
                arrays = (_quantize_table if node.op == "Gather" else _quantize_matmul)(
                    weight, opts.block_size, opts.symmetric)
                shared[key] = [gs.Constant(fresh_name(names, f"{key[0]}_{suffix}"), a)
                               for suffix, a in zip(("int4", "scales", "zero_points"), arrays) if a is not None]
                size[0] += weight.nbytes
                size[1] += sum(a.nbytes for a in arrays if a is not None)
            done[node.op] += 1  # before the rewrite renames it
            if node.op == "Gather":
                _to_gather_block_quantized(node, shared[key], opts.block_size)
            else:
                _to_matmul_nbits(graph, node, weight.shape, shared[key], opts, names)
        g.cleanup().toposort()
        notes.append(f"weights {_mib(size[0])} -> {_mib(size[1])} ({size[1] / size[0]:.3f}x): 4-bit blocks of "
                     f"{opts.block_size}, {'symmetric' if opts.symmetric else 'asymmetric'}, float32 scales")
        notes.append("for size, not speed: onnxruntime's CPU MatMulNBits measured 1.4-2.5x int8-dynamic's latency "
                     "on a BERT-like encoder (int8-dynamic is the faster choice when latency matters)")
        stats = {f"quantized {op}": done[op] for op in ("MatMul", "Gemm", "Gather") if done[op]}
        return PassResult(graph, True, stats, notes, dict(skipped))

    def _matmul_weight(self, graph, node, excluded, ctx) -> tuple[np.ndarray | None, str]:
        """The weight as a float32 (K, N) array, Gemm's ``transB`` and ``alpha`` folded in, or why not."""
        if node.name in excluded:
            return None, "in exclude_nodes"
        w = graph.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None:
            return None, "weight not constant (both inputs activations, e.g. attention's Q·Kᵀ)"
        if w.dtype != np.float32 or w.ndim != 2:
            return None, "weight not a float32 2-D matrix"
        if not np.all(np.isfinite(w)):
            ctx.warn(f"{self.name}: {node.op} '{node.name or node.outputs[0].name}' stays float: its weight "
                     f"'{node.inputs[1].name}' holds NaN/inf")
            return None, "weight holds NaN/inf"
        if node.op == "Gemm":
            if int(node.attrs.get("transA", 0)):
                return None, "with transA"
            if len(node.inputs) > 2 and float(node.attrs.get("beta", 1.0)) != 1.0 \
                    and graph.constant_value(node.inputs[2]) is None:
                return None, "with beta != 1 and a non-constant C"
            w = w.T if int(node.attrs.get("transB", 0)) else w
            w = w * np.float32(node.attrs.get("alpha", 1.0))
        return np.ascontiguousarray(w, np.float32), ""

    def _table(self, graph, node, excluded) -> tuple[np.ndarray | None, str]:
        """A Gather's constant float32 (V, H) table, or why it stays float."""
        if node.name in excluded:
            return None, "in exclude_nodes"
        data = node.inputs[0]
        table = graph.constant_value(data)
        if table.ndim != 2:
            return None, "table not 2-D"
        if int(node.attrs.get("axis", 0)) not in (0, -2):
            return None, "not on axis 0"
        if table.shape[1] % self.options.block_size:
            return None, f"table width not a multiple of block_size={self.options.block_size}"
        if not np.all(np.isfinite(table)):
            return None, "table holds NaN/inf"
        readers = data.outputs
        if any(r.op != "Gather" or not is_standard_domain(r.domain) or int(r.attrs.get("axis", 0)) not in (0, -2)
               or r.inputs[0] is not data for r in readers):
            return None, "table also read by other nodes (tied weights)"
        return table, ""


def _float_constant(graph, tensor) -> bool:
    """Whether ``tensor`` is a constant float32 array: a Gather on anything else (shapes, ids) is no embedding."""
    value = graph.constant_value(tensor)
    return value is not None and value.dtype == np.float32


def _quantize_matmul(w: np.ndarray, block: int, symmetric: bool):
    """MatMulNBits' B (N, blocks, block/2) uint8, scales (N, blocks) float32 and packed zero points (N, ceil(blocks/2))
    uint8 (None when symmetric: the default 8 is what the symmetric quantizer used), by onnxruntime's own kernel."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits  # what MatMulNBitsQuantizer calls

    k, n = w.shape
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), np.float32)
    padded[:k] = w
    packed = np.zeros((n, blocks, block // 2), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zeros = np.zeros((n, -(-blocks // 2)), np.uint8)
    quantize_matmul_4bits(packed, padded, scales, zeros, block, n, blocks * block, symmetric)
    return packed, scales, None if symmetric else zeros


def _quantize_table(table: np.ndarray, block: int, symmetric: bool):
    """GatherBlockQuantized's uint8 data (V, H/2), scales (V, H/block) and packed zero points (V, ceil(H/block/2))
    (None when symmetric): the same rounding as onnxruntime's MatMulNBits quantizer, along H."""
    v, h = table.shape
    blocks = table.reshape(v, h // block, block).astype(np.float64)
    if symmetric:  # the value of largest magnitude maps to -8 exactly; the rest to [-8, 8], 8 clipped to 7
        peak = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
        scales = peak / -8
        zero = np.full(scales.shape, DEFAULT_ZERO, np.float64)
    else:  # [min(w, 0), max(w, 0)] in 15 steps, so 0 is exact
        low, high = np.minimum(blocks.min(-1, keepdims=True), 0), np.maximum(blocks.max(-1, keepdims=True), 0)
        scales = (high - low) / 15
        zero = np.where(scales == 0, DEFAULT_ZERO, np.clip(np.round(-low / np.where(scales == 0, 1, scales)), 0, 15))
    step = np.where(scales == 0, 1, scales)
    q = np.clip(np.round(blocks / step) + zero, 0, 15).astype(np.uint8).reshape(v, h)
    scales = scales[..., 0].astype(np.float32)
    return _pack_rows(q), scales, None if symmetric else _pack_rows(zero[..., 0].astype(np.uint8))


def _pack_rows(q: np.ndarray) -> np.ndarray:
    """Two 4-bit values a byte along the last axis, the first in the low nibble (odd widths padded with 0)."""
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], -1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _to_matmul_nbits(graph, node, shape, constants, opts, names) -> None:
    """Turn MatMul (or Gemm, whose ``beta·C`` becomes a float Add after it) into MatMulNBits, in place."""
    k, n = shape
    bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name else None
    beta = float(node.attrs.get("beta", 1.0))
    x, y = node.inputs[0], node.outputs[0]
    attrs = dict(K=k, N=n, bits=BITS, block_size=opts.block_size)
    if opts.accuracy_level:
        attrs["accuracy_level"] = opts.accuracy_level
    node.op, node.domain, node.attrs = "MatMulNBits", MS_DOMAIN, attrs
    node.inputs.clear()
    node.inputs.extend([x, *constants])
    if bias is None:
        return
    base = node.name or y.name
    if beta != 1.0:  # a constant C (checked before): scale it once; asarray keeps a 0-d C an array
        bias = gs.Constant(fresh_name(names, f"{bias.name}_beta"),
                           np.asarray(graph.constant_value(bias) * np.float32(beta), np.float32))
    product = gs.Variable(fresh_name(names, f"{base}_matmul"), dtype=np.float32)
    node.outputs.clear()
    node.outputs.append(product)
    graph.gs.nodes.append(gs.Node("Add", fresh_name(names, f"{base}/bias"), inputs=[product, bias], outputs=[y]))


def _to_gather_block_quantized(node, constants, block: int) -> None:
    indices = node.inputs[1]
    node.op, node.domain = "GatherBlockQuantized", MS_DOMAIN
    node.attrs = dict(bits=BITS, block_size=block, gather_axis=0, quantize_axis=1)
    node.inputs.clear()
    node.inputs.extend([constants[0], indices, *constants[1:]])


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(Int4Weight)

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
from graphopt.calib.blockwise import BITS, gptq, quantize_matmul, quantize_table
from graphopt.calib.errors import refused_data
from graphopt.calib.sources import input_specs, load_calibration
from graphopt.errors import UsageError
from graphopt.ir.contrib_shapes import MS_DOMAIN
from graphopt.ir.expose import expose
from graphopt.ir.gs_gaps import gs_graphs
from graphopt.ir.onnx_graph import fresh_name
from graphopt.ir.ops import is_standard_domain
from graphopt.table import fmt_bytes

THIN_ROWS = 4  # GPTQ: calibration rows per input channel below which it may fit the data: on white inputs with
# K=256 it left 1.38x round-to-nearest's output error on other data at 2 rows a channel, 1.17x at 4, 1.03x at 16
# (on correlated inputs, as real activations are, it is ~4x better than round-to-nearest even at 2)


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

    The model's last MatMul/Gemm with a constant weight (in graph order: a classifier or language-model head,
    where 4-bit rounding reaches the outputs undiluted) takes 8-bit blocks by default (``last=int8``; the same
    layout, one value a byte, default zero point 128), as NNCF's weight compression keeps it unless asked for
    ``all_layers``: on a BERT-like encoder's random 2-class head that took the logits' cosine against fp32 from
    0.989 to 0.996 (0.981 to 0.990 with 4-bit embeddings) for 0.1 % more bytes. ``last=int4`` quantizes it like
    the rest, ``last=float`` leaves it float.

    With ``embeddings=true`` a Gather (axis 0) on a constant float32 table (V, H) becomes
    ``GatherBlockQuantized`` in its uint8 form (the MatMulNBits convention: quantize_axis 1, blocks of
    ``block_size`` along H, two values a byte, low nibble first, default zero point 8); H must be a multiple
    of ``block_size``, and every reader of the table must be such a Gather (a table also read by a MatMul,
    tied weights, would stay in the file as float anyway).

    ``method=gptq`` rounds the MatMul/Gemm weights by GPTQ (Frantar et al., 2022) instead of to nearest (``rtn``):
    from the calibration data (``--calib``; required) it gathers each weight's input Hessian ``H = Σ xᵀx`` (K x K,
    float64: 8·K² bytes an input; as many at a time as fit in ``gptq_memory_mb``, one run of the data for each
    such group), then quantizes W's rows (its input channels) in order, each block's scale and zero point from its
    weights as updated so far, and spreads each row's rounding error over the rows not yet quantized through the
    Cholesky factor of ``H⁻¹`` (``damp`` of H's mean diagonal added first): the output ``x·W``, not the weight
    itself, is what it keeps close. The packing is the same; embedding tables are always rounded to nearest. Every
    H comes from the float model (no layer-by-layer propagation of the quantized layers' outputs).

    Options: ``block_size`` (16, 32, 64, 128: smaller blocks are more accurate and larger: about 4 + 32/block
    bits a weight, + 4/block asymmetric), ``symmetric``, ``accuracy_level`` (MatMulNBits' hint: 0 unset, 4 lets
    onnxruntime quantize X to int8 per block, faster on CPU, slightly less accurate), ``embeddings``,
    ``exclude_nodes``, ``last``. Left float, counted by reason in ``skipped`` and said in a note: weights that are
    not constant (attention's Q·Kᵀ), not float32, not 2-D, hold NaN/inf, Gemm with ``transA`` or with
    ``beta != 1`` on a non-constant C, excluded nodes, the last layer with ``last=float``. Approximate: outputs
    move by the weights' rounding. The result runs on onnxruntime (its CPU provider has both kernels); a second
    run finds nothing to do.
    """

    name = "int4-weight"
    irs = frozenset({"onnx"})
    equivalence = Equivalence.APPROXIMATE
    recovery = ("use smaller blocks (int4-weight:block_size=16), asymmetric blocks (symmetric=false), GPTQ with "
                "calibration data (method=gptq --calib c.npz), keep the sensitive MatMuls float (exclude_nodes=...), "
                "or int8-dynamic")

    @dataclass(frozen=True)
    class Options:
        block_size: Literal[16, 32, 64, 128] = 32
        symmetric: bool = True
        accuracy_level: Literal[0, 1, 2, 3, 4] = 0
        embeddings: bool = False
        exclude_nodes: tuple[str, ...] = ()
        method: Literal["rtn", "gptq"] = "rtn"
        last: Literal["int8", "int4", "float"] = "int8"  # the last MatMul/Gemm (a model's head): its precision
        damp: float = 0.01  # gptq: the share of the Hessian's mean diagonal added to it (dampening)
        gptq_samples: int = 128  # gptq: calibration samples read at most
        gptq_memory_mb: int = 2048  # gptq: input Hessians held at once (more weights: more runs of the data)

        def __post_init__(self):
            if not 0 < self.damp <= 1 or self.gptq_samples < 1 or self.gptq_memory_mb < 0:
                raise ValueError("damp must be in (0, 1], gptq_samples >= 1 and gptq_memory_mb >= 0")

    def requires(self, graph, ctx):
        if self.options.method == "gptq" and ctx.calibration is None:
            raise UsageError(f"pass '{self.name}': method=gptq needs calibration data (--calib c.npz, or "
                             f"calibration= in the API): GPTQ fits the rounding to the inputs each weight sees")

    def run_onnx(self, graph, ctx):
        g, opts = graph.gs, self.options
        names = set(g.tensors()) | {n.name for n in g.nodes}
        excluded = set(opts.exclude_nodes)
        missing = sorted(excluded - {n.name for n in g.nodes})
        self.warn_unmatched(ctx, "exclude_nodes", missing)
        skipped: Counter = Counter()
        todo = []  # (node, its weight, the bits it gets)
        last = _last_matmul(graph)
        for node in list(g.nodes):
            if not is_standard_domain(node.domain):
                continue
            bits = BITS
            if node.op in ("MatMul", "Gemm"):
                weight, why = self._matmul_weight(graph, node, excluded, ctx)
                if node is last and opts.last != "int4":
                    weight, why, bits = (None, "the last layer (last=float)", 0) if opts.last == "float" \
                        else (weight, why, 8)
            elif node.op == "Gather" and opts.embeddings and _float_constant(graph, node.inputs[0]):
                weight, why = self._table(graph, node, excluded)
            else:
                continue
            if weight is None:
                skipped[f"{node.op} {why}"] += 1
            else:
                todo.append((node, weight, bits))
        skipped.update(f"{n.op} inside an If/Loop/Scan body" for sub in gs_graphs(g)[1:] for n in sub.nodes
                       if n.op in ("MatMul", "Gemm"))
        notes = ["stay float: " + ", ".join(f"{what} (x{k})" for what, k in skipped.most_common())] if skipped else []
        if not todo:
            return PassResult(graph, False, {}, notes + ["no MatMul/Gemm with a constant float32 2-D weight"
                                                         + (" nor embedding table" if opts.embeddings else "")
                                                         + " to quantize: nothing to do"], dict(skipped))
        by_gptq = self._gptq_weights(graph, ctx, [t for t in todo if t[2] == BITS]) if opts.method == "gptq" else {}
        done: Counter = Counter()
        shared: dict[tuple, list[gs.Constant]] = {}
        size = [0, 0]  # bytes of the float weights replaced, of their packed form (each shared weight once)
        for node, weight, bits in todo:
            key = (*_key(node), bits)
            if key not in shared:
                if node.op == "Gather":
                    arrays = quantize_table(weight, opts.block_size, opts.symmetric)
                elif opts.method == "gptq" and bits == BITS:
                    arrays = by_gptq[key[:-1]]
                else:
                    arrays = quantize_matmul(weight, opts.block_size, opts.symmetric, bits)
                shared[key] = [gs.Constant(fresh_name(names, f"{key[0]}_{suffix}"), a)
                               for suffix, a in zip((f"int{bits}", "scales", "zero_points"), arrays) if a is not None]
                size[0] += weight.nbytes
                size[1] += sum(a.nbytes for a in arrays if a is not None)
            done[node.op] += 1  # before the rewrite renames it
            done["in 8 bits (the last layer)"] += bits == 8  # also counted by op
            if node.op == "Gather":
                _to_gather_block_quantized(node, shared[key], opts.block_size)
            else:
                _to_matmul_nbits(graph, node, weight.shape, shared[key], opts, names, bits)
        g.cleanup().toposort()
        notes.append(f"weights {fmt_bytes(size[0])} -> {fmt_bytes(size[1])} ({size[1] / size[0]:.3f}x): 4-bit "
                     f"blocks of {opts.block_size}, {'symmetric' if opts.symmetric else 'asymmetric'}, float32 scales, "
                     + ("MatMul/Gemm weights by GPTQ" if opts.method == "gptq" else "rounded to nearest"))
        if bits_8 := done["in 8 bits (the last layer)"]:
            notes.append(f"the last MatMul/Gemm '{last.name or last.outputs[0].name}' (the model's head) in 8-bit "
                         f"blocks, as NNCF keeps it (last=int4: 4 bits like the rest; last=float: float)")
        notes.append("for size, not speed: onnxruntime's CPU MatMulNBits measured 1.4-2.5x int8-dynamic's latency "
                     "on a BERT-like encoder (int8-dynamic is the faster choice when latency matters)")
        stats = {f"quantized {op}": done[op] for op in ("MatMul", "Gemm", "Gather") if done[op]}
        if bits_8:
            stats["in 8 bits (the last layer)"] = bits_8
        return PassResult(graph, True, stats, notes, dict(skipped))

    def _gptq_weights(self, graph, ctx, todo) -> dict[tuple, tuple]:
        """GPTQ's arrays per MatMul/Gemm weight (by :func:`_key`), from ``Σ xᵀx`` over the calibration data of the
        inputs of every node that reads it (float64, K x K: 8·K² bytes an input). The sums are gathered for as many
        weights at a time as fit in ``gptq_memory_mb`` (a run of the float graph on onnxruntime per group, its
        inputs exposed), then rounded and dropped: memory stays bounded on a model with wide layers."""
        opts = self.options
        weights: dict[tuple, tuple[np.ndarray, set[str]]] = {}
        for node, weight, _ in todo:
            if node.op != "Gather":
                weights.setdefault(_key(node), (weight, set()))[1].add(node.inputs[0].name)
        groups: list[list[tuple]] = [[]]
        size = 0
        for key, (weight, inputs) in weights.items():
            need = 8 * weight.shape[0] ** 2 * len(inputs)
            if groups[-1] and size + need > opts.gptq_memory_mb << 20:
                groups.append([])
                size = 0
            groups[-1].append(key)
            size += need
        data = load_calibration(ctx.calibration, input_specs(graph), batch_size=8, limit=opts.gptq_samples)
        arrays, thin = {}, []
        for group in groups:
            names = sorted(set().union(*(weights[key][1] for key in group)))
            session = expose(graph, names).session(optimized=False)
            sums: dict[str, np.ndarray] = {}
            seen: Counter = Counter()  # rows (samples x positions) each input was seen in
            for batch in data.batches():
                try:
                    values = session.run(names, batch)
                except Exception as exc:  # onnxruntime's own error types
                    refused = refused_data(exc)
                    if refused is None:
                        raise
                    raise refused from exc
                for name, value in zip(names, values):
                    rows = np.asarray(value, np.float64).reshape(-1, value.shape[-1])
                    sums[name] = sums.get(name, 0.0) + rows.T @ rows
                    seen[name] += len(rows)
            for key in group:
                weight, inputs = weights[key]
                arrays[key] = gptq(weight, sum(sums[x] for x in inputs), opts.block_size, opts.symmetric, opts.damp)
                rows = sum(seen[x] for x in inputs)
                if rows < THIN_ROWS * weight.shape[0]:
                    thin.append((rows / weight.shape[0], key[0], rows, weight.shape[0]))
        if thin:
            _, name, rows, k = min(thin)  # the fewest rows per input channel
            ctx.warn(f"{self.name}: GPTQ saw {len(thin)} weight(s) in fewer than {THIN_ROWS} calibration rows per "
                     f"input channel (least: '{name}', {rows} rows for {k}): on so few it can fit the calibration "
                     f"data and round worse than to nearest elsewhere; give more samples (gptq_samples, --calib) "
                     f"or a larger damp")
        return arrays

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


def _last_matmul(graph):
    """The last MatMul/Gemm (graph order) whose weight is constant: the model's head; None when there is none."""
    for node in reversed(graph.gs.nodes):
        if node.op in ("MatMul", "Gemm") and is_standard_domain(node.domain) and len(node.inputs) > 1 \
                and graph.constant_value(node.inputs[1]) is not None:
            return node
    return None


def _key(node) -> tuple:
    """What makes one quantized weight: the tensor read, the op, and Gemm's transB and alpha folded into it."""
    return (node.inputs[0 if node.op == "Gather" else 1].name, node.op, int(node.attrs.get("transB", 0)),
            float(node.attrs.get("alpha", 1.0)))


def _float_constant(graph, tensor) -> bool:
    """Whether ``tensor`` is a constant float32 array: a Gather on anything else (shapes, ids) is no embedding."""
    value = graph.constant_value(tensor)
    return value is not None and value.dtype == np.float32


def _to_matmul_nbits(graph, node, shape, constants, opts, names, bits: int) -> None:
    """Turn MatMul (or Gemm, whose ``beta·C`` becomes a float Add after it) into MatMulNBits, in place."""
    k, n = shape
    bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name else None
    beta = float(node.attrs.get("beta", 1.0))
    x, y = node.inputs[0], node.outputs[0]
    attrs = dict(K=k, N=n, bits=bits, block_size=opts.block_size)
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


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(Int4Weight)

"""Built-in channel handlers for ops that move channels between axes, and the table of every built-in handler.

Reshape-like ops are followed exactly: the atoms are laid out over the input's full shape, reshaped as the op
reshapes the data, and read back on the output's axes. A Flatten after a Conv thus spreads each channel over its
H×W features; a Reshape that splits a hidden size into (heads, head size) or channels into (groups, channels per
group) yields two channel axes. A split is pruned so both axes stay rectangular: with the ``split`` setting
``"size"`` (default) every group loses the same inner positions (attention head size, channels per shuffle
group), with ``"count"`` whole groups go (attention heads). A MatMul of two activations (attention) unifies the
channels it contracts or broadcasts together.
"""

from __future__ import annotations

import numpy as np

from graphopt.prune import handlers as h
from graphopt.prune.propagate import Propagation, Tracked
from graphopt.prune.view import PNode


def _concrete(shape) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else 1 for d in shape]


def reshape(node: PNode, prop: Propagation) -> None:
    """Reshape, Flatten, Squeeze, Unsqueeze: follow every channel through the new layout."""
    x, y = node.input(0), node.outputs[0]
    t, xs, ys = prop.get(x), prop.shape(x), prop.shape(y)
    if t is None:
        return
    if xs is None or ys is None:
        prop.block(t.atoms, f"{node.op} '{node.name}' has shapes that are not known statically")
        return
    static = all(isinstance(d, int) and d > 0 for d in [*xs, *ys])
    xs, ys = _concrete(xs), _concrete(ys)
    if int(np.prod(xs)) != int(np.prod(ys)):
        why = "input and output sizes differ" if static else "has dimensions known only at run time"
        prop.block(t.atoms, f"{node.op} '{node.name}' {why}")
        return
    spread = t.atoms.reshape([xs[a] if a in t.axes else 1 for a in range(len(xs))])
    labels = np.broadcast_to(spread, xs).reshape(ys)
    axes = tuple(a for a in range(len(ys)) if ys[a] > 1 and not (labels == labels.take([0], axis=a)).all())
    if not axes:  # a single channel: nothing to follow or prune, and no axis to carry it on
        prop.block(t.atoms, f"{node.op} '{node.name}' leaves a single channel")
        return
    grid = labels[tuple(slice(None) if a in axes else 0 for a in range(len(ys)))]
    if not np.array_equal(np.broadcast_to(grid.reshape([ys[a] if a in axes else 1 for a in range(len(ys))]), ys),
                          labels):
        prop.block(t.atoms, f"{node.op} '{node.name}' mixes channels with other dimensions")
        return
    if len(axes) > len(t.axes) and grid.ndim >= 2:
        if prop.settings.get("split", "size") == "count":
            for row in grid.reshape(grid.shape[0], -1):
                prop.unify_all(row)
        else:
            for column in grid.reshape(-1, grid.shape[-1]).T:
                prop.unify_all(column)
    if node.op == "Reshape" and not _reshape_target(node, prop, y, axes):
        prop.block(t.atoms, f"Reshape '{node.name}' computes the size of a channel axis at run time")
        return
    prop.set(y, Tracked(axes, np.ascontiguousarray(grid)))


def _reshape_target(node: PNode, prop: Propagation, y: str, axes: tuple[int, ...]) -> bool:
    """Record the edit of a Reshape's target at the channel axes: a constant target, or a Concat of one-element
    pieces (dynamic batch/sequence sizes from Shape ops, constant channel sizes). False when it cannot."""
    target = prop.const(node.input(1))
    if target is not None:
        target = [int(v) for v in target]
        if any(target[a] > 0 for a in axes):
            prop.edit(node, "shape", lambda kept: [kept.count(y, a) if a in axes and v > 0 else v
                                                   for a, v in enumerate(target)])
        return True
    concat = prop.producer(node.input(1))
    if concat is None or concat.op != "Concat" or len(concat.inputs) != len(prop.shape(y) or ()):
        return False
    pieces = [prop.const(v) for v in concat.inputs]
    if any(pieces[a] is None or pieces[a].size != 1 for a in axes):
        return False
    for a in axes:
        if int(pieces[a].ravel()[0]) > 0:
            prop.edit(concat, f"input:{a}", lambda kept, a=a: [kept.count(y, a)])
    return True


def transpose(node: PNode, prop: Propagation) -> None:
    x, y = node.input(0), node.outputs[0]
    t = prop.get(x)
    if t is None:
        return
    perm = list(node.attrs.get("perm") or reversed(range(len(prop.shape(x)))))
    moved = [perm.index(a) for a in t.axes]
    order = np.argsort(moved)
    prop.set(y, Tracked(tuple(sorted(moved)), np.transpose(t.atoms, order)))


def gather(node: PNode, prop: Propagation) -> None:
    """An embedding lookup (constant 2-D table, axis 0) creates channels from the table's columns; a Gather on
    another axis of an activation (the first token, ``x[:, 0]``) carries its channels to the shifted axes."""
    data, index, y = node.input(0), node.input(1), node.outputs[0]
    table, axis = prop.const(data), int(node.attrs.get("axis", 0))
    if prop.get(index) is not None:
        h.unknown(node, prop)
        return
    if table is not None and table.ndim == 2 and axis == 0:
        out, ys = prop.fresh(table.shape[1]), prop.shape(y)
        prop.slice(node, data, 1, out)
        prop.source(node, y, out)
        if ys:
            prop.set(y, Tracked((len(ys) - 1,), out))
        else:
            prop.block(out, f"the shape of '{y}' is not known statically")
        return
    t = prop.get(data)
    if t is None:
        return
    axis %= len(prop.shape(data))
    if axis in t.axes:
        prop.block(t.atoms, f"Gather '{node.name}' picks channels by a run-time index")
        return
    grow = len(prop.shape(index) or ()) - 1
    prop.set(y, Tracked(tuple(a if a < axis else a + grow for a in t.axes), t.atoms))


def expand(node: PNode, prop: Propagation) -> None:
    """Expand (and other ops whose extra inputs are shapes): input 0's channels, right-aligned."""
    x, y = node.input(0), node.outputs[0]
    t, xs, ys = prop.get(x), prop.shape(x), prop.shape(y)
    if t is None:
        return
    moved = h._aligned(t, len(xs), len(ys or ()))
    if ys is None or any(ys[a] != xs[b] for a, b in zip(moved.axes, t.axes)):
        prop.block(t.atoms, f"{node.op} '{node.name}' changes the size of a channel axis")
        return
    prop.set(y, moved)


def pad(node: PNode, prop: Propagation) -> None:
    x = node.input(0)
    t, pads = prop.get(x), prop.const(node.input(1))
    if t is None:
        return
    rank = len(prop.shape(x))
    if pads is None or node.input(3) is not None or any(pads[a] or pads[a + rank] for a in t.axes):
        prop.block(t.atoms, f"Pad '{node.name}' may pad a channel axis")
        return
    h.passthrough(node, prop)


def index(node: PNode, prop: Propagation) -> None:
    """FX ``x[...]`` with ints and full slices (``x[:, 0]``): channels move to the axes that remain."""
    x, y = node.input(0), node.outputs[0]
    t = prop.get(x)
    if t is None:
        return
    items = node.attrs.get("index")
    items = items if isinstance(items, tuple) else (items,)
    if not all(isinstance(i, (int, slice)) for i in items):
        h.unknown(node, prop)
        return
    moved = []
    for a in t.axes:
        item = items[a] if a < len(items) else slice(None)
        if item != slice(None):
            prop.block(t.atoms, f"indexing '{node.name}' picks some channels of '{x}'")
            return
        moved.append(a - sum(1 for i in items[:a] if isinstance(i, int)))
    prop.set(y, Tracked(tuple(moved), t.atoms))


def _roles(rank: int, out_rank: int, first: bool) -> list:
    """Output axis each operand axis maps to (batch axes broadcast right-aligned); "k" for the contracted one."""
    roles = [a + out_rank - rank for a in range(rank - 2)]
    return roles + ([out_rank - 2, "k"] if first else ["k", out_rank - 1])


def matmul(node: PNode, prop: Propagation) -> None:
    """MatMul: with a constant 2-D B it is a Linear layer; between two activations (attention scores, context)
    the contracted channels and the batch (head) channels of both operands are unified."""
    a, b, y = node.input(0), node.input(1), node.outputs[0]
    weight = prop.const(b)
    if weight is not None and weight.ndim == 2:
        h.dense(node, prop, b, 0, None)
        return
    if weight is not None or prop.const(a) is not None:
        h.unknown(node, prop)
        return
    ys = prop.shape(y)
    shapes = [prop.shape(v) for v in (a, b)]
    if prop.get(a) is None and prop.get(b) is None:
        return
    if ys is None or any(s is None for s in shapes):
        prop.block_inputs(node, f"MatMul '{node.name}' has shapes that are not known statically")
        return
    if min(len(s) for s in shapes) < 2:
        h.unknown(node, prop)
        return
    ops = [(v, prop.get(v), _roles(len(s), len(ys), i == 0)) for i, (v, s) in enumerate(zip((a, b), shapes))
           if prop.get(v) is not None]
    # a role one operand tracks and the other spans without tracking it must keep its size
    every = sorted({r for _, t, roles in ops for r in (roles[ax] for ax in t.axes)}, key=lambda r: (r == "k", r))
    for i, (v, s) in enumerate(zip((a, b), shapes)):
        roles = _roles(len(s), len(ys), i == 0)
        mine = set(roles[ax] for ax in prop.get(v).axes) if prop.get(v) is not None else set()
        for r in every:
            if r not in mine and r in roles and s[roles.index(r)] != 1:
                for w, t, other in ops:
                    if w != v and r in [other[ax] for ax in t.axes]:
                        prop.keep_size(w, t.axes[[other[ax] for ax in t.axes].index(r)],
                                       f"MatMul '{node.name}' meets '{v}' there, which carries no tracked channels")
    grids = []
    for v, t, roles in ops:
        labelled = [roles[ax] for ax in t.axes]
        order = sorted(range(len(labelled)), key=lambda i: every.index(labelled[i]))
        grid = np.transpose(t.atoms, order)
        grids.append(grid.reshape([t.atoms.shape[labelled.index(r)] if r in labelled else 1 for r in every]))
    full = np.broadcast_shapes(*(g.shape for g in grids))
    for g in grids[1:]:
        prop.unify(grids[0], g)
    covering = [g for g in grids if g.shape == full]
    if not covering:
        prop.block_inputs(node, f"MatMul '{node.name}' combines channels of its operands on different axes")
        return
    grid = covering[0]
    if "k" in every:
        k = every.index("k")
        classes = prop.uf.find(grid)
        if not (classes == classes.take([0], axis=k)).all():
            for v, t, roles in ops:  # channels are pruned within the contraction: the other axes keep their size
                for ax in t.axes:
                    if roles[ax] != "k":
                        prop.keep_size(v, ax, f"MatMul '{node.name}' contracts them together with other channels")
            return
        grid, every = grid.take(0, axis=k), [r for r in every if r != "k"]
    if every:
        prop.set(y, Tracked(tuple(every), np.ascontiguousarray(grid)))


def attention(node: PNode, prop: Propagation) -> None:
    """Fused attention ``softmax(q·kᵀ)·v`` on (batch, heads, seq, dim) tensors (``scaled_dot_product_attention``):
    q's and k's channels are unified (heads and dims contracted together), v's carry through to the output; the
    heads of q/k and of v are unified where whole heads go (``split=count``), else every head axis keeps its
    size. The scale stays 1/sqrt(head size before pruning), as an attention written out with a constant keeps it."""
    (q, k, v), y = node.inputs[:3], node.outputs[0]
    tq, tk, tv = prop.get(q), prop.get(k), prop.get(v)
    rank = len(prop.shape(y) or ())
    head, dim = rank - 3, rank - 1
    ok = all(t is None or set(t.axes) <= {head, dim} for t in (tq, tk, tv))
    if not ok or any(prop.get(extra) is not None for extra in node.inputs[3:]) or (tq is None) != (tk is None):
        h.unknown(node, prop)
        return
    if tq is not None:
        if tq.axes != tk.axes:
            h.unknown(node, prop)
            return
        prop.unify(tq.atoms, tk.atoms)
        if dim in tq.axes:  # the softmax keeps its temperature: 1/sqrt(the head size before pruning)
            scale = node.attrs.get("scale") or prop.shape(q)[dim] ** -0.5
            prop.edit(node, "scale", lambda kept: scale)
        heads_whole = tq.axes == (head, dim) and (lambda c: (c == c[:, :1]).all())(prop.uf.find(tq.atoms))
        if heads_whole and tv is not None and head in tv.axes and tv.axes[0] == head:
            prop.unify(tq.atoms[:, :1], tv.atoms.reshape(tv.atoms.shape[0], -1))
        elif head in tq.axes:
            for value in (q, k):
                prop.keep_size(value, head, f"attention '{node.name}' needs the same heads in q, k and v")
    if tv is not None:
        if head in tv.axes and (tq is None or head not in tq.axes):
            prop.keep_size(v, head, f"attention '{node.name}' needs the same heads in q, k and v")
        prop.set(y, tv)


def group_norm(node: PNode, prop: Propagation) -> None:
    """GroupNorm (``num_groups`` groups over axis 1, per-channel scale and bias): every group loses the same
    positions, so the group count and each group's size stay consistent."""
    x, y = node.input(0), node.outputs[0]
    tx = prop.channel(node, x, 1)
    groups = int(node.attrs.get("num_groups", 1))
    if tx is None:
        return
    if tx.size % groups:
        prop.block(tx, f"GroupNorm '{node.name}' has channels that do not split into its groups")
        return
    for column in tx.reshape(groups, -1).T:
        prop.unify_all(column)
    prop.slice(node, node.input(1), 0, tx, "norm_scale")
    prop.slice(node, node.input(2), 0, tx, "bias")
    prop.set(y, Tracked((1,), tx))


BUILTIN = {
    "Conv": h.conv, "ConvTranspose": h.conv_transpose, "Gemm": h.gemm, "Linear": h.linear, "MatMul": matmul,
    "BatchNormalization": h.batch_norm, "InstanceNormalization": h.batch_norm,
    "LayerNormalization": h.layer_norm, "GroupNorm": group_norm,
    "ScaledDotProductAttention": attention,  # torch's fused attention (FX); ONNX writes it out as MatMuls
    "Concat": h.concat, "Split": h.split, "Slice": h.slice_, "Gather": gather, "Index": index,
    "SplitToSequence": h.split_to_sequence, "SequenceAt": h.sequence_at,
    "Reshape": reshape, "Flatten": reshape, "Squeeze": reshape, "Unsqueeze": reshape, "Transpose": transpose,
    "Expand": expand, "Pad": pad, "Shape": h.opaque, "Size": h.opaque,
    **{op: h.reduce for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                               "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare")},
    **{op: h.elementwise for op in ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where",
                                    "PRelu", "Equal", "Less", "Greater", "And", "Or", "Mod")},
    **{op: h.passthrough for op in (
        "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu", "Celu", "Gelu",
        "Erf", "Softplus", "Softsign", "Mish", "Silu", "Identity", "Dropout", "Cast", "CastLike", "Abs", "Neg",
        "Sqrt", "Exp", "Log", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Not", "Softmax", "LogSoftmax",
        "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "Resize",
        "Upsample", "Unary")},
}

"""Built-in channel handlers for ops that create, consume or carry channels one axis at a time.

Each is ``handler(node, prop)`` over a :class:`graphopt.prune.view.PNode` in ONNX's op vocabulary (the FX adapter
names torch ops the same way), see :mod:`graphopt.prune.propagate`. Ops that move channels between axes
(Reshape, Transpose, MatMul of two activations, ...) are in :mod:`graphopt.prune.handlers_shape`.
"""

from __future__ import annotations

import numpy as np

from graphopt.prune.propagate import Propagation, Tracked
from graphopt.prune.view import PNode


def unknown(node: PNode, prop: Propagation) -> None:
    """No handler: every channel flowing in is blocked and nothing flows out."""
    prop.block_inputs(node, node.attrs.get("internal") or f"{node.op} '{node.name}' has no channel handler")


def opaque(node: PNode, prop: Propagation) -> None:
    """Reads only shapes or metadata (Shape, Size): channels neither flow through nor are blocked."""


def passthrough(node: PNode, prop: Propagation) -> None:
    """Output 0 carries input 0's channels on the same axes (activations, pooling, Dropout, Cast, Softmax)."""
    x, y = node.input(0), node.outputs[0]
    t = prop.get(x)
    if t is None:
        return
    xs, ys = prop.shape(x), prop.shape(y)
    if xs is None or ys is None or len(xs) != len(ys) or any(xs[a] != ys[a] for a in t.axes):
        prop.block(t.atoms, f"{node.op} '{node.name}' changes the size of a channel axis")
        return
    prop.set(y, t)


def _aligned(t: Tracked, rank: int, out_rank: int) -> Tracked:
    off = out_rank - rank
    return Tracked(tuple(a + off for a in t.axes), t.atoms)


def elementwise(node: PNode, prop: Propagation) -> None:
    """Broadcasting ops (Add, Mul, Where, ...): inputs' channels on the same output axis are unified; a constant
    that spans a channel axis (a per-channel scale) is sliced with it; an activation that spans one but carries
    no tracked channels blocks them."""
    y = node.outputs[0]
    ys = prop.shape(y)
    if ys is None:
        prop.block_inputs(node, f"the shape of '{y}' is not known statically")
        return
    tracked = [_aligned(prop.get(v), len(prop.shape(v)), len(ys)) for v in node.inputs if prop.get(v) is not None]
    if not tracked:
        return
    first = tracked[0]
    if any(t.axes != first.axes for t in tracked):
        prop.block_inputs(node, f"{node.op} '{node.name}' combines channels on different axes")
        return
    for t in tracked[1:]:
        prop.unify(first.atoms, t.atoms)
    for value in node.inputs:
        if value is None or prop.get(value) is not None:
            continue
        array = prop.const(value)
        shape = array.shape if array is not None else prop.shape(value)
        if shape is None:
            prop.block(first.atoms, f"the shape of '{value}' is not known statically")
            return
        off = len(ys) - len(shape)
        spans = [a for a in first.axes if a - off >= 0 and shape[a - off] != 1]
        if not spans:
            continue
        if array is not None and len(first.axes) == 1:
            prop.slice(node, value, first.axes[0] - off, first.atoms, "elementwise")
        else:
            prop.block(first.atoms, f"{node.op} '{node.name}' mixes channels with '{value}', which carries none "
                                    "graphopt can follow")
            return
    prop.set(y, first)


def _weight_or_block(node: PNode, prop: Propagation, index: int) -> np.ndarray | None:
    w = prop.const(node.input(index))
    if w is None:
        prop.block_inputs(node, f"{node.op} '{node.name}' has weights that are not constants")
    return w


def _couple_groups(node: PNode, prop: Propagation, tx: np.ndarray | None, out: np.ndarray, groups: int,
                   cin_g: int) -> str:
    """How a grouped conv prunes; returns the mode, or "" when its channels are blocked.

    ``size`` (the ``split`` setting's default): the same positions go in every group — input position k of every
    group is one class, output position k another — and the group count stays (Torch-Pruning's choice; a
    ResNeXt block keeps its cardinality). ``count`` (``split=count``, and always for depthwise convs, whose
    groups hold one input channel): group j's inputs and outputs are one class, whole groups go, ``group`` is
    updated."""
    cout_g, y = out.size // groups, node.outputs[0]
    if prop.settings.get("split", "size") == "size" and cin_g > 1:
        for column in out.reshape(groups, cout_g).T:
            prop.unify_all(column)
        if tx is not None:
            for column in tx.reshape(groups, cin_g).T:
                prop.unify_all(column)
        return "size"
    if tx is None:
        prop.block(out, f"grouped {node.op} '{node.name}' reads channels graphopt cannot follow")
        return ""
    for j in range(groups):
        prop.unify_all(np.concatenate([tx[j * cin_g:(j + 1) * cin_g], out[j * cout_g:(j + 1) * cout_g]]))
    prop.edit(node, "group", lambda kept: kept.count(y, 1) // cout_g)
    return "count"


def conv(node: PNode, prop: Propagation) -> None:
    """Conv: input channels index weight axis 1, new output channels weight axis 0 and the bias. Grouped and
    depthwise convs: see :func:`_couple_groups`."""
    x, w_name, b_name, y = node.input(0), node.input(1), node.input(2), node.outputs[0]
    w = _weight_or_block(node, prop, 1)
    if w is None:
        return
    groups = int(node.attrs.get("group", 1))
    out = prop.fresh(w.shape[0])
    tx = prop.channel(node, x, 1)
    if groups == 1:
        if tx is not None:
            prop.slice(node, w_name, 1, tx)
    elif _couple_groups(node, prop, tx, out, groups, w.shape[1]) == "size" and tx is not None:
        prop.slice(node, w_name, 1, tx.reshape(groups, -1)[0])
    prop.slice(node, w_name, 0, out)
    prop.slice(node, b_name, 0, out, "bias")
    prop.source(node, y, out)
    prop.set(y, Tracked((1,), out))


def conv_transpose(node: PNode, prop: Propagation) -> None:
    """ConvTranspose: weight is (in, out / group, ...); grouped ones as Conv (:func:`_couple_groups`)."""
    x, w_name, b_name, y = node.input(0), node.input(1), node.input(2), node.outputs[0]
    w = _weight_or_block(node, prop, 1)
    if w is None:
        return
    groups = int(node.attrs.get("group", 1))
    out = prop.fresh(w.shape[1] * groups)
    tx = prop.channel(node, x, 1)
    if groups == 1:
        if tx is not None:
            prop.slice(node, w_name, 0, tx)
        prop.slice(node, w_name, 1, out)
    else:
        mode = _couple_groups(node, prop, tx, out, groups, w.shape[0] // groups)
        if mode and tx is not None:
            prop.slice(node, w_name, 0, tx)
        if mode == "size":
            prop.slice(node, w_name, 1, out.reshape(groups, -1)[0])
    prop.slice(node, b_name, 0, out, "bias")
    prop.source(node, y, out)
    prop.set(y, Tracked((1,), out))


def dense(node: PNode, prop: Propagation, w_name: str, k_axis: int, bias: str | None) -> None:
    """A fully connected layer on the last axis: input features index weight ``k_axis``, new output features
    the other weight axis and the bias."""
    x, y = node.input(0), node.outputs[0]
    w = prop.const(w_name)
    tx = prop.channel(node, x, len(prop.shape(x) or (0, 0)) - 1)
    if tx is not None:
        prop.slice(node, w_name, k_axis, tx)
    out = prop.fresh(w.shape[1 - k_axis])
    prop.slice(node, w_name, 1 - k_axis, out)
    b = prop.const(bias)
    if b is not None and b.ndim >= 1 and b.shape[-1] == out.size:
        prop.slice(node, bias, b.ndim - 1, out, "bias")
    elif b is not None and b.size > 1:
        prop.block(out, f"{node.op} '{node.name}' has a bias that is not one value per output feature")
    ys = prop.shape(y)
    prop.source(node, y, out)
    prop.set(y, Tracked((len(ys) - 1 if ys else 0,), out))  # an unknown shape blocks the new features


def gemm(node: PNode, prop: Propagation) -> None:
    """Gemm with a constant B (a Linear layer); transA and activation B are not followed."""
    w = prop.const(node.input(1))
    if w is None or w.ndim != 2 or node.attrs.get("transA", 0):
        prop.block_inputs(node, f"Gemm '{node.name}' is not a Linear layer (constant B, no transA)")
        return
    dense(node, prop, node.input(1), 1 if node.attrs.get("transB", 0) else 0, node.input(2))


def linear(node: PNode, prop: Propagation) -> None:
    """``nn.Linear`` (FX): weight (out, in) on the last axis."""
    if _weight_or_block(node, prop, 1) is not None:
        dense(node, prop, node.input(1), 1, node.input(2))


def batch_norm(node: PNode, prop: Propagation) -> None:
    """BatchNormalization / InstanceNormalization: per-channel scale, bias and statistics follow axis 1."""
    x, y = node.input(0), node.outputs[0]
    tx = prop.channel(node, x, 1)
    if tx is None:
        return
    for i, role in zip(range(1, 5), ("norm_scale", "bias", "stat", "stat")):
        prop.slice(node, node.input(i), 0, tx, role)
    prop.set(y, Tracked((1,), tx))


def layer_norm(node: PNode, prop: Propagation) -> None:
    """LayerNormalization: channels pass through; on a normalized axis they slice the scale and bias (the
    statistics then cover the kept channels only, as after any pruning)."""
    x, y = node.input(0), node.outputs[0]
    t, xs = prop.get(x), prop.shape(x)
    if t is None:
        return
    first = int(node.attrs.get("axis", -1)) % len(xs)
    for a in t.axes:
        if a >= first:
            if t.axes != (a,):
                prop.block(t.atoms, f"LayerNormalization '{node.name}' normalizes over several channel axes")
                return
            for value, role in ((node.input(1), "norm_scale"), (node.input(2), "bias")):  # they shrink together
                array = prop.const(value)
                if array is None and value is not None:  # computed at run time: prop.slice blocks the channels
                    prop.slice(node, value, 0, t.atoms, role)
                elif array is not None and a - len(xs) + array.ndim >= 0:  # broadcast from the right, as ONNX does
                    prop.slice(node, value, a - len(xs) + array.ndim, t.atoms, role)
    prop.set(y, t)


def concat(node: PNode, prop: Propagation) -> None:
    """Concat on a channel axis lays its inputs' channels side by side (each input keeps its own offset); a
    Concat on another axis unifies the inputs' channels like an elementwise op."""
    y = node.outputs[0]
    rank = len(prop.shape(y) or ())
    if not rank or any(prop.shape(v) is None for v in node.inputs if v is not None):
        prop.block_inputs(node, f"Concat '{node.name}' has shapes that are not known statically")
        return
    axis = int(node.attrs.get("axis", 0)) % rank
    if not any(axis in prop.get(v).axes for v in node.inputs if prop.get(v) is not None):
        elementwise(node, prop)  # no channel on the concat axis: same rule as broadcasting ops
        return
    parts = []
    for value in node.inputs:
        t = prop.get(value)
        if t is not None and t.axes == (axis,):
            parts.append(t.atoms)
            continue
        size = prop.shape(value)[axis]
        atoms = prop.fresh(size)
        if t is not None:
            prop.block(t.atoms, f"Concat '{node.name}' joins '{value}' whose channels lie on other axes")
        if prop.const(value) is not None:
            prop.slice(node, value, axis, atoms, "elementwise")
        else:
            prop.block(atoms, f"Concat '{node.name}' joins '{value}', whose channels graphopt cannot follow")
        parts.append(atoms)
    prop.set(y, Tracked((axis,), np.concatenate(parts)))


def split(node: PNode, prop: Propagation) -> None:
    """Split on a channel axis hands each output its slice of the channels; sizes are rewritten, and a group
    spread over several outputs loses the same share in each (ShuffleNet's halves stay halves)."""
    x = node.input(0)
    t = prop.get(x)
    if t is None:
        return
    axis = int(node.attrs.get("axis", 0)) % len(prop.shape(x))
    if axis not in t.axes:
        for out in node.outputs:
            passthrough(PNode(node.name, node.op, [x], [out]), prop)
        return
    if t.axes != (axis,):
        prop.block(t.atoms, f"Split '{node.name}' splits one of several channel axes")
        return
    sizes = [(prop.shape(out) or [None] * (axis + 1))[axis] for out in node.outputs]
    if None in sizes or sum(sizes) != t.atoms.size:
        prop.block(t.atoms, f"Split '{node.name}' has output sizes that are not known statically")
        return
    offsets = np.cumsum([0, *sizes])
    for out, lo, hi in zip(node.outputs, offsets[:-1], offsets[1:]):
        prop.set(out, Tracked((axis,), t.atoms[lo:hi]))
    prop.balance([t.atoms[lo:hi] for lo, hi in zip(offsets[:-1], offsets[1:])])
    outputs = list(node.outputs)
    prop.edit(node, "split", lambda kept: [kept.count(out, axis) for out in outputs])


def split_to_sequence(node: PNode, prop: Propagation) -> None:
    """SplitToSequence with constant sizes (torch's dynamo export of ``chunk``): like Split, into a sequence whose
    items SequenceAt picks."""
    x, sizes = node.input(0), prop.const(node.input(1))
    t = prop.get(x)
    if t is None:
        return
    axis = int(node.attrs.get("axis", 0)) % len(prop.shape(x))
    if axis not in t.axes:
        prop.sequences[node.outputs[0]] = [t]  # any item carries the same channels: SequenceAt reads item 0
        return
    if (t.axes != (axis,) or sizes is None or sizes.ndim > 1 or not int(node.attrs.get("keepdims", 1))
            or (sizes < 1).any() or (sizes.ndim == 1 and int(sizes.sum()) != t.atoms.size)):
        prop.block(t.atoms, f"SplitToSequence '{node.name}' splits a channel axis by sizes it cannot rewrite")
        return
    if sizes.ndim == 0:  # one size: chunks of it, the last one shorter (rewritten as explicit sizes)
        sizes = np.array([min(int(sizes), t.atoms.size - lo) for lo in range(0, t.atoms.size, int(sizes))])
    offsets = np.cumsum([0, *sizes.tolist()])
    parts = [t.atoms[lo:hi] for lo, hi in zip(offsets[:-1], offsets[1:])]
    prop.sequences[node.outputs[0]] = [Tracked((axis,), p) for p in parts]
    prop.balance(parts)
    prop.edit(node, "input:1", lambda kept: [int(kept.keep_atom[p].sum()) for p in parts])


def sequence_at(node: PNode, prop: Propagation) -> None:
    items, position = prop.sequences.get(node.input(0)), prop.const(node.input(1))
    if items is None:
        return
    if position is None:
        for item in items:
            prop.block(item.atoms, f"SequenceAt '{node.name}' picks an item by a run-time position")
        return
    prop.set(node.outputs[0], items[0] if len(items) == 1 else items[int(position)])


def slice_(node: PNode, prop: Propagation) -> None:
    """Slice with constant starts/ends (step 1) on a channel axis keeps that range of channels; the bounds are
    rewritten to the same channels' new positions."""
    x, y = node.input(0), node.outputs[0]
    t = prop.get(x)
    if t is None:
        return
    starts, ends = prop.const(node.input(1)), prop.const(node.input(2))
    axes, steps = prop.const(node.input(3)), prop.const(node.input(4))
    xs = prop.shape(x)
    if starts is None or ends is None or xs is None:
        prop.block(t.atoms, f"Slice '{node.name}' has bounds that are not constants")
        return
    axes = [int(a) % len(xs) for a in (axes if axes is not None else range(len(starts)))]
    atoms, cut = t.atoms, []
    for i, axis in enumerate(axes):
        if axis not in t.axes:
            continue
        step = int(steps[i]) if steps is not None else 1
        if t.axes != (axis,) or step != 1:
            prop.block(t.atoms, f"Slice '{node.name}' cuts a channel axis with a step or across several axes")
            return
        lo, hi, _ = slice(int(starts[i]), int(ends[i])).indices(xs[axis])
        atoms = atoms[lo:hi]
        cut.append((i, axis, lo))
    if cut:
        starts0, ends0 = [int(v) for v in starts], [int(v) for v in ends]

        def bounds(kept, cut=cut):
            new_starts, new_ends = list(starts0), list(ends0)
            for i, axis, lo in cut:
                new_starts[i] = int(np.searchsorted(kept.indices(x, axis), lo))
                new_ends[i] = new_starts[i] + kept.count(y, axis)
            return new_starts, new_ends

        prop.edit(node, "slice", bounds)
        prop.cuts.setdefault(x, []).append(atoms)
    prop.set(y, Tracked(t.axes, atoms))


def reduce(node: PNode, prop: Propagation) -> None:
    """Reduce* keeps the channels of axes it does not reduce; a reduced channel axis simply ends there."""
    x, y = node.input(0), node.outputs[0]
    t, xs = prop.get(x), prop.shape(x)
    if t is None:
        return
    axes = node.attrs.get("axes")
    if axes is None and prop.const(node.input(1)) is not None:
        axes = prop.const(node.input(1)).tolist()
    reduced = set(range(len(xs))) if not axes else {int(a) % len(xs) for a in axes}
    left = [a for a in t.axes if a not in reduced]
    if len(left) != len(t.axes):
        if left:
            prop.block(t.atoms, f"{node.op} '{node.name}' reduces some of several channel axes")
        return
    if not int(node.attrs.get("keepdims", 1)):
        left = [a - sum(1 for r in reduced if r < a) for a in left]
    prop.set(y, Tracked(tuple(left), t.atoms))

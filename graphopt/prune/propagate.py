"""Channel propagation: which tensor dimensions must shrink together, found by following every channel.

Every channel a prunable op creates (a Conv's output channel, a Gemm's output feature, an embedding column) is
an *atom*, a small integer. Walking the graph in order, each op's channel handler says where its inputs' atoms
go: an activation passes them through, a Concat lays its inputs' atoms side by side, a Flatten repeats each one
over H×W features, a Transpose moves them to another axis, an Add *unifies* the atoms of its two inputs (the
residual's channels must be pruned with the same indices). Atoms that end up unified form a *class*: one
prunable channel, wherever it appears. A value's channels are recorded as :class:`Tracked` — the axes that carry
atoms and an array of atoms over those axes (two axes after a Reshape splits a hidden size into heads × size).

Handlers also record what pruning a class must change — the slices of constants (weight rows and columns, BN
statistics, per-channel scales) and node attributes (Conv ``group``, Reshape targets, Split sizes) — and they
*block* atoms they cannot follow (an op with no handler, a graph output, a tensor mixed with one graphopt cannot
track); a class with a blocked atom is never pruned. See :mod:`graphopt.prune.plan` for how classes are chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from graphopt.prune.view import ChannelView, PNode


@dataclass
class Tracked:
    """The atoms of a value: ``atoms.shape`` equals the value's dims at ``axes`` (ascending, non-negative)."""

    axes: tuple[int, ...]
    atoms: np.ndarray

    def on(self, axis: int) -> np.ndarray | None:
        """The atoms along ``axis`` when that is the only tracked axis, else None."""
        return self.atoms if self.axes == (axis,) else None


class UnionFind:
    def __init__(self) -> None:
        self.parent = np.zeros(0, dtype=np.int64)

    def new(self, shape) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        start = len(self.parent)
        self.parent = np.concatenate([self.parent, np.arange(start, start + n, dtype=np.int64)])
        return np.arange(start, start + n, dtype=np.int64).reshape(shape)

    def find(self, atoms: np.ndarray) -> np.ndarray:
        roots = np.asarray(atoms, dtype=np.int64)
        while True:
            up = self.parent[roots]
            if np.array_equal(up, roots):
                return roots
            roots = up

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Unify ``a[i]`` with ``b[i]`` elementwise (numpy broadcasting applies)."""
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        parent = self.parent
        for x, y in zip(a.ravel().tolist(), b.ravel().tolist()):
            while parent[x] != x:
                x = int(parent[x])
            while parent[y] != y:
                y = int(parent[y])
            if x != y:
                parent[max(x, y)] = min(x, y)

    def union_all(self, atoms: np.ndarray) -> None:
        flat = np.asarray(atoms).ravel()
        if flat.size > 1:
            self.union(flat[:1], flat[1:])


@dataclass
class Slice:
    """Constant ``value`` is indexed along ``axis`` by ``atoms`` (one per index)."""

    value: str
    axis: int
    atoms: np.ndarray
    role: str  # "weight", "norm_scale", "bias", "stat", "elementwise": what importance criteria may read
    node: str


@dataclass
class Source:
    """A node that creates channels: pruning counts ratios per group of sources."""

    node: str
    op: str
    value: str
    atoms: np.ndarray


@dataclass
class Edit:
    """Node attribute ``key`` becomes ``compute(kept)`` after pruning (see :class:`graphopt.prune.plan.Kept`)."""

    node: str
    key: str
    compute: Callable[[Any], Any]


@dataclass
class Propagation:
    """The state channel handlers read and write. A handler is ``handler(node, prop)``."""

    view: ChannelView
    settings: dict[str, Any] = field(default_factory=dict)  # pass options handlers read ("split": size|count)
    uf: UnionFind = field(default_factory=UnionFind)
    tracked: dict[str, Tracked] = field(default_factory=dict)
    slices: dict[tuple[str, int], Slice] = field(default_factory=dict)
    sources: list[Source] = field(default_factory=list)
    edits: list[Edit] = field(default_factory=list)
    blocked: list[tuple[np.ndarray, str]] = field(default_factory=list)
    fixed: list[tuple[str, int, str]] = field(default_factory=list)  # (value, axis, why): must keep its size
    balanced: list[list[np.ndarray]] = field(default_factory=list)  # parts to prune alike (a Split's outputs)
    cuts: dict[str, list[np.ndarray]] = field(default_factory=dict)  # value -> channels its Slices take
    sequences: dict[str, list[Tracked]] = field(default_factory=dict)  # a tensor sequence -> its items' channels
    producers: dict[str, PNode] | None = None  # value -> the node writing it, built on first use

    # -- reading ------------------------------------------------------------------------------------------
    def get(self, value: str | None) -> Tracked | None:
        return None if value is None else self.tracked.get(value)

    def shape(self, value: str | None) -> tuple | None:
        return self.view.shape(value)

    def const(self, value: str | None) -> np.ndarray | None:
        return self.view.const(value)

    def producer(self, value: str | None) -> PNode | None:
        """The node that writes ``value`` (None for inputs and constants)."""
        if self.producers is None:
            self.producers = {out: node for node in self.view.nodes for out in node.outputs}
        return self.producers.get(value)

    def channel(self, node: PNode, value: str | None, axis: int) -> np.ndarray | None:
        """The atoms of ``value`` along ``axis``; a value tracked on any other axis is blocked (None)."""
        t = self.get(value)
        if t is None:
            return None
        rank = len(self.shape(value) or ())
        axis = axis % rank if rank else axis
        if t.axes == (axis,):
            return t.atoms
        self.block(t.atoms, f"{node.op} '{node.name}' reads channels of '{value}' on an axis it cannot prune")
        return None

    # -- writing ------------------------------------------------------------------------------------------
    def set(self, value: str, tracked: Tracked | None) -> None:
        if tracked is None or tracked.atoms.size == 0:
            return
        shape = self.shape(value)
        if shape is None or any(a >= len(shape) or shape[a] != tracked.atoms.shape[i]
                                for i, a in enumerate(tracked.axes)):
            self.block(tracked.atoms, f"the shape of '{value}' is not known statically")
            return
        self.tracked[value] = tracked

    def fresh(self, shape) -> np.ndarray:
        return self.uf.new(shape)

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        self.uf.union(a, b)

    def unify_all(self, atoms: np.ndarray) -> None:
        self.uf.union_all(atoms)

    def block(self, atoms: np.ndarray, reason: str) -> None:
        self.blocked.append((np.asarray(atoms).ravel(), reason))

    def block_inputs(self, node: PNode, reason: str) -> None:
        for value in node.inputs:
            t = self.get(value)
            if t is not None:
                self.block(t.atoms, reason)

    def slice(self, node: PNode, value: str | None, axis: int, atoms: np.ndarray, role: str = "weight") -> None:
        """Constant ``value`` shrinks along ``axis`` with ``atoms``; a second user of the same slice shares it."""
        if value is None:
            return
        array = self.const(value)
        if array is None:  # a bias or scale computed at run time cannot be sliced: its channels stay
            self.block(atoms, f"'{value}', read by {node.op} '{node.name}', is computed at run time (fold first: "
                              "--passes fold,prune)")
            return
        if array.ndim == 0:
            return
        axis = axis % array.ndim
        if array.shape[axis] != atoms.size:
            if array.shape[axis] != 1:  # a broadcast (size-1) axis needs no slicing
                self.block(atoms, f"constant '{value}' of {node.op} '{node.name}' does not match its channels")
            return
        key = (value, axis)
        if key in self.slices:
            self.unify(self.slices[key].atoms, atoms)
        else:
            self.slices[key] = Slice(value, axis, np.asarray(atoms).ravel(), role, node.name)

    def source(self, node: PNode, value: str, atoms: np.ndarray) -> None:
        self.sources.append(Source(node.name, node.op, value, np.asarray(atoms).ravel()))

    def edit(self, node: PNode, key: str, compute: Callable[[Any], Any]) -> None:
        self.edits.append(Edit(node.name, key, compute))

    def balance(self, parts: list[np.ndarray]) -> None:
        """Prune these parts of a group in proportion to their sizes (a Split's outputs), not lowest-first."""
        self.balanced.append([np.asarray(p).ravel() for p in parts])

    def keep_size(self, value: str, axis: int, why: str) -> None:
        self.fixed.append((value, axis, why))


Handler = Callable[[PNode, Propagation], None]


def propagate(view: ChannelView, handlers: dict[str, Handler], fallback: Handler,
              ignore: Callable[[PNode], bool] = lambda node: False, settings: dict | None = None) -> Propagation:
    """Run every node's handler in order; block graph outputs and the sources of ignored nodes."""
    prop = Propagation(view, dict(settings or {}))
    for node in view.nodes:
        handler = handlers.get(node.op, fallback)
        before, atoms, edits = len(prop.sources), len(prop.uf.parent), len(prop.edits)
        try:
            handler(node, prop)
        except Exception as exc:  # a handler bug must not fail the pass: what the node touched is kept whole
            _contain(prop, node, exc, atoms, edits)
        if ignore(node):
            for src in prop.sources[before:]:
                prop.block(src.atoms, f"'{node.name}' is in the ignore list")
    for src in prop.sources:  # channels made where no consumer can follow them cannot go
        if src.value not in prop.tracked:
            prop.block(src.atoms, f"{src.op} '{src.node}' writes '{src.value}', whose channels graphopt cannot follow")
    prop.balanced += [parts for parts in prop.cuts.values() if len(parts) > 1]  # Slices of one value: a Split
    for value in view.outputs:
        t = prop.get(value)
        if t is not None:
            prop.block(t.atoms, f"graph output '{value}' keeps its shape")
    return prop


def internal_reason(exc: BaseException) -> str:
    """The reason a group is kept whole after an error inside graphopt (a bug to report)."""
    text = str(exc).strip().splitlines()
    return f"internal: {type(exc).__name__}: {text[0][:150] if text else ''}".rstrip(": ")


def _contain(prop: Propagation, node: PNode, exc: Exception, atoms: int, edits: int) -> None:
    """After ``node``'s handler raised: block the channels flowing in and every atom it made, drop the edits it
    recorded and what it wrote on its outputs (nothing flows out, as for an op without a handler)."""
    reason = f"{internal_reason(exc)} (in the channel handler of {node.op} '{node.name}')"
    prop.block_inputs(node, reason)
    made = np.arange(atoms, len(prop.uf.parent), dtype=np.int64)
    if made.size:
        prop.block(made, reason)
    del prop.edits[edits:]
    for value in node.outputs:
        t = prop.tracked.pop(value, None)
        if t is not None:
            prop.block(t.atoms, reason)
        prop.sequences.pop(value, None)

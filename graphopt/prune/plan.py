"""From propagated channels to a pruning plan: groups, importance, selection, validation.

A *group* is every class (prunable channel) the same sources create: a Conv's output channels, or the channels of
all Convs joined by residual Adds. Ratios count per group (``uniform``) or across groups (``global``, scores
normalized by each group's mean). A group with a blocked class is left whole, with the reason. Each group's
choice is validated before it is taken: every tracked value must keep at least one index on each channel axis and
stay rectangular (a split into heads loses whole rows or columns), and axes that must keep their size do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from graphopt.prune.propagate import Propagation, Source, internal_reason
from graphopt.prune.view import Plan

# importance(array, axis, role, grad) -> one score per index along axis, or None when it does not read this slice
Importance = Callable[[np.ndarray, int, str, "np.ndarray | None"], "np.ndarray | None"]


@dataclass
class Group:
    classes: np.ndarray
    sources: list[Source]
    width: int  # channels of the first source per class (1, or the channels of one group of a grouped conv)
    ratio: float = 0.0
    pinned: bool = False  # its ratio came from layer_ratios (global scope leaves it alone)
    blocked: str | None = None
    dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def name(self) -> str:
        return self.sources[0].node

    @property
    def channels(self) -> int:
        return int(self.sources[0].atoms.size)


@dataclass
class Selection:
    dropped: np.ndarray
    fallback_criterion: list[str] = field(default_factory=list)  # groups the criterion could not score


class Kept:
    """Which indices of each tracked value survive ``dropped`` classes; what edits and checks read."""

    def __init__(self, prop: Propagation, roots: np.ndarray, dropped: np.ndarray):
        self.prop, self.keep_atom = prop, ~np.isin(roots, dropped)

    def mask(self, value: str) -> np.ndarray | None:
        t = self.prop.get(value)
        return None if t is None else self.keep_atom[t.atoms]

    def indices(self, value: str, axis: int) -> np.ndarray:
        t = self.prop.get(value)
        if t is None or axis not in t.axes:
            return np.arange(self.prop.shape(value)[axis])
        m = self.keep_atom[t.atoms]
        i = t.axes.index(axis)
        return np.nonzero(m.any(axis=tuple(j for j in range(m.ndim) if j != i)))[0]

    def count(self, value: str, axis: int) -> int:
        return int(self.indices(value, axis).size)

    def problem(self, value: str) -> str | None:
        m = self.mask(value)
        if m is None or m.all():
            return None
        per_axis = [m.any(axis=tuple(j for j in range(m.ndim) if j != i)) for i in range(m.ndim)]
        if not all(p.any() for p in per_axis):
            return f"it would remove every channel of '{value}'"
        rect = np.ones(m.shape, dtype=bool)
        for i, p in enumerate(per_axis):
            rect &= p.reshape([-1 if j == i else 1 for j in range(m.ndim)])
        if not np.array_equal(m, rect):
            return f"it would leave '{value}' ragged (channels split across axes pruned unevenly)"
        return None


def build_groups(prop: Propagation, roots: np.ndarray) -> list[Group]:
    blocked: dict[int, str] = {}
    for atoms, reason in prop.blocked:
        for c in np.unique(roots[atoms]).tolist():
            blocked.setdefault(c, reason)
    parent: dict[int, int] = {}

    def find(c: int) -> int:
        while parent.setdefault(c, c) != c:
            c = parent[c]
        return c

    for src in prop.sources:
        cls = np.unique(roots[src.atoms]).tolist()
        for c in cls[1:]:
            a, b = find(cls[0]), find(c)
            if a != b:
                parent[max(a, b)] = min(a, b)
    members: dict[int, list[Source]] = {}
    for src in prop.sources:
        members.setdefault(find(int(roots[src.atoms[0]])), []).append(src)
    classes: dict[int, set[int]] = {}
    for c in list(parent):
        classes.setdefault(find(c), set()).add(c)
    groups = []
    for root, sources in members.items():
        cls = np.array(sorted(classes.get(root, {root})), dtype=np.int64)
        width = sources[0].atoms.size // len(np.unique(roots[sources[0].atoms]))
        reason = next((blocked[c] for c in cls.tolist() if c in blocked), None)
        groups.append(Group(cls, sources, max(width, 1), blocked=reason))
    return groups


def score_classes(prop: Propagation, roots: np.ndarray, importance: Importance) -> dict[int, float]:
    """Each class's score: per constant slice that the criterion reads, the sum over the class's indices; then
    the mean over the slices that touch the class."""
    total: dict[int, float] = {}
    count: dict[int, int] = {}
    for s in prop.slices.values():
        scores = importance(prop.view.consts[s.value], s.axis, s.role, prop.view.grads.get(s.value))
        if scores is None:
            continue
        cls, inverse = np.unique(roots[s.atoms], return_inverse=True)
        sums = np.bincount(inverse, weights=np.asarray(scores, dtype=np.float64), minlength=cls.size)
        for c, v in zip(cls.tolist(), sums.tolist()):
            total[c] = total.get(c, 0.0) + v
            count[c] = count.get(c, 0) + 1
    return {c: total[c] / count[c] for c in total}


def _keep_count(n: int, ratio: float, width: int, round_to: int, min_channels: int) -> int:
    keep = n - int(n * ratio + 1e-9)
    step = round_to // math.gcd(round_to, width) if round_to > 1 else 1
    keep = min(n, -(-keep // step) * step)
    return min(n, max(keep, -(-min_channels // width), 1))


def select(prop: Propagation, roots: np.ndarray, groups: list[Group], scores: dict[int, float],
           fallback: dict[int, float], *, scope: str, ratio: float, round_to: int, min_channels: int) -> Selection:
    """Choose the classes to drop in each unblocked group, lowest score first, validating group by group."""
    sel = Selection(np.zeros(0, dtype=np.int64))
    live = [g for g in groups if g.blocked is None and g.ratio > 0]
    score_of: dict[int, np.ndarray] = {}
    for g in live:
        if all(c in scores for c in g.classes.tolist()):
            score_of[id(g)] = np.array([scores[c] for c in g.classes.tolist()])
        else:
            sel.fallback_criterion.append(g.name)
            score_of[id(g)] = np.array([fallback.get(c, 0.0) for c in g.classes.tolist()])
    for g in live:  # NaN or infinite weights give no ranking: say which tensor, and leave the group whole
        if not np.isfinite(score_of[id(g)]).all():
            g.blocked = f"'{_nonfinite_value(prop, roots, g)}' holds NaN or infinite values: its channels cannot be " \
                        f"ranked"
    live = [g for g in live if g.blocked is None]
    per_group = {id(g): g.classes.size - _keep_count(g.classes.size, g.ratio, g.width, round_to, min_channels)
                 for g in live}
    if scope == "global":  # groups with a layer ratio keep it; the others share the global budget
        per_group.update(_global_counts([g for g in live if not g.pinned], score_of, ratio, round_to, min_channels))
    checker = _Checker(prop, roots)
    for g in live:
        before = checker.dropped
        try:
            _choose(prop, roots, g, per_group[id(g)], score_of[id(g)], checker)
        except Exception as exc:  # an engine bug must not fail the pass: this group is kept whole
            checker.dropped, g.dropped, g.blocked = before, np.zeros(0, dtype=np.int64), internal_reason(exc)
    sel.dropped = checker.dropped
    return sel


def _nonfinite_value(prop: Propagation, roots: np.ndarray, g: Group) -> str:
    """The first constant read for ``g``'s channels that holds NaN or infinity (its value name)."""
    for s in prop.slices.values():
        values = prop.view.consts[s.value]
        if np.isin(roots[s.atoms], g.classes).any() and np.issubdtype(values.dtype, np.floating) \
                and not np.isfinite(values).all():
            return s.value
    return "a weight"


def _choose(prop: Propagation, roots: np.ndarray, g: Group, n_drop: int, scores: np.ndarray,
            checker: "_Checker") -> None:
    """Drop ``n_drop`` of ``g``'s classes, lowest score first, skipping any the checker refuses."""
    if n_drop <= 0:
        return
    ranked = g.classes[np.argsort(scores, kind="stable")]
    first = _spread(ranked, n_drop, _parts(prop, roots, g))
    problem = checker.try_drop(first)
    if problem is None:
        g.dropped = np.sort(first)
        return
    chosen: list[int] = []  # the lowest-scored set fails: take classes one by one, skipping any that fails
    for c in ranked.tolist():
        if len(chosen) == n_drop:
            break
        if checker.try_drop(np.array(chosen + [c]), commit=False) is None:
            chosen.append(c)
    if chosen:
        checker.try_drop(np.array(chosen))
        g.dropped = np.sort(np.array(chosen))
    else:
        g.blocked = f"pruning it: {problem}"


def _global_counts(groups: list[Group], score_of: dict[int, np.ndarray], ratio: float, round_to: int,
                   min_channels: int) -> dict[int, int]:
    """How many classes each group loses when ``ratio`` of all their classes go, lowest normalized score first
    (each group's scores divided by their mean, as Torch-Pruning's global pruning normalizes)."""
    ranked = sorted((v / (score_of[id(g)].mean() or 1.0), id(g)) for g in groups for v in score_of[id(g)].tolist())
    budget = int(sum(g.classes.size for g in groups) * ratio + 1e-9)
    left = {id(g): g.classes.size for g in groups}
    floor = {id(g): _keep_count(g.classes.size, 1.0, g.width, 1, min_channels) for g in groups}
    for _, gid in ranked:
        if budget <= 0:
            break
        if left[gid] > floor[gid]:
            left[gid] -= 1
            budget -= 1
    counts = {}
    for g in groups:
        keep = _keep_count(g.classes.size, 1 - left[id(g)] / g.classes.size, g.width, round_to, min_channels)
        counts[id(g)] = g.classes.size - max(keep, left[id(g)])
    return counts


def _parts(prop: Propagation, roots: np.ndarray, g: Group) -> list[set[int]]:
    """The group's classes split by the first Split that divides them (a channel split, as in ShuffleNet)."""
    mine = set(g.classes.tolist())
    for outputs in prop.balanced:
        parts = [mine & set(np.unique(roots[atoms]).tolist()) for atoms in outputs]
        parts = [p for p in parts if p]
        if len(parts) > 1:
            rest = mine - set().union(*parts)
            return parts + ([rest] if rest else [])
    return []


def _spread(ranked: np.ndarray, n_drop: int, parts: list[set[int]]) -> np.ndarray:
    """The ``n_drop`` lowest-ranked classes, each part losing its share (so a split's outputs shrink alike)."""
    if not parts:
        return ranked[:n_drop]
    quota = [int(n_drop * len(p) / ranked.size) for p in parts]
    chosen = []
    for c in ranked.tolist():
        i = next(i for i, p in enumerate(parts) if c in p)
        if quota[i] > 0:
            chosen.append(c)
            quota[i] -= 1
    for c in ranked.tolist():  # what rounding left over, lowest first
        if len(chosen) >= n_drop:
            break
        if c not in chosen:
            chosen.append(c)
    return np.array(chosen[:n_drop], dtype=np.int64)


class _Checker:
    """Adds groups' drops one at a time, refusing a drop that would leave some value invalid."""

    def __init__(self, prop: Propagation, roots: np.ndarray):
        self.prop, self.roots = prop, roots
        self.dropped = np.zeros(0, dtype=np.int64)
        self.values_of: dict[int, list[str]] = {}
        for value, t in prop.tracked.items():
            for c in np.unique(roots[t.atoms]).tolist():
                self.values_of.setdefault(c, []).append(value)

    def try_drop(self, classes: np.ndarray, commit: bool = True) -> str | None:
        trial = np.concatenate([self.dropped, classes])
        kept = Kept(self.prop, self.roots, trial)
        touched = {v for c in classes.tolist() for v in self.values_of.get(c, [])}
        for value in sorted(touched):
            problem = kept.problem(value)
            if problem:
                return problem
        for value, axis, why in self.prop.fixed:
            if value in touched and kept.count(value, axis) != self.prop.shape(value)[axis]:
                return f"it would shrink an axis of '{value}' that must keep its size ({why})"
        if commit:
            self.dropped = trial
        return None


def build_plan(prop: Propagation, roots: np.ndarray, dropped: np.ndarray) -> Plan:
    """New arrays for every sliced constant and new values for every edited attribute."""
    kept = Kept(prop, roots, dropped)
    plan = Plan()
    for s in prop.slices.values():
        keep = np.nonzero(kept.keep_atom[s.atoms])[0]
        if keep.size == s.atoms.size:
            continue
        array = plan.consts.get(s.value, prop.view.consts[s.value])
        plan.consts[s.value] = np.take(array, keep, axis=s.axis)
        plan.kept[(s.value, s.axis)] = keep
    for e in prop.edits:
        plan.attrs[(e.node, e.key)] = e.compute(kept)
    return plan

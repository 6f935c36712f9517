"""Structured channel pruning over a neutral view of either IR (see :mod:`graphopt.prune.propagate`).

``prune_view`` runs the whole analysis on a :class:`ChannelView` and returns an :class:`Outcome` whose ``plan`` an
IR adapter applies. Channel handlers and importance criteria come from plugins (``graphopt_register_channel_
handlers`` / ``graphopt_register_importance``); :data:`BUILTIN_HANDLERS` and :data:`BUILTIN_IMPORTANCE` are the ones
graphopt registers itself.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from graphopt.passes.options import name_matches
from graphopt.prune.handlers import unknown
from graphopt.prune.handlers_shape import BUILTIN as BUILTIN_HANDLERS
from graphopt.prune.importance import BUILTIN as BUILTIN_IMPORTANCE
from graphopt.prune.plan import Group, Importance, build_groups, build_plan, score_classes, select
from graphopt.prune.propagate import Propagation, propagate
from graphopt.prune.view import ChannelView, Plan, PNode

__all__ = ["BUILTIN_HANDLERS", "BUILTIN_IMPORTANCE", "ChannelView", "Outcome", "PNode", "Plan", "prune_view"]


@dataclass
class Outcome:
    plan: Plan
    groups: list[Group]
    prop: Propagation
    roots: np.ndarray  # each atom's class
    fallback_criterion: list[str]

    @property
    def pruned_groups(self) -> list[Group]:
        return [g for g in self.groups if g.dropped.size]

    def channels_removed(self) -> int:
        """Channels removed from the sources (a residual group's channels count once per source)."""
        keep = ~np.isin(self.roots, self._dropped())
        return sum(int((~keep[s.atoms]).sum()) for g in self.groups for s in g.sources)

    def _dropped(self) -> np.ndarray:
        parts = [g.dropped for g in self.groups if g.dropped.size]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def blocked_reasons(self) -> Counter:
        return Counter(g.blocked for g in self.groups if g.blocked)

    def rows(self) -> list[dict]:
        """One row per group: its first source, how many sources, classes before and after, why it was kept."""
        return [{"group": g.name, "sources": [s.node for s in g.sources], "channels": g.channels,
                 "classes": int(g.classes.size), "pruned_classes": int(g.dropped.size), "blocked": g.blocked}
                for g in self.groups]


def prune_view(view: ChannelView, *, handlers: dict, criterion: Importance, fallback: Importance, ratio: float,
               scope: str = "uniform", layer_ratios: dict[str, float] | None = None, round_to: int = 1,
               min_channels: int = 1, ignore: tuple[str, ...] = (), split: str = "size") -> Outcome:
    """Analyse ``view`` and choose what to prune; ``layer_ratios`` and ``ignore`` match node names."""
    def ignored(node: PNode) -> bool:
        return any(name_matches(p, node.name) for p in ignore)

    prop = propagate(view, handlers, unknown, ignored, {"split": split})
    roots = prop.uf.find(np.arange(len(prop.uf.parent)))
    groups = build_groups(prop, roots)
    for g in groups:
        g.ratio = ratio
        for pattern, value in (layer_ratios or {}).items():
            if any(name_matches(pattern, s.node) for s in g.sources):
                g.ratio, g.pinned = value, True
                break
    scores = score_classes(prop, roots, criterion)
    backup = score_classes(prop, roots, fallback) if fallback is not criterion else scores
    sel = select(prop, roots, groups, scores, backup, scope=scope, ratio=ratio, round_to=round_to,
                 min_channels=min_channels)
    return Outcome(build_plan(prop, roots, sel.dropped), groups, prop, roots, sel.fallback_criterion)

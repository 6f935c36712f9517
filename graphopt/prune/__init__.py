"""Structured channel pruning over a neutral view of either IR (see :mod:`graphopt.prune.propagate`).

``prune_view`` runs the whole analysis on a :class:`ChannelView` and returns an :class:`Outcome` whose ``plan`` an
IR adapter applies; :func:`settle` applies it through a callback that also checks the result, and keeps whole any
group whose pruning makes graphopt fail (``internal: ...``, a bug to report) while the others are pruned. Channel
handlers and importance criteria come from plugins (``graphopt_register_channel_handlers`` /
``graphopt_register_importance``); :data:`BUILTIN_HANDLERS` and :data:`BUILTIN_IMPORTANCE` are the ones graphopt
registers itself.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.passes.options import name_matches
from graphopt.prune.handlers import unknown
from graphopt.prune.handlers_shape import BUILTIN as BUILTIN_HANDLERS
from graphopt.prune.importance import BUILTIN as BUILTIN_IMPORTANCE
from graphopt.prune.plan import Group, Importance, build_groups, build_plan, score_classes, select
from graphopt.prune.propagate import Propagation, internal_reason, propagate
from graphopt.prune.view import ChannelView, Plan, PNode

__all__ = ["BUILTIN_HANDLERS", "BUILTIN_IMPORTANCE", "ChannelView", "Outcome", "PNode", "Plan", "prune_view",
           "settle"]


@dataclass
class Outcome:
    groups: list[Group]
    prop: Propagation
    roots: np.ndarray  # each atom's class
    fallback_criterion: list[str]
    gave_up: str | None = None  # why nothing was pruned after all (see settle)
    unmatched_ignore: list[str] = field(default_factory=list)  # ``ignore`` patterns no node matched (a typo?)

    @property
    def pruned_groups(self) -> list[Group]:
        return [g for g in self.groups if g.dropped.size]

    @property
    def plan(self) -> Plan:
        """The constants and attributes that pruning every pruned group changes."""
        return self.plan_for(self.pruned_groups)

    def plan_for(self, groups: list[Group]) -> Plan:
        return build_plan(self.prop, self.roots, _dropped(groups))

    def channels_removed(self) -> int:
        """Channels removed from the sources (a residual group's channels count once per source)."""
        keep = ~np.isin(self.roots, _dropped(self.groups))
        return sum(int((~keep[s.atoms]).sum()) for g in self.groups for s in g.sources)

    def blocked_reasons(self) -> Counter:
        return Counter(g.blocked for g in self.groups if g.blocked)

    def rows(self) -> list[dict]:
        """One row per group: its first source, how many sources, classes before and after, why it was kept."""
        return [{"group": g.name, "sources": [s.node for s in g.sources], "channels": g.channels,
                 "classes": int(g.classes.size), "pruned_classes": int(g.dropped.size), "blocked": g.blocked}
                for g in self.groups]


def _dropped(groups: list[Group]) -> np.ndarray:
    parts = [g.dropped for g in groups if g.dropped.size]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def prune_view(view: ChannelView, *, handlers: dict, criterion: Importance, fallback: Importance, ratio: float,
               scope: str = "uniform", layer_ratios: dict[str, float] | None = None, round_to: int = 1,
               min_channels: int = 1, ignore: tuple[str, ...] = (), split: str = "size") -> Outcome:
    """Analyse ``view`` and choose what to prune; ``layer_ratios`` and ``ignore`` match node names."""
    matched: set[str] = set()

    def ignored(node: PNode) -> bool:
        hits = {p for p in ignore if name_matches(p, node.name)}
        matched.update(hits)
        return bool(hits)

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
    return Outcome(groups, prop, roots, sel.fallback_criterion,
                   unmatched_ignore=[p for p in ignore if p not in matched])


def settle(outcome: Outcome, attempt: Callable[[Plan], Any], limit: int = 3) -> Any:
    """``attempt(plan)`` with every pruned group's plan, returning what it returns (the pruned graph), or None when
    nothing is pruned. ``attempt`` applies the plan to a fresh copy and checks the result, raising when it fails.
    Then the engine has a bug: the first group whose pruning fails (bisected over the pruned groups, in order)
    is kept whole with the reason ``internal: <error>`` and the rest are tried again; after ``limit`` such
    groups every group is kept whole (``outcome.gave_up`` says why) and None is returned."""
    error: Exception | None = None
    for _ in range(limit + 1):
        groups = outcome.pruned_groups
        if not groups:
            return None
        result, error = _try(outcome, attempt, groups)
        if error is None:
            return result
        passes, fails = 0, len(groups)  # pruning the first `passes` groups works, the first `fails` does not
        while fails - passes > 1:
            mid = (passes + fails) // 2
            _, e = _try(outcome, attempt, groups[:mid])
            if e is None:
                passes = mid
            else:
                fails, error = mid, e
        culprit = groups[fails - 1]
        culprit.dropped, culprit.blocked = np.zeros(0, dtype=np.int64), internal_reason(error)
    outcome.gave_up = internal_reason(error)
    for g in outcome.pruned_groups:
        g.dropped, g.blocked = np.zeros(0, dtype=np.int64), outcome.gave_up
    return None


def _try(outcome: Outcome, attempt: Callable[[Plan], Any], groups: list[Group]) -> tuple[Any, Exception | None]:
    try:
        return attempt(outcome.plan_for(groups)), None
    except GraphoptError:  # the attempt's own verdict on the input, not an engine bug
        raise
    except Exception as exc:  # an engine bug, contained by settle()
        return None, exc

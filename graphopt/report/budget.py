"""int8 under an accuracy budget: keep the most sensitive fusion groups float until the budget holds.

On a :class:`~graphopt.report.sensitivity.Study` (a calibrated float graph, its decision groups, the backend): the
groups are ranked by the study's cheap proxy, moved to float one more at a time (each step a real trial through the
executor) until the budget holds, then put back in int8 one at a time while it still holds, since the proxy's
order overshoots. The result is the groups kept float and the nodes place-qdq must exclude.

With a *fallback format* in the study (int8 weights with run-time int8 activations, 4-bit weights...: a format
between static int8 and float; :meth:`Study.fallback_groups` says which groups it takes), the groups kept float
are then tried in it: all of them at once first (one trial: a format that takes its activations' range at run
time is often good enough for all of them), else one at a time, the most robust (least sensitive by the proxy)
first, each added to those already taken while the budget still holds. A group that fails the budget in the
format stays float. The result then also lists the groups in the fallback format, which place-qdq excludes too
and the fallback's passes (:meth:`Study.fallback_passes`) take after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from graphopt.errors import UsageError
from graphopt.report.sensitivity import Study, proxy_scores, trials

__all__ = ["BudgetResult", "search_budget"]


@dataclass
class BudgetResult:
    """``float_groups``: the groups kept float (most sensitive first), ``float_nodes`` their nodes;
    ``fallback_groups``: the groups in the ``fallback`` format (pipeline text; "": none), ``fallback_nodes`` theirs;
    ``metrics``: the chosen model's; ``baseline``: the fully-int8 model's; ``holds``: whether the budget is met;
    ``evaluations``: trials run."""

    float_groups: list[str]
    float_nodes: tuple[str, ...]
    metrics: dict
    baseline: dict
    fp32_accuracy: float | None
    holds: bool
    evaluations: int
    groups: int
    budget: str
    fallback: str = ""
    fallback_groups: list[str] = field(default_factory=list)
    fallback_nodes: tuple[str, ...] = ()
    proxy: dict[str, float] = field(default_factory=dict)  # each group's proxy dB, when the search ranked them

    @property
    def excluded_nodes(self) -> tuple[str, ...]:
        """The nodes static int8 leaves out: the float groups' and the fallback groups'."""
        return tuple(dict.fromkeys((*self.float_nodes, *self.fallback_nodes)))

    def formats(self) -> dict[str, str]:
        """The format of each group not in static int8: ``"fp32"`` or the fallback's pipeline text."""
        return {**{g: "fp32" for g in self.float_groups}, **{g: self.fallback for g in self.fallback_groups}}

    def report(self, study: Study) -> dict:
        """What a run report shows of the decision (JSON): the budget, the metrics, and per group (most sensitive
        by the proxy first; graph order when the baseline held and nothing was ranked) its op, proxy dB and
        format (``int8``, ``fp32`` or the fallback)."""
        formats = self.formats()
        rank = {g.name: i for i, g in enumerate(study.groups)}
        names = sorted(rank, key=lambda n: (self.proxy.get(n, float("inf")), rank[n]))
        ops = {g.name: g.op for g in study.groups}
        return {"budget": self.budget, "holds": self.holds, "metrics": self.metrics, "baseline": self.baseline,
                "evaluations": self.evaluations,
                "groups": [{"group": n, "op": ops[n], "proxy_db": self.proxy.get(n),
                            "format": formats.get(n, "int8")} for n in names]}

    def describe(self) -> str:
        m = self.metrics
        acc = f", accuracy {m['accuracy']:.2f} (fp32 {self.fp32_accuracy:.2f})" if m.get("accuracy") is not None \
            else ""
        state = "holds" if self.holds else "NOT met"
        fallback = (f"; {len(self.fallback_groups)} in {self.fallback}: {', '.join(self.fallback_groups)}"
                    if self.fallback_groups else "")
        return (f"budget {self.budget} {state}: {len(self.float_groups)} of {self.groups} groups kept float"
                f"{': ' + ', '.join(self.float_groups) if self.float_groups else ''}{fallback}; output cosine "
                f"{m['cosine']:.5f}, SQNR {m['sqnr_db']:.2f} dB{acc} ({self.evaluations} evaluations)")


def search_budget(study: Study, *, min_cosine: float | None = None, max_drop: float | None = None,
                  max_evals: int | None = None, executor=None) -> BudgetResult:
    """Keep the most sensitive groups float until the budget holds: ``min_cosine`` (output cosine vs fp32) and/or
    ``max_drop`` (top-1 accuracy points below fp32; needs labels). Groups are ranked by the proxy and moved to float
    one more at a time, each step confirmed by a real trial, until the budget holds (or ``max_evals`` trials); then,
    since the proxy's order overshoots, each group kept float is tried back in int8, the last added first, and stays
    int8 when the budget still holds (one trial each). With a fallback format in the study, the groups kept float
    are then tried in it (see the module docstring)."""
    if min_cosine is None and max_drop is None:
        raise UsageError("give a budget: min_cosine (output cosine vs fp32) and/or max_drop (accuracy points)")
    if max_drop is not None and study.labels is None:
        raise UsageError("max_drop is in points of accuracy: it needs labelled evaluation data")
    fp32 = study.fp32_accuracy()
    budget = " and ".join(s for s in (f"min_cosine={min_cosine}" if min_cosine is not None else "",
                                      f"max_drop={max_drop}" if max_drop is not None else "") if s)

    def holds(m):
        return (min_cosine is None or m["cosine"] >= min_cosine) and (
            max_drop is None or fp32 - m["accuracy"] <= max_drop)

    (baseline,) = trials(study, executor, [[]])
    evals, order, proxy = 1, [], {}
    chosen, metrics = 0, baseline
    if not holds(baseline):
        proxy = proxy_scores(study)
        order = sorted((grp.name for grp in study.groups), key=lambda n: proxy[n])
        width = max(1, int(getattr(executor, "workers", 1) or 1))  # prefixes tried side by side
        k = 1
        while k <= len(order) and (not max_evals or evals < max_evals):
            ks = list(range(k, min(len(order), k + width - 1,
                                   k + (max_evals - evals) - 1 if max_evals else len(order)) + 1))
            results = trials(study, executor, [order[:j] for j in ks])
            evals += len(ks)
            done = [(j, m) for j, m in zip(ks, results) if holds(m)]
            chosen, metrics = done[0] if done else (ks[-1], results[-1])
            if done:
                break
            k = ks[-1] + 1
    kept = order[:chosen]
    if holds(metrics):  # the proxy's order overshoots: put groups back in int8, least sensitive first, while it holds
        for name in list(reversed(kept)):
            trial = [g for g in kept if g != name]
            if not trial or (max_evals and evals >= max_evals):  # none float: the baseline, which fails
                break
            (result,) = trials(study, executor, [trial])
            evals += 1
            if holds(result):
                kept, metrics = trial, result
    fallback: list[str] = []
    if study.fallback_text and kept and holds(metrics):
        fallback, found, evals = _search_fallback(study, executor, kept, holds, evals, max_evals)
        if fallback:
            kept, metrics = [g for g in kept if g not in fallback], found
    return BudgetResult(kept, study.members(kept), metrics, baseline, fp32, holds(metrics), evals,
                        len(study.groups), budget, study.fallback_text, fallback, study.members(fallback), proxy)


def _search_fallback(study: Study, executor, kept: list[str], holds, evals: int, max_evals: int | None):
    """The groups of ``kept`` (float, most sensitive first) to run in the study's fallback format instead, their
    metrics and the trial count so far: all those the format takes at once, else one at a time, most robust
    first."""
    takes = set(study.fallback_groups())
    candidates = [g for g in reversed(kept) if g in takes]

    def trial(chosen):
        (result,) = trials(study, executor, [[g for g in kept if g not in chosen]], [chosen])
        return result

    if len(candidates) > 1 and not (max_evals and evals >= max_evals):
        evals += 1
        result = trial(candidates)
        if holds(result):
            return candidates, result, evals
    chosen, metrics = [], None
    for name in candidates:
        if max_evals and evals >= max_evals:
            break
        evals += 1
        result = trial(chosen + [name])
        if holds(result):
            chosen, metrics = chosen + [name], result
    return chosen, metrics, evals

"""int8 under an accuracy budget: keep the most sensitive fusion groups float until the budget holds.

On a :class:`~graphopt.report.sensitivity.Study` (a calibrated float graph, its decision groups, the backend): the
groups are ranked by the study's cheap proxy, moved to float one more at a time (each step a real trial through the
executor) until the budget holds, then put back in int8 one at a time while it still holds, since the proxy's
order overshoots. The result is the groups kept float and the nodes place-qdq must exclude.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphopt.errors import UsageError
from graphopt.report.sensitivity import Study, proxy_scores, trials

__all__ = ["BudgetResult", "search_budget"]


@dataclass
class BudgetResult:
    """``float_groups``: the groups kept float (most sensitive first); ``metrics``: the chosen model's;
    ``baseline``: the fully-int8 model's; ``holds``: whether the budget is met; ``evaluations``: trials run."""

    float_groups: list[str]
    float_nodes: tuple[str, ...]
    metrics: dict
    baseline: dict
    fp32_accuracy: float | None
    holds: bool
    evaluations: int
    groups: int
    budget: str

    def describe(self) -> str:
        m = self.metrics
        acc = f", accuracy {m['accuracy']:.2f} (fp32 {self.fp32_accuracy:.2f})" if m.get("accuracy") is not None \
            else ""
        state = "holds" if self.holds else "NOT met"
        return (f"budget {self.budget} {state}: {len(self.float_groups)} of {self.groups} groups kept float"
                f"{': ' + ', '.join(self.float_groups) if self.float_groups else ''}; output cosine "
                f"{m['cosine']:.5f}, SQNR {m['sqnr_db']:.2f} dB{acc} ({self.evaluations} evaluations)")


def search_budget(study: Study, *, min_cosine: float | None = None, max_drop: float | None = None,
                  max_evals: int | None = None, executor=None) -> BudgetResult:
    """Keep the most sensitive groups float until the budget holds: ``min_cosine`` (output cosine vs fp32) and/or
    ``max_drop`` (top-1 accuracy points below fp32; needs labels). Groups are ranked by the proxy and moved to float
    one more at a time, each step confirmed by a real trial, until the budget holds (or ``max_evals`` trials); then,
    since the proxy's order overshoots, each group kept float is tried back in int8, the last added first, and stays
    int8 when the budget still holds (one trial each)."""
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
    evals, order = 1, []
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
    return BudgetResult(kept, study.members(kept), metrics, baseline, fp32, holds(metrics), evals,
                        len(study.groups), budget)

"""Per-layer prune ratios searched under a MACs or measured-latency budget, and the Pareto front of the candidates.

The caller (a pruning pass) gives a :class:`PruneStudy` — the model, N evaluation samples (and labels), the backend
and the pruning pass as pipeline text — the *units* of decision (the channel groups that can be pruned, by name)
and ``options_for(scope, ratio, unit_ratios)``, which turns a candidate into that pass's options. This module
names no pass: a candidate is a set of options applied to the pass the pipeline text names.

The search (:func:`search_ratios`):

1. **Probe** (one trial per unit): prune that unit alone by ``probe`` (0.5) and measure the damage ``d`` (1 - output
   cosine vs the original) and the MACs it saves ``m`` (a fraction of the model's).
2. **Candidates**, at each strength ``s`` of ``strengths`` (0.1 ... 0.8), three families:
   ``uniform`` (every unit loses ``s``), ``global`` (``s`` of all channels, lowest normalized scores first, the
   pruning engine's own global ranking) and ``per-layer``: ratios from the probe. If a unit's damage grows as the
   square of its ratio (``d (r/p)^2``) and its savings linearly (``m r/p``), the least damage for given savings
   prunes unit u by ``r_u = c * m_u / d_u`` (a Lagrange multiplier ``c``), capped at ``max_ratio``; ``c`` is set
   so that the savings-weighted mean ratio is ``s``, like the uniform candidate's. Cheap units (much saved, little
   damage) lose most; a layer whose channels all matter is left nearly whole.
3. **Refine**: in each family, ``refine`` bisection steps on ``s`` between the strongest candidate over the budget
   and the weakest within it, so each family has a point just within the budget.

Every candidate is an accuracy trial (:func:`accuracy_trial`: prune, count MACs, run the N samples on the backend:
output SQNR, cosine and, with labels, top-1 accuracy), run through an executor in parallel (``kind="accuracy"``);
under a latency budget each is also a latency trial (:func:`latency_trial`, ``kind="latency"``: alone), the
pruned model timed against the original, interleaved, one intra-op thread, CPU time per run (the latency guard's
clock), the ratio being the median of the per-round ratios. Trials are module-level functions of JSON items (the
study's folder, named by the hash of everything it depends on, and the candidate's options): content-addressed,
so a second run re-runs no finished trial.

The choice: the most accurate candidate within the budget (top-1 with labels, else cosine; SQNR breaks ties).
None within it is a UsageError naming the cheapest candidate found. The Pareto front is over all candidates
(lower cost, higher accuracy); :meth:`SearchResult.plot` draws it (:func:`graphopt.report.plots.pareto`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from graphopt.errors import UsageError
from graphopt.executors import InProcess
from graphopt.ir.onnx_graph import OnnxGraph
from graphopt.report.study_files import Scored, backend_record, load_once, read_study, study_folder, write_study

__all__ = ["Budget", "PruneStudy", "SearchResult", "accuracy_trial", "latency_trial", "parse_budget", "plot_search",
           "search_ratios", "time_models"]

COSTS = ("macs", "latency")
STRENGTHS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


# -- the budget ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """``cost`` (``macs`` or ``latency``) at most ``limit`` times the original model's."""

    cost: str
    limit: float

    def __str__(self) -> str:
        return f"{self.cost}@{self.limit:g}"


def parse_budget(text: str) -> Budget:
    """``"macs@0.5"`` / ``"latency@0.6"`` -> Budget; a ValueError saying what is expected otherwise."""
    match = re.fullmatch(r"(\w+)@([0-9.eE+-]+)", text.strip())
    limit = _float(match.group(2)) if match else math.nan
    if not match or match.group(1) not in COSTS or not 0 < limit < 1:
        raise ValueError(f"budget '{text}': expected macs@R or latency@R with 0 < R < 1 (the pruned model's MACs or "
                         f"measured latency at most R times the original's), e.g. macs@0.5")
    return Budget(match.group(1), limit)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


# -- the study: the model, the data, the backend and the pruning pass ---------------------------------------------
@dataclass
class PruneStudy(Scored):
    """An unpruned ONNX graph, N evaluation samples (and labels), the backend and the pruning pass as pipeline text
    (``pipeline``: its last pass is the one candidates' options are applied to), saved in ``folder``."""

    folder: str
    graph: OnnxGraph
    data: dict[str, np.ndarray]
    labels: np.ndarray | None
    pipeline: str
    backend: Any
    registry: Any
    macs: int = 0
    _reference: list[np.ndarray] | None = field(default=None, repr=False)

    @classmethod
    def create(cls, graph: OnnxGraph, data: dict, labels, *, backend, pipeline: str, registry,
               folder: str | None = None) -> "PruneStudy":
        """A study written under ``folder`` (default: a folder under the temp dir named by the hash of the model,
        data, labels, backend and pipeline: the same study, the same folder, the same cached trials; see
        :mod:`graphopt.report.study_files`)."""
        from graphopt.report.cost import model_costs

        data = {k: np.ascontiguousarray(v) for k, v in data.items()}
        labels = None if labels is None else np.asarray(labels).reshape(-1)
        model = graph.to_model().SerializeToString()
        record = backend_record(backend)
        folder = study_folder("prune-", model, [record, pipeline], data, labels, folder)
        write_study(folder, "model.onnx", model, data, labels, {**record, "pipeline": pipeline})
        study = cls(folder, graph, data, labels, pipeline, backend, registry, model_costs(graph).macs)
        return load_once(folder, cls.load, study)

    @classmethod
    def _read(cls, folder: str) -> "PruneStudy":
        from graphopt.report.cost import model_costs

        meta, arrays, labels, registry, backend = read_study(folder)
        graph = OnnxGraph.load(os.path.join(folder, "model.onnx"))
        return cls(folder, graph, arrays, labels, meta["pipeline"], backend, registry, model_costs(graph).macs)

    def pruned(self, options: dict) -> OnnxGraph:
        """The graph pruned by the pipeline's last pass with ``options`` (JSON: lists become tuples)."""
        from graphopt.passes.base import PassContext
        from graphopt.passes.manager import PassManager
        from graphopt.passes.pipeline import resolve

        prune = resolve(self.pipeline, self.registry)[-1]
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        prune = type(prune)(dataclasses.replace(prune.options, **values))
        ctx = PassContext(backend=self.backend, registry=self.registry)
        out, _ = PassManager([prune], [], ctx).run(self.graph, in_place=False)
        return out

    def reference(self) -> list[np.ndarray]:
        if self._reference is None:
            self._reference = self.backend.run_batched(self.graph.to_model(), self.data, 32)
        return self._reference


# -- the trials ----------------------------------------------------------------------------------------------------
def accuracy_trial(item: dict) -> dict:
    """``{"study": folder, "options": {...}}`` -> the pruned model's MACs ratio, parameters and metrics."""
    from graphopt.report.cost import model_costs

    study = PruneStudy.load(item["study"])
    graph = study.pruned(item["options"])
    costs = model_costs(graph)
    outputs = study.backend.run_batched(graph.to_model(), study.data, 32)
    return {"macs_ratio": costs.macs / max(study.macs, 1), "params": costs.params, **study.metrics(outputs)}


def time_models(backend, graphs: list[OnnxGraph], feeds: dict, rounds: int, warmup: int) -> list[list[float]]:
    """Per graph, its CPU ms per run in each of ``rounds`` rounds, interleaved, one intra-op thread each (the
    latency guard's timing: :func:`graphopt.report.latency_guard.time_interleaved`)."""
    from graphopt.report import latency_guard

    sessions = [backend.session(g.to_model(), latency_guard.THREADS) for g in graphs]
    return latency_guard.time_interleaved(backend, sessions, feeds, rounds, warmup)


def latency_trial(item: dict) -> dict:
    """``{"study", "options", "rounds", "warmup", "cpu", "backend"}`` -> the pruned model's latency ratio to the
    original: both timed interleaved in this trial (batch 1), the median of the per-round ratios; ``cpu`` and
    ``backend`` are not read, they are part of the trial's content address."""
    study = PruneStudy.load(item["study"])
    feeds = {k: v[:1] for k, v in study.data.items()}
    original, pruned = time_models(study.backend, [study.graph, study.pruned(item["options"])], feeds,
                                   int(item["rounds"]), int(item["warmup"]))
    ratios = [p / o for o, p in zip(original, pruned) if o > 0]
    return {"latency_ratio": float(np.median(ratios)) if ratios else math.nan,
            "original_ms": float(np.median(original)), "pruned_ms": float(np.median(pruned))}


# -- the search ----------------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """``candidates``: one dict per candidate (family, strength, options, ratios summary, macs_ratio,
    latency_ratio, sqnr_db, cosine, accuracy, cost, score, feasible, on_front, chosen); ``chosen``: its index;
    ``probes``: the per-unit probe results; ``trials_run``: trials actually run (0: all from the cache)."""

    budget: Budget
    metric: str
    candidates: list[dict]
    chosen: int
    probes: dict[str, dict]
    trials: int
    trials_run: int
    fp32_accuracy: float | None = None

    @property
    def best(self) -> dict:
        return self.candidates[self.chosen]

    def best_of(self, family: str) -> dict | None:
        """The most accurate candidate of ``family`` within the budget."""
        mine = [c for c in self.candidates if c["family"] == family and c["feasible"]]
        return max(mine, key=_rank) if mine else None

    def describe(self) -> str:
        c, uniform = self.best, self.best_of("uniform")
        digits = 2 if self.metric == "accuracy" else 5
        lat = f", latency {c['latency_ratio']:.3f}x" if c.get("latency_ratio") is not None else ""
        than = ""
        if uniform is not None and uniform is not c:
            than = (f"; the best uniform ratio within it ({uniform['ratios']}): {self.metric} "
                    f"{_fmt(uniform[self.metric], digits)}, MACs {uniform['macs_ratio']:.3f}x")
        cached = "all from the cache" if not self.trials_run else f"{self.trials_run} run"
        return (f"budget {self.budget}: chose {c['family']} {c['ratios']} — MACs {c['macs_ratio']:.3f}x{lat}, "
                f"{self.metric} {_fmt(c[self.metric], digits)}, SQNR {_fmt(c['sqnr_db'], 2)} dB{than} "
                f"({len(self.candidates)} candidates, {len(self.probes)} probes; {self.trials} trials, {cached})")

    def table(self) -> str:
        from graphopt.table import format_table

        rows = [("#", "family", "ratios", "MACs", "latency", "SQNR dB", "cosine", "accuracy", "front", "chosen")]
        for i, c in enumerate(self.candidates, 1):
            rows.append((str(i), c["family"], c["ratios"], f"{c['macs_ratio']:.3f}", _fmt(c["latency_ratio"], 3),
                         _fmt(c["sqnr_db"], 2), _fmt(c["cosine"], 5), _fmt(c["accuracy"], 2),
                         "*" if c["on_front"] else "", "<-" if c["chosen"] else ""))
        return format_table(rows)

    def to_dict(self) -> dict:
        """What a run report holds (JSON): enough to draw the plot again (:func:`plot_search`)."""
        from graphopt.report.layers import jsonable

        def clean(d):
            return {k: jsonable(v) if isinstance(v, float) else v for k, v in d.items() if k != "options"}

        return {"title": f"prune ratios under {self.budget}", "budget": {"cost": self.budget.cost,
                                                                          "limit": self.budget.limit},
                "metric": self.metric, "xlabel": _xlabel(self.budget.cost), "ylabel": _ylabel(self.metric),
                "chosen": self.chosen, "trials": self.trials, "trials_run": self.trials_run,
                "fp32_accuracy": self.fp32_accuracy, "candidates": [clean(c) for c in self.candidates],
                "probes": {k: clean(v) for k, v in self.probes.items()}}

    def plot(self, path: str) -> None:
        plot_search(self.to_dict(), path)


def plot_search(search: dict, path: str) -> None:
    """The Pareto plot of a search as :meth:`SearchResult.to_dict` writes it (PNG)."""
    from graphopt.report.plots import pareto

    pareto(search["candidates"], path, xlabel=search["xlabel"], ylabel=search["ylabel"],
           title=f"{search['title']}: {len(search['candidates'])} candidates", budget=search["budget"]["limit"])


def _xlabel(cost: str) -> str:
    return "MACs / original's" if cost == "macs" else "measured latency / original's (1 thread, CPU time)"


def _ylabel(metric: str) -> str:
    return "top-1 accuracy, %" if metric == "accuracy" else "output cosine vs the original"


def _fmt(value, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _rank(c: dict) -> tuple:
    score = c["score"] if c["score"] is not None and not math.isnan(c["score"]) else -math.inf
    sqnr = c["sqnr_db"] if c["sqnr_db"] is not None and not math.isnan(c["sqnr_db"]) else -math.inf
    return (score, sqnr, -c["cost"])


def per_layer_ratios(probes: dict[str, dict], strength: float, probe: float, max_ratio: float) -> dict[str, float]:
    """The per-layer family at ``strength`` (see the module docstring): ``r_u = min(c * m_u / d_u, max_ratio)``,
    ``c`` chosen so that the mean of ``r_u`` weighted by ``m_u`` is ``strength``; ratios rounded to 0.01."""
    saved = {u: max(p["saved"], 0.0) for u, p in probes.items()}
    worth = {u: saved[u] / max(p["damage"], 1e-9) for u, p in probes.items()}
    total = sum(saved.values())
    if total <= 0:
        return {}

    def mean(c):
        return sum(saved[u] * min(c * worth[u], max_ratio) for u in saved) / total

    if mean(1e30) <= strength:  # everything at the cap cannot reach it
        c = 1e30
    else:
        lo, hi = 0.0, 1.0
        while mean(hi) < strength:
            hi *= 4.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mean(mid) < strength else (lo, mid)
        c = hi
    ratios = {u: round(min(c * worth[u], max_ratio), 2) for u in saved}
    return {u: r for u, r in ratios.items() if r > 0}


def search_ratios(study: PruneStudy, budget: Budget, units: list[str],
                  options_for: Callable[[str, float, dict[str, float]], dict], *, executor=None,
                  strengths: tuple[float, ...] = STRENGTHS, probe: float = 0.5, max_ratio: float = 0.9,
                  refine: int = 3, rounds: int = 20, warmup: int = 3) -> SearchResult:
    """Search prune ratios under ``budget`` (see the module docstring). ``units``: the prunable groups' names;
    ``options_for(scope, ratio, unit_ratios)``: the pass options of a candidate (``scope`` "uniform" or "global");
    ``executor``: where trials run (default: in this process, cached under the study's folder)."""
    from graphopt.backends.cpu import cpu_identity
    from graphopt.report.latency_guard import backend_identity

    executor = executor or InProcess(os.path.join(study.folder, "runs"))
    calls = executor.calls
    metric = "accuracy" if study.labels is not None else "cosine"
    latency_key = {"cpu": cpu_identity(), "backend": backend_identity(study.backend), "rounds": int(rounds),
                   "warmup": int(warmup)}
    trials = 0

    def evaluate(cands: list[dict], timed: bool) -> list[dict]:
        nonlocal trials
        items = [{"study": study.folder, "options": c["options"]} for c in cands]
        results = executor.map(accuracy_trial, items, kind="accuracy")
        trials += len(items)
        if timed:
            times = executor.map(latency_trial, [{**i, **latency_key} for i in items], kind="latency")
            trials += len(items)
            results = [{**r, **t} for r, t in zip(results, times)]
        for c, r in zip(cands, results):
            c.update(r)
            c.setdefault("latency_ratio", None)
            c["cost"] = c["macs_ratio"] if budget.cost == "macs" else c["latency_ratio"]
            c["score"] = c[metric]
            c["feasible"] = c["cost"] is not None and c["cost"] <= budget.limit
        return cands

    # 1. probe: each unit alone
    probe_cands = evaluate([{"options": options_for("uniform", 0.0, {u: probe})} for u in units], False)
    probes = {u: {"macs_ratio": c["macs_ratio"], "cosine": c["cosine"], "sqnr_db": c["sqnr_db"],
                  "saved": 1.0 - c["macs_ratio"], "damage": 1.0 - c["cosine"]} for u, c in zip(units, probe_cands)}

    def candidate(family: str, s: float) -> dict:
        s = round(s, 4)
        if family == "per-layer":
            ratios = per_layer_ratios(probes, s, probe, max_ratio)
            opts, summary = options_for("uniform", 0.0, ratios), _summary(ratios, len(units))
        else:
            opts, summary = options_for(family, s, {}), f"{s:g}"
        return {"family": family, "strength": s, "options": opts, "ratios": summary}

    # 2. the families at each strength
    families = ("uniform", "global", "per-layer")
    cands = evaluate([candidate(f, s) for f in families for s in strengths], budget.cost == "latency")
    # 3. refine: bisect each family's strength across the budget
    brackets = {}
    for f in families:
        mine = sorted((c for c in cands if c["family"] == f), key=lambda c: c["strength"])
        over = [c["strength"] for c in mine if not c["feasible"]]
        within = [c["strength"] for c in mine if c["feasible"]]
        if over and within and min(within) > max(over):  # cost falls as the strength grows
            brackets[f] = [max(over), min(within)]
    for _ in range(refine):
        step = [candidate(f, (lo + hi) / 2) for f, (lo, hi) in brackets.items()]
        if not step:
            break
        for c in evaluate(step, budget.cost == "latency"):
            brackets[c["family"]][1 if c["feasible"] else 0] = c["strength"]
        cands += step
    # the choice and the front
    cands = list({json.dumps(c["options"], sort_keys=True): c for c in cands}.values())  # a repeat counts once
    feasible = [i for i, c in enumerate(cands) if c["feasible"]]
    if not feasible:
        cheapest = min(cands, key=lambda c: c["cost"] if c["cost"] is not None else math.inf)
        raise UsageError(f"budget {budget} cannot be met: the cheapest of {len(cands)} candidates "
                         f"({cheapest['family']} {cheapest['ratios']}) has {budget.cost} "
                         f"{_fmt(cheapest['cost'], 3)}x the original's (prune more groups: fewer ignore=, "
                         f"a lower min_channels; or give a larger budget)")
    chosen = max(feasible, key=lambda i: _rank(cands[i]))
    for i, c in enumerate(cands):
        c["chosen"] = i == chosen
        c["on_front"] = not any(_dominates(o, c) for o in cands)
    return SearchResult(budget, metric, cands, chosen, probes, trials, executor.calls - calls,
                        study.fp32_accuracy())


def _dominates(a: dict, b: dict) -> bool:
    """``a`` costs no more and scores no less than ``b``, and is better in one of them."""
    if a["cost"] is None or b["cost"] is None:
        return False
    sa, sb = _rank(a)[0], _rank(b)[0]
    return a["cost"] <= b["cost"] and sa >= sb and (a["cost"] < b["cost"] or sa > sb)


def _summary(ratios: dict[str, float], units: int) -> str:
    """A per-layer candidate's ratios in a few words: ``per-layer 0-0.9, mean 0.41 (12/20 pruned)``."""
    if not ratios:
        return "none"
    values = list(ratios.values())
    return f"{min(values):g}-{max(values):g}, mean {sum(values) / units:.2f} ({len(values)}/{units} pruned)"

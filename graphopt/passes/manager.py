"""The pass manager: runs resolved passes in order with instruments around each, and records what happened.

The graph it is given is copied once, so the caller's model is never mutated; passes then work in place on
that copy. When an instrument needs each pass's input intact (``needs_pass_input``: the crash reproducer) or
snapshots are kept (:func:`bisect`), every pass gets a copy of its own instead. :func:`bisect` names the first
pass after which the model's outputs no longer match the original's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from graphopt.errors import GraphoptError, PassError
from graphopt.ir.base import Graph
from graphopt.passes.base import Pass, PassContext
from graphopt.passes.instruments import Instrument, relative_error


@dataclass
class PassRecord:
    index: int
    name: str
    text: str  # the pass with its options, as the pipeline syntax writes it
    nodes_before: int
    nodes_after: int
    modified: bool
    changes: str
    stats: dict[str, int]
    seconds: float
    notes: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RunReport:
    records: list[PassRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.records)

    def table(self) -> str:
        rows = [("#", "pass", "nodes", "changes", "check", "time")]
        for r in self.records:
            check = ""
            if "max_rel_err" in r.checks:
                check = f"rel.err {r.checks['max_rel_err']:.1e}"
            elif "numeric" in r.checks:
                check = r.checks["numeric"]
            rows.append((str(r.index), r.text, f"{r.nodes_before} -> {r.nodes_after}", r.changes, check,
                         _fmt_seconds(r.seconds)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for r in self.records:
            lines += [f"  note ({r.name}): {n}" for n in r.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"passes": [r.to_dict() for r in self.records], "warnings": list(self.warnings)}


def _fmt_seconds(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


class PassManager:
    def __init__(self, passes: list[Pass], instruments: list[Instrument] = (), ctx: PassContext | None = None,
                 copy_each: bool = False):
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.ctx = ctx or PassContext()
        self.copy_each = copy_each or any(getattr(i, "needs_pass_input", False) for i in self.instruments)

    def run(self, graph: Graph, *, in_place: bool = False) -> tuple[Graph, RunReport]:
        """Run every pass. ``in_place=True`` lets the passes work on ``graph`` itself (for a graph nobody
        else holds, such as one just loaded from a file) instead of on a copy."""
        report = RunReport()
        if not (self.copy_each or in_place):
            graph = graph.copy()
        for index, pass_ in enumerate(self.passes, start=1):
            graph, record = self._run_one(index, pass_, graph)
            report.records.append(record)
        report.warnings = list(self.ctx.warnings)
        return graph, report

    def _run_one(self, index: int, pass_: Pass, graph: Graph):
        for inst in self.instruments:
            inst.before_pass(pass_, graph, self.ctx)
        nodes_before = graph.num_nodes()
        start = time.perf_counter()
        try:
            result = pass_(graph.copy() if self.copy_each else graph, self.ctx)
        except Exception as exc:
            for inst in self.instruments:
                inst.after_pass_failed(pass_, graph, exc, self.ctx)
            if isinstance(exc, GraphoptError):
                raise
            raise PassError(pass_.name, f"{type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - start
        record = PassRecord(index, pass_.name, repr(pass_), nodes_before, result.graph.num_nodes(), result.modified,
                            result.describe(), dict(result.stats), seconds, list(result.notes))
        for inst in self.instruments:
            inst.after_pass(pass_, result, record, self.ctx)
        if result.modified:
            self.ctx.invalidate(pass_.preserves)
        return result.graph, record


@dataclass
class BisectResult:
    culprit: int | None  # 1-based index of the first pass whose output no longer matches, or None
    errors: dict[int, float]  # pass index -> max relative error against the original (those evaluated)
    passes: list[Pass]

    def describe(self, rtol: float) -> str:
        if self.culprit is None:
            return f"bisect: every pass keeps the outputs within {rtol:g} of the original"
        p = self.passes[self.culprit - 1]
        return (f"bisect: pass #{self.culprit} '{p!r}' is the first that broke equivalence "
                f"(max relative error {self.errors[self.culprit]:.3g} > {rtol:g})")


def bisect(graph: Graph, passes: list[Pass], ctx: PassContext | None = None, rtol: float = 1e-4,
           seed: int = 0) -> BisectResult:
    """Run the pipeline keeping the graph after each pass, then binary-search the snapshots for the first
    one whose outputs differ from the original's by more than ``rtol`` (log2(n) model runs, not n)."""
    manager = PassManager(passes, ctx=ctx, copy_each=True)
    snapshots = [graph]
    for index, pass_ in enumerate(passes, start=1):
        snapshots.append(manager._run_one(index, pass_, snapshots[-1])[0])
    inputs = graph.sample_inputs(seed)
    reference = graph.run(inputs)
    errors: dict[int, float] = {}

    def broken(k: int) -> bool:
        if k not in errors:
            errors[k] = relative_error(reference, snapshots[k].run(inputs))
        return not errors[k] <= rtol

    lo, hi = 1, len(passes)
    if not passes or not broken(hi):
        return BisectResult(None, errors, passes)
    while lo < hi:
        mid = (lo + hi) // 2
        if broken(mid):
            hi = mid
        else:
            lo = mid + 1
    return BisectResult(lo, errors, passes)

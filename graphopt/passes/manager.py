"""The pass manager: runs resolved passes in order with instruments around each, and records what happened.

Copies follow each pass's mutation contract (``Pass.changes_input``): a graph is copied before a pass only when
that pass may edit it and the original is still needed — the caller's graph (``run(graph)`` without
``in_place``) before the first such pass, and every pass's input when an instrument needs it intact
(``needs_pass_input``: the crash reproducer) or snapshots are kept (:func:`bisect`). A functional pass
(``changes_input = False``) is never given a copy.

Before a pass whose ``min_opset`` is above an ONNX model's opset, the model is converted (``upgrade-opset``, a
step of its own in the report, held to exactness by the numeric check like any exact pass). After the last pass
every instrument's ``after_pipeline`` runs (:meth:`PassManager.finish`; ``run(..., finish=False)`` leaves that
to a caller that first writes the result, so the check can run the written file). :func:`bisect` names the
first pass after which the model's outputs no longer match the original's.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from graphopt.errors import GraphoptError, InstrumentError, PassError, first_line
from graphopt.ir.base import Graph
from graphopt.ir.identity import digest, interface
from graphopt.numeric import relative_error
from graphopt.passes.base import Equivalence, Pass, PassContext, PassResult, is_builtin
from graphopt.passes.instruments import Instrument
from graphopt.table import format_table


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
    skipped: dict[str, int] = field(default_factory=dict)  # why nodes were left as they were (rule passes)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def check_cell(self) -> str:
        if "max_rel_err" in self.checks:
            cell = f"rel.err {self.checks['max_rel_err']:.1e}"
            sqnr = self.checks.get("sqnr_db")
            if self.checks.get("past_threshold") or (sqnr is not None and sqnr < 60):
                cell += f", SQNR {sqnr:.1f} dB" if sqnr not in (float("inf"), float("-inf")) else f", SQNR {sqnr}"
            return cell
        return str(self.checks.get("numeric", ""))


@dataclass
class RunReport:
    records: list[PassRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)  # what instruments found over the whole run

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.records)

    def culprits(self) -> tuple[str, str]:
        """Who to name for a result that fails verification, and a hint when it could be any of several passes."""
        modified = [r.name for r in self.records if r.modified]
        if len(modified) == 1:
            return modified[0], ""
        if not modified:
            return "load", " (the model as loaded, before any pass changed it)"
        return " + ".join(modified), " (rerun with --verify-each to name the pass)"

    def table(self) -> str:
        rows = [("#", "pass", "nodes", "changes", "check", "time")]
        for r in self.records:
            rows.append((str(r.index), r.text, f"{r.nodes_before} -> {r.nodes_after}", r.changes, r.check_cell(),
                         _fmt_seconds(r.seconds)))
        lines = [format_table(rows)]
        for r in self.records:
            lines += [f"  note ({r.name}): {n}" for n in r.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"passes": [r.to_dict() for r in self.records], "warnings": list(self.warnings),
                "checks": dict(self.checks)}


def _fmt_seconds(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


class UpgradeOpset(Pass):
    """Convert the model to a newer default-domain opset (onnx.version_converter), for a pass that needs it."""

    name = "upgrade-opset"
    irs = frozenset({"onnx"})

    def __init__(self, target: int):
        super().__init__()
        self.target = target

    def run_onnx(self, graph, ctx):
        before = graph.opset
        note = graph.upgrade_opset(self.target)
        return PassResult(graph, graph.opset != before, {f"converted opset {before} -> {graph.opset}": 1}
                          if graph.opset != before else {}, [note] if note else [])

    def __repr__(self) -> str:
        return f"{self.name} (to {self.target})"


class PassManager:
    def __init__(self, passes: list[Pass], instruments: list[Instrument] = (), ctx: PassContext | None = None,
                 copy_each: bool = False):
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.ctx = ctx or PassContext()
        self.copy_each = copy_each or any(getattr(i, "needs_pass_input", False) for i in self.instruments)

    def run(self, graph: Graph, *, in_place: bool = False, finish: bool = True) -> tuple[Graph, RunReport]:
        """Run every pass. ``in_place=True`` lets the passes work on ``graph`` itself (for a graph nobody
        else holds, such as one just loaded from a file) instead of on a copy. ``finish=False``: the caller
        calls :meth:`finish` itself (after writing the result)."""
        report = RunReport()
        owned = in_place
        index = 0
        self.ctx.pipeline = list(self.passes)
        for pass_ in self.passes:
            for step in self._steps_before(pass_, graph):
                index += 1
                graph, record = self._run_one(index, step, graph, owned)
                owned = owned or step.changes_input
                report.records.append(record)
            index += 1
            graph, record = self._run_one(index, pass_, graph, owned)
            owned = owned or pass_.changes_input
            report.records.append(record)
        report.warnings = self.ctx.warnings  # the same list: warnings added by finish() show up too
        if finish:
            self.finish(graph, report)
        return graph, report

    def plan(self, graph: Graph) -> list[Pass]:
        """The steps :meth:`run` will take on ``graph``, in order: the passes and the core steps before them."""
        steps, opset = [], graph.opset if graph.ir == "onnx" else None
        for pass_ in self.passes:
            for step in self._steps_before(pass_, graph, opset):
                steps.append(step)
                opset = step.target
            steps.append(pass_)
        return steps

    def finish(self, graph: Graph, report: RunReport) -> None:
        for inst in self.instruments:
            _call(inst, "after_pipeline", graph, report, self.ctx)

    def _steps_before(self, pass_: Pass, graph: Graph, opset: int | None = None) -> list[Pass]:
        """Core steps a pass needs first: an opset upgrade when it needs a newer opset than the model has."""
        need = pass_.min_opset
        opset = opset if opset is not None else (graph.opset if graph.ir == "onnx" else None)
        if graph.ir == "onnx" and need is not None and opset < need and "onnx" in pass_.irs:
            return [UpgradeOpset(need)]
        return []

    def _run_one(self, index: int, pass_: Pass, graph: Graph, owned: bool = True):
        for inst in self.instruments:
            _call(inst, "before_pass", pass_, graph, self.ctx)
        nodes_before = graph.num_nodes()
        copy = pass_.changes_input and (self.copy_each or not owned)
        trusted = is_builtin(pass_)
        before = None if trusted else digest(graph)  # a plugin's claims are checked, not taken
        seam = interface(graph) if pass_.equivalence == Equivalence.EXACT else None
        self.ctx.running = pass_.name
        start = time.perf_counter()
        try:
            result = pass_(graph.copy() if copy else graph, self.ctx)
        except (Exception, SystemExit) as exc:  # a plugin's sys.exit() is a failed pass, not graphopt's exit
            for inst in self.instruments:
                _call(inst, "after_pass_failed", pass_, graph, exc, self.ctx)
            if isinstance(exc, GraphoptError):
                if trusted:
                    raise
                raise _named(pass_, exc) from None
            what = f"called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else \
                f"{type(exc).__name__}: {first_line(exc)}"
            raise PassError(pass_.name, what) from exc
        finally:
            self.ctx.running = ""
        seconds = time.perf_counter() - start
        if before is not None:
            result = self._check_claims(pass_, graph, result, before)
        change = _seam_change(seam, interface(result.graph)) if seam is not None else None
        if change:
            raise PassError(pass_.name, f"declares itself exact but changed the model's interface: {change}")
        record = PassRecord(index, pass_.name, repr(pass_), nodes_before, result.graph.num_nodes(), result.modified,
                            result.describe(), dict(result.stats), seconds, list(result.notes),
                            skipped=dict(result.skipped))
        for inst in self.instruments:
            _call(inst, "after_pass", pass_, result, record, self.ctx)
        if result.modified:
            self.ctx.invalidate(pass_.preserves)
        return result.graph, record

    def _check_claims(self, pass_: Pass, graph: Graph, result: PassResult, before: str) -> PassResult:
        """A plugin pass's word checked against the graphs: a functional pass (``changes_input = False``) must leave
        its input as it was, and one that says it changed nothing must not have (else it is checked as changed)."""
        if not pass_.changes_input and result.graph is not graph and digest(graph) != before:
            raise PassError(pass_.name, "declares changes_input=False (functional) but edited the graph it was "
                                        "given; build a new graph, or declare changes_input=True")
        if not result.modified and digest(result.graph) != before:
            self.ctx.warn(f"pass '{pass_.name}' reported no change but changed the model: checked as changed")
            return dataclasses.replace(result, modified=True)
        return result


def _named(pass_: Pass, exc: GraphoptError) -> GraphoptError:
    """A plugin pass's graphopt error, naming the pass (a bare GraphoptError is a failed pass: exit 5)."""
    if pass_.name in str(exc):
        return exc
    if type(exc) is GraphoptError:
        return PassError(pass_.name, first_line(exc))
    exc.args = (f"pass '{pass_.name}': {first_line(exc)}", *exc.args[1:])
    return exc


def _call(inst: Instrument, hook: str, *args) -> None:
    """An instrument's hook; a plugin instrument that fails is named (exit 5), not an internal error."""
    try:
        getattr(inst, hook)(*args)
    except GraphoptError:
        raise
    except Exception as exc:
        raise InstrumentError(type(inst).__name__, f"{hook} raised {type(exc).__name__}: {first_line(exc)}") from exc


def _seam_change(before, after) -> str | None:
    """How an exact pass changed the model's interface (names, in order; dtypes where both are known), or None."""
    for kind, old, new in (("inputs", before[0], after[0]), ("outputs", before[1], after[1])):
        if [n for n, _ in old] != [n for n, _ in new]:
            return f"its {kind} were {', '.join(n for n, _ in old)}, now {', '.join(n for n, _ in new)}"
        for (name, was), (_, now) in zip(old, new):
            if "?" not in (was, now) and was != now:
                return f"{kind[:-1]} '{name}' was {was}, now {now}"
    return None


@dataclass
class BisectResult:
    culprit: int | None  # 1-based index of the first pass whose output no longer matches, or None
    errors: dict[int, float]  # pass index -> max relative error against the original (those evaluated)
    passes: list[Pass]
    searched: int = 0  # how many of the passes (the exact ones before the first approximate one) were searched

    def describe(self, rtol: float) -> str:
        rest = self.passes[self.searched:]
        unsearched = (f"; not searched: {', '.join(repr(p) for p in rest)} (from the first pass not held to "
                      f"equivalence on)") if rest else ""
        if self.culprit is None and not self.searched:
            return (f"bisect: nothing to search: {self.passes[0]!r} is not held to equivalence (bisect searches the "
                    f"exact passes before the first approximate one)")
        if self.culprit is None:
            return (f"bisect: the {self.searched} exact pass(es) searched keep the outputs within {rtol:g} of the "
                    f"original{unsearched}")
        p = self.passes[self.culprit - 1]
        return (f"bisect: pass #{self.culprit} '{p!r}' is the first that broke equivalence "
                f"(max relative error {self.errors[self.culprit]:.3g} > {rtol:g})")


def bisect(graph: Graph, passes: list[Pass], ctx: PassContext | None = None, rtol: float = 1e-4,
           seed: int = 0) -> BisectResult:
    """Run the pipeline keeping the graph after each pass, then binary-search the snapshots for the first
    one whose outputs differ from the original's by more than ``rtol`` (log2(n) model runs, not n). Only
    exact passes can break equivalence: the search runs over the pipeline up to its first approximate pass."""
    exact = []
    for pass_ in passes:
        if pass_.equivalence != Equivalence.EXACT:
            break
        exact.append(pass_)
    manager = PassManager(exact, ctx=ctx, copy_each=True)
    snapshots = [graph]
    for index, pass_ in enumerate(exact, start=1):
        snapshots.append(manager._run_one(index, pass_, snapshots[-1], owned=False)[0])
    inputs = graph.sample_inputs(seed)
    reference = graph.run(inputs)
    errors: dict[int, float] = {}

    def broken(k: int) -> bool:
        if k not in errors:
            errors[k] = relative_error(reference, snapshots[k].run(inputs))
        return not errors[k] <= rtol

    lo, hi = 1, len(exact)
    if not exact or not broken(hi):
        return BisectResult(None, errors, passes, len(exact))
    while lo < hi:
        mid = (lo + hi) // 2
        if broken(mid):
            hi = mid
        else:
            lo = mid + 1
    return BisectResult(lo, errors, passes, len(exact))

"""prune-channels: structured channel pruning on ONNX and FX graphs (``prune`` is its alias).

Removes whole channels — Conv filters, Linear features, attention head dims — so the model gets smaller and
faster on any backend. Channels that must shrink together are found by following every channel through the
graph (:mod:`graphopt.prune`): conv → BN → activation → conv, both sides of residual Adds, each input's slice of a
Concat, Split/Slice bounds, grouped convs (the same width from every group, or whole groups with ``split=count``;
depthwise convs by whole groups, ``group`` updated), Flatten/Reshape → Gemm (one channel is H×W features), global
pooling, MLP chains and attention (head size, or whole heads with ``split=count``). An op without a channel
handler blocks the channels that reach it; graph outputs keep their shape (so the classifier's outputs are never
pruned) and nodes matching ``ignore`` keep their output channels. Plugins teach it new ops
(``graphopt_register_channel_handlers``) and criteria (``graphopt_register_importance``).

Options: ``ratio`` (fraction of each group's channels removed, default 0.5), ``scope`` (``uniform``: each group
loses ``ratio``; ``global``: ``ratio`` of all channels, lowest normalized scores first), ``layer_ratios``
(``name@ratio`` items joined by ``+``, names matched like ``ignore``, first match wins), ``criterion`` (l1, l2,
bn-scale, taylor — taylor needs an FX graph and calibration data), ``round_to`` (channel counts kept to multiples
of it), ``min_channels`` (per group), ``ignore`` (node names, everything below them, or globs from Python),
``split`` (``size``/``count``, see :mod:`graphopt.prune.handlers_shape`). Before it returns the pass re-infers
shapes with the onnx checker's strict inference, runs the model on onnxruntime and checks the outputs keep their
shapes (FX: runs the module).

``budget=macs@R`` or ``budget=latency@R`` (ONNX) chooses ``ratio``, ``scope`` and per-layer ratios itself: the
pruned model's MACs, or its latency measured on the run's backend (1 intra-op thread, CPU time per run,
interleaved with the original), at most R times the input's, as accurate as the search finds. Candidates (at least
24: uniform ratios, global-scope ratios, and per-layer ratios from a probe that prunes each channel group alone by
half and measures the damage against the MACs saved: cheap groups lose most, a group whose channels all matter is
left nearly whole) are pruned with this pass's other options and scored on ``samples`` samples of the calibration
data (output cosine and SQNR vs the input model) or of ``eval`` (labelled .npz: top-1 accuracy; ``labels`` names
its labels array); see :mod:`graphopt.report.prune_search`. Trials run through ``executor`` (default in-process;
``processes[:N]``, ``ray``...) and are cached: a second run re-runs none. The candidates' Pareto front (accuracy
against cost, the chosen point marked) goes to the run report (``--report DIR``: pareto.png) and to ``plot``
(a PNG path). A budget no candidate meets is a usage error naming the cheapest candidate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from graphopt import Equivalence, Pass, PassResult, hookimpl
from graphopt.errors import GraphoptError, UnsupportedError, UsageError, first_line
from graphopt.passes.check import run_inputs
from graphopt.prune import BUILTIN_HANDLERS, BUILTIN_IMPORTANCE, Outcome, prune_view, settle
from graphopt.prune.importance import l1
from graphopt.prune.propagate import internal_reason


def _layer_ratios(items: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for item in items:
        name, at, value = item.rpartition("@")
        try:
            ratio = float(value)
        except ValueError:
            ratio = -1.0
        if not at or not name or not 0.0 <= ratio < 1.0:
            raise ValueError(f"layer_ratios item '{item}' must be name@ratio with 0 <= ratio < 1")
        out[name] = ratio
    return out


class PruneChannels(Pass):
    __doc__ = __doc__
    name = "prune-channels"
    irs = frozenset({"onnx", "fx"})
    equivalence = Equivalence.NONE
    recovery = ("fine-tune after pruning (graphopt.optimize(..., finetune=your_loop)), or prune less "
                "(prune:ratio=..., layer_ratios=..., ignore=...)")

    @dataclass(frozen=True)
    class Options:
        ratio: float = 0.5
        scope: Literal["uniform", "global"] = "uniform"
        layer_ratios: tuple[str, ...] = ()
        criterion: str = "l1"
        round_to: int = 1
        min_channels: int = 1
        ignore: tuple[str, ...] = ()
        split: Literal["size", "count"] = "size"
        budget: str = ""  # macs@R or latency@R: search the ratios (see the docstring)
        eval: str = ""  # labelled data for the budget search (.npz: the inputs and a labels array)
        labels: str = "labels"
        samples: int = 64  # samples each candidate runs
        executor: str = ""  # where the search's trials run (default: in this process)
        plot: str = ""  # the Pareto front's PNG

        def __post_init__(self):
            if not 0.0 <= self.ratio < 1.0:
                raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
            if self.round_to < 1 or self.min_channels < 1:
                raise ValueError("round_to and min_channels must be at least 1")
            _layer_ratios(self.layer_ratios)
            if self.budget:
                from graphopt.report.prune_search import parse_budget

                parse_budget(self.budget)
                if self.layer_ratios or self.ratio != 0.5 or self.scope != "uniform":
                    raise ValueError("budget chooses the ratios and scope itself: give budget, or ratio / scope / "
                                     "layer_ratios, not both")
            if self.samples < 1:
                raise ValueError("samples must be at least 1")
            if self.plot and not self.plot.lower().endswith(".png"):
                raise ValueError(f"plot={self.plot}: the Pareto plot is a .png file")

    def files(self):
        o = self.options
        return ([("labelled data (eval=)", o.eval)] if o.eval else []), ([("plot", o.plot)] if o.plot else [])

    def requires(self, graph, ctx):
        if self.options.plot:
            from graphopt.report.plots import need_matplotlib

            need_matplotlib(f"{self.name}:plot=")
        if self.options.executor:  # said before the search calibrates and scores anything
            from graphopt.executors import parse_executor

            parse_executor(self.options.executor)

    # -- plumbing shared by both IRs ----------------------------------------------------------------------
    def _lookup(self, ir: str, ctx):
        registry = ctx.registry
        handlers = dict(BUILTIN_HANDLERS)
        criteria = dict(BUILTIN_IMPORTANCE)
        if registry is not None:
            handlers.update({op: fn for (where, op), fn in registry.channel_handlers.items() if where in (ir, "*")})
            criteria.update(registry.importance)
        if self.options.criterion not in criteria:
            raise UsageError(f"pass '{self.name}': unknown criterion '{self.options.criterion}' (known: "
                             f"{', '.join(sorted(criteria))})")
        return handlers, criteria[self.options.criterion]

    def _prune(self, view, handlers, criterion) -> Outcome:
        o = self.options
        return prune_view(view, handlers=handlers, criterion=criterion, fallback=l1, ratio=o.ratio, scope=o.scope,
                          layer_ratios=_layer_ratios(o.layer_ratios), round_to=o.round_to,
                          min_channels=o.min_channels, ignore=o.ignore, split=o.split)

    def _result(self, graph, outcome: Outcome, ctx) -> PassResult:
        ctx.state["prune"] = outcome.rows()
        self.warn_unmatched(ctx, "ignore", outcome.unmatched_ignore)
        reasons = outcome.blocked_reasons()
        internal = sum(n for reason, n in reasons.items() if reason.startswith("internal:"))
        shown = reasons.most_common(5)
        if internal and not any(reason.startswith("internal:") for reason, _ in shown):  # always said
            shown.append(next((r, n) for r, n in reasons.most_common() if r.startswith("internal:")))
        notes = [f"{count} channel group(s) kept whole: {reason}" + (_BUG if reason.startswith("internal:") else "")
                 for reason, count in shown]
        if outcome.gave_up:
            notes.append(f"pruned nothing: every try failed ({outcome.gave_up}); the model is returned unchanged"
                         f"{_BUG}")
        if not outcome.groups:
            notes.append("found no layer whose output channels it can prune (weights must be constants: prune "
                         "before quantizing)")
        if outcome.fallback_criterion:
            notes.append(f"criterion '{self.options.criterion}' scored nothing in {len(outcome.fallback_criterion)} "
                         f"group(s) (e.g. '{outcome.fallback_criterion[0]}'); they were ranked by l1")
        pruned = outcome.pruned_groups
        stats = {"pruned channel": outcome.channels_removed(), "pruned group": len(pruned)} if pruned else {}
        if internal:
            stats["contained internal-error"] = internal  # groups kept whole by the last line of defence
        return PassResult(graph, bool(pruned), stats, notes)

    def _settle(self, graph, ctx, adapter, view, outcome, check) -> PassResult:
        def attempt(plan):  # on a fresh copy each time: settle() may retry without the group that failed
            fork = adapter.fork()
            fork.apply(plan)
            check(fork, view)
            return fork.graph

        pruned = settle(outcome, attempt)
        return self._result(graph if pruned is None else pruned, outcome, ctx)

    # -- ONNX ---------------------------------------------------------------------------------------------
    def run_onnx(self, graph, ctx) -> PassResult:
        from graphopt.prune.onnx_adapter import OnnxChannels

        handlers, criterion = self._lookup("onnx", ctx)
        if self.options.budget:
            return self._search(graph, ctx, handlers, criterion)
        if getattr(criterion, "needs_gradients", False):
            raise self.fail(f"criterion '{self.options.criterion}' needs gradients: prune the PyTorch model "
                            "(FX, graphopt.optimize(module, ...)) with calibration data")
        adapter = OnnxChannels(graph.copy())  # the view folds weight preprocessing: an unpruned graph comes back
        try:                                    # as it came
            view = adapter.view()
            outcome = self._prune(view, handlers, criterion)
        except GraphoptError:
            raise
        except Exception as exc:  # an engine bug: prune nothing and say so, never fail the pipeline
            return _unchanged(graph, exc)
        ran_before: list[str | None] = []  # whether the original runs: asked once, at the first failed attempt
        feeds = run_inputs(graph, ctx)

        def check(fork, v) -> None:
            """:func:`_check_onnx`; when the pruned graph fails and the original does not run either, that is the
            input's problem (a PassError, not contained as a handler bug)."""
            try:
                _check_onnx(fork.graph, v, feeds)
            except RuntimeError as exc:
                if not ran_before:
                    try:
                        graph.run(feeds)
                        ran_before.append(None)
                    except Exception as before:
                        ran_before.append(first_line(before))
                if ran_before[0] is not None:
                    raise self.fail(f"the model does not run on onnxruntime even before pruning ({ran_before[0]}) "
                                    f"(check it with graphopt verify)") from exc
                raise

        return self._settle(graph, ctx, adapter, view, outcome, check)

    # -- the budget search (ONNX) -----------------------------------------------------------------------------
    def _search(self, graph, ctx, handlers, criterion) -> PassResult:
        from graphopt.executors import get_executor
        from graphopt.passes.pipeline import format_passes
        from graphopt.plugins import default_registry
        from graphopt.prune.onnx_adapter import OnnxChannels
        from graphopt.report import prune_search as search
        from graphopt.report import study_files
        from graphopt.report.report_dir import SEARCH

        o = self.options
        if ctx.backend is None:
            raise self.fail("budget: no backend in the pass context to run candidates on (give one)")
        if o.plot:
            _check_plot_path(o.plot, self)
        base = dataclasses.replace(o, budget="", eval="", labels="labels", samples=64, executor="", plot="")
        probe = type(self)(dataclasses.replace(base, ratio=0.0))  # ratio 0: the groups, and why some are kept whole
        units = [g.name for g in probe._prune(OnnxChannels(graph.copy()).view(), handlers, criterion).groups
                 if g.blocked is None]
        if not units:
            raise self.fail("budget: found no channel group it can prune (see prune without a budget for why)")
        scored = study_files.scoring_samples(o.eval, o.labels, ctx.calibration, o.samples)
        if scored is None:
            raise UsageError(f"pass '{self.name}': budget: no data to score candidates on: give calibration "
                             f"data (--calib) or eval=")
        study = search.PruneStudy.create(graph, *scored, backend=ctx.backend,
                                         pipeline=format_passes([type(self)(base)]),
                                         registry=ctx.registry or default_registry())
        spec = o.executor or ctx.executor  # the option, else the run's --executor
        executor = get_executor(spec, f"{study.folder}/runs") if spec else None
        try:
            result = search.search_ratios(study, search.parse_budget(o.budget), units, _candidate_options,
                                          executor=executor)
        finally:
            if executor is not None:
                executor.close()
        chosen = {k: tuple(v) if isinstance(v, list) else v for k, v in result.best["options"].items()}
        out = type(self)(dataclasses.replace(base, **chosen)).run_onnx(graph, ctx)
        ctx.state[SEARCH] = result.to_dict()
        if o.plot:  # once the run succeeds
            ctx.write_after(o.plot, result.plot)
        out.notes.insert(0, result.describe())
        out.stats["evaluated candidate"] = len(result.candidates)
        return out

    # -- FX -----------------------------------------------------------------------------------------------
    def run_fx(self, graph, ctx) -> PassResult:
        from graphopt.prune.fx_adapter import FxChannels

        handlers, criterion = self._lookup("fx", ctx)
        if self.options.budget:
            raise UnsupportedError(f"pass '{self.name}': budget= searches on ONNX models (export the model to ONNX, "
                                   f"or give ratios)")
        adapter = FxChannels(graph)
        try:
            view = adapter.view()
        except GraphoptError:
            raise
        except Exception as exc:
            return _unchanged(graph, exc)
        if getattr(criterion, "needs_gradients", False):
            if ctx.calibration is None:
                raise UsageError(f"pass '{self.name}': criterion '{self.options.criterion}' needs calibration data "
                                 f"(--calib / calibration=...)")
            from graphopt.calib.sources import load_calibration

            specs = [(name, (None, *ex.shape[1:]), ex.detach().numpy().dtype)
                     for name, ex in zip(graph.input_names(), graph.example_inputs)]
            view.grads = adapter.gradients(load_calibration(ctx.calibration, specs, batch_size=32, limit=256))
        try:
            outcome = self._prune(view, handlers, criterion)
        except GraphoptError:
            raise
        except Exception as exc:
            return _unchanged(graph, exc)
        return self._settle(graph, ctx, adapter, view, outcome, _check_fx)


def _check_plot_path(path: str, owner) -> None:
    """Never write over a file that is not a PNG already (a model, data: the run's inputs are never written)."""
    import os

    if os.path.lexists(path):
        with open(path, "rb") as f:
            if os.path.islink(path) or f.read(8) != b"\x89PNG\r\n\x1a\n":
                raise owner.fail(f"plot={path}: exists and is not a PNG plot; give a new path")


def _candidate_options(scope: str, ratio: float, unit_ratios: dict[str, float]) -> dict:
    """A search candidate as this pass's options (JSON)."""
    return {"scope": scope, "ratio": ratio, "layer_ratios": [f"{u}@{r:g}" for u, r in sorted(unit_ratios.items())]}


_BUG = " (an error inside graphopt, contained: please report it with the model)"


def _unchanged(graph, exc: Exception) -> PassResult:
    return PassResult(graph, False, {}, [f"pruned nothing: {internal_reason(exc)} while reading the graph; the model "
                                         f"is returned unchanged{_BUG}"])


def _check_fx(fork, view) -> None:
    try:
        fork.check(view)
    except Exception as exc:
        raise RuntimeError(f"the pruned module does not run ({first_line(exc)})") from exc


def _check_onnx(graph, view, feeds: dict) -> None:
    """The pruned graph passes the onnx checker's strict shape inference, runs on ``feeds``, and keeps its outputs'
    shapes."""
    try:
        graph.verify()
        _check_conv_channels(graph)
        outputs = graph.run(feeds)
    except Exception as exc:  # the checker, shape inference or onnxruntime: any failure is a handler bug
        raise RuntimeError(f"the pruned graph does not run ({first_line(exc)})") from exc
    for name, out in zip(view.outputs, outputs):
        want = view.shapes.get(name)
        if want is not None and any(w is not None and w != d for w, d in zip(want, out.shape)):
            raise RuntimeError(f"output '{name}' changed shape {tuple(want)} -> {out.shape} after pruning")


def _check_conv_channels(graph) -> None:
    """Every Conv / ConvTranspose reads as many channels as its weight expects (neither onnx shape inference nor
    onnxruntime's CPU kernels check it: a mismatch runs, reading the wrong memory)."""
    import onnx_graphsurgeon as gs

    shapes = graph.inferred_shapes()
    for node in graph.gs.nodes:
        if node.op not in ("Conv", "ConvTranspose") or not isinstance(node.inputs[1], gs.Constant):
            continue
        dims = shapes.get(node.inputs[0].name, ([],))[0]
        w, groups = node.inputs[1].values.shape, int(node.attrs.get("group", 1))
        want = w[1] * groups if node.op == "Conv" else w[0]
        if len(dims) > 1 and isinstance(dims[1], int) and dims[1] != want:
            raise ValueError(f"{node.op} '{node.name}' reads {dims[1]} channels, its weight expects {want}")


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(PruneChannels)


@hookimpl
def graphopt_register_channel_handlers(registry):
    for op, handler in BUILTIN_HANDLERS.items():
        for ir in ("onnx", "fx"):
            registry.add_channel_handler(ir, op, handler)


@hookimpl
def graphopt_register_importance(registry):
    for name, fn in BUILTIN_IMPORTANCE.items():
        registry.add_importance(name, fn)

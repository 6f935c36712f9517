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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from graphopt import Equivalence, Pass, PassResult, hookimpl
from graphopt.prune import BUILTIN_HANDLERS, BUILTIN_IMPORTANCE, Outcome, prune_view
from graphopt.prune.importance import l1


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

        def __post_init__(self):
            if not 0.0 <= self.ratio < 1.0:
                raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
            if self.round_to < 1 or self.min_channels < 1:
                raise ValueError("round_to and min_channels must be at least 1")
            _layer_ratios(self.layer_ratios)

    # -- plumbing shared by both IRs ----------------------------------------------------------------------
    def _lookup(self, ir: str, ctx):
        registry = ctx.registry
        handlers = dict(BUILTIN_HANDLERS)
        criteria = dict(BUILTIN_IMPORTANCE)
        if registry is not None:
            handlers.update({op: fn for (where, op), fn in registry.channel_handlers.items() if where in (ir, "*")})
            criteria.update(registry.importance)
        if self.options.criterion not in criteria:
            raise self.fail(f"unknown criterion '{self.options.criterion}' (known: {', '.join(sorted(criteria))})")
        return handlers, criteria[self.options.criterion]

    def _prune(self, view, handlers, criterion) -> Outcome:
        o = self.options
        return prune_view(view, handlers=handlers, criterion=criterion, fallback=l1, ratio=o.ratio, scope=o.scope,
                          layer_ratios=_layer_ratios(o.layer_ratios), round_to=o.round_to,
                          min_channels=o.min_channels, ignore=o.ignore, split=o.split)

    def _result(self, graph, outcome: Outcome, ctx) -> PassResult:
        ctx.state["prune"] = outcome.rows()
        notes = [f"{count} channel group(s) kept whole: {reason}"
                 for reason, count in outcome.blocked_reasons().most_common(5)]
        if not outcome.groups:
            notes.append("found no layer whose output channels it can prune (weights must be constants: prune "
                         "before quantizing)")
        if outcome.fallback_criterion:
            notes.append(f"criterion '{self.options.criterion}' scored nothing in {len(outcome.fallback_criterion)} "
                         f"group(s) (e.g. '{outcome.fallback_criterion[0]}'); they were ranked by l1")
        pruned = outcome.pruned_groups
        stats = {"pruned channel": outcome.channels_removed(), "pruned group": len(pruned)} if pruned else {}
        return PassResult(graph, bool(pruned), stats, notes)

    # -- ONNX ---------------------------------------------------------------------------------------------
    def run_onnx(self, graph, ctx) -> PassResult:
        from graphopt.prune.onnx_adapter import OnnxChannels

        handlers, criterion = self._lookup("onnx", ctx)
        if getattr(criterion, "needs_gradients", False):
            raise self.fail(f"criterion '{self.options.criterion}' needs gradients: prune the PyTorch model "
                            "(FX, graphopt.optimize(module, ...)) with calibration data")
        work = graph.copy()  # the view folds weight preprocessing: an unpruned graph is returned as it came
        adapter = OnnxChannels(work)
        view = adapter.view()
        outcome = self._prune(view, handlers, criterion)
        if not outcome.pruned_groups:
            return self._result(graph, outcome, ctx)
        adapter.apply(outcome.plan)
        self._check(work, view, graph)
        return self._result(work, outcome, ctx)

    def _check(self, graph, view, original) -> None:
        try:
            graph.verify()
            outputs = graph.run(graph.sample_inputs())
        except Exception as exc:  # the checker, shape inference or onnxruntime: a handler bug, if the input ran
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            try:
                original.run(original.sample_inputs())
            except Exception:  # it did not run before pruning either: not a handler's doing
                raise self.fail(f"the model does not run on onnxruntime even before pruning ({reason}) (check it "
                                f"with graphopt verify)") from exc
            raise self.fail(f"the pruned graph does not run ({reason}); this is a bug in a "
                            "channel handler, please report it with the model") from exc
        for name, out in zip(view.outputs, outputs):
            want = view.shapes.get(name)
            if want is not None and any(w is not None and w != d for w, d in zip(want, out.shape)):
                raise self.fail(f"output '{name}' changed shape {tuple(want)} -> {out.shape} after pruning")

    # -- FX -----------------------------------------------------------------------------------------------
    def run_fx(self, graph, ctx) -> PassResult:
        from graphopt.prune.fx_adapter import FxChannels

        handlers, criterion = self._lookup("fx", ctx)
        adapter = FxChannels(graph)
        view = adapter.view()
        if getattr(criterion, "needs_gradients", False):
            if ctx.calibration is None:
                raise self.fail(f"criterion '{self.options.criterion}' needs calibration data (calibration=...)")
            from graphopt.calib.sources import load_calibration

            specs = [(name, (None, *ex.shape[1:]), ex.detach().numpy().dtype)
                     for name, ex in zip(graph.input_names(), graph.example_inputs)]
            view.grads = adapter.gradients(load_calibration(ctx.calibration, specs, batch_size=32, limit=256))
        outcome = self._prune(view, handlers, criterion)
        if outcome.pruned_groups:
            adapter.apply(outcome.plan)
            try:
                adapter.check(view)
            except Exception as exc:
                raise self.fail(f"the pruned module does not run ({str(exc).splitlines()[0]}); this is a bug in a "
                                "channel handler, please report it with the model") from exc
        return self._result(graph, outcome, ctx)


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

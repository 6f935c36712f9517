"""mixed-precision: int8 under an accuracy budget — decide which fusion groups stay float (or go to a fallback
format) before place-qdq runs; place-fallback: run that fallback format on the groups chosen, after place-qdq."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from graphopt import Equivalence, Pass, PassResult, hookimpl
from graphopt.calib.state import FLOAT_NODES, RANGES
from graphopt.errors import UsageError

FALLBACK = "quant.fallback_passes"  # the fallback format's passes, restricted to the groups mixed-precision chose


class MixedPrecision(Pass):
    """Keep the most sensitive fusion groups float until ``min_cosine`` (the outputs' cosine against the float
    model) and/or ``max_drop`` (top-1 accuracy points below float, on the labelled ``eval`` data) holds.

    Runs after ``calibrate`` and before ``place-qdq``: it does not change the graph, it decides. Groups (a weighted
    op with its fused epilogue, or an op the backend quantizes on its own; see :mod:`graphopt.report.sensitivity`)
    are ranked by a cheap proxy from one fully-int8 run, then moved to float one more at a time, each step confirmed
    by quantizing the model with those groups float (place-qdq's own placement) and running it on the backend over
    ``samples`` samples (``eval``'s, else the calibration data's), until the budget holds or ``max_evals`` trials
    have run (0: no bound). The placement scored is the one the pipeline writes: its later place pass with the
    options the pipeline gave it (``int8-budget:per_channel=no``). The decision goes to place-qdq as node exclusions
    (``exclude_nodes`` replays it: ``graphopt sensitivity --recipe`` writes it down). When the budget cannot be met,
    the pass warns and keeps the closest placement it tried.

    With ``fallback`` (a pass that takes ``exclude_nodes``: ``int8-dynamic``, int8 weights with activations
    quantized at run time; ``int4-weight``, 4-bit weights with float activations), the groups kept float are then
    tried in that format, all at once and else one at a time, most robust first, each kept in it while the budget
    still holds (:mod:`graphopt.report.budget`); which groups the format can take it decides itself (int8-dynamic:
    MatMul/Gemm with a constant weight). Those groups are excluded from place-qdq as well, and the pass hands the
    fallback's passes, restricted to exactly them (every other node they would take excluded), to
    ``place-fallback``, which ``int8-budget`` runs after place-qdq: the pipeline then builds the model each trial
    scored. A pipeline spelled out by hand runs ``place-fallback`` after ``place-qdq`` itself. The fallback pass
    runs with its defaults here (options do not nest in the pipeline syntax); ``graphopt sensitivity --fallback``
    takes them, and its recipe replays the decision with plain passes.

    On a PyTorch model (x86) the groups are the oneDNN kernels of the FX placement, named by module path, and the
    trials run the Q/DQ graph in eager PyTorch (:mod:`graphopt.report.sensitivity_fx`); the decision is x86's
    per-module config, ``exclude_nodes`` module paths (``X86InductorQuantizer.set_module_name_qconfig(path,
    None)``); there a ``fallback`` is refused.
    """

    name = "mixed-precision"
    irs = frozenset({"onnx", "fx"})
    equivalence = Equivalence.APPROXIMATE

    @dataclass(frozen=True)
    class Options:
        min_cosine: Optional[float] = None  # the outputs' cosine vs float, at least
        max_drop: Optional[float] = None  # top-1 accuracy points below float, at most (needs eval)
        eval: str = ""  # labelled data (.npz: the inputs and a labels array)
        labels: str = "labels"  # the labels array in eval
        samples: int = 128  # samples each trial runs
        max_evals: int = 0  # at most this many trials (0: no bound)
        place: str = "place-qdq"  # the pass that places int8 (its options: the scheme requested)
        fallback: str = ""  # the format tried for groups kept float (int8-dynamic, int4-weight); "": none (fp32)

        def __post_init__(self):  # no budget at all is refused when the pass runs (the defaults stay constructible)
            if self.min_cosine is not None and not -1 <= self.min_cosine <= 1:
                raise ValueError(f"min_cosine must be in [-1, 1], got {self.min_cosine}")
            if self.max_drop is not None and (self.max_drop < 0 or not self.eval):
                raise ValueError("max_drop is >= 0 points of accuracy and needs eval=labelled.npz")
            if self.samples < 1 or self.max_evals < 0:
                raise ValueError("samples must be >= 1 and max_evals >= 0")

    def files(self):
        return ([("labelled data (eval=)", self.options.eval)] if self.options.eval else []), []

    def requires(self, graph, ctx):
        if self.options.min_cosine is None and self.options.max_drop is None:
            raise UsageError(f"pass '{self.name}': give a budget: min_cosine (e.g. int8-budget:min_cosine=0.99) "
                             "and/or max_drop (accuracy points, with eval=labelled.npz)")
        if RANGES not in ctx.state:
            raise self.out_of_order("no calibrated ranges: run insert-observers and calibrate first (int8-budget does)")

    def run_onnx(self, graph, ctx):
        from graphopt.report.sensitivity import Study

        return self._decide(graph, ctx, Study)

    def run_fx(self, graph, ctx):
        from graphopt.report.sensitivity_fx import FxStudy

        if self.options.fallback:
            raise UsageError(f"pass '{self.name}': fallback={self.options.fallback} is searched on ONNX models only; "
                             f"on a PyTorch model the budget keeps groups float (drop fallback)")
        return self._decide(graph, ctx, FxStudy)

    def _decide(self, graph, ctx, kind):
        from graphopt.report.budget import search_budget
        from graphopt.report.report_dir import DECISION
        from graphopt.report.study_files import scoring_samples

        scored = scoring_samples(self.options.eval, self.options.labels, ctx.calibration, self.options.samples)
        if scored is None:
            raise UsageError(f"pass '{self.name}': no data to measure the budget on: give calibration data "
                             f"(--calib) or eval=labelled.npz")
        from graphopt.passes.pipeline import format_passes
        from graphopt.report.sensitivity import placement_to_score

        fallback = {"fallback_text": self.options.fallback} if self.options.fallback else {}
        place = format_passes([placement_to_score(self.options.place, ctx, self)])  # the pipeline's, options and all
        study = kind.create(graph, ctx.state[RANGES], *scored, backend=ctx.backend, place_text=place,
                            registry=ctx.registry, **fallback)
        result = search_budget(study, min_cosine=self.options.min_cosine, max_drop=self.options.max_drop,
                               max_evals=self.options.max_evals or None)
        ctx.state[FLOAT_NODES] = result.excluded_nodes  # float, or the fallback format: not static int8
        ctx.state[FALLBACK] = study.fallback_passes(result.fallback_groups)
        ctx.state[DECISION] = result.report(study)  # the run report's per-group table and sensitivity plot
        if not result.holds:
            ctx.warn(f"{self.name}: {result.describe()}")
        stats = {"kept float groups": len(result.float_groups), "fallback groups": len(result.fallback_groups),
                 "ran trials": result.evaluations}
        return PassResult(graph, False, {k: v for k, v in stats.items() if v}, [result.describe()])


class PlaceFallback(Pass):
    """Run the fallback format ``mixed-precision`` chose on exactly the groups it chose, after ``place-qdq``.

    mixed-precision leaves, beside place-qdq's exclusions, the fallback's passes with every node but those groups'
    anchors excluded; this pass runs them on the placed graph (the order each trial was scored in), and reports
    what they did. Nothing chosen (no ``fallback``, or none of the groups held the budget in it), or a PyTorch
    model: nothing to do.
    """

    name = "place-fallback"
    irs = frozenset({"onnx", "fx"})
    equivalence = Equivalence.APPROXIMATE

    def run_onnx(self, graph, ctx):
        from graphopt.passes.manager import PassManager

        passes = ctx.state.get(FALLBACK) or []
        if not passes:
            return PassResult(graph, False, {}, ["no group in a fallback format: nothing to do"])
        graph, report = PassManager(passes, [], ctx).run(graph, in_place=True, finish=False)
        stats: dict[str, int] = {}
        for record in report.records:
            for key, value in record.stats.items():
                stats[key] = stats.get(key, 0) + value
        ran = ", ".join(dict.fromkeys(p.name for p in passes))
        return PassResult(graph, report.modified, stats, [f"ran {ran} on the groups mixed-precision chose for it "
                                                          f"(every other node it takes excluded)"])

    def run_fx(self, graph, ctx):
        return PassResult(graph, False, {}, ["no fallback format on PyTorch models: nothing to do"])


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(MixedPrecision)
    registry.add_pass(PlaceFallback)

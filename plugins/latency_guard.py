"""latency-guard: keep float the fusion groups whose int8 is measured slower than float on the target backend."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Literal

from graphopt import Equivalence, Pass, PassResult, hookimpl
from graphopt.calib.state import FLOAT_NODES, RANGES

NO_TIMING_ENV = "GRAPHOPT_NO_TIMING"  # set: guard=auto makes no choice by timing


class LatencyGuard(Pass):
    """Keep float the groups whose int8 is measured slower than float on the run's backend, when the whole model is
    then faster than int8 beyond the noise of the same run (an A/A pair) and by ``min_gain`` of its time, and make
    sure the result is not slower than fp32, else keep the model float with a warning. Where the backend profiles
    the graph it optimized (onnxruntime), the candidates are the groups whose int8 kernels are not faster than
    their float ones by ``margin`` in its profile, and nothing is timed unless the profiles leave a gain of
    ``min_gain`` possible or int8 is not clearly faster than fp32 there (at most three trials, one timed);
    elsewhere they are the groups with the least arithmetic per element
    (``max_intensity``: depthwise convolutions, small GEMMs, ops quantized on their own), each timed on the whole
    model (one intra-op thread, CPU time per run, interleaved rounds), as many as ``seconds`` allows. Results are
    cached per model, backend, CPU and graphopt version: a rerun times nothing.

    Runs after ``calibrate`` (and after ``mixed-precision``, whose float groups it keeps) and before
    ``place-qdq``: it does not change the graph, it adds node exclusions for place-qdq. See
    :mod:`graphopt.report.latency_guard`.

    ``guard``: ``auto`` (the default, and how ``int8`` runs it) guards where it is cheap — a backend that profiles
    the graph it runs (onnxruntime, OpenVINO) — and does nothing elsewhere (TensorRT, a PyTorch model) or when
    ``$GRAPHOPT_NO_TIMING`` is set (builds that must give the same bytes on every machine: no choice by timing);
    ``on`` guards on any ONNX backend (timing each low-arithmetic group where there is no profiler: slower; the
    ``int8-guarded`` alias); ``off`` does nothing (``int8:guard=off``).
    """

    name = "latency-guard"
    irs = frozenset({"onnx", "fx"})
    equivalence = Equivalence.APPROXIMATE
    decides_by_timing = True

    @dataclass(frozen=True)
    class Options:
        seconds: float = 60.0  # time cap for the timing (the probe and the confirming run included)
        rounds: int = 20  # interleaved rounds per timing trial
        max_intensity: float = 32.0  # without a profiler, candidates: groups with at most this many MACs per element
        margin: float = 0.1  # with a profiler: a group is a candidate unless its int8 kernels beat float by this share
        min_gain: float = 0.05  # groups are kept float only if the whole model is then faster by this share
        place: str = "place-qdq"  # the pass that places int8 (its options: the scheme requested)
        guard: Literal["auto", "on", "off"] = "auto"  # see the docstring

        def __post_init__(self):
            if (self.seconds <= 0 or self.rounds < 3 or self.max_intensity < 0 or not 0 <= self.margin < 1
                    or not 0 <= self.min_gain < 1):
                raise ValueError("seconds must be > 0, rounds >= 3, max_intensity >= 0, margin and min_gain in [0, 1)")

    def requires(self, graph, ctx):
        if self._skip(graph, ctx):
            return
        if RANGES not in ctx.state:
            raise self.out_of_order("no calibrated ranges: "
                                    "run insert-observers and calibrate first (int8-guarded does)")
        if ctx.backend is None:
            raise self.fail("no backend to time int8 on")

    def _skip(self, graph, ctx) -> str:
        """Why this run does not guard ("" when it does)."""
        mode = self.options.guard
        if mode == "off":
            return "off (guard=off)"
        if graph.ir != "onnx":
            if mode == "on":
                raise self.fail("guard=on times ONNX models on their backend; a PyTorch model has no such timing "
                                "(export it to ONNX, or drop guard=on)")
            return "nothing to time on a PyTorch model (it guards ONNX models on onnxruntime)"
        if mode == "auto":
            if os.environ.get(NO_TIMING_ENV):
                return f"off (${NO_TIMING_ENV} is set: no choice by timing)"
            if not callable(getattr(ctx.backend, "profile_kernels", None)):
                name = getattr(ctx.backend, "name", "this backend")
                return (f"off on {name}: guard=auto needs a backend that profiles the graph it runs (onnxruntime, "
                        f"openvino); guard=on times each candidate instead")
        return ""

    def run_fx(self, graph, ctx):
        return PassResult(graph, False, {}, [f"latency guard: {self._skip(graph, ctx)}"])

    def run_onnx(self, graph, ctx):
        skip = self._skip(graph, ctx)
        if skip:
            return PassResult(graph, False, {}, [f"latency guard: {skip}"])
        return self._guard(graph, ctx)

    def _guard(self, graph, ctx):
        from graphopt.passes.pipeline import format_passes
        from graphopt.report.latency_guard import FP32, guard_latency
        from graphopt.report.sensitivity import Study, placement_to_score

        earlier = tuple(ctx.state.get(FLOAT_NODES, ()))  # a budget's decision: the guard starts from it
        place = placement_to_score(self.options.place, ctx, self)  # what will place, exclusions and all
        if earlier:
            place = type(place)(dataclasses.replace(
                place.options, exclude_nodes=tuple(dict.fromkeys((*place.options.exclude_nodes, *earlier)))))
        data = self._one_sample(graph, ctx)
        study = Study.create(graph, ctx.state[RANGES], data, None, backend=ctx.backend,
                             place_text=format_passes([place]), registry=ctx.registry)
        result = guard_latency(study, seconds=self.options.seconds, rounds=self.options.rounds,
                               max_intensity=self.options.max_intensity, margin=self.options.margin,
                               min_gain=self.options.min_gain)
        floats = result.float_nodes if result.kept != FP32 else tuple(n.name for n in graph.gs.nodes if n.name)
        ctx.state[FLOAT_NODES] = tuple(dict.fromkeys((*earlier, *floats)))  # fp32: every node, so no Q/DQ at all
        for warning in result.warnings:
            hint = " (int8:guard=off quantizes it all the same)" if result.kept == FP32 else ""
            ctx.warn(f"{self.name}: {warning}{hint}")
        if result.kept != FP32 and study.groups and len(result.float_groups) >= len(study.groups):
            ctx.warn(f"{self.name}: every group ran faster in float than in int8 on this backend and CPU: the model "
                     f"stays float (int8:guard=off quantizes it all the same)")
        stats = {"kept float groups": len(result.float_groups), "candidates": result.candidates}
        return PassResult(graph, False, {k: v for k, v in stats.items() if v}, [result.describe()])

    @staticmethod
    def _one_sample(graph, ctx) -> dict:
        """One input sample: the calibration data's first, else fixed-seed inputs (timing does not need real data
        as much as accuracy does, but int8 kernels see realistic values with it)."""
        if ctx.calibration is not None:
            for batch in ctx.calibration.batches():
                return {k: v[:1] for k, v in batch.items()}
        from graphopt.ir.feeds import feeds

        return feeds(graph.input_specs(), 0, 1)


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(LatencyGuard)

"""Passes written only for tests, registered through the same hooks a plugin uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import Equivalence, Pass, PassResult, hookimpl


class ScaleWeights(Pass):
    """Multiply every float initializer by ``factor`` while claiming to be exact (a deliberately broken pass)."""

    name = "scale-weights"
    irs = frozenset({"onnx"})

    @dataclass(frozen=True)
    class Options:
        factor: float = 2.0

    def run_onnx(self, graph, ctx):
        changed = 0
        for node in graph.gs.nodes:
            for i, t in enumerate(node.inputs):
                if isinstance(t, gs.Constant) and t.values.dtype == np.float32 and t.values.ndim > 1:
                    scaled = (t.values * self.options.factor).astype(np.float32)
                    node.inputs[i] = gs.Constant(t.name + "_scaled", scaled)
                    changed += 1
        return PassResult(graph, changed > 0, {"scaled weights": changed})


class TypedOptions(Pass):
    """Does nothing; has one option of each supported type (for parsing tests)."""

    name = "typed-options"
    irs = frozenset({"onnx", "fx"})

    @dataclass(frozen=True)
    class Options:
        ratio: float = 0.5
        round_to: int = 1
        enabled: bool = True
        criterion: Literal["l1", "l2"] = "l1"
        ignore: tuple[str, ...] = ()
        label: str = "x"
        limit: float | None = None

        def __post_init__(self):
            if not 0 <= self.ratio < 1:
                raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")

    def run_onnx(self, graph, ctx):
        return PassResult(graph, False)

    run_fx = run_onnx


class FxOnly(Pass):
    """A pass that only runs on FX graphs."""

    name = "fx-only"
    irs = frozenset({"fx"})

    def run_fx(self, graph, ctx):
        return PassResult(graph, False)


class Approximate(Pass):
    """Adds noise to weights; declares itself approximate, so the numeric check measures but does not fail."""

    name = "approx-noise"
    irs = frozenset({"onnx"})
    equivalence = Equivalence.APPROXIMATE

    def run_onnx(self, graph, ctx):
        return ScaleWeights(ScaleWeights.Options(1.001)).run_onnx(graph, ctx)


class Exploding(Pass):
    """Raises a plain Python error, like a buggy plugin."""

    name = "exploding"
    irs = frozenset({"onnx"})

    def run_onnx(self, graph, ctx):
        raise RuntimeError("boom")


class NanWeights(Pass):
    """Puts a NaN into the first float weight while claiming to be exact (a NaN the check must not miss)."""

    name = "nan-weights"
    irs = frozenset({"onnx"})

    def run_onnx(self, graph, ctx):
        for node in graph.gs.nodes:
            for i, t in enumerate(node.inputs):
                if isinstance(t, gs.Constant) and t.values.dtype == np.float32 and t.values.ndim > 1:
                    broken = t.values.copy()
                    broken.flat[0] = np.nan
                    node.inputs[i] = gs.Constant(t.name + "_nan", broken)
                    return PassResult(graph, True, {"broke weights": 1})
        return PassResult(graph, False)


class NotePasses:
    """An instrument (``--instrument note-passes``): adds a note to every pass it sees."""

    needs_pass_input = False

    def before_pass(self, pass_, graph, ctx):
        pass

    def after_pass(self, pass_, result, record, ctx):
        record.notes.append("seen by note-passes")

    def after_pass_failed(self, pass_, graph, exc, ctx):
        pass

    def after_pipeline(self, graph, report, ctx):
        pass


@hookimpl
def graphopt_register_passes(registry):
    for cls in (ScaleWeights, TypedOptions, FxOnly, Approximate, Exploding, NanWeights):
        registry.add_pass(cls)


@hookimpl
def graphopt_register_instruments(registry):
    registry.add_instrument("note-passes", NotePasses)


@hookimpl
def graphopt_register_pipelines(registry):
    registry.add_pipeline("broken-fold", "fold,scale-weights", "fold, then a pass that corrupts weights")

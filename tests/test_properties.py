"""Properties of the built-in pipelines on random valid ONNX graphs (hypothesis; graphs from tests/random_graphs.py).

Every test states its ``max_examples`` and ``deadline``; all run derandomized with no example database, so CI
sees the same examples every time and a failure reproduces from the test alone (hypothesis prints the shrunk
graph: its blocks, input shape, weight seed and nodes). The whole file takes about 45 s on 2 cores.

Tolerances, ``max|a - r| / max|r|`` over the outputs unless said otherwise
(:func:`graphopt.passes.instruments.relative_error`, what graphopt's own numeric check computes):

- ``fold`` is exact: 1e-5 (BatchNorm folded into a Conv / Gemm re-associates float32 products: a few ulps).
- ``fp16``: :func:`tests.random_graphs.fp16_tolerance`, 4 float16 roundoffs (2**-11 each) per op on the longest
  path, of ``max|a - r| / max(max|r|, 1)`` (:func:`tests.random_graphs.unit_scale_error`: the graphs' values are
  near unit scale, so a tiny output is cancellation and carries its inputs' rounding); on 1,000 graphs the worst
  was one roundoff per op.
- ``prune``: the pruned model against the original with the removed channels zeroed: rtol 1e-4, atol 1e-5 (the
  tolerance tests/test_prune_patterns.py uses: the same products summed in another order).
"""

from __future__ import annotations

import dataclasses
import types
import typing

import numpy as np
import onnx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.ir import OnnxGraph
from graphopt.passes.instruments import relative_error
from graphopt.passes.pipeline import format_passes, parse_pipeline, resolve
from graphopt.plugins import load_registry
from graphopt.prune import BUILTIN_HANDLERS, prune_view
from graphopt.prune.importance import l1
from graphopt.prune.onnx_adapter import OnnxChannels
from graphopt.prune.plan import _keep_count
from tests import helpers
from tests.random_graphs import Spec, fp16_tolerance, onnx_graphs, unit_scale_error
from tests.test_prune_patterns import TOL as PRUNE_TOL
from tests.test_prune_patterns import _masked

# reproducible in CI: the same examples every run, nothing remembered between runs. Deadlines are for hangs
# only (examples take 2-400 ms): hypothesis fails a test whose example is slow once and fast on the replay.
REPRODUCIBLE = dict(derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
FOLD_RTOL = 1e-5


def _inputs(graph, batch: int = 2) -> dict[str, np.ndarray]:
    """Fixed-seed inputs; batch 2 when the batch is dynamic (graphopt's own check runs batch 1)."""
    shape = (batch if graph.dynamic_batch else 1, *graph.input_shape[1:])
    return {"input": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def _run(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    return OnnxGraph.from_model(model).run(feeds)


@settings(max_examples=100, deadline=5000, **REPRODUCIBLE)
@given(onnx_graphs())
def test_generated_graphs_are_valid(graph):
    onnx.checker.check_model(graph.model, full_check=True)
    feeds = _inputs(graph, batch=3)
    outputs = _run(graph.model, feeds)
    assert [o.shape for o in outputs] == [(feeds["input"].shape[0], *s[1:]) for s in graph.output_shapes.values()]
    assert all(np.isfinite(o).all() for o in outputs)


@settings(max_examples=150, deadline=10000, **REPRODUCIBLE)
@given(onnx_graphs())
def test_fold_keeps_outputs(graph):
    feeds = _inputs(graph)
    folded = graphopt.optimize(graph.model, "fold", check=False)
    assert relative_error(_run(graph.model, feeds), _run(folded.model, feeds)) <= FOLD_RTOL


@settings(max_examples=100, deadline=10000, **REPRODUCIBLE)
@given(onnx_graphs())
def test_a_second_fold_changes_nothing(graph):
    folded = graphopt.optimize(graph.model, "fold", check=False)
    again = graphopt.optimize(folded.model, "fold", check=False)
    assert [r.name for r in again.report.records if r.modified] == []  # honest `modified`: nothing left to do


@settings(max_examples=80, deadline=10000, **REPRODUCIBLE)
@given(onnx_graphs())
def test_fp16_stays_within_float16_rounding_and_valid(graph):
    feeds = _inputs(graph)
    half = graphopt.optimize(graph.model, "fp16", check=False).model
    onnx.checker.check_model(half, full_check=True)
    assert unit_scale_error(_run(graph.model, feeds), _run(half, feeds)) <= fp16_tolerance(graph.model)


# Every graph starts with a Conv and ends in a Conv / Gemm head: the channels between are free to prune unless
# a block in between stops them (then the group is kept whole, with a reason).
PRUNABLE = Spec(first="conv", head=True)


@settings(max_examples=150, deadline=10000, **REPRODUCIBLE)
@given(onnx_graphs(PRUNABLE), st.integers(0, 90).map(lambda percent: percent / 100))  # (floats cluster at 0)
def test_prune_equals_the_original_with_the_removed_channels_zeroed(graph, ratio):
    pruned = OnnxGraph.from_model(graph.model)
    adapter = OnnxChannels(pruned)
    view = adapter.view()
    outcome = prune_view(view, handlers=BUILTIN_HANDLERS, criterion=l1, fallback=l1, ratio=ratio)
    for g in outcome.groups:  # each group lost what the ratio asks (or what validation allowed), or says why not
        asked = g.classes.size - _keep_count(g.classes.size, ratio, g.width, 1, 1)
        assert g.blocked or (0 < g.dropped.size <= asked) or asked == g.dropped.size == 0, (g.name, asked, g.dropped)
    event("pruned something" if outcome.pruned_groups else "pruned nothing")  # --hypothesis-show-statistics
    masked = _masked(pruned, view, outcome)
    adapter.apply(outcome.plan)
    pruned.verify()
    feeds = _inputs(graph)
    reference, actual = masked.run(feeds), pruned.run(feeds)
    assert [a.shape for a in actual] == [r.shape for r in _run(graph.model, feeds)]
    for a, r in zip(actual, reference):
        np.testing.assert_allclose(a, r, **PRUNE_TOL)
    # fewer parameters than the graph the pruner saw (Constant nodes lifted, shape chains folded), when it pruned
    assert pruned.num_parameters() < masked.num_parameters() or not outcome.pruned_groups
    assert pruned.num_parameters() <= masked.num_parameters()
    # the public route chooses the same channels
    api = graphopt.optimize(graph.model, f"prune:ratio={ratio!r}", check=False)
    if outcome.pruned_groups:  # (when it prunes nothing it returns the graph as it came, shape chains and all)
        assert api.graph.num_parameters() == pruned.num_parameters()
    for a, r in zip(_run(api.model, feeds), actual):
        np.testing.assert_allclose(a, r, **PRUNE_TOL)


@settings(max_examples=60, deadline=20000, **REPRODUCIBLE)
@given(onnx_graphs())
def test_int8_output_stays_valid(graph):
    feeds = _inputs(graph)
    quantized = graphopt.optimize(graph.model, "fold,int8", calibration=graph.calibration, check=False).model
    onnx.checker.check_model(quantized, full_check=True)
    outputs = _run(quantized, feeds)
    assert [o.shape for o in outputs] == [o.shape for o in _run(graph.model, feeds)]
    assert all(np.isfinite(o).all() for o in outputs)


# -- the textual pipeline --------------------------------------------------------------------------------------
REGISTRY = load_registry(autoload=False, modules=[helpers])  # helpers' typed-options adds str and float | None
NAME = st.text("abcxyz019_./-@=", min_size=1, max_size=8).filter(lambda s: s.lower() != "none")


def _values(hint) -> st.SearchStrategy:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(st.none(), *(_values(a) for a in args if a is not type(None)))
    if origin is tuple:  # items as ignore / layer_ratios / op lists write them
        item = st.one_of(NAME, st.builds(lambda n, r: f"{n}@{r}", NAME, st.sampled_from([0.1, 0.25, 0.5])))
        return st.lists(item, max_size=3).map(tuple)
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(-2, 300)
    if hint is float:
        return st.one_of(st.floats(0, 1, exclude_max=True), st.floats(allow_nan=False))  # 1e+16, inf, -0.0
    if hint is str:
        return NAME
    raise AssertionError(f"no strategy for option type {hint}")


@st.composite
def _pass(draw, name: str | None = None):
    """A registered pass (``name`` or any) with valid options: each field a random value of its type, kept when
    the options' own validation accepts it (else that field keeps its default)."""
    cls = REGISTRY.pass_class(name or draw(st.sampled_from(sorted(REGISTRY.passes))))
    options = cls.Options()
    for key, hint in typing.get_type_hints(cls.Options).items():
        if draw(st.booleans()):
            try:
                options = dataclasses.replace(options, **{key: draw(_values(hint))})
            except (TypeError, ValueError):
                pass
    return cls(options)


@st.composite
def _pipelines(draw):
    """Canonical pipeline text (passes with options printed by format_passes, mixed with aliases, and one-pass
    aliases with options) and the (name, options) of every pass it stands for."""
    parts, passes = [], []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            alias = draw(st.sampled_from(sorted(REGISTRY.pipelines)))
            parts.append(alias)
            passes += resolve(alias, REGISTRY)
        else:
            passes.append(draw(_pass()))
            parts.append(format_passes(passes[-1:]))
    if draw(st.booleans()):  # an alias of one pass takes that pass's options
        passes.append(draw(_pass("prune-channels")))
        parts.append(format_passes(passes[-1:]).replace("prune-channels", "prune", 1))
    return ",".join(parts), [(p.name, p.options) for p in passes]


@settings(max_examples=300, deadline=5000, **REPRODUCIBLE)
@given(_pipelines())
def test_canonical_pipeline_text_round_trips(pipeline):
    text, expected = pipeline
    assert str(parse_pipeline(text)) == text
    passes = resolve(text, REGISTRY)
    assert [(p.name, p.options) for p in passes] == expected  # every typed value comes back from its text
    canonical = format_passes(passes)
    again = resolve(canonical, REGISTRY)
    assert [(p.name, p.options) for p in again] == [(p.name, p.options) for p in passes]
    assert format_passes(again) == canonical
    assert str(parse_pipeline(canonical)) == canonical

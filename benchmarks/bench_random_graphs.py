"""Robustness: random valid ONNX graphs through every built-in pipeline, counting how each run ends.

    python benchmarks/bench_random_graphs.py [--graphs 1000] [--seed 0] [--jobs 2] [--pipeline fold,int8 ...]
                                             [--json out.json] [--markdown out.md]

Graph ``i`` is ``tests.random_graphs.random_graph(seed * 1_000_000 + i)``: the same builder as the hypothesis
strategy of ``tests/test_properties.py`` (Conv with groups/strides/pads/dilations, ConvTranspose, BatchNorm,
Gemm, MatMul, broadcasting Add/Mul/Sub, activations, pools, Concat, Reshape/Flatten/Transpose, Identity, Dropout,
constant subgraphs, residual branches; at most 6 blocks, 8 channels, 8x8 pixels), fed with numpy's generator,
so a seed names the same 1,000 graphs on every machine. Each graph goes through each pipeline with
``graphopt.optimize(model, pipeline, check=True)`` (the numeric check on: exact passes must stay within 1e-4;
int8 gets the graph's random calibration samples). Every run ends as exactly one of:

* ``ok`` — the result runs on onnxruntime, on fresh inputs (batch 2 when the batch is dynamic, where the
  numeric check used batch 1), with the original's output shapes and finite values, and within the
  pipeline's budget: ``fold`` 1e-4 of the original (``max|a - r| / max|r|``), ``fp16``
  :func:`tests.random_graphs.fp16_tolerance` (of ``max|a - r| / max(max|r|, 1)``); ``prune`` has no more
  parameters than the original; ``int8``, ``int8-dynamic`` and ``sparsify`` change the outputs by design and
  are only held to validity (their error is summarized, like fp16's, against unit scale);
* ``refused`` — a :class:`graphopt.errors.GraphoptError` (counted by class) whose cause, if any, is one too:
  graphopt said no, in one line;
* ``crash`` — any other exception, also one the pass manager wrapped into a ``PassError`` (its cause is not a
  GraphoptError: an internal error in a pass);
* ``wrong`` — the run finished (or the check raised ``EquivalenceError``) but the output fails the above.

For every outcome other than ``ok`` the first graphs that hit it are listed with their seed and message, so
``random_graph(seed)`` reproduces each. ``--jobs`` runs graphs in that many processes (default 2).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import time
import warnings
from collections import Counter, defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: tests/

from _common import machine, versions, write_outputs  # noqa: E402

from tests.random_graphs import fp16_tolerance, random_graph, unit_scale_error  # noqa: E402

PIPELINES = ("fold", "fp16", "prune", "int8", "int8-dynamic", "sparsify")
FOLD_RTOL = 1e-4  # the numeric check's default: what `fold` promises


def _relative_error(reference, actual) -> float:
    from graphopt.passes.instruments import relative_error

    return relative_error(reference, actual)


def _run(model, feeds) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def judge(pipeline: str, graph, reference, feeds) -> tuple[str, str, float | None]:
    """(outcome, detail, relative error) for one graph through one pipeline."""
    import graphopt
    from graphopt.errors import EquivalenceError, GraphoptError

    calibration = graph.calibration if "int8" in pipeline else None
    try:
        result = graphopt.optimize(graph.model, pipeline, calibration=calibration, check=True)
        out_model = result.model
    except EquivalenceError as exc:
        return "wrong", f"{type(exc).__name__}: {exc}", None
    except GraphoptError as exc:
        cause = exc.__cause__
        if cause is not None and not isinstance(cause, GraphoptError):
            return "crash", f"{type(cause).__name__} (in {type(exc).__name__}): {exc}", None
        return "refused", f"{type(exc).__name__}: {exc}", None
    except Exception as exc:  # noqa: BLE001 - what this benchmark counts
        return "crash", f"{type(exc).__name__}: {exc}", None
    try:
        actual = _run(out_model, feeds)
    except Exception as exc:  # noqa: BLE001
        return "wrong", f"result does not run: {type(exc).__name__}: {str(exc)[:200]}", None
    if [a.shape for a in actual] != [r.shape for r in reference]:
        return "wrong", f"output shapes {[a.shape for a in actual]} != {[r.shape for r in reference]}", None
    if not all(np.isfinite(a).all() for a in actual):
        return "wrong", "non-finite outputs", None
    # fold: graphopt's own measure; the others against unit scale (an all-zero output after Relu makes any
    # approximation's error "infinite" relative to its own scale)
    err = (_relative_error if pipeline == "fold" else unit_scale_error)(reference, actual)
    budget = {"fold": FOLD_RTOL, "fp16": fp16_tolerance(graph.model)}.get(pipeline)
    if budget is not None and not err <= budget:
        return "wrong", f"relative error {err:.3g} > {budget:.3g}", err
    if pipeline == "prune":
        from graphopt.ir import OnnxGraph

        before, after = (OnnxGraph.from_model(m).num_parameters() for m in (graph.model, out_model))
        if after > before:
            return "wrong", f"parameters grew: {before} -> {after}", err
    return "ok", "", err


def one_graph(job: tuple[int, tuple[str, ...]]) -> tuple[int, int, list[tuple[str, str, str, float | None]], float]:
    seed, pipelines = job
    start = time.perf_counter()
    graph = random_graph(seed)
    batch = 2 if graph.dynamic_batch else 1
    x = np.random.default_rng(seed).standard_normal((batch, *graph.input_shape[1:])).astype(np.float32)
    feeds = {"input": x}
    reference = _run(graph.model, feeds)
    rows = [(p, *judge(p, graph, reference, feeds)) for p in pipelines]
    return seed, len(graph.model.graph.node), rows, time.perf_counter() - start


def _init_worker() -> None:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    logging.disable(logging.WARNING)  # "calibrating on random data" and friends, once per graph
    warnings.simplefilter("ignore")


def _table(counts, classes, errors, pipelines, n, seconds) -> str:
    lines = [f"# Random graphs: {n} graphs x {len(pipelines)} pipelines", "",
             f"{machine()}; {versions()}; {seconds:.0f} s wall", "",
             "| pipeline | ok | refused | crash | wrong | refusals by class | error (median / max) |",
             "|---|---|---|---|---|---|---|"]
    for p in pipelines:
        c = counts[p]
        by_class = ", ".join(f"{k} {v}" for k, v in classes[p].most_common()) or "-"
        errs = errors[p]
        err = f"{np.median(errs):.2g} / {np.max(errs):.2g}" if errs else "-"
        lines.append(f"| {p} | {c['ok']} | {c['refused']} | {c['crash']} | {c['wrong']} | {by_class} | {err} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graphs", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--pipeline", action="append", help="a pipeline to run (repeat the flag for several; "
                    "default: each built-in one: " + " ".join(PIPELINES) + ")")
    ap.add_argument("--examples", type=int, default=3, help="graphs listed per kind of failure")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    pipelines = tuple(args.pipeline or PIPELINES)
    jobs = [(args.seed * 1_000_000 + i, pipelines) for i in range(args.graphs)]
    counts: dict[str, Counter] = defaultdict(Counter)
    classes: dict[str, Counter] = defaultdict(Counter)
    errors: dict[str, list[float]] = defaultdict(list)
    examples: dict[tuple[str, str, str], list] = defaultdict(list)
    per_graph, start = [], time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.jobs, initializer=_init_worker) as pool:
        for done, (seed, nodes, rows, seconds) in enumerate(pool.imap_unordered(one_graph, jobs, chunksize=4), 1):
            per_graph.append((seed, nodes, seconds))
            for pipeline, outcome, detail, err in rows:
                counts[pipeline][outcome] += 1
                if err is not None:
                    errors[pipeline].append(err)
                if outcome == "ok":
                    continue
                kind = detail.split(":")[0]
                if outcome == "refused":
                    classes[pipeline][kind] += 1
                if len(examples[(pipeline, outcome, kind)]) < args.examples:
                    examples[(pipeline, outcome, kind)].append((seed, detail[:300]))
            if done % 100 == 0:
                print(f"  {done}/{len(jobs)} graphs, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    seconds = time.perf_counter() - start
    table = _table(counts, classes, errors, pipelines, len(jobs), seconds)
    nodes = [n for _, n, _ in per_graph]
    table += (f"\nGraphs: {np.mean(nodes):.1f} nodes on average (max {max(nodes)}); "
              f"{np.mean([s for *_, s in per_graph]):.2f} s per graph for all pipelines, per process.\n")
    if examples:
        table += "\n| pipeline | outcome | kind | seeds: message of the first |\n|---|---|---|---|\n"
        for (pipeline, outcome, kind), found in sorted(examples.items()):
            seeds = ", ".join(str(s) for s, _ in found)
            message = found[0][1].replace("|", "\\|").replace("\n", " ")
            table += f"| {pipeline} | {outcome} | {kind} | {seeds}: {message} |\n"
    data = {"graphs": len(jobs), "seed": args.seed, "seconds": seconds,
            "counts": {p: dict(counts[p]) for p in pipelines}, "refusals": {p: dict(classes[p]) for p in pipelines},
            "examples": {" / ".join(k): v for k, v in examples.items()}}
    write_outputs(table, data, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

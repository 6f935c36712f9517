"""Prune ratios searched under a MACs budget against the uniform ratio at the same budget, on ResNet-18-like.

    python benchmarks/bench_prune_budget.py [--budget 0.5] [--calib 16] [--samples 16] [--rounds 10] [--inner 3]
                                            [--latency-budget R] [--plot pareto.png] [--json out.json]
                                            [--markdown out.md]

**The model.** ``graphopt.zoo.cnn.resnet18_like()`` (random weights, BatchNorm statistics randomized, fixed seed),
exported at 1x3x224x224 and folded (``benchmarks/_common.zoo_model``); ``--calib`` fixed-seed normal images to
search on, ``--samples`` other ones to evaluate on.

**Variants.** ``fp32``; ``searched``: ``prune:budget=macs@B`` (the search of :mod:`graphopt.report.prune_search`:
uniform, global and probe-driven per-layer candidates, the most accurate within the budget, on the calibration
images); ``uniform``: ``prune:ratio=r`` with r the uniform ratio the same search found to fit the budget most
closely (its uniform family is bisected across the budget, so it is the best uniform ratio within it, to 1/16 of the
grid step); with ``--latency-budget R``, also ``latency-searched``: ``prune:budget=latency@R`` on this machine's
onnxruntime (every candidate timed against fp32 in the search).

**Measured.** Output cosine and SQNR against fp32 on the evaluation images, MACs and parameters (graphopt.report.cost),
latency (batch 1, ONE intra-op thread, CPU time per run; ``--rounds`` interleaved rounds of ``--inner`` runs,
median and IQR; ratio to fp32: median of per-round ratios — ``_common.interleaved_cpu_ms``), the search's wall time
and candidate count. Writes the Pareto plot (``--plot``). On a shared machine the latency is indicative. Needs
``pip install -e '.[torch]'`` (the zoo) and matplotlib. Models live in a temp dir (never commit .onnx files).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from _common import interleaved_cpu_ms, latency_summary, machine, versions, write_outputs, zoo_model


def _metrics(ref: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    from graphopt.numeric import cosine_similarity, sqnr_db

    a, b = ref.ravel().astype(np.float64), out.ravel().astype(np.float64)
    return cosine_similarity(a, b), sqnr_db(a, b)


def _search(fp32: str, budget: str, calib: dict, samples: int, plot: str | None):
    import graphopt
    from graphopt.passes.base import PassContext
    from graphopt.report.report_dir import SEARCH

    ctx = PassContext()
    extra = f":plot={plot}" if plot else ""
    start = time.perf_counter()
    result = graphopt.optimize(fp32, f"prune:budget={budget}:samples={samples}{extra}", calibration=calib, ctx=ctx,
                               check=False)
    return result, ctx.state[SEARCH], time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--latency-budget", type=float)
    parser.add_argument("--calib", type=int, default=16)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument("--plot", default="pareto_prune_budget.png")
    parser.add_argument("--workdir")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    import graphopt
    from graphopt.report.cost import model_costs

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-prune-budget-")
    os.makedirs(workdir, exist_ok=True)
    tempfile.tempdir = workdir  # the search's study folder and its cached trials live with the models
    os.environ.pop("GRAPHOPT_STUDY_DIR", None)
    fp32, calib, evals, _ = zoo_model("resnet18_like", workdir, args.calib, args.samples)
    graphs = {"fp32": graphopt.optimize(fp32, "fold", check=False).graph}
    searched, search, seconds = _search(fp32, f"macs@{args.budget}", calib, args.calib, args.plot)
    graphs["searched"] = searched.graph
    uniform_best = max((c for c in search["candidates"] if c["family"] == "uniform" and c["feasible"]),
                       key=lambda c: c["cosine"])
    graphs["uniform"] = graphopt.optimize(fp32, f"prune:ratio={uniform_best['strength']}", check=False).graph
    chosen = search["candidates"][search["chosen"]]
    what = {"fp32": "-", "searched": f"{chosen['family']} {chosen['ratios']}",
            "uniform": f"ratio {uniform_best['strength']:g}"}
    searches = {"searched": (search, seconds)}
    if args.latency_budget:
        lat, lat_search, lat_seconds = _search(fp32, f"latency@{args.latency_budget}", calib, args.calib, None)
        graphs["latency-searched"] = lat.graph
        best = lat_search["candidates"][lat_search["chosen"]]
        what["latency-searched"] = f"{best['family']} {best['ratios']}"
        searches["latency-searched"] = (lat_search, lat_seconds)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    sessions = {k: ort.InferenceSession(g.to_model().SerializeToString(), opts, providers=["CPUExecutionProvider"])
                for k, g in graphs.items()}
    x = evals["input"]
    outs = {k: s.run(None, {"input": x})[0] for k, s in sessions.items()}
    one = {"input": x[:1]}
    times = interleaved_cpu_ms({k: (lambda s=s: s.run(None, one)) for k, s in sessions.items()}, args.rounds,
                               args.inner)
    lat = latency_summary(times, {"vs_fp32": "fp32"})
    base = model_costs(graphs["fp32"])
    rows, data = [], {"machine": machine(), "versions": versions(("matplotlib",)), "budget": args.budget,
                      "latency_budget": args.latency_budget, "variants": {}}
    for k, g in graphs.items():
        costs = model_costs(g)
        cosine, sqnr = _metrics(outs["fp32"], outs[k])
        entry = {"ratios": what[k], "macs_ratio": costs.macs / base.macs, "params": costs.params, "cosine": cosine,
                 "sqnr_db": sqnr, **lat[k]}
        if k in searches:
            entry.update(candidates=len(searches[k][0]["candidates"]), trials=searches[k][0]["trials"],
                         search_s=searches[k][1])
        data["variants"][k] = entry
        rows.append(f"| {k} | {what[k]} | {entry['macs_ratio']:.3f} | {costs.params:,} | {cosine:.5f} | "
                    f"{sqnr:.2f} | {lat[k]['median_ms']:.2f} ({lat[k]['iqr_ms']:.2f}) | {lat[k]['vs_fp32']:.3f} | "
                    + (f"{entry['candidates']} / {entry['search_s']:.0f} s |" if k in searches else "- |"))
    table = "\n".join([
        f"ResNet-18-like 1x3x224x224, MACs budget {args.budget} (searched on {args.calib} images, evaluated on "
        f"{args.samples} others); {machine()}", "",
        "| variant | ratios | MACs / fp32 | params | cosine | SQNR dB | ms/run, 1 thread (IQR) | latency / fp32 | "
        "candidates / search time |", "|---|---|---|---|---|---|---|---|---|", *rows, "",
        f"Pareto plot: {os.path.abspath(args.plot)}" if args.plot else ""])
    write_outputs(table, data, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the measured-latency guard costs: ``fold,int8`` (the guard on, ``guard=auto``: int8's default) against
``fold,int8:guard=off`` on the same model, data and backend, each run first with an empty cache (the guard's trial
cache lives under the study folder in the temp dir, and ``$GRAPHOPT_CACHE_DIR``, OpenVINO's model cache, is pointed
there too: every run here gets a fresh temp dir).

    python benchmarks/bench_guard.py [--models resnet18_like,mobilenet_v2_like,bert_like] [--repeat 2]
                                     [--calib 8] [--backend onnxruntime|openvino] [--json out.json]
                                     [--markdown out.md]

Per model (graphopt.zoo, exported and folded by ``_common.zoo_model``; CNNs at 1x3x224x224, BERT-like 1x128 token
ids) and per repeat, the two pipelines run one after the other through ``graphopt.optimize(..., check=False)``
on ``--backend`` (onnxruntime by default; any backend with ``profile_kernels``):
wall time of the pass manager (the sum of its per-pass seconds) and CPU time of the process
(``time.process_time``: every thread, the calibration's included). The bar of issue 12 for making the guard the
default is that the guard costs <= 2x the int8 pipeline's own time: guard pass seconds / ``fold,int8:guard=off``
seconds (wall), and (guarded CPU - plain CPU) / plain CPU. Also reported: guarded / plain (wall and CPU); medians
over the repeats, what the guard decided (its note) and how long the guard pass alone took. On a shared machine
the wall ratio is indicative; the CPU ratio is the better one under load. ``$GRAPHOPT_NO_TIMING`` is ignored here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from _common import machine, versions, write_outputs, zoo_model

BAR = 2.0
PIPELINES = ("fold,int8:guard=off", "fold,int8")  # the guard is int8's default (guard=auto) since it costs <= 2x


def run_once(fp32: str, plan: str, calib: dict, backend: str) -> dict:
    """One pipeline run with an empty guard cache: pass-manager wall seconds, process CPU seconds, the guard's note."""
    import graphopt

    old, old_cache = tempfile.tempdir, os.environ.get("GRAPHOPT_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="bench-guard-") as tmp:
        tempfile.tempdir = tmp  # studies and their trial caches go here, and go away after
        os.environ["GRAPHOPT_CACHE_DIR"] = tmp  # so do compile caches (OpenVINO's model cache)
        try:
            cpu, wall = time.process_time(), time.perf_counter()
            result = graphopt.optimize(fp32, plan, calibration=calib, backend=backend, check=False)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        finally:
            tempfile.tempdir = old
            if old_cache is None:
                os.environ.pop("GRAPHOPT_CACHE_DIR", None)
            else:
                os.environ["GRAPHOPT_CACHE_DIR"] = old_cache
    records = result.report.records
    guard = [r for r in records if r.name == "latency-guard"]
    return {"pm_s": sum(r.seconds for r in records), "cpu_s": cpu, "wall_s": wall,
            "guard_s": guard[0].seconds if guard else 0.0, "note": " ".join(guard[0].notes) if guard else ""}


def main(argv=None) -> int:
    os.environ.pop("GRAPHOPT_NO_TIMING", None)  # this measures the guard: it must run
    os.environ.pop("GRAPHOPT_STUDY_DIR", None)  # each run's studies go to its own temp dir (an empty cache)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18_like,mobilenet_v2_like,bert_like")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--calib", type=int, default=8, help="calibration samples")
    parser.add_argument("--backend", default="onnxruntime", help="the backend the pipelines target")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    rows = {}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-guard-models-") as work:
        for name in args.models.split(","):
            fp32, calib, _, _ = zoo_model(name, work, calib_samples=args.calib, eval_samples=1)
            runs: dict[str, list[dict]] = {p: [] for p in PIPELINES}
            for r in range(args.repeat):
                for plan in (PIPELINES if r % 2 == 0 else PIPELINES[::-1]):
                    runs[plan].append(run_once(fp32, plan, calib, args.backend))
                    print(f"{name} {plan}: {runs[plan][-1]}", file=sys.stderr, flush=True)
            plain, guarded = runs[PIPELINES[0]], runs[PIPELINES[1]]
            rows[name] = {
                "int8_pm_s": statistics.median(r["pm_s"] for r in plain),
                "guarded_pm_s": statistics.median(r["pm_s"] for r in guarded),
                "guard_s": statistics.median(r["guard_s"] for r in guarded),
                "wall_ratio": statistics.median(g["pm_s"] / p["pm_s"] for p, g in zip(plain, guarded)),
                "cpu_ratio": statistics.median(g["cpu_s"] / p["cpu_s"] for p, g in zip(plain, guarded)),
                "guard_ratio": statistics.median(g["guard_s"] / p["pm_s"] for p, g in zip(plain, guarded)),
                "guard_cpu_ratio": statistics.median((g["cpu_s"] - p["cpu_s"]) / p["cpu_s"]
                                                     for p, g in zip(plain, guarded)),
                "note": guarded[-1]["note"], "runs": runs}
    stack = versions(("openvino",) if args.backend == "openvino" else ())
    lines = [f"Latency-guard cost, {args.backend}; {machine()}; {stack}; load average "
             f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end", "",
             f"Guard cost against `fold,int8:guard=off`, empty cache each run, median of {args.repeat} "
             f"(bar for on-by-default: guard <= {BAR}x the int8 pipeline)", "",
             "| model | int8 (guard off) s | int8 (guard auto) s | guard pass s | guard / int8 (wall) | "
             "guard / int8 (CPU) | "
             "guarded / int8 (wall) | guarded / int8 (CPU) | bar | guard decided |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        ok = "met" if max(r["guard_ratio"], r["guard_cpu_ratio"]) <= BAR else (
            "CPU met" if r["guard_cpu_ratio"] <= BAR else "not met")
        lines.append(f"| {name} | {r['int8_pm_s']:.1f} | {r['guarded_pm_s']:.1f} | {r['guard_s']:.1f} | "
                     f"{r['guard_ratio']:.2f} | {r['guard_cpu_ratio']:.2f} | {r['wall_ratio']:.2f} | "
                     f"{r['cpu_ratio']:.2f} | {ok} | {r['note'].split('; kernels')[0].split('; whole')[0]} |")
    facts = {"rows": rows, "backend": args.backend, "machine": machine(), "versions": stack}
    write_outputs("\n".join(lines) + "\n", facts, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

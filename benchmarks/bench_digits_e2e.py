"""The digits end-to-end example over several seeds (#9's bar: final int8 accuracy >= fp32 - 0.5 points at <= 0.1x
the fp32 file size, mean of 3 seeds).

    python benchmarks/bench_digits_e2e.py [--seeds 0,1,2] [--out benchmarks/out/digits] [--markdown out.md]

Runs ``examples/digits_end_to_end.py --seed S`` for each seed (a process each, as a user runs it) and summarizes
its results.json: held-out accuracy of fp32 and of the int8 (QAT) model on each backend, the int8 file against
the fp32 file (for ONNX also both files as exported, before ``compact``, and the weights alone), latency against
fp32 (batch 1, one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _common import machine, versions, write_outputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "digits"))
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args()
    start, results = time.perf_counter(), []
    for seed in args.seeds.split(","):
        out = os.path.join(args.out, f"seed{seed}")
        t = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(ROOT, "examples", "digits_end_to_end.py"), "--seed", seed,
                        "--out", out], check=True)
        with open(os.path.join(out, "results.json")) as f:
            results.append({**json.load(f), "wall_s": time.perf_counter() - t})

    def row(result, stage, backend):
        return next(r for r in result["rows"] if r["stage"] == stage and r["backend"] == backend)

    lines = [f"{machine()}; {versions(('torchao',))}; {time.perf_counter() - start:.0f} s", "",
             "| seed | backend | fp32 % | int8 (QAT) % | drop | file int8/fp32 | as exported int8/fp32 "
             "| weights int8/fp32 | latency int8/fp32 | run s |", "|---|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for backend in ("x86", "onnxruntime"):
        drops, files, weights, exported = [], [], [], []
        for r in results:
            fp32, int8 = row(r, "fp32", backend), row(r, "int8 (QAT)", backend)
            drops.append(fp32["accuracy"] - int8["accuracy"])
            files.append(int8["size_kb"] / fp32["size_kb"])
            weights.append(int8["weights_kb"] / fp32["weights_kb"] if int8["weights_kb"] else None)
            exported.append(int8["full_kb"] / fp32["full_kb"] if int8.get("full_kb") else None)
            lines.append(f"| {r['seed']} | {backend} | {fp32['accuracy']:.2f} | {int8['accuracy']:.2f} | "
                         f"{drops[-1]:+.2f} | {files[-1]:.3f} | {_ratio(exported[-1])} | {_ratio(weights[-1])} | "
                         f"{int8['latency_ms'] / fp32['latency_ms']:.2f} | {r['wall_s']:.0f} |")
        summary[backend] = {"drop": statistics.mean(drops), "file_ratio": statistics.mean(files),
                            "weights_ratio": statistics.mean(w for w in weights if w is not None)
                            if any(w is not None for w in weights) else None,
                            "exported_ratio": statistics.mean(e for e in exported if e is not None)
                            if any(e is not None for e in exported) else None}
    lines.append("")
    for backend, s in summary.items():
        verdict = "met" if s["file_ratio"] <= 0.1 else "not met"
        size = f"file {s['file_ratio']:.3f}x (bar <= 0.1x the fp32 file: {verdict})"
        size += f"; as exported, before compact, {s['exported_ratio']:.3f}x" if s["exported_ratio"] else ""
        size += f"; weights alone {s['weights_ratio']:.3f}x" if s["weights_ratio"] else ""
        lines.append(f"- {backend}: mean drop {s['drop']:+.2f} points (bar <= 0.5: "
                     f"{'met' if s['drop'] <= 0.5 else 'not met'}); {size}")
    write_outputs("\n".join(lines), {"results": results, "summary": summary}, args.markdown, args.json)
    return 0


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())

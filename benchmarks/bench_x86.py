"""x86 int8 (PT2E Q/DQ lowered by AOTInductor with freezing to oneDNN) against its alternatives, in one run.

    python benchmarks/bench_x86.py [--models resnet18_like,mobilenet_v2_like] [--rounds 10] [--iters 5]
                                   [--size 224] [--calib-samples 16] [--eval-samples 8] [--json out.json]
                                   [--markdown out.md] [--fail-on-bar]

Per zoo model (random weights, BatchNorm statistics randomized), from the same nn.Module, in one process:

* ``x86-int8``: :func:`quantized_for_x86` (the Q/DQ graph the x86 backend lowers) -> ``X86Backend().session``:
  the AOTInductor package with freezing (oneDNN int8 kernels) graphopt writes;
* ``fp32-inductor``: ``graphopt.optimize(model, "fold")`` -> ``X86Backend().session``: the float model compiled the
  same way (AOTInductor, freezing: oneDNN's float kernels);
* ``ort-int8``: the model exported to ONNX (BatchNorm kept) -> ``graphopt.optimize(path, "fold,int8")`` with the
  same calibration data -> onnxruntime (graphopt's onnxruntime backend);
* ``fx-x86``: the *same* Q/DQ graph as ``x86-int8`` on torch's deprecated eager quantized kernels
  (``X86Backend(engine="fx-x86")``, engine ``x86``), as ``convert_fx`` lowers its reference model.

:func:`quantized_for_x86` is the one place that makes the Q/DQ graph: graphopt's own FX quantizer (``fold,int8``
with backend x86: uint8 activations on conv/linear inputs, int8 per-channel weights, in [-64, 64] on CPUs without
VNNI, residual Adds fused into the conv); swap it to benchmark another quantizer's graph.

Latency: batch 1, one fixed-seed input, **1 intra-op thread** (torch.set_num_threads(1); onnxruntime
intra_op_num_threads=1), **CPU time per run** (``time.process_time``: the process's CPU seconds, which a
neighbour's load on a shared machine does not inflate the way it inflates wall time). ``--rounds`` (10) rounds;
each visits every variant in a shuffled order and then in reverse (ABBA), each visit 2 untimed and ``--iters`` (5)
timed runs. Reported: each variant's median over all runs and, for every ratio, the **median over rounds of the
within-round ratio** with its interquartile range. Output SQNR against the fp32 module (eager) on
``--eval-samples`` other inputs.

The bars (issue #9): x86 int8 latency <= 0.7x fp32-inductor and <= 1.0x ort-int8 and <= 1.05x fx-x86, output SQNR
>= 30 dB, on ResNet-18-like and MobileNetV2-like. Compiles go through graphopt's compile cache
(``GRAPHOPT_CACHE_DIR``): a second run of the script skips them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
from _common import machine, versions, write_outputs

MODELS = ("resnet18_like", "mobilenet_v2_like")
VARIANTS = ("x86-int8", "fp32-inductor", "ort-int8", "fx-x86")
BARS = {"fp32-inductor": 0.7, "ort-int8": 1.0, "fx-x86": 1.05}
MIN_SQNR_DB = 30.0


def quantized_for_x86(model, example, calibration):
    """The PT2E Q/DQ graph (an FxGraph) of ``model`` for the x86 backend: graphopt's own ``fold,int8`` with backend
    x86 (MinMax calibration on ``calibration``, a list of batches). The one place to change to benchmark another
    quantizer's graph (``tests/x86_qdq.py`` shows the form the backend takes)."""
    import torch

    import graphopt
    from graphopt.backends.x86 import X86Backend

    result = graphopt.optimize(model, "fold,int8", backend=X86Backend(), example_inputs=(example,),
                               calibration=(torch.cat(calibration),), check=False)
    return result.graph


def build(name: str, size: int, calib: np.ndarray, workdir: str) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """``(sessions, facts, model)``: one session per variant (1 intra-op thread) and how each was built."""
    import torch

    import graphopt
    from graphopt import zoo
    from graphopt.backends.onnxruntime import OnnxRuntimeBackend
    from graphopt.backends.x86 import X86Backend

    model = getattr(zoo, name)().eval()
    example = torch.from_numpy(calib[:1])
    sessions, facts = {}, {}
    start = time.perf_counter()
    qdq = quantized_for_x86(model, example, [torch.from_numpy(c[None]) for c in calib])
    facts["quantize_s"] = time.perf_counter() - start
    sessions["x86-int8"] = X86Backend().session(qdq, 1)
    facts["x86-int8"] = sessions["x86-int8"].facts.to_dict()
    folded = graphopt.optimize(model, "fold", example_inputs=(example,), check=False).graph
    sessions["fp32-inductor"] = X86Backend().session(folded, 1)
    facts["fp32-inductor"] = sessions["fp32-inductor"].facts.to_dict()
    sessions["fx-x86"] = X86Backend(engine="fx-x86").session(qdq, 1)
    facts["fx-x86"] = {"notes": sessions["fx-x86"].notes}
    path = os.path.join(workdir, f"{name}.onnx")
    zoo.export_onnx(model, path, (1, 3, size, size), keep_bn=True)
    onnx_int8 = os.path.join(workdir, f"{name}.int8.onnx")
    graphopt.optimize(path, "fold,int8", calibration={"input": calib}, check=False).save(onnx_int8)
    sessions["ort-int8"] = OnnxRuntimeBackend().session(onnx_int8, 1)
    return sessions, facts, model


def backend_of(variant: str):
    from graphopt.backends.onnxruntime import OnnxRuntimeBackend
    from graphopt.backends.x86 import X86Backend

    return OnnxRuntimeBackend() if variant == "ort-int8" else X86Backend()


def feeds_for(variant: str, session, x: np.ndarray) -> dict[str, np.ndarray]:
    return {backend_of(variant).input_specs(session)[0].name: x}


def time_rounds(sessions: dict[str, Any], x: np.ndarray, rounds: int, iters: int, seed: int = 0
                ) -> dict[str, list[list[float]]]:
    """Per variant, the CPU seconds of each timed run, per round (ABBA order within a round)."""
    names = list(sessions)
    rng = np.random.default_rng(seed)
    backends = {v: backend_of(v) for v in names}
    feeds = {v: feeds_for(v, sessions[v], x) for v in names}
    times: dict[str, list[list[float]]] = {v: [] for v in names}
    for r in range(rounds):
        order = [names[i] for i in rng.permutation(len(names))]
        runs: dict[str, list[float]] = {v: [] for v in names}
        for v in order + order[::-1]:
            for _ in range(2):
                backends[v].run(sessions[v], feeds[v])
            for _ in range(iters):
                start = time.process_time()
                backends[v].run(sessions[v], feeds[v])
                runs[v].append(time.process_time() - start)
        for v in names:
            times[v].append(runs[v])
        print(f"    round {r + 1}/{rounds}: " + ", ".join(f"{v} {statistics.median(runs[v]) * 1000:.2f} ms"
                                                         for v in names), file=sys.stderr, flush=True)
    return times


def ratio(a: list[list[float]], b: list[list[float]]) -> dict[str, float]:
    per_round = sorted(statistics.median(x) / statistics.median(y) for x, y in zip(a, b))
    q25, q75 = np.percentile(per_round, [25, 75])
    return {"median": statistics.median(per_round), "q25": float(q25), "q75": float(q75)}


def sqnrs(sessions: dict[str, Any], model, samples: np.ndarray) -> dict[str, float]:
    import torch

    from graphopt.numeric import sqnr_db

    with torch.no_grad():
        reference = np.concatenate([model(torch.from_numpy(s[None])).numpy() for s in samples])
    out = {}
    for v, session in sessions.items():
        backend = backend_of(v)
        got = np.concatenate([backend.run(session, feeds_for(v, session, s[None]))[0] for s in samples])
        out[v] = sqnr_db(reference, got)
    return out


def bench_model(name: str, args, workdir: str) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((args.calib_samples, 3, args.size, args.size)).astype(np.float32)
    evals = rng.standard_normal((args.eval_samples, 3, args.size, args.size)).astype(np.float32)
    print(f"{name}: building (compiles are cached in GRAPHOPT_CACHE_DIR)", file=sys.stderr, flush=True)
    sessions, facts, model = build(name, args.size, calib, workdir)
    times = time_rounds(sessions, evals[:1], args.rounds, args.iters)
    latency = {v: statistics.median(t for rnd in times[v] for t in rnd) * 1000 for v in sessions}
    ratios = {other: ratio(times["x86-int8"], times[other]) for other in BARS}
    quality = sqnrs(sessions, model, evals)
    verdicts = {f"x86-int8 / {other} <= {bar}": ratios[other]["median"] <= bar for other, bar in BARS.items()}
    verdicts[f"x86-int8 SQNR >= {MIN_SQNR_DB:g} dB"] = quality["x86-int8"] >= MIN_SQNR_DB
    return {"model": name, "latency_ms": latency, "ratios": ratios, "sqnr_db": quality, "verdicts": verdicts,
            "facts": facts, "times_s": times}


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"x86 int8 on {meta['machine']}; {meta['versions']}; CPU {meta['cpu']}; batch 1, "
             f"1x3x{meta['size']}x{meta['size']}, 1 intra-op thread, CPU time per run, {meta['rounds']} ABBA rounds "
             f"x 2 x {meta['iters']} runs", "",
             "| model | variant | CPU ms / run | x86-int8 / variant (median, IQR) | SQNR vs fp32 (dB) |",
             "|---|---|---|---|---|"]
    for r in results:
        for v in VARIANTS:
            rt = r["ratios"].get(v)
            shown = f"{rt['median']:.2f} ({rt['q25']:.2f}-{rt['q75']:.2f}) bar {BARS[v]}" if rt else ""
            lines.append(f"| {r['model']} | {v} | {r['latency_ms'][v]:.2f} | {shown} | {r['sqnr_db'][v]:.1f} |")
    lines.append("")
    for r in results:
        f = r["facts"]["x86-int8"]
        lines.append(f"{r['model']}: x86-int8 package {f['size_bytes']:,} bytes, compiled in {f['compile_s']:.1f} s "
                     f"(cache {f['cache']}), kernels {f['kernels']}, dynamic {f['dynamic']}; fp32 package compiled "
                     f"in {r['facts']['fp32-inductor']['compile_s']:.1f} s; fx-x86 notes: "
                     f"{'; '.join(r['facts']['fx-x86']['notes']) or 'none'}")
        lines.append("  " + ", ".join(f"{k}: {'PASS' if ok else 'FAIL'}" for k, ok in r["verdicts"].items()))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--fail-on-bar", action="store_true")
    args = ap.parse_args(argv)
    import torch

    from graphopt.backends.cpu import int8_features
    from graphopt.quiet import quiet_torch_logs

    torch.set_num_threads(1)
    meta = {"machine": machine(), "versions": versions(("torchao",)), "cpu": int8_features(), "size": args.size,
            "rounds": args.rounds, "iters": args.iters}
    with tempfile.TemporaryDirectory() as workdir, quiet_torch_logs():
        results = [bench_model(name, args, workdir) for name in args.models.split(",")]
    write_outputs(markdown(results, meta), {"meta": meta, "results": results}, args.markdown, args.json)
    return 1 if args.fail_on_bar and not all(ok for r in results for ok in r["verdicts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())

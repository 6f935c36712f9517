"""graphopt's int8 for OpenVINO against NNCF's own, side by side in one run on OpenVINO (issue #11's bars).

    python benchmarks/bench_openvino.py [--models resnet18_like,resnet50_like,mobilenet_v2_like,digits]
        [--rounds 10] [--iters 5] [--calib-samples 32] [--eval-samples 16] [--markdown out.md] [--json out.json]

Needs ``pip install -e '.[torch,openvino]' nncf``. Each zoo model is exported (random weights, BatchNorm statistics
randomized, 1x3x224x224, dynamic batch; the digits CNN trained 6 epochs, 1x1x16x16) and folded
(``graphopt.optimize(path, "fold")``, exact); that fp32 file is the reference and the input of both quantizers,
with the same calibration data (``--calib-samples`` fixed-seed normal images; the digits: 256 training images):

* ``graphopt``: ``graphopt.optimize(fp32, "int8", backend="openvino", calibration=...)``, its Q/DQ ONNX;
* ``nncf``: ``nncf.quantize(core.read_model(fp32), nncf.Dataset(samples))`` with every default (NNCF's
  OpenVINO backend: its own placement, its own calibration);
* ``fp32``: the folded model; and for the pruning bar, ``pruned-int8`` = ``fold,prune:ratio=0.5,int8`` (backend
  openvino) and the fp32 model on onnxruntime.

All compiled by one ``openvino.Core`` for the CPU with ``INFERENCE_NUM_THREADS=1``, ``NUM_STREAMS=1``,
``PERFORMANCE_HINT=LATENCY``, ``INFERENCE_PRECISION_HINT=f32`` (so fp32 is fp32, not bf16 where a CPU has AMX);
onnxruntime with one intra-op thread. Latency: batch 1, ``--rounds`` interleaved rounds, each visiting every variant
in a shuffled order then the reverse (ABBA), a visit = 2 untimed runs + ``--iters`` timed ones, each timed by the
process's CPU time (``time.process_time``: one thread, so it is the work done, not the machine's noise); a ratio is
the median over rounds of the ratio within a round, with its interquartile range. ``graphopt`` is timed in two
sessions: their ratio is the A/A control, the noise a ratio near 1 must be read against.

Accuracy: output SQNR against fp32 (on OpenVINO, f32) on ``--eval-samples`` other inputs; the digits: accuracy on
its 397 held-out images. What OpenVINO ran in int8: the runtime model's layers by ``runtimePrecision``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import numpy as np
from _common import machine, versions, write_outputs, zoo_model

MODELS = ("resnet18_like", "resnet50_like", "mobilenet_v2_like", "digits")
CONFIG = {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
          "INFERENCE_PRECISION_HINT": "f32"}
LATENCY_BAR = {"resnet18_like": 1.0, "resnet50_like": 0.9, "mobilenet_v2_like": 0.9}
PRUNE_BAR = 0.10


def build(name: str, workdir: str) -> dict[str, Any]:
    import nncf
    import openvino as ov

    import graphopt

    core = ov.Core()
    fp32, calib, evals, labels = zoo_model(name, workdir, ARGS.calib_samples, ARGS.eval_samples)
    calib, evals = calib["input"], evals["input"]
    models: dict[str, Any] = {"fp32": core.read_model(fp32)}
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    out = os.path.join(workdir, f"{name}.graphopt.onnx")
    graphopt.optimize(fp32, "int8", backend="openvino", calibration={"input": calib}, check=False, output=out)
    seconds["graphopt"] = time.perf_counter() - start
    models["graphopt"] = core.read_model(out)
    start = time.perf_counter()
    dataset = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))])
    models["nncf"] = nncf.quantize(core.read_model(fp32), dataset)
    seconds["nncf"] = time.perf_counter() - start
    if name == "resnet18_like":
        pruned = os.path.join(workdir, f"{name}.pruned-int8.onnx")
        graphopt.optimize(fp32, "prune:ratio=0.5,int8", backend="openvino", calibration={"input": calib},
                          check=False, output=pruned)
        models["pruned-int8"] = core.read_model(pruned)
    compiled = {k: core.compile_model(m, "CPU", CONFIG) for k, m in models.items()}
    compiled["graphopt#2"] = core.compile_model(models["graphopt"], "CPU", CONFIG)  # the A/A control
    sessions: dict[str, Any] = {k: c.create_infer_request() for k, c in compiled.items()}
    ort = None
    if name == "resnet18_like":
        from graphopt.backends.onnxruntime import OnnxRuntimeBackend

        ort = OnnxRuntimeBackend().session(fp32, threads=1)
    return {"fp32": fp32, "evals": evals, "labels": labels, "compiled": compiled, "sessions": sessions,
            "ort": ort, "seconds": seconds}


def run_ov(compiled, x: np.ndarray) -> np.ndarray:
    request = compiled.create_infer_request()
    return np.concatenate([np.asarray(request.infer({0: x[i:i + 1]})[0]).copy() for i in range(len(x))])


def int8_layers(compiled) -> Counter:
    """The runtime model's compute layers by the precision OpenVINO ran them in (int8: ``u8``/``i8``), as
    graphopt's per-layer report classes them (:mod:`graphopt.backends.openvino_layers`)."""
    from graphopt.backends.openvino_layers import DATA_LAYERS, INT8, _text

    counts = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = _text(info["layerType"])
        if kind not in DATA_LAYERS:
            counts["int8" if _text(info["runtimePrecision"]) in INT8 else "float"] += 1
    return counts


def time_variants(built: dict[str, Any], x: np.ndarray) -> dict[str, list[float]]:
    """Per variant, the CPU-time ms of every timed run, and per round the ratios the bars read."""
    runners = {k: (lambda r=r: r.infer({0: x})) for k, r in built["sessions"].items()}
    if built["ort"] is not None:
        ort = built["ort"]
        runners["ort-fp32"] = lambda: ort.run(None, {ort.get_inputs()[0].name: x})
    rng = random.Random(0)
    per_round: list[dict[str, float]] = []
    for _ in range(ARGS.rounds):
        order = list(runners)
        rng.shuffle(order)
        times: dict[str, list[float]] = {k: [] for k in runners}
        for name in order + order[::-1]:
            run = runners[name]
            run(), run()
            for _ in range(ARGS.iters):
                start = time.process_time()
                run()
                times[name].append((time.process_time() - start) * 1000)
        per_round.append({k: statistics.median(v) for k, v in times.items()})
    return {k: [r[k] for r in per_round] for k in runners}


def ratio(rounds: dict[str, list[float]], a: str, b: str) -> tuple[float, float, float]:
    values = [x / y for x, y in zip(rounds[a], rounds[b])]
    q = np.percentile(values, [25, 50, 75])
    return float(q[1]), float(q[0]), float(q[2])


def measure(name: str, workdir: str) -> dict[str, Any]:
    from graphopt.numeric import sqnr_db

    built = build(name, workdir)
    evals, labels = built["evals"], built["labels"]
    ref = run_ov(built["compiled"]["fp32"], evals)
    row: dict[str, Any] = {"model": name, "seconds": built["seconds"]}
    for variant in ("graphopt", "nncf", "pruned-int8"):
        if variant not in built["compiled"]:
            continue
        got = run_ov(built["compiled"][variant], evals)
        entry = {"sqnr_db": sqnr_db(ref, got), "layers": dict(int8_layers(built["compiled"][variant]))}
        if labels is not None:
            entry["accuracy"] = float((got.argmax(1) == labels).mean())
            entry["fp32_accuracy"] = float((ref.argmax(1) == labels).mean())
        row[variant] = entry
    x = evals[:1]
    rounds = time_variants(built, x)
    row["ms"] = {k: statistics.median(v) for k, v in rounds.items()}
    row["ratios"] = {"graphopt / nncf": ratio(rounds, "graphopt", "nncf"),
                     "graphopt / graphopt#2 (A/A)": ratio(rounds, "graphopt", "graphopt#2"),
                     "graphopt / fp32": ratio(rounds, "graphopt", "fp32"),
                     "nncf / fp32": ratio(rounds, "nncf", "fp32")}
    if "ort-fp32" in rounds:
        row["ratios"]["pruned-int8 (openvino) / ort-fp32"] = ratio(rounds, "pruned-int8", "ort-fp32")
        row["ratios"]["fp32 (openvino) / ort-fp32"] = ratio(rounds, "fp32", "ort-fp32")
    return row


def report(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | variant | ms (CPU, median) | SQNR dB | accuracy % | int8 / float compute layers |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        for variant, ms in row["ms"].items():
            e = row.get(variant, {})
            sqnr = f"{e['sqnr_db']:.1f}" if "sqnr_db" in e else ""
            acc = f"{100 * e['accuracy']:.2f} (fp32 {100 * e['fp32_accuracy']:.2f})" if "accuracy" in e else ""
            layers = ", ".join(f"{k} x{v}" for k, v in sorted(e.get("layers", {}).items()))
            lines.append(f"| {row['model']} | {variant} | {ms:.2f} | {sqnr} | {acc} | {layers} |")
    lines += ["", "| model | ratio | median | IQR |", "|---|---|---|---|"]
    for row in rows:
        for label, (mid, lo, hi) in row["ratios"].items():
            lines.append(f"| {row['model']} | {label} | {mid:.3f} | {lo:.3f}-{hi:.3f} |")
    lines.append("")
    for row in rows:
        g, n = row.get("graphopt", {}), row.get("nncf", {})
        bar = LATENCY_BAR.get(row["model"])
        mid = row["ratios"]["graphopt / nncf"][0]
        if bar is not None:
            lines.append(f"- {row['model']}: graphopt / NNCF latency {mid:.3f} (bar <= {bar}: "
                         f"{'met' if mid <= bar else 'NOT met'}); SQNR {g['sqnr_db']:.1f} vs {n['sqnr_db']:.1f} dB "
                         f"(bar >= NNCF - 0.5: {'met' if g['sqnr_db'] >= n['sqnr_db'] - 0.5 else 'NOT met'})")
        if "accuracy" in g:
            drop, nncf_drop = (100 * (e["fp32_accuracy"] - e["accuracy"]) for e in (g, n))
            lines.append(f"- {row['model']}: graphopt int8 accuracy drop {drop:+.2f} points (bar <= 0.3: "
                         f"{'met' if drop <= 0.3 else 'NOT met'}); NNCF {nncf_drop:+.2f}")
        key = "pruned-int8 (openvino) / ort-fp32"
        if key in row["ratios"]:
            mid = row["ratios"][key][0]
            lines.append(f"- {row['model']}: fold,prune:ratio=0.5,int8 on OpenVINO / onnxruntime fp32 {mid:.3f} "
                         f"(bar <= {PRUNE_BAR}: {'met' if mid <= PRUNE_BAR else 'NOT met'})")
    return "\n".join(lines) + "\n"


def main() -> int:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    parser.add_argument("--workdir")
    ARGS = parser.parse_args()
    import openvino as ov

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = ARGS.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        for name in ARGS.models.split(","):
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows.append(measure(name, workdir))
    flags = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    text = (f"{machine()}; {versions(('openvino', 'nncf'))}; CPU capabilities {', '.join(map(str, flags))}; "
            f"{ARGS.rounds} rounds x {ARGS.iters} runs, 1 thread, CPU time\n\n" + report(rows))
    write_outputs(text, {"rows": rows, "args": vars(ARGS)}, ARGS.markdown, ARGS.json)
    return 0


ARGS: argparse.Namespace

if __name__ == "__main__":
    sys.exit(main())

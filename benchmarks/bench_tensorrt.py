"""graphopt's TensorRT form against NVIDIA ModelOpt's ONNX PTQ, side by side in one run (issue #10's bars).

    python benchmarks/bench_tensorrt.py --modelopt-python /path/to/modelopt-venv/bin/python
        [--models resnet18_like,resnet50_like,mobilenet_v2_like,bert_like,digits] [--method minmax|entropy]
        [--calib-samples 32] [--eval-samples 16] [--markdown out.md] [--json out.json] [--workdir DIR]

ModelOpt pins onnx 1.21, so it lives in a venv of its own (``python -m venv V && V/bin/pip install torch==2.13.0
'nvidia-modelopt[onnx]'``); this script calls it through ``_modelopt_quantize.py`` in that venv. Nothing here needs
TensorRT or a GPU: both tools write Q/DQ ONNX graphs with standard semantics, run here on onnxruntime's CPU provider.

Each model is exported from graphopt's zoo (random weights, BatchNorm statistics randomized; 1x3x224x224 for the
CNNs, 1x128 token ids for the BERT-like encoder; the digits CNN trained 6 epochs on scikit-learn's digits, 1x1x16x16)
and folded (``graphopt.optimize(path, "fold")``, exact): that fp32 file is the reference and the input of both
quantizers, with the same calibration data (``--calib-samples`` fixed-seed normal images / random token ids; the
digits training images) and the same calibration method (graphopt ``minmax`` = ModelOpt ``max``; ``entropy`` =
``entropy``). ModelOpt leaves what it does not quantize in fp32 (``high_precision_dtype="fp32"``).

Measured per model on ``--eval-samples`` other inputs (the digits: its 397 held-out images): output SQNR against
fp32 (dB) and cosine, accuracy for the digits; the checker's findings (``graphopt verify --backend tensorrt``) on
both tools' graphs, by rule; Q/DQ pair and quantized-op counts; graphopt's fp16 mode (cosine) and fp8 mode (SQNR).

Bars: graphopt's findings = 0; SQNR >= ModelOpt's - 0.5 dB; digits within 0.3 points of fp32; fp16 cosine >= 0.999;
fp8 SQNR >= 25 dB; ModelOpt's findings 0 or each justified in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import numpy as np
from _common import machine, versions, write_outputs, zoo_model

MODELS = ("resnet18_like", "resnet50_like", "mobilenet_v2_like", "bert_like", "digits")
MODELOPT_METHOD = {"minmax": "max", "entropy": "entropy"}
HERE = os.path.dirname(os.path.abspath(__file__))


def graphopt_variant(fp32: str, out: str, passes: str, calib: dict[str, np.ndarray]) -> float:
    import graphopt

    start = time.perf_counter()
    graphopt.optimize(fp32, passes, backend="tensorrt", calibration=calib, check=False, output=out)
    return time.perf_counter() - start


def modelopt_variant(fp32: str, out: str, calib: dict[str, np.ndarray], workdir: str) -> dict[str, Any]:
    npz = os.path.join(workdir, "calib.npz")
    np.savez(npz, **calib)
    cmd = [ARGS.modelopt_python, os.path.join(HERE, "_modelopt_quantize.py"), fp32, npz, out,
           "--method", MODELOPT_METHOD[ARGS.method]]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ModelOpt failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def outputs(path: str, data: dict[str, np.ndarray]) -> np.ndarray:
    from graphopt.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend().run_batched(path, data, batch_size=1, threads=2)[0]


def findings(path: str) -> Counter:
    """The checker's findings by rule (``graphopt verify --backend tensorrt``)."""
    from graphopt.backends.lint import lint
    from graphopt.backends.tensorrt import TensorRTBackend
    from graphopt.ir import OnnxGraph

    return Counter(f.rule for f in lint(OnnxGraph.load(path), TensorRTBackend().lint_rules()))


def op_counts(path: str) -> dict[str, int]:
    """Q and DQ nodes, the weighted ops that read int8 (their data input dequantized, directly or through data
    movement: a DQ before a Reshape/Transpose/MaxPool still feeds them) out of all of them, and the file's size."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    counts = Counter(n.op_type for n in graph.node)
    produced = {o: n for n in graph.node for o in n.output}
    moves = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Pad", "Slice", "Concat"}

    def dequantized(name: str) -> bool:
        node = produced.get(name)
        while node is not None and node.op_type in moves:
            node = produced.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"

    weighted = [n for n in graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    return {"Q": counts["QuantizeLinear"], "DQ": counts["DequantizeLinear"],
            "int8 ops": sum(dequantized(n.input[0]) for n in weighted), "of": len(weighted),
            "bytes": os.path.getsize(path)}


def measure(name: str, workdir: str) -> dict[str, Any]:
    from graphopt.numeric import cosine_similarity, sqnr_db

    fp32, calib, evals, labels = zoo_model(name, workdir, ARGS.calib_samples, ARGS.eval_samples)
    ref = outputs(fp32, evals)
    row: dict[str, Any] = {"model": name}
    variants = {
        "graphopt": lambda out: graphopt_variant(fp32, out, f"insert-observers,calibrate:method={ARGS.method},"
                                                            "place-qdq", calib),
        "modelopt": lambda out: modelopt_variant(fp32, out, calib, workdir)["seconds"],
        "graphopt-fp16": lambda out: graphopt_variant(fp32, out, FP16_PASSES, calib),
        "graphopt-fp8": lambda out: graphopt_variant(fp32, out, FP8_PASSES, calib),
    }
    for variant, build in variants.items():
        out = os.path.join(workdir, f"{name}.{variant}.onnx")
        try:
            seconds = build(out)
        except Exception as exc:  # a tool that fails on a model is a result, not a crash of the benchmark
            row[variant] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            continue
        got = outputs(out, evals)
        entry = {"seconds": seconds, "sqnr_db": sqnr_db(ref, got), "cosine": cosine_similarity(ref, got),
                 "findings": dict(findings(out)), **op_counts(out)}
        if labels is not None:
            entry["accuracy"] = float((got.argmax(1) == labels).mean())
            entry["fp32_accuracy"] = float((ref.argmax(1) == labels).mean())
        row[variant] = entry
    return row


FP16_PASSES = "to-fp16"
FP8_PASSES = "fp8"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | tool | SQNR dB | cosine | accuracy % | Q/DQ | int8 ops | MB | checker findings | s |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for row in rows:
        for variant in ("graphopt", "modelopt", "graphopt-fp16", "graphopt-fp8"):
            e = row.get(variant, {})
            if "error" in e:
                lines.append(f"| {row['model']} | {variant} | error: {e['error']} | | | | | | | |")
                continue
            if not e:
                continue
            acc = f"{100 * e['accuracy']:.2f} (fp32 {100 * e['fp32_accuracy']:.2f})" if "accuracy" in e else ""
            found = ", ".join(f"{k} x{v}" for k, v in sorted(e["findings"].items())) or "0"
            lines.append(f"| {row['model']} | {variant} | {e['sqnr_db']:.1f} | {e['cosine']:.5f} | {acc} | "
                         f"{e['Q']}/{e['DQ']} | {e['int8 ops']}/{e['of']} | {e['bytes'] / 1e6:.1f} | {found} | "
                         f"{e['seconds']:.1f} |")
    return head + "\n".join(lines) + "\n"


def bars(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for row in rows:
        g, m = row.get("graphopt", {}), row.get("modelopt", {})
        if "sqnr_db" in g and "sqnr_db" in m:
            gap = g["sqnr_db"] - m["sqnr_db"]
            out.append(f"- {row['model']}: graphopt - ModelOpt SQNR {gap:+.2f} dB (bar >= -0.5: "
                       f"{'met' if gap >= -0.5 else 'NOT met'}); graphopt findings {sum(g['findings'].values())} "
                       f"(bar 0: {'met' if not g['findings'] else 'NOT met'}); ModelOpt findings "
                       f"{sum(m['findings'].values())}")
        if "accuracy" in g:
            drop = 100 * (g["fp32_accuracy"] - g["accuracy"])
            out.append(f"- {row['model']}: graphopt int8 accuracy drop {drop:+.2f} points (bar <= 0.3: "
                       f"{'met' if drop <= 0.3 else 'NOT met'})")
        f16, f8 = row.get("graphopt-fp16", {}), row.get("graphopt-fp8", {})
        if "cosine" in f16:
            out.append(f"- {row['model']}: fp16 cosine {f16['cosine']:.5f} (bar >= 0.999: "
                       f"{'met' if f16['cosine'] >= 0.999 else 'NOT met'})")
        if "sqnr_db" in f8:
            out.append(f"- {row['model']}: fp8 SQNR {f8['sqnr_db']:.1f} dB (bar >= 25: "
                       f"{'met' if f8['sqnr_db'] >= 25 else 'NOT met'})")
    return out


def main() -> int:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modelopt-python", required=True, help="the python of a venv with nvidia-modelopt[onnx]")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--method", default="minmax", choices=sorted(MODELOPT_METHOD))
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    parser.add_argument("--workdir")
    ARGS = parser.parse_args()
    version = subprocess.run([ARGS.modelopt_python, "-c", "import modelopt, onnx; print(modelopt.__version__, "
                              "onnx.__version__)"], capture_output=True, text=True).stdout.split()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = ARGS.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        for name in ARGS.models.split(","):
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows.append(measure(name, workdir))
    text = (f"{machine()}; {versions()}; ModelOpt {' (onnx '.join(version)}{')' if version else ''}; calibration "
            f"{ARGS.method} on {ARGS.calib_samples} samples\n\n" + table(rows) + "\n" + "\n".join(bars(rows)) + "\n")
    write_outputs(text, {"rows": rows, "args": vars(ARGS)}, ARGS.markdown, ARGS.json)
    return 0


ARGS: argparse.Namespace

if __name__ == "__main__":
    sys.exit(main())

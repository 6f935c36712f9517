"""scikit-learn's digits end to end on the PyTorch route: train fp32 -> prune 50 % -> distill from the fp32 teacher
-> QAT -> int8 on x86 (an AOTInductor package) and on onnxruntime (a Q/DQ ONNX file), with a before/after table and
a bar chart.

    python examples/digits_end_to_end.py [--seed 0] [--out digits_out]

1. The teacher: the digits CNN (graphopt.zoo.DigitsCNN) trained 10 epochs with graphopt.train's loop.
2. ``prune:ratio=0.5`` removes half of every channel group; ``finetune=graphopt.train.distiller(teacher, ...)``
   trains the pruned student back from the teacher's soft targets (3 epochs).
3. ``int8-qat`` fake-quantizes the student in the target backend's scheme and trains it, again by distillation
   from the fp32 teacher (2 epochs), then converts it: once for x86 (``backend="x86"``: the written file is an
   AOTInductor package with oneDNN int8 kernels) and once for onnxruntime (``backend="onnxruntime"``: a Q/DQ
   ONNX file, then ``compact``: the written ONNX files get short internal names and lose attributes that restate
   their defaults, since in a 28k-parameter model the graph's own bytes weigh as much as the weights; the file as
   exported stays beside it as ``*.full.onnx``).
4. Each stage is written for both backends and measured there: held-out accuracy, file size (and an ONNX file's
   weights alone, and its size before ``compact``), median latency (batch 1, one thread).
   An x86 package holds about 0.4 MB of compiled code whatever the model. The table goes to stdout and
   ``results.json``, the chart to ``digits_end_to_end.png``.

Runs in about two minutes on two cores (most of it compiling the x86 packages). Needs ``graphopt[torch]``,
scikit-learn and matplotlib (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import numpy as np
import torch

import graphopt
from graphopt import train, zoo
from graphopt.backends import OnnxRuntimeBackend
from graphopt.backends.x86 import X86Backend
from graphopt.table import format_table

BACKENDS = {"x86": (X86Backend, ".pt2"), "onnxruntime": (OnnxRuntimeBackend, ".onnx")}


def measure(backend, path: str, x_test: np.ndarray, y_test: np.ndarray) -> dict:
    """Accuracy, size (the file; for ONNX also its weights alone) and batch-1 latency (median, one thread) of the
    file at ``path`` on ``backend``."""
    session = backend.session(path, threads=1)
    name = backend.input_specs(session)[0].name
    accuracy = backend.evaluate(session, {name: x_test}, y_test).accuracy
    latency = backend.bench(path, batch_sizes=(1,), threads=(1,), warmup=20, iters=200).rows[0].p50_ms
    weights = None
    if path.endswith(".onnx"):
        import onnx

        weights = sum(onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(path).graph.initializer) / 1024
    return {"accuracy": 100 * accuracy, "size_kb": os.path.getsize(path) / 1024, "weights_kb": weights,
            "latency_ms": latency}


def chart(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(r["stage"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, label) in zip(axes, (("accuracy", "held-out accuracy (%)"), ("size_kb", "file size (KB, log)"),
                                       ("latency_ms", "latency, batch 1, 1 thread (ms, log)"))):
        for i, backend in enumerate(BACKENDS):
            values = [next(r[key] for r in rows if r["stage"] == s and r["backend"] == backend) for s in stages]
            ax.bar(np.arange(len(stages)) + (i - 0.5) * 0.38, values, 0.38, label=backend)
        ax.set_xticks(np.arange(len(stages)), stages, fontsize=8)
        ax.set_title(label, fontsize=10)
        if key == "accuracy":
            ax.set_ylim(min(r["accuracy"] for r in rows) - 2, 100)
        else:  # an x86 package carries ~0.4 MB of compiled code; onnxruntime files are KBs
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("digits CNN: fp32 -> pruned 50 % + distilled -> int8 (QAT)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="digits_out", help="folder for the models, results.json and the chart")
    args = p.parse_args()
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    data = zoo.digits_data(args.seed)
    x_train, y_train, x_test, y_test = data
    example = (torch.from_numpy(x_test[:1]),)

    torch.manual_seed(args.seed)
    teacher = train.finetune(zoo.DigitsCNN(), (x_train, y_train), epochs=10, lr=1e-2, seed=args.seed)
    pruned = graphopt.optimize(copy.deepcopy(teacher), "prune:ratio=0.5", example_inputs=example, finetune=(
        train.distiller(teacher, (x_train, y_train), epochs=3, lr=3e-2, seed=args.seed))).model

    rows = []
    for backend_name, (make, suffix) in BACKENDS.items():
        backend = make()
        stages = [("fp32", teacher, "fold", {}), ("pruned + distilled", pruned, "fold", {}),
                  ("int8 (QAT)", pruned, "int8-qat", dict(calibration=x_train[:256], qat=train.distiller(
                      teacher, (x_train, y_train), epochs=2, lr=1e-3, seed=args.seed)))]
        for stage, model, passes, extra in stages:
            path = os.path.join(args.out, f"digits.{stage.split()[0]}.{backend_name}{suffix}")
            full = path[: -len(".onnx")] + ".full.onnx"  # as exported, before compact
            graphopt.optimize(model, passes, example_inputs=example, backend=backend_name,
                              output=full if suffix == ".onnx" else path, **extra)
            if suffix == ".onnx":  # short names, no spelled-out defaults: here the graph weighs as much as the weights
                graphopt.optimize(full, "compact", backend=backend_name, output=path)
            rows.append({"stage": stage, "backend": backend_name, "file": path,
                         **measure(backend, path, x_test, y_test),
                         "full_kb": os.path.getsize(full) / 1024 if suffix == ".onnx" else None})
            print(f"  {stage} on {backend_name}: {rows[-1]['accuracy']:.2f} %", flush=True)

    table = [("model", "backend", "accuracy %", "file KB", "vs fp32", "weights KB", "vs fp32", "latency ms",
              "vs fp32")]
    for r in rows:
        base = next(b for b in rows if b["backend"] == r["backend"] and b["stage"] == "fp32")
        weights = ("", "") if r["weights_kb"] is None else (f"{r['weights_kb']:.1f}",
                                                            f"{r['weights_kb'] / base['weights_kb']:.2f}x")
        table.append((r["stage"], r["backend"], f"{r['accuracy']:.2f}", f"{r['size_kb']:.1f}",
                      f"{r['size_kb'] / base['size_kb']:.2f}x", *weights, f"{r['latency_ms']:.3f}",
                      f"{r['latency_ms'] / base['latency_ms']:.2f}x"))
    print(format_table(table))
    png = os.path.join(args.out, "digits_end_to_end.png")
    chart(rows, png)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"seed": args.seed, "rows": rows, "seconds": time.perf_counter() - start}, f, indent=2)
    print(f"wrote {png} and results.json in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

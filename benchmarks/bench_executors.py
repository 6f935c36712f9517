"""A sweep of N >= 16 accuracy trials on three executors: 2 local workers against 1 worker using both threads, and
Ray (a local head on loopback) against the local executor.

Two sweeps, both on the zoo's MobileNetV2-like model:

* ``sensitivity`` (the default; graphopt's own): the trials of ``graphopt sensitivity --all-but-one`` on its first
  N fusion groups — each trial quantizes the calibrated model with one group kept float (place-qdq, in Python),
  builds an onnxruntime session and runs S samples in batches of 32, scoring output SQNR against fp32. The study
  (calibration) is made once, before the timing. The choice: the group whose float-ing helps most.
* ``synthetic`` (inference-bound, the worst case for processes): for each of the first N convolutions,
  fake-quantize its weights to 4 bits, run S batch-1 samples, score SQNR; the choice: the lowest SQNR.

The executors give each worker its share of the cores (``$GRAPHOPT_THREADS``, which graphopt's sessions follow):
``processes:1`` runs its trials with 2 threads, ``processes:2`` with one thread each. A trial is partly
single-threaded (quantizing the graph, building the session), which only processes parallelize.

The bar (issue 12): the sweep with 2 workers is >= 1.6x faster (wall clock, pool start included) than with 1 worker
using both threads, and Ray makes the same choice. Rounds alternate the two local layouts, each with a fresh run
folder (no cached trial); the medians of the per-round ratios are reported, with the load average (other work on
the machine distorts both).

    python benchmarks/bench_executors.py [--sweep sensitivity|synthetic] [--layers 16] [--samples 32]
                                         [--rounds 3] [--no-ray] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import machine, versions, write_outputs  # noqa: E402


def layer_sqnr(item: dict) -> float:
    """A trial: SQNR (dB) of the model's output with ``item["layer"]``'s weights at 4 bits, per output channel."""
    from graphopt.backends.base import default_threads
    from graphopt.numeric import sqnr_db

    model = onnx.load(item["model"])
    conv = next(n for n in model.graph.node if n.name == item["layer"])
    weight = next(t for t in model.graph.initializer if t.name == conv.input[1])
    w = numpy_helper.to_array(weight)
    scale = np.abs(w).reshape(w.shape[0], -1).max(axis=1).reshape(-1, *[1] * (w.ndim - 1)) / 7 + 1e-12
    weight.CopyFrom(numpy_helper.from_array((np.clip(np.round(w / scale), -8, 7) * scale).astype(w.dtype), weight.name))
    options = ort.SessionOptions()
    options.intra_op_num_threads = default_threads()  # the worker's share of the cores ($GRAPHOPT_THREADS)
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    data = np.load(item["data"])
    name = session.get_inputs()[0].name
    out = np.concatenate([session.run(None, {name: x[None]})[0] for x in data["x"]])
    return sqnr_db(data["reference"], out)


def prepare_study(folder: str, model_path: str, samples: int):
    """graphopt's sensitivity study of the model (calibrated once on ``samples`` random images)."""
    from graphopt.backends import get_backend
    from graphopt.plugins import default_registry
    from graphopt.report.sensitivity import prepare

    x = np.random.default_rng(1).standard_normal((samples, 3, 224, 224)).astype(np.float32)
    name = onnx.load(model_path).graph.input[0].name
    registry = default_registry()
    return prepare(model_path, {name: x}, registry=registry, backend=get_backend(registry, "onnxruntime"),
                   samples=samples, folder=os.path.join(folder, "study"))


def group_sqnr(item: dict) -> float:
    """A trial of the sensitivity sweep: graphopt's own trial (the study's placement with these groups float)."""
    from graphopt.report.sensitivity import run_trial

    return run_trial(item)["sqnr_db"]


def prepare(folder: str, samples: int) -> tuple[str, str, list[str]]:
    """The fp32 model, its inputs and reference outputs, and its convolutions' names."""
    from graphopt import zoo

    model_path, data_path = os.path.join(folder, "mobilenet_v2_like.onnx"), os.path.join(folder, "data.npz")
    zoo.export_onnx(zoo.mobilenet_v2_like(), model_path, (1, 3, 224, 224), keep_bn=False)
    x = np.random.default_rng(0).standard_normal((samples, 3, 224, 224)).astype(np.float32)
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    reference = np.concatenate([session.run(None, {name: s[None]})[0] for s in x])
    np.savez(data_path, x=x, reference=reference)
    convs = [n.name for n in onnx.load(model_path).graph.node if n.op_type == "Conv"]
    return model_path, data_path, convs


def sweep(spec: str, run_dir: str, fn, items: list[dict], names: list[str], pick) -> tuple[float, str, list]:
    """(wall seconds including the executor's start and stop, the chosen name, every score)."""
    from graphopt.executors import get_executor

    start = time.perf_counter()
    with get_executor(spec, run_dir) as executor:
        scores = executor.map(fn, items)
    seconds = time.perf_counter() - start
    return seconds, names[int(pick(scores))], scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", choices=("sensitivity", "synthetic"), default="sensitivity")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="bench-exec-")
    model, data, convs = prepare(folder, args.samples)
    if args.sweep == "sensitivity":
        study = prepare_study(folder, model, args.samples)
        layers = [g.name for g in study.groups[: args.layers]]
        fn, pick = group_sqnr, np.argmax  # all but one group int8: the group whose float-ing helps most
        items = [{"study": study.folder, "float": [name]} for name in layers]
        what = f"graphopt sensitivity --all-but-one trials on {len(layers)} fusion groups"
    else:
        layers = convs[: args.layers]
        fn, pick = layer_sqnr, np.argmin
        items = [{"model": model, "data": data, "layer": layer} for layer in layers]
        what = f"4-bit weights per conv, {len(layers)} convs, batch-1 samples"
    times: dict[str, list[float]] = {"processes:1 x 2 threads": [], "processes:2 x 1 thread": []}
    choices, loads = {}, []
    for r in range(args.rounds):
        for label, spec in (("processes:1 x 2 threads", "processes:1"), ("processes:2 x 1 thread", "processes:2")):
            seconds, choice, scores = sweep(spec, os.path.join(folder, f"{spec[-1]}-{r}"), fn, items, layers, pick)
            times[label].append(seconds)
            choices[label] = choice
            loads.append(os.getloadavg()[0])
            print(f"round {r}: {label}: {seconds:.1f} s, choice {choice}", flush=True)
    rows = [(label, statistics.median(t), t) for label, t in times.items()]
    speedup = statistics.median(a / b for a, b in zip(*times.values()))
    ray_row = None
    if not args.no_ray:
        start = time.perf_counter()
        seconds, choice, _ = sweep("ray", os.path.join(folder, "ray"), fn, items, layers, pick)
        ray_row = ("ray (local head, 2 CPUs)", seconds, choice, time.perf_counter() - start)
        choices["ray"] = choice
    same = len(set(choices.values())) == 1
    lines = [f"# Executors: a {len(layers)}-candidate sweep on MobileNetV2-like ({what}, {args.samples} samples "
             f"per trial)", "", f"{machine()}; {versions(('ray',))}",
             f"load average during the runs: {min(loads):.1f}-{max(loads):.1f}", "",
             "| executor | median wall s | rounds (s) | choice |", "|---|---:|---|---|"]
    lines += [f"| {label} | {med:.1f} | {', '.join(f'{x:.1f}' for x in t)} | {choices[label]} |"
              for label, med, t in rows]
    if ray_row:
        lines.append(f"| {ray_row[0]} | {ray_row[1]:.1f} (head start included) | | {ray_row[2]} |")
    lines += ["", f"2 workers vs 1 worker with 2 threads (median of the per-round ratios): **{speedup:.2f}x** "
              f"(bar >= 1.6x: "
              f"{'met' if speedup >= 1.6 else 'NOT met'}); same choice on every executor: **{same}**", ""]
    write_outputs("\n".join(lines), {"times": times, "speedup": speedup, "choices": choices, "same_choice": same,
                                     "ray_seconds": ray_row[1] if ray_row else None, "loadavg": loads},
                  args.markdown, args.json)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

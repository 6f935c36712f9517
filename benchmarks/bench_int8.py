"""Side-by-side benchmark of graphopt's static int8 against onnxruntime's own quantizer, in one run.

    python benchmarks/bench_int8.py [--models resnet18_like,resnet50_like,mobilenet_v2_like] [--repeat 15]
                                    [--iters 3] [--calib-samples 32] [--eval-samples 16] [--threads 2]
                                    [--no-control] [--json out.json] [--markdown out.md] [--workdir DIR]
                                    [--fail-on-bar]

Each zoo model is exported to a temporary folder with BatchNorm kept (``export_onnx(keep_bn=True)``, 1x3x224x224,
opset 17, the graph a user has before any cleanup). From that same file, in the same process:

* ``fp32``: graphopt's ``fold`` output (BatchNorm folded), the float reference every other variant is compared to;
* ``graphopt``: ``graphopt.optimize(path, "fold,int8", ctx=PassContext(calibration={"input": x}), check=False)``
  with every int8 default (the onnxruntime backend's scheme: uint8 asymmetric activations, int8 symmetric
  per-channel weights, QDQ, MinMax calibration);
* ``ort-default``: ``quant_pre_process(path, pre)`` then ``quantize_static(pre, out, reader)`` with *all* of
  ``quantize_static``'s defaults (read off its signature at run time and printed: in onnxruntime 1.31 QDQ format,
  int8 activations, int8 per-tensor weights, MinMax);
* ``ort-best``: the same with the settings that run fastest on x86 CPUs: ``quant_pre_process``, QDQ,
  ``per_channel=True``, ``activation_type=QUInt8``, ``weight_type=QInt8`` (onnxruntime's x86 int8 kernels multiply
  unsigned activations by signed weights; with its default int8 activations the model was measured slower than
  fp32).

Every quantizer gets the same calibration data: ``--calib-samples`` (32) fixed-seed standard-normal inputs
(graphopt as one array, onnxruntime through a ``CalibrationDataReader`` yielding them one at a time: the models
have a fixed batch of 1).

Latency: onnxruntime CPU through graphopt's backend (``OnnxRuntimeBackend().session(path, threads)``: ``--threads``
(2) intra-op threads, one inter-op thread, sequential execution, every graph optimisation on, onnxruntime's
default thread spinning), batch 1, one fixed-seed input. All sessions are built first, then timed
**interleaved**: ``--repeat`` (15) rounds; each round visits every variant in a shuffled order (seeded) and then
in the reverse order (ABBA, so a load drift within the round hits all alike); a visit is 2 untimed runs (they
absorb the previous session's spinning worker threads) and ``--iters`` (3) timed runs. (Alternating single runs
across sessions was tried and rejected: each session's spinning workers then slow the next session's run, fp32
MobileNetV2 by ~3x.) Reported: the median and p90 of all timed runs, and each ratio as the **median over rounds
of the ratio measured within a round** (background load on a shared machine drifts between rounds and hits both
sides of a within-round ratio alike; the interquartile range of those per-round ratios is printed too). The
bar's two sides, graphopt and ort-best, each run in **two sessions** (unless ``--no-control``), made in the order
graphopt, ort-best, ort-best, graphopt after the others, so that whatever a session's place in the process costs
falls on both sides alike; a variant's latency pools its sessions' runs. Session 1 / session 2 of the same model is
an **A/A control**: pure noise, the yardstick for reading a graphopt / ort-best ratio near 1.

Output agreement against fp32 on ``--eval-samples`` (16) other fixed-seed random inputs: SQNR in dB
(``graphopt.report.metrics.sqnr_db`` over all samples' logits) and top-1 agreement. The zoo models have random
weights, so top-1 agreement is *not accuracy*: it only says how often the int8 argmax matches the fp32 one,
and with random logits that sit close together it is a harsh measure (accuracy on real data is the digits
benchmark's job). Model size is the .onnx file's.

What onnxruntime made of each model: the session's optimized graph (``SessionOptions.optimized_model_filepath``)
is saved once per variant and its kernels counted: QLinearConv / QGemm / QLinearAdd / ... versus compute ops
left in float (Conv, Gemm, MatMul, Add, ... between DequantizeLinear and QuantizeLinear), so a slower variant
shows where it lost.

The bar (issue #3): graphopt int8 latency / ort-best <= 1.0 on each model, with graphopt's defaults.
graphopt / ort-default and graphopt / fp32 are printed beside it. ``--fail-on-bar`` makes a lost bar exit 1.
Needs ``pip install -e '.[torch]'`` (the zoo; onnxruntime brings its quantizer). Exported and quantized
models live in a temp dir that is deleted afterwards (``--workdir DIR`` keeps them; never commit .onnx files).
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from typing import Any

import numpy as np
from _common import machine, versions, write_outputs

MODELS = ("resnet18_like", "resnet50_like", "mobilenet_v2_like")
VARIANTS = ("fp32", "graphopt", "ort-default", "ort-best")
INPUT_SHAPE = (1, 3, 224, 224)
BAR = 1.0
TWINNED = ("graphopt", "ort-best")  # the bar's two sides: timed in two sessions each (the A/A control)

HOW = {
    "fp32": 'graphopt.optimize(path, "fold", check=False)',
    "graphopt": 'graphopt.optimize(path, "fold,int8", ctx=PassContext(calibration={"input": x}), check=False) '
                "-- graphopt's int8 defaults",
    "ort-default": "quant_pre_process(path, pre); quantize_static(pre, out, reader) -- every default",
    "ort-best": "quant_pre_process(path, pre); quantize_static(pre, out, reader, quant_format=QDQ, per_channel=True, "
                "activation_type=QUInt8, weight_type=QInt8) -- the fastest settings on x86",
}
# compute ops onnxruntime runs in float if it did not fuse their Q/DQ group (what a slow int8 model shows)
FLOAT_COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "AveragePool",
                 "GlobalAveragePool", "MaxPool", "Relu", "Clip", "Sigmoid", "LeakyRelu")


def twin(variant: str) -> str:
    """The key of a variant's second session."""
    return f"{variant}#2"


# -- building the four models ---------------------------------------------------------------------------------
def export_model(name: str, workdir: str) -> str:
    from graphopt import zoo

    path = os.path.join(workdir, f"{name}.onnx")
    if not os.path.exists(path):
        zoo.export_onnx(getattr(zoo, name)(), path, INPUT_SHAPE, keep_bn=True)
    return path


def random_samples(n: int, seed: int) -> np.ndarray:
    """``n`` standard-normal samples, stacked as (n, 3, 224, 224)."""
    return np.random.default_rng(seed).standard_normal((n, *INPUT_SHAPE[1:])).astype(np.float32)


def ort_quantize_defaults() -> dict[str, str]:
    """``quantize_static``'s defaults in the installed onnxruntime, as its signature states them."""
    from onnxruntime.quantization import quantize_static

    keep = ("quant_format", "per_channel", "activation_type", "weight_type", "calibrate_method", "reduce_range")
    params = inspect.signature(quantize_static).parameters
    return {k: str(params[k].default) for k in keep if k in params}


def build_fp32(path: str, out: str, registry) -> float:
    import graphopt

    start = time.perf_counter()
    graphopt.optimize(path, "fold", registry=registry, check=False).save(out)
    return time.perf_counter() - start


def build_graphopt(path: str, out: str, calib: np.ndarray, registry) -> tuple[float, dict[str, Any]]:
    import graphopt
    from graphopt.passes.base import PassContext

    ctx = PassContext(registry=registry, calibration={"input": calib})
    start = time.perf_counter()
    result = graphopt.optimize(path, "fold,int8", registry=registry, ctx=ctx, check=False)
    result.save(out)
    seconds = time.perf_counter() - start
    record = next((r for r in result.report.records if r.name == "place-qdq"), None)
    info = {"stats": dict(record.stats) if record else {}, "notes": list(record.notes) if record else [],
            "warnings": list(ctx.warnings)}
    return seconds, info


def build_ort(path: str, out: str, calib: np.ndarray, best: bool, workdir: str) -> float:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(range(len(calib)))

        def get_next(self):
            i = next(self._it, None)
            return None if i is None else {"input": calib[i:i + 1]}

    start = time.perf_counter()
    pre = os.path.join(workdir, os.path.basename(out).replace(".onnx", ".pre.onnx"))
    quant_pre_process(path, pre)
    if best:
        quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    else:
        quantize_static(pre, out, Reader())
    return time.perf_counter() - start


# -- what onnxruntime made of it ------------------------------------------------------------------------------
def ort_kernels(path: str, threads: int) -> tuple[dict[str, int], str]:
    """Op counts of onnxruntime's optimized graph for ``path`` (the session options of the timed one), and a
    digest of its nodes in order (op type, attributes, and the dtype and shape of each initializer input): two
    models with the same digest run the same kernels on the same shapes, whatever their scale values."""
    import hashlib

    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    dump = path.replace(".onnx", ".ort-optimized.onnx")
    options.optimized_model_filepath = dump
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    graph = onnx.load(dump).graph
    inits = {t.name: (t.data_type, tuple(t.dims)) for t in graph.initializer}
    digest = hashlib.sha1()
    for node in graph.node:
        attrs = sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in node.attribute)
        digest.update(repr((node.domain, node.op_type, attrs, [inits.get(i, "x") for i in node.input])).encode())
    return dict(sorted(Counter(n.op_type for n in graph.node).items())), digest.hexdigest()


def kernel_summary(counts: dict[str, int]) -> str:
    quant = {k: v for k, v in counts.items() if k.startswith("QLinear") or k in ("QGemm", "NhwcMaxPool")}
    floats = {k: v for k, v in counts.items() if k in FLOAT_COMPUTE}
    qdq = {k: v for k, v in counts.items() if k in ("QuantizeLinear", "DequantizeLinear")}
    parts = [" ".join(f"{k} {v}" for k, v in quant.items()) or "no int8 kernels"]
    if floats:
        parts.append("float: " + " ".join(f"{k} {v}" for k, v in floats.items()))
    if qdq:
        parts.append(" ".join(f"{'Q' if k == 'QuantizeLinear' else 'DQ'} {v}" for k, v in qdq.items()))
    return "; ".join(parts)


# -- measuring ------------------------------------------------------------------------------------------------
def time_interleaved(sessions: dict[str, Any], backend, feeds, repeat: int, iters: int, warmup: int = 2,
                     seed: int = 0) -> dict[str, list[list[float]]]:
    """Per variant, the timed runs of every round (seconds). A round visits every variant in a shuffled order
    and then in the reverse order (ABBA: a load drift within the round hits every variant alike); each visit is
    ``warmup`` untimed and ``iters`` timed runs."""
    names = list(sessions)
    rng = np.random.default_rng(seed)
    times: dict[str, list[list[float]]] = {v: [] for v in names}
    for r in range(repeat):
        order = [names[i] for i in rng.permutation(len(names))]
        runs: dict[str, list[float]] = {v: [] for v in names}
        for v in order + order[::-1]:
            session = sessions[v]
            for _ in range(warmup):
                backend.run(session, feeds)
            for _ in range(iters):
                start = time.perf_counter()
                backend.run(session, feeds)
                runs[v].append(time.perf_counter() - start)
        for v in names:
            times[v].append(runs[v])
        print(f"    round {r + 1}/{repeat}: " + ", ".join(
            f"{v} {statistics.median(runs[v]) * 1000:.2f} ms" for v in names), file=sys.stderr, flush=True)
    return times


def latency(times: list[list[float]], threads: int) -> dict[str, Any]:
    from graphopt.backends.base import LatencyStats

    flat = [t for rnd in times for t in rnd]
    stats = LatencyStats.from_times(1, threads, flat)
    return {"p50_ms": stats.p50_ms, "p90_ms": stats.p90_ms, "min_ms": stats.min_ms, "mean_ms": stats.mean_ms,
            "runs": stats.iters, "round_medians_ms": [statistics.median(r) * 1000 for r in times]}


def round_ratios(a: list[list[float]], b: list[list[float]]) -> dict[str, Any]:
    """a / b: the median over rounds of (median of a's runs / median of b's runs in that round)."""
    ratios = sorted(statistics.median(x) / statistics.median(y) for x, y in zip(a, b))
    q = np.percentile(ratios, [25, 75]) if len(ratios) > 1 else (ratios[0], ratios[0])
    return {"median": statistics.median(ratios), "q25": float(q[0]), "q75": float(q[1]),
            "wins": sum(r <= 1.0 for r in ratios), "rounds": len(ratios), "per_round": ratios}


def agreement(sessions: dict[str, Any], backend, samples: np.ndarray) -> dict[str, dict[str, float]]:
    from graphopt.numeric import cosine_similarity, sqnr_db, top1_agreement

    outputs = {v: np.concatenate([backend.run(s, {"input": x[None]})[0] for x in samples]) for v, s in
               sessions.items()}
    ref = outputs["fp32"]
    return {v: {"sqnr_db": sqnr_db(ref, out), "top1_agreement": top1_agreement(ref, out),
                "cosine": cosine_similarity(ref, out)} for v, out in outputs.items() if v != "fp32"}


def _failed(row: dict[str, Any], exc: Exception) -> None:
    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    row["traceback"] = traceback.format_exc()
    print(f"    error: {row['error']}", file=sys.stderr, flush=True)


def bench_model(name: str, workdir: str, args, registry) -> dict[str, Any]:
    from graphopt.backends.base import model_size_bytes
    from graphopt.backends.onnxruntime import OnnxRuntimeBackend

    t0 = time.perf_counter()
    path = export_model(name, workdir)
    result: dict[str, Any] = {"model": name, "export_s": time.perf_counter() - t0, "variants": {}}
    print(f"  {name}: exported in {result['export_s']:.1f} s", file=sys.stderr, flush=True)
    calib = random_samples(args.calib_samples, args.seed)
    rows: dict[str, dict[str, Any]] = {v: {"variant": v, "how": HOW[v]} for v in VARIANTS}
    files = {v: os.path.join(workdir, f"{name}.{v}.onnx") for v in VARIANTS}
    builders = {
        "fp32": lambda: build_fp32(path, files["fp32"], registry),
        "graphopt": lambda: build_graphopt(path, files["graphopt"], calib, registry),
        "ort-default": lambda: build_ort(path, files["ort-default"], calib, False, workdir),
        "ort-best": lambda: build_ort(path, files["ort-best"], calib, True, workdir),
    }
    for v in VARIANTS:
        row = rows[v]
        try:
            out = builders[v]()
            row["build_s"], info = out if isinstance(out, tuple) else (out, None)
            if info:
                row["graphopt"] = info
            row["size_bytes"] = model_size_bytes(files[v])
            row["ort_kernels"], row["ort_graph_digest"] = ort_kernels(files[v], args.threads)
            print(f"    {v}: built in {row['build_s']:.1f} s, {row['size_bytes'] / 1e6:.1f} MB; "
                  f"{kernel_summary(row['ort_kernels'])}", file=sys.stderr, flush=True)
        except Exception as exc:  # a variant that fails is reported, the run goes on
            _failed(row, exc)
    result["variants"] = rows
    ok = [v for v in VARIANTS if "error" not in rows[v]]
    if "fp32" not in ok:
        result["verdicts"] = verdicts(result)
        return result

    backend = OnnxRuntimeBackend()
    sessions = {v: backend.session(files[v], args.threads) for v in ok if v not in TWINNED}
    # the bar's two sides, in two sessions each made in the order A B B A (with the control): whatever a
    # session's place in the process costs (creation order, memory placement) falls on both sides alike
    twins = [v for v in TWINNED if v in ok]
    for key in twins + [twin(v) for v in twins[::-1]] if args.control else twins:
        sessions[key] = backend.session(files[key.split("#")[0]], args.threads)
    try:
        firsts = {v: sessions[v] for v in ok}
        for v, acc in agreement(firsts, backend, random_samples(args.eval_samples, args.seed + 1)).items():
            rows[v].update(acc)
    except Exception as exc:
        _failed(result, exc)
    feeds = {"input": random_samples(1, args.seed + 2)}
    times = time_interleaved(sessions, backend, feeds, args.repeat, args.iters, seed=args.seed)
    # a variant's runs in a round: those of all its sessions
    pooled = {v: [sum(runs, []) for runs in zip(*(times[k] for k in times if k.split("#")[0] == v))] for v in ok}
    if args.control and len(twins) == len(TWINNED):
        result["control"] = {v: round_ratios(times[v], times[twin(v)]) for v in twins}
    for v in ok:
        rows[v]["latency"] = latency(pooled[v], args.threads)
        rows[v]["sessions"] = 2 if args.control and v in twins else 1
        rows[v]["vs_fp32"] = round_ratios(pooled[v], pooled["fp32"])
    if "graphopt" in ok:
        for other in ("ort-best", "ort-default"):
            if other in ok:
                rows["graphopt"][f"vs_{other}"] = round_ratios(pooled["graphopt"], pooled[other])
    result["verdicts"] = verdicts(result)
    return result


# -- the bar --------------------------------------------------------------------------------------------------
def same_kernels(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Whether two variants' onnxruntime-optimized graphs are the same node for node (digest), and which kernel
    counts differ when they are not."""
    ka, kb = a["ort_kernels"], b["ort_kernels"]
    diff = {k: [ka.get(k, 0), kb.get(k, 0)] for k in sorted(set(ka) | set(kb)) if ka.get(k, 0) != kb.get(k, 0)}
    return {"identical": a["ort_graph_digest"] == b["ort_graph_digest"], "differences": diff}


def verdicts(result: dict[str, Any]) -> dict[str, Any]:
    rows = result["variants"]
    g = rows.get("graphopt", {})
    v: dict[str, Any] = {}
    if "vs_ort-best" in g:
        ratio = g["vs_ort-best"]["median"]
        v["latency_vs_ort_best"] = {"ratio": ratio, "pass": ratio <= BAR}
    else:
        v["latency_vs_ort_best"] = {"pass": False, "error": g.get("error") or rows.get("ort-best", {}).get("error")
                                    or "not measured"}
    if "vs_ort-default" in g:
        v["latency_vs_ort_default"] = {"ratio": g["vs_ort-default"]["median"]}
    if "ort_kernels" in g and "ort_kernels" in rows.get("ort-best", {}):
        v["kernels_vs_ort_best"] = same_kernels(g, rows["ort-best"])
    return v


# -- reporting ------------------------------------------------------------------------------------------------
def _mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _db(x: float | None) -> str:
    if x is None:
        return ""
    return "inf" if x == float("inf") else f"{x:.1f}"


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"### graphopt int8 vs onnxruntime.quantization (onnxruntime {meta['ort_version']} CPU, {meta['threads']} "
        f"intra-op threads, batch 1, 1x3x224x224; {meta['repeat']} interleaved ABBA rounds x 2 x {meta['iters']} runs; "
        f"calibration: {meta['calib_samples']} random-normal samples)",
        "",
        "| model | variant | median ms | p90 ms | x fp32 | graphopt / this | size MB | SQNR dB | top-1 agree "
        "| build s | onnxruntime kernels after its graph optimisation |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for res in results:
        g = res["variants"].get("graphopt", {})
        for v, row in res["variants"].items():
            if "error" in row:
                lines.append(f"| {res['model']} | {v} | error: {row['error'][:90].replace('|', '/')} "
                             "| | | | | | | | |")
                continue
            lat = row.get("latency", {})
            ratio = {"graphopt": {"median": 1.0}}.get(v) or g.get(f"vs_{v}")  # graphopt / this variant
            vs = f"{ratio['median']:.2f}" if ratio else ""
            x_fp32 = f"{row['vs_fp32']['median']:.2f}" if "vs_fp32" in row else ""
            top1 = f"{row['top1_agreement'] * 100:.0f} %" if "top1_agreement" in row else ""
            p50, p90 = (f"{lat[k]:.2f}" if k in lat else "" for k in ("p50_ms", "p90_ms"))
            lines.append(
                f"| {res['model']} | {v} | {p50} | {p90} | {x_fp32} | {vs} | {row['size_bytes'] / 1e6:.1f} "
                f"| {_db(row.get('sqnr_db'))} | {top1} | {row['build_s']:.1f} | {kernel_summary(row['ort_kernels'])} |")
    lines += [
        "",
        "`x fp32` and `graphopt / this` are medians over rounds of the ratio measured within each round (the "
        "median ms columns pool every run). SQNR and top-1 agreement are against fp32 on "
        f"{meta['eval_samples']} other random inputs; the zoo models have **random weights**, so top-1 agreement "
        "is not accuracy, only how often the int8 argmax matches fp32's on near-tied random logits. `build s` is "
        "the wall time of making the model (graphopt: fold + calibrate + place; onnxruntime: quant_pre_process + "
        "quantize_static), for information.",
        "",
        "onnxruntime's `quantize_static` defaults here: "
        + ", ".join(f"{k}={v}" for k, v in meta["ort_defaults"].items()) + ".",
        "",
        f"**Bar** (issue #3): graphopt int8 latency / ort-best <= {BAR:g}, with graphopt's defaults:",
        "",
    ]
    for res in results:
        v = res["verdicts"]
        e = v["latency_vs_ort_best"]
        if "ratio" not in e:
            lines.append(f"- {res['model']}: FAIL (not measured: {e.get('error')})")
            continue
        g = res["variants"]["graphopt"]
        best = g["vs_ort-best"]
        parts = [f"graphopt / ort-best {e['ratio']:.3f} <= {BAR:g}: {_mark(e['pass'])} (per-round IQR "
                 f"{best['q25']:.3f}-{best['q75']:.3f}, graphopt faster or equal in {best['wins']}/{best['rounds']} "
                 "rounds)"]
        if "latency_vs_ort_default" in v:
            parts.append(f"graphopt / ort-default {v['latency_vs_ort_default']['ratio']:.2f}")
        parts.append(f"graphopt / fp32 {g['vs_fp32']['median']:.2f}")
        if "control" in res:
            parts.append("A/A control (the same model, session 1 / session 2): " + ", ".join(
                f"{v} {c['median']:.3f} (IQR {c['q25']:.3f}-{c['q75']:.3f})" for v, c in res["control"].items()))
        k = v.get("kernels_vs_ort_best")
        if k is not None:
            if k["identical"]:
                parts.append("onnxruntime's optimized graph is node for node the same as ort-best's")
            else:
                parts.append("onnxruntime's optimized graph differs from ort-best's" + (": " + ", ".join(
                    f"{op} {a} vs {b}" for op, (a, b) in k["differences"].items()) if k["differences"] else
                    " (same kernel counts; order, attributes or weight shapes differ)"))
        lines.append(f"- {res['model']}: " + "; ".join(parts))
    lines += ["", "**What each variant is:**", ""]
    lines += [f"- {v}: `{HOW[v]}`" for v in VARIANTS]
    lines += ["", f"Machine: {meta['machine']}; {meta['versions']}."]
    return "\n".join(lines) + "\n"


def all_pass(results: list[dict[str, Any]]) -> bool:
    return all(r["verdicts"]["latency_vs_ort_best"]["pass"] for r in results)


def environment(args) -> dict[str, Any]:
    import onnxruntime as ort

    return {"repeat": args.repeat, "iters": args.iters, "threads": args.threads, "calib_samples": args.calib_samples,
            "eval_samples": args.eval_samples, "seed": args.seed, "how": HOW, "ort_version": ort.__version__,
            "ort_defaults": ort_quantize_defaults(), "machine": machine(), "versions": versions(), "bar": BAR}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {','.join(MODELS)}")
    ap.add_argument("--repeat", type=int, default=15, help="interleaved timing rounds (default 15)")
    ap.add_argument("--iters", type=int, default=3,
                    help="timed runs per variant per visit, two visits a round (default 3)")
    ap.add_argument("--no-control", dest="control", action="store_false",
                    help="time graphopt and ort-best in one session each, not two (no A/A control)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    ap.add_argument("--calib-samples", type=int, default=32, help="random-normal calibration samples (default 32)")
    ap.add_argument("--eval-samples", type=int, default=16, help="random inputs for SQNR / top-1 (default 16)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration data (eval and timing: +1, +2)")
    ap.add_argument("--json", metavar="PATH", help="write every measurement and verdict as JSON")
    ap.add_argument("--markdown", metavar="PATH", help="write the results table and verdicts as Markdown")
    ap.add_argument("--workdir", metavar="DIR", help="keep the exported and quantized models here (default: a temp "
                                                     "dir)")
    ap.add_argument("--fail-on-bar", action="store_true", help="exit 1 when graphopt loses the bar")
    args = ap.parse_args(argv)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model '{m}' (choose from {', '.join(MODELS)})")
    for flag in ("repeat", "iters", "threads", "calib_samples", "eval_samples"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")

    from graphopt.plugins import load_registry

    registry = load_registry()
    meta = environment(args)
    with tempfile.TemporaryDirectory(prefix="bench_int8_") as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        results = [bench_model(m, workdir, args, registry) for m in models]

    write_outputs(markdown(results, meta), {"meta": meta, "results": results}, args.markdown, args.json)
    if args.fail_on_bar and not all_pass(results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

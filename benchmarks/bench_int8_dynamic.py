"""Side-by-side benchmark of graphopt's ``int8-dynamic`` against onnxruntime's ``quantize_dynamic``, in one run.

    python benchmarks/bench_int8_dynamic.py [--hidden 256,384] [--layers 4] [--seq 128] [--threads 2]
                                            [--rounds 30] [--json out.json] [--markdown out.md]

A BERT-like encoder classifier (``graphopt.zoo.transformer.bert_like``: token + position embeddings, explicit
q/k/v/out projections, GELU FFN, pooler and classifier; random init, fixed seed) is exported per hidden size with
the TorchScript exporter (opset 17, dynamic batch and sequence). Then, in the same process:

* ``fp32``: the exported model as it is;
* ``graphopt``: ``graphopt.optimize(path, "fold,int8-dynamic", check=False)``, its defaults;
* ``ort-qd``: ``onnxruntime.quantization.quantize_dynamic(path, out)``, its defaults (int8 weights per tensor);
* ``ort-qd-pc``: the same with ``per_channel=True`` (graphopt's default granularity);
* informative, not judged: ``graphopt+shapes`` (graphopt's output with ONNX shape inference written into it)
  and ``ort-qd-noshapes`` (quantize_dynamic's output with its value_info removed). They show the one
  structural difference between the judged models: with shapes in the graph, onnxruntime fuses
  Add + LayerNormalization into SkipLayerNormalization, whose CPU kernel is slower than the two ops.

Measured for each: file size; output cosine and SQNR against fp32 on ``--samples`` fixed-seed random token
sequences of length ``--seq`` (the logits, and the last encoder layer's output); latency at batch 1 on
onnxruntime's CPU provider with ``--threads`` intra-op threads, every graph optimisation on (graphopt's
onnxruntime backend sessions). Timing is interleaved: each of ``--rounds`` rounds runs every variant (order
alternating) for one warm-up and ``--inner`` timed runs and keeps their median; the table shows the median over
rounds and the median of the per-round ratio to ``ort-qd`` (paired, so load on a shared machine hits both).
The ops onnxruntime fused the graph into are listed too.

The bars (issue #3): graphopt's output cosine >= 0.99 and its latency <= quantize_dynamic's, with its defaults
and with per_channel=True. ``--fail-on-bar`` makes a lost bar exit 1. Needs ``pip install -e '.[torch]'``.
Models live in a temp dir (``--workdir DIR`` keeps them; never commit .onnx files).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import numpy as np
import onnx
from _common import machine, versions, write_outputs

VARIANTS = ("fp32", "graphopt", "ort-qd", "ort-qd-pc", "graphopt+shapes", "ort-qd-noshapes")
JUDGED = ("ort-qd", "ort-qd-pc")
COSINE_BAR = 0.99
FUSED_OPS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "SkipLayerNormalization", "LayerNormalization",
             "MatMul")


# -- the models -------------------------------------------------------------------------------------------
def make_variants(workdir: str, hidden: int, layers: int, seq: int, vocab: int) -> tuple[dict[str, str], str]:
    """Every variant as a file; returns their paths and the name of the last encoder layer's output."""
    from onnxruntime.quantization import quantize_dynamic

    import graphopt
    from graphopt.zoo.transformer import bert_like, export_transformer_onnx

    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's "consider pre-processing" notice
    heads = hidden // 64
    stem = os.path.join(workdir, f"bert{hidden}x{layers}")
    paths = {v: f"{stem}-{v}.onnx" for v in VARIANTS}
    export_transformer_onnx(bert_like(vocab=vocab, hidden=hidden, layers=layers, heads=heads, seq=seq),
                            paths["fp32"], seq=seq)
    result = graphopt.optimize(paths["fp32"], "fold,int8-dynamic", check=False)
    result.save(paths["graphopt"])
    quantize_dynamic(paths["fp32"], paths["ort-qd"])
    quantize_dynamic(paths["fp32"], paths["ort-qd-pc"], per_channel=True)
    onnx.save(onnx.shape_inference.infer_shapes(onnx.load(paths["graphopt"]), data_prop=True),
              paths["graphopt+shapes"])
    stripped = onnx.load(paths["ort-qd"])
    del stripped.graph.value_info[:]
    onnx.save(stripped, paths["ort-qd-noshapes"])
    last = [n for n in onnx.load(paths["fp32"]).graph.node if n.op_type == "LayerNormalization"][-1].output[0]
    return paths, last


def fused_ops(path: str, threads: int) -> dict[str, int]:
    """What onnxruntime's graph optimisation turned the model into (the ops that matter here)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        counts = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return {op: counts.get(op, 0) for op in FUSED_OPS}


# -- measuring --------------------------------------------------------------------------------------------
def accuracy(paths: dict[str, str], last: str, samples: int, seq: int, vocab: int) -> dict[str, dict[str, float]]:
    from graphopt.backends.onnxruntime import OnnxRuntimeBackend
    from graphopt.numeric import cosine_similarity, sqnr_db
    from graphopt.report.metrics import expose

    backend = OnnxRuntimeBackend()
    ids = np.random.default_rng(0).integers(0, vocab, (samples, seq)).astype(np.int64)
    outputs = {}
    for variant, path in paths.items():
        session = backend.session(expose(onnx.load(path), [last]))
        runs = [session.run(["logits", last], {"input_ids": ids[i:i + 8]}) for i in range(0, samples, 8)]
        outputs[variant] = [np.concatenate([r[k] for r in runs]) for k in (0, 1)]
    ref = outputs["fp32"]
    return {v: {"cosine": cosine_similarity(ref[0], o[0]), "sqnr_db": sqnr_db(ref[0], o[0]),
                "cosine_hidden": cosine_similarity(ref[1], o[1]), "sqnr_hidden_db": sqnr_db(ref[1], o[1])}
            for v, o in outputs.items()}


def latency(paths: dict[str, str], seq: int, vocab: int, threads: int, rounds: int, inner: int
            ) -> dict[str, dict[str, Any]]:
    from graphopt.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend()
    sessions = {v: backend.session(p, threads) for v, p in paths.items()}
    feeds = {"input_ids": np.random.default_rng(1).integers(0, vocab, (1, seq)).astype(np.int64)}
    times: dict[str, list[float]] = {v: [] for v in sessions}
    for r in range(rounds):
        for variant in (list(sessions) if r % 2 == 0 else list(sessions)[::-1]):
            session = sessions[variant]
            session.run(None, feeds)
            runs = []
            for _ in range(inner):
                start = time.perf_counter()
                session.run(None, feeds)
                runs.append(time.perf_counter() - start)
            times[variant].append(statistics.median(runs))
    out = {}
    for variant, t in times.items():
        paired = {f"vs_{j}": statistics.median(a / b for a, b in zip(t, times[j])) for j in JUDGED + ("fp32",)}
        out[variant] = {"median_ms": 1000 * statistics.median(t), "p25_ms": 1000 * float(np.percentile(t, 25)),
                        "min_ms": 1000 * min(t), "rounds_ms": [1000 * x for x in t], **paired}
    return out


def bench(hidden: int, args, workdir: str) -> dict[str, Any]:
    print(f"  BERT-like hidden {hidden}, {args.layers} layers, seq {args.seq}: exporting and quantizing",
          file=sys.stderr, flush=True)
    paths, last = make_variants(workdir, hidden, args.layers, args.seq, args.vocab)
    acc = accuracy(paths, last, args.samples, args.seq, args.vocab)
    print(f"  timing {len(paths)} variants x {args.rounds} rounds", file=sys.stderr, flush=True)
    lat = latency(paths, args.seq, args.vocab, args.threads, args.rounds, args.inner)
    rows = {v: {"size_bytes": os.path.getsize(p), **acc[v], **lat[v], "fused": fused_ops(p, args.threads)}
            for v, p in paths.items()}
    g = rows["graphopt"]
    verdicts = {"cosine": {"value": g["cosine"], "pass": g["cosine"] >= COSINE_BAR}}
    for other in JUDGED:
        ratio = g["median_ms"] / rows[other]["median_ms"]
        verdicts[f"latency_vs_{other}"] = {"ratio": ratio, "paired": g[f"vs_{other}"], "pass": ratio <= 1.0}
    return {"model": f"bert_like(hidden={hidden}, layers={args.layers}, heads={hidden // 64})", "hidden": hidden,
            "rows": rows, "verdicts": verdicts}


# -- reporting --------------------------------------------------------------------------------------------
def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"### graphopt `int8-dynamic` vs onnxruntime `quantize_dynamic` (batch 1, seq {meta['seq']}, "
             f"{meta['threads']} threads; median of {meta['rounds']} interleaved rounds of {meta['inner']} runs)", "",
             "| model | variant | size MB | x fp32 size | cosine logits | cosine hidden | SQNR hidden dB | median ms "
             "| x fp32 | x ort-qd (paired) | onnxruntime ran |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for res in results:
        rows, fp32 = res["rows"], res["rows"]["fp32"]
        for variant, row in rows.items():
            fused = ", ".join(f"{op} {k}" for op, k in row["fused"].items() if k)
            lines.append(
                f"| {res['model']} | {variant} | {row['size_bytes'] / 1e6:.2f} | "
                f"{row['size_bytes'] / fp32['size_bytes']:.2f} | {row['cosine']:.5f} | {row['cosine_hidden']:.5f} | "
                f"{row['sqnr_hidden_db']:.1f} | {row['median_ms']:.2f} | {row['median_ms'] / fp32['median_ms']:.2f} | "
                f"{row['vs_ort-qd']:.3f} | {fused} |")
    lines += ["", f"**Bars** (graphopt's defaults; cosine of the logits on {meta['samples']} random sequences):", ""]
    for res in results:
        v = res["verdicts"]
        parts = [f"cosine {v['cosine']['value']:.5f} >= {COSINE_BAR}: {_mark(v['cosine']['pass'])}"]
        for other in JUDGED:
            e = v[f"latency_vs_{other}"]
            parts.append(f"latency / {other} {e['ratio']:.3f} (paired {e['paired']:.3f}) <= 1: {_mark(e['pass'])}")
        lines.append(f"- {res['model']}: " + "; ".join(parts))
    lines += ["", "`graphopt+shapes` and `ort-qd-noshapes` are informative (see the module docstring): shapes in "
              "the graph let onnxruntime fuse SkipLayerNormalization, which is slower on this CPU.", "",
              f"Machine: {meta['machine']}; {meta['versions']}."]
    return "\n".join(lines) + "\n"


def _mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def environment(args) -> dict[str, Any]:
    return {"seq": args.seq, "threads": args.threads, "rounds": args.rounds, "inner": args.inner,
            "samples": args.samples, "layers": args.layers, "vocab": args.vocab, "machine": machine(),
            "versions": versions(), "cosine_bar": COSINE_BAR}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", default="256,384", help="comma-separated hidden sizes (heads = hidden / 64)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds (median reported)")
    ap.add_argument("--inner", type=int, default=10, help="timed runs per variant and round (their median)")
    ap.add_argument("--samples", type=int, default=64, help="random sequences for the cosine (multiple of 8)")
    ap.add_argument("--json", metavar="PATH", help="write every measurement and verdict as JSON")
    ap.add_argument("--markdown", metavar="PATH", help="write the results table and verdicts as Markdown")
    ap.add_argument("--workdir", metavar="DIR", help="write the models here and keep them (default: a temp dir)")
    ap.add_argument("--fail-on-bar", action="store_true", help="exit 1 when graphopt loses a bar")
    args = ap.parse_args(argv)
    try:
        hiddens = [int(h) for h in args.hidden.split(",") if h.strip()]
    except ValueError:
        ap.error(f"--hidden takes integers, got {args.hidden!r}")
    if any(h % 64 for h in hiddens) or args.rounds < 1 or args.inner < 1 or args.samples % 8:
        ap.error("hidden sizes must be multiples of 64, --rounds and --inner at least 1, --samples a multiple of 8")

    meta = environment(args)
    with tempfile.TemporaryDirectory(prefix="bench_int8_dynamic_") as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        results = [bench(h, args, workdir) for h in hiddens]
    write_outputs(markdown(results, meta), {"meta": meta, "results": results}, args.markdown, args.json)
    ok = all(e["pass"] for res in results for e in res["verdicts"].values())
    return 1 if args.fail_on_bar and not ok else 0


if __name__ == "__main__":
    sys.exit(main())

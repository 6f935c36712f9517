"""``int4-weight`` on the BERT-like encoder against fp32 and ``int8-dynamic``: file size, accuracy, CPU latency.

    python benchmarks/bench_int4.py [--hidden 256] [--layers 4] [--vocab 1000] [--seq 128] [--samples 256]
                                    [--calib 32] [--rounds 20] [--inner 10] [--json out.json] [--markdown out.md]

The encoder is ``graphopt.zoo.transformer.bert_like`` (token + position embeddings, q/k/v/out projections, GELU
FFN, pooler and a 2-class head; random init, fixed seed), exported with the TorchScript exporter (opset 17,
dynamic batch and sequence). Variants, made in the same process:

* ``fp32``: the exported model;
* ``int8-dynamic``: ``graphopt.optimize(path, "fold,int8-dynamic")``;
* ``int4-sym`` / ``int4-asym``: ``fold,int4-weight`` (blocks of 32), symmetric / asymmetric, embeddings float,
  the last layer (the classifier) in 8-bit blocks (the pass's default, ``last=int8``);
* ``int4-sym-emb`` / ``int4-asym-emb``: the same with ``embeddings=true`` (GatherBlockQuantized tables);
* ``int4-sym-b16-emb``: informative, blocks of 16 (more scales: larger, more accurate);
* ``int4-sym-last4`` / ``int4-sym-emb-last4``: informative, ``last=int4``: the classifier in 4 bits too;
* ``int4-sym-emb-head``: informative, ``int4-sym-emb`` with the pooler and classifier Gemms kept float
  (``exclude_nodes``): the 2-class head's outputs take the full ~10 % rounding noise of 4-bit weights, which the
  encoder's residual stream dilutes;
* ``int4-sym-acc4``: informative, ``accuracy_level=4`` (onnxruntime quantizes the MatMul inputs to int8 per
  block, its fastest CPU path for MatMulNBits);
* ``int4-sym-gptq`` / ``int4-asym-gptq`` / ``int4-sym-emb-gptq`` / ``int4-asym-emb-gptq``: ``method=gptq``,
  calibrated on ``--calib`` random sequences of another seed than the measured ones.

Measured: file size (and its ratio to fp32); cosine of the logits and of the last encoder layer's output
(batch x seq x hidden) against fp32 on ``--samples`` fixed-seed random sequences; latency at batch 1 with ONE
intra-op thread, as CPU time per run (``time.process_time``, so other load on a shared machine counts less).
Timing is interleaved: each of ``--rounds`` rounds runs every variant (order alternating) for one warm-up and
``--inner`` timed runs and keeps their median; the table shows the median over rounds with its IQR, and the
median of the per-round ratios to fp32 and to int8-dynamic (paired). Bars (issue 12): file <= 0.25x fp32 with
float embeddings, <= 0.18x with 4-bit embeddings, cosine >= 0.99 (reported for the last hidden state, the metric
the issue scores transformers by, and for the 2-class logits). Needs ``pip install -e '.[torch]'``.
Models live in a temp dir (``--workdir DIR`` keeps them; never commit .onnx files).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from typing import Any

import numpy as np
import onnx
from _common import interleaved_cpu_ms, latency_summary, machine, versions, write_outputs

INT4 = {"int4-sym": "", "int4-asym": ":symmetric=false", "int4-sym-emb": ":embeddings=true",
        "int4-asym-emb": ":symmetric=false:embeddings=true", "int4-sym-b16-emb": ":block_size=16:embeddings=true",
        "int4-sym-last4": ":last=int4", "int4-sym-emb-last4": ":embeddings=true:last=int4",
        "int4-sym-emb-head": ":embeddings=true:exclude_nodes={head}", "int4-sym-acc4": ":accuracy_level=4",
        "int4-sym-gptq": ":method=gptq", "int4-asym-gptq": ":symmetric=false:method=gptq",
        "int4-sym-emb-gptq": ":embeddings=true:method=gptq",
        "int4-asym-emb-gptq": ":symmetric=false:embeddings=true:method=gptq"}
VARIANTS = ("fp32", "int8-dynamic", *INT4)
SIZE_BAR = {False: 0.25, True: 0.18}  # embeddings float / 4-bit
COSINE_BAR = 0.99


def make_variants(workdir: str, args) -> tuple[dict[str, str], str]:
    """Every variant as a file; returns their paths and the name of the last encoder layer's output."""
    import graphopt
    from graphopt.zoo.transformer import bert_like, export_transformer_onnx

    logging.getLogger().setLevel(logging.ERROR)
    paths = {v: os.path.join(workdir, f"bert-{v}.onnx") for v in VARIANTS}
    model = bert_like(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=max(1, args.hidden // 64),
                      seq=args.seq)
    export_transformer_onnx(model, paths["fp32"], seq=args.seq)
    graphopt.optimize(paths["fp32"], "fold,int8-dynamic", check=False).save(paths["int8-dynamic"])
    head = "+".join(n.name for n in onnx.load(paths["fp32"]).graph.node if n.op_type == "Gemm")  # pooler, classifier
    calib = {"input_ids": np.random.default_rng(2).integers(0, args.vocab, (args.calib, args.seq)).astype(np.int64)}
    for variant, options in INT4.items():
        result = graphopt.optimize(paths["fp32"], "fold,int4-weight" + options.format(head=head), check=False,
                                   calibration=calib if "gptq" in options else None)
        result.save(paths[variant])
    last = [n for n in onnx.load(paths["fp32"]).graph.node if n.op_type == "LayerNormalization"][-1].output[0]
    return paths, last


def accuracy(paths: dict[str, str], last: str, args) -> dict[str, dict[str, float]]:
    from graphopt.backends.onnxruntime import OnnxRuntimeBackend
    from graphopt.numeric import cosine_similarity
    from graphopt.report.metrics import expose

    backend = OnnxRuntimeBackend()
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.samples, args.seq)).astype(np.int64)
    outputs = {}
    for variant, path in paths.items():
        session = backend.session(expose(onnx.load(path), [last]))
        runs = [session.run(["logits", last], {"input_ids": ids[i:i + 8]}) for i in range(0, args.samples, 8)]
        outputs[variant] = [np.concatenate([r[k] for r in runs]) for k in (0, 1)]
    ref = outputs["fp32"]
    return {v: {"cosine": cosine_similarity(ref[0], o[0]), "cosine_hidden": cosine_similarity(ref[1], o[1])}
            for v, o in outputs.items()}


def latency(paths: dict[str, str], args) -> dict[str, dict[str, Any]]:
    """CPU milliseconds per run at batch 1, one intra-op thread, interleaved rounds."""
    from graphopt.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend()
    sessions = {v: backend.session(p, 1) for v, p in paths.items()}
    feeds = {"input_ids": np.random.default_rng(1).integers(0, args.vocab, (1, args.seq)).astype(np.int64)}
    runners = {v: (lambda s=s: s.run(None, feeds)) for v, s in sessions.items()}
    return latency_summary(interleaved_cpu_ms(runners, args.rounds, args.inner),
                           {"vs_fp32": "fp32", "vs_int8": "int8-dynamic"})


def markdown(rows: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"BERT-like {meta['model']}; {meta['machine']}; {meta['versions']}", "",
             f"Latency: batch 1, seq {meta['seq']}, 1 intra-op thread, CPU time per run, {meta['rounds']} "
             f"interleaved rounds x {meta['inner']} runs (median, IQR; ratios: median of per-round ratios). "
             f"Cosine: {meta['samples']} random sequences.", "",
             "| variant | size MB | x fp32 size | cosine logits | cosine hidden | CPU ms (median) | IQR ms "
             "| x fp32 | x int8-dynamic |",
             "|---|---|---|---|---|---|---|---|---|"]
    fp32 = rows["fp32"]["size_bytes"]
    for v, row in rows.items():
        lines.append(f"| {v} | {row['size_bytes'] / 1e6:.2f} | {row['size_bytes'] / fp32:.3f} | {row['cosine']:.4f} "
                     f"| {row['cosine_hidden']:.4f} | {row['median_ms']:.2f} | {row['iqr_ms']:.2f} "
                     f"| {row['vs_fp32']:.2f} | {row['vs_int8']:.2f} |")
    lines += ["", "**Bars** (issue 12): "]
    for v in ("int4-sym", "int4-asym", "int4-sym-emb", "int4-asym-emb", "int4-sym-gptq", "int4-asym-gptq",
              "int4-sym-emb-gptq", "int4-asym-emb-gptq"):
        row = rows[v]
        bar = SIZE_BAR["-emb" in v]
        size_ok = row["size_bytes"] / fp32 <= bar
        hidden_ok, logits_ok = row["cosine_hidden"] >= COSINE_BAR, row["cosine"] >= COSINE_BAR
        lines.append(f"- {v}: size {row['size_bytes'] / fp32:.3f}x <= {bar}: {'pass' if size_ok else 'FAIL'}; "
                     f"hidden-state cosine >= {COSINE_BAR}: {'pass' if hidden_ok else 'FAIL'}; "
                     f"logits cosine >= {COSINE_BAR}: {'pass' if logits_ok else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--calib", type=int, default=32, help="GPTQ's calibration sequences (another seed)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--workdir")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        print("exporting and quantizing", file=sys.stderr, flush=True)
        paths, last = make_variants(workdir, args)
        acc = accuracy(paths, last, args)
        print(f"timing {len(paths)} variants x {args.rounds} rounds", file=sys.stderr, flush=True)
        lat = latency(paths, args)
        rows = {v: {"size_bytes": os.path.getsize(p), **acc[v], **lat[v]} for v, p in paths.items()}
    meta = {"model": f"bert_like(vocab={args.vocab}, hidden={args.hidden}, layers={args.layers})", "seq": args.seq,
            "samples": args.samples, "rounds": args.rounds, "inner": args.inner, "machine": machine(),
            "versions": versions()}
    table = markdown(rows, meta)
    write_outputs(table, {"meta": meta, "rows": rows}, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

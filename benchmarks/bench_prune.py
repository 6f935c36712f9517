"""Side-by-side benchmark of graphopt's structured pruning (``prune-channels``) against Torch-Pruning, in one run.

    python benchmarks/bench_prune.py [--models resnet18_like,mobilenet_v2_like,resnet50_like,bert_like]
                                     [--coverage all|none|a,b] [--no-latency] [--ratio 0.5] [--repeat 15]
                                     [--iters 3] [--threads 0,1] [--no-spinning] [--calib-samples 32] [--quick]
                                     [--json out.json] [--markdown out.md] [--workdir DIR] [--fail-on-bar]

Every model is built fresh from ``graphopt.zoo`` with its fixed seed, once per pruner (the pruners get equal,
untouched copies). Three ways to prune each at ``--ratio`` (0.5):

* ``torch-pruning``: ``tp.pruner.BasePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
  pruning_ratio=0.5, global_pruning=False, ignored_layers=[classifier])`` then ``step()``
  (``tp.pruner.MagnitudePruner`` is an alias of ``BasePruner`` in Torch-Pruning 1.6). The classifier is the last
  Conv/Linear the forward pass runs. On the BERT-like encoder, attention follows Torch-Pruning's documented recipe
  for HF BERT: ``num_heads={q: heads, k: heads, v: heads}`` per layer, ``prune_head_dims=True,
  prune_num_heads=False``, and afterwards each attention module's ``heads`` / ``head_dim`` attributes are set from
  ``pruner.num_heads`` (the model reshapes with them);
* ``graphopt-onnx``: the model exported with BatchNorm kept (``graphopt.zoo.export_onnx(keep_bn=True)``; BERT:
  ``export_transformer_onnx(dynamic=False)``, fixed batch and sequence) and then
  ``graphopt.optimize(path, "fold,prune:ratio=0.5", check=False)``; the output is run on onnxruntime;
* ``graphopt-fx``: ``graphopt.optimize(module, "fold,prune:ratio=0.5", example_inputs=(x,), check=False)`` (the
  nn.Module through torch.fx); the resulting GraphModule is run.

MACs and parameters are counted the same way for all three, by graphopt's ``model_costs``
(:mod:`graphopt.report.cost`): on the FX graph of Torch-Pruning's pruned module and of graphopt's FX output, and on
graphopt's ONNX output (the same formulas, checked against thop / ``tp.utils.count_ops_and_params``). Ratios are
to the same model unpruned, counted the same way: Torch-Pruning's to the fresh module's FX graph; graphopt's to
graphopt's own ``fold`` output of the unpruned model on the same route (the same MACs; its parameters leave out
BatchNorm, which ``fold`` removes, so every parameter ratio measures pruning alone). The raw export's own count is
kept in the JSON (``raw_export``): ONNX shape inference leaves some of its dimensions unresolved (ShuffleNet's
``chunk``), which count as 1. ``tp.utils.count_ops_and_params`` on Torch-Pruning's model is printed beside as a
cross-check (it also counts BatchNorm, activations and pooling, and it misses attention's functional matmuls, so
its absolute numbers differ a little).

1. **The MACs bar** (``--models``: ResNet-18-, MobileNetV2-, ResNet-50-like at 1x3x224x224, BERT-like with hidden
   256, 4 layers, 4 heads, sequence 128): graphopt's MACs / Torch-Pruning's MACs within 0.95-1.05, on both routes.
2. **Coverage** (``--coverage``: every model of ``graphopt.zoo.PRUNE_ZOO`` at its own input shape, plus the
   BERT-like encoder, whose row is the bar's): did each pruner finish, does its pruned model run, with the
   original output shape, and its MACs ratio. A pruner that raises, or whose model does not run afterwards, is a
   recorded result (the error's first line), never a crash.
3. **The latency bar** (``--no-latency`` skips it): onnxruntime CPU fp32 latency of ResNet-18-like, batch 1,
   through graphopt's backend sessions (``OnnxRuntimeBackend().session(path, threads)``), of ``unpruned``
   (``fold``), ``prune`` (``fold,prune:ratio=0.5``), ``prune+int8`` (``fold,prune:ratio=0.5,int8``, calibrated
   on ``--calib-samples`` (32) fixed-seed random-normal inputs, as bench_int8.py calibrates), and for reference
   ``int8`` (``fold,int8``, unpruned) and ``torch-pruning`` (Torch-Pruning's pruned module exported the same
   way, then ``fold``). Timing reuses bench_int8.py's interleaved ABBA rounds (``--repeat`` rounds, each visiting
   every variant twice for 2 untimed and ``--iters`` timed runs); each ratio to ``unpruned`` is the median over
   rounds of the ratio within a round. Bars: prune <= 0.35x and prune+int8 <= 0.15x of unpruned, judged with the
   first ``--threads`` setting (0: onnxruntime's default, one intra-op thread per core, all cores). The default
   ``--threads 0,1`` times a second block with one thread as a control: on a 2-core machine that other
   processes also load, a 2-thread session stalls whenever one of its threads is descheduled, and the all-cores
   ratios scatter; the 1-thread ratios barely move. ``--no-spinning`` times sessions whose idle workers block
   rather than spin (``session.intra_op.allow_spinning=0``, otherwise the backend's options), which steadies the
   multi-thread ratios there.

``--quick`` is a smoke run (well under 2 minutes on 2 cores): 1x3x64x64 inputs, ResNet-18- and MobileNetV2-like
and a smaller BERT (hidden 128, 2 layers, sequence 32) for the bar, four coverage models, 3 timing rounds. Its
ratios are not the recorded ones. Needs ``pip install -e '.[torch,bench]'`` (Torch-Pruning is in ``bench``).
Exported models live in a temp dir (``--workdir DIR`` keeps them; never commit .onnx files).
The models and the three pruners are in ``_prune_models.py``, the Markdown in ``_prune_report.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
from _common import machine, versions, write_outputs
from _prune_models import Spec, failed, onnx_costs, prune_three, tp_prune
from _prune_report import markdown

BAR_MODELS = ("resnet18_like", "mobilenet_v2_like", "resnet50_like", "bert_like")
QUICK_BAR_MODELS = ("resnet18_like", "mobilenet_v2_like", "bert_like")
QUICK_COVERAGE = ("tiny_resnet", "shufflenet_v2_like", "squeezenet_like", "convnext_like")
IMAGE_SHAPE, QUICK_IMAGE_SHAPE = (1, 3, 224, 224), (1, 3, 64, 64)
BERT = {"hidden": 256, "layers": 4, "heads": 4, "seq": 128}
QUICK_BERT = {"hidden": 128, "layers": 2, "heads": 4, "seq": 32}
LATENCY_VARIANTS = ("unpruned", "prune", "prune+int8", "int8", "torch-pruning")
MACS_BAR = (0.95, 1.05)
LATENCY_BARS = {"prune": 0.35, "prune+int8": 0.15}


# -- verdicts -------------------------------------------------------------------------------------------------
def macs_verdict(res: dict[str, Any]) -> dict[str, Any]:
    tp_row = res["pruners"]["torch-pruning"]
    out: dict[str, Any] = {}
    for route in ("graphopt-onnx", "graphopt-fx"):
        g = res["pruners"][route]
        if "macs" in g and "macs" in tp_row and tp_row.get("shape_ok"):
            ratio = g["macs"] / tp_row["macs"]
            out[route] = {"ratio": ratio, "pass": MACS_BAR[0] <= ratio <= MACS_BAR[1] and bool(g.get("shape_ok"))}
        else:
            out[route] = {"pass": False, "error": g.get("error") or g.get("run_error") or tp_row.get("error")
                          or tp_row.get("run_error") or "not measured"}
    return out


# -- latency --------------------------------------------------------------------------------------------------
def make_session(backend, path: str, threads: int, spinning: bool):
    """graphopt's onnxruntime backend session; with ``spinning=False`` the same session options plus
    ``session.intra_op.allow_spinning=0`` (idle worker threads block instead of spinning)."""
    if spinning:
        return backend.session(path, threads)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def bench_latency(args, workdir: str, registry) -> dict[str, Any]:
    from bench_int8 import latency, round_ratios, time_interleaved

    import graphopt
    from graphopt.backends.onnxruntime import OnnxRuntimeBackend
    from graphopt.passes.base import PassContext

    spec = Spec("resnet18_like", args.image_shape)
    src = os.path.join(workdir, "latency.resnet18_like.onnx")
    spec.export(spec.build(), src)
    calib = np.random.default_rng(args.seed).standard_normal((args.calib_samples, *spec.shape[1:]))
    calib = calib.astype(np.float32)
    ratio = f"{args.ratio:g}"
    pipelines = {"unpruned": "fold", "prune": f"fold,prune:ratio={ratio}",
                 "prune+int8": f"fold,prune:ratio={ratio},int8", "int8": "fold,int8"}
    files = {v: os.path.join(workdir, f"latency.{v}.onnx") for v in LATENCY_VARIANTS}
    rows: dict[str, dict[str, Any]] = {}
    print(f"  latency: resnet18_like {spec.label}", file=sys.stderr, flush=True)
    for v in LATENCY_VARIANTS:
        row = rows[v] = {"variant": v}
        start = time.perf_counter()
        try:
            if v == "torch-pruning":
                module, x = spec.build(), spec.example()
                tp_prune(module, x, args.ratio)
                raw = os.path.join(workdir, "latency.torch-pruning.raw.onnx")
                spec.export(module, raw)
                graphopt.optimize(raw, "fold", registry=registry, check=False).save(files[v])
                row["how"] = "Torch-Pruning BasePruner(L1, 0.5, fc ignored) -> export_onnx(keep_bn=True) -> fold"
            else:
                ctx = PassContext(registry=registry, calibration={"input": calib} if "int8" in v else None)
                graphopt.optimize(src, pipelines[v], registry=registry, ctx=ctx, check=False).save(files[v])
                row["how"] = f'graphopt.optimize(path, "{pipelines[v]}", check=False)' + (
                    f" with {args.calib_samples} random-normal calibration samples" if "int8" in v else "")
            row["build_s"] = time.perf_counter() - start
            row["size_bytes"] = os.path.getsize(files[v])
            row["macs"] = onnx_costs(files[v]).macs
        except Exception as exc:
            failed(row, exc)
    ok = [v for v in LATENCY_VARIANTS if "error" not in rows[v]]
    result: dict[str, Any] = {"model": spec.name, "input": spec.label, "variants": rows, "timings": {}}
    if "unpruned" not in ok:
        return result
    backend = OnnxRuntimeBackend()
    feeds = {"input": spec.example().numpy()}
    for threads in args.threads:  # one interleaved block per thread setting, its sessions only
        print(f"    {threads or 'default'} intra-op threads:", file=sys.stderr, flush=True)
        sessions = {v: make_session(backend, files[v], threads, args.spinning) for v in ok}
        times = time_interleaved(sessions, backend, feeds, args.repeat, args.iters, seed=args.seed)
        del sessions
        block: dict[str, Any] = {"threads": threads, "variants": {}, "verdicts": {}}
        for v in ok:
            block["variants"][v] = {"latency": latency(times[v], threads),
                                    "vs_unpruned": round_ratios(times[v], times["unpruned"])}
        for v, bar in LATENCY_BARS.items():
            if v in ok:
                r = block["variants"][v]["vs_unpruned"]["median"]
                block["verdicts"][v] = {"ratio": r, "bar": bar, "pass": r <= bar}
            else:
                block["verdicts"][v] = {"bar": bar, "pass": False, "error": rows[v].get("error")}
        result["timings"][str(threads)] = block
    return result


def environment(args) -> dict[str, Any]:
    import importlib.metadata as md

    return {"ratio": args.ratio, "repeat": args.repeat, "iters": args.iters, "threads": args.threads,
            "calib_samples": args.calib_samples, "seed": args.seed, "quick": args.quick, "spinning": args.spinning,
            "image_shape": list(args.image_shape), "bert": args.bert, "tp_version": md.version("torch-pruning"),
            "machine": machine(), "versions": versions(("torch-pruning",)), "macs_bar": MACS_BAR,
            "latency_bars": LATENCY_BARS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help=f"the MACs bar's models, comma-separated, from {','.join(BAR_MODELS)} "
                                     "(default: all; --quick: resnet18_like,mobilenet_v2_like,bert_like; "
                                     "'none': skip the MACs bar)")
    ap.add_argument("--coverage", help="coverage models: 'all' (every PRUNE_ZOO model + bert_like; the default), "
                                       "'none', or comma-separated names")
    ap.add_argument("--no-latency", dest="latency", action="store_false", help="skip the latency bar")
    ap.add_argument("--ratio", type=float, default=0.5, help="pruning ratio for every pruner (default 0.5)")
    ap.add_argument("--repeat", type=int, help="interleaved timing rounds (default 15; --quick: 3)")
    ap.add_argument("--iters", type=int, default=3, help="timed runs per variant per visit (default 3)")
    ap.add_argument("--threads", default="0,1",
                    help="onnxruntime intra-op thread settings, comma-separated, each timed in its own block; the "
                         "first is judged (default 0,1: onnxruntime's default of one per core, then 1 as a "
                         "control that a busy machine disturbs less)")
    ap.add_argument("--no-spinning", dest="spinning", action="store_false",
                    help="time sessions whose idle intra-op workers block instead of spinning (onnxruntime's "
                         "session.intra_op.allow_spinning=0): steadier multi-thread ratios on a busy machine")
    ap.add_argument("--calib-samples", type=int, default=32, help="random-normal int8 calibration samples (32)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration data and the timing order")
    ap.add_argument("--quick", action="store_true", help="smoke run: 64x64 inputs, fewer and smaller models")
    ap.add_argument("--json", metavar="PATH", help="write every measurement and verdict as JSON")
    ap.add_argument("--markdown", metavar="PATH", help="write the tables and verdicts as Markdown")
    ap.add_argument("--workdir", metavar="DIR", help="keep the exported and pruned models here (default: temp dir)")
    ap.add_argument("--fail-on-bar", action="store_true", help="exit 1 when graphopt loses a bar")
    args = ap.parse_args(argv)

    from graphopt import zoo

    prune_zoo = dict(getattr(zoo, "PRUNE_ZOO", {}))
    args.image_shape = QUICK_IMAGE_SHAPE if args.quick else IMAGE_SHAPE
    args.bert = QUICK_BERT if args.quick else BERT
    args.repeat = args.repeat if args.repeat is not None else (3 if args.quick else 15)
    bar_models = [m.strip() for m in (args.models or ",".join(QUICK_BAR_MODELS if args.quick else BAR_MODELS))
                  .split(",") if m.strip() and args.models != "none"]
    for m in bar_models:
        if m not in BAR_MODELS:
            ap.error(f"unknown model '{m}' (choose from {', '.join(BAR_MODELS)})")
    known = [*prune_zoo, "bert_like"]
    if args.coverage in (None, "all"):
        cover = [m for m in QUICK_COVERAGE if m in prune_zoo] + ["bert_like"] if args.quick else known
    elif args.coverage == "none":
        cover = []
    else:
        cover = [m.strip() for m in args.coverage.split(",") if m.strip()]
        for m in cover:
            if m not in known:
                ap.error(f"unknown coverage model '{m}' (choose from {', '.join(known)})")
    if not prune_zoo:
        print("graphopt.zoo.PRUNE_ZOO is not there: coverage runs on bert_like only", file=sys.stderr)
    try:
        args.threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
    except ValueError:
        ap.error("--threads takes comma-separated integers")
    if not args.threads or any(t < 0 for t in args.threads):
        ap.error("--threads needs at least one setting, each 0 or more")
    for flag in ("repeat", "iters", "calib_samples"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0.0 < args.ratio < 1.0:
        ap.error("--ratio must be in (0, 1)")

    import onnxruntime
    import torch

    from graphopt.plugins import load_registry

    torch.set_num_threads(os.cpu_count() or 1)
    onnxruntime.set_default_logger_severity(3)  # the sessions graphopt's own checks open: no optimizer notices
    registry = load_registry()
    meta = environment(args)
    started = time.perf_counter()

    def spec_of(name: str, shape=None) -> Spec:
        if name == "bert_like":
            return Spec(name, bert=args.bert)
        return Spec(name, shape or args.image_shape)

    bar: list[dict[str, Any]] = []
    coverage: list[dict[str, Any]] = []
    lat = None
    with tempfile.TemporaryDirectory(prefix="bench_prune_") as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        print("MACs bar:", file=sys.stderr, flush=True)
        for m in bar_models:
            sub = os.path.join(workdir, "bar")
            os.makedirs(sub, exist_ok=True)
            res = prune_three(spec_of(m), args.ratio, sub, registry)
            res["verdict"] = macs_verdict(res)
            bar.append(res)
        print("coverage:", file=sys.stderr, flush=True)
        for m in cover:
            reuse = next((r for r in bar if r["model"] == m == "bert_like"), None)
            if reuse is not None:  # the same model, input and settings as the bar's row
                coverage.append(reuse)
                continue
            sub = os.path.join(workdir, "coverage")
            os.makedirs(sub, exist_ok=True)
            coverage.append(prune_three(spec_of(m, prune_zoo.get(m)), args.ratio, sub, registry))
        if args.latency:
            print("latency:", file=sys.stderr, flush=True)
            lat = bench_latency(args, workdir, registry)
    meta["wall_s"] = time.perf_counter() - started

    data = {"meta": meta, "bar": bar, "coverage": coverage, "latency": lat}
    write_outputs(markdown(bar, coverage, lat, meta), data, args.markdown, args.json)
    print(f"(wall time {meta['wall_s']:.0f} s)", file=sys.stderr)
    passed = all(v["pass"] for r in bar for v in r["verdict"].values())
    if lat:
        judged = next(iter(lat["timings"].values()), {"verdicts": {"latency": {"pass": False}}})
        passed = passed and all(v["pass"] for v in judged["verdicts"].values())
    if args.fail_on_bar and not passed:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

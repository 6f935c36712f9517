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
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any

import numpy as np
from _common import machine, versions, write_outputs

BAR_MODELS = ("resnet18_like", "mobilenet_v2_like", "resnet50_like", "bert_like")
QUICK_BAR_MODELS = ("resnet18_like", "mobilenet_v2_like", "bert_like")
QUICK_COVERAGE = ("tiny_resnet", "shufflenet_v2_like", "squeezenet_like", "convnext_like")
IMAGE_SHAPE, QUICK_IMAGE_SHAPE = (1, 3, 224, 224), (1, 3, 64, 64)
BERT = {"hidden": 256, "layers": 4, "heads": 4, "seq": 128}
QUICK_BERT = {"hidden": 128, "layers": 2, "heads": 4, "seq": 32}
PRUNERS = ("torch-pruning", "graphopt-onnx", "graphopt-fx")
LATENCY_VARIANTS = ("unpruned", "prune", "prune+int8", "int8", "torch-pruning")
MACS_BAR = (0.95, 1.05)
LATENCY_BARS = {"prune": 0.35, "prune+int8": 0.15}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:200]


def _failed(row: dict[str, Any], exc: BaseException, key: str = "error") -> None:
    row[key] = _first_line(exc)
    row[f"{key}_traceback"] = traceback.format_exc()
    print(f"      {key}: {row[key]}", file=sys.stderr, flush=True)


# -- the models -----------------------------------------------------------------------------------------------
class Spec:
    """A zoo model to build fresh: its name, builder, example input and how it is exported."""

    def __init__(self, name: str, shape: tuple[int, ...] | None = None, bert: dict[str, int] | None = None):
        self.name, self.shape, self.bert = name, shape, bert

    @property
    def label(self) -> str:
        if self.bert:
            b = self.bert
            return f"ids 1x{b['seq']} (hidden {b['hidden']}, {b['layers']} layers, {b['heads']} heads)"
        return "x".join(map(str, self.shape))

    def build(self):
        from graphopt import zoo

        if self.bert:
            b = self.bert
            return zoo.bert_like(hidden=b["hidden"], layers=b["layers"], heads=b["heads"], seq=b["seq"])
        return getattr(zoo, self.name)()

    def example(self):
        import torch

        if self.bert:
            vocab = 1000  # bert_like's default vocabulary
            return torch.randint(0, vocab, (1, self.bert["seq"]), generator=torch.Generator().manual_seed(0))
        return torch.from_numpy(np.random.default_rng(0).standard_normal(self.shape).astype(np.float32))

    def export(self, module, path: str) -> str:
        from graphopt import zoo

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.bert:
                return zoo.export_transformer_onnx(module, path, seq=self.bert["seq"], dynamic=False)
            return zoo.export_onnx(module, path, self.shape, keep_bn=True)

    def input_name(self) -> str:
        return "input_ids" if self.bert else "input"


def classifier_of(module, x):
    """The last Conv/Linear the forward pass runs (what Torch-Pruning must leave alone), and its name."""
    import torch
    from torch import nn

    order: list = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in module.modules()
             if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in hooks:
            h.remove()
    names = {m: n for n, m in module.named_modules()}
    return order[-1], names[order[-1]]


def fx_costs(module, x):
    from graphopt.ir.fx_graph import FxGraph
    from graphopt.report.cost import model_costs

    return model_costs(FxGraph.from_module(module, (x,)))


def onnx_costs(path: str):
    from graphopt.ir import OnnxGraph
    from graphopt.report.cost import model_costs

    return model_costs(OnnxGraph.load(path))


def tp_count(module, x) -> tuple[float, float]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(module, x)
    return float(macs), float(params)


# -- the three pruners ----------------------------------------------------------------------------------------
def tp_prune(module, x, ratio: float) -> dict[str, Any]:
    """Torch-Pruning's MagnitudePruner (L1) on ``module`` in place; what it was given and what it said."""
    import torch_pruning as tp

    from graphopt.zoo.transformer import SelfAttention

    classifier, cls_name = classifier_of(module, x)
    attention = [m for m in module.modules() if isinstance(m, SelfAttention)]
    num_heads = {lin: att.heads for att in attention for lin in (att.q, att.k, att.v)}
    info: dict[str, Any] = {"ignored_layers": [cls_name]}
    kwargs: dict[str, Any] = {}
    if num_heads:
        kwargs.update(num_heads=num_heads, prune_head_dims=True, prune_num_heads=False)
        info["num_heads"] = "{q,k,v: heads} per layer, prune_head_dims=True, prune_num_heads=False"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = tp.pruner.BasePruner(module, x, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, global_pruning=False, ignored_layers=[classifier],
                                      **kwargs)
        pruner.step()
    for att in attention:  # the model reshapes with these: Torch-Pruning's BERT recipe updates them by hand
        att.heads = pruner.num_heads[att.q]
        att.head_dim = att.q.out_features // att.heads
    if attention:
        info["heads_after"] = [att.heads for att in attention]
        info["head_dim_after"] = [att.head_dim for att in attention]
    messages = list(dict.fromkeys(str(w.message).splitlines()[0][:160] for w in caught))
    if messages:
        info["warnings"] = messages[:5]
    return info


def graphopt_stats(result) -> dict[str, Any]:
    record = next((r for r in result.report.records if r.name == "prune-channels"), None)
    return {"stats": dict(record.stats) if record else {}, "notes": list(record.notes) if record else []}


def prune_three(spec: Spec, ratio: float, workdir: str, registry) -> dict[str, Any]:
    """Prune ``spec``'s model three ways; per pruner: finished, runs, output shape kept, MACs and parameters."""
    import torch

    import graphopt
    from graphopt.backends.onnxruntime import OnnxRuntimeBackend

    pipeline = f"fold,prune:ratio={ratio:g}"
    x = spec.example()
    ref_module = spec.build()
    with torch.no_grad():
        ref_shape = tuple(ref_module(x).shape)
    base = fx_costs(ref_module, x)
    res: dict[str, Any] = {"model": spec.name, "input": spec.label, "output_shape": list(ref_shape),
                           "base": {"macs": base.macs, "params": base.params, "tp_count": tp_count(ref_module, x)},
                           "pruners": {}}
    print(f"  {spec.name} ({spec.label}): {base.macs / 1e6:.1f} M MACs, {base.params / 1e6:.2f} M params",
          file=sys.stderr, flush=True)
    backend = OnnxRuntimeBackend()

    def finish(row, run, costs, base_macs, base_params):
        try:
            out_shape = tuple(run())
            row["runs"] = True
            row["out_shape"] = list(out_shape)
            row["shape_ok"] = out_shape == ref_shape
        except Exception as exc:
            row["runs"] = False
            _failed(row, exc, "run_error")
            return
        c = costs()
        row.update(macs=c.macs, params=c.params, macs_ratio=c.macs / base_macs, params_ratio=c.params / base_params)

    # Torch-Pruning
    row: dict[str, Any] = {"how": "BasePruner(MagnitudeImportance(p=1), global_pruning=False)"}
    res["pruners"]["torch-pruning"] = row
    tp_module = spec.build()
    start = time.perf_counter()
    try:
        row["torch_pruning"] = tp_prune(tp_module, x, ratio)
        row["prune_s"] = time.perf_counter() - start
        row["ok"] = True
    except Exception as exc:
        row["ok"] = False
        _failed(row, exc)
    if row["ok"]:
        def run_tp():
            with torch.no_grad():
                return tp_module(x).shape
        finish(row, run_tp, lambda: fx_costs(tp_module, x), base.macs, base.params)
        if row.get("runs"):
            try:
                row["tp_count"] = tp_count(tp_module, x)
            except Exception as exc:
                _failed(row, exc, "tp_count_error")

    # graphopt on the exported ONNX file
    row = {"how": f'graphopt.optimize(path, "{pipeline}", check=False)'}
    res["pruners"]["graphopt-onnx"] = row
    src = os.path.join(workdir, f"{spec.name}.onnx")
    out = os.path.join(workdir, f"{spec.name}.pruned.onnx")
    try:
        spec.export(spec.build(), src)
        raw = onnx_costs(src)  # the raw export: shape inference may leave dimensions unresolved (counted as 1)
        row["raw_export"] = {"macs": raw.macs, "params": raw.params}
        folded = os.path.join(workdir, f"{spec.name}.fold.onnx")
        graphopt.optimize(src, "fold", registry=registry, check=False).save(folded)
        onnx_base = onnx_costs(folded)
        row["base"] = {"macs": onnx_base.macs, "params": onnx_base.params, "what": "fold output"}
        start = time.perf_counter()
        result = graphopt.optimize(src, pipeline, registry=registry, check=False)
        result.save(out)
        row["prune_s"] = time.perf_counter() - start
        row["graphopt"] = graphopt_stats(result)
        row["ok"] = True
    except Exception as exc:
        row["ok"] = False
        _failed(row, exc)
    if row["ok"]:
        def run_onnx():
            session = backend.session(out, 1)
            return backend.run(session, {spec.input_name(): x.numpy()})[0].shape
        finish(row, run_onnx, lambda: onnx_costs(out), row["base"]["macs"], row["base"]["params"])

    # graphopt on the nn.Module (FX)
    row = {"how": f'graphopt.optimize(module, "{pipeline}", example_inputs=(x,), check=False)'}
    res["pruners"]["graphopt-fx"] = row
    try:
        fx_base = fx_costs(graphopt.optimize(spec.build(), "fold", example_inputs=(x,), registry=registry,
                                             check=False).model, x)
        row["base"] = {"macs": fx_base.macs, "params": fx_base.params, "what": "fold output"}
        start = time.perf_counter()
        result = graphopt.optimize(spec.build(), pipeline, example_inputs=(x,), registry=registry, check=False)
        gm = result.model
        row["prune_s"] = time.perf_counter() - start
        row["graphopt"] = graphopt_stats(result)
        row["ok"] = True
    except Exception as exc:
        row["ok"] = False
        _failed(row, exc)
    if row["ok"]:
        def run_fx():
            with torch.no_grad():
                return gm(x).shape
        finish(row, run_fx, lambda: fx_costs(gm, x), row["base"]["macs"], row["base"]["params"])

    for name, r in res["pruners"].items():
        if "macs_ratio" in r:
            print(f"    {name}: MACs x{r['macs_ratio']:.3f}, params x{r['params_ratio']:.3f}, "
                  f"{r.get('prune_s', 0):.1f} s", file=sys.stderr, flush=True)
    return res


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
            _failed(row, exc)
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


# -- reporting ------------------------------------------------------------------------------------------------
def _mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _cell(row: dict[str, Any]) -> str:
    """Coverage cell: what happened to one pruner on one model."""
    if not row.get("ok"):
        return f"fails: {row.get('error', '')[:80]}".replace("|", "/")
    if not row.get("runs"):
        return f"pruned model does not run: {row.get('run_error', '')[:70]}".replace("|", "/")
    if not row.get("shape_ok"):
        return f"runs, output shape {tuple(row['out_shape'])} changed"
    return f"ok, MACs x{row['macs_ratio']:.3f}"


def _kept_whole(row: dict[str, Any]) -> str:
    """graphopt's 'N channel group(s) kept whole: reason' notes, the classifier's output left out: how many and
    the first reason."""
    count, reasons = 0, []
    for note in row.get("graphopt", {}).get("notes", []):
        head, sep, reason = note.partition(" channel group(s) kept whole: ")
        if not sep or reason.startswith("graph output"):
            continue
        count += int(head) if head.isdigit() else 1
        reasons.append(reason)
    return f"{count}, e.g. {reasons[0]}" if reasons else ""


def _ratio(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.3f}" if key in row else ""


def markdown(bar: list[dict[str, Any]], coverage: list[dict[str, Any]], lat: dict[str, Any] | None,
             meta: dict[str, Any]) -> str:
    ratio = meta["ratio"]
    lines = [f"### Structured pruning at ratio {ratio:g}: graphopt vs Torch-Pruning {meta['tp_version']} "
             "(MACs and parameters by graphopt's model_costs for every model)", ""]
    if bar:
        lines += [
            "| model | input | pruner | MACs | x MACs | params | x params | graphopt / TP MACs | TP's own count "
            "(MACs, x) | prune s |",
            "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
        ]
        for res in bar:
            base = res["base"]
            lines.append(f"| {res['model']} | {res['input']} | unpruned | {base['macs'] / 1e6:,.1f} M | 1 | "
                         f"{base['params'] / 1e6:.3f} M | 1 | | {base['tp_count'][0] / 1e6:,.1f} M | |")
            for name, row in res["pruners"].items():
                if "macs" not in row:
                    lines.append(f"| {res['model']} | | {name} | {_cell(row)} | | | | | | |")
                    continue
                v = res["verdict"].get(name, {})
                vs = f"{v['ratio']:.3f}" if "ratio" in v else ""
                own = ""
                if "tp_count" in row:
                    own = f"{row['tp_count'][0] / 1e6:,.1f} M, x{row['tp_count'][0] / base['tp_count'][0]:.3f}"
                lines.append(f"| {res['model']} | | {name} | {row['macs'] / 1e6:,.1f} M | {_ratio(row, 'macs_ratio')} "
                             f"| {row['params'] / 1e6:.3f} M | {_ratio(row, 'params_ratio')} | {vs} | {own} "
                             f"| {row.get('prune_s', 0):.1f} |")
        lines += ["", f"**MACs bar**: graphopt's MACs / Torch-Pruning's within {MACS_BAR[0]}-{MACS_BAR[1]}, "
                      "pruned model runs with the original output shape:", ""]
        for res in bar:
            parts = []
            for route, v in res["verdict"].items():
                parts.append(f"{route} {v['ratio']:.3f}: {_mark(v['pass'])}" if "ratio" in v
                             else f"{route}: FAIL ({v.get('error')})")
            lines.append(f"- {res['model']}: " + "; ".join(parts))
        lines.append("")
    if coverage:
        lines += ["#### Coverage: every PRUNE_ZOO model and the BERT-like encoder", "",
                  "| model | input | Torch-Pruning | graphopt ONNX | graphopt FX "
                  "| channel groups graphopt kept whole (besides the output's) |",
                  "|---|---|---|---|---|---|"]
        for res in coverage:
            p = res["pruners"]
            notes = _kept_whole(p["graphopt-onnx"])
            fx_notes = _kept_whole(p["graphopt-fx"])
            if fx_notes != notes:
                notes = "; ".join(f"{route}: {n}" for route, n in (("ONNX", notes), ("FX", fx_notes)) if n)
            lines.append(f"| {res['model']} | {res['input']} | {_cell(p['torch-pruning'])} | "
                         f"{_cell(p['graphopt-onnx'])} | {_cell(p['graphopt-fx'])} | {notes[:240].replace('|', '/')} |")
        ok = {name: sum(1 for r in coverage if r["pruners"][name].get("shape_ok") and r["pruners"][name].get("ok"))
              for name in PRUNERS}
        lines += ["", "Pruned and running with the original output shape: " + ", ".join(
            f"{name} {n}/{len(coverage)}" for name, n in ok.items()) + ".", ""]
    if lat:
        judged = True
        for block in lat["timings"].values():
            threads = block["threads"]
            lines += [f"#### onnxruntime fp32 latency, {lat['model']} {lat['input']}, batch 1, "
                      f"{threads or 'default (one per core)'} intra-op thread(s), {meta['repeat']} interleaved "
                      f"ABBA rounds x 2 x {meta['iters']} runs" + ("" if meta["spinning"] else ", worker spinning off")
                      + ("" if judged else " (control, not judged)"), "",
                      "| variant | median ms | p90 ms | x unpruned (per-round IQR) | MACs | size MB | how |",
                      "|---|---:|---:|---:|---:|---:|---|"]
            for v, row in lat["variants"].items():
                t = block["variants"].get(v)
                if t is None:
                    lines.append(f"| {v} | {_cell(row) if 'error' in row else 'not timed'} | | | | | |")
                    continue
                r, la = t["vs_unpruned"], t["latency"]
                lines.append(f"| {v} | {la['p50_ms']:.2f} | {la['p90_ms']:.2f} | {r['median']:.3f} "
                             f"({r['q25']:.3f}-{r['q75']:.3f}) | {row['macs'] / 1e6:,.1f} M | "
                             f"{row['size_bytes'] / 1e6:.1f} | {row['how']} |")
            lines += ["", ("**Latency bars**: " if judged else "Same ratios with this thread setting: ") + "; ".join(
                f"{v} / unpruned {e['ratio']:.3f} <= {e['bar']}: {_mark(e['pass'])}" if "ratio" in e
                else f"{v}: FAIL ({e.get('error')})" for v, e in block["verdicts"].items()), ""]
            judged = False
    lines += [
        "MACs: graphopt's `model_costs` (Conv/Linear/MatMul output elements x reduction size) on the FX graph of "
        "the pruned nn.Module (Torch-Pruning, graphopt-fx) or the pruned ONNX file (graphopt-onnx); `x` columns are "
        "ratios to the same model unpruned, counted the same way: for Torch-Pruning the unpruned module (the "
        "`unpruned` row), for graphopt its own `fold` output of the unpruned model on the same route (the same "
        "MACs; parameters without BatchNorm, which `fold` removes, so both parameter ratios measure pruning "
        "alone). TP's own count is `tp.utils.count_ops_and_params` on Torch-Pruning's "
        "model (it also counts BatchNorm, activations and pooling, and misses matmuls called as functions, such as "
        "attention's Q.K^T and P.V: hence lower on BERT).",
        "",
        f"Machine: {meta['machine']}; {meta['versions']}.",
    ]
    return "\n".join(lines) + "\n"


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

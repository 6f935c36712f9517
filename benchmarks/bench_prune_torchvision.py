"""prune-channels on sixteen torchvision classification architectures, as torch.onnx exports them.

    python benchmarks/bench_prune_torchvision.py [--models resnet18,swin_t] [--extra] [--exporters torchscript,dynamo]
                                                 [--ratios 0.5,0.3] [--fx] [--opset 18] [--workdir DIR]
                                                 [--json out.json] [--markdown out.md]

Needs torchvision, which is not a dependency of graphopt (it comes with its own torch build): the script says so
and exits 0 when it cannot import it. Every model is built with random weights (``weights=None``, seed 0; nothing
is downloaded), batch 1, at the smallest input its architecture takes (:data:`MODELS`), and exported with
``torch.onnx.export`` twice: ``dynamo=False`` (TorchScript) and the default dynamo exporter, at ``--opset``.
Then, per ratio (``--ratios``, default 0.5 and 0.3), the same pipeline as ``graphopt run m.onnx --passes
fold,prune:ratio=R``: ``graphopt.optimize(path, "fold,prune:ratio=R", check=False)`` (the numeric check
measures pruning's error but cannot fail it: pruning is not exact). The pruned model is run on onnxruntime and
must keep the original's output shape. ``--fx`` also prunes the nn.Module itself,
``graphopt.optimize(module, "prune:ratio=R", example_inputs=(x,))``, where torch.fx or torch.export captures it.

Per row: exporter (``ts`` / ``dynamo`` / ``fx``), params and MACs before -> after (graphopt's ``model_costs``;
before is the ``fold`` output, so BatchNorm folded away does not count as pruning), channel groups pruned / kept
whole with the most common reasons, the pass's wall time, and OK or the failure's first line. ``internal: ...``
reasons count groups the engine's last line of defence kept whole after an error inside graphopt (a bug to
report). Exported models live in a temp dir (``--workdir DIR`` keeps them; never commit .onnx files).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from typing import Any

import numpy as np
from _common import machine, versions, write_outputs

# name -> (constructor keyword arguments, input height/width): the smallest input each architecture takes
MODELS: dict[str, tuple[dict[str, Any], int]] = {
    "resnet18": ({}, 64), "resnet50": ({}, 64), "resnext50_32x4d": ({}, 64), "mobilenet_v2": ({}, 64),
    "mobilenet_v3_small": ({}, 64), "efficientnet_b0": ({}, 64), "mnasnet0_5": ({}, 64),
    "regnet_y_400mf": ({}, 64), "densenet121": ({}, 64), "shufflenet_v2_x1_0": ({}, 64),
    "squeezenet1_1": ({}, 64), "googlenet": ({"aux_logits": False, "init_weights": True}, 64),
    "convnext_tiny": ({}, 64), "swin_t": ({}, 224), "vit_b_16": ({"image_size": 64}, 64), "maxvit_t": ({}, 224),
}
EXTRA: dict[str, tuple[dict[str, Any], int]] = {  # --extra: the families' alternatives
    "wide_resnet50_2": ({}, 64), "regnet_x_400mf": ({}, 64), "vgg11_bn": ({}, 224), "alexnet": ({}, 224),
    "inception_v3": ({"aux_logits": False, "init_weights": True}, 96),
}
EXPORTERS = ("torchscript", "dynamo")
SHORT = {"torchscript": "ts", "dynamo": "dynamo", "fx": "fx"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:160]


def build(name: str):
    import torch
    import torchvision

    kwargs, size = {**MODELS, **EXTRA}[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32))
    return model, x


def export(model, x, path: str, exporter: str, opset: int) -> None:
    import torch

    kwargs: dict[str, Any] = dict(input_names=["input"], output_names=["output"], opset_version=opset)
    if exporter == "dynamo":
        kwargs.update(dynamo=True, verbose=False)
    else:
        kwargs["dynamo"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, **kwargs)


def _costs(graph) -> tuple[int, int]:
    from graphopt.report.cost import model_costs

    c = model_costs(graph)
    return c.params, c.macs


def _groups(rows: list[dict]) -> tuple[int, int, Counter]:
    pruned = sum(1 for r in rows if r["pruned_classes"])
    kept = Counter(r["blocked"] for r in rows if r["blocked"])
    return pruned, sum(kept.values()), kept


def prune_onnx(path: str, ratio: float, x) -> dict[str, Any]:
    import graphopt
    from graphopt.passes.base import PassContext

    row: dict[str, Any] = {}
    folded = graphopt.optimize(path, "fold", check=False)
    row["params_before"], row["macs_before"] = _costs(folded.graph)
    ctx = PassContext()
    start = time.perf_counter()
    result = graphopt.optimize(folded.model, f"prune:ratio={ratio}", check=False, ctx=ctx)
    row["seconds"] = time.perf_counter() - start
    row["params_after"], row["macs_after"] = _costs(result.graph)
    row["pruned_groups"], row["kept_groups"], row["kept_why"] = _groups(ctx.state.get("prune", []))
    want = folded.graph.run({"input": x.numpy()})[0]
    got = result.graph.run({"input": x.numpy()})[0]
    if got.shape != want.shape:
        raise AssertionError(f"output shape {want.shape} -> {got.shape}")
    return row


def prune_fx(model, x, ratio: float) -> dict[str, Any]:
    import torch

    import graphopt
    from graphopt.ir.fx_graph import FxGraph
    from graphopt.passes.base import PassContext

    row: dict[str, Any] = {}
    graph = FxGraph.from_module(model, (x,))
    row["capture"] = graph.captured_with
    row["params_before"], row["macs_before"] = _costs(graph)
    ctx = PassContext()
    start = time.perf_counter()
    result = graphopt.optimize(graph, f"prune:ratio={ratio}", check=False, ctx=ctx)
    row["seconds"] = time.perf_counter() - start
    row["params_after"], row["macs_after"] = _costs(result.graph)
    row["pruned_groups"], row["kept_groups"], row["kept_why"] = _groups(ctx.state.get("prune", []))
    with torch.no_grad():
        want, got = model(x), result.model(x)
    if tuple(got.shape) != tuple(want.shape):
        raise AssertionError(f"output shape {tuple(want.shape)} -> {tuple(got.shape)}")
    return row


def _attempt(row: dict[str, Any], fn, *args) -> None:
    try:
        row.update(fn(*args))
        row["status"] = "OK"
    except Exception as exc:  # a recorded result, never a crash: the point of this benchmark
        row["status"] = f"failed: {_first_line(exc)}"
        row["traceback"] = traceback.format_exc()
        print(row["traceback"], file=sys.stderr, flush=True)


def _m(v: int) -> str:
    return f"{v / 1e6:.2f}M"


def _fmt(row: dict[str, Any]) -> list[str]:
    sizes = ("", "")
    if "params_after" in row:
        sizes = (f"{_m(row['params_before'])} -> {_m(row['params_after'])}",
                 f"{_m(row['macs_before'])} -> {_m(row['macs_after'])}")
    kept = row.get("kept_why") or Counter()
    why = "; ".join(f"{n}x {reason[:70]}" for reason, n in kept.most_common(2))
    groups = f"{row.get('pruned_groups', '')}/{row.get('kept_groups', '')}" if "pruned_groups" in row else ""
    seconds = f"{row['seconds']:.1f}" if "seconds" in row else ""
    return [row["model"], row["exporter"], str(row["ratio"]), *sizes, groups, why, seconds, row["status"][:90]]


def table(rows: list[dict[str, Any]]) -> str:
    head = ["model", "exporter", "ratio", "params", "MACs", "groups pruned/kept", "kept whole because", "time s",
            "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in _fmt(r)) + " |" for r in rows]
    ok = sum(r["status"] == "OK" for r in rows)
    return "\n".join(lines) + f"\n\n{ok} of {len(rows)} runs OK\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--extra", action="store_true", help="also the families' alternatives (EXTRA)")
    p.add_argument("--exporters", default=",".join(EXPORTERS))
    p.add_argument("--ratios", default="0.5,0.3")
    p.add_argument("--fx", action="store_true", help="also prune the nn.Module through torch.fx / torch.export")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--workdir")
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        print("bench_prune_torchvision: skipped, torchvision is not importable (it is no graphopt dependency: "
              "pip install torchvision, with the torch build it needs)")
        return 0
    names = args.models.split(",") + (list(EXTRA) if args.extra else [])
    unknown = [n for n in names if n not in MODELS and n not in EXTRA]
    if unknown:
        p.error(f"unknown models {unknown} (known: {', '.join([*MODELS, *EXTRA])})")
    bad = [e for e in args.exporters.split(",") if e and e not in EXPORTERS]
    if bad:
        p.error(f"unknown exporters {bad} (known: {', '.join(EXPORTERS)}; '' for none)")
    ratios = [float(r) for r in args.ratios.split(",")]
    workdir = args.workdir or tempfile.mkdtemp(prefix="graphopt-tv-")
    os.makedirs(workdir, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in names:
        model, x = build(name)
        for exporter in [e for e in args.exporters.split(",") if e]:
            path = os.path.join(workdir, f"{name}.{SHORT[exporter]}.onnx")
            try:
                start = time.perf_counter()
                if not os.path.exists(path):
                    export(model, x, path, exporter, args.opset)
                print(f"{name} {exporter}: exported in {time.perf_counter() - start:.1f} s", flush=True)
            except Exception as exc:
                rows.append({"model": name, "exporter": SHORT[exporter], "ratio": "-",
                             "status": f"export failed: {_first_line(exc)}"})
                continue
            for ratio in ratios:
                row = {"model": name, "exporter": SHORT[exporter], "ratio": ratio}
                _attempt(row, prune_onnx, path, ratio, x)
                print("  " + " | ".join(_fmt(row)), flush=True)
                rows.append(row)
        if args.fx:
            for ratio in ratios:
                row = {"model": name, "exporter": "fx", "ratio": ratio}
                _attempt(row, prune_fx, model, x, ratio)
                if row.get("capture"):
                    row["exporter"] = f"fx ({row['capture']})"
                print("  " + " | ".join(_fmt(row)), flush=True)
                rows.append(row)
    text = (f"prune-channels on torchvision models (random weights), opset {args.opset}\n{machine()}\n"
            f"{versions(('torchvision',))}\n\n{table(rows)}")
    data = {"machine": machine(), "versions": versions(("torchvision",)), "opset": args.opset,
            "rows": [{k: (dict(v) if isinstance(v, Counter) else v) for k, v in r.items()} for r in rows]}
    write_outputs(text, data, args.markdown, args.json)
    return 0 if all(r["status"] == "OK" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

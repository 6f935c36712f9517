"""bench_prune.py's models and pruners: the zoo model to build (:class:`Spec`), the three ways to prune it
(Torch-Pruning, graphopt on the exported ONNX file, graphopt on the nn.Module through FX) and the MACs / parameter
counts that compare them. What is measured, and how, is bench_prune.py's docstring."""

from __future__ import annotations

import os
import sys
import time
import traceback
import warnings
from typing import Any

import numpy as np

PRUNERS = ("torch-pruning", "graphopt-onnx", "graphopt-fx")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:200]


def failed(row: dict[str, Any], exc: BaseException, key: str = "error") -> None:
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
            failed(row, exc, "run_error")
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
        failed(row, exc)
    if row["ok"]:
        def run_tp():
            with torch.no_grad():
                return tp_module(x).shape
        finish(row, run_tp, lambda: fx_costs(tp_module, x), base.macs, base.params)
        if row.get("runs"):
            try:
                row["tp_count"] = tp_count(tp_module, x)
            except Exception as exc:
                failed(row, exc, "tp_count_error")

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
        failed(row, exc)
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
        failed(row, exc)
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

"""What `graphopt run` reports about the model it wrote, besides the per-pass table: size before and after
always; parameters and MACs before and after always (:mod:`graphopt.report.cost`), with the per-layer rows in
the JSON (``layers``) and the most changed layers printed when the total MACs changed or a kept layer lost
parameters or MACs (pruning; not folding BatchNorm, which only moves parameters, nor int8-dynamic's renames);
latency before and after on the backend (``--bench``); accuracy, output SQNR and the per-layer SQNR table worst
first when labelled data is given (``--eval``)."""

from __future__ import annotations

import os
from typing import Any

from graphopt.backends.base import model_size_bytes
from graphopt.errors import first_line
from graphopt.numeric import fmt_db
from graphopt.report.cost import ModelCosts, compare_costs, cost_table, fmt_count, model_costs
from graphopt.report.metrics import compare_models, per_layer_sqnr


def measure_costs(graph) -> ModelCosts | str:
    """:func:`~graphopt.report.cost.model_costs` of ``graph``, or why it could not be counted (a report line
    must not fail a run whose model is already optimized)."""
    try:
        return model_costs(graph)
    except Exception as exc:
        return f"{type(exc).__name__}: {first_line(exc)}"


def cost_report(before: ModelCosts | str, after: ModelCosts | str, top: int = 10) -> dict[str, Any]:
    """``params`` and ``macs`` totals before/after and the ``layers`` rows (:func:`compare_costs`, graph order);
    ``costs_error`` instead when either side could not be counted (the reason from :func:`measure_costs`)."""
    if isinstance(before, str) or isinstance(after, str):
        return {"costs_error": before if isinstance(before, str) else after}
    deltas = compare_costs(before.layers, after.layers)
    # the table is for pruning: total MACs changed, or a kept layer shrank. Not for rewrites that rename layers
    # with the same totals (int8-dynamic's MatMul -> MatMulInteger) or only move parameters (fold-bn)
    structural = before.macs != after.macs or any(
        d.status == "kept" and (d.macs_after != d.macs_before or d.params_after < d.params_before) for d in deltas)
    macs = {"before": before.macs, "after": after.macs}
    if before.dims_at_one:
        macs["dims_at_one"] = before.dims_at_one
    return {"params": {"before": before.params, "after": after.params}, "macs": macs,
            "layers": [d.to_dict() for d in deltas], "_layer_deltas": deltas if structural else None,
            "_layers_top": top}


def measure_run(before: Any, after: str, backend, *, data: dict | None = None, labels=None,
                labels_key: str = "labels", bench: bool = False, threads: int = 0, top: int = 10,
                costs: tuple[ModelCosts | str, ModelCosts | str] | None = None,
                sizes: tuple[int, int] | None = None) -> dict[str, Any]:
    """Measure the input model ``before`` (a path, or a graph the backend runs) against the output ``after`` (a
    path); see the module docstring. ``costs``: both models' :func:`measure_costs` when the caller has them (else
    the files are loaded); ``sizes``: both sizes in bytes (else the models'). The per-layer SQNR table needs
    ONNX models (a backend that runs them)."""
    sizes = sizes or (model_size_bytes(before), model_size_bytes(after))
    report: dict[str, Any] = {"size_bytes": {"before": sizes[0], "after": sizes[1]}}
    if costs is None:
        from graphopt.ir import load_model

        costs = tuple(measure_costs(load_model(path)) for path in (before, after))
    report.update(cost_report(*costs, top=top))
    threads = threads or os.cpu_count() or 1
    if bench:
        timed = backend.bench(after, None, [threads])  # at the batch a static result takes (x86), else 1
        batch = timed.rows[0].batch
        results = [backend.bench(before, [batch], [threads]), timed]
        stats = [r.rows[0] for r in results]
        report["latency_ms"] = {"before": stats[0].p50_ms, "after": stats[1].p50_ms, "batch": batch,
                                "threads": threads, "statistic": "p50"}
        settings = next(iter(results[1].settings.values()), None)  # what the runtime ran with (openvino)
        if settings:
            report["latency_ms"]["settings"] = settings
    if data is not None:
        comparison = compare_models(before, after, data, labels, labels_key=labels_key,
                                    per_layer="onnx" in backend.irs, backend=backend, threads=threads)
        report["comparison"] = comparison.to_dict()
        report["_comparison"] = comparison
        report["_top"] = top
    return report


def format_run(report: dict[str, Any]) -> str:
    lines = []
    if "size_bytes" in report:
        size = report["size_bytes"]
        lines.append(f"size: {size['before']:,} -> {size['after']:,} bytes ({size['after'] / size['before']:.2f}x)")
    costs = format_costs(report)
    lines.extend(costs[:1])
    if "latency_ms" in report:
        lat = report["latency_ms"]
        lines.append(f"latency ({lat['statistic']}, batch {lat['batch']}, {lat['threads']} threads): "
                     f"{lat['before']:.2f} -> {lat['after']:.2f} ms ({lat['after'] / lat['before']:.2f}x)"
                     + "".join(f"; {k} {v}" for k, v in lat.get("settings", {}).items()))
    comparison = report.get("_comparison")
    if comparison is not None:
        if comparison.accuracy:
            a, b = comparison.accuracy["a"], comparison.accuracy["b"]
            lines.append(f"accuracy on {comparison.samples} labelled samples: {a} -> {b} "
                         f"({100 * (b.accuracy - a.accuracy):+.2f} points)")
        for out in comparison.outputs:
            lines.append(f"output {out.name}: SQNR {fmt_db(out.sqnr_db)}, max rel. error {out.max_rel_err:.2e}")
        layers = comparison.per_layer
        if layers is not None and layers.rows:
            on = f", on the first {layers.samples} samples" if layers.samples else ""
            lines.append(f"per-layer SQNR, worst first ({min(report['_top'], len(layers.rows))} of "
                         f"{len(layers.rows)}{on}):")
            lines.append(layers.table(report["_top"]))
    lines.extend(costs[1:])  # the per-layer params/MACs table, after the one-line results
    return "\n".join(lines)


def format_costs(report: dict[str, Any]) -> list[str]:
    """``params: 11,689,512 -> 2,950,000 (0.25x); MACs: 1.81G -> 0.49G (0.27x)`` and, when the structure changed
    (see :func:`cost_report`), the most changed layers."""
    if "costs_error" in report:
        return [f"params/MACs: not counted ({report['costs_error']})"]
    if "params" not in report:
        return []
    p, m = report["params"], report["macs"]
    unit = next((u for u in (1e9, 1e6, 1e3) if max(m["before"], m["after"]) >= u), 1)
    lines = [f"params: {p['before']:,} -> {p['after']:,}{_ratio(p['before'], p['after'])}; "
             f"MACs: {fmt_count(m['before'], unit)} -> {fmt_count(m['after'], unit)}{_ratio(m['before'], m['after'])}"
             + (f" (per sample, at {', '.join(m['dims_at_one'])} = 1: dynamic dims past the batch count as 1)"
                if m.get("dims_at_one") else "")]
    deltas = report.get("_layer_deltas")
    if deltas:
        changed = sum(d.changed for d in deltas)
        top = min(report["_layers_top"], changed)
        lines.append(f"params and MACs per layer, biggest change first ({top} of {changed} changed layers):")
        lines.append(cost_table(deltas, top))
    return lines


def _ratio(before: float, after: float) -> str:
    return f" ({after / before:.2f}x)" if before else ""


def jsonable_run(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if not k.startswith("_")}


def per_layer_fx(reference, result, data: dict, samples: int = 64, batch: int = 32):
    """Per-layer SQNR of a PyTorch result against its float reference graph (the one its first approximate pass
    started from) on the first ``samples`` of ``data``, in batches the result takes."""
    names = result.input_names()
    subset = {n: data[n][:samples] for n in names}
    count = len(next(iter(subset.values())))
    fixed = {s.batch_dim for s in result.input_specs() if s.batch_dim is not None}
    step = fixed.pop() if len(fixed) == 1 else batch
    whole = count - count % step  # whole batches only (a fixed batch size takes no remainder); all when fewer
    batches = [{n: v[i:i + step] for n, v in subset.items()} for i in range(0, whole or count, step)]
    return per_layer_sqnr(reference, result, batches)


"""What `graphopt run` reports about the model it wrote, besides the per-pass table: size before and after
always; latency before and after on the backend (``--bench``); accuracy, output SQNR and the per-layer SQNR
table worst first when labelled data is given (``--eval``)."""

from __future__ import annotations

import os
from typing import Any

from graphopt.backends.base import model_size_bytes
from graphopt.report.metrics import compare_models, fmt_db


def measure_run(before: str, after: str, backend, *, data: dict | None = None, labels=None,
                labels_key: str = "labels", bench: bool = False, threads: int = 0, top: int = 10) -> dict[str, Any]:
    """Measure the input model ``before`` against the output ``after`` (paths); see the module docstring."""
    report: dict[str, Any] = {"size_bytes": {"before": model_size_bytes(before), "after": model_size_bytes(after)}}
    threads = threads or os.cpu_count() or 1
    if bench:
        stats = [backend.bench(path, [1], [threads]).rows[0] for path in (before, after)]
        report["latency_ms"] = {"before": stats[0].p50_ms, "after": stats[1].p50_ms, "batch": 1,
                                "threads": threads, "statistic": "p50"}
    if data is not None:
        comparison = compare_models(before, after, data, labels, labels_key=labels_key, per_layer=True,
                                    backend=backend, threads=threads)
        report["comparison"] = comparison.to_dict()
        report["_comparison"] = comparison
        report["_top"] = top
    return report


def format_run(report: dict[str, Any]) -> str:
    size = report["size_bytes"]
    lines = [f"size: {size['before']:,} -> {size['after']:,} bytes ({size['after'] / size['before']:.2f}x)"]
    if "latency_ms" in report:
        lat = report["latency_ms"]
        lines.append(f"latency ({lat['statistic']}, batch {lat['batch']}, {lat['threads']} threads): "
                     f"{lat['before']:.2f} -> {lat['after']:.2f} ms ({lat['after'] / lat['before']:.2f}x)")
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
            lines.append(f"per-layer SQNR, worst first ({min(report['_top'], len(layers.rows))} of "
                         f"{len(layers.rows)}):")
            lines.append(layers.table(report["_top"]))
    return "\n".join(lines)


def jsonable_run(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if not k.startswith("_")}

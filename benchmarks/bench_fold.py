"""Side-by-side benchmark of graphopt's ``fold`` pipeline against onnxsim and onnxslim, in one run.

    python benchmarks/bench_fold.py [--models resnet18_like,resnet50_like,mobilenet_v2_like] [--repeat 3]
                                    [--json out.json] [--markdown out.md]

Each zoo model is exported to a temporary folder with BatchNorm kept (``export_onnx(keep_bn=True)``: the
TorchScript exporter with ``training=PRESERVE, do_constant_folding=False``, the graph a user gets before any
cleanup). Then, for every model and tool, in the same process and on the same machine:

* nodes after, BatchNormalization left (and Constant nodes among the nodes after);
* wall time of the tool's Python API call, one untimed warm-up, then the median of ``--repeat`` timed runs
  (every tool from the same loaded ModelProto; graphopt with ``check=False`` and ``check=True``, and, for
  information, from the file path, load and onnx checker included); exactly what is timed per tool is in
  ``TIMED`` below and in the output;
* the max relative output error against the original on onnxruntime CPU, ``max|a-b| / max|ref|`` over all
  outputs on one fixed-seed input (``graphopt.passes.instruments.relative_error``).

The bars (ratios measured side by side, never against numbers from another machine or run):
graphopt's node count <= min(onnxsim, onnxslim); graphopt's wall time <= each of theirs (graphopt/onnxsim and
graphopt/onnxslim <= 1, with ``check=False``, like-for-like with the other tools' defaults, which do not run the
model); graphopt's outputs within 1e-5 relative. ``--fail-on-bar`` makes a lost bar exit 1.
Needs ``pip install -e '.[bench,torch]'``. Exported models live in a temp dir and are deleted afterwards
(``--workdir DIR`` keeps them; never commit .onnx files).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from typing import Any, Callable

import numpy as np
import onnx
from _common import machine, versions, write_outputs

MODELS = ("resnet18_like", "resnet50_like", "mobilenet_v2_like")
TOOLS = ("graphopt", "graphopt+check", "graphopt(path)", "onnxsim", "onnxslim")
NODE_BAR_TOOL = "graphopt"  # the graphopt variant the bars judge (check=False, like the others' defaults)
ERR_BAR = 1e-5

# What each tool's timed call is, word for word. The timed region starts with the input named here already in
# memory (path: the file exists on disk; ModelProto: onnx.load already done, a fresh deep copy made before the
# clock starts, since the tools may edit their input) and stops when an optimized onnx.ModelProto is in memory.
TIMED = {
    "graphopt": ('graphopt.optimize(model, "fold", check=False).model',
                 "from a loaded ModelProto, like onnxsim/onnxslim: graphsurgeon import, the passes, the final "
                 "onnx full_check verify, and the export back to a ModelProto"),
    "graphopt+check": ('graphopt.optimize(model, "fold", check=True).model',
                       "as above plus the NumericCheck instrument (onnxruntime runs the model before and after "
                       "each modifying pass)"),
    "graphopt(path)": ('graphopt.optimize(path, "fold", check=False).model',
                       "from the .onnx path: adds the file read and the load-time onnx checker. Informative, "
                       "not judged by the bars (the other tools are handed a loaded ModelProto)"),
    "onnxsim": ("onnxsim.simplify(model)",
                "its defaults (check_n=0: no numeric check), from a loaded ModelProto"),
    "onnxslim": ("onnxslim.slim(model)", "its defaults, from a loaded ModelProto"),
}


# -- tools ------------------------------------------------------------------------------------------------
def _run_graphopt(check: bool, from_path: bool = False) -> Callable[[str, onnx.ModelProto], onnx.ModelProto]:
    def run(path: str, model: onnx.ModelProto) -> onnx.ModelProto:
        import graphopt

        return graphopt.optimize(path if from_path else model, "fold", check=check).model

    return run


def _run_onnxsim(path: str, model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    out, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim.simplify reported that its check failed")
    return out


def _run_onnxslim(path: str, model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


RUNNERS: dict[str, Callable[[str, onnx.ModelProto], onnx.ModelProto]] = {
    "graphopt": _run_graphopt(check=False),
    "graphopt+check": _run_graphopt(check=True),
    "graphopt(path)": _run_graphopt(check=False, from_path=True),
    "onnxsim": _run_onnxsim,
    "onnxslim": _run_onnxslim,
}
# each call of these gets a fresh copy of the loaded ModelProto
TAKES_PROTO = {"graphopt", "graphopt+check", "onnxsim", "onnxslim"}


# -- measuring --------------------------------------------------------------------------------------------
def export_model(name: str, workdir: str, exporter: str = "torchscript") -> str:
    from graphopt import zoo

    path = os.path.join(workdir, f"{name}-{exporter}.onnx")
    if not os.path.exists(path):
        zoo.export_onnx(getattr(zoo, name)(), path, keep_bn=True, exporter=exporter)
    return path


def fixed_input(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # no ORT graph optimizations: compare the graphs as the tools left them, not as ORT re-fuses them
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in sess.run(None, feeds)]


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def timed_call(tool: str, path: str, model: onnx.ModelProto) -> tuple[onnx.ModelProto, float]:
    """One call of ``tool``, timed; a fresh copy of ``model`` is made before the clock starts."""
    arg = onnx.ModelProto()
    if tool in TAKES_PROTO:
        arg.CopyFrom(model)
    gc.collect()
    start = time.perf_counter()
    out = RUNNERS[tool](path, arg)
    return out, time.perf_counter() - start


def inspect_output(row: dict[str, Any], out: onnx.ModelProto, feeds, reference) -> None:
    counts = op_counts(out)
    row.update(nodes=len(out.graph.node), bn_left=counts.get("BatchNormalization", 0),
               constant_nodes=counts.get("Constant", 0), initializers=len(out.graph.initializer),
               op_counts=dict(sorted(counts.items())))
    try:
        row["max_rel_err"] = relative_error(reference, ort_run(out, feeds))
    except Exception as exc:
        row["max_rel_err"] = float("inf")
        row["error"] = f"onnxruntime could not run the output: {type(exc).__name__}: {str(exc).splitlines()[0]}"


def _failed(row: dict[str, Any], exc: Exception) -> None:
    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    row["traceback"] = traceback.format_exc()


def measure(tools: list[str], path: str, model: onnx.ModelProto, repeat: int, feeds, reference) -> dict:
    """Warm every tool up once (that output is the one inspected), then time them interleaved: round r runs
    each tool once, so a change in the machine's background load hits every tool alike."""
    rows: dict[str, dict[str, Any]] = {}
    for tool in tools:
        row = rows[tool] = {"tool": tool, "timed": " -- ".join(TIMED[tool]), "times_s": []}
        try:
            out, row["warmup_s"] = timed_call(tool, path, model)
        except Exception as exc:  # a tool that fails is reported, the run goes on
            _failed(row, exc)
            print(f"    {tool}: error: {row['error']}", file=sys.stderr, flush=True)
            continue
        inspect_output(row, out, feeds, reference)
        del out
        print(f"    {tool}: {row['nodes']} nodes, {row['bn_left']} BN, rel.err {row['max_rel_err']:.2e}, "
              f"warm-up {row['warmup_s']:.3f} s", file=sys.stderr, flush=True)
    for r in range(repeat):
        for tool in tools:
            row = rows[tool]
            if "warmup_s" not in row or "traceback" in row:
                continue
            try:
                row["times_s"].append(timed_call(tool, path, model)[1])
            except Exception as exc:
                _failed(row, exc)
        print(f"    round {r + 1}/{repeat}: " + ", ".join(
            f"{t} {rows[t]['times_s'][-1]:.3f} s" for t in tools if rows[t]["times_s"]), file=sys.stderr, flush=True)
    for row in rows.values():
        if row["times_s"] and "traceback" not in row:
            row["median_s"] = statistics.median(row["times_s"])
            row["min_s"] = min(row["times_s"])
    return rows


def relative_error(reference, actual) -> float:
    from graphopt.passes.instruments import relative_error as rel

    return rel(reference, actual)


def bench_model(name: str, workdir: str, repeat: int, tools: list[str], exporter: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    path = export_model(name, workdir, exporter)
    export_s = time.perf_counter() - t0
    model = onnx.load(path)
    feeds = fixed_input(model)
    reference = ort_run(model, feeds)
    counts = op_counts(model)
    result: dict[str, Any] = {
        "model": name,
        "export_s": export_s,
        "nodes_before": len(model.graph.node),
        "bn_before": counts.get("BatchNormalization", 0),
        "op_counts_before": dict(sorted(counts.items())),
        "tools": {},
    }
    print(f"  {name}: {len(model.graph.node)} nodes, exported in {export_s:.1f} s", file=sys.stderr, flush=True)
    result["tools"] = measure(tools, path, model, repeat, feeds, reference)
    result["verdicts"] = verdicts(result)
    return result


# -- the bars ---------------------------------------------------------------------------------------------
def _ok(row: dict | None) -> bool:
    return row is not None and "error" not in row and "median_s" in row


def verdicts(result: dict[str, Any]) -> dict[str, Any]:
    t = result["tools"]
    g, sim, slim = t.get(NODE_BAR_TOOL), t.get("onnxsim"), t.get("onnxslim")
    gc_, gp = t.get("graphopt+check"), t.get("graphopt(path)")
    v: dict[str, Any] = {}
    others = [r for r in (sim, slim) if _ok(r)]
    if _ok(g) and others:
        best = min(r["nodes"] for r in others)
        v["nodes"] = {"graphopt": g["nodes"], "min_others": best, "pass": g["nodes"] <= best}
        v["bn"] = {"graphopt": g["bn_left"], "pass": g["bn_left"] == 0}
        for other_name, other in (("onnxsim", sim), ("onnxslim", slim)):
            if _ok(other):
                ratio = g["median_s"] / other["median_s"]
                entry = {"ratio": ratio, "pass": ratio <= 1.0}
                if _ok(gc_):
                    entry["ratio_check"] = gc_["median_s"] / other["median_s"]
                if _ok(gp):
                    entry["ratio_path"] = gp["median_s"] / other["median_s"]
                v[f"time_vs_{other_name}"] = entry
    elif not _ok(g):
        v["graphopt_error"] = g.get("error", "no timing") if g else "not run"
    if _ok(g):
        v["error"] = {"graphopt": g["max_rel_err"], "pass": g["max_rel_err"] <= ERR_BAR}
    return v


# -- reporting --------------------------------------------------------------------------------------------
def _fmt_s(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def _mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"### graphopt `fold` vs onnxsim / onnxslim (median of {meta['repeat']}, after 1 warm-up; "
        f"{meta.get('exporter', 'torchscript')} export)",
        "",
        "| model | nodes before (BN) | tool | nodes after | BN left | Const nodes | median time | x graphopt "
        "| max rel. err |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        g = res["tools"].get(NODE_BAR_TOOL)
        for tool, row in res["tools"].items():
            head = f"{res['model']} | {res['nodes_before']} ({res['bn_before']})"
            if not _ok(row) and ("nodes" not in row or "median_s" not in row):
                lines.append(f"| {head} | {tool} | error: {row.get('error', '?')[:80].replace('|', '/')} | | | | | |")
                continue
            rel = f"{row['median_s'] / g['median_s']:.2f}" if _ok(g) else ""
            lines.append(
                f"| {head} | {tool} | {row['nodes']} | {row['bn_left']} | {row['constant_nodes']} | "
                f"{_fmt_s(row['median_s'])} | {rel} | {row['max_rel_err']:.1e} |"
            )
    lines += ["", "`x graphopt` = this tool's median time / graphopt (check=False)'s: above 1 means graphopt is "
              "faster.", "", "**Bars** (graphopt = `check=False`):", ""]
    for res in results:
        v = res["verdicts"]
        if "graphopt_error" in v:
            lines.append(f"- {res['model']}: graphopt did not run: {v['graphopt_error']}")
            continue
        parts = []
        if "nodes" in v:
            parts.append(f"nodes {v['nodes']['graphopt']} <= min(others) {v['nodes']['min_others']}: "
                         f"{_mark(v['nodes']['pass'])}")
            parts.append(f"BN left {v['bn']['graphopt']} == 0: {_mark(v['bn']['pass'])}")
        for other in ("onnxsim", "onnxslim"):
            e = v.get(f"time_vs_{other}")
            if e:
                info = [f"{label}: {e[key]:.2f}" for key, label in (("ratio_check", "check=True"),
                                                                    ("ratio_path", "from the path"))
                        if key in e]
                extra = f" ({', '.join(info)})" if info else ""
                parts.append(f"time graphopt/{other} {e['ratio']:.2f} <= 1: {_mark(e['pass'])}{extra}")
        if "error" in v:
            parts.append(f"rel. err {v['error']['graphopt']:.1e} <= {ERR_BAR:g}: {_mark(v['error']['pass'])}")
        lines.append(f"- {res['model']}: " + "; ".join(parts))
    lines += ["", "**What is timed:**", ""]
    lines += [f"- {tool}: `{TIMED[tool][0]}` -- {TIMED[tool][1]}" for tool in meta["tools"]]
    lines += ["", f"Machine: {meta['machine']}; {meta['versions']}."]
    return "\n".join(lines) + "\n"


def all_pass(results: list[dict[str, Any]]) -> bool:
    ok = True
    for res in results:
        v = res["verdicts"]
        if "graphopt_error" in v:
            return False
        ok &= all(e["pass"] for k, e in v.items() if isinstance(e, dict) and "pass" in e)
    return ok


def environment(repeat: int, tools: list[str]) -> dict[str, Any]:
    return {"repeat": repeat, "tools": tools, "timed": {t: " -- ".join(TIMED[t]) for t in tools},
            "machine": machine(), "versions": versions(("onnxsim", "onnxslim")), "error_bar": ERR_BAR}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {','.join(MODELS)}")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, from {','.join(TOOLS)}")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per tool and model (median reported)")
    ap.add_argument("--json", metavar="PATH", help="write every measurement and verdict as JSON")
    ap.add_argument("--markdown", metavar="PATH", help="write the results table and verdicts as Markdown")
    ap.add_argument("--workdir", metavar="DIR", help="export the models here and keep them (default: a temp dir)")
    ap.add_argument("--exporter", default="torchscript", choices=("torchscript", "dynamo"),
                    help="torch.onnx exporter: torchscript (training=PRESERVE, no constant folding; the bars' "
                         "setting) or dynamo (torch's default exporter with optimize=False; needs onnxscript)")
    ap.add_argument("--fail-on-bar", action="store_true", help="exit 1 when graphopt loses a bar")
    args = ap.parse_args(argv)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model '{m}' (choose from {', '.join(MODELS)})")
    for t in tools:
        if t not in TOOLS:
            ap.error(f"unknown tool '{t}' (choose from {', '.join(TOOLS)})")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    meta = environment(args.repeat, tools)
    meta["exporter"] = args.exporter
    with tempfile.TemporaryDirectory(prefix="bench_fold_") as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        results = [bench_model(m, workdir, args.repeat, tools, args.exporter) for m in models]

    write_outputs(markdown(results, meta), {"meta": meta, "results": results}, args.markdown, args.json)
    if args.fail_on_bar and not all_pass(results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of streaming calibration (graphopt's observers) against onnxruntime's entropy calibration.

    python benchmarks/bench_calib_memory.py [--samples 64,256,1024] [--ort-samples 64,256] [--size 112]
                                            [--batch 8] [--json out.json] [--markdown out.md] [--fail-on-bar]

The ResNet-18-like zoo model is exported once (``export_onnx(keep_bn=False, dynamic_batch=True)``: BatchNorm
folded by the exporter, batch dimension symbolic) to a temporary folder. Every measurement then runs in its own
child process, whose peak resident memory (``VmHWM`` from ``/proc/self/status``, read by the child when its
work is done) is the number reported: the whole process, interpreter and onnxruntime included, as a user sees
it. (``ru_maxrss`` of a child is not used: Linux carries the parent's high-water mark into it.)

* ``graphopt``: the real pipeline, ``graphopt.optimize(model, "insert-observers,calibrate:method=entropy,
  place-qdq")`` with the data from ``graphopt.calib.synthetic`` in batches of ``--batch``: every float activation
  gets a 2048-bin streaming histogram, the model runs with them as extra outputs one batch at a time, then the
  entropy ranges and the Q/DQ placement.
* ``onnxruntime``: ``onnxruntime.quantization.quantize_static(model, out, reader, calibrate_method=
  CalibrationMethod.Entropy)`` with its other defaults (QDQ format), the reader yielding the same batches of the
  same synthetic data. It calibrates the tensors of the ops it quantizes, keeps every intermediate output of
  every batch until the end, then builds its histograms.

Inputs are 1x3x112x112 by default, not ImageNet's 224x224: ResNet-18 with its ~50 activations as outputs costs
about 4x as much per sample at 224 as at 112 (measured), and at 112 the default run (1,344 samples through
graphopt's observers, 320 through onnxruntime's calibration) stays within a few minutes on a 2-core machine.
``--size 224`` measures at ImageNet's size (expect several times as long, and several GB for onnxruntime at 256).

The bars (issue #3): graphopt's peak at the largest sample count / at the smallest <= 1.2, and graphopt's peak
below onnxruntime's at 256 samples. Wall times are for information. ``--fail-on-bar`` exits 1 on a lost bar.
Needs torch (the zoo) in the parent process only; the children import onnxruntime and numpy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

RSS_BAR = 1.2


# -- children ------------------------------------------------------------------------------------------------
def _child_graphopt(model_path: str, n: int, batch: int, threads: int, seed: int) -> dict:
    """graphopt's real int8 pipeline: insert-observers, calibrate (entropy), place-qdq, on synthetic data."""
    import graphopt
    from graphopt.calib import input_specs, synthetic
    from graphopt.calib.state import OBSERVERS
    from graphopt.passes.base import PassContext

    data = synthetic(input_specs(model_path), n, seed, batch_size=batch, progress=False)
    ctx = PassContext(registry=graphopt.default_registry(), calibration=data)
    start = time.perf_counter()
    result = graphopt.optimize(model_path, f"insert-observers,calibrate:method=entropy:batch_size={batch},place-qdq",
                               ctx=ctx, check=False)
    done = time.perf_counter()
    calibrate = next(r for r in result.report.records if r.name == "calibrate")
    return {"samples": calibrate.stats["read samples"], "tensors": calibrate.stats["calibrated tensors"],
            "calib_s": done - start,
            "observer_state_bytes": sum(o.state_nbytes() for o in ctx.state[OBSERVERS].values())}


def _child_onnxruntime(model_path: str, n: int, batch: int, threads: int, seed: int, out_dir: str) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

    from graphopt.calib import input_specs, synthetic

    specs = input_specs(model_path)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(synthetic(specs, n, seed, batch_size=batch, progress=False))
            self.seen = 0

        def get_next(self):
            feed = next(self.batches, None)
            if feed is not None:
                self.seen += next(iter(feed.values())).shape[0]
            return feed

    reader = Reader()
    start = time.perf_counter()
    quantize_static(model_path, os.path.join(out_dir, f"ort_int8_{n}.onnx"), reader, quant_format=QuantFormat.QDQ,
                    calibrate_method=CalibrationMethod.Entropy)
    return {"samples": reader.seen, "calib_s": time.perf_counter() - start}


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MiB.

    Read from /proc rather than ``getrusage``: a child's ``ru_maxrss`` starts at its parent's RSS at the fork (the
    kernel carries the old address space's high-water mark across exec), which would hide the child's own peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _run_child(args: list[str], log_path: str) -> dict:
    """Run this script as a child process; its result (JSON), with its own peak RSS measured inside it."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as result_file:
        result_path = result_file.name
    start = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child-result", result_path] + args,
                                stdout=log, stderr=subprocess.STDOUT)
        proc.wait()
    wall = time.perf_counter() - start
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"child {' '.join(args)} exited with {proc.returncode}; see {log_path}")
        with open(result_path) as f:
            result = json.load(f)
    finally:
        os.unlink(result_path)
    result["wall_s"] = wall
    return result


# -- parent --------------------------------------------------------------------------------------------------
def _export(workdir: str, size: int) -> str:
    from graphopt import zoo

    path = os.path.join(workdir, f"resnet18_like_{size}.onnx")
    if not os.path.exists(path):
        zoo.export_onnx(zoo.resnet18_like(), path, (1, 3, size, size), keep_bn=False, dynamic_batch=True)
    return path


def _markdown(rows: list[dict], verdicts: list[str], meta: dict) -> str:
    lines = [f"ResNet-18-like, 1x3x{meta['size']}x{meta['size']} inputs, batches of {meta['batch']}, "
             f"{meta['threads']} intra-op threads, synthetic data; peak RSS of each measurement's own process.",
             "",
             "| tool | calibration | samples | peak RSS (MB) | calibration time (s) | tensors observed |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tool']} | {r['method']} | {r['samples']} | {r['peak_rss_mb']:,.0f} | "
                     f"{r['calib_s']:.1f} | {r.get('tensors', '')} |")
    lines += [""] + [f"- {v}" for v in verdicts]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default="64,256,1024", help="sample counts for graphopt's observers")
    parser.add_argument("--ort-samples", default="64,256", help="sample counts for onnxruntime ('' to skip)")
    parser.add_argument("--size", type=int, default=112, help="input height and width (ImageNet: 224)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep the exported model and logs here (default: a temp dir)")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--fail-on-bar", action="store_true")
    parser.add_argument("--child", choices=("graphopt", "onnxruntime"), help=argparse.SUPPRESS)
    parser.add_argument("--child-result", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        if args.child == "graphopt":
            result = _child_graphopt(args.model, args.n, args.batch, args.threads, args.seed)
        else:
            result = _child_onnxruntime(args.model, args.n, args.batch, args.threads, args.seed,
                                        os.path.dirname(args.child_result))
        result["peak_rss_mb"] = _peak_rss_mb()
        with open(args.child_result, "w") as f:
            json.dump(result, f)
        return 0

    ours = [int(s) for s in args.samples.split(",") if s]
    theirs = [int(s) for s in args.ort_samples.split(",") if s]
    tmp = None if args.workdir else tempfile.TemporaryDirectory()
    workdir = args.workdir or tmp.name
    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, "children.log")
    try:
        model = _export(workdir, args.size)
        common = ["--model", model, "--batch", str(args.batch), "--threads", str(args.threads),
                  "--seed", str(args.seed)]
        rows = []
        plan = [("graphopt", n) for n in ours] + [("onnxruntime", n) for n in theirs]
        for tool, n in plan:
            print(f"{tool}: {n} samples ...", file=sys.stderr, flush=True)
            result = _run_child(["--child", tool, "--n", str(n)] + common, log_path)
            result.update(tool=tool, method="entropy (streaming histograms)" if tool == "graphopt"
                          else "Entropy (quantize_static)")
            rows.append(result)
            print(f"  peak RSS {result['peak_rss_mb']:,.0f} MB, {result['calib_s']:.1f} s", file=sys.stderr)
    finally:
        if tmp is not None:
            tmp.cleanup()

    peak = {(r["tool"], r["samples"]): r["peak_rss_mb"] for r in rows}
    verdicts, lost = [], False
    if len(ours) >= 2:
        lo_n, hi_n = min(ours), max(ours)
        ratio = peak[("graphopt", hi_n)] / peak[("graphopt", lo_n)]
        ok = ratio <= RSS_BAR
        lost |= not ok
        verdicts.append(f"graphopt peak RSS {hi_n} / {lo_n} samples = {ratio:.3f} (bar <= {RSS_BAR}): "
                        f"{'met' if ok else 'LOST'}")
    for n in sorted(set(ours) & set(theirs)):
        ratio = peak[("graphopt", n)] / peak[("onnxruntime", n)]
        ok = ratio < 1.0
        if n == 256:
            lost |= not ok
        verdicts.append(f"graphopt / onnxruntime peak RSS at {n} samples = {ratio:.3f} "
                        f"({'bar < 1: ' + ('met' if ok else 'LOST') if n == 256 else 'for information'})")
    if len(theirs) >= 2:
        verdicts.append(f"onnxruntime peak RSS {max(theirs)} / {min(theirs)} samples = "
                        f"{peak[('onnxruntime', max(theirs))] / peak[('onnxruntime', min(theirs))]:.2f}")
    meta = {"size": args.size, "batch": args.batch, "threads": args.threads, "seed": args.seed,
            "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    table = _markdown(rows, verdicts, meta)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "verdicts": verdicts}, f, indent=2)
    return 1 if (lost and args.fail_on_bar) else 0


if __name__ == "__main__":
    sys.exit(main())

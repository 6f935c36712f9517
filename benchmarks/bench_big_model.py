"""Peak memory of graphopt on a model with big external weights, as a multiple of the model's size.

Builds ``big.onnx`` + ``big.onnx.data`` in a folder (weights streamed to disk in chunks, never held in memory
whole): ``x -> Identity -> MatMul(W_i)`` for each size given, one output per weight (the Identity gives ``fold``
something to change, so the final verification runs too). Then each measured command runs as a child process
and its peak resident memory (VmHWM, read by the child itself as it exits) is printed beside the model's size on
disk.

    python benchmarks/bench_big_model.py --mb 1100 1100            # 2.2 GB in two tensors
    python benchmarks/bench_big_model.py --mb 2200                 # one tensor over 2 GB
    python benchmarks/bench_big_model.py --mb 1100 1100 --what run-check ort

``--what``: ``run`` (``graphopt run big.onnx --passes fold --no-check -o out.onnx``), ``run-check`` (the same
with the numeric check), ``ort`` (one onnxruntime session on the file and one run; ``ort-noprepack``: with
``session.disable_prepacking``), ``load`` (``OnnxGraph.load`` then ``save``), ``plan-check`` (``fold``, then
onnxruntime on the input file and on the temporary output in ``save``'s ``before_move``, prepacking off;
``plan-check-prepack``: on), ``api`` (``graphopt.optimize(path, "fold", check=False).save(out)``). Needs free
disk for two copies of the model; ``--keep`` leaves the folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from onnx import TensorProto, helper

ROWS = 4096  # the input's width: every weight is ROWS x cols
CHUNK = 64 * 2**20

_ORT_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
options = ort.SessionOptions()
for key, value in [kv.split("=", 1) for kv in sys.argv[2:]]:
    options.add_session_config_entry(key, value)
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
x = np.ones((1, %d), np.float32)
print([o.shape for o in session.run(None, {"x": x})])
""" % ROWS

# the check planned for `graphopt run`: onnxruntime on the input file, then on the written temporary output
# (OnnxGraph.save's before_move) before it is moved into place; argv: model, out, prepack (0/1)
_PLAN_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
from graphopt.ir import load_model
from graphopt.passes.base import PassContext
from graphopt.passes.manager import PassManager
from graphopt.passes.pipeline import resolve
from graphopt.plugins import load_registry
src, out, prepack = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
def outputs(path):
    options = ort.SessionOptions()
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.ones((1, %d), np.float32)})
registry = load_registry(autoload=False)
graph, report = PassManager(resolve("fold", registry), [], PassContext(registry=registry)).run(load_model(src),
                                                                                               in_place=True)
graph.verify()  # as `graphopt run` does (the API's optimize() verifies an export(): every weight copied)
reference = outputs(src)
def check(temporary):
    assert all(np.allclose(a, b, rtol=1e-5) for a, b in zip(reference, outputs(temporary)))
graph.save(out, before_move=check)
""" % ROWS

_API_SCRIPT = """
import sys
from graphopt import optimize
optimize(sys.argv[1], "fold", check=False).save(sys.argv[2])
"""

_LOAD_SCRIPT = """
import sys
from graphopt.ir import OnnxGraph
graph = OnnxGraph.load(sys.argv[1])
graph.save(sys.argv[2])
"""


def build(folder: str, sizes_mb: list[float], seed: int = 0) -> str:
    """Write ``folder/big.onnx`` and ``big.onnx.data``; returns the model's path."""
    path = os.path.join(folder, "big.onnx")
    rng = np.random.default_rng(seed)
    inits, nodes, outputs = [], [helper.make_node("Identity", ["x"], ["x_id"], name="id")], []
    offset = 0
    with open(path + ".data", "wb") as f:
        for i, mb in enumerate(sizes_mb):
            cols = max(1, int(mb * 1e6) // (4 * ROWS))
            nbytes = ROWS * cols * 4
            written = 0
            while written < nbytes:
                n = min(CHUNK, nbytes - written) // 4
                f.write((rng.standard_normal(n, dtype=np.float32) * 0.01).tobytes())
                written += n * 4
            t = TensorProto(name=f"W{i}", data_type=TensorProto.FLOAT, dims=[ROWS, cols])
            for key, value in (("location", "big.onnx.data"), ("offset", offset), ("length", nbytes)):
                t.external_data.add(key=key, value=str(value))
            t.data_location = TensorProto.EXTERNAL
            inits.append(t)
            offset += nbytes
            pad = -offset % 4096
            f.write(b"\0" * pad)
            offset += pad
            nodes.append(helper.make_node("MatMul", ["x_id", f"W{i}"], [f"y{i}"], name=f"mm{i}"))
            outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, cols]))
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ROWS])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def model_bytes(path: str) -> int:
    data = path + ".data"
    return os.path.getsize(path) + (os.path.getsize(data) if os.path.exists(data) else 0)


# Runs `-m module args` or `-c code args` in this child and writes its VmHWM (peak RSS, kB) to a file at exit. Not
# ru_maxrss: that counts the pages a child shares with its parent right after fork, i.e. the parent's RSS.
_MEASURE = """
import atexit, os, runpy, sys
def report():
    with open(os.environ["GRAPHOPT_PEAK_FILE"], "w") as f:
        f.write(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
atexit.register(report)
mode, target, *rest = sys.argv[1:]
if mode == "-m":
    sys.argv = [target, *rest]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *rest]
    exec(compile(target, "<command>", "exec"), {"__name__": "__main__"})
"""


def peak_rss(argv: list[str], cwd: str) -> tuple[int, float, int]:
    """Run ``python <argv>`` (``-m module ...`` or ``-c code ...``); returns (its peak RSS in bytes, wall seconds,
    exit code)."""
    with tempfile.NamedTemporaryFile(suffix=".peak") as peak:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _MEASURE, *argv], cwd=cwd, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env={**os.environ, "GRAPHOPT_PEAK_FILE": peak.name})
        wall = time.perf_counter() - start
        text = open(peak.name).read().strip()
    err = proc.stderr.decode(errors="replace").strip()
    if proc.returncode:
        print(f"  exit {proc.returncode}: {err.splitlines()[-1] if err else ''}")
    return (int(text) * 1024 if text else 0), wall, proc.returncode


def commands(what: str, model: str, out: str) -> list[str]:
    """The arguments after ``python`` for each measured command."""
    if what == "run":
        return ["-m", "graphopt", "run", model, "--passes", "fold", "--no-check", "-q", "-o", out]
    if what == "run-check":
        return ["-m", "graphopt", "run", model, "--passes", "fold", "-q", "-o", out]
    if what == "ort":
        return ["-c", _ORT_SCRIPT, model]
    if what == "ort-noprepack":
        return ["-c", _ORT_SCRIPT, model, "session.disable_prepacking=1"]
    if what in ("plan-check", "plan-check-prepack"):
        return ["-c", _PLAN_SCRIPT, model, out, "1" if what.endswith("prepack") else "0"]
    if what == "load":
        return ["-c", _LOAD_SCRIPT, model, out]
    if what == "api":
        return ["-c", _API_SCRIPT, model, out]
    raise SystemExit(f"unknown --what {what}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, nargs="+", default=[1100, 1100], help="size of each weight in MB")
    parser.add_argument("--what", nargs="+", default=["run"],
                        choices=["run", "run-check", "ort", "ort-noprepack", "load", "plan-check",
                                 "plan-check-prepack", "api"])
    parser.add_argument("--workdir", help="folder for the model (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="leave the folder and its models")
    args = parser.parse_args(argv)
    folder = args.workdir or tempfile.mkdtemp(prefix="graphopt-big-")
    os.makedirs(folder, exist_ok=True)
    try:
        model = build(folder, args.mb)
        size = model_bytes(model)
        print(f"model: {size / 1e9:.2f} GB in {len(args.mb)} tensor(s) ({', '.join(f'{m:g}' for m in args.mb)} MB)")
        print(f"{'command':<14} {'peak RSS GB':>11} {'÷ size':>7} {'time s':>7}")
        failed = 0
        for what in args.what:
            out = os.path.join(folder, "out.onnx")
            rss, wall, rc = peak_rss(commands(what, model, out), folder)
            failed += rc != 0
            print(f"{what:<14} {rss / 1e9:>11.2f} {rss / size:>7.2f} {wall:>7.1f}")
            for name in ("out.onnx", "out.onnx.data"):
                if os.path.exists(os.path.join(folder, name)):
                    os.remove(os.path.join(folder, name))
        return 1 if failed else 0
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

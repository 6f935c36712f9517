"""The verified default against the unverified anchor, as a user runs them: `graphopt run X --passes fold`
(numeric check on) against `onnxsim X Y` (which checks nothing by default), whole commands, in one run.

    python benchmarks/bench_fold_cli.py [--models resnet18_like,resnet50_like] [--rounds 7] [--json out.json]

Each zoo model is exported with BatchNorm kept (the graph a user has before cleanup). Then, for ``--rounds``
rounds, the two commands run as child processes in ABBA order (graphopt, onnxsim, onnxsim, graphopt; the next
round starts with onnxsim), each timed by wall clock and by the child's CPU time (user + system, from
``RUSAGE_CHILDREN``). The bar is the median over rounds of graphopt's wall time ÷ onnxsim's <= 1.0. The A/A
control is onnxsim against itself within each round (its two runs of the round): the spread of that ratio is
the noise of this machine, against which the bar's ratio is read. Both write a model the other's checker accepts
(``onnx.checker.check_model``), and graphopt's output matches the input's on onnxruntime (the check says so).
Needs ``pip install -e '.[bench,torch]'``; exported models live in a temp folder (``--workdir`` keeps them).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import onnx
from _common import machine, versions, write_outputs

MODELS = ("resnet18_like", "resnet50_like")


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, child CPU seconds) of one command; raises if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def bench_model(name: str, folder: str, rounds: int) -> dict:
    from graphopt import zoo

    path = os.path.join(folder, f"{name}.onnx")
    zoo.export_onnx(getattr(zoo, name)(), path, (1, 3, 224, 224), keep_bn=True)
    cmds = {"graphopt": [_bin("graphopt"), "run", path, "--passes", "fold", "-q", "-o",
                         os.path.join(folder, f"{name}.graphopt.onnx")],
            "onnxsim": [_bin("onnxsim"), path, os.path.join(folder, f"{name}.onnxsim.onnx")]}
    timed(cmds["graphopt"]), timed(cmds["onnxsim"])  # warm the page cache and the imports once, untimed
    ratios, cpu_ratios, control = [], [], []
    runs = {"graphopt": [], "onnxsim": []}
    for r in range(rounds):
        order = ["graphopt", "onnxsim", "onnxsim", "graphopt"] if r % 2 == 0 else \
            ["onnxsim", "graphopt", "graphopt", "onnxsim"]
        got = {"graphopt": [], "onnxsim": []}
        for tool in order:
            got[tool].append(timed(cmds[tool]))
        for tool in got:
            runs[tool] += got[tool]
        g_wall = statistics.mean(w for w, _ in got["graphopt"])
        s_wall = statistics.mean(w for w, _ in got["onnxsim"])
        ratios.append(g_wall / s_wall)
        g_cpu, s_cpu = (statistics.mean(c for _, c in got[t]) for t in ("graphopt", "onnxsim"))
        cpu_ratios.append(g_cpu / s_cpu)
        control.append(got["onnxsim"][0][0] / got["onnxsim"][1][0])
    for tool in cmds:
        onnx.checker.check_model(cmds[tool][-1])
    return {"model": name, "rounds": rounds,
            "graphopt_wall_s": statistics.median(w for w, _ in runs["graphopt"]),
            "onnxsim_wall_s": statistics.median(w for w, _ in runs["onnxsim"]),
            "graphopt_cpu_s": statistics.median(c for _, c in runs["graphopt"]),
            "onnxsim_cpu_s": statistics.median(c for _, c in runs["onnxsim"]),
            "wall_ratio_median": statistics.median(ratios), "cpu_ratio_median": statistics.median(cpu_ratios),
            "wall_ratios": ratios, "aa_control_median": statistics.median(control),
            "aa_control_range": [min(control), max(control)]}


def table(rows: list[dict]) -> str:
    lines = ["| model | graphopt run (check on), s | onnxsim, s | wall ratio (median of rounds) | CPU ratio | "
             "A/A control (onnxsim ÷ onnxsim) | bar <= 1.0 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["aa_control_range"]
        lines.append(f"| {r['model']} | {r['graphopt_wall_s']:.2f} | {r['onnxsim_wall_s']:.2f} | "
                     f"{r['wall_ratio_median']:.2f} | {r['cpu_ratio_median']:.2f} | {r['aa_control_median']:.2f} "
                     f"({lo:.2f}-{hi:.2f}) | {'met' if r['wall_ratio_median'] <= 1.0 else 'MISSED'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=7, help="ABBA rounds (each runs both tools twice)")
    parser.add_argument("--workdir", help="keep the exported and optimized models here")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    folder = args.workdir or tempfile.mkdtemp(prefix="bench-fold-cli-")
    os.makedirs(folder, exist_ok=True)
    try:
        rows = [bench_model(m, folder, args.rounds) for m in args.models.split(",")]
    finally:
        if not args.workdir:
            shutil.rmtree(folder, ignore_errors=True)
    header = f"{machine()}; {versions(('onnxsim',))}\n\n"
    write_outputs(header + table(rows), {"machine": machine(), "versions": versions(("onnxsim",)), "rows": rows},
                  args.markdown, args.json)
    return 0 if all(r["wall_ratio_median"] <= 1.0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""examples/digits_end_to_end.py, run as a user runs it: train -> prune 50 % -> distill -> QAT -> int8 on x86 and
on onnxruntime, with its table, results.json and bar chart. (Its bar over 3 seeds: benchmarks/bench_digits_e2e.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


def test_digits_end_to_end_example(tmp_path):
    env = dict(os.environ, GRAPHOPT_CACHE_DIR=str(tmp_path / "x86-cache"))  # never the user's ~/.cache
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "digits_end_to_end.py"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "int8 (QAT)" in proc.stdout and "wrote" in proc.stdout
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["stage"], r["backend"]) for r in rows} == {
        (s, b) for s in ("fp32", "pruned + distilled", "int8 (QAT)") for b in ("x86", "onnxruntime")}
    by = {(r["stage"], r["backend"]): r for r in rows}
    for backend in ("x86", "onnxruntime"):
        fp32, int8 = by[("fp32", backend)], by[("int8 (QAT)", backend)]
        assert fp32["accuracy"] > 97 and int8["accuracy"] >= fp32["accuracy"] - 1.0, (backend, fp32, int8)
        assert os.path.exists(int8["file"])
    # pruned 50 % and int8: the weights are under a tenth of the fp32 model's
    onnx_int8, onnx_fp32 = by[("int8 (QAT)", "onnxruntime")], by[("fp32", "onnxruntime")]
    assert onnx_int8["weights_kb"] < 0.1 * onnx_fp32["weights_kb"]
    # #9's file bar: the int8 ONNX file (after compact) is at most a tenth of the fp32 one; as exported it is not
    assert onnx_int8["size_kb"] <= 0.1 * onnx_fp32["size_kb"] < onnx_int8["full_kb"], (onnx_int8, onnx_fp32)
    png = (out / "digits_end_to_end.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert proc.stderr.strip() == "", proc.stderr[-2000:]  # no library noise on the user's terminal

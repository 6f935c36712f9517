"""Run NVIDIA ModelOpt's ONNX PTQ on one model: the anchor bench_tensorrt.py compares graphopt's TensorRT form with.

    <modelopt venv>/bin/python benchmarks/_modelopt_quantize.py IN.onnx CALIB.npz OUT.onnx [--method max|entropy]
                                                               [--mode int8|fp8]

Runs in a venv of its own (nvidia-modelopt pins onnx 1.21; see benchmarks/README.md), so it imports nothing from
graphopt. ModelOpt calibrates on onnxruntime's CPU provider (``calibration_eps=["cpu"]``), and everything it leaves
unquantized stays fp32 (``high_precision_dtype="fp32"``; its default, fp16, would mix a second approximation into
the comparison). ModelOpt 0.47 rewrites the file it is given (it adds the inferred shapes to it), so it is handed a
copy. Prints one JSON line: the seconds it took and its version.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("calib")
    parser.add_argument("output")
    parser.add_argument("--method", default="max", choices=("max", "entropy"))
    parser.add_argument("--mode", default="int8", choices=("int8", "fp8"))
    args = parser.parse_args()

    import modelopt
    from modelopt.onnx.quantization import quantize

    data = dict(np.load(args.calib))
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, os.path.basename(args.model))
        shutil.copyfile(args.model, copy)
        start = time.perf_counter()
        quantize(copy, quantize_mode=args.mode, calibration_data=data, calibration_method=args.method,
                 calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=args.output, log_level="ERROR")
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "modelopt": modelopt.__version__}))


if __name__ == "__main__":
    main()

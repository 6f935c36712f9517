"""What every benchmark script shares: the machine and package versions it ran with, and writing its results."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

PACKAGES = ("graphopt", "onnx", "onnxruntime", "onnx-graphsurgeon", "torch")


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def versions(extra: tuple[str, ...] = ()) -> str:
    """``"graphopt 0.1.0, onnx 1.23.2, ..."`` for graphopt's stack plus ``extra`` distributions."""
    out = []
    for dist in ("graphopt", *extra, *PACKAGES[1:]):
        try:
            out.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            out.append(f"{dist} (not installed)")
    return ", ".join(out)


def write_outputs(table: str, data: dict[str, Any], markdown: str | None, json_path: str | None) -> None:
    """Print the Markdown table, and write it and the JSON data where asked (creating folders)."""
    print(table)
    for out in (markdown, json_path):
        if out and os.path.dirname(out):
            os.makedirs(os.path.dirname(out), exist_ok=True)
    if markdown:
        with open(markdown, "w") as f:
            f.write(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(data, f, indent=2, default=float)


def interleaved_cpu_ms(runners: dict[str, Callable[[], Any]], rounds: int, inner: int
                       ) -> dict[str, list[float]]:
    """Per runner, its median CPU time per run (ms) in each of ``rounds`` rounds: each round visits every runner,
    in order on even rounds and reversed on odd ones, with one untimed run and ``inner`` runs timed by the
    process's CPU time (one intra-op thread: the work done, not the machine's noise)."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(rounds):
        for name in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
            run = runners[name]
            run()
            runs = []
            for _ in range(inner):
                start = time.process_time()
                run()
                runs.append(time.process_time() - start)
            times[name].append(1000 * statistics.median(runs))
    return times


def latency_summary(times: dict[str, list[float]], references: dict[str, str]) -> dict[str, dict[str, float]]:
    """Median and IQR (ms) of each runner's per-round times, and its ratio to each reference (``{"vs_fp32":
    "fp32"}``) as the median of the ratios within a round."""
    import numpy as np

    out = {}
    for name, t in times.items():
        q1, q3 = np.percentile(t, [25, 75])
        ratios = {key: statistics.median(a / b for a, b in zip(t, times[ref])) for key, ref in references.items()}
        out[name] = {"median_ms": statistics.median(t), "iqr_ms": float(q3 - q1), **ratios}
    return out


def zoo_model(name: str, workdir: str, calib_samples: int = 32, eval_samples: int = 16):
    """A zoo model exported to ``workdir`` and folded (``graphopt.optimize(path, "fold")``, exact): ``(fp32 path,
    calibration data, evaluation data, labels)``, data as ``{input name: array}``. ``bert_like``: 1x128 random token
    ids (dynamic batch and sequence); ``digits``: the CNN trained 6 epochs, 256 training images to calibrate, the
    397 held-out images (with labels) to evaluate; the other names are graphopt.zoo.cnn's models at 1x3x224x224
    (dynamic batch) with fixed-seed normal images. Labels are None but for the digits."""
    import numpy as np

    import graphopt

    raw = os.path.join(workdir, f"{name}.raw.onnx")
    rng = np.random.default_rng(0)
    labels = None
    if name == "bert_like":
        from graphopt.zoo.transformer import bert_like, export_transformer_onnx

        model = bert_like()
        export_transformer_onnx(model, raw)
        vocab = model.token.num_embeddings
        calib = {"input_ids": rng.integers(0, vocab, (calib_samples, 128)).astype(np.int64)}
        evals = {"input_ids": rng.integers(0, vocab, (eval_samples, 128)).astype(np.int64)}
    elif name == "digits":
        from graphopt.zoo.digits import digits_data, train_digits_cnn
        from graphopt.zoo.export import export_onnx

        x_train, y_train, x_test, y_test = digits_data(0)
        export_onnx(train_digits_cnn(epochs=6, seed=0), raw, (1, 1, 16, 16), dynamic_batch=True)
        calib, evals, labels = {"input": x_train[:256]}, {"input": x_test}, y_test
    else:
        from graphopt.zoo import cnn
        from graphopt.zoo.export import export_onnx

        export_onnx(getattr(cnn, name)(), raw, (1, 3, 224, 224), dynamic_batch=True)
        calib = {"input": rng.standard_normal((calib_samples, 3, 224, 224)).astype(np.float32)}
        evals = {"input": rng.standard_normal((eval_samples, 3, 224, 224)).astype(np.float32)}
    fp32 = os.path.join(workdir, f"{name}.fp32.onnx")
    graphopt.optimize(raw, "fold", check=False, output=fp32)
    return fp32, calib, evals, labels

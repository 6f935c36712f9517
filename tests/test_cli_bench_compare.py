"""`graphopt bench` and `graphopt compare` end to end through graphopt.cli.main, and their bad inputs: one line
on stderr, exit 2 for usage errors and 1 otherwise, no traceback."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from graphopt.cli import main
from tests.test_backend_onnxruntime import export_tiny, identity_model, quantize_ort


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-bench")
    fp32 = export_tiny(folder / "tiny.onnx", keep_bn=False)
    return {"fp32": fp32, "int8": quantize_ort(fp32, folder / "tiny.int8.onnx")}


def one_line_error(capsys, code, expected_exit, *fragments):
    err = capsys.readouterr().err
    assert code == expected_exit, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def output_row(out: str) -> str:
    """The first row under the per-output table's dashed rule."""
    lines = out.splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("------")) + 1]


def test_bench_prints_percentiles_per_batch_and_threads(models, tmp_path, capsys):
    report = tmp_path / "bench.json"
    code = main(["bench", models["fp32"], "--batch", "1,4", "--threads", "1,2", "--iters", "5", "--warmup", "1",
                 "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("batch"))
    assert lines[header].split() == ["batch", "threads", "p50", "ms", "p90", "ms", "p99", "ms", "mean", "ms",
                                     "samples/s"]
    rows = [line.split() for line in lines[header + 2:header + 6]]
    assert [(r[0], r[1]) for r in rows] == [("1", "1"), ("4", "1"), ("1", "2"), ("4", "2")]
    assert all(0 < float(r[2]) <= float(r[3]) <= float(r[4]) for r in rows)
    assert "batch 4: input 4x3x32x32" in out and "bytes" in out
    data = json.loads(report.read_text())
    assert [(r["batch"], r["threads"], r["iters"]) for r in data["latency"]] == [(1, 1, 5), (4, 1, 5), (1, 2, 5),
                                                                                (4, 2, 5)]
    assert data["size_bytes"] > 10_000 and data["backend"] == "onnxruntime"


def test_bench_shape_option(tmp_path, capsys):
    import onnx

    path = tmp_path / "relu.onnx"
    model = identity_model(["N", "S"])
    onnx.save(model, str(path))
    assert main(["bench", str(path), "--batch", "2", "--threads", "1", "--iters", "2", "--warmup", "0",
                 "--shape", "x=Nx7"]) == 0
    out = capsys.readouterr().out
    assert "batch 2: x 2x7" in out and "timed at 1" not in out
    # without --shape the dynamic S is filled with 1, and the run says so
    assert main(["bench", str(path), "--threads", "1", "--iters", "2", "--warmup", "0"]) == 0
    assert "note: dynamic S timed at 1" in capsys.readouterr().out


@pytest.mark.parametrize("argv, exit_code, fragments", [
    (["--batch", "1,x"], 2, ["--batch '1,x'", "positive integers"]),
    (["--batch", "0"], 2, ["--batch '0'"]),
    (["--threads", ""], 2, ["--threads"]),
    (["--iters", "0"], 2, ["--iters"]),
    (["--backend", "tensorrt"], 4, ["tensorrt: timing needs TensorRT and an NVIDIA GPU", "onnxruntime"]),
    (["--backend", "nosuch"], 2, ["unknown backend 'nosuch'", "onnxruntime"]),
    (["--shape", "input=3xfoo"], 2, ["--shape 'input=3xfoo'"]),
])
def test_bench_usage_errors(models, capsys, argv, exit_code, fragments):
    one_line_error(capsys, main(["bench", models["fp32"], *argv]), exit_code, *fragments)


def test_bench_bad_models(tmp_path, capsys):
    one_line_error(capsys, main(["bench", str(tmp_path / "missing.onnx")]), 3, "missing.onnx: no such file")
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model")
    one_line_error(capsys, main(["bench", str(junk)]), 3, "junk.onnx")
    import onnx

    fixed = tmp_path / "fixed.onnx"
    onnx.save(identity_model([1, 3]), str(fixed))
    one_line_error(capsys, main(["bench", str(fixed), "--batch", "4", "--iters", "1"]), 2,
                   "fixed batch dimension 1; batch 4")


def test_compare_a_model_with_itself(models, tmp_path, capsys):
    report = tmp_path / "cmp.json"
    assert main(["compare", models["fp32"], models["fp32"], "--samples", "6", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "6 fixed-seed random samples" in out and "no data given" in out
    row = output_row(out)
    assert row.split()[2:5] == ["inf", "1.000000", "0.00e+00"] and "100.00% (6/6)" in row
    data = json.loads(report.read_text())
    assert data["outputs"][0]["sqnr_db"] == "inf" and data["outputs"][0]["top1_agreement"] == 1.0
    assert "per_layer" not in data and "accuracy" not in data


def test_compare_fp32_int8_with_data_labels_and_per_layer(models, tmp_path, capsys):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, 3, 32, 32)).astype(np.float32)
    sess = ort.InferenceSession(models["fp32"], providers=["CPUExecutionProvider"])
    labels = sess.run(None, {"input": x})[0].argmax(axis=1)  # A's own predictions: A is 100% right
    labels[:5] = (labels[:5] + 1) % 10  # ... except the first five, which A gets wrong
    data = tmp_path / "data.npz"
    np.savez(data, input=x, y=labels)
    report = tmp_path / "cmp.json"
    code = main(["compare", models["fp32"], models["int8"], "--data", str(data), "--labels", "y", "--per-layer",
                 "--top", "3", "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 0
    assert f"inputs: {data}, 20 samples" in out
    assert "accuracy on 20 labelled samples ('y'): A 75.00% (15/20)" in out
    row = output_row(out)
    assert 10 < float(row.split()[2]) < 100
    assert "worst first (3 of" in out
    result = json.loads(report.read_text())
    layers = result["per_layer"]["layers"]
    assert len(layers) >= 10 and result["per_layer"]["samples"] == 20
    sqnrs = [layer["sqnr_db"] for layer in layers]
    assert sqnrs == sorted(sqnrs) and all(10 < s < 100 for s in sqnrs)
    # the three printed rows are the three worst
    printed = [line.split()[1] for line in out.splitlines()[-3:]]
    assert printed == [layer["tensor"] for layer in layers[:3]]
    assert result["accuracy"]["a"] == {"accuracy": 0.75, "correct": 15, "total": 20}
    assert 0 <= result["accuracy"]["b"]["correct"] <= 20


def test_compare_default_labels_key(models, tmp_path, capsys):
    data = tmp_path / "data.npz"
    np.savez(data, input=np.zeros((3, 3, 32, 32), np.float32), labels=np.array([0, 1, 2]))
    assert main(["compare", models["fp32"], models["fp32"], "--data", str(data)]) == 0
    assert "labelled samples ('labels')" in capsys.readouterr().out
    np.savez(data, input=np.zeros((3, 3, 32, 32), np.float32), label=np.array([0, 1, 2]))  # a typo'd key
    assert main(["compare", models["fp32"], models["fp32"], "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "not used: label" in out and "accuracy" not in out


def test_compare_errors(models, tmp_path, capsys):
    fp32 = models["fp32"]
    one_line_error(capsys, main(["compare", fp32, str(tmp_path / "nope.onnx")]), 3, "nope.onnx: no such file")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((2, 3, 32, 32), np.float32))
    one_line_error(capsys, main(["compare", fp32, fp32, "--data", str(wrong)]), 2, "no array for model input",
                   "input", "images")
    one_line_error(capsys, main(["compare", fp32, fp32, "--data", str(wrong), "--labels", "y"]), 2, "no array 'y'")
    one_line_error(capsys, main(["compare", fp32, fp32, "--labels", "y"]), 2, "--data")
    one_line_error(capsys, main(["compare", fp32, fp32, "--data", str(tmp_path / "none.npz")]), 3, "no such file")
    text = tmp_path / "text.npz"
    text.write_text("hello")
    one_line_error(capsys, main(["compare", fp32, fp32, "--data", str(text)]), 3, "not a readable .npz")
    onehot = tmp_path / "onehot.npz"
    np.savez(onehot, input=np.zeros((3, 3, 32, 32), np.float32), labels=np.eye(3))
    one_line_error(capsys, main(["compare", fp32, fp32, "--data", str(onehot)]), 2, "one integer class per sample")
    shape = tmp_path / "shape.npz"
    np.savez(shape, input=np.zeros((2, 3, 16, 16), np.float32))
    one_line_error(capsys, main(["compare", fp32, fp32, "--data", str(shape)]), 2, "(2, 3, 16, 16)")


def test_per_layer_compares_like_for_like_and_never_by_position(zoo_onnx, tmp_path):
    """A Q/DQ model against itself is inf dB on every layer (A's own Q/DQ output is the reference where A quantizes
    a tensor), and compact's short names, which are positions, match nothing between two different models."""
    import graphopt
    from graphopt.report.metrics import per_layer_sqnr

    calib = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    fp32, int8 = str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx")
    graphopt.optimize(zoo_onnx("tiny_resnet"), "fold", output=fp32)
    graphopt.optimize(fp32, "int8:guard=off", calibration=calib, output=int8)
    batches = [{"input": calib[i:i + 1]} for i in range(4)]  # the zoo model's batch is 1
    itself = per_layer_sqnr(int8, int8, batches)
    assert len(itself.rows) > 10 and all(r.sqnr_db == float("inf") for r in itself.rows)
    small_fp32, small_int8 = str(tmp_path / "c32.onnx"), str(tmp_path / "c8.onnx")
    graphopt.optimize(fp32, "compact", output=small_fp32)
    graphopt.optimize(int8, "compact", output=small_int8)
    positions = per_layer_sqnr(small_fp32, small_int8, batches)
    assert {r.tensor for r in positions.rows} == {"input", "output"}  # the names compact keeps: the interface

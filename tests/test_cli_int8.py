"""`graphopt run ... --passes fold,int8 --calib ... --eval ... --bench`: the int8 route from the command line."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from graphopt.cli import main


@pytest.fixture
def digits(digits_files):
    return digits_files


def test_int8_with_calibration_evaluation_and_latency(digits, capsys):
    out, report = digits / "q.onnx", digits / "q.json"
    assert main(["run", str(digits / "digits.onnx"), "--passes", "fold,int8", "--calib", str(digits / "calib.npz"),
                 "--eval", str(digits / "eval.npz"), "--bench", "-o", str(out), "--json", str(report)]) == 0
    text = capsys.readouterr().out
    assert "quantized 10 nodes" in text and "accuracy on 397 labelled samples" in text
    assert "per-layer SQNR, worst first" in text and "latency (p50, batch 1" in text
    assert "warning" not in text  # real calibration data: no synthetic-data warning
    data = json.loads(report.read_text())
    size = data["size_bytes"]
    assert size["after"] < 0.5 * size["before"]
    acc = data["comparison"]["accuracy"]
    assert acc["b"]["accuracy"] >= acc["a"]["accuracy"] - 0.003  # the 0.3-point budget
    assert data["latency_ms"]["after"] > 0 and data["latency_ms"]["before"] > 0
    (output,) = data["comparison"]["outputs"]
    assert output["sqnr_db"] >= 25 and output["top1_agreement"] >= 0.99  # logits close to fp32 on real data
    layers = data["comparison"]["per_layer"]["layers"]
    assert layers and layers[0]["sqnr_db"] <= layers[-1]["sqnr_db"]  # worst first


def test_without_calibration_data_the_warning_is_on_screen_and_in_the_report(digits, capsys):
    report = digits / "synthetic.json"
    assert main(["run", str(digits / "digits.onnx"), "--passes", "fold,int8", "-o", str(digits / "s.onnx"),
                 "--json", str(report)]) == 0
    assert "warning: calibrate: calibrated on synthetic random inputs" in capsys.readouterr().out
    assert any("not fit for production" in w for w in json.loads(report.read_text())["warnings"])


@pytest.mark.parametrize("flag, content, message", [
    ("--calib", None, "does not exist"),
    ("--eval", {"input": np.zeros((2, 1, 16, 16), np.float32)}, "has no labels array 'labels'"),
])
def test_bad_calibration_or_evaluation_data_is_one_line(digits, capsys, flag, content, message, tmp_path):
    path = tmp_path / "data.npz"
    if content is not None:
        np.savez(path, **content)
    out = tmp_path / "never.onnx"
    assert main(["run", str(digits / "digits.onnx"), "--passes", "fold,int8", flag, str(path), "-o", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not os.path.exists(out)


def test_calibration_from_a_folder_of_images(digits, capsys, tmp_path):
    """PNGs of the digits' training images, turned back into model inputs by the image options: 8x8 -> resize
    to 16 -> /255 -> mean 0.3, std 0.4 (the training normalization)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = tmp_path / "images"
    folder.mkdir()
    images = load_digits().images
    for i, image in enumerate(images[:64]):
        Image.fromarray(np.uint8(np.round(image / 16 * 255))).save(folder / f"{i:03d}.png")
    out, report = tmp_path / "img.onnx", tmp_path / "img.json"
    args = ["--calib", str(folder), "--calib-resize", "16", "--calib-mean", "0.3", "--calib-std", "0.4",
            "--eval", str(digits / "eval.npz"), "-o", str(out), "--json", str(report)]
    assert main(["run", str(digits / "digits.onnx"), "--passes", "fold,int8", *args]) == 0
    text = capsys.readouterr().out
    assert "read 64 samples" in text and "warning" not in text
    acc = json.loads(report.read_text())["comparison"]["accuracy"]
    assert acc["b"]["accuracy"] >= acc["a"]["accuracy"] - 0.01


def test_image_options_need_a_calibration_folder(digits, capsys, tmp_path):
    assert main(["run", str(digits / "digits.onnx"), "--passes", "fold,int8", "--calib-resize", "16",
                 "-o", str(tmp_path / "x.onnx")]) == 2
    assert "need --calib FOLDER" in capsys.readouterr().err

"""`graphopt run ... --report DIR`: report.json, report.md and the PNG plots, together, from one run."""

from __future__ import annotations

import json
import os

import pytest

from graphopt.cli import main

pytest.importorskip("matplotlib")


def _image(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(str(path))
    assert pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels.std() > 0  # something is drawn, not a blank canvas
    return pixels


def test_report_dir_holds_json_markdown_and_plots(digits_files, tmp_path, capsys):
    folder = tmp_path / "new" / "report"  # created, parents too
    assert main(["run", str(digits_files / "digits.onnx"), "--passes", "fold,int8", "--calib",
                 str(digits_files / "calib.npz"), "--eval", str(digits_files / "eval.npz"), "--bench",
                 "-o", str(tmp_path / "q.onnx"), "--report", str(folder)]) == 0
    assert "wrote the report into" in capsys.readouterr().out
    assert sorted(os.listdir(folder)) == ["before_after.png", "per_layer_sqnr.png", "report.json", "report.md"]
    _image(folder / "before_after.png")
    _image(folder / "per_layer_sqnr.png")
    data = json.loads((folder / "report.json").read_text())
    md = (folder / "report.md").read_text()
    size, lat, acc = data["size_bytes"], data["latency_ms"], data["comparison"]["accuracy"]
    assert size["after"] < 0.5 * size["before"]  # int8: the numbers are the run's, not placeholders
    assert f"| {size['before']:,} | {size['after']:,} |" in md
    assert f"| {lat['before']:.3f} | {lat['after']:.3f} |" in md
    assert f"| {100 * acc['a']['accuracy']:.2f} | {100 * acc['b']['accuracy']:.2f} |" in md
    worst = data["comparison"]["per_layer"]["layers"][0]
    assert f"| {worst['tensor']} | {worst['op_type']} | {worst['sqnr_db']:.2f} | {worst['cosine']:.6f} |" in md
    assert "![before and after](before_after.png)" in md and "![per-layer SQNR](per_layer_sqnr.png)" in md
    assert not [n for n in os.listdir(folder) if n.startswith(".graphopt-")]  # no staging folder left


def test_report_without_eval_has_no_per_layer_plot(zoo_onnx, tmp_path):
    folder = tmp_path / "r"
    assert main(["run", zoo_onnx("tiny_resnet"), "-o", str(tmp_path / "o.onnx"), "--report", str(folder), "-q"]) == 0
    assert sorted(os.listdir(folder)) == ["before_after.png", "report.json", "report.md"]
    _image(folder / "before_after.png")
    assert "Per-layer" not in (folder / "report.md").read_text()


@pytest.mark.parametrize("target", ["file", "model"])
def test_bad_report_dir_is_one_line_and_writes_nothing(zoo_onnx, tmp_path, capfd, target):
    model = tmp_path / "m.onnx"
    model.write_bytes(open(zoo_onnx("tiny_resnet"), "rb").read())
    bad = tmp_path / "taken.txt"
    bad.write_text("not a folder")
    report = bad if target == "file" else model
    before = sorted(os.listdir(tmp_path))
    assert main(["run", str(model), "-o", str(tmp_path / "o.onnx"), "--report", str(report)]) != 0
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("graphopt: error: --report") and "not a folder" in err[0]
    assert sorted(os.listdir(tmp_path)) == before  # no model, no report, no temp folder
    assert bad.read_text() == "not a folder"


def test_report_dir_inside_an_input_folder_is_refused(digits_files, tmp_path, capfd):
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "c.npz").write_bytes((digits_files / "calib.npz").read_bytes())
    assert main(["run", str(digits_files / "digits.onnx"), "--passes", "fold,int8", "--calib", str(calib),
                 "-o", str(tmp_path / "q.onnx"), "--report", str(calib / "r")]) == 2
    assert "inside the calibration data folder" in capfd.readouterr().err
    assert os.listdir(calib) == ["c.npz"]

"""Files a user (or someone sending them a model or recipe) gets wrong on purpose or by accident: devices and pipes as
inputs, damaged .npz files, links that lead an output elsewhere, recipes that name files, external data behind a
--json path, one-shot calibration iterators, a module that branches on its batch size. Each is one line and a
documented exit code, and nothing a run reads is written."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import graphopt
from graphopt.cli import main


@pytest.fixture
def external(tmp_path):
    """A model in its own folder whose weights are external data (w.data)."""
    folder = tmp_path / "m"
    folder.mkdir()
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [onnx.numpy_helper.from_array(w, "w")])
    path = str(folder / "m.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path,
              save_as_external_data=True, location="w.data", size_threshold=0)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).standard_normal((8, 1, 64)).astype(np.float32))
    return path


@pytest.fixture
def tiny(tmp_path, zoo_onnx):
    """The zoo's tiny ResNet (input 'input', 1x3x32x32, BatchNorm kept), copied."""
    import shutil

    path = str(tmp_path / "tiny.onnx")
    shutil.copyfile(zoo_onnx("tiny_resnet"), path)
    return path


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("graphopt: error: "), err
    return err[0]


def test_json_never_overwrites_a_models_external_data(external, tmp_path, capsys):
    data = os.path.join(os.path.dirname(external), "w.data")
    before = open(data, "rb").read()
    calib = str(tmp_path / "calib.npz")
    assert main(["sensitivity", external, "--calib", calib, "--json", data, "--executor", "inprocess"]) == 2
    assert "is the input model's external data" in _error(capsys)
    assert main(["verify", "--backend", "tensorrt", external, "--json", data]) == 2
    assert "is the input model's external data" in _error(capsys)
    assert open(data, "rb").read() == before


def test_a_pipe_or_a_device_is_refused_not_read_forever(tmp_path, capsys, tiny):
    fifo = str(tmp_path / "fifo.onnx")
    os.mkfifo(fifo)
    for argv in (["inspect", fifo], ["run", fifo, "-o", str(tmp_path / "o.onnx")], ["bench", fifo],
                 ["inspect", "/dev/zero"], ["run", tiny, "--recipe", "/dev/zero", "-o", str(tmp_path / "r.onnx")]):
        assert main(argv) == 3, argv
        assert "not a regular file" in _error(capsys)


@pytest.mark.parametrize("damage", ["crc", "single-array", "pickle"])
def test_damaged_data_files_are_named_with_exit_3(tmp_path, capsys, tiny, damage):
    path = str(tmp_path / "d.npz")
    if damage == "single-array":
        path = str(tmp_path / "d.npy")
        np.save(path, np.zeros((2, 3, 32, 32), np.float32))
    elif damage == "pickle":
        np.savez(path, input=np.array([{"a": 1}], dtype=object))
    else:
        np.savez(path, input=np.zeros((2, 3, 32, 32), np.float32))
        raw = bytearray(open(path, "rb").read())
        raw[200] ^= 0xFF  # inside the member's data: its CRC no longer matches
        open(path, "wb").write(bytes(raw))
        with zipfile.ZipFile(path) as zf:
            assert zf.testzip() is not None
    out = str(tmp_path / "o.onnx")
    assert main(["compare", tiny, tiny, "--data", path]) == 3
    assert path in _error(capsys)
    if damage != "single-array":
        assert main(["run", tiny, "--passes", "fold,int8", "--calib", path, "-o", out]) == 3
        assert path in _error(capsys)
        assert not os.path.exists(out)


def test_a_recipe_may_not_choose_files(tmp_path, capsys, tiny):
    from graphopt.paths import file_sha256

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"kind: graphopt-recipe\nmodel_sha256: {file_sha256(tiny)}\nbackend: onnxruntime\n"
                      f"passes: fold,compact:map={victim}\n")
    assert main(["run", tiny, "--recipe", str(recipe), "-o", str(tmp_path / "o.onnx")]) == 2
    assert "names a file (map=" in _error(capsys) and victim.read_text() == "precious"
    recipe.write_text(f"kind: graphopt-recipe\nmodel_sha256: {file_sha256(tiny)}\nbackend: 42\npasses: fold\n")
    assert main(["run", tiny, "--recipe", str(recipe), "-o", str(tmp_path / "o.onnx")]) == 2
    assert "'backend' must be a text" in _error(capsys)


def test_an_output_link_is_checked_where_it_leads_before_any_pass(tmp_path, capsys, tiny):
    link = tmp_path / "l.onnx"
    link.symlink_to("/proc/version")
    assert main(["run", tiny, "-o", str(link)]) == 7
    assert "cannot write in /proc" in _error(capsys)
    snapshots = tmp_path / "snaps"
    snapshots.mkdir()
    fifo = tmp_path / "victim.fifo"
    os.mkfifo(fifo)
    (snapshots / "01-eliminate-identity.onnx").symlink_to(fifo)
    assert main(["run", tiny, "-o", str(tmp_path / "o.onnx"), "--snapshot-dir", str(snapshots)]) == 7
    assert "exists and is not a regular file" in _error(capsys)
    assert not os.path.isfile(fifo) and not (tmp_path / "o.onnx").exists()
    assert main(["run", tiny, "-o", str(tmp_path / "o.onnx"), "--snapshot-dir", str(tmp_path / ("a" * 300))]) == 7
    assert "a name longer than" in _error(capsys)


def test_a_one_shot_calibration_iterator_is_read_whole():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 8 * 8, 10)).eval()
    x = torch.randn(96, 3, 8, 8)
    batches = ((x[i:i + 32],) for i in range(0, 96, 32))
    result = graphopt.optimize(model, "int8", example_inputs=(x[:1],), calibration=batches, backend="x86")
    calibrate = next(r for r in result.report.records if r.name == "calibrate")
    assert "read 96 samples" in calibrate.changes, calibrate.changes


def test_a_module_that_branches_on_its_batch_is_captured_at_the_example_batch():
    class Branches(torch.nn.Module):
        """Another computation for a batch of one: a capture traced at batch 2 must not answer for batch 1."""

        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x)).mean((2, 3))
            return y * 2 if x.shape[0] == 1 else y - 1

    torch.manual_seed(0)
    model, x = Branches().eval(), torch.randn(1, 3, 8, 8)
    result = graphopt.optimize(model, "fold", example_inputs=(x,))
    with torch.no_grad():
        assert torch.allclose(result.graph.gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_error_lines_escape_what_a_model_carries():
    from graphopt.cli import printable

    assert printable("w.data\ngraphopt: error: forged\x1b[31m\x00") == \
        "w.data\\ngraphopt: error: forged\\x1b[31m\\x00"


def test_the_command_line_starts_before_the_heavy_imports():
    """`import graphopt.cli` loads neither onnx nor numpy: a Ctrl-C while they load happens inside main(), which
    says "graphopt: interrupted" (exit 130), not a traceback."""
    import subprocess
    import sys

    code = "import sys, graphopt.cli; print(sorted(m for m in ('onnx', 'numpy', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_module_in_train_mode_is_said_to_be_optimized_in_eval_mode():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.ReLU())
    assert model.training
    result = graphopt.optimize(model, "fold", example_inputs=(torch.randn(1, 4),))
    assert any("was in train() mode" in w for w in result.report.warnings), result.report.warnings
    assert model.training  # the caller's module is left as it was


def test_suffixes_are_read_whatever_their_case(tiny, tmp_path, capsys):
    assert main(["run", tiny, "-o", str(tmp_path / "x.PT2")]) == 2  # an ONNX model is not written as a .pt2
    assert "an ONNX model is written as .onnx" in _error(capsys)
    assert main(["run", tiny, "-o", str(tmp_path / "x.ONNX"), "-q"]) == 0
    assert onnx.load(str(tmp_path / "x.ONNX")).graph.node


def test_nodes_that_share_a_name_are_renamed_on_load(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["h"], name="n"), helper.make_node("Neg", ["h"], ["y"], name="n")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = str(tmp_path / "dup.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    result = graphopt.optimize(path, "fold", output=str(tmp_path / "o.onnx"))
    assert [n.name for n in result.graph.gs.nodes] == ["n", "n_1"]
    assert result.report.checks["numeric"]["compared"]  # onnxruntime loads it now: the check ran


def test_labels_out_of_the_models_classes_are_refused(tiny, tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((6, 3, 32, 32)).astype(np.float32)
    for bad in (10, -1):  # the model has 10 classes: a label 10 or -1 counted as wrong for every model alike
        labels = np.array([0, 1, 2, 3, 4, bad])
        np.savez(tmp_path / "e.npz", input=x, labels=labels)
        assert main(["run", tiny, "--eval", str(tmp_path / "e.npz"), "-o", str(tmp_path / "o.onnx"), "-q"]) == 2
        assert "labels must be classes 0 to 9 of the model's 10 outputs" in _error(capsys)
        assert main(["compare", tiny, tiny, "--data", str(tmp_path / "e.npz")]) == 2
        assert "labels must be classes 0 to 9" in _error(capsys)


def test_json_reports_are_strict_json():
    import json

    from graphopt.report.layers import json_text

    text = json_text({"a": float("nan"), "b": [float("inf"), np.float32(-np.inf)], "c": 1.5})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == \
        {"a": None, "b": ["inf", "-inf"], "c": 1.5}


def test_macs_are_per_sample_whatever_the_examples_batch():
    from graphopt.ir.fx_graph import FxGraph
    from graphopt.report.cost import model_costs

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4)).eval()
    macs = {b: model_costs(FxGraph.from_exported(torch.export.export(model, (torch.randn(b, 3, 8, 8),), dynamic_shapes=(
        {0: torch.export.Dim("b")},)))).macs for b in (2, 4)}
    assert macs[2] == macs[4] == 8 * 3 * 9 * 36 + 288 * 4, macs


def test_inputs_too_large_to_generate_are_not_allocated(tmp_path):
    """A declared input of 2e9 x 4 floats (32 GB): the check says why it compares nothing, without trying."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2_000_000_000, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2_000_000_000, 4])])
    path = str(tmp_path / "huge.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    result = graphopt.optimize(path, "fold")
    assert not result.report.checks["numeric"]["compared"]
    assert "generated inputs would take 29.8 GiB" in result.report.checks["numeric"]["reason"]

"""No file graphopt reads is ever written, every output is checked before a pass runs, and a failed run leaves
nothing behind: each case of the issue, through the command line, with the folder's bytes compared after."""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import onnx
import pytest

from graphopt.cli import main


def snapshot(folder) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256): what must be byte-identical after a refused run."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.fixture
def model(tmp_path, zoo_onnx):
    path = tmp_path / "in.onnx"
    shutil.copy(zoo_onnx("tiny_resnet"), path)
    return path


@pytest.fixture
def external(tmp_path, zoo_onnx):
    """The tiny ResNet saved with its weights in in.onnx.data."""
    path = tmp_path / "in.onnx"
    onnx.save_model(onnx.load(zoo_onnx("tiny_resnet")), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="in.onnx.data", size_threshold=0)
    assert (tmp_path / "in.onnx.data").exists()
    return path


def refused(capsys, argv, code, *fragments, folder=None):
    before = snapshot(folder) if folder else None
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("graphopt: error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    if folder:
        assert snapshot(folder) == before  # nothing written, nothing changed, no temp files
    return err[0]


def test_json_over_the_input_is_refused(model, tmp_path, capsys):
    refused(capsys, ["run", str(model), "--json", str(model)], 2, "--json", "is the input model", folder=tmp_path)


def test_output_over_the_inputs_external_data_is_refused(external, tmp_path, capsys):
    refused(capsys, ["run", str(external), "-o", str(tmp_path / "in.onnx.data")], 2, "external data",
            folder=tmp_path)


def test_output_whose_data_file_is_the_inputs_is_refused(tmp_path, zoo_onnx, capsys):
    """-o x.onnx would write x.onnx.data: here that is the file the input model reads its weights from."""
    (tmp_path / "m").mkdir()
    path = tmp_path / "m" / "in.onnx"
    onnx.save_model(onnx.load(zoo_onnx("tiny_resnet")), str(path), save_as_external_data=True,
                    location="out.onnx.data", size_threshold=0)
    refused(capsys, ["run", str(path), "-o", str(tmp_path / "m" / "out.onnx")], 2, "-o (its external data)",
            folder=tmp_path)


def test_reproducer_in_the_models_folder_cannot_overwrite_it(tmp_path, zoo_onnx, capsys, monkeypatch):
    shutil.copy(zoo_onnx("tiny_resnet"), tmp_path / "input.onnx")
    monkeypatch.chdir(tmp_path)
    refused(capsys, ["run", "input.onnx", "--reproducer", ".", "-o", "out.onnx"], 2, "--reproducer",
            "is the input model", folder=tmp_path)


def test_snapshots_cannot_overwrite_an_input(tmp_path, zoo_onnx, capsys, monkeypatch):
    shutil.copy(zoo_onnx("tiny_resnet"), tmp_path / "02-fold-constants.onnx")
    monkeypatch.chdir(tmp_path)
    refused(capsys, ["run", "02-fold-constants.onnx", "--snapshot-dir", ".", "-o", "out.onnx"], 2,
            "--snapshot-dir", folder=tmp_path)


def test_links_to_an_input_are_caught(model, tmp_path, capsys):
    os.symlink(model, tmp_path / "soft.onnx")
    os.link(model, tmp_path / "hard.onnx")
    refused(capsys, ["run", str(model), "-o", str(tmp_path / "soft.onnx")], 2, "is the input model",
            folder=tmp_path)
    refused(capsys, ["run", str(model), "-o", str(tmp_path / "hard.onnx")], 2, "is the input model",
            folder=tmp_path)


def test_outputs_into_calibration_or_eval_data_are_refused(model, tmp_path, capsys):
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "0.npy", np.zeros((1, 3, 32, 32), np.float32))
    refused(capsys, ["run", str(model), "--passes", "fold,int8", "--calib", str(calib), "-o",
                     str(calib / "out.onnx")], 2, "calibration data folder", folder=tmp_path)
    np.savez(tmp_path / "eval.npz", input=np.zeros((2, 3, 32, 32), np.float32), labels=np.zeros(2, np.int64))
    refused(capsys, ["run", str(model), "--eval", str(tmp_path / "eval.npz"), "--json", str(tmp_path / "eval.npz")],
            2, "evaluation data", folder=tmp_path)


def test_two_outputs_on_one_path_are_refused(model, tmp_path, capsys):
    refused(capsys, ["run", str(model), "-o", str(tmp_path / "o.onnx"), "--json", str(tmp_path / "o.onnx")], 2,
            "also the output of -o", folder=tmp_path)


@pytest.mark.parametrize("case", ["onto a directory", "missing folder", "json into a missing folder"])
def test_bad_targets_are_io_errors_before_any_pass(model, tmp_path, capsys, case):
    (tmp_path / "adir").mkdir()
    argv = {"onto a directory": ["-o", str(tmp_path / "adir")],
            "missing folder": ["-o", str(tmp_path / "nope" / "o.onnx")],
            "json into a missing folder": ["-o", str(tmp_path / "o.onnx"), "--json", str(tmp_path / "no" / "r.json")],
            }[case]
    refused(capsys, ["run", str(model), *argv], 7, folder=tmp_path)


@pytest.mark.parametrize("kind", ["pipe", "broken link"])
def test_a_target_that_is_not_a_regular_file_is_refused(model, tmp_path, capsys, kind):
    """A device (/dev/null, /dev/full: as root they would be replaced), a pipe or a broken link is not a file to
    replace: refused, and left as it was."""
    target = tmp_path / "target.onnx"
    if kind == "pipe":
        os.mkfifo(target)
    else:
        os.symlink(tmp_path / "nowhere" / "x.onnx", target)
    refused(capsys, ["run", str(model), "-o", str(target)], 7, "is not a regular file")
    assert (target.is_fifo() if kind == "pipe" else target.is_symlink() and not target.exists())


def test_a_link_to_a_file_is_written_through(model, tmp_path, capsys):
    """As a shell's > does: the link stays a link, its target gets the model."""
    (tmp_path / "real.onnx").write_bytes(b"old")
    os.symlink(tmp_path / "real.onnx", tmp_path / "link.onnx")
    assert main(["run", str(model), "-o", str(tmp_path / "link.onnx"), "-q"]) == 0
    assert (tmp_path / "link.onnx").is_symlink()
    onnx.checker.check_model(onnx.load(str(tmp_path / "real.onnx")))


def test_files_named_in_pass_options_and_recipes_are_never_written(tmp_path, capsys, digits_files):
    """eval= (read) and plot= (written) of a pass, and --recipe, are in the plan with -o and --json: an output
    over one of them is refused, and plot= into a missing folder is an I/O error, before any pass runs."""
    model, calib, evaluation = (str(digits_files / name) for name in ("digits.onnx", "calib.npz", "eval.npz"))
    shutil.copy(evaluation, tmp_path / "ev.npz")
    refused(capsys, ["run", model, "--passes", f"fold,int8-budget:max_drop=1:eval={tmp_path / 'ev.npz'}", "--calib",
                     calib, "-o", str(tmp_path / "ev.npz")], 2, "is the labelled data (eval=) of mixed-precision",
            folder=tmp_path)
    refused(capsys, ["run", model, "--passes", f"fold,prune:budget=macs@0.5:plot={tmp_path / 'no' / 'p.png'}",
                     "--calib", calib, "-o", str(tmp_path / "o.onnx")], 7, "prune-channels:plot=", "does not exist",
            folder=tmp_path)
    (tmp_path / "r.yaml").write_bytes(b"\xff\xfe not text")
    refused(capsys, ["run", model, "--recipe", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o.onnx")], 2,
            "not a text file", folder=tmp_path)


def test_the_api_checks_its_paths_as_the_command_line_does(model, tmp_path):
    import graphopt
    from graphopt.errors import OutputError, UsageError

    before = snapshot(tmp_path)
    with pytest.raises(UsageError, match="output= .*is the input model"):
        graphopt.optimize(str(model), "fold", output=str(model))
    with pytest.raises(OutputError, match="snapshot_dir= .*exists and is not a folder"):
        graphopt.optimize(str(model), "fold", snapshot_dir=str(model))
    assert snapshot(tmp_path) == before


def test_a_folder_that_refuses_writes_is_an_io_error(model, tmp_path, capsys, monkeypatch):
    """(Tests run as root, whom permission bits do not stop: the refusal is simulated where the write is tried.)"""
    import tempfile

    readonly = tmp_path / "ro"
    readonly.mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.realpath(dir) == os.path.realpath(readonly):
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    refused(capsys, ["run", str(model), "-o", str(readonly / "o.onnx")], 7, "Permission denied", folder=tmp_path)


def test_failed_eval_leaves_no_output(model, tmp_path, capsys):
    np.savez(tmp_path / "eval.npz", input=np.zeros((2, 3, 32, 32), np.float32))  # no labels array
    refused(capsys, ["run", str(model), "--eval", str(tmp_path / "eval.npz"), "-o", str(tmp_path / "o.onnx")], 2,
            "no labels array", folder=tmp_path)


def test_the_same_command_twice_with_external_data(external, tmp_path, capsys):
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    for _ in range(2):
        assert main(["run", str(external), "-o", str(out), "-q"]) == 0
    assert sorted(os.listdir(out.parent)) == ["o.onnx", "o.onnx.data"]
    loaded = onnx.load(str(out), load_external_data=False)
    assert {e.value for t in loaded.graph.initializer for e in t.external_data if e.key == "location"} == \
        {"o.onnx.data"}


def test_an_unrelated_data_file_in_the_working_folder_does_not_block(external, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "o.onnx.data").write_bytes(b"someone else's file")
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(work)
    assert main(["run", str(external), "-o", str(tmp_path / "other" / "o.onnx"), "-q"]) == 0
    assert (work / "o.onnx.data").read_bytes() == b"someone else's file"
    assert sorted(os.listdir(tmp_path / "other")) == ["o.onnx", "o.onnx.data"]


@pytest.mark.parametrize("plugin", ["no_such_module_anywhere", "tests.raising_plugin"])
def test_a_named_plugin_that_does_not_load_is_an_error(model, tmp_path, capsys, plugin):
    refused(capsys, ["run", str(model), "-p", plugin, "-o", str(tmp_path / "o.onnx")], 2, f"-p {plugin}",
            folder=tmp_path)


def test_result_save_never_writes_what_the_run_read(tmp_path, zoo_onnx):
    """OptimizeResult.save() runs the same check as output=: not onto the input model (nor its calibration
    data), and a path must be a path."""
    import graphopt
    from graphopt.errors import UsageError

    path = str(tmp_path / "m.onnx")
    shutil.copyfile(zoo_onnx("tiny_resnet"), path)
    calib = str(tmp_path / "c.npy")
    np.save(calib, np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    before = snapshot(tmp_path)
    result = graphopt.optimize(path, "fold,int8", calibration=calib)
    for target in (path, calib):
        with pytest.raises(UsageError, match="graphopt never writes a file it reads"):
            result.save(target)
    with pytest.raises(UsageError, match="must be a path"):
        graphopt.optimize(path, "fold", output=123)
    assert snapshot(tmp_path) == before
    result.save(str(tmp_path / "out.onnx"))
    assert onnx.load(str(tmp_path / "out.onnx")).graph.node


def test_bench_and_compare_never_write_json_over_what_they_read(model, tmp_path, capsys):
    data = tmp_path / "data.npz"
    np.savez(data, input=np.zeros((2, 3, 32, 32), np.float32))
    refused(capsys, ["bench", str(model), "--iters", "1", "--json", str(model)], 2, "is the input model",
            folder=tmp_path)
    for target, what in ((model, "model A"), (data, "--data")):
        refused(capsys, ["compare", str(model), str(model), "--data", str(data), "--json", str(target)], 2,
                f"is the {what}", folder=tmp_path)


def test_files_backend_options_name_are_checked_like_the_output(model, tmp_path, capsys):
    """openvino:save_ir= and tensorrt:engine= write files beside the model: the same check as -o (never a file the
    run reads; an engine's folder must exist, the IR's folder is made as --report's is), before any pass runs."""
    pytest.importorskip("openvino")
    ir_input = tmp_path / "net.xml"  # an ONNX model under an IR name: graphopt reads by content
    shutil.copy(model, ir_input)
    refused(capsys, ["run", str(ir_input), "--backend", f"openvino:save_ir={tmp_path}", "-o",
                     str(tmp_path / "net.onnx")], 2, "--save-ir", "is the input model", folder=tmp_path)
    refused(capsys, ["run", str(model), "--backend", f"openvino:save_ir={model}", "-o",  # a file: no folder
                     str(tmp_path / "o.onnx")], 7, "exists and is not a folder", folder=tmp_path)
    refused(capsys, ["run", str(model), "--backend", f"tensorrt:engine={tmp_path / 'missing' / 'e.engine'}",
                     "--emit-trtexec", "-o", str(tmp_path / "o.onnx")], 7, "does not exist", folder=tmp_path)
    refused(capsys, ["run", str(model), "--backend", f"tensorrt:engine={model}", "--emit-trtexec", "-o",
                     str(tmp_path / "o.onnx")], 2, "tensorrt:engine=", "is the input model", folder=tmp_path)


def test_reports_are_written_with_the_usual_permissions(model, tmp_path):
    """--json (and recipes, through the same writer) get the umask's permissions, as the model does: mkstemp's 0600
    made them unreadable to the rest of a CI team."""
    old = os.umask(0o022)
    try:
        assert main(["run", str(model), "--passes", "fold", "-o", str(tmp_path / "o.onnx"), "--json",
                     str(tmp_path / "r.json"), "-q"]) == 0
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "r.json").st_mode & 0o777) == oct(os.stat(tmp_path / "o.onnx").st_mode & 0o777)
    assert os.stat(tmp_path / "r.json").st_mode & 0o044

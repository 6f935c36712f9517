"""The CLI end to end: `graphopt run` on real models, and every kind of bad input -> one line, non-zero exit,
no traceback, input untouched, no output left behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphopt.cli import main

HELPERS = ["-p", "tests.helpers"]
FOLD = ["eliminate-identity", "fold-constants", "fold-bn", "eliminate-dead"]


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def run_outputs(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture
def model(tmp_path, zoo_onnx):
    path = tmp_path / "model.onnx"
    shutil.copy(zoo_onnx("tiny_resnet"), path)
    return path


def test_run_fold_writes_beside_input_and_reports(model, capsys):
    before = digest(model)
    assert main(["run", str(model), "--passes", "fold", "--json", str(model.parent / "report.json")]) == 0
    out = capsys.readouterr().out
    assert digest(model) == before
    opt = model.parent / "model.opt.onnx"
    assert opt.exists()
    assert "folded 12 BatchNormalization" in out
    for name in ("eliminate-identity", "fold-constants", "fold-bn", "eliminate-dead"):
        assert name in out
    optimized = onnx.load(str(opt))
    assert not [n for n in optimized.graph.node if n.op_type == "BatchNormalization"]
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ref, got = run_outputs(model, x), run_outputs(opt, x)
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))
    report = json.loads((model.parent / "report.json").read_text())
    assert report["input"]["nodes"] == 41 and report["output"]["nodes"] == 29
    assert [p["name"] for p in report["passes"]] == FOLD
    fold_bn = report["passes"][2]
    assert fold_bn["modified"] and fold_bn["stats"] == {"folded BatchNormalization": 12}
    assert fold_bn["checks"]["max_rel_err"] <= 1e-5


def test_second_run_reports_nothing_changed(model, capsys):
    assert main(["run", str(model), "-o", str(model.parent / "a.onnx"), "-q"]) == 0
    assert main(["run", str(model.parent / "a.onnx"), "-o", str(model.parent / "b.onnx"),
                 "--json", str(model.parent / "b.json"), "-q"]) == 0
    report = json.loads((model.parent / "b.json").read_text())
    assert not any(p["modified"] for p in report["passes"])
    assert capsys.readouterr().out == ""


def test_snapshots_and_verify_each(model, tmp_path):
    snaps = tmp_path / "snaps"
    args = ["-o", str(tmp_path / "o.onnx"), "--verify-each", "--snapshot-dir", str(snaps), "-q"]
    assert main(["run", str(model), *args]) == 0
    assert sorted(os.listdir(snaps)) == ["01-eliminate-identity.onnx", "02-fold-constants.onnx", "03-fold-bn.onnx",
                                         "04-eliminate-dead.onnx"]


def test_bisect_names_the_pass_that_broke_equivalence(model, capsys):
    assert main(["run", str(model), "--passes", "broken-fold", "--bisect", *HELPERS]) == 6
    out = capsys.readouterr().out
    assert "pass #5 'scale-weights' is the first that broke equivalence" in out
    assert not (model.parent / "model.opt.onnx").exists()
    assert main(["run", str(model), "--passes", "fold", "--bisect"]) == 0
    assert "the 4 exact pass(es) searched keep the outputs" in capsys.readouterr().out
    assert main(["run", str(model), "--passes", "sparsify:sparsity=0.9", "--bisect"]) == 0
    assert "bisect: nothing to search: sparsify:sparsity=0.9 is not held to equivalence" in capsys.readouterr().out


def test_numeric_check_stops_a_pass_that_lies_about_being_exact(model, capsys):
    assert main(["run", str(model), "--passes", "broken-fold", *HELPERS]) == 6
    err = capsys.readouterr().err
    assert err.startswith("graphopt: error: pass 'scale-weights': declares itself exact but changed the outputs")
    assert not (model.parent / "model.opt.onnx").exists()


def test_approximate_pass_is_measured_not_failed(model, capsys):
    assert main(["run", str(model), "--passes", "approx-noise", *HELPERS]) == 0
    out = capsys.readouterr().out
    assert "rel.err" in out


def test_reproducer_saves_the_failing_input(model, tmp_path, capsys):
    args = ["--passes", "fold,exploding", "--reproducer", str(tmp_path / "crash"), *HELPERS]
    assert main(["run", str(model), *args]) == 5
    assert "pass 'exploding': RuntimeError: boom" in capsys.readouterr().err
    assert (tmp_path / "crash" / "input.onnx").exists()
    assert "--passes exploding" in (tmp_path / "crash" / "reproduce.txt").read_text()


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _invalid_graph(tmp_path):
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { y = Add(x, missing) }""")
    path = tmp_path / "invalid.onnx"
    path.write_bytes(model.SerializeToString())
    return path


BAD_INPUTS = {
    "missing file": (lambda tmp, model: tmp / "nope.onnx", [], "no such file"),
    "not onnx": (lambda tmp, model: _write(tmp / "text.onnx", b"this is not a model\n" * 20), [], "not"),
    "truncated": (lambda tmp, model: _write(tmp / "trunc.onnx", model.read_bytes()[: model.stat().st_size // 2]), [],
                  "model"),
    "empty": (lambda tmp, model: _write(tmp / "empty.onnx", b""), [], "not an ONNX model"),
    "invalid graph": (lambda tmp, model: _invalid_graph(tmp), [], "invalid ONNX graph"),
    "directory": (lambda tmp, model: tmp, [], "is a directory"),
    "unknown pass": (lambda tmp, model: model, ["--passes", "fold,shrink"], "unknown pass 'shrink'"),
    "malformed option": (lambda tmp, model: model, ["--passes", "typed-options:ratio=lots", *HELPERS],
                         "option 'ratio' expects a number"),
    "unknown option": (lambda tmp, model: model, ["--passes", "fold-bn:speed=11"], "has no option 'speed'"),
    "wrong IR": (lambda tmp, model: model, ["--passes", "fx-only", *HELPERS], "runs on fx graphs, not onnx"),
    "output over input": (lambda tmp, model: model, ["-o", "SELF"], "never writes a file it reads"),
    "bad flag": (lambda tmp, model: model, ["--frobnicate"], "unrecognized arguments"),
    "negative rtol": (lambda tmp, model: model, ["--rtol=-1"], "rtol must be a number >= 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_and_nonzero_exit(case, model, tmp_path):
    make, extra, message = BAD_INPUTS[case]
    path = make(tmp_path, model)
    extra = [str(path) if a == "SELF" else a for a in extra]
    listing = sorted(os.listdir(tmp_path))
    hashes = {p: digest(tmp_path / p) for p in listing if (tmp_path / p).is_file()}
    proc = subprocess.run([sys.executable, "-m", "graphopt", "run", str(path), *extra],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("graphopt: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert sorted(os.listdir(tmp_path)) == listing  # no output, no temp folder left behind
    assert {p: digest(tmp_path / p) for p in hashes} == hashes  # inputs untouched


def test_debug_shows_the_traceback(model):
    proc = subprocess.run([sys.executable, "-m", "graphopt", "run", str(model), "--passes", "nope", "--debug"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_passes_lists_every_pass_alias_and_option(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("eliminate-identity", "fold-constants", "fold-bn", "eliminate-dead"):
        assert f"{name}  [" in out
    assert "fold  = eliminate-identity,fold-constants,fold-bn,eliminate-dead  [alias" in out
    assert "option fold_into_gemm: bool = true" in out


def test_inspect_and_verify(model, capsys):
    assert main(["inspect", str(model)]) == 0
    out = capsys.readouterr().out
    assert "41 nodes" in out and "12  BatchNormalization" in out
    assert main(["verify", str(model)]) == 0
    assert "valid; ran on sample inputs, outputs (1, 10)" in capsys.readouterr().out


def test_run_on_a_pytorch_file(tmp_path, capsys):
    import torch

    from graphopt.ir import load_model
    from graphopt.zoo import tiny_resnet

    module = tiny_resnet()
    torch.save(module, tmp_path / "m.pt")
    assert main(["run", str(tmp_path / "m.pt"), "--input-shape", "2x3x32x32"]) == 3  # a pickle carries code
    err = capsys.readouterr().err
    assert "holds a pickled nn.Module" in err and "--trust-pickle" in err
    assert main(["run", str(tmp_path / "m.pt"), "--trust-pickle"]) == 2
    assert "needs example inputs" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "m.pt"), "--trust-pickle", "--input-shape", "2x3x32x32"]) == 0
    assert "folded 12 BatchNormalization" in capsys.readouterr().out
    graph = load_model(str(tmp_path / "m.opt.pt2"))  # a torch.export program: reloads without trusting a pickle
    assert graph.captured_with == "torch.export" and tuple(graph.example_inputs[0].shape) == (2, 3, 32, 32)
    assert graph.ir == "fx" and "batch_norm.default" not in graph.op_counts()  # ATen names now
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = module(x)
    got = torch.from_numpy(graph.run({graph.input_names()[0]: x.numpy()})[0])
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_fold_on_the_dynamo_exporters_raw_output(tmp_path, capsys):
    """torch.onnx's default exporter with its optimizer off writes zero conv biases as Expand(CastLike(0, x)):
    fold turns them into constants and then folds every BatchNormalization."""
    from graphopt import zoo

    path = str(tmp_path / "dyn.onnx")
    zoo.export_onnx(zoo.tiny_resnet(), path, (1, 3, 32, 32), exporter="dynamo")
    before = onnx.load(path)
    assert {"BatchNormalization", "CastLike", "Expand"} <= {n.op_type for n in before.graph.node}
    assert main(["run", path, "-o", str(tmp_path / "out.onnx"), "--verify-each"]) == 0
    assert "folded 12 BatchNormalization" in capsys.readouterr().out
    after = onnx.load(str(tmp_path / "out.onnx"))
    ops = {n.op_type for n in after.graph.node}
    assert len(after.graph.node) == 29 and not {"BatchNormalization", "CastLike", "Expand"} & ops
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ref, got = run_outputs(path, x), run_outputs(tmp_path / "out.onnx", x)
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))


def test_charts_without_matplotlib_are_refused_before_any_work(model, tmp_path, capsys, monkeypatch):
    """matplotlib is not in the base install: --report, sensitivity's --plot and prune's plot= say so in one line,
    exit 4, before anything runs or is written (--report was exit 70 after writing the model and an empty folder)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    np.savez(tmp_path / "c.npz", input=np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "out.onnx"
    for argv in (["run", str(model), "--passes", "fold", "-o", str(out), "--report", str(tmp_path / "rep")],
                 ["sensitivity", str(model), "--calib", str(tmp_path / "c.npz"), "--plot", str(tmp_path / "s.png")],
                 ["run", str(model), "--passes", "prune:budget=macs@0.5:plot=" + str(tmp_path / "f.png"), "--calib",
                  str(tmp_path / "c.npz"), "-o", str(out)]):
        assert main(argv) == 4, argv
        err = capsys.readouterr().err
        assert "matplotlib, which is not installed: pip install 'graphopt[plots]'" in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["c.npz", "model.onnx"]


def test_an_interrupt_after_the_model_is_written_leaves_nothing_behind(model, tmp_path, capsys, monkeypatch):
    """Ctrl-C while --json / --report are written, after the model moved into place: exit 130 and the files the
    run created are gone, the report folder it made too (the model and an empty folder stayed)."""
    from graphopt.report import report_dir

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_dir, "write_report_dir", interrupted)
    out = tmp_path / "out.onnx"
    before = sorted(os.listdir(tmp_path))
    assert main(["run", str(model), "--passes", "fold", "-o", str(out), "--json", str(tmp_path / "r.json"),
                 "--report", str(tmp_path / "rep")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before

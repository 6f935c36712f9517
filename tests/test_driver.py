"""One driver behind `graphopt run` and `graphopt.optimize`: the same pipeline gives the same model and the same
report either way; and the driver's own contracts (staged writes, culprits named, the mutation contract)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest

import graphopt
from graphopt import Pass, PassResult
from graphopt.cli import main
from graphopt.errors import NumericMismatchError, PassError
from graphopt.plugins import load_registry
from tests import helpers


def _report(passes: list[dict]) -> list[dict]:
    """A report's rows without what depends on the clock."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in passes]


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


@pytest.mark.parametrize("pipeline", ["fold", "fold,int8", "fold,prune:ratio=0.25", "fp16", "int8-dynamic"])
def test_cli_and_api_give_the_same_model_and_report(zoo_onnx, tmp_path, capsys, pipeline):
    model = tmp_path / "m.onnx"
    shutil.copy(zoo_onnx("tiny_resnet"), model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32))
    cli_out, api_out = tmp_path / "cli.onnx", tmp_path / "api.onnx"
    assert main(["run", str(model), "--passes", pipeline, "--calib", str(calib), "-o", str(cli_out), "--json",
                 str(tmp_path / "r.json"), "-q"]) == 0
    result = graphopt.optimize(str(model), pipeline, calibration=str(calib), output=str(api_out))
    cli_report = json.loads((tmp_path / "r.json").read_text())
    assert cli_out.read_bytes() == api_out.read_bytes()
    assert _report(cli_report["passes"]) == _report(_jsonable(result.report.to_dict())["passes"])
    assert cli_report["warnings"] == result.report.warnings
    assert cli_report["checks"] == _jsonable(result.report.checks)
    assert cli_report["resolved"] == result.pipeline


def test_the_check_runs_on_the_file_before_it_is_moved(zoo_onnx, tmp_path, monkeypatch):
    """A result that fails the last comparison is never moved into place."""
    import graphopt.passes.check as check

    real = check.run_model
    seen = []

    def spy(graph, inputs, *, optimized, path=None):
        seen.append(path)
        out = real(graph, inputs, optimized=optimized, path=path)
        return [o * 2 for o in out] if path is not None and "graphopt" in os.path.basename(os.path.dirname(path)) \
            else out

    monkeypatch.setattr(check, "run_model", spy)
    out = tmp_path / "o.onnx"
    with pytest.raises(NumericMismatchError):
        graphopt.optimize(zoo_onnx("tiny_resnet"), "fold", output=str(out))
    assert any(p and os.path.dirname(p) != str(tmp_path) for p in seen)  # the staged file was what ran
    assert sorted(os.listdir(tmp_path)) == []  # and nothing was moved into place or left behind


class CopiesItsInput(Pass):
    """Declares itself functional but edits its input (a broken contract the base class catches)."""

    name = "lies-about-copying"
    irs = frozenset({"onnx"})
    changes_input = False

    def run_onnx(self, graph, ctx):
        graph.gs.nodes[0].name = "renamed"
        return PassResult(graph, True)


class Functional(Pass):
    """A functional pass: builds a new graph, never edits its input."""

    name = "functional"
    irs = frozenset({"onnx"})
    changes_input = False
    seen: list = []

    def run_onnx(self, graph, ctx):
        Functional.seen.append(graph)
        out = graph.copy()
        return PassResult(out, False)


def test_the_mutation_contract_is_checked_and_spares_copies(zoo_onnx):
    reg = load_registry(autoload=False, modules=[helpers])
    graph = graphopt.load_model(zoo_onnx("tiny_resnet"))
    with pytest.raises(PassError, match="declares changes_input=False"):
        graphopt.PassManager([CopiesItsInput()]).run(graph.copy())
    Functional.seen.clear()
    graphopt.PassManager([Functional(), *graphopt.passes.resolve("fold-bn", reg)]).run(graph)
    assert Functional.seen == [graph]  # a functional pass gets the caller's graph itself, no copy
    assert graph.op_counts()["BatchNormalization"] == 12  # fold-bn (which edits) got a copy


def test_an_opset_upgrade_is_a_step_the_check_covers(tmp_path):
    """int8-dynamic needs opset 11: an opset-9 model is converted first, and the report shows it."""
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 32])], [w]),
        opset_imports=[onnx.helper.make_opsetid("", 9)], ir_version=8)
    path = tmp_path / "m9.onnx"
    onnx.save(model, str(path))
    result = graphopt.optimize(str(path), "int8-dynamic")
    names = [r.name for r in result.report.records]
    assert names == ["upgrade-opset", "int8-dynamic"] and result.graph.opset >= 11
    assert result.report.checks["numeric"]["comparisons"][0]["passes"] == ["upgrade-opset"]
    assert result.report.checks["numeric"]["comparisons"][0]["max_rel_err"] <= 1e-5


def test_outputs_moved_past_the_threshold_are_reported_with_what_to_do(zoo_onnx, tmp_path, capsys):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main(["run", zoo_onnx("tiny_resnet"), "--passes", "fold,prune:ratio=0.5", "-o", str(out), "--json",
                 str(report)]) == 0
    printed = capsys.readouterr().out
    warning = next(line for line in printed.splitlines() if "past the accuracy threshold" in line)
    assert warning.startswith("warning: prune-channels:") and "fine-tune" in warning and "cosine" in warning
    data = json.loads(report.read_text())
    assert any("past the accuracy threshold" in w for w in data["warnings"])
    moved = [c for c in data["checks"]["numeric"]["comparisons"] if c.get("past_threshold")]
    assert moved and moved[0]["passes"] == ["prune-channels"] and moved[0]["cosine"] < 0.99


def test_an_exact_pass_that_makes_nan_fails_the_check(zoo_onnx, tmp_path, capsys):
    assert main(["run", zoo_onnx("tiny_resnet"), "--passes", "nan-weights", "-p", "tests.helpers", "-o",
                 str(tmp_path / "o.onnx")]) == 6
    err = capsys.readouterr().err
    assert "pass 'nan-weights'" in err and "NaN/Inf" in err
    assert os.listdir(tmp_path) == []


def test_instruments_a_plugin_registers_run_by_name(zoo_onnx, tmp_path, capsys):
    report = tmp_path / "r.json"
    assert main(["run", zoo_onnx("tiny_resnet"), "-p", "tests.helpers", "--instrument", "note-passes", "-o",
                 str(tmp_path / "o.onnx"), "--json", str(report), "-q"]) == 0
    assert all("seen by note-passes" in row["notes"] for row in json.loads(report.read_text())["passes"])
    assert main(["run", zoo_onnx("tiny_resnet"), "--instrument", "nope", "-o", str(tmp_path / "p.onnx")]) == 2
    assert "unknown instrument 'nope'" in capsys.readouterr().err


def test_version_and_literal_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"graphopt {graphopt.__version__} (onnx ") and "onnxruntime" in line and "\n" not in line
    assert main(["passes", "calibrate"]) == 0
    assert "option method: one of minmax|percentile|entropy|mse = minmax" in capsys.readouterr().out

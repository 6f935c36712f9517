"""`graphopt verify --backend tensorrt`: every planted fault in tests/tensorrt_broken_graphs.py found (rule id and
node name, exactly), nothing on the correct twins; the CLI's exit codes, output and bad-input errors; `--fix`
leaves a clean graph whose outputs stay close to the original's; onnxruntime's quantizer's output is flagged."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.lint import Finding, lint, summary_line
from graphopt.backends.onnxruntime import OnnxRuntimeBackend
from graphopt.backends.tensorrt import TensorRTBackend
from graphopt.backends.tensorrt_docs import main as tensorrt_catalogue
from graphopt.cli import main
from graphopt.ir.onnx_graph import OnnxGraph
from graphopt.numeric import sqnr_db
from tests.tensorrt_broken_graphs import CASES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = TensorRTBackend().lint_rules()


def findings(model: onnx.ModelProto) -> list[Finding]:
    return lint(OnnxGraph.from_model(model), RULES)


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def save(tmp_path, name: str) -> str:
    path = str(tmp_path / f"{name}.onnx")
    onnx.save(CASES[name][0](), path)
    return path


def run(path: str, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)


def sample(path: str, n: int = 4, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for i in onnx.load(path).graph.input:
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        if i.type.tensor_type.elem_type == TensorProto.INT8:
            out[i.name] = rng.integers(-100, 100, size=shape).astype(np.int8)
        else:
            out[i.name] = rng.standard_normal(shape).astype(np.float32)
    return out


# -- the rules on the broken graphs and their twins --------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_each_planted_fault_is_found_and_nothing_else(name):
    build, planted = CASES[name]
    got = findings(build())
    assert {(f.rule, f.node) for f in got} == planted
    severity = {r.id: r.severity for r in RULES}
    assert all(f.severity == severity[f.rule] and f.fix and f.message for f in got)


def test_every_rule_has_a_broken_graph_and_a_documented_basis():
    planted = {rule for _, p in CASES.values() for rule, _ in p}
    ids = [r.id for r in RULES]
    assert len(ids) == len(set(ids))
    assert planted == set(ids)
    for rule in RULES:
        assert rule.title and rule.reason and rule.source and rule.fix_text and rule.severity in ("error", "warning")
        assert rule.passage.startswith('"') or "No passage" in rule.passage or "No TensorRT passage" in rule.passage \
            or "`" in rule.passage or "ModelOpt" in rule.passage, rule.id


def test_the_catalogue_in_docs_is_generated_from_the_rules():
    with open(os.path.join(ROOT, "docs", "tensorrt_rules.md"), encoding="utf-8") as f:
        assert f.read() == tensorrt_catalogue(), \
            "docs/tensorrt_rules.md is stale: python -m graphopt.backends.tensorrt_docs > docs/tensorrt_rules.md"


def test_a_backend_without_rules_has_none_and_checking_changes_nothing():
    assert OnnxRuntimeBackend().lint_rules() == ()
    model = CASES["concat_different_scales"][0]()
    graph = OnnxGraph.from_model(model)
    before = graph.to_model().SerializeToString()
    assert lint(graph, RULES) == lint(graph, RULES)
    assert graph.to_model().SerializeToString() == before


def test_summary_counts_per_rule():
    got = findings(CASES["nonzero_zero_point"][0]())
    assert summary_line(got) == "2 findings (2 errors): zero-point 2"
    assert summary_line([]) == "no findings"


# -- the command line -------------------------------------------------------------------------------------------
def test_strict_exits_nonzero_on_a_finding_and_zero_on_a_clean_graph(tmp_path, capsys):
    broken, clean = save(tmp_path, "float_residual"), save(tmp_path, "good_residual")
    before = digest(broken)
    assert main(["verify", "--backend", "tensorrt", broken, "--strict"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("add: residual-not-quantized: residual input 'x' is float") and "(fix: " in out[0]
    assert out[-1].endswith("1 finding (1 warning): residual-not-quantized 1")
    assert main(["verify", "--backend", "tensorrt", broken]) == 0  # without --strict: listed, exit 0
    assert main(["verify", "--backend", "tensorrt", clean, "--strict"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("no findings")
    assert digest(broken) == before


def test_json_lists_the_findings(tmp_path):
    path, report = save(tmp_path, "uint8_activation"), tmp_path / "r.json"
    assert main(["verify", "--backend", "tensorrt", path, "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert {(f["rule"], f["node"]) for f in data["findings"]} == CASES["uint8_activation"][1]


@pytest.mark.parametrize("args, code, words", [
    (["--backend", "onnxruntime"], 2, "has no placement rules"),
    (["--backend", "nope"], 2, "unknown backend"),
    (["--strict"], 2, "give --backend"),
    (["--backend", "tensorrt", "-o", "x.onnx"], 2, "go with --fix"),
])
def test_usage_errors_are_one_line(tmp_path, capsys, args, code, words):
    path = save(tmp_path, "good_conv")
    assert main(["verify", path, *args]) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err


def test_bad_model_files_are_one_line(tmp_path, capsys):
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    for path in (str(text), str(tmp_path / "missing.onnx")):
        assert main(["verify", "--backend", "tensorrt", path]) == 3
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("graphopt: error: ")


def test_fix_never_writes_the_input(tmp_path, capsys):
    path = save(tmp_path, "concat_different_scales")
    before = digest(path)
    assert main(["verify", "--backend", "tensorrt", path, "--fix", "-o", path]) == 2
    assert digest(path) == before


# -- --fix ----------------------------------------------------------------------------------------------------------
# (case, SQNR floor in dB of the fixed model's outputs against the broken one's; inf: the fix is exact). Concat:
# input 'a' (N(0, 1) data) moves from step 0.02 to the shared 0.05, its rounding noise ~8 dB up: about 28 dB measured
FIXES = [("qdq_between_pad_and_conv", np.inf), ("qdq_between_transpose_and_conv", np.inf), ("int32_bias", np.inf),
         ("concat_different_scales", 25.0)]


@pytest.mark.parametrize("name, floor", FIXES)
def test_fix_makes_the_graph_clean_and_keeps_its_outputs(tmp_path, capsys, name, floor):
    path = save(tmp_path, name)
    before = digest(path)
    assert main(["verify", "--backend", "tensorrt", path, "--fix", "--strict"]) == 0  # nothing left
    fixed = str(tmp_path / f"{name}.fixed.onnx")
    out = capsys.readouterr().out
    assert "fixed: " in out and f"wrote {fixed}: no findings" in out
    assert findings(onnx.load(fixed)) == [] and digest(path) == before
    feeds = sample(path)
    for a, b in zip(run(path, feeds), run(fixed, feeds)):
        if floor == np.inf:
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
        else:
            assert sqnr_db(a, b) >= floor


@pytest.mark.parametrize("name", ["float_residual", "dq_plus_float"])
def test_fix_quantizes_a_residual_input_from_calibration_data(tmp_path, capsys, name):
    path = save(tmp_path, name)
    assert main(["verify", "--backend", "tensorrt", path, "--fix", "--strict"]) == 1  # needs --calib: left
    assert "needs its range: give --calib DATA" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / f"{name}.fixed.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{k: np.concatenate([v] * 4) for k, v in sample(path, seed=2).items()})
    out = str(tmp_path / "out.onnx")
    assert main(["verify", "--backend", "tensorrt", path, "--fix", "--calib", str(calib), "-o", out, "--strict"]) == 0
    assert findings(onnx.load(out)) == []
    feeds = sample(path)
    for a, b in zip(run(path, feeds), run(out, feeds)):
        assert sqnr_db(a, b) >= 30.0  # one more int8 rounding, of a tensor the calibration data covers


# -- onnxruntime's quantizer ------------------------------------------------------------------------------------------
def _float_residual_model(path: str) -> None:
    rng = np.random.default_rng(0)
    w1, w2 = (numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.1, n)
              for n in ("w1", "w2"))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1] * 4),
             helper.make_node("Add", ["c2", "x"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)


def test_onnxruntime_quantizer_output_is_flagged(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    src, dst = str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx")
    _float_residual_model(src)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": np.random.default_rng(i).standard_normal((1, 16, 8, 8)).astype(np.float32)}
                                 for i in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    got = findings(onnx.load(dst))
    rules = {f.rule for f in got}
    assert "uint8" in rules  # uint8 activations: the parser refuses them
    assert "weight-per-tensor" in rules  # quantize_static's default: one scale per weight
    activation_qs = [n.name for n in onnx.load(dst).graph.node if n.op_type == "QuantizeLinear"]
    assert {f.node for f in got if f.rule == "uint8"} >= set(activation_qs)

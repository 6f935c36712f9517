"""What a new user gets wrong, each answered in one line (never a traceback) with nothing written, or done as they
meant: found by trying the command line and the API as a new user would."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.cli import main
from graphopt.errors import UsageError


def one_error_line(capsys, argv, code, *fragments) -> str:
    assert main(argv) == code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def unnamed(tmp_path):
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> MatMul, built with onnx.helper without node names (ONNX
    allows it), and calibration data for it."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
                               numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w2")])
    path = tmp_path / "unnamed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
    return path, tmp_path / "calib.npz"


def test_a_model_without_node_names_runs_int8_with_its_default_guard(unnamed, tmp_path, capsys, monkeypatch):
    """Nodes without names are named after their first output when the model is loaded (a note says so), so the
    guard's groups and exclude_nodes can name them: int8 (guard on by default) runs where int8:guard=off did."""
    monkeypatch.delenv("GRAPHOPT_NO_TIMING", raising=False)
    path, calib = unnamed
    out = tmp_path / "out.onnx"
    assert main(["run", str(path), "--passes", "int8", "--calib", str(calib), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "note: 5 unnamed node(s) named after their first output (e.g. 'c')" in printed
    assert all(n.name for n in onnx.load(str(out)).graph.node)


def test_typos_in_node_name_options_are_warned(unnamed, tmp_path, capsys):
    path, calib = unnamed
    assert main(["run", str(path), "--passes", "int8:guard=off:exclude_nodes=c_typo", "--calib", str(calib),
                 "-o", str(tmp_path / "a.onnx")]) == 0
    assert "warning: place-qdq: exclude_nodes names no node in the graph: c_typo" in capsys.readouterr().out
    assert main(["run", str(path), "--passes", "prune:ratio=0.5:ignore=typo", "-o", str(tmp_path / "b.onnx")]) == 0
    assert "warning: prune-channels: ignore names no node in the graph: typo" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs,message", [
    ({"passes": None}, "passes must be a pipeline as text"),
    ({"passes": ["fold"]}, "passes must be a pipeline as text"),
    ({"backend": None}, "backend must be a registered backend's name"),
    ({"rtol": "abc"}, "rtol must be a number >= 0"),
    ({"rtol": float("nan")}, "rtol must be a number >= 0"),
])
def test_api_arguments_of_the_wrong_kind_are_usage_errors(unnamed, kwargs, message):
    with pytest.raises(UsageError, match=message):
        graphopt.optimize(str(unnamed[0]), **{"passes": "fold", **kwargs})


def test_bench_refuses_a_shape_that_fixes_another_batch(unnamed, capsys):
    """--shape x=2x3x8x8 with --batch 4 would time batch 2 and call it 4."""
    one_error_line(capsys, ["bench", str(unnamed[0]), "--shape", "x=2x3x8x8", "--batch", "4", "--iters", "2"], 2,
                   "fixes its first dimension at 2, not batch 4", "x=Nx")


def test_an_input_shape_the_program_cannot_take_is_one_line(tmp_path, capsys):
    """A torch.export program with a static 1x3x8x8 input, given --input-shape of another rank or size, or 0."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 8),)), str(path))
    out = str(tmp_path / "o.pt2")
    one_error_line(capsys, ["run", str(path), "--input-shape", "1x3x8", "-o", out], 2,
                   "has shape 1x3x8; the program takes 1x3x8x8")
    one_error_line(capsys, ["run", str(path), "--input-shape", "0x3x8x8", "-o", out], 2,
                   "every dimension must be at least 1")
    assert not (tmp_path / "o.pt2").exists()


def test_calibration_data_out_of_the_models_range_is_a_data_error(tmp_path, capsys):
    """Token ids past the embedding table: exit 3 (the data), with onnxruntime's reason whole."""
    table = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
                               helper.make_node("MatMul", ["e", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3, 2])],
                              [numpy_helper.from_array(table, "table"),
                               numpy_helper.from_array(np.ones((4, 2), np.float32), "w")])
    path = tmp_path / "emb.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    np.savez(tmp_path / "ids.npz", ids=np.full((4, 3), 50, np.int64))
    for passes in ("int8", "int4-weight:method=gptq:last=int4", "int8-dynamic"):  # the last: the check reads it
        one_error_line(capsys, ["run", str(path), "--passes", passes, "--calib", str(tmp_path / "ids.npz"), "-o",
                                str(tmp_path / "o.onnx")], 3, "the calibration data do not fit the model",
                       "idx=50 must be within the inclusive range")


def test_a_recipe_and_passes_together_are_refused(unnamed, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("kind: graphopt-recipe\n")
    one_error_line(capsys, ["run", str(unnamed[0]), "--recipe", str(tmp_path / "r.yaml"), "--passes", "fold"], 2,
                   "--recipe gives the passes: drop --passes")


def test_int4_reports_one_parameter_count(tmp_path, capsys):
    """The written model's parameters (packed 4-bit weights counted as the values they hold) are the run report's."""
    w = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])],
                              [numpy_helper.from_array(w, "w")])
    path = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert main(["run", str(path), "--passes", "int4-weight:last=int4", "-o", str(tmp_path / "o.onnx")]) == 0
    out = capsys.readouterr().out
    wrote = next(line for line in out.splitlines() if line.startswith("wrote "))
    params = next(line for line in out.splitlines() if line.startswith("params: "))
    count = params.split("->")[1].split()[0]
    assert f", {count} parameters" in wrote, (wrote, params)
    assert int(count.replace(",", "")) == 64 * 8 + 2 * 8  # the weights, and their 2 x 8 block scales


def test_nan_outputs_get_no_credit():
    """A model whose outputs turned NaN is not 'cosine 1.0' against its float original, and NaN logits are neither
    a correct class nor an agreement."""
    from graphopt.numeric import difference, top1_accuracy, top1_agreement

    ref = np.random.default_rng(0).standard_normal((4, 10))
    nan = np.full_like(ref, np.nan)
    diff = difference(ref, nan)
    assert diff.cosine == 0.0 and diff.sqnr_db == -np.inf and diff.nonfinite_mismatches == ref.size
    labels = np.argmax(ref, -1)
    assert top1_accuracy(nan, labels) == 0.0 and top1_agreement(nan, nan) == 0.0 and top1_agreement(ref, ref) == 1.0


def test_finetune_after_names_passes_of_the_pipeline():
    """An alias names the passes it stands for, a bare string is a list of one (or comma-separated), and a name
    that is no pass of the pipeline, or finetune_after without finetune=, is refused (it used to turn fine-tuning
    off without a word)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(1, 3, 12, 12)
    calls = []

    def loop(module):
        calls.append(1)

    graphopt.optimize(model, "fold,prune:ratio=0.5", example_inputs=(x,), finetune=loop, finetune_after="prune",
                      check=False)
    assert calls == [1]
    with pytest.raises(UsageError, match="'bogus' is not a pass of the pipeline"):
        graphopt.optimize(model, "fold,prune", example_inputs=(x,), finetune=loop, finetune_after=["bogus"])
    with pytest.raises(UsageError, match="give finetune=your_loop too"):
        graphopt.optimize(model, "fold,prune", example_inputs=(x,), finetune_after=["prune"])


def test_a_module_that_cannot_take_the_example_inputs_is_one_line(capsys):
    """The API used to print torch's traceback and then 'succeed' with nothing done."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
    with pytest.raises(UsageError, match=r"Sequential does not run on the example inputs \(2x5x16x16\)"):
        graphopt.optimize(model, "fold", example_inputs=(torch.randn(2, 5, 16, 16),))
    assert "Traceback" not in capsys.readouterr().err


def test_typos_in_exclude_nodes_are_warned_on_a_pytorch_model_too():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    result = graphopt.optimize(model, "int8-dynamic:exclude_nodes=bogus+0", example_inputs=(torch.randn(2, 16),),
                               check=False)
    assert any("exclude_nodes names no node or module of the model: bogus" in w for w in result.report.warnings)
    assert not any("0" in w.split(": ")[-1].split(", ") for w in result.report.warnings)  # module 0 exists


def test_a_position_table_fixes_the_sequence_not_the_batch():
    """A BERT-like module whose example fills its position table keeps its batch dynamic (the sequence alone is
    fixed): the check compares all 8 calibration sequences."""
    from graphopt import zoo

    model = zoo.bert_like(vocab=100, hidden=32, layers=1, heads=2, seq=16)
    result = graphopt.optimize(model, "int8-dynamic", example_inputs=(torch.randint(0, 100, (1, 16)),),
                               calibration=torch.randint(0, 100, (8, 16)))
    numeric = result.report.checks["numeric"]
    assert numeric["inputs"] == "8 calibration samples" and numeric["comparisons"][-1]["cosine"] > 0.99
    assert [s.shape for s in result.graph.input_specs()] == [(None, 16)]


@pytest.mark.parametrize("mistake, match", [
    ("float labels", "labels must be integer class indices"),
    ("labels past the classes", r"labels must be class indices in \[0, 10\)"),
    ("a teacher of other classes", "the teacher's outputs .* and the student's .* differ"),
    ("inputs without labels", "must be \\(inputs, labels\\)"),
])
def test_training_data_mistakes_are_one_line(mistake, match):
    from graphopt import train, zoo

    x_train, y_train, _, _ = zoo.digits_data(0)
    x, y = x_train[:64], y_train[:64]
    student = zoo.DigitsCNN()
    with pytest.raises(UsageError, match=match):
        if mistake == "float labels":
            train.finetune(student, (x, y.astype(np.float32)), epochs=1)
        elif mistake == "labels past the classes":
            train.finetune(student, (x, y + 100), epochs=1)
        elif mistake == "a teacher of other classes":
            train.distill(student, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 5)), (x, y), epochs=1)
        else:
            train.distill(student, zoo.DigitsCNN(), x, epochs=1)


@pytest.mark.parametrize("returned", [42, torch.nn.Linear(8, 8)])
def test_a_training_loop_that_returns_something_else_is_one_line(returned):
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8)).eval()
    with pytest.raises(UsageError, match=f"finetune= returned a {type(returned).__name__}"):
        graphopt.optimize(module, "prune", example_inputs=(torch.randn(2, 8),), finetune=lambda gm: returned)
    with pytest.raises(UsageError, match="is not an instrument"):
        graphopt.optimize(module, "fold", example_inputs=(torch.randn(2, 8),), instruments=[3])


def test_an_onnx_model_is_not_written_under_a_pytorch_suffix(tmp_path, zoo_onnx, capsys):
    """graphopt reads .pt2 / .pt / .pth as PyTorch files: an ONNX result written there could not be read back."""
    model = zoo_onnx("tiny_resnet")
    assert main(["run", model, "--passes", "fold", "-o", str(tmp_path / "m.pt2")]) == 2
    assert "an ONNX model is written as .onnx" in capsys.readouterr().err
    with pytest.raises(UsageError, match="an ONNX model is written as .onnx"):
        graphopt.optimize(model, "fold").save(str(tmp_path / "m.pt"))
    assert list(tmp_path.iterdir()) == []


def test_weights_read_inside_if_bodies_are_counted(tmp_path):
    from graphopt.ir import OnnxGraph

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    then = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 4])])
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0), helper.make_node("Greater", ["s", "z"], ["c"]),
         helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight, helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])])
    model = OnnxGraph.from_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert model.num_parameters() == 17  # W (16) and the zero it compares with


def test_compare_on_nan_data_is_refused(tmp_path, zoo_onnx, capsys):
    data = tmp_path / "nan.npz"
    np.savez(data, input=np.full((2, 3, 32, 32), np.nan, np.float32))
    model = zoo_onnx("tiny_resnet")
    assert main(["compare", model, model, "--data", str(data)]) == 3
    assert "holds NaN or infinite values" in capsys.readouterr().err


@pytest.mark.parametrize("mistake, match", [
    ("fewer labels", "100 labels for 128 samples"),
    ("two labels a sample", "labels must be one integer class per sample"),
    ("float labels", "labels must be one integer class per sample"),
    ("a NaN input", "holds NaN or infinite values"),
])
def test_labelled_data_is_checked_on_every_path_that_scores_it(mistake, match, tmp_path, capsys):
    """sensitivity --eval and the budget searches' eval= read labels as run --eval does: a mistake is one line (it
    was an internal error, or a budget decided on chance-level accuracy)."""
    from graphopt import zoo

    x_train, _, x_test, y_test = zoo.digits_data(0)
    model = tmp_path / "digits.onnx"
    zoo.export_onnx(zoo.DigitsCNN(), str(model), (1, 1, 16, 16), dynamic_batch=True)
    np.savez(tmp_path / "calib.npz", input=x_train[:32])
    x, y = x_test[:128].copy(), y_test[:128]
    y = {"fewer labels": y[:100], "two labels a sample": np.stack([y, y], 1),
         "float labels": y.astype(np.float32) + 0.5}.get(mistake, y)
    if mistake == "a NaN input":
        x[3, 0, 0, 0] = np.nan
    np.savez(tmp_path / "eval.npz", input=x, labels=y)
    calib, data = str(tmp_path / "calib.npz"), str(tmp_path / "eval.npz")
    assert main(["sensitivity", str(model), "--calib", calib, "--eval", data, "--max-evals", "1"]) == 2
    assert match in capsys.readouterr().err
    assert main(["run", str(model), "--passes", f"int8-budget:max_drop=0.5:eval={data}", "--calib", calib,
                 "-o", str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


def test_formats_tensorrt_cannot_import_are_refused_for_it(tmp_path, capsys):
    """--backend tensorrt: int4-weight's MatMulNBits (an onnxruntime contrib op) would give a file no TensorRT
    parses: refused, exit 4, nothing written; int8-dynamic (uint8 DynamicQuantizeLinear) too."""
    from graphopt import zoo

    model = str(tmp_path / "bert.onnx")
    zoo.export_transformer_onnx(zoo.bert_like(vocab=100, hidden=32, layers=1, heads=2, seq=16), model, seq=16)
    for passes, words in (("fold,int4-weight", "cannot import MatMulNBits"),
                          ("fold,int8-dynamic", "DynamicQuantizeLinear produces uint8 only")):
        assert main(["run", model, "--passes", passes, "--backend", "tensorrt", "-o",
                     str(tmp_path / "out.onnx")]) == 4
        assert words in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert.onnx"]

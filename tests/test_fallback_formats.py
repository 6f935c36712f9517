"""Fallback formats in the budget search (graphopt.report.budget, mixed-precision's ``fallback``, place-fallback,
graphopt sensitivity --fallback, recipes): a group whose static int8 fails because its calibrated range is ruined
by an outlier runs as dynamic int8 (its range taken at run time) and the budget holds; a group that fails in dynamic
int8 too stays fp32; the pass builds what the search scored, the recipe replays it, a rerun re-runs no trial."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper as h
from onnx import numpy_helper as nh

import graphopt
from graphopt.backends import get_backend
from graphopt.cli import main
from graphopt.executors import InProcess
from graphopt.numeric import cosine_similarity
from graphopt.report.budget import search_budget
from graphopt.report.sensitivity import prepare

BUDGET = 0.99


def two_fragile_matmuls(path, seed: int = 0) -> tuple[dict, dict]:
    """y = (x·Wa + z·Wb)·Wc, 16 wide. mm_a: one CALIBRATION sample has x[:, 0] = 1e4 (Wa's row 0 is zero, so in
    float it does not matter): static int8 takes x's scale from it and rounds every other value of x to zero; at
    run time (no spike) dynamic int8 takes x's own range and is fine. mm_b: z's channels 0 and 1 are 3000x the others
    in EVERY sample (Wb's rows 0, 1 zero): per-tensor int8, static or dynamic, spends its range on them. Returns
    (calibration, evaluation) inputs."""
    rng = np.random.default_rng(seed)
    wa, wb = rng.normal(0, 0.3, (16, 16)).astype(np.float32), rng.normal(0, 0.3, (16, 16)).astype(np.float32)
    wa[0], wb[:2] = 0.0, 0.0
    wc = rng.normal(0, 0.3, (16, 8)).astype(np.float32)
    nodes = [h.make_node("MatMul", ["x", "wa"], ["a"], "mm_a"), h.make_node("MatMul", ["z", "wb"], ["b"], "mm_b"),
             h.make_node("Add", ["a", "b"], ["s"], "add"), h.make_node("MatMul", ["s", "wc"], ["y"], "mm_c")]
    graph = h.make_graph(nodes, "two_fragile", [h.make_tensor_value_info(n, 1, ["N", 16]) for n in ("x", "z")],
                         [h.make_tensor_value_info("y", 1, ["N", 8])],
                         [nh.from_array(v, k) for k, v in {"wa": wa, "wb": wb, "wc": wc}.items()])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))

    def inputs(n, spike):
        x, z = rng.normal(0, 1, (n, 16)).astype(np.float32), rng.normal(0, 1, (n, 16)).astype(np.float32)
        z[:, :2] *= 3000.0
        if spike:
            x[0, 0] = 1e4
        return {"x": x, "z": z}

    return inputs(64, True), inputs(64, False)


@pytest.fixture()
def fragile(tmp_path):
    calib, evaluation = two_fragile_matmuls(tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **calib)
    labels = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, evaluation)[0].argmax(1)
    np.savez(tmp_path / "eval.npz", **evaluation, labels=labels)
    return tmp_path / "m.onnx", tmp_path / "calib.npz", tmp_path / "eval.npz", evaluation


def _cosine(path, reference_path, data) -> float:
    run = [ort.InferenceSession(str(p)).run(None, data)[0].ravel().astype(np.float64) for p in (path, reference_path)]
    return float(cosine_similarity(run[1], run[0]))


def test_static_int8_fails_where_dynamic_holds_and_the_search_finds_it(registry, fragile, tmp_path):
    model, calib, _, evaluation = fragile

    def study_of(name, **fallback):
        return prepare(str(model), str(calib), registry=registry, backend=get_backend(registry, "onnxruntime"),
                       eval_data=evaluation, folder=str(tmp_path / name), **fallback)

    study = study_of("study", fallback="int8-dynamic")
    assert study.fallback_groups() == ["mm_a", "mm_b", "mm_c"]  # the format takes the MatMuls, not the Add
    # the construction: mm_a fails in static int8 and holds in dynamic int8; mm_b fails in both
    assert study.score(["mm_b"])["cosine"] < 0.9
    assert study.score(["mm_b"], ["mm_a"])["cosine"] >= BUDGET
    assert study.score(["mm_a"], ["mm_b"])["cosine"] < 0.9
    runs = str(tmp_path / "runs")
    plain = search_budget(study_of("plain"), min_cosine=BUDGET)
    first = InProcess(runs)
    result = search_budget(study, min_cosine=BUDGET, executor=first)
    assert result.holds and result.float_groups == ["mm_b"] and result.fallback_groups == ["mm_a"]
    assert result.formats() == {"mm_b": "fp32", "mm_a": "int8-dynamic"}
    assert result.excluded_nodes == ("mm_b", "mm_a") and result.metrics["cosine"] >= BUDGET
    assert sorted(plain.float_groups) == ["mm_a", "mm_b"] and not plain.fallback_groups  # default: fp32
    # three trials more than the search without it: both in int8-dynamic at once (fails), then one at a time
    assert result.evaluations == plain.evaluations + 3 and first.calls > 0
    again = InProcess(runs)
    assert search_budget(study, min_cosine=BUDGET, executor=again) == result and again.calls == 0  # resumed


def test_int4_weights_with_float_activations_take_both_groups(registry, fragile, tmp_path):
    """4-bit weight-only keeps activations float, so neither outlier pattern hurts it: the budget holds with both
    groups in MatMulNBits (onnxruntime's contrib op) and none in fp32."""
    model, calib, _, evaluation = fragile
    study = prepare(str(model), str(calib), registry=registry, backend=get_backend(registry, "onnxruntime"),
                    eval_data=evaluation, folder=str(tmp_path / "study"), fallback="int4-weight:block_size=16")
    result = search_budget(study, min_cosine=BUDGET)
    assert result.holds and not result.float_groups and sorted(result.fallback_groups) == ["mm_a", "mm_b"]
    nodes = {n.name: n for n in study.quantized(result.float_groups, result.fallback_groups).gs.nodes}
    assert nodes["mm_a"].op == nodes["mm_b"].op == "MatMulNBits"
    assert nodes["mm_c"].op == "MatMul" and nodes["mm_c"].inputs[1].inputs[0].op == "DequantizeLinear"  # static


def test_int8_budget_runs_the_chosen_group_in_dynamic_int8(registry, fragile, tmp_path, capsys):
    model, calib, eval_npz, evaluation = fragile
    budget = f"int8-budget:min_cosine={BUDGET}:eval={eval_npz}"
    outs = {}
    for name, plan in (("plain", budget), ("fallback", budget + ":fallback=int8-dynamic")):
        outs[name] = tmp_path / f"{name}.onnx"
        assert main(["run", str(model), "--passes", plan, "--calib", str(calib), "-o", str(outs[name])]) == 0
    printed = capsys.readouterr().out
    assert "kept 1 float groups, fallback 1 groups" in printed and "place-fallback" in printed
    nodes = {n.name: n for n in onnx.load(str(outs["fallback"])).graph.node}
    producer = {o: n for n in nodes.values() for o in n.output}
    # mm_a: dynamic int8 (DynamicQuantizeLinear on x -> MatMulInteger), no static Q/DQ on it
    assert "mm_a" not in nodes
    integer = [n for n in nodes.values() if n.op_type == "MatMulInteger"]
    assert len(integer) == 1 and integer[0].name.startswith("mm_a/")
    dynamic = producer[integer[0].input[0]]
    assert dynamic.op_type == "DynamicQuantizeLinear" and dynamic.input[0] == "x"
    assert not [n for n in nodes.values() if n.op_type in ("QuantizeLinear", "DequantizeLinear") and "x" in n.input]
    # mm_b: fp32 (float weight, float input); mm_c: static int8 (its weight dequantized)
    assert nodes["mm_b"].op_type == "MatMul" and nodes["mm_b"].input == ["z", "wb"]
    assert producer[nodes["mm_c"].input[1]].op_type == "DequantizeLinear"
    plain = {n.name: n.op_type for n in onnx.load(str(outs["plain"])).graph.node}
    assert plain["mm_a"] == plain["mm_b"] == "MatMul" and "MatMulInteger" not in plain.values()  # default: fp32
    assert _cosine(outs["fallback"], model, evaluation) >= BUDGET


def test_recipe_records_the_formats_and_replays_the_same_graph(fragile, tmp_path, capsys):
    model, calib, eval_npz, evaluation = fragile
    recipe, report = tmp_path / "r.yaml", tmp_path / "r.json"
    assert main(["sensitivity", str(model), "--calib", str(calib), "--eval", str(eval_npz), "--min-cosine",
                 str(BUDGET), "--fallback", "int8-dynamic", "--recipe", str(recipe), "--json", str(report),
                 "--executor", "inprocess"]) == 0
    printed = capsys.readouterr().out
    assert "1 in int8-dynamic: mm_a" in printed
    import yaml

    data = yaml.safe_load(recipe.read_text())
    assert data["formats"] == {"mm_b": "fp32", "mm_a": "int8-dynamic"} and data["fallback_groups"] == ["mm_a"]
    assert data["passes"].endswith("place-qdq:exclude_nodes=mm_b+mm_a,int8-dynamic:exclude_nodes=mm_b+mm_c")
    forms = data["forms"]
    assert forms["onnxruntime"]["fallback"]["groups"] == forms["openvino"]["fallback"]["groups"] == ["mm_a"]
    trt = forms["tensorrt"]["fallback"]  # TensorRT's int8 activations are signed: no DynamicQuantizeLinear there
    assert trt["float"] == ["mm_a"] and not trt["groups"] and "uint8" in trt["why"]
    replayed, direct = tmp_path / "replayed.onnx", tmp_path / "direct.onnx"
    assert main(["run", str(model), "--recipe", str(recipe), "--calib", str(calib), "-o", str(replayed)]) == 0
    graphopt.optimize(str(model), f"int8-budget:min_cosine={BUDGET}:eval={eval_npz}:fallback=int8-dynamic",
                      calibration=str(calib), check=False).save(str(direct))
    ops = [[(n.name, n.op_type) for n in onnx.load(str(p)).graph.node] for p in (replayed, direct)]
    assert ops[0] == ops[1]
    outs = [ort.InferenceSession(str(p)).run(None, evaluation)[0] for p in (replayed, direct)]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_fallback_usage_errors_are_one_line(fragile, capsys):
    model, calib, eval_npz, _ = fragile
    assert main(["sensitivity", str(model), "--calib", str(calib), "--fallback", "int8-dynamic"]) == 2
    assert "--min-cosine" in capsys.readouterr().err
    assert main(["sensitivity", str(model), "--calib", str(calib), "--min-cosine", "0.99", "--fallback", "fold",
                 "--executor", "inprocess"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exclude_nodes" in err[0]

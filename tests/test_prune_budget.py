"""Prune ratios searched under a MACs or latency budget (prune:budget=..., graphopt.report.prune_search): the budget
holds, the search beats the uniform ratio on a model whose layers differ in sensitivity, the Pareto PNG is written,
a latency budget is honoured (with a fake clock-free timer), bad budgets are one error line, and a rerun resumes."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import onnx
import pytest
from onnx import helper as h
from onnx import numpy_helper as nh

from graphopt import optimize
from graphopt.cli import main
from graphopt.ir import OnnxGraph
from graphopt.numeric import cosine_similarity
from graphopt.passes.base import PassContext
from graphopt.report import prune_search
from graphopt.report.cost import model_costs
from graphopt.report.report_dir import SEARCH

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def planted_model(path) -> np.ndarray:
    """x (4 ch) -> conv_a (16) -> relu -> conv_b (16) -> relu -> conv_c (16) -> relu -> conv_out (4, the output).
    conv_a and conv_c have 4 strong filters and 12 near-zero ones (pruning them costs nothing); conv_b's 16 filters
    are all equally strong, so every channel it loses damages the output: the planted sensitive layer. Returns
    calibration samples."""
    rng = np.random.default_rng(0)

    def weight(cout, cin, strong):
        w = rng.normal(0, 1 / np.sqrt(cin * 9), (cout, cin, 3, 3)).astype(np.float32)
        w[strong:] *= 0.01
        return w

    weights = {"wa": weight(16, 4, 4), "wb": weight(16, 16, 16), "wc": weight(16, 16, 4), "wo": weight(4, 16, 16)}
    nodes, x = [], "x"
    for name, w in (("conv_a", "wa"), ("conv_b", "wb"), ("conv_c", "wc"), ("conv_out", "wo")):
        out = "y" if name == "conv_out" else f"{name}_out"
        nodes.append(h.make_node("Conv", [x, w], [out], name, pads=[1, 1, 1, 1]))
        if name != "conv_out":
            nodes.append(h.make_node("Relu", [out], [f"{name}_relu"], f"{name}_relu"))
            x = f"{name}_relu"
    graph = h.make_graph(nodes, "planted", [h.make_tensor_value_info("x", 1, ["N", 4, 8, 8])],
                         [h.make_tensor_value_info("y", 1, ["N", 4, 8, 8])],
                         [nh.from_array(v, k) for k, v in weights.items()])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return rng.normal(0, 1, (32, 4, 8, 8)).astype(np.float32)


@pytest.fixture()
def planted(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the study's folder (and its cached trials) in here
    x = planted_model(tmp_path / "planted.onnx")
    np.savez(tmp_path / "calib.npz", x=x)
    return str(tmp_path / "planted.onnx"), str(tmp_path / "calib.npz"), x


def _search(planted, budget: str, extra: str = ""):
    model, calib, _ = planted
    ctx = PassContext()
    result = optimize(model, f"prune:budget={budget}{extra}", calibration=calib, ctx=ctx)
    return result, ctx.state[SEARCH]


def _width(graph: OnnxGraph, name: str) -> int:
    return int(next(n for n in graph.gs.nodes if n.name == name).inputs[1].values.shape[0])


def test_macs_budget_holds_and_beats_the_uniform_ratio(planted):
    model, _, x = planted
    result, search = _search(planted, "macs@0.5")
    before, after = model_costs(OnnxGraph.load(model)).macs, model_costs(result.graph).macs
    assert after <= 0.5 * before
    cands = search["candidates"]
    assert len(cands) >= 16 and {c["family"] for c in cands} == {"uniform", "global", "per-layer"}
    chosen = cands[search["chosen"]]
    assert chosen["chosen"] and chosen["on_front"] and chosen["macs_ratio"] == pytest.approx(after / before)
    # the chosen model's cosine, measured here on the calibration data, is the search's
    ref = OnnxGraph.load(model).run({"x": x})[0]
    cosine = cosine_similarity(ref.ravel().astype(np.float64), result.graph.run({"x": x})[0].ravel())
    assert cosine == pytest.approx(chosen["cosine"], abs=1e-6)
    # more accurate than every uniform ratio within the budget, and than those that cost more MACs too
    uniform = [c for c in cands if c["family"] == "uniform"]
    assert cosine > 0.99 > max(c["cosine"] for c in uniform if c["macs_ratio"] <= 0.5)
    assert all(c["cosine"] < cosine for c in uniform if c["macs_ratio"] >= chosen["macs_ratio"])
    # the planted layer keeps (nearly) all its channels; a redundant one loses most of its own
    assert _width(result.graph, "conv_b") >= 14
    assert _width(result.graph, "conv_c") <= 8
    note = result.report.records[-1].notes[0]
    assert note.startswith("budget macs@0.5: chose ") and "the best uniform ratio within it" in note


def test_the_pareto_png_is_written_by_the_pass_and_by_report(planted, tmp_path, capsys):
    model, calib, _ = planted
    png = tmp_path / "front.png"
    code = main(["run", model, "--passes", f"prune:budget=macs@0.5:plot={png}", "--calib", calib,
                 "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "report")])
    assert code == 0
    for path in (png, tmp_path / "report" / "pareto.png"):
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000  # a drawn figure, not an empty file
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    cands = report[SEARCH]["candidates"]
    assert sum(c["chosen"] for c in cands) == 1 and sum(c["on_front"] for c in cands) >= 2
    front = sorted((c["macs_ratio"], c["cosine"]) for c in cands if c["on_front"])
    assert all(a == b or a[1] < b[1] for a, b in zip(front, front[1:]))  # more MACs only for more accuracy
    off = [(c["macs_ratio"], c["cosine"]) for c in cands if not c["on_front"]]
    assert all(any(f[0] <= o[0] and f[1] >= o[1] for f in front) for o in off)  # the rest: dominated
    md = (tmp_path / "report" / "report.md").read_text()
    assert "![Pareto front](pareto.png)" in md and "**chosen**" in md


def test_latency_budget_with_a_fake_timer(planted, monkeypatch):
    """The fake: a model's time per run is a fixed 40 % overhead plus its MACs share (ratio 0.4 + 0.6 * MACs), so
    latency@0.7 needs MACs <= 0.5 and can be met, latency@0.35 cannot."""
    calls = []

    def fake(backend, graphs, feeds, rounds, warmup):
        calls.append(len(graphs))
        base = model_costs(graphs[0]).macs
        return [[1.0 + 1.5 * model_costs(g).macs / base] * rounds for g in graphs]

    monkeypatch.setattr(prune_search, "time_models", fake)
    result, search = _search(planted, "latency@0.7")
    chosen = search["candidates"][search["chosen"]]
    assert chosen["latency_ratio"] <= 0.7 and chosen["macs_ratio"] <= 0.5 + 1e-9
    assert chosen["latency_ratio"] == pytest.approx((1.0 + 1.5 * chosen["macs_ratio"]) / 2.5)
    assert all(c["latency_ratio"] is not None for c in search["candidates"])  # every candidate timed
    assert len(calls) >= 24 and set(calls) == {2}  # paired with the original, one trial per candidate
    assert _width(result.graph, "conv_b") >= 14
    code = main(["run", planted[0], "--passes", "prune:budget=latency@0.35", "--calib", planted[1],
                 "-o", os.path.join(os.path.dirname(planted[0]), "never.onnx")])
    assert code == 2 and not os.path.exists(os.path.join(os.path.dirname(planted[0]), "never.onnx"))


@pytest.mark.parametrize("budget", ["macs", "macs@1.5", "speed@0.5", "latency@zero", "macs@0"])
def test_a_bad_budget_is_one_error_line(planted, tmp_path, capsys, budget):
    code = main(["run", planted[0], "--passes", f"prune:budget={budget}", "--calib", planted[1],
                 "-o", str(tmp_path / "out.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "macs@R or latency@R" in err


def test_a_second_run_reruns_no_trial(planted, tmp_path):
    first, search = _search(planted, "macs@0.6")
    folder = next(p for p in (tmp_path / "graphopt-studies").iterdir())
    trials = sorted(os.listdir(folder / "runs" / "trials"))
    assert search["trials_run"] == len(trials) > 16
    again, search2 = _search(planted, "macs@0.6")
    assert search2["trials_run"] == 0 and "all from the cache" in again.report.records[-1].notes[0]
    assert sorted(os.listdir(folder / "runs" / "trials")) == trials
    assert search2["chosen"] == search["chosen"]
    assert again.model.SerializeToString() == first.model.SerializeToString()


def test_run_executor_reaches_the_search(planted, tmp_path, capsys, monkeypatch):
    """graphopt run --executor SPEC runs a budget's search there (processes:N cannot be written inside a pass's
    options, whose separator is the colon); a pass's own executor= wins."""
    from graphopt import executors

    model, calib, _ = planted
    asked = []
    real = executors.get_executor
    monkeypatch.setattr(executors, "get_executor", lambda spec, run_dir: asked.append(spec) or real(spec, run_dir))
    out = str(tmp_path / "out.onnx")
    assert main(["run", model, "--passes", "prune:budget=macs@0.5", "--calib", calib, "-o", out,
                 "--executor", "processes:2", "-q"]) == 0
    assert main(["run", model, "--passes", "prune:budget=macs@0.5:executor=inprocess", "--calib", calib, "-o",
                 str(tmp_path / "o2.onnx"), "--executor", "processes:2", "-q"]) == 0
    assert asked == ["processes:2", "inprocess"]
    assert main(["run", model, "--passes", "prune:budget=macs@0.5", "--calib", calib, "-o", out,
                 "--executor", "bogus"]) == 2
    assert "unknown executor" in capsys.readouterr().err


@pytest.mark.parametrize("extra", ["ratio=0.3", "scope=global", "layer_ratios=conv@0.2"])
def test_a_budget_with_ratios_of_its_own_is_refused(planted, tmp_path, capsys, extra):
    """budget= chooses ratios and scope: ratio / scope given beside it were silently ignored."""
    code = main(["run", planted[0], "--passes", f"prune:budget=macs@0.5:{extra}", "--calib", planted[1],
                 "-o", str(tmp_path / "out.onnx")])
    assert code == 2 and "give budget, or ratio / scope / layer_ratios, not both" in capsys.readouterr().err

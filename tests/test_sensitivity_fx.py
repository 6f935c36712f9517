"""Sensitivity and int8 under a budget on the PyTorch route (FX, x86): the same study, table and budget search as on
ONNX (graphopt.report.sensitivity_fx). A planted fragile conv ranks first on FX and on the model's ONNX export; the
budget keeps only it float (as module paths, x86's per-module config) and the int8-budget pipeline leaves no Q/DQ
around it; the CLI runs on a .pt2. Trials run in process (the processes executor: one slow test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from graphopt.backends import get_backend
from graphopt.cli import main
from graphopt.ir.fx_ops import aten_name
from graphopt.report.budget import search_budget
from graphopt.report.sensitivity import prepare, sensitivity
from graphopt.report.sensitivity_fx import prepare_fx


class Fragile(nn.Module):
    """x (8 channels; 0 and 1 hold outliers 3000x the rest) -> conv_a (zero weights on the outliers) -> relu ->
    conv_b -> relu -> conv_c + (residual: conv_a's relu) -> relu -> head. In float the outliers do not matter;
    per-tensor int8 on x (which only conv_a reads) spends its range on them and destroys conv_a's output. conv_c's
    Add reads its output directly: x86 runs it as the conv's ``sum`` post-op, so it is part of conv_c's group."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_c = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 3, padding=1)
        self.relu = nn.ReLU()
        with torch.no_grad():
            self.conv_a.weight[:, :2] = 0.0

    def forward(self, x):
        a = self.relu(self.conv_a(x))
        b = self.relu(self.conv_b(a))
        return self.head(self.relu(self.conv_c(b) + a))


def _data(n: int = 48) -> np.ndarray:
    x = np.random.default_rng(0).normal(0, 1, (n, 8, 8, 8)).astype(np.float32)
    x[:, :2] *= 3000.0
    return x


@pytest.fixture(scope="module")
def fragile(tmp_path_factory):
    """The module, a .pt2 of it, and calibration data for it."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("fragile-fx")
    module = Fragile().eval()
    x = _data()
    torch.export.save(torch.export.export(module, (torch.from_numpy(x[:2]),)), str(folder / "fragile.pt2"))
    np.savez(folder / "calib.npz", x=x)
    return module, folder / "fragile.pt2", folder / "calib.npz", x


@pytest.fixture(scope="module")
def study(registry, fragile, tmp_path_factory):
    _, pt2, calib, _ = fragile
    return prepare_fx(str(pt2), str(calib), registry=registry, backend=get_backend(registry, "x86"), samples=32,
                      folder=str(tmp_path_factory.mktemp("study") / "s"))


def test_groups_are_the_x86_kernels_named_by_module_path(study):
    groups = {g.name: g for g in study.groups}
    assert list(groups) == ["conv_a", "conv_b", "conv_c", "head"]
    assert all(g.members == (g.name,) for g in groups.values())  # x86's per-module config: module paths
    # conv_c's kernel takes the residual Add and the relu after it: it reads conv_b's relu and the residual
    assert len(groups["conv_c"].inputs) == 2 and groups["conv_c"].output == groups["head"].inputs[0]


def test_the_fragile_module_ranks_first_by_proxy_and_by_real_score(study):
    result = sensitivity(study)
    assert result.baseline["sqnr_db"] < 10  # all int8: destroyed (measured 1.8 dB, cosine 0.58)
    first, *rest = result.rows
    assert first["group"] == "conv_a" and first["sqnr_db"] < 10
    assert all(r["sqnr_db"] > 30 for r in rest)  # the others alone in int8 stay close to fp32
    assert first["proxy_db"] < min(r["proxy_db"] for r in rest)
    other = sensitivity(study, mode="all-but-one")  # keeping conv_a float alone repairs the model
    assert other.rows[0]["group"] == "conv_a" and other.rows[0]["sqnr_db"] > 30
    assert all(r["sqnr_db"] < 10 for r in other.rows[1:])


def test_fx_and_onnx_tables_rank_the_same_group_first(registry, fragile, study, tmp_path):
    from graphopt.zoo import export_onnx

    module, _, _, x = fragile
    export_onnx(module, str(tmp_path / "fragile.onnx"), (1, 8, 8, 8), dynamic_batch=True)
    np.savez(tmp_path / "calib.npz", input=x)
    onnx_study = prepare(str(tmp_path / "fragile.onnx"), str(tmp_path / "calib.npz"), registry=registry,
                         backend=get_backend(registry, "onnxruntime"), samples=32, folder=str(tmp_path / "s"))
    onnx_first = sensitivity(onnx_study).rows[0]
    fx_first = sensitivity(study).rows[0]
    assert fx_first["group"] == "conv_a" and "conv_a" in onnx_first["group"]  # /conv_a/Conv
    assert onnx_first["sqnr_db"] < 10 and fx_first["sqnr_db"] < 10


def test_min_cosine_budget_keeps_only_the_fragile_module_float(study):
    result = search_budget(study, min_cosine=0.99)
    assert result.holds and result.float_groups == ["conv_a"] and result.metrics["cosine"] >= 0.99
    assert result.float_nodes == ("conv_a",) and len(result.float_groups) < len(study.groups)
    assert study.score(result.float_groups) == pytest.approx(result.metrics)  # the choice scores what it says


def test_int8_budget_on_fx_leaves_no_qdq_around_the_excluded_module(fragile):
    import graphopt

    module, _, _, x = fragile
    result = graphopt.optimize(module, "int8-budget:min_cosine=0.99", example_inputs=(torch.from_numpy(x[:2]),),
                               calibration={"x": x}, backend="x86")
    record = next(r for r in result.report.records if r.name == "mixed-precision")
    assert record.stats["kept float groups"] == 1
    convs = [n for n in result.graph.gm.graph.nodes if aten_name(n) == "conv2d"]
    dequantized = [any(aten_name(a).startswith("dequantize") for a in n.args[:2]) for n in convs]
    assert dequantized == [False, True, True, True]  # conv_a: float input and weight; the others int8
    with torch.no_grad():
        ref, got = module(torch.from_numpy(x[:32])), result.graph.gm(torch.from_numpy(x[:32]))
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0)
    assert cos >= 0.99


def test_cli_on_a_pt2_prints_the_cost_and_the_table(fragile, capsys):
    _, pt2, calib, _ = fragile
    assert main(["sensitivity", str(pt2), "--calib", str(calib), "--backend", "x86", "--samples", "16",
                 "--executor", "inprocess"]) == 0
    out = capsys.readouterr().out
    assert "cost: 4 groups -> 4 evaluations on 16 samples" in out
    table = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert table[0][1] == "conv_a" and len(table) == 4
    assert main(["sensitivity", str(pt2), "--calib", str(calib), "--backend", "x86", "--min-cosine", "0.99",
                 "--executor", "inprocess"]) == 0
    assert "1 of 4 groups kept float: conv_a" in capsys.readouterr().out
    assert main(["sensitivity", str(pt2), "--calib", str(calib)]) == 2  # onnxruntime on a .pt2: one usage line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--backend x86" in err[0]


@pytest.mark.slow
def test_processes_executor_runs_fx_trials_as_in_process(study, tmp_path):
    """Workers reload the study from its folder (torch.export.load) and give the same metrics."""
    from graphopt.executors import LocalProcesses
    from graphopt.report.sensitivity import trials

    sets = [[], ["conv_a"]]
    with LocalProcesses(2, str(tmp_path / "runs")) as executor:
        remote = trials(study, executor, sets)
    assert remote == [pytest.approx(study.score(s)) for s in sets]


def test_the_same_program_is_the_same_study(registry, fragile, study, tmp_path):
    """A second study of the same program and data, in a named folder of the first, is accepted as the same study
    (so a rerun resumes): its identity is the program's code and tensors, not torch.export.save's bytes, which
    hold object ids and a random serialization id (every rerun made a new study and ran every trial again)."""
    _, pt2, calib, _ = fragile
    again = prepare_fx(str(pt2), str(calib), registry=registry, backend=get_backend(registry, "x86"), samples=32,
                       folder=study.folder)
    assert again.folder == study.folder

"""The x86 backend: a PT2E Q/DQ graph lowered by AOTInductor with freezing to oneDNN's int8 kernels, the package it
writes (dynamic batch, compile cache, loads without graphopt), the deprecated fx engines, bench / evaluate /
compare on packages, and its bad inputs. One int8 package is compiled for the module (about 15 s on 2 cores) and one
fp32 package by the CLI run; everything else reuses them through the compile cache."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

from graphopt.backends.base import BackendError, DataError, model_size_bytes
from graphopt.backends.x86 import X86Backend, fx_input_specs
from graphopt.backends.x86_aoti import package_kernels
from graphopt.backends.x86_export import strip_guards
from graphopt.cli import main
from graphopt.errors import UnsupportedError
from graphopt.numeric import sqnr_db
from tests.test_cli_bench_compare import one_line_error
from tests.x86_qdq import SmallNet, qdq_graph, small_qdq

# the lowered package against the Q/DQ graph it was built from: the same int8 arithmetic. Measured ~140 dB on AVX2
# CPUs (AMD EPYC); on AVX-512 VNNI / AMX CPUs (Xeon) oneDNN's kernels round about 5 % of the samples one
# requantization step the other way (max |diff| 1.6e-3 on logits of ~0.3; 50-58 dB), the rest agree to 1e-5. The
# graph itself is 42-45 dB from the fp32 model, so the tests also ask that most samples agree exactly.
# the fx engines' eager kernels: onednn fuses conv + add as the graph does, x86 / fbgemm requantize the conv output
# before the Add with an observed scale (measured 39-54 dB on the zoo's CNNs, ~140 dB on these two)
LOWERED_MIN_DB = 45.0
LOWERED_MIN_EXACT = 0.8  # fraction of samples whose outputs agree with the graph's to 1e-5
FX_ENGINE_MIN_DB = 30.0


@pytest.fixture(scope="module", autouse=True)
def x86_cache(tmp_path_factory):
    """One compile cache for this module, shared by pytest-xdist's workers of one run (the first to compile a
    package holds its lock; the others wait and take it from the cache); never the user's ~/.cache."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "x86-cache"
    folder.mkdir(exist_ok=True)
    old = os.environ.get("GRAPHOPT_CACHE_DIR")
    os.environ["GRAPHOPT_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        del os.environ["GRAPHOPT_CACHE_DIR"]
    else:
        os.environ["GRAPHOPT_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def qdq():
    return small_qdq(batch=2)


@pytest.fixture(scope="module")
def package(qdq, tmp_path_factory):
    """``(path, facts)``: the Q/DQ SmallNet written by the x86 backend (the module's one int8 compile)."""
    path = str(tmp_path_factory.mktemp("x86-pkg") / "small.int8.pt2")
    facts = X86Backend().write(qdq, path)
    return path, facts


def reference(graph):
    """The Q/DQ graph runnable at any batch size (torch.export's guard on the example batch removed)."""
    gm = copy.deepcopy(graph.gm)
    strip_guards(gm)
    return lambda x: gm(torch.from_numpy(x)).detach().numpy()


def elf_sections(data: bytes) -> set[str]:
    """The section names of a 64-bit little-endian ELF file (its section header table)."""
    import struct

    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]  # sh_offset of the section-name string table
    return {data[names_at + h[0]:data.index(b"\0", names_at + h[0])].decode() for h in headers}


def count(graph, target) -> int:
    return sum(1 for n in graph.gm.graph.nodes if n.target == target)


def test_package_runs_int8_kernels_and_matches_the_qdq_graph(qdq, package):
    path, facts = package
    convs, linears = count(qdq, torch.ops.aten.conv2d.default), count(qdq, torch.ops.aten.linear.default)
    assert (convs, linears) == (4, 1)
    expected = {"int8 conv": convs, "int8 linear": linears, "float conv": 0, "float linear/matmul": 0}
    assert facts["kernels"] == expected and package_kernels(path) == expected  # what the package's code calls
    with zipfile.ZipFile(path) as zf:
        wrapper = next(zf.read(n).decode() for n in zf.namelist() if n.endswith("wrapper.cpp"))
    assert "qconv2d_pointwise_binary" in wrapper  # conv + residual add + relu in one oneDNN kernel
    assert facts["check_sqnr_db"] >= LOWERED_MIN_DB
    assert facts["cache"] in ("miss", "hit") and facts["compile_s"] > 1 and facts["size_bytes"] == os.path.getsize(path)
    assert facts["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and "avx" in facts["cpu_features"]
    x = np.random.default_rng(1).standard_normal((64, 3, 16, 16)).astype(np.float32)
    out, expected = X86Backend().run_batched(path, {"x": x}, batch_size=8)[0], reference(qdq)(x)
    assert sqnr_db(expected, out) >= LOWERED_MIN_DB
    assert np.mean(np.abs(expected - out).max(axis=1) <= 1e-5) >= LOWERED_MIN_EXACT
    assert any(line.startswith("x86: kernels 4 int8 conv, 1 int8 linear") for line in facts["summary"])
    with zipfile.ZipFile(path) as zf:  # the library's debug information is stripped (most of a small package)
        library = next(zf.read(n) for n in zf.namelist() if n.endswith(".so"))
    sections = elf_sections(library)
    assert ".text" in sections and not any(name.startswith(".debug") for name in sections), sections


def test_package_keeps_a_dynamic_batch(qdq, package):
    path, facts = package
    assert facts["dynamic"] == {"x": [0]}
    backend = X86Backend()
    session = backend.session(path, threads=1)
    assert [s.shape for s in backend.input_specs(session)] == [(None, 3, 16, 16)]
    run = reference(qdq)
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype(np.float32)
        out = backend.run(session, {"x": x})[0]
        assert out.shape == (batch, 10) and sqnr_db(run(x), out) >= LOWERED_MIN_DB
    with pytest.raises(DataError, match=r"shape \(2, 3, 8, 8\), the model takes \(\?, 3, 16, 16\)"):
        backend.run(session, {"x": np.zeros((2, 3, 8, 8), np.float32)})


def test_a_second_build_comes_from_the_cache(qdq, package, tmp_path):
    path, first = package
    start = time.perf_counter()
    again = X86Backend().write(qdq, str(tmp_path / "again.pt2"))
    took = time.perf_counter() - start
    assert again["cache"] == "hit" and again["compile_s"] == first["compile_s"]
    assert took < first["compile_s"] / 5, (took, first["compile_s"])  # measured: 0.2 s against ~15 s
    assert open(path, "rb").read() == open(tmp_path / "again.pt2", "rb").read()
    other = small_qdq(batch=2, seed=1)  # other weights: another package
    from graphopt.backends.x86_aoti import cache_key
    from graphopt.backends.x86_export import dynamic_dims

    keys = {cache_key(g.gm, g.example_inputs, dynamic_dims(g.example_inputs)) for g in (qdq, other)}
    assert len(keys) == 2


def test_the_package_loads_in_a_fresh_process_without_graphopt(package, tmp_path):
    """`python -I -S` with only torch's site-packages on the path: graphopt is not importable there."""
    path, _ = package
    x = np.random.default_rng(2).standard_normal((3, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    site = os.path.dirname(os.path.dirname(torch.__file__))
    code = (
        f"import sys; sys.path.append({site!r})\n"
        "import importlib.util, json, time\n"
        "assert importlib.util.find_spec('graphopt') is None\n"
        "start = time.perf_counter()\n"
        "import torch; m = torch._inductor.aoti_load_package(" + repr(path) + ")\n"
        "loaded = time.perf_counter() - start\n"
        "import numpy as np\n"
        f"out = m(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r})))\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, out.numpy())\n"
        "print(json.dumps({'load_s': loaded, 'graphopt': 'graphopt' in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["graphopt"] is False and report["load_s"] < 60
    expected = X86Backend().run(path, {"x": x})[0]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


@pytest.mark.parametrize("engine", ["fx-x86", "fx-onednn"])
def test_fx_engines_run_the_same_graph_on_eager_quantized_kernels(engine):
    from graphopt import zoo

    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    digits = qdq_graph(zoo.DigitsCNN().eval(), (x,), [(torch.randn(2, 1, 16, 16),) for _ in range(4)])
    feeds = np.random.default_rng(3).standard_normal((2, 1, 16, 16)).astype(np.float32)
    backend = X86Backend(engine=engine)
    for graph, data in ((digits, feeds), (small_qdq(batch=2), np.repeat(feeds, 3, axis=1))):
        session = backend.session(graph)
        code = session.runner.code
        assert "quantized.conv2d" in code and "quantized_decomposed" not in code  # every Q/DQ pattern lowered
        out = backend.run(session, {"x": data})[0]
        assert sqnr_db(graph.run({"x": data})[0], out) >= FX_ENGINE_MIN_DB
        if engine == "fx-onednn":
            assert "conv2d_add_relu" in code
        else:
            assert "add_relu" in code and any("observed on the example inputs" in n for n in session.notes)


def test_bench_and_evaluate_on_a_package(qdq, package):
    path, _ = package
    backend = X86Backend()
    result = backend.bench(path, batch_sizes=[1, 4], threads=[1], warmup=2, iters=5)
    assert [(r.batch, r.threads, r.iters) for r in result.rows] == [(1, 1, 5), (4, 1, 5)]
    assert all(0 < r.p50_ms < 1000 for r in result.rows) and result.size_bytes == os.path.getsize(path)
    x = np.random.default_rng(4).standard_normal((20, 3, 16, 16)).astype(np.float32)
    labels = reference(qdq)(x).argmax(axis=1)
    labels[:5] = (labels[:5] + 1) % 10  # 5 of 20 wrong on purpose
    accuracy = backend.evaluate(path, {"x": x}, labels, batch_size=8)
    assert (accuracy.correct, accuracy.total) == (15, 20)


def test_cli_bench_and_compare_packages(package, capsys):
    path, _ = package
    assert main(["bench", path, "--backend", "x86", "--batch", "1,3", "--threads", "1", "--iters", "3",
                 "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "batch 3: x 3x3x16x16" in out and "backend x86" in out
    assert main(["compare", path, path, "--backend", "x86", "--samples", "4"]) == 0
    assert "inf" in capsys.readouterr().out
    code = main(["compare", path, path, "--backend", "x86", "--per-layer"])
    one_line_error(capsys, code, 2, "per-layer SQNR compares ONNX models")


def test_cli_run_writes_the_package_and_measures_before_and_after(tmp_path, capsys):
    """`graphopt run program.pt2 --backend x86`: the result is an AOTInductor package, the lowering facts are
    printed and in the JSON; --bench times the input compiled the same way against the package (one fp32
    compile: the folded result has the same code and weights as the input, so it comes from the cache)."""
    torch.manual_seed(0)
    model, x = SmallNet().eval(), torch.randn(2, 3, 16, 16)
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "small.pt2"))
    out, report = tmp_path / "small.x86.pt2", tmp_path / "run.json"
    code = main(["run", str(tmp_path / "small.pt2"), "--passes", "fold", "--backend", "x86", "-o", str(out),
                 "--bench", "--json", str(report)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "x86: AOTInductor package with freezing" in printed and "4 float conv, 1 float linear/matmul" in printed
    assert "latency (p50" in printed and "before: the input model run on x86" in printed
    data = json.loads(report.read_text())
    assert data["artifact"]["kernels"]["float conv"] == 4 and data["latency_ms"]["before"] > 0
    assert data["size_bytes"]["after"] == os.path.getsize(out)
    loaded = torch._inductor.aoti_load_package(str(out))
    assert sqnr_db(model(x).detach().numpy(), loaded(x).numpy()) > 80


# -- bad input ----------------------------------------------------------------------------------------------------
def test_onnx_models_are_refused_with_one_line(tmp_path, capsys):
    from graphopt import zoo

    onnx_path = str(tmp_path / "tiny.onnx")
    zoo.export_onnx(zoo.tiny_resnet(), onnx_path, (1, 3, 32, 32))
    code = main(["run", onnx_path, "--backend", "x86", "-o", str(tmp_path / "out.pt2")])
    one_line_error(capsys, code, 4, "x86 runs PyTorch models: give a .pt2 / nn.Module, or use --backend onnxruntime")
    code = main(["bench", onnx_path, "--backend", "x86"])
    one_line_error(capsys, code, 4, "x86 runs PyTorch models")
    assert sorted(os.listdir(tmp_path)) == ["tiny.onnx"]


def test_a_package_given_to_onnxruntime_says_which_backend(package, capsys):
    code = main(["bench", package[0]])
    one_line_error(capsys, code, 2, "a PyTorch file, not ONNX (run it with --backend x86)")


def test_a_damaged_package_is_one_line(package, tmp_path, capsys):
    broken = tmp_path / "broken.pt2"
    broken.write_bytes(open(package[0], "rb").read()[:4000])
    code = main(["bench", str(broken), "--backend", "x86"])
    one_line_error(capsys, code, 3, "broken.pt2")


def test_a_graph_inductor_cannot_compile_writes_nothing(qdq, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("C++ compile error: no kernel for op foo\nmore detail")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fail)
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "empty-cache"))
    other = small_qdq(batch=2, seed=2)  # not in any cache
    from graphopt.api import optimize

    with pytest.raises(BackendError, match=r"^inductor could not compile the model for x86: C\+\+ compile error: "
                                           r"no kernel for op foo \("):
        optimize(other, "eliminate-dead", backend="x86", output=str(tmp_path / "out.pt2"), check=False)
    assert not os.path.exists(tmp_path / "out.pt2")
    assert [n for n in os.listdir(tmp_path) if n != "empty-cache"] == []


def test_without_inductor_the_error_says_what_to_install(monkeypatch):
    from graphopt.backends.x86_export import torch_module

    monkeypatch.setitem(sys.modules, "torch._inductor", None)
    with pytest.raises(UnsupportedError, match=r"the x86 backend needs torch with inductor .*pip install"):
        torch_module()


def test_a_module_without_example_inputs_is_refused():
    with pytest.raises(BackendError, match="x86 needs example inputs to lower a SmallNet"):
        X86Backend().session(SmallNet())
    with pytest.raises(Exception, match="unknown x86 engine 'tvm'"):
        X86Backend(engine="tvm")


def test_model_size_of_graphs_and_packages(qdq, package):
    assert model_size_bytes(package[0]) == os.path.getsize(package[0])
    weights = sum(t.numel() * t.element_size() for t in qdq.gm.state_dict().values())
    assert model_size_bytes(qdq) == weights > 1000


def test_token_inputs_get_a_dynamic_batch_and_sequence_unless_the_graph_fixes_them():
    """The export step alone (no compile): a BERT-like encoder traced from its module frees batch and sequence of
    its token ids; captured by a static torch.export its views hold the example's [2, 8] (export keeps that as a
    guard, which a package would not check), which the probe finds: compiled static rather than wrong."""
    from graphopt import zoo
    from graphopt.backends.x86_export import export_dynamic
    from graphopt.ir.fx_graph import FxGraph

    model, ids = zoo.bert_like(hidden=32, layers=1, heads=2, seq=32), torch.randint(0, 1000, (2, 8))
    traced = FxGraph.from_module(model, (ids,))
    _, dynamic, reason = export_dynamic(traced.gm, traced.example_inputs)
    assert dynamic == {"input_ids": [0, 1]} and reason == ""
    gm = torch.export.export(model, (ids,)).module()
    strip_guards(gm)
    _, dynamic, reason = export_dynamic(gm, (ids,))
    assert dynamic == {"input_ids": []} and reason.startswith("the graph holds a size of its example inputs")


def test_a_static_package_is_written_with_a_warning(qdq, tmp_path, monkeypatch):
    """AOTInductor checks no input shape when a package runs: one compiled for its example's shapes (an int8 conv on
    a 1-channel input, which inductor miscompiles with dynamic shapes) computes a wrong result for another batch
    without an error, so the run that writes it warns. (The compile is stood in for: its facts say static.)"""
    from graphopt.backends.x86 import X86Session
    from graphopt.backends.x86_aoti import LoweringFacts

    stub = tmp_path / "built.pt2"
    stub.write_bytes(b"package")
    facts = LoweringFacts(str(stub), "miss", 1.0, 1.0, "avx2", "AVX2", torch.__version__, {}, {"x": []},
                          "inductor miscompiles an int8 conv on a 1-channel input", 7)
    backend = X86Backend()
    monkeypatch.setattr(backend, "_lower", lambda graph, threads: X86Session(None, fx_input_specs(graph), ["y"],
                                                                             facts=facts))
    monkeypatch.setattr(backend, "_check_package", lambda graph, session: 50.0)
    written = backend.write(qdq, str(tmp_path / "m.pt2"))
    (warning,) = written["warnings"]
    assert "takes only its example's shapes (x 2x3x16x16; inductor miscompiles" in warning
    facts.dynamic, facts.static_reason = {"x": [0]}, "the token sequence is fixed: a position table"
    (warning,) = backend.write(qdq, str(tmp_path / "s.pt2"))["warnings"]  # a dim it meant to free stayed fixed
    assert "its example's sizes in every dim but those it lists as dynamic" in warning
    assert "the token sequence is fixed" in warning
    facts.static_reason = ""
    assert backend.write(qdq, str(tmp_path / "d.pt2"))["warnings"] == []


def test_a_conv3d_stays_float_on_x86():
    """inductor lowers int8 conv1d / conv2d to oneDNN, not conv3d (it runs a float convolution): Q/DQ there would
    only add rounding. The Conv2d beside it is quantized."""
    import graphopt

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c3, self.c2 = torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.c2(self.c3(x).mean(2))

    torch.manual_seed(0)
    x = torch.randn(4, 2, 4, 8, 8)
    result = graphopt.optimize(Mixed().eval(), "int8", example_inputs=(x[:1],), calibration=x, backend="x86",
                               check=False)
    place = next(r for r in result.report.records if r.name == "place-qdq")
    weights = [n for n in result.graph.gm.graph.nodes if "dequantize_per_channel" in str(n.target)]
    assert len(weights) == 1 and "Conv3d" in " ".join(place.notes), (place.notes, len(weights))


def test_a_dynamic_form_inductor_cannot_compile_falls_back_to_static_shapes_and_says_so(tmp_path, monkeypatch):
    """inductor fails on some dynamic programs (attention with a padding mask: 'torch.Size() takes an iterable of
    int'): the package is compiled at the example's shapes instead, and the run warns that it is static."""
    real = torch._inductor.aoti_compile_and_package

    def dynamic_fails(program, *args, **kwargs):
        specs = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"]
        if any(not isinstance(d, int) for v in specs if isinstance(v, torch.Tensor) for d in v.shape):
            raise RuntimeError("torch.Size() takes an iterable of 'int' (item 0 is 'Node')")
        return real(program, *args, **kwargs)

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", dynamic_fails)
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    from graphopt.api import optimize

    result = optimize(small_qdq(batch=2, seed=3), "eliminate-dead", backend="x86", output=str(tmp_path / "s.pt2"),
                      check=False)
    assert result.artifact["dynamic"] == {"x": []}
    assert "inductor could not compile the dynamic form" in result.artifact["static_reason"]
    assert any("takes only its example's shapes" in w for w in result.report.warnings)

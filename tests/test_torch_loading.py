"""PyTorch files: no code from a file runs unless the user trusts it; files are told apart by content.

Hostile files are built here: pickles whose ``__reduce__`` writes a marker file, and torch.export archives edited
to carry code where torch.export.load would run it (sample inputs, tensor payloads, opaque constants, a sympy
expression, a pytree context that names a module to import). Each must give one ``graphopt: error:`` line, exit
3 (4 for compiled or TorchScript archives), leave the input byte-identical and the marker absent.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from graphopt.cli import main
from graphopt.errors import ModelLoadError, UnsupportedError, UsageError
from graphopt.ir import load_model
from graphopt.ir.fx_graph import FxGraph
from graphopt.ir.torch_files import _check_sym_expr

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 6 * 6, 5)
        with torch.no_grad():  # BatchNorm statistics that are not the identity, so folding it changes weights
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


class RunsCode:
    """Unpickling this runs ``exec``: it creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _module():
    torch.manual_seed(0)
    return Small().eval()


def _reference(module=None, x=X):
    with torch.no_grad():
        return (module or _module())(x)


def _cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _assert_one_line_error(rc, err, code, path, *phrases):
    assert rc == code, err
    assert err.startswith(f"graphopt: error: {path}: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "internal error" not in err
    for phrase in phrases:
        assert phrase in err, err


@pytest.fixture(scope="module")
def program_file(tmp_path_factory):
    """torch.export.save of Small with its example inputs, and the same archive with a dynamic batch size."""
    folder = tmp_path_factory.mktemp("programs")
    torch.export.save(torch.export.export(_module(), (X,)), folder / "small.pt2")
    dynamic = torch.export.export(_module(), (X,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(dynamic, folder / "dynamic.pt2")
    return folder


def _rewrite(src, dst, edit=lambda name, data: data, extra=()):
    """Copy the zip ``src`` to ``dst``, passing each member through ``edit``; add ``extra`` (name, bytes) under
    the archive's root folder."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info.filename)))
        for name, data in extra:
            zout.writestr(f"{root}/{name}", data)
    return dst


def _torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# -- pickles -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["zip", "legacy", "pickle4"])
@pytest.mark.parametrize("command", ["inspect", "verify", "run"])
def test_a_pickle_that_runs_code_is_refused_without_running(fmt, command, tmp_path, capsys):
    path, marker = tmp_path / "evil.pt", tmp_path / "MARKER"
    if fmt == "pickle4":
        path.write_bytes(pickle.dumps(RunsCode(marker), protocol=4))
    else:
        torch.save(RunsCode(marker), path, _use_new_zipfile_serialization=fmt == "zip")
    before = _digest(path)
    rc, _, err = _cli(capsys, command, path, "--input-shape", "2x3x8x8")
    _assert_one_line_error(rc, err, 3, path, "holds pickled Python objects (builtins.exec)",
                           "runs the code it carries", "--trust-pickle (trust_pickle=True) only for a file you trust")
    assert not marker.exists()
    assert _digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]  # run wrote nothing


def test_with_trust_pickle_the_pickle_runs_because_the_user_said_so(tmp_path, capsys):
    path, marker = tmp_path / "evil.pt", tmp_path / "MARKER"
    torch.save(RunsCode(marker), path)
    rc, _, err = _cli(capsys, "inspect", path, "--trust-pickle")
    assert marker.exists()  # the user's choice
    _assert_one_line_error(rc, err, 3, path, "holds a Python NoneType, not a program to optimize")


def test_a_pickled_module_loads_only_with_trust_pickle(tmp_path, capsys):
    path = tmp_path / "m.pt"
    torch.save(_module(), path)
    before = _digest(path)
    rc, _, err = _cli(capsys, "run", path, "--input-shape", "2x3x8x8")
    _assert_one_line_error(rc, err, 3, path, "holds a pickled nn.Module (", "loading it runs the code it carries",
                           "--trust-pickle (trust_pickle=True) only for a file you trust")
    with pytest.raises(ModelLoadError, match="pickled nn.Module"):
        load_model(str(path), (X,))

    out = tmp_path / "m.opt.pt2"
    rc, stdout, err = _cli(capsys, "run", path, "--trust-pickle", "--input-shape", "2x3x8x8", "-o", out)
    assert rc == 0, err
    assert "folded 1 BatchNormalization" in stdout
    assert _digest(path) == before
    again = load_model(str(out))  # graphopt's output is a torch.export program: it loads without trust
    assert again.captured_with == "torch.export" and "batch_norm.default" not in again.op_counts()
    assert tuple(again.example_inputs[0].shape) == (2, 3, 8, 8)
    got = torch.from_numpy(again.run({again.input_names()[0]: X.numpy()})[0])
    torch.testing.assert_close(got, _reference(), rtol=1e-5, atol=1e-5)  # BatchNorm folded into the conv

    graph = load_model(str(path), (X,), trust_pickle=True)
    assert graph.captured_with == "symbolic_trace"
    rc, _, err = _cli(capsys, "inspect", path, "--trust-pickle")
    _assert_one_line_error(rc, err, 2, path, "needs example inputs", "--input-shape")


def test_graphopts_old_pickled_output_loads_with_trust_and_keeps_its_example_inputs(tmp_path):
    path = tmp_path / "old.opt.pt"
    torch.save({"graphopt_fx": 1, "module": torch.fx.symbolic_trace(_module()), "example_inputs": (X,),
                "captured_with": "symbolic_trace"}, path)
    with pytest.raises(ModelLoadError, match="pickled nn.Module"):
        load_model(str(path))
    graph = load_model(str(path), trust_pickle=True)
    assert torch.equal(graph.example_inputs[0], X)
    torch.testing.assert_close(torch.from_numpy(graph.run({"x": X.numpy()})[0]), _reference(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name, obj, phrase", [
    ("sd.pt", "state_dict", "holds only weights (a state dict), no program to optimize"),
    ("sd.pt2", "state_dict", "holds only weights (a state dict), no program to optimize"),
    ("t.pt", torch.ones(3), "holds a tensor, not a program to optimize"),
    ("l.pth", [torch.ones(3), 2], "holds a Python list, not a program to optimize"),
])
def test_files_that_hold_no_program_say_so(name, obj, phrase, tmp_path, capsys):
    path = tmp_path / name
    torch.save(_module().state_dict() if obj == "state_dict" else obj, path)
    rc, _, err = _cli(capsys, "run", path, "--input-shape", "2x3x8x8")
    _assert_one_line_error(rc, err, 3, path, phrase, "graphopt.optimize(module, ...)", "torch.export.save")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


# -- damaged and foreign files --------------------------------------------------------------------------------------
def _damaged(kind, folder, program_file):
    if kind == "truncated .pt2":
        data = (program_file / "small.pt2").read_bytes()
        (folder / "x.pt2").write_bytes(data[: len(data) // 2])
        return folder / "x.pt2", "truncated or damaged zip"
    if kind == "truncated .pt":
        (folder / "x.pt").write_bytes(_torch_saved(_module().state_dict())[:2000])
        return folder / "x.pt", "truncated or damaged zip"
    if kind == "zip of junk":
        with zipfile.ZipFile(folder / "x.pt", "w") as zf:
            zf.writestr("notes/readme.txt", "hello")
        return folder / "x.pt", "neither a torch.export program (.pt2) nor a torch.save file"
    if kind == "torch.save zip with a junk pickle":
        _rewrite(io.BytesIO(_torch_saved({"w": torch.ones(2)})), folder / "x.pt",
                 lambda name, data: b"\x80\x02junk junk" if name.endswith("data.pkl") else data)
        return folder / "x.pt", "not a readable PyTorch file"
    if kind == ".pt2 with broken JSON":
        _rewrite(program_file / "small.pt2", folder / "x.pt2",
                 lambda name, data: b"{not json" if name.endswith("models/model.json") else data)
        return folder / "x.pt2", "is not valid JSON"
    if kind == "empty file":
        (folder / "x.pt").write_bytes(b"")
        return folder / "x.pt", "is empty"
    if kind == "directory":
        (folder / "x.pt").mkdir()
        return folder / "x.pt", "is a directory"
    if kind == "text":
        (folder / "x.pth").write_text("not a model\n")
        return folder / "x.pth", "not a PyTorch file"
    return folder / "missing.pt", "no such file"


@pytest.mark.parametrize("kind", ["truncated .pt2", "truncated .pt", "zip of junk", "torch.save zip with a junk pickle",
                                  ".pt2 with broken JSON", "empty file", "directory", "text", "missing"])
def test_damaged_files_get_one_line_and_stay_as_they_were(kind, tmp_path, capsys, program_file):
    path, phrase = _damaged(kind, tmp_path, program_file)
    before = _digest(path) if path.is_file() else None
    for command in ("inspect", "verify", "run"):
        rc, _, err = _cli(capsys, command, path)
        _assert_one_line_error(rc, err, 3, path, phrase)
    assert (_digest(path) if path.is_file() else None) == before
    assert not list(tmp_path.glob("*.opt*"))


def test_an_aotinductor_package_is_compiled_code(tmp_path, capsys, program_file):
    """The layout torch._inductor.aoti_compile_and_package writes: the archive with data/aotinductor/<model>/."""
    path = _rewrite(program_file / "small.pt2", tmp_path / "compiled.pt",
                    extra=[("data/aotinductor/model/abc.wrapper.so", b"\x7fELF not loaded"),
                           ("data/aotinductor/model/abc.wrapper.cpp", b"// compiled")])
    for flags in ((), ("--trust-pickle",)):
        rc, _, err = _cli(capsys, "run", path, *flags)
        _assert_one_line_error(rc, err, 4, path, "an AOTInductor package is compiled code",
                               "give the .pt2 of torch.export.save")
    with pytest.raises(UnsupportedError):
        load_model(str(path))


def test_a_torchscript_archive_is_unsupported(tmp_path, capsys):
    path = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    rc, _, err = _cli(capsys, "inspect", path)
    _assert_one_line_error(rc, err, 4, path, "TorchScript archive", "torch.export.save")


# -- torch.export archives ------------------------------------------------------------------------------------------
def test_a_torch_export_program_runs_and_graphopt_writes_one_back(tmp_path, capsys, program_file):
    src = program_file / "small.pt2"
    before = _digest(src)
    out = tmp_path / "small.opt.pt2"
    rc, stdout, err = _cli(capsys, "run", src, "-o", out)
    assert rc == 0, err
    assert "folded 1 BatchNormalization" in stdout and _digest(src) == before
    graph = load_model(str(out))
    assert graph.captured_with == "torch.export" and torch.equal(graph.example_inputs[0], X)
    assert "batch_norm.default" not in graph.op_counts()
    got = torch.from_numpy(graph.run({graph.input_names()[0]: X.numpy()})[0])
    torch.testing.assert_close(got, _reference(), rtol=1e-5, atol=1e-5)
    rc, stdout, _ = _cli(capsys, "verify", out)
    assert rc == 0 and "outputs (2, 5)" in stdout


@pytest.mark.parametrize("suffix", [".pt2", ".pt", ".bin"])
def test_graphopts_own_file_round_trips_whatever_the_suffix(suffix, tmp_path):
    graph = FxGraph.from_module(_module(), (X,))
    path = tmp_path / f"saved{suffix}"
    graph.save(str(path))
    with zipfile.ZipFile(path) as zf:  # a torch.export archive, not a pickle of the module
        assert any(n.endswith("/archive_format") for n in zf.namelist())
        assert not any(n.endswith("data.pkl") for n in zf.namelist())
    again = load_model(str(path))
    assert torch.equal(again.example_inputs[0], X)
    feeds = {again.input_names()[0]: X.numpy()}
    np.testing.assert_allclose(again.run(feeds)[0], graph.run({"x": X.numpy()})[0], rtol=1e-6, atol=0)


def test_files_are_told_apart_by_content_not_suffix(tmp_path, capsys, program_file):
    as_pt = tmp_path / "program.pt"
    as_pt.write_bytes((program_file / "small.pt2").read_bytes())
    graph = load_model(str(as_pt))
    assert graph.ir == "fx" and graph.captured_with == "torch.export"
    weights = tmp_path / "weights.pt2"
    torch.save(_module().state_dict(), weights)
    rc, _, err = _cli(capsys, "inspect", weights)
    _assert_one_line_error(rc, err, 3, weights, "holds only weights")


def test_a_dynamic_program_loads_and_its_shape_formulas_pass_the_check(program_file):
    graph = load_model(str(program_file / "dynamic.pt2"))
    x = torch.randn(5, 3, 8, 8)
    got = torch.from_numpy(graph.run({graph.input_names()[0]: x.numpy()})[0])
    torch.testing.assert_close(got, _reference(x=x), rtol=1e-6, atol=1e-6)
    with zipfile.ZipFile(program_file / "dynamic.pt2") as zf:
        text = next(zf.read(n) for n in zf.namelist() if n.endswith("models/model.json")).decode()
    formulas = set(_values(json.loads(text), "expr_str"))
    assert formulas and all(_check_sym_expr(f) for f in formulas)


def _values(doc, key):
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from ([v] if k == key else _values(v, key))
    elif isinstance(doc, list):
        for v in doc:
            yield from _values(v, key)


def test_a_program_without_sample_inputs_uses_its_input_specs_or_asks(tmp_path, capsys, program_file):
    static = torch.export.load(program_file / "small.pt2")
    static._example_inputs = None
    graph = load_model(static)
    assert tuple(graph.example_inputs[0].shape) == (2, 3, 8, 8) and graph.example_inputs[0].dtype == torch.float32
    dynamic = torch.export.load(program_file / "dynamic.pt2")
    dynamic._example_inputs = None
    with pytest.raises(UsageError, match="--input-shape"):
        load_model(dynamic)
    assert tuple(load_model(dynamic, (torch.randn(4, 3, 8, 8),)).example_inputs[0].shape) == (4, 3, 8, 8)


SYM = "Symbol('s77', positive=True, integer=True)"


def _crafted(kind, folder, program_file, marker):
    src = program_file / "dynamic.pt2"

    def model_json(change):
        def edit(name, data):
            if not name.endswith("models/model.json"):
                return data
            doc = json.loads(data)
            change(doc)
            return json.dumps(doc).encode()
        return edit

    if kind == "sample inputs pickle":
        evil = _torch_saved(RunsCode(marker))
        return _rewrite(src, folder / "x.pt2", lambda n, d: evil if n.endswith("sample_inputs/model.pt") else d)
    if kind == "pickled weight payload":
        def edit(name, data):
            if name.endswith("model_weights_config.json"):
                doc = json.loads(data)
                doc["config"]["fc.bias"].update(use_pickle=True, path_name="weight_evil")
                return json.dumps(doc).encode()
            return data
        evil = _torch_saved(RunsCode(marker))
        return _rewrite(src, folder / "x.pt2", edit, extra=[("data/weights/weight_evil", evil)])
    if kind == "opaque constant":
        def edit(name, data):
            if name.endswith("model_constants_config.json"):
                return json.dumps({"config": {"c": {"path_name": "opaque_obj_0", "is_param": False,
                                                     "use_pickle": True, "tensor_meta": None}}}).encode()
            return data
        return _rewrite(src, folder / "x.pt2", edit, extra=[("data/constants/opaque_obj_0",
                                                               pickle.dumps(RunsCode(marker)))])
    if kind == "shape formula":
        def formula(doc):
            sizes = doc["graph_module"]["graph"]["tensor_values"]["x"]["sizes"]
            symbol = sizes[0]["as_expr"]["expr_str"]
            sizes[0]["as_expr"]["expr_str"] = f"{symbol} + 0*len(str(exec(\"open({str(marker)!r}, 'w').close()\")))"
        return _rewrite(src, folder / "x.pt2", model_json(formula))

    def enum_context(doc):  # a pytree context torch.utils._pytree reads with importlib.import_module
        signature = doc["graph_module"]["module_call_graph"][0]["signature"]
        spec = json.loads(signature["in_spec"])
        spec[1]["context"] = json.dumps({"__enum__": True, "fqn": "tl_marker_module:Color", "name": "RED"})
        signature["in_spec"] = json.dumps(spec)
    return _rewrite(src, folder / "x.pt2", model_json(enum_context))


@pytest.mark.parametrize("kind", ["sample inputs pickle", "pickled weight payload", "opaque constant",
                                  "shape formula", "module import"])
def test_a_crafted_program_runs_none_of_its_code(kind, tmp_path, capsys, program_file, monkeypatch):
    marker = tmp_path / "MARKER"
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "tl_marker_module.py").write_text(
        f"import enum\nopen({str(marker)!r}, 'w').close()\n\nclass Color(enum.Enum):\n    RED = 1\n")
    monkeypatch.syspath_prepend(str(modules))
    path = _crafted(kind, tmp_path, program_file, marker)
    before = _digest(path)
    for command in ("inspect", "run"):
        rc, _, err = _cli(capsys, command, path)
        _assert_one_line_error(rc, err, 3, path, "--trust-pickle (trust_pickle=True) only for a file you trust")
    assert not marker.exists()
    assert "tl_marker_module" not in sys.modules
    assert _digest(path) == before


@pytest.mark.parametrize("text", [
    "__import__('os').system('true')", f"{SYM}.__class__", "Max('1+1', Integer(2))", "Symbol('a b')",
    "Symbol('_x')", "Float('1.5; x')", "(lambda: 1)()", "Integer(2)[0]", "eval('1')", "exec('1')", "_s0",
    f"Add({SYM}, 'x')", "Symbol('s0', positive=print)", "Symbol('s0', **{})", "Max(*[1])", "",
])
def test_the_shape_formula_check_refuses_what_is_not_a_formula(text):
    assert not _check_sym_expr(text)


@pytest.mark.parametrize("text", [
    SYM, f"Add(FloorDiv({SYM}, Integer(2)), Integer(1))", f"Pow({SYM}, Integer(2))",
    f"Mul(Integer(9), Max(Integer(1), TruncToInt(Mul(Float('1.5', precision=53), ToFloat({SYM})))))",
])
def test_the_shape_formula_check_accepts_what_torch_export_writes(text):
    assert _check_sym_expr(text)


# -- saving --------------------------------------------------------------------------------------------------------
@torch.fx.wrap
def _positive_or_negative(x):
    return x if bool(x.sum() > 0) else -x  # data-dependent control flow: torch.export cannot capture it


class DataDependent(torch.nn.Module):
    def forward(self, x):
        return _positive_or_negative(x) * 2


def test_a_module_torch_export_cannot_capture_is_saved_as_onnx_instead(tmp_path):
    graph = FxGraph.from_module(DataDependent(), (torch.ones(1, 3),))
    with pytest.raises(UnsupportedError, match=r"torch.export cannot capture the optimized module .*\.onnx"):
        graph.save(str(tmp_path / "m.pt2"))
    assert not (tmp_path / "m.pt2").exists()
    graph.save(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(str(tmp_path / "m.onnx"))


# -- the ONNX route -------------------------------------------------------------------------------------------------
def test_the_onnx_route_never_imports_torch(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    w = onnx.numpy_helper.from_array(np.ones((1, 4), np.float32), "w")
    nodes = [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Add", ["i", "w"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "x.onnx"
    onnx.save(model, path)
    script = f"""
import sys
from graphopt.cli import main
path = {str(path)!r}
for argv in (["run", path, "--passes", "fold", "-o", path + ".opt.onnx"], ["inspect", path], ["verify", path]):
    assert main(argv) == 0, argv
    assert "torch" not in sys.modules, argv
import graphopt
assert graphopt.optimize(path, "fold").report.modified
assert "torch" not in sys.modules, "optimize"
print("no torch")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "no torch" in done.stdout, done.stderr[-2000:]


def test_a_branch_on_an_argument_left_to_its_default_is_captured_as_it_runs(tmp_path):
    """symbolic_trace takes ``if mask is not None`` on the proxy it puts for mask; the module run on the example
    inputs (mask left None) takes the other branch: the capture must be the one that runs (torch.export here)."""
    import graphopt

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)

        def forward(self, x, mask=None):
            y = self.a(x)
            if mask is not None:
                y = y * mask
            return y

    torch.manual_seed(0)
    module, x = Masked().eval(), torch.randn(2, 8)
    result = graphopt.optimize(module, "fold", example_inputs=(x,))
    assert result.report.to_dict()["checks"]["numeric"]["compared"] is True
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), module(x))
    result.save(str(tmp_path / "m.onnx"))


def test_a_module_neither_capture_takes_is_unsupported_with_the_way_out(capfd):
    class Branches(torch.nn.Module):  # a branch on the data: symbolic_trace and torch.export both refuse it
        def forward(self, x):
            return x * 2 if x.sum() > 0 else -x

    with pytest.raises(UnsupportedError, match=r"could not capture Branches: .* torch\.cond"):
        FxGraph.from_module(Branches(), (torch.ones(1, 3),))
    assert capfd.readouterr().err == ""  # torch's dump of the graph it failed on stays off the terminal

"""The core's shape: its modules import downwards only (no cycle, at module or function level), the core names
no pass, and the ONNX route never imports torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "graphopt")


def _modules() -> dict[str, str]:
    mods = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.splitext(os.path.relpath(path, ROOT))[0].replace(os.sep, ".")
                mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _imports(path: str, module: str, known: dict[str, str]) -> set[str]:
    """Every graphopt module ``module`` imports, anywhere in the file (a function-level import is an edge too)."""
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            # a package's __init__ that re-exports its children is not an edge back up from a child
            if name and name != module and not module.startswith(name + "."):
                out.add(name)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_in_graphopt():
    mods = _modules()
    graph = {m: _imports(p, m, mods) for m, p in mods.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("lower, higher", [
    ("graphopt.ir", ("graphopt.passes", "graphopt.backends", "graphopt.report", "graphopt.calib", "graphopt.driver",
                     "graphopt.cli", "graphopt.api", "graphopt.prune", "graphopt.pt2e")),
    ("graphopt.passes", ("graphopt.backends", "graphopt.report", "graphopt.driver", "graphopt.cli", "graphopt.api",
                         "graphopt.pt2e")),
    ("graphopt.backends", ("graphopt.report", "graphopt.driver", "graphopt.cli", "graphopt.api", "graphopt.pt2e")),
    ("graphopt.pt2e", ("graphopt.report", "graphopt.driver", "graphopt.cli", "graphopt.api")),
    ("graphopt.report", ("graphopt.driver", "graphopt.cli", "graphopt.api")),
])
def test_layers_import_downwards(lower, higher):
    mods = _modules()
    bad = [(m, d) for m, p in mods.items() if m == lower or m.startswith(lower + ".")
           for d in _imports(p, m, mods) if any(d == h or d.startswith(h + ".") for h in higher)]
    assert bad == []


def test_the_core_names_no_builtin_pass(registry):
    """graphopt/ knows passes only through the registry: no string in its code (docstrings aside) is the name of
    a pass graphopt's own plugins register, and it imports none of them. (The default pipeline, the alias
    "fold", is configuration: a name the registry resolves.)"""
    names = set(registry.passes)
    mods = _modules()
    offenders = []
    for module, path in mods.items():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if node.value in names:
                    offenders.append((module, node.value))
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                offenders += [(module, t) for t in targets if t.startswith("graphopt_plugins")]
    assert offenders == []


def test_the_onnx_route_never_imports_torch(tmp_path, zoo_onnx):
    model = zoo_onnx("tiny_resnet")
    code = (
        "import sys\n"
        "from graphopt.cli import main\n"
        f"assert main(['run', {str(model)!r}, '--passes', 'fold', '-q', '-o', {str(tmp_path / 'o.onnx')!r}]) == 0\n"
        f"assert main(['inspect', {str(model)!r}]) == 0\n"
        f"assert main(['verify', {str(model)!r}]) == 0\n"
        "import graphopt\n"
        f"graphopt.optimize({str(model)!r}, 'fold')\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_an_output_b_dequantizes_under_its_own_name_is_said_to_be_after_qdq():
    """B's graph output keeps A's name but is its DequantizeLinear's output: the row says after Q/DQ, not as is."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from graphopt.report.metrics import match_tensors

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    io = ([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    a = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "a", *io, [w]))
    scale, zero = numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(0), "z")
    b = helper.make_model(helper.make_graph([
        helper.make_node("MatMul", ["x", "w"], ["y_float"]),
        helper.make_node("QuantizeLinear", ["y_float", "s", "z"], ["y_q"]),
        helper.make_node("DequantizeLinear", ["y_q", "s", "z"], ["y"])], "b", *io, [w, scale, zero]))
    (match,), _ = match_tensors(a, b)
    assert match.tensor == match.other == "y" and match.quantized

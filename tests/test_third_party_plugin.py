"""A third-party plugin, installed for real: examples/graphopt-example-plugin is pip-installed into a temporary
folder (``--target``), which the ``graphopt`` subprocesses see on PYTHONPATH, and found through its entry point.
A second, deliberately broken plugin checks that one bad plugin cannot take graphopt down.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graphopt.plugins import AUTOLOAD_ENV, load_registry

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "graphopt-example-plugin"
BROKEN_REASON = "graphopt_broken_plugin needs libfrobnicate, which is not installed"


def pip_install(source: Path, target: Path) -> Path:
    """``pip install --target``, offline: no dependencies, the venv's setuptools as the build backend."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"pip install {source} failed:\n{proc.stdout}\n{proc.stderr}"
    return target


@pytest.fixture(scope="module")
def example_src(tmp_path_factory) -> Path:
    """A copy of the example package, so that building it leaves no build/ or egg-info in the source tree."""
    copy = tmp_path_factory.mktemp("src") / "graphopt-example-plugin"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__",
                                                                  ".pytest_cache"))
    return copy


@pytest.fixture(scope="module")
def example_site(example_src, tmp_path_factory) -> Path:
    return pip_install(example_src, tmp_path_factory.mktemp("example-site"))


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    """A plugin package whose module raises ImportError when graphopt imports it."""
    src = tmp_path_factory.mktemp("broken-src")
    (src / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "graphopt-broken-plugin"
        version = "0.1.0"

        [project.entry-points."graphopt.plugins"]
        broken = "graphopt_broken_plugin"

        [tool.setuptools]
        packages = ["graphopt_broken_plugin"]
        """))
    (src / "graphopt_broken_plugin").mkdir()
    (src / "graphopt_broken_plugin" / "__init__.py").write_text(f"raise ImportError({BROKEN_REASON!r})\n")
    return pip_install(src, tmp_path_factory.mktemp("broken-site"))


def graphopt(*args: str, site: Path, autoload: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m graphopt ARGS`` with ``site`` first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    env.pop(AUTOLOAD_ENV, None)
    if not autoload:
        env[AUTOLOAD_ENV] = "1"
    return subprocess.run([sys.executable, "-m", "graphopt", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def line_for(output: str, name: str) -> str | None:
    """The `graphopt passes` line that introduces pass or alias ``name``."""
    return next((line for line in output.splitlines() if re.match(rf"{re.escape(name)}\s", line + " ")), None)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory) -> Path:
    """y = Clip(Identity(x) * w, 0) + Clip(x, 0, +inf): both Clips are Relus; the Identity is for fold."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 3, 1, 1], [0.5, -2.0, 3.0])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    inf = helper.make_tensor("inf", TensorProto.FLOAT, [], [np.inf])
    nodes = [
        helper.make_node("Identity", ["x"], ["x_id"]),
        helper.make_node("Mul", ["x_id", "w"], ["scaled"]),
        helper.make_node("Constant", [], ["lo"], value=helper.make_tensor("lo_v", TensorProto.FLOAT, [], [0.0])),
        helper.make_node("Clip", ["scaled", "lo"], ["a"], name="clamp_min0"),
        helper.make_node("Clip", ["x", "zero", "inf"], ["b"], name="clamp_0_inf"),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "clips", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])], [w, zero, inf])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path_factory.mktemp("models") / "clips.onnx"
    onnx.save(model, path)
    return path


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def assert_clips_became_relus(original: Path, optimized: Path) -> None:
    ops = [node.op_type for node in onnx.load(optimized).graph.node]
    assert "Clip" not in ops and ops.count("Relu") == 2, ops
    x = np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run_ort(optimized, x), run_ort(original, x), rtol=1e-6)


# -- autoloaded ----------------------------------------------------------------------------------------------
def test_passes_lists_the_plugin_pass_and_alias_with_its_name(example_site):
    proc = graphopt("passes", site=example_site)
    assert proc.returncode == 0, proc.stderr
    for name in ("clip-to-relu", "example-clean"):
        line = line_for(proc.stdout, name)
        assert line is not None, f"{name} not listed:\n{proc.stdout}"
        assert re.search(r"plugin:?\s+example\b", line), line
    assert "option strict" in proc.stdout
    assert "example" not in proc.stderr  # the plugin loaded cleanly


def test_run_replaces_clip_with_relu(example_site, clip_model, tmp_path):
    out = tmp_path / "out.onnx"
    proc = graphopt("run", str(clip_model), "--passes", "fold,clip-to-relu", "-o", str(out), site=example_site)
    assert proc.returncode == 0, proc.stderr
    assert "replaced 2 Clip" in proc.stdout  # the pass's stats, in the run report
    assert_clips_became_relus(clip_model, out)


def test_alias_from_the_plugin(example_site, clip_model, tmp_path):
    out = tmp_path / "out.onnx"
    proc = graphopt("run", str(clip_model), "--passes", "example-clean", "-o", str(out), site=example_site)
    assert proc.returncode == 0, proc.stderr
    assert_clips_became_relus(clip_model, out)
    assert "Identity" not in [node.op_type for node in onnx.load(out).graph.node]  # fold ran too


def test_pass_options_reach_the_plugin(example_site, clip_model, tmp_path):
    out = tmp_path / "out.onnx"
    proc = graphopt("run", str(clip_model), "--passes", "clip-to-relu:strict=true", "-o", str(out), site=example_site)
    assert proc.returncode == 0, proc.stderr
    assert sorted(node.op_type for node in onnx.load(out).graph.node if node.op_type in ("Clip", "Relu")) == \
        ["Clip", "Relu"]  # strict: only Clip(x, 0, +inf) is rewritten
    proc = graphopt("run", str(clip_model), "--passes", "clip-to-relu:strict=maybe", "-o", str(out), site=example_site)
    assert proc.returncode != 0 and "strict" in one_error_line(proc)


# -- autoload off ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["env", "--no-plugins"])
def test_autoload_off_hides_the_plugin(example_site, clip_model, tmp_path, how):
    flags = ["--no-plugins"] if how == "--no-plugins" else []
    listing = graphopt("passes", *flags, site=example_site, autoload=how != "env")
    assert listing.returncode == 0, listing.stderr
    assert line_for(listing.stdout, "fold") is not None  # graphopt's own plugins still load
    assert line_for(listing.stdout, "clip-to-relu") is None and line_for(listing.stdout, "example-clean") is None

    out = tmp_path / "out.onnx"
    proc = graphopt("run", str(clip_model), "--passes", "clip-to-relu", "-o", str(out), *flags,
                    site=example_site, autoload=how != "env")
    assert proc.returncode != 0
    error = one_error_line(proc)
    assert "unknown pass" in error and "clip-to-relu" in error, error
    assert not out.exists()


def test_p_loads_the_plugin_by_entry_point_name(example_site, clip_model, tmp_path):
    listing = graphopt("passes", "-p", "example", site=example_site, autoload=False)
    assert listing.returncode == 0, listing.stderr
    assert re.search(r"plugin:?\s+example\b", line_for(listing.stdout, "clip-to-relu") or "")

    out = tmp_path / "out.onnx"
    proc = graphopt("run", str(clip_model), "--passes", "fold,clip-to-relu", "-o", str(out), "-p", "example",
                    site=example_site, autoload=False)
    assert proc.returncode == 0, proc.stderr
    assert_clips_became_relus(clip_model, out)


# -- a plugin that fails to import -------------------------------------------------------------------------------
def test_broken_plugin_is_reported_and_the_rest_still_work(broken_site, clip_model, tmp_path):
    builtin = load_registry(autoload=False)
    assert builtin.passes and "fold" in builtin.pipelines
    proc = graphopt("passes", site=broken_site)
    assert proc.returncode == 0, proc.stderr
    for name in [*builtin.passes, *builtin.pipelines]:
        assert line_for(proc.stdout, name) is not None, f"built-in {name} not listed:\n{proc.stdout}"
    report = proc.stdout + proc.stderr
    assert "broken" in report and "libfrobnicate" in report, report  # named, with its reason
    assert "Traceback" not in report

    out = tmp_path / "out.onnx"
    proc = graphopt("run", str(clip_model), "--passes", "fold", "-o", str(out), site=broken_site)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()


# -- the example's own tests ------------------------------------------------------------------------------------
def test_example_package_tests_pass_against_the_installed_package(example_site, example_src):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(example_site), *filter(None, [env.get("PYTHONPATH")])])
    env.pop(AUTOLOAD_ENV, None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=example_src, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

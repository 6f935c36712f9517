"""A plugin's mistakes, as a pass author makes them: each is refused by name, or caught when the pass runs, and the
built-ins keep working. graphopt checks what a plugin pass claims (changed nothing, left its input alone, kept the
model's interface) instead of taking its word for it."""

from __future__ import annotations

import os
import types
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt import Equivalence, Pass, PassResult, hookimpl
from graphopt.backends.onnxruntime import OnnxRuntimeBackend
from graphopt.driver import Driver, RunConfig
from graphopt.errors import (
    GraphoptError,
    InstrumentError,
    NumericMismatchError,
    OutputError,
    PassError,
    PipelineError,
    PluginError,
    UsageError,
)
from graphopt.passes.options import describe_options, parse_options
from graphopt.plugins import load_registry


def _plugin(name: str, **hooks):
    module = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(module, hook, hookimpl(fn))
    return module


def _adds(name: str, hook: str, method: str, *args):
    """A plugin whose ``hook`` calls ``registry.<method>(*args)``."""
    return _plugin(name, **{f"graphopt_register_{hook}": lambda registry: getattr(registry, method)(*args)})


def _passes(*classes, name="qa_plugin"):
    return _plugin(name, graphopt_register_passes=lambda registry: [registry.add_pass(c) for c in classes])


def _registry(*modules):
    registry = load_registry(autoload=False, modules=list(modules))
    assert "fold-bn" in registry.passes and "fold" in registry.pipelines  # the built-ins keep working
    return registry


@pytest.fixture
def model(tmp_path):
    """x (1x4) -> MatMul -> Relu -> y."""
    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"], name="relu")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [onnx.numpy_helper.from_array(w, "w")])
    path = str(tmp_path / "model.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


class _Onnx(Pass):
    irs = frozenset({"onnx"})


# -- loading ------------------------------------------------------------------------------------------------------
def test_a_plugin_pass_named_like_a_builtin_alias_is_refused_and_the_aliases_stay():
    class Fold(_Onnx):
        """A no-op named like graphopt's fold alias."""
        name = "fold"

        def run_onnx(self, graph, ctx):
            return PassResult(graph, False)

    plugin = _passes(Fold, name="qa_dup_alias")
    registry = _registry(plugin)
    assert "registers 'fold', already registered by plugin 'pipelines'" in registry.failed["qa_dup_alias"]
    assert {"prune", "int8", "fp16"} <= set(registry.pipelines) and "fold" not in registry.passes


def test_a_misspelt_hook_fails_its_plugin_only():
    plugin = _plugin("qa_typo_hook", graphopt_register_pases=lambda registry: None)
    registry = _registry(plugin)
    assert "unknown hook 'graphopt_register_pases'" in registry.failed["qa_typo_hook"]


def test_a_hook_with_an_extra_argument_says_which():
    def graphopt_register_passes(registry, extra_arg):
        pass

    registry = _registry(_plugin("qa_wrong_hook", graphopt_register_passes=graphopt_register_passes))
    assert "extra_arg" in registry.failed["qa_wrong_hook"]


def test_an_options_annotation_that_does_not_resolve_fails_at_load():
    class Typo(_Onnx):
        """``flaot``: resolved only when someone reads the hints."""
        name = "qa-typo"

        @dataclass(frozen=True)
        class Options:
            ratio: "flaot" = 0.5  # noqa: F821

        def run_onnx(self, graph, ctx):
            return PassResult(graph, False)

    registry = _registry(_passes(Typo, name="qa_typo"))
    assert "does not resolve (NameError" in registry.failed["qa_typo"] and "qa-typo" not in registry.passes


def test_a_plugin_that_fails_halfway_leaves_nothing_registered():
    class First(_Onnx):
        """Registered, then the plugin fails."""
        name = "qa-first"

        def run_onnx(self, graph, ctx):
            return PassResult(graph, False)

    def register(registry):
        registry.add_pass(First)
        registry.add_pass(First)  # a second time: refused

    registry = _registry(_plugin("qa_half", graphopt_register_passes=register))
    assert "qa_half" in registry.failed and "qa-first" not in registry.passes and "qa-first" not in registry.origin


def test_backends_importance_and_instruments_are_not_replaced_and_must_be_what_they_say():
    registry = _registry(_adds("qa_over_backend", "backends", "add_backend", "onnxruntime", OnnxRuntimeBackend()),
                         _adds("qa_not_backend", "backends", "add_backend", "mine", "str"),
                         _adds("qa_over_l1", "importance", "add_importance", "l1", len),
                         _adds("qa_bad_handler", "channel_handlers", "add_channel_handler", "onnx", "X", None))
    assert "backend 'onnxruntime', already registered by plugin 'backends'" in registry.failed["qa_over_backend"]
    assert "backend 'mine' as a str, which is not one" in registry.failed["qa_not_backend"]
    assert "importance criterion 'l1', already registered" in registry.failed["qa_over_l1"]
    assert "not callable" in registry.failed["qa_bad_handler"]
    assert isinstance(registry.backends["onnxruntime"], OnnxRuntimeBackend) and "mine" not in registry.backends


def test_malformed_pass_classes_and_aliases_are_refused_with_what_to_fix():
    class EqTypo(_Onnx):
        """``equivalence`` misspelt: it would have been treated as approximate."""
        name = "qa-eq"
        equivalence = "exat"

        def run_onnx(self, graph, ctx):
            return PassResult(graph, False)

    class IrsList(Pass):
        """``irs`` as a list."""
        name = "qa-irs"
        irs = ["onnx"]

        def run_onnx(self, graph, ctx):
            return PassResult(graph, False)

    registry = _registry(_passes(EqTypo, name="qa_eq"), _passes(IrsList, name="qa_irs"),
                         _adds("qa_alias_name", "pipelines", "add_pipeline", "Bad!", "fold"),
                         _adds("qa_alias_text", "pipelines", "add_pipeline", "ok", "fold,,x{"))
    assert "equivalence must be one of Equivalence.EXACT" in registry.failed["qa_eq"]
    assert "irs must be a non-empty frozenset" in registry.failed["qa_irs"]
    assert "pipeline named 'Bad!'" in registry.failed["qa_alias_name"]
    assert "does not parse" in registry.failed["qa_alias_text"]


# -- running: claims checked ----------------------------------------------------------------------------------------
class ReluToSigmoid(_Onnx):
    """Relu -> Sigmoid while claiming to have changed nothing (``modified=False``), as an exact pass."""
    name = "qa-lie"

    def run_onnx(self, graph, ctx):
        for node in graph.gs.nodes:
            if node.op == "Relu":
                node.op = "Sigmoid"
        return PassResult(graph, False)


class FunctionalLiar(_Onnx):
    """Says it is functional (builds a new graph) but edits its input too."""
    name = "qa-functional-liar"
    changes_input = False
    equivalence = Equivalence.APPROXIMATE

    def run_onnx(self, graph, ctx):
        out = graph.copy()
        for node in graph.gs.nodes:
            node.op = "Sigmoid" if node.op == "Relu" else node.op
        return PassResult(out, True)


def test_a_pass_that_says_it_changed_nothing_but_did_is_checked_as_changed(model):
    registry = _registry(_passes(ReluToSigmoid))
    with pytest.raises(NumericMismatchError, match="qa-lie"):
        graphopt.optimize(model, "qa-lie", registry=registry)
    result = graphopt.optimize(model, "qa-lie", registry=registry, check=False)
    assert result.report.records[0].modified
    assert any("reported no change but changed the model" in w for w in result.report.warnings)


def test_a_functional_pass_that_edits_its_input_fails(model):
    with pytest.raises(PassError, match="declares changes_input=False .* but edited the graph it was given"):
        graphopt.optimize(graphopt.load_model(model), "qa-functional-liar", registry=_registry(_passes(FunctionalLiar)))


def test_an_exact_pass_must_keep_the_interface(model, tmp_path):
    class InputToHalf(_Onnx):
        """Makes the graph input float16 (with a Cast), which changes what callers feed."""
        name = "qa-half-input"

        def run_onnx(self, graph, ctx):
            x = graph.gs.inputs[0]
            x32 = gs.Variable("x32", dtype=np.float32, shape=x.shape)
            for node in list(x.outputs):
                node.inputs[node.inputs.index(x)] = x32
            graph.gs.nodes.append(gs.Node("Cast", inputs=[x], outputs=[x32], attrs={"to": TensorProto.FLOAT}))
            x.dtype = np.float16
            return PassResult(graph, True)

    class RenameOutput(_Onnx):
        """Renames the output."""
        name = "qa-rename-output"

        def run_onnx(self, graph, ctx):
            graph.gs.outputs[0].name = "renamed"
            return PassResult(graph, True)

    registry = _registry(_passes(InputToHalf, RenameOutput))
    with pytest.raises(PassError, match="changed the model's interface: input 'x' was float32, now float16"):
        graphopt.optimize(model, "qa-half-input", registry=registry)
    out = str(tmp_path / "out.onnx")
    with pytest.raises(PassError, match="its outputs were y, now renamed"):
        graphopt.optimize(model, "qa-rename-output", registry=registry, output=out)
    assert not os.path.exists(out)


@pytest.mark.parametrize("returned, what", [(None, "NoneType"), ("proto", "ModelProto")])
def test_a_result_holding_no_graph_is_a_failed_pass(model, returned, what):
    class WrongGraph(_Onnx):
        """PassResult(None) / PassResult(ModelProto)."""
        name = "qa-wrong-graph"

        def run_onnx(self, graph, ctx):
            return PassResult(graph.to_model() if returned == "proto" else None, True)

    with pytest.raises(PassError, match=f"returned a PassResult holding {what}, not a graph"):
        graphopt.optimize(model, "qa-wrong-graph", registry=_registry(_passes(WrongGraph)))


def test_sys_exit_and_graphopt_errors_from_a_plugin_name_the_pass(model):
    class Exits(_Onnx):
        """Calls sys.exit(0): a build pipeline must not read that as success."""
        name = "qa-exit"

        def run_onnx(self, graph, ctx):
            raise SystemExit(0)

    class Refuses(_Onnx):
        """Raises graphopt's own errors without naming itself."""
        name = "qa-refuses"

        @dataclass(frozen=True)
        class Options:
            bare: bool = False

        def run_onnx(self, graph, ctx):
            raise (GraphoptError if self.options.bare else UsageError)("the plugin says no\nsecond line")

    registry = _registry(_passes(Exits, Refuses))
    with pytest.raises(PassError, match=r"pass 'qa-exit': called sys.exit\(0\)"):
        graphopt.optimize(model, "qa-exit", registry=registry)
    with pytest.raises(UsageError, match="^pass 'qa-refuses': the plugin says no$"):
        graphopt.optimize(model, "qa-refuses", registry=registry)
    with pytest.raises(PassError, match="^pass 'qa-refuses': the plugin says no$"):
        graphopt.optimize(model, "qa-refuses:bare=true", registry=registry)


# -- files a pass writes --------------------------------------------------------------------------------------------
class Writes(_Onnx):
    """Writes ``path`` after the run (undeclared in ``files()``); ``fail`` makes its writer raise."""
    name = "qa-writes"
    equivalence = Equivalence.APPROXIMATE

    @dataclass(frozen=True)
    class Options:
        path: str = "side.txt"
        fail: bool = False

    def run_onnx(self, graph, ctx):
        def write(target):
            if self.options.fail:
                raise OSError(28, "No space left on device")
            with open(target, "w") as f:
                f.write("side")

        ctx.write_after(self.options.path, write)
        return PassResult(graph, False)


def test_write_after_never_writes_a_file_the_run_reads(model, tmp_path):
    before = open(model, "rb").read()
    with pytest.raises(UsageError, match="pass 'qa-writes' writes .*is the input model"):
        graphopt.optimize(model, f"qa-writes:path={model}", registry=_registry(_passes(Writes)),
                          output=str(tmp_path / "out.onnx"))
    assert open(model, "rb").read() == before and not (tmp_path / "out.onnx").exists()


def test_a_failed_deferred_write_leaves_the_old_output_in_place(model, tmp_path):
    out, side = tmp_path / "out.onnx", tmp_path / "side.txt"
    out.write_text("OLD")
    with pytest.raises(OutputError, match="side.txt \\(pass 'qa-writes'\\): cannot write it \\(No space left"):
        graphopt.optimize(model, f"qa-writes:path={side}:fail=true", registry=_registry(_passes(Writes)),
                          output=str(out))
    assert out.read_text() == "OLD" and not side.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".graphopt")] == []
    graphopt.optimize(model, f"qa-writes:path={side}", registry=_registry(_passes(Writes)), output=str(out))
    assert side.read_text() == "side" and out.read_bytes() != b"OLD"


# -- instruments, options, aliases ----------------------------------------------------------------------------------
class Broken:
    """An instrument that fails after each pass."""

    def before_pass(self, pass_, graph, ctx):
        pass

    def after_pass(self, pass_, result, record, ctx):
        raise RuntimeError("instrument boom")


class NeedsArgument(Broken):
    def __init__(self, level):
        self.level = level


def test_instruments_that_fail_are_named(model):
    registry = _registry(_plugin("qa_instruments", graphopt_register_instruments=lambda registry: (
        registry.add_instrument("qa-broken", Broken), registry.add_instrument("qa-needs-arg", NeedsArgument))))
    with pytest.raises(InstrumentError, match="instrument 'Broken': after_pass raised RuntimeError: instrument boom"):
        graphopt.optimize(model, "fold", registry=registry, instruments=("qa-broken",))
    with pytest.raises(PluginError, match="instrument 'qa-needs-arg' \\(plugin 'qa_instruments'\\) could not be made"):
        graphopt.optimize(model, "fold", registry=registry, instruments=("qa-needs-arg",))


def test_options_parse_as_their_types_say():
    @dataclass(frozen=True)
    class Options:
        level: int
        num: int | float = 1
        pair: tuple[int, int] = (1, 2)
        maybe: int | None = None

        def __post_init__(self):
            assert self.maybe is None or self.maybe >= 0, "maybe must be >= 0"

    assert parse_options("p", Options, {"level": "1", "num": "1.5", "pair": "3+4"}) == Options(1, 1.5, (3, 4))
    assert parse_options("p", Options, {"level": "1", "num": "2"}).num == 2
    for items, message in (({"level": "1", "pair": "1+2+3"}, "expects 2 items joined by '\\+'"),
                           ({}, "option 'level' has no default: give it \\(p:level=...\\)"),
                           ({"level": "1", "maybe": "-1"}, "^pass 'p': maybe must be >= 0$"),
                           ({"level": "1", "num": "x"}, "expects int or float, got 'x'")):
        with pytest.raises(PipelineError, match=message):
            parse_options("p", Options, items)
    assert describe_options(Options)[0] == ("level", "int", "required")


def test_an_alias_routes_options_through_a_nested_alias(model):
    plugin = _adds("qa_nested", "pipelines", "add_pipeline", "qa-clean", "fold,compact")
    result = graphopt.optimize(model, "qa-clean:fold_into_gemm=false", registry=_registry(plugin))
    assert [p.name for p in result.report.records] == ["eliminate-identity", "fold-constants", "fold-bn",
                                                       "eliminate-dead", "compact"]
    assert "fold-bn:fold_into_gemm=false" in result.pipeline


def test_the_reproducer_names_the_plugin_of_the_failing_pass(model, tmp_path):
    class Raises(_Onnx):
        """Fails."""
        name = "qa-raises"

        def run_onnx(self, graph, ctx):
            raise ValueError("boom")

    driver = Driver(RunConfig("qa-raises", reproducer=str(tmp_path / "rep")),
                    registry=_registry(_passes(Raises, name="qa_raising")))
    with pytest.raises(PassError, match="qa-raises': ValueError: boom"):
        driver.run(model)
    assert "--passes qa-raises -p qa_raising --debug" in (tmp_path / "rep" / "reproduce.txt").read_text()

"""The plugin manager: built-ins come through the entry-point group, broken plugins are named, not fatal."""

from __future__ import annotations

import types
from dataclasses import dataclass

from graphopt import Pass, PassResult, hookimpl
from graphopt.plugins import load_registry


def test_builtins_are_entry_points_of_graphopt():
    import importlib.metadata

    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="graphopt.plugins")
           if ep.dist.metadata["Name"] == "graphopt"}
    assert eps["fold_bn"] == "graphopt_plugins.fold_bn"
    registry = load_registry(autoload=False)
    assert {"eliminate-identity", "fold-constants", "fold-bn", "eliminate-dead"} <= set(registry.passes)
    assert registry.origin["fold-bn"] == "fold_bn" and registry.pipelines["fold"].plugin == "pipelines"


def _plugin(**hooks):
    module = types.ModuleType("fake_plugin_" + "_".join(hooks))
    for name, fn in hooks.items():
        setattr(module, name, hookimpl(fn))
    return module


def test_a_plugin_whose_hook_raises_is_reported_and_the_rest_work():
    def graphopt_register_passes(registry):
        raise RuntimeError("half-installed dependency")

    bad = _plugin(graphopt_register_passes=graphopt_register_passes)
    registry = load_registry(autoload=False, modules=[bad])
    assert "RuntimeError: half-installed dependency" in registry.failed[bad.__name__]
    assert "fold-bn" in registry.passes


def test_a_module_that_cannot_be_imported_is_reported_by_name():
    registry = load_registry(autoload=False, extra=["graphopt_no_such_plugin"])
    assert "ModuleNotFoundError" in registry.failed["graphopt_no_such_plugin"]
    assert "fold" in registry.pipelines


def _failure(module) -> str:
    registry = load_registry(autoload=False, modules=[module])
    assert "fold-bn" in registry.passes and "fold" in registry.pipelines  # the built-ins keep working
    return registry.failed[module.__name__]


def test_duplicate_names_and_malformed_passes_are_refused_by_plugin_name():
    class Clash(Pass):
        """Same name as a built-in."""
        name = "fold-bn"
        irs = frozenset({"onnx"})

        def run_onnx(self, graph, ctx):
            return PassResult(graph, False)

    clash = _plugin(graphopt_register_passes=lambda registry: registry.add_pass(Clash))
    assert "registers 'fold-bn', already registered by plugin 'fold_bn'" in _failure(clash)

    class NoRun(Pass):
        """Declares fx but implements nothing."""
        name = "no-run"
        irs = frozenset({"fx"})

    assert "no run_fx" in _failure(_plugin(graphopt_register_passes=lambda registry: registry.add_pass(NoRun)))

    class MutableOptions(Pass):
        """Options not frozen."""
        name = "mutable-options"
        irs = frozenset({"onnx"})

        @dataclass
        class Options:
            x: int = 1

        def run_onnx(self, graph, ctx):
            return PassResult(graph, False)

    bad = _plugin(graphopt_register_passes=lambda registry: registry.add_pass(MutableOptions))
    assert "frozen dataclass" in _failure(bad)


def test_autoload_env_var(monkeypatch):
    from graphopt import plugins

    monkeypatch.setenv(plugins.AUTOLOAD_ENV, "1")
    assert plugins.autoload_disabled()
    monkeypatch.setenv(plugins.AUTOLOAD_ENV, "0")
    assert not plugins.autoload_disabled()

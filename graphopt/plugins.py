"""The plugin manager: pluggy + the ``graphopt.plugins`` entry-point group.

Built-in passes (``plugins/`` in the source tree, importable as ``graphopt_plugins``) are declared in graphopt's
own ``pyproject.toml`` under that group, so they are found exactly as a third-party plugin is. A plugin that
fails to import is recorded by name in :attr:`Registry.failed` and the rest still load. Autoloading of
*third-party* plugins is turned off by ``GRAPHOPT_DISABLE_PLUGIN_AUTOLOAD=1`` or ``--no-plugins`` (graphopt's own
entry points still load, as pytest does with its built-ins); ``-p NAME`` loads one named plugin anyway.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import pluggy

from graphopt import hookspecs
from graphopt.errors import GraphoptError, PluginError

ENTRY_POINT_GROUP = "graphopt.plugins"
AUTOLOAD_ENV = "GRAPHOPT_DISABLE_PLUGIN_AUTOLOAD"
OWN_DISTRIBUTION = "graphopt"
HOOKS = (
    "graphopt_register_passes",
    "graphopt_register_pipelines",
    "graphopt_register_instruments",
    "graphopt_register_backends",
    "graphopt_register_channel_handlers",
    "graphopt_register_importance",
)
_TABLES = ("passes", "pipelines", "instruments", "backends", "channel_handlers", "importance", "origin")


@dataclass
class PipelineAlias:
    name: str
    text: str
    doc: str
    plugin: str | None = None


@dataclass
class Registry:
    """What the loaded plugins provide. Hooks receive it and call its ``add_*`` methods."""

    passes: dict[str, type] = field(default_factory=dict)
    pipelines: dict[str, PipelineAlias] = field(default_factory=dict)
    instruments: dict[str, type] = field(default_factory=dict)
    backends: dict[str, Any] = field(default_factory=dict)
    channel_handlers: dict[tuple[str, str], Any] = field(default_factory=dict)
    importance: dict[str, Any] = field(default_factory=dict)
    origin: dict[Any, str] = field(default_factory=dict)  # pass/alias name (or (kind, name)) -> plugin
    failed: dict[str, str] = field(default_factory=dict)  # plugin name -> one-line reason
    autoloaded: bool = True  # third-party plugins were autoloaded (not under --no-plugins)
    _current_plugin: str | None = None

    # -- the add_* API plugins use ------------------------------------------------------------------------
    def add_pass(self, cls: type) -> None:
        from graphopt.passes.base import Pass

        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise PluginError(f"plugin '{self._current_plugin}' registered {cls!r}, which is not a Pass subclass")
        cls.validate_class()
        self._claim(cls.name)
        self.passes[cls.name] = cls

    def add_pipeline(self, name: str, text: str, doc: str = "") -> None:
        from graphopt.passes.base import valid_pass_name
        from graphopt.passes.pipeline import parse_pipeline

        if not isinstance(name, str) or not valid_pass_name(name):
            raise PluginError(f"plugin '{self._current_plugin}' registers a pipeline named {name!r}: a name is "
                              f"letters, digits and '-'")
        try:
            parse_pipeline(text)
        except GraphoptError as exc:
            raise PluginError(f"plugin '{self._current_plugin}' registers pipeline '{name}' as {text!r}, which does "
                              f"not parse ({exc})") from None
        self._claim(name)
        self.pipelines[name] = PipelineAlias(name, text, doc, self._current_plugin)

    def add_instrument(self, name: str, cls: type) -> None:
        self._claim_other("instrument", self.instruments, name, cls, isinstance(cls, type) or callable(cls))
        self.instruments[name] = cls

    def add_backend(self, name: str, backend: Any) -> None:
        from graphopt.backends.base import Backend

        self._claim_other("backend", self.backends, name, backend, isinstance(backend, Backend))
        self.backends[name] = backend

    def add_channel_handler(self, ir: str, op_type: str, handler: Any) -> None:
        """A handler for ``op_type`` on ``ir``; a later plugin's handler for the same op replaces the earlier one
        (how a plugin fixes or refines a built-in handler)."""
        if not callable(handler):
            raise PluginError(f"plugin '{self._current_plugin}' registers a channel handler for {ir} {op_type} that "
                              f"is not callable ({type(handler).__name__})")
        self.channel_handlers[(ir, op_type)] = handler

    def add_importance(self, name: str, fn: Any) -> None:
        self._claim_other("importance criterion", self.importance, name, fn, callable(fn))
        self.importance[name] = fn

    # -- lookups ------------------------------------------------------------------------------------------
    def _claim(self, name: str) -> None:
        if name in self.passes or name in self.pipelines:
            raise PluginError(
                f"plugin '{self._current_plugin}' registers '{name}', already registered by "
                f"plugin '{self.origin.get(name)}'"
            )
        self.origin[name] = self._current_plugin or "<api>"

    def _claim_other(self, kind: str, registered: dict, name: str, obj: Any, valid: bool) -> None:
        """Backends, instruments, importance criteria: one plugin per name (a second one is refused, so that a
        plugin cannot silently replace a built-in), and an object of the right kind."""
        if not valid:
            raise PluginError(f"plugin '{self._current_plugin}' registers {kind} '{name}' as a "
                              f"{type(obj).__name__}, which is not one")
        if name in registered:
            raise PluginError(f"plugin '{self._current_plugin}' registers {kind} '{name}', already registered by "
                              f"plugin '{self.origin.get((kind, name))}'")
        self.origin[(kind, name)] = self._current_plugin or "<api>"

    def pass_class(self, name: str) -> type:
        from graphopt.errors import PipelineError

        if name not in self.passes:
            known = ", ".join(sorted([*self.passes, *self.pipelines])) or "none"
            failed = f"; plugins that failed to load: {', '.join(sorted(self.failed))}" if self.failed else ""
            off = "" if self.autoloaded else "; third-party plugins are not autoloaded here (--no-plugins or " \
                                             f"{AUTOLOAD_ENV}): -p NAME loads one"
            raise PipelineError(f"unknown pass '{name}' (known: {known}{failed}{off}; `graphopt passes` lists them)")
        return self.passes[name]


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _is_own(ep: importlib.metadata.EntryPoint) -> bool:
    dist = getattr(ep, "dist", None)
    return dist is not None and _dist_name(dist) == OWN_DISTRIBUTION


def _dist_name(dist) -> str:
    """A distribution's name, read from its metadata once per process (reading it is most of a small run's time)."""
    key = getattr(dist, "_path", None) or id(dist)
    if key not in _DIST_NAMES:
        _DIST_NAMES[key] = dist.metadata["Name"]
    return _DIST_NAMES[key]


_DIST_NAMES: dict = {}


def autoload_disabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


class PluginManager:
    """Loads plugins and collects what their hooks register into one :class:`Registry`."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()

    def load(
        self, *, autoload: bool | None = None, extra: Iterable[str] = (), modules: Iterable[Any] = ()
    ) -> Registry:
        """Load graphopt's own entry points, third-party ones unless autoload is off, the entry points or
        modules named in ``extra`` (like ``-p NAME``), and plugin objects in ``modules``; then call the hooks."""
        if autoload is None:
            autoload = not autoload_disabled()
        self.registry.autoloaded = autoload
        wanted = set(extra)
        eps = _entry_points()
        own = set()
        for ep in [e for e in eps if _is_own(e)] + [e for e in eps if not _is_own(e)]:
            if _is_own(ep) or autoload or ep.name in wanted:
                wanted.discard(ep.name)
                self._register(ep.name, ep.load)
                if _is_own(ep):
                    own.add(ep.name)
        for name in sorted(wanted):  # not an entry point: treat as an importable module name
            self._register(name, lambda name=name: importlib.import_module(name))
        for module in modules:
            self._register(getattr(module, "__name__", repr(module)), lambda m=module: m)
        impls: dict[str, list] = {}
        for hook in HOOKS:
            for impl in getattr(self.pm.hook, hook).get_hookimpls():  # in registration order
                impls.setdefault(impl.plugin_name, []).append((hook, impl))
        # graphopt's own plugins first, every hook of theirs: a third-party plugin reusing a built-in name (a pass
        # named like an alias included) is the one refused, and the built-ins keep working
        for name in [n for n in impls if n in own] + [n for n in impls if n not in own]:
            self._call(name, impls[name])
        return self.registry

    def _call(self, plugin: str, impls: list) -> None:
        """Call one plugin's hooks; if one fails, the plugin is reported by name and nothing it added stays."""
        reg = self.registry
        saved = {f: dict(getattr(reg, f)) for f in _TABLES}
        reg._current_plugin = plugin
        try:
            for hook, impl in impls:
                try:
                    impl.function(registry=reg)
                except PluginError as exc:
                    raise _Failed(str(exc)) from None
                except Exception as exc:  # a broken plugin is reported by name; the rest keep working
                    raise _Failed(f"{hook} raised {type(exc).__name__}: {exc}") from None
        except _Failed as failed:
            for f, table in saved.items():
                setattr(reg, f, table)
            reg.failed[plugin] = str(failed).splitlines()[0]
        finally:
            reg._current_plugin = None

    def _register(self, name: str, load) -> None:
        if self.pm.has_plugin(name):
            return
        try:
            plugin = load()
            if self.pm.is_registered(plugin):  # e.g. `-p module` naming an entry point's module
                return
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:  # a hook whose arguments are not the spec's
            self.registry.failed[name] = _one_line(exc)
            return
        except Exception as exc:
            self.registry.failed[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            return
        try:
            self.pm.check_pending()  # a hook name graphopt has no spec for (a typo) is this plugin's failure
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name)
            self.registry.failed[name] = _one_line(exc)


class _Failed(Exception):
    """A plugin's hook failed (the message says how)."""


def _one_line(exc: Exception) -> str:
    """pluggy's validation message in one line (its second and third lines say what is wrong)."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def load_registry(*, autoload: bool | None = None, extra: Iterable[str] = (), modules: Iterable[Any] = ()) -> Registry:
    """A fresh registry with every plugin loaded (see :meth:`PluginManager.load`)."""
    return PluginManager().load(autoload=autoload, extra=extra, modules=modules)


_default: Registry | None = None


def default_registry() -> Registry:
    """Every plugin autoloaded once per process (``GRAPHOPT_DISABLE_PLUGIN_AUTOLOAD`` is honoured)."""
    global _default
    if _default is None:
        _default = load_registry()
    return _default

"""Every pluggy hook graphopt calls, in one module.

A plugin is a module (or object) with functions marked ``@hookimpl`` whose names match these specs. Hooks are
called with keyword arguments and receive the :class:`graphopt.plugins.Registry`; a plugin adds what it
provides to it. Built-in passes in ``plugins/`` use exactly these hooks, and are found through the same
``graphopt.plugins`` entry-point group as third-party packages.

Example::

    from graphopt import hookimpl

    @hookimpl
    def graphopt_register_passes(registry):
        registry.add_pass(MyPass)
"""

from __future__ import annotations

import pluggy

PROJECT = "graphopt"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def graphopt_register_passes(registry) -> None:
    """Add :class:`graphopt.passes.Pass` subclasses with ``registry.add_pass(cls)``."""


@hookspec
def graphopt_register_pipelines(registry) -> None:
    """Add named pipelines (short aliases) with ``registry.add_pipeline(name, text, doc)``.

    ``text`` is a textual pipeline, e.g. ``"eliminate-identity,fold-constants,fold-bn,eliminate-dead"``.
    """


@hookspec
def graphopt_register_instruments(registry) -> None:
    """Add instrument classes (``before_pass``/``after_pass``/``after_pass_failed``) by name, with
    ``registry.add_instrument(name, cls)``; users switch them on with ``--instrument NAME``."""


@hookspec
def graphopt_register_backends(registry) -> None:
    """Add backends (onnxruntime, fbgemm, TensorRT, ...) with ``registry.add_backend(name, obj)``.

    A backend states its own quantization scheme and capabilities; passes read them from the context.
    """


@hookspec
def graphopt_register_channel_handlers(registry) -> None:
    """Teach structured pruning a new op: ``registry.add_channel_handler(ir, op_type, handler)``."""


@hookspec
def graphopt_register_importance(registry) -> None:
    """Add a pruning importance criterion: ``registry.add_importance(name, fn)``."""

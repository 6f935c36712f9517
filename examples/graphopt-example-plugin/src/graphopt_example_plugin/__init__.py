"""An example graphopt plugin.

graphopt imports this module through the ``graphopt.plugins`` entry point declared in ``pyproject.toml`` and
calls the ``@hookimpl`` functions below, whose names match the specs in :mod:`graphopt.hookspecs`. Each hook
receives the registry and adds what the plugin provides to it.
"""

from graphopt import hookimpl
from graphopt_example_plugin.clip_to_relu import ClipToRelu

__all__ = ["ClipToRelu"]


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(ClipToRelu)


@hookimpl
def graphopt_register_pipelines(registry):
    # An alias may name passes from any plugin; "fold" is graphopt's built-in cleanup alias.
    registry.add_pipeline("example-clean", "fold,clip-to-relu", "graphopt's fold, then clip-to-relu")

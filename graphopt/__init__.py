"""graphopt: a plugin-based, compiler-style graph optimizer for neural networks (ONNX and PyTorch).

The names below are imported when first used (PEP 562), so that ``import graphopt.cli`` — the command line's
entry point — is quick and a Ctrl-C while onnx and numpy load is the CLI's one-line "interrupted", not a
traceback.
"""

import importlib
import logging

__version__ = "0.1.0"

# a library logs, the application decides where it goes: `graphopt run` prints warnings itself, once
logging.getLogger("graphopt").addHandler(logging.NullHandler())

_HOMES = {
    "FineTune": "graphopt.api", "OptimizeResult": "graphopt.api", "default_registry": "graphopt.api",
    "optimize": "graphopt.api", "GraphoptError": "graphopt.errors", "hookimpl": "graphopt.hookspecs",
    "Graph": "graphopt.ir", "OnnxGraph": "graphopt.ir", "OpKind": "graphopt.ir", "load_model": "graphopt.ir",
    "Equivalence": "graphopt.passes.base", "NoOptions": "graphopt.passes.base", "Pass": "graphopt.passes.base",
    "PassContext": "graphopt.passes.base", "PassResult": "graphopt.passes.base",
    "PassManager": "graphopt.passes.manager",
}


def __getattr__(name: str):
    if name == "train":  # a module: torch is imported when a loop runs, not here
        return importlib.import_module("graphopt.train")
    if name not in _HOMES:
        raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES, "train"])


__all__ = sorted([*_HOMES, "train"])

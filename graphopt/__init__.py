"""graphopt: a plugin-based, compiler-style graph optimizer for neural networks (ONNX and PyTorch)."""

import logging

from graphopt import train  # torch is imported when a loop runs, not here
from graphopt.api import FineTune, OptimizeResult, default_registry, optimize
from graphopt.errors import GraphoptError
from graphopt.hookspecs import hookimpl
from graphopt.ir import Graph, OnnxGraph, OpKind, load_model
from graphopt.passes.base import Equivalence, NoOptions, Pass, PassContext, PassResult
from graphopt.passes.manager import PassManager

__version__ = "0.1.0"

# a library logs, the application decides where it goes: `graphopt run` prints warnings itself, once
logging.getLogger("graphopt").addHandler(logging.NullHandler())

__all__ = [
    "Equivalence", "FineTune", "Graph", "GraphoptError", "NoOptions", "OnnxGraph", "OpKind", "OptimizeResult", "Pass",
    "PassContext", "PassManager", "PassResult", "default_registry", "hookimpl", "load_model", "optimize", "train",
]

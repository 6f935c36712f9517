"""Pass contract, pipelines, the pass manager and instruments."""

from graphopt.passes.base import Equivalence, NoOptions, Pass, PassContext, PassResult
from graphopt.passes.manager import PassManager, bisect
from graphopt.passes.pipeline import parse_pipeline, resolve

__all__ = ["Equivalence", "NoOptions", "Pass", "PassContext", "PassManager", "PassResult", "bisect",
           "parse_pipeline", "resolve"]

"""The backends graphopt ships: onnxruntime's CPU execution provider (``graphopt bench --backend onnxruntime``;
its int8 scheme is what ``place-qdq`` places for it)."""

from __future__ import annotations

from graphopt import hookimpl
from graphopt.backends.onnxruntime import OnnxRuntimeBackend


@hookimpl
def graphopt_register_backends(registry):
    registry.add_backend("onnxruntime", OnnxRuntimeBackend())

"""Backends: the runtimes graphopt targets. Each states its own int8 scheme as data (:class:`QuantScheme`,
read by ``place-qdq``) and runs, times and evaluates models (:class:`Backend`). Backends are registered by
plugins through ``graphopt_register_backends``; the onnxruntime CPU backend ships in ``plugins/backends.py``."""

from graphopt.backends.base import Accuracy, Backend, BackendError, BenchResult, InputSpec, LatencyStats
from graphopt.backends.onnxruntime import OnnxRuntimeBackend
from graphopt.backends.scheme import QuantRequest, QuantScheme, TensorQuant, UnsupportedRequestError
from graphopt.errors import UsageError


def get_backend(registry, name: str) -> Backend:
    """The backend ``name`` from a plugin registry, or a usage error naming the known ones."""
    if name not in registry.backends:
        known = ", ".join(sorted(registry.backends)) or "none"
        failed = f"; plugins that failed to load: {', '.join(sorted(registry.failed))}" if registry.failed else ""
        raise UsageError(f"unknown backend '{name}' (known: {known}{failed})")
    return registry.backends[name]


__all__ = [
    "Accuracy", "Backend", "BackendError", "BenchResult", "InputSpec", "LatencyStats", "OnnxRuntimeBackend",
    "QuantRequest", "QuantScheme", "TensorQuant", "UnsupportedRequestError", "get_backend",
]

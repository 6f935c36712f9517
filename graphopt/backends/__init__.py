"""Backends: the runtimes graphopt targets. Each states its own int8 scheme as data (:class:`QuantScheme`,
read by ``place-qdq``) and runs, times and evaluates models (:class:`Backend`). Backends are registered by
plugins through ``graphopt_register_backends``; the onnxruntime CPU backend ships in ``plugins/backends.py``."""

import dataclasses
from typing import Mapping

from graphopt.backends.base import Accuracy, Backend, BackendError, BenchResult, InputSpec, LatencyStats
from graphopt.backends.onnxruntime import OnnxRuntimeBackend
from graphopt.backends.scheme import QuantRequest, QuantScheme, TensorQuant, UnsupportedRequestError
from graphopt.errors import UsageError


def get_backend(registry, spec: str, flags: Mapping[str, tuple[str, str]] | None = None) -> Backend:
    """The backend a ``--backend`` value names, or a usage error naming the known ones.

    ``spec`` is ``name`` or ``name:key=value:key2=value2`` for a backend that declares ``Options`` (parsed as a
    pass's options are). A value may itself hold ``:`` (``shapes=x:1x3x8x8``): a part without ``=`` continues
    the value before it. ``flags`` sets options from command-line flags, ``{option: (flag, text)}``: a flag the
    backend has no option for is a usage error naming the flag."""
    from graphopt.passes.options import parse_options

    name, *parts = spec.split(":")
    if name not in registry.backends:
        known = ", ".join(sorted(registry.backends)) or "none"
        failed = f"; plugins that failed to load: {', '.join(sorted(registry.failed))}" if registry.failed else ""
        raise UsageError(f"unknown backend '{name}' (known: {known}{failed})")
    backend = registry.backends[name]
    items: dict[str, str] = {}
    last = None
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq:
            if last is None:
                raise UsageError(f"--backend {spec}: '{part}' is not key=value (options: {name}:key=value)")
            items[last] += ":" + part
            continue
        if key in items:
            raise UsageError(f"--backend {spec}: option '{key}' given twice")
        items[key], last = value, key
    options_cls = backend.Options
    known = ", ".join(f.name for f in dataclasses.fields(options_cls)) if options_cls else "none"
    for key, (flag, text) in (flags or {}).items():
        if options_cls is None or key not in {f.name for f in dataclasses.fields(options_cls)}:
            raise UsageError(f"{flag} is not an option of backend '{name}' (its options: {known})")
        if key in items:
            raise UsageError(f"{flag} and --backend {name}:{key}=... both given: give one")
        items[key] = text
    if not items:
        return backend
    if options_cls is None:
        raise UsageError(f"backend '{name}' has no options (got {', '.join(items)})")
    return backend.configured(parse_options(name, options_cls, items, kind="backend"))


__all__ = [
    "Accuracy", "Backend", "BackendError", "BenchResult", "InputSpec", "LatencyStats", "OnnxRuntimeBackend",
    "QuantRequest", "QuantScheme", "TensorQuant", "UnsupportedRequestError", "get_backend",
]

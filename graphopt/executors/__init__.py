"""Executors: where the trials of a sweep run — in this process, in local worker processes, or on Ray.

A sweep (sensitivity, a budgeted precision search, prune ratios) is a list of trials: ``fn(item)`` with ``fn`` a
module-level function and ``item`` a JSON value (a path, a list of node names, a number). Every executor has one
method, ``map(fn, items, kind)``, and returns the same results in the same order for the same trials, so the
choice a sweep makes does not depend on where it ran.

Trials are pure and content-addressed: a trial's key is the sha256 of the function's module and qualified name, the
item as canonical JSON, and graphopt's version; its result is stored as JSON under ``<run_dir>/trials/<key>.json``
(written atomically) as soon as it finishes. A sweep that is run again — after a crash, a Ctrl-C, on another
executor — runs only the trials that have no result yet (resume), and identical items in one call run once.

Two kinds of trial:

- ``"accuracy"`` trials run in parallel, one per worker;
- ``"latency"`` trials run alone: one at a time, never beside another trial of this executor, each measured once
  and shared through the trial cache, so every executor makes the same latency-based choice.

``get_executor(spec, run_dir)`` turns the ``--executor`` option into one: ``inprocess``, ``processes[:N]`` (the
default; one worker per core) or ``ray`` / ``ray://host:port`` / ``ray:auto`` (see :mod:`graphopt.executors.ray`).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Protocol

from graphopt.errors import UsageError
from graphopt.executors.base import KINDS, CachedExecutor, TrialCache, canonical, trial_key
from graphopt.executors.local import InProcess, LocalProcesses

DEFAULT_SPEC = "processes"
SPECS = "inprocess, processes[:N], ray, ray:auto, ray://host:port"


class Executor(Protocol):
    """What a sweep needs: ``map`` (the executors here are also context managers whose ``close`` stops workers)."""

    def map(self, fn: Callable[[Any], Any], items: list, kind: str = "accuracy") -> list: ...


def parse_executor(spec: str | None) -> tuple[str, Any]:
    """``(kind, argument)`` of ``--executor SPEC``, checked without starting anything (a UsageError said before any
    work): ``("inprocess", None)``, ``("processes", workers or None)``, ``("ray", None | "auto" | "ray://h:p")``."""
    spec = (spec or DEFAULT_SPEC).strip()
    if spec == "inprocess":
        return "inprocess", None
    if spec == "processes" or spec.startswith("processes:"):
        count = spec.partition(":")[2]
        if count and not (count.isascii() and count.isdigit() and int(count) > 0):
            raise UsageError(f"--executor {spec}: the worker count must be a positive integer (e.g. processes:4)")
        return "processes", int(count) if count else None
    if spec == "ray" or spec.startswith("ray:"):
        address = spec.partition(":")[2] or None
        if address is None or address == "auto":
            return "ray", address
        if not re.fullmatch(r"//[A-Za-z0-9._\[\]-]+(:[0-9]+)?", address):
            raise UsageError(f"--executor {spec}: expected ray, ray:auto or ray://host:port")
        return "ray", f"ray:{address}"
    raise UsageError(f"--executor {spec}: unknown executor (one of: {SPECS})")


def get_executor(spec: str | None, run_dir: str | None) -> Executor:
    """The executor ``--executor SPEC`` names, caching its trials under ``run_dir`` (None: no cache)."""
    kind, argument = parse_executor(spec)
    if kind == "inprocess":
        return InProcess(run_dir)
    if kind == "processes":
        return LocalProcesses(argument, run_dir)
    from graphopt.executors.ray import RayExecutor

    return RayExecutor(argument, run_dir)


__all__ = ["CachedExecutor", "DEFAULT_SPEC", "Executor", "InProcess", "KINDS", "LocalProcesses", "TrialCache",
           "canonical", "get_executor", "parse_executor", "trial_key"]

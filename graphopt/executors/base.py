"""The part every executor shares: trial keys, the on-disk trial cache, and ``map`` on top of them.

An executor subclass only says how to run the trials that have no result yet (``_run``); this class looks results
up first, runs each distinct missing trial once, stores every result the moment it arrives (so an interrupted sweep
keeps what finished), and returns results in the order of ``items``. Results go through JSON even when nothing is
cached, so a fresh result and a cached one are the same value (a tuple comes back as a list on every executor).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Callable

from graphopt.errors import OutputError, UsageError

KINDS = ("accuracy", "latency")
TRIALS_DIR = "trials"


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask: a container or taskset may allow fewer than exist)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def canonical(value: Any) -> str:
    """``value`` as canonical JSON (sorted keys, no spaces); a UsageError if it is not JSON."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"a trial's item and result must be JSON values (paths, names, numbers): {exc}") from None


def function_name(fn: Callable) -> str:
    """``module:qualname`` of a module-level function (what a worker imports to run it)."""
    qualname = getattr(fn, "__qualname__", "")
    if not qualname or "<" in qualname:  # a lambda or a function defined inside another one
        raise UsageError(f"a trial function must be defined at module level (got {qualname or fn!r})")
    return f"{fn.__module__}:{qualname}"


def trial_key(fn: Callable, item: Any) -> str:
    """The trial's content address: sha256 of the function's name, the item's canonical JSON and graphopt's version
    (a new graphopt may compute a trial differently, so it does not reuse an old one's result)."""
    from graphopt import __version__

    text = "\n".join((function_name(fn), canonical(item), __version__))
    return hashlib.sha256(text.encode()).hexdigest()


class TrialCache:
    """Results of finished trials, one JSON file per key under ``<run_dir>/trials/`` (None: kept in memory)."""

    def __init__(self, run_dir: str | None):
        self.folder = os.path.join(run_dir, TRIALS_DIR) if run_dir else None
        self._memory: dict[str, Any] = {}

    def _path(self, key: str) -> str:
        return os.path.join(self.folder, f"{key}.json")

    def get(self, key: str) -> tuple[bool, Any]:
        """(True, result) for a finished trial, (False, None) otherwise (a half-written file cannot exist)."""
        if self.folder is None:
            return (key in self._memory, self._memory.get(key))
        try:
            with open(self._path(key), encoding="utf-8") as f:
                return True, json.load(f)["result"]
        except FileNotFoundError:
            return False, None

    def put(self, key: str, fn_name: str, item: Any, result: Any) -> Any:
        """Store a result (atomically: a temporary file renamed over the key) and return it as JSON gives it back."""
        text = canonical(result)
        value = json.loads(text)
        if self.folder is None:
            self._memory[key] = value
            return value
        record = f'{{"fn":{json.dumps(fn_name)},"item":{canonical(item)},"result":{text}}}\n'
        try:
            os.makedirs(self.folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{key[:16]}-", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(record)
            os.replace(tmp, self._path(key))
        except OSError as exc:
            raise OutputError(f"{self.folder}: cannot store a trial result ({exc.strerror or exc})") from None
        return value


class CachedExecutor:
    """``map`` over a trial cache; subclasses implement ``_run(fn, items, kind, done)``, calling ``done(i, result)``
    as each ``items[i]`` finishes (in any order). Usable as a context manager (``close`` stops its workers)."""

    def __init__(self, run_dir: str | None = None):
        self.run_dir = run_dir
        self.cache = TrialCache(run_dir)
        self.calls = 0  # trials actually run by this executor (cached ones not counted)

    def map(self, fn: Callable[[Any], Any], items: list, kind: str = "accuracy") -> list:
        if kind not in KINDS:
            raise UsageError(f"trial kind '{kind}': expected one of {', '.join(KINDS)}")
        name = function_name(fn)
        keys = [trial_key(fn, item) for item in items]
        results: dict[str, Any] = {}
        todo: dict[str, Any] = {}  # key -> item, each distinct missing trial once, in first-seen order
        for key, item in zip(keys, items):
            if key in results or key in todo:
                continue
            hit, value = self.cache.get(key)
            if hit:
                results[key] = value
            else:
                todo[key] = item
        if todo:
            todo_keys, todo_items = list(todo), list(todo.values())

            def done(i: int, result: Any) -> None:
                results[todo_keys[i]] = self.cache.put(todo_keys[i], name, todo_items[i], result)

            self.calls += len(todo_items)
            self._run(fn, todo_items, kind, done)
        return [results[key] for key in keys]

    def _run(self, fn: Callable, items: list, kind: str, done: Callable[[int, Any], None]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop the workers this executor started (nothing for in-process)."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.interrupt()
        self.close()

    def interrupt(self) -> None:
        """Ctrl-C: stop the workers now, without waiting for the trials they run (their results are lost; what
        finished is stored). Nothing for in-process."""

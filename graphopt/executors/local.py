"""Executors on this machine: in the calling process, or in a pool of local worker processes.

``LocalProcesses`` uses ``concurrent.futures.ProcessPoolExecutor`` with the *spawn* start method: a worker is a
fresh interpreter (no copy of the driver's threads, onnxruntime sessions or locks, as fork would give) that imports
only what unpickling a trial needs — the trial function's module, and through it graphopt (about 1.5 s, once per
worker: the pool lives as long as the executor, across all ``map`` calls of a sweep). A function defined in a
script's ``__main__`` works too (the worker re-imports the script as ``__mp_main__``; guard its entry point with
``if __name__ == "__main__"``).

Threads: each worker runs one trial at a time and gets its share of the cores (cores // workers, at least 1) in
``$GRAPHOPT_THREADS`` and ``$OMP_NUM_THREADS`` (and torch's setting, if the worker imported torch already), which a
session made with ``threads=0`` follows (:func:`graphopt.backends.base.default_threads`): the default of one worker
per core fills the machine with one-thread trials, where trials that each started a pool of every core would
oversubscribe it. (Part of a trial is single-threaded Python — quantizing the graph, building the session — so on
a sweep two one-thread workers beat one worker with two threads.)
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Callable

from graphopt.backends.base import THREADS_ENV
from graphopt.executors.base import CachedExecutor, usable_cpus


def share_threads(threads: int) -> None:
    """This process's trials use ``threads`` intra-op threads (a worker's share of the cores)."""
    os.environ[THREADS_ENV] = os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def _worker_init(threads: int) -> None:
    """A pool worker: its share of the cores, and Ctrl-C left to the driver, which stops the workers itself (a
    terminal's Ctrl-C reaches every process of the group: workers that took it printed tracebacks, and a second
    one while the pool shut down left the driver waiting for them for good)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    share_threads(threads)


class InProcess(CachedExecutor):
    """Every trial in the calling process, one after another (for debugging, and for trials that are quick)."""

    def _run(self, fn: Callable, items: list, kind: str, done: Callable[[int, Any], None]) -> None:
        for i, item in enumerate(items):
            done(i, fn(item))


class LocalProcesses(CachedExecutor):
    """Trials in ``workers`` spawned processes (None: one per core). Accuracy trials run in parallel; a latency
    trial runs in one worker while the others are idle (``map`` waits for every trial before it returns, so no
    trial of an earlier call is still running)."""

    def __init__(self, workers: int | None = None, run_dir: str | None = None):
        super().__init__(run_dir)
        self.workers = workers or usable_cpus()
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            share = max(1, usable_cpus() // self.workers)
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init, initargs=(share,))
        return self._pool

    def _run(self, fn: Callable, items: list, kind: str, done: Callable[[int, Any], None]) -> None:
        pool = self._get_pool()
        if kind == "latency":
            for i, item in enumerate(items):
                done(i, pool.submit(fn, item).result())
            return
        pending: dict[Future, int] = {pool.submit(fn, item): i for i, item in enumerate(items)}
        failure: BaseException | None = None
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    i = pending.pop(future)
                    if future.cancelled():
                        continue
                    if future.exception() is not None:
                        if failure is None:  # drop the trials not started; those running finish and are stored
                            failure = future.exception()
                            for other in pending:
                                other.cancel()
                        continue
                    done(i, future.result())
        except KeyboardInterrupt:  # Ctrl-C: interrupt() stops the workers (cancelled futures here would make the
            raise  # pool's thread fail on them as it marks the pool broken)
        except BaseException:  # drop what has not started (what finished is stored)
            for future in pending:
                future.cancel()
            raise
        if failure is not None:
            raise failure

    def interrupt(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        items = getattr(pool, "_pending_work_items", None)  # Python 3.11's pool thread fails on cancelled items
        if isinstance(items, dict):  # as it marks the pool broken: drop them first
            for key in [k for k, w in list(items.items()) if w.future.cancelled()]:
                items.pop(key, None)
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()  # the pool sees them gone and fails what they had (a BrokenProcessPool)
        pool.shutdown(wait=False)

    def close(self) -> None:
        if self._pool is not None:
            try:
                self._pool.shutdown(wait=True, cancel_futures=True)
            except KeyboardInterrupt:  # Ctrl-C while the running trials finish: stop them
                self.interrupt()
                raise
            self._pool = None

"""Trials on Ray: a local head started for the run, an existing cluster through Ray Client, or the cluster a Ray
job runs in.

- ``RayExecutor(None, run_dir)`` (``--executor ray``) starts a private single-node cluster for the run and stops it
  in ``close``. It is locked down: every Ray server listens on loopback only (Ray's own "local only" node address,
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` with node address 127.0.0.1: without it Ray binds its gRPC servers to
  every interface), no dashboard, usage stats off, an object store of 256 MiB (trials pass paths and numbers, not
  tensors), and token authentication ON with a fresh random token written to ``<run_dir>/ray_auth_token`` (mode
  0600; Ray would otherwise create ``~/.ray/auth_token``), so another user of the machine cannot submit work to
  it. Its temp dir (sockets, logs) is ``<run_dir>/ray`` when that path is short enough for the AF_UNIX socket
  paths Ray puts under it (107 bytes on Linux), else a short ``/tmp/graphopt-ray-*`` folder removed on close.
- ``RayExecutor("ray://host:port")`` connects to an existing cluster with Ray Client; the cluster's own settings
  (and its token, from the usual ``RAY_AUTH_TOKEN*`` variables) apply, and its workers must have graphopt and the
  trial function's module installed.
- ``RayExecutor("auto")`` joins the cluster this process runs in (a script submitted with Ray's Jobs API).

A trial is a Ray task needing one CPU. A latency trial asks for every CPU of a node, so Ray runs nothing else of
ours beside it there, and trials of that kind are submitted one at a time.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from typing import Any, Callable

from graphopt.errors import GraphoptError, UnsupportedError, UsageError, first_line
from graphopt.executors.base import CachedExecutor, usable_cpus
from graphopt.executors.local import share_threads

INSTALL_HINT = "pip install 'graphopt[ray]'"
OBJECT_STORE_BYTES = 256 << 20
SOCKET_PATH_MAX = 107  # sun_path on Linux, less its terminating NUL
# what Ray appends to its temp dir for its longest socket: "/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store"
SOCKET_SUFFIX_MAX = 72
LOOPBACK = "127.0.0.1"
LOCAL_HEAD_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "token",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # with node address 127.0.0.1: every server binds loopback only
}


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise UnsupportedError(f"--executor ray needs Ray ({exc.msg}): {INSTALL_HINT}") from None
    return ray


def short_temp_dir(run_dir: str | None) -> tuple[str, bool]:
    """(Ray's temp dir, whether graphopt made it in /tmp and removes it): ``<run_dir>/ray`` when Ray's socket paths
    under it stay within the AF_UNIX limit, else a new short folder in /tmp."""
    if run_dir:
        inside = os.path.join(os.path.abspath(run_dir), "ray")
        if len(inside.encode()) + SOCKET_SUFFIX_MAX <= SOCKET_PATH_MAX:
            os.makedirs(inside, exist_ok=True)
            return inside, False
    return tempfile.mkdtemp(prefix="graphopt-ray-", dir="/tmp" if os.path.isdir("/tmp") else None), True


def _call(fn: Callable, item: Any, threads: int) -> Any:
    """The Ray task: one trial, its sessions at ``threads`` intra-op threads (the CPUs the task holds)."""
    share_threads(threads)
    return fn(item)


class RayExecutor(CachedExecutor):
    """Trials as Ray tasks; ``address`` None starts a local head (see the module docstring), ``"ray://host:port"``
    uses Ray Client, ``"auto"`` joins the current cluster. ``num_cpus`` sizes a local head (None: every core)."""

    def __init__(self, address: str | None = None, run_dir: str | None = None, num_cpus: int | None = None):
        super().__init__(run_dir)
        self.ray = import_ray()
        self.address = address
        self.temp_dir: str | None = None
        self._remove_temp = False
        self._saved_env: dict[str, str | None] = {}
        self._cluster_flag = None
        if self.ray.is_initialized():
            raise UsageError("--executor ray: Ray is already initialized in this process (call ray.shutdown() first)")
        try:
            if address is None:
                self._start_local_head(num_cpus or usable_cpus())
            else:
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                self.ray.init(address=address, log_to_driver=False, configure_logging=False)
        except Exception as exc:
            self.close()
            raise UnsupportedError(f"--executor ray: Ray did not start: {first_line(exc)}") from None
        except BaseException:  # Ctrl-C while the head starts: stop what started, remove its temp dir
            self.close()
            raise
        self._task = self.ray.remote(_call)
        self._node_cpus = max(int(n["Resources"].get("CPU", 1)) for n in self.ray.nodes() if n["Alive"])

    def _start_local_head(self, num_cpus: int) -> None:
        ray = self.ray
        self.temp_dir, self._remove_temp = short_temp_dir(self.run_dir)
        token_dir = os.path.abspath(self.run_dir) if self.run_dir else self.temp_dir
        os.makedirs(token_dir, exist_ok=True)
        token_path = os.path.join(token_dir, "ray_auth_token")
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        # the driver's import path goes to the head's processes, so that workers find the trial function's module
        path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        self._set_env({**LOCAL_HEAD_ENV, "RAY_AUTH_TOKEN_PATH": token_path, "PYTHONPATH": path})
        # Ray's C++ side read the auth mode and cached the token when Ray was imported (or by an earlier head in this
        # process): reload both, as Ray's own `_enable_token_auth` and `ray get-auth-token` do
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
        # Ray reads the local-only switch when it is imported; a process that imported Ray before needs it set too
        self._cluster_flag = ray._private.ray_constants.ENABLE_RAY_CLUSTER
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
                 _temp_dir=self.temp_dir, _node_ip_address=LOOPBACK, log_to_driver=False, configure_logging=False)
        addresses = {n["NodeManagerAddress"] for n in ray.nodes()}
        if addresses != {LOOPBACK}:
            raise RuntimeError(f"the local head listens on {sorted(addresses)}, not on loopback only")

    def _set_env(self, values: dict[str, str]) -> None:
        for name, value in values.items():
            self._saved_env.setdefault(name, os.environ.get(name))
            os.environ[name] = value

    def _run(self, fn: Callable, items: list, kind: str, done: Callable[[int, Any], None]) -> None:
        ray = self.ray
        if kind == "latency":
            task = self._task.options(num_cpus=self._node_cpus)
            for i, item in enumerate(items):
                done(i, self._get(task.remote(fn, item, self._node_cpus)))
            return
        pending = {self._task.remote(fn, item, 1): i for i, item in enumerate(items)}
        try:
            while pending:
                finished, _ = ray.wait(list(pending), num_returns=1)
                for ref in finished:
                    done(pending.pop(ref), self._get(ref))
        finally:
            for ref in pending:
                ray.cancel(ref)

    def _get(self, ref) -> Any:
        """A task's result; a graphopt error a trial raised reaches the user as itself, one line (not Ray's
        coloured traceback of the worker)."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, GraphoptError):
                raise cause from None
            raise

    def close(self) -> None:
        if self.ray.is_initialized():
            self.ray.shutdown()
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env = {}
        if self._cluster_flag is not None:
            self.ray._private.ray_constants.ENABLE_RAY_CLUSTER = self._cluster_flag
            self._cluster_flag = None
        if self._remove_temp and self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self._remove_temp = False

"""graphopt's compile caches (x86 packages, TensorRT engines, OpenVINO blobs): where each backend keeps what it
compiled, ``$GRAPHOPT_CACHE_DIR/<backend>`` (default ``~/.cache/graphopt/<backend>``), and keeping a folder to a
size."""

from __future__ import annotations

import os

CACHE_ENV = "GRAPHOPT_CACHE_DIR"


def cache_folder(setting: str, kind: str) -> str | None:
    """Where a backend keeps what it compiled (engines, blobs) from a ``cache_dir`` option: ``setting`` itself
    when given, None for ``none`` (no cache), else ``$GRAPHOPT_CACHE_DIR/<kind>`` (``~/.cache/graphopt/<kind>``)."""
    if setting.lower() == "none":
        return None
    if setting:
        return setting
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "graphopt")
    return os.path.join(root, kind)


def trim_cache(folder: str, suffix: str, limit: int, companions: tuple[str, ...] = ()) -> None:
    """Remove the oldest files of ``folder`` whose names end in ``suffix`` until the rest fit in ``limit`` bytes
    (a file another process has open stays readable to it; hidden files, a build being staged, are not counted),
    each with its companions: the files named like it
    with a suffix of ``companions`` instead (an engine's layer report, a package's facts and lock). Oldest by
    modification time: a backend that calls :func:`used` on each hit trims the least recently used."""
    files = []
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                if entry.name.endswith(suffix) and not entry.name.startswith(".") and entry.is_file():
                    files.append((entry.stat().st_mtime, entry.stat().st_size, entry.path))
            except OSError:  # removed meanwhile by another process
                continue
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):
        if total <= limit:
            break
        for name in (path, *(path[:-len(suffix)] + other for other in companions)):
            try:
                os.remove(name)
            except OSError:
                pass
        total -= size


def used(path: str) -> None:
    """Mark a cached file as just used (its modification time), so that :func:`trim_cache` keeps it longest."""
    try:
        os.utime(path)
    except OSError:  # trimmed meanwhile, or a read-only cache: it is only an order
        pass

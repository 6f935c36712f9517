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


def trim_cache(folder: str, suffix: str, limit: int) -> None:
    """Remove the oldest files of ``folder`` whose names end in ``suffix`` until the rest fit in ``limit`` bytes
    (a file another process has open stays readable to it)."""
    files = []
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                if entry.name.endswith(suffix) and entry.is_file():
                    files.append((entry.stat().st_mtime, entry.stat().st_size, entry.path))
            except OSError:  # removed meanwhile by another process
                continue
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):
        if total <= limit:
            break
        try:
            os.remove(path)
        except OSError:
            pass
        total -= size

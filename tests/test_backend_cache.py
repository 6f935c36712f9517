"""graphopt/backends/cache.py: where compile caches live, and keeping one to a size (least recently used first,
each entry with its companion files; builds being staged, hidden files, untouched)."""

from __future__ import annotations

import os

from graphopt.backends.cache import cache_folder, trim_cache, used


def entry(folder, key: str, size: int, mtime: float, companions=(".json", ".lock")) -> None:
    (folder / f"{key}.pt2").write_bytes(b"x" * size)
    for suffix in companions:
        (folder / f"{key}{suffix}").write_text("{}")
    os.utime(folder / f"{key}.pt2", (mtime, mtime))


def test_the_least_recently_used_entries_go_with_their_companions(tmp_path):
    for i, key in enumerate("abcd"):
        entry(tmp_path, key, 1000, 1_000_000 + i)  # a oldest ... d newest
    (tmp_path / ".e.123.pt2").write_bytes(b"x" * 5000)  # a package being staged by another process
    used(str(tmp_path / "a.pt2"))  # a hit: now the most recently used
    trim_cache(str(tmp_path), ".pt2", 2500, (".json", ".lock"))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".e.123.pt2", "a.json", "a.lock", "a.pt2", "d.json", "d.lock", "d.pt2"]


def test_within_the_size_nothing_goes_and_a_vanished_file_is_no_error(tmp_path):
    entry(tmp_path, "a", 100, 1_000_000)
    trim_cache(str(tmp_path), ".pt2", 100, (".json",))
    assert (tmp_path / "a.pt2").exists() and (tmp_path / "a.json").exists()
    used(str(tmp_path / "gone.pt2"))  # trimmed meanwhile: nothing to mark


def test_cache_folder_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path))
    assert cache_folder("", "x86") == os.path.join(str(tmp_path), "x86")
    assert cache_folder("NONE", "x86") is None and cache_folder("/elsewhere", "x86") == "/elsewhere"

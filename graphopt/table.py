"""Aligned text tables: the one style every report of graphopt prints (a dashed rule under the header)."""

from __future__ import annotations

from typing import Iterable


def format_table(rows: list[tuple[str, ...]], right: Iterable[int] = ()) -> str:
    """Rows of strings as aligned columns, a dashed rule under the header; ``right``: right-aligned columns."""
    right = set(right)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    lines = [line(row).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_bytes(n: int) -> str:
    """``1.5 MB``, ``12.0 KB``, ``900 B`` (binary units: 1 KB = 1024 bytes)."""
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"

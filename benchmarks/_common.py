"""What every benchmark script shares: the machine and package versions it ran with, and writing its results."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
from typing import Any

PACKAGES = ("graphopt", "onnx", "onnxruntime", "onnx-graphsurgeon", "torch")


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def versions(extra: tuple[str, ...] = ()) -> str:
    """``"graphopt 0.1.0, onnx 1.23.2, ..."`` for graphopt's stack plus ``extra`` distributions."""
    out = []
    for dist in ("graphopt", *extra, *PACKAGES[1:]):
        try:
            out.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            out.append(f"{dist} (not installed)")
    return ", ".join(out)


def write_outputs(table: str, data: dict[str, Any], markdown: str | None, json_path: str | None) -> None:
    """Print the Markdown table, and write it and the JSON data where asked (creating folders)."""
    print(table)
    for out in (markdown, json_path):
        if out and os.path.dirname(out):
            os.makedirs(os.path.dirname(out), exist_ok=True)
    if markdown:
        with open(markdown, "w") as f:
            f.write(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(data, f, indent=2, default=float)

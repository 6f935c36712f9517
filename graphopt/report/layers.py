"""Per-layer comparison rows, shared by the ONNX (:mod:`graphopt.report.metrics`) and FX
(:mod:`graphopt.report.fx_layers`) per-layer SQNR: one row per tensor, accumulated over batches."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from graphopt.numeric import cosine, fmt_db, rel_error, sqnr
from graphopt.table import format_table


def jsonable(value: float | None) -> Any:
    """A float for JSON: infinities as the strings "inf" / "-inf", NaN as null."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def json_text(data: Any, default=str) -> str:
    """``data`` as strict JSON text (indented): every float through :func:`jsonable`, so a NaN or an infinity
    anywhere in a report is null / "inf", never the bare NaN / Infinity strict parsers reject."""
    def strict(value):
        if isinstance(value, dict):
            return {k: strict(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [strict(v) for v in value]
        if isinstance(value, (float, np.floating)):
            return jsonable(float(value))
        return value

    return json.dumps(strict(data), indent=2, default=default, allow_nan=False)


def count_samples(feeds: Mapping[str, np.ndarray]) -> int:
    """The batch size of a dict of feeds (the first array's first dimension; 1 for a scalar; 0 when empty)."""
    for v in feeds.values():
        return int(np.shape(v)[0]) if np.ndim(v) else 1
    return 0


@dataclass
class LayerSQNR:
    tensor: str
    other: str
    op_type: str
    index: int
    signal: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    other_power: float = 0.0
    max_abs_ref: float = 0.0
    max_abs_err: float = 0.0
    quantized: bool | None = None  # B's value went through Q/DQ; None: as its name says (another name: it did)

    def add(self, ref: np.ndarray, x: np.ndarray) -> None:
        ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
        d = x - ref
        self.signal += float(np.sum(ref * ref))
        self.noise += float(np.sum(d * d))
        self.dot += float(np.sum(ref * x))
        self.other_power += float(np.sum(x * x))
        if ref.size:
            self.max_abs_ref = max(self.max_abs_ref, float(np.max(np.abs(ref))))
            self.max_abs_err = max(self.max_abs_err, float(np.max(np.abs(d))))

    @property
    def sqnr_db(self) -> float:
        return sqnr(self.signal, self.noise)

    @property
    def cosine(self) -> float:
        return cosine(self.dot, self.signal, self.other_power)

    @property
    def max_rel_err(self) -> float:
        return rel_error(self.max_abs_err, self.max_abs_ref)

    @property
    def went_through_qdq(self) -> bool:
        return self.quantized if self.quantized is not None else self.other != self.tensor

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "compared_with": self.other, "op_type": self.op_type, "index": self.index,
                "sqnr_db": jsonable(self.sqnr_db), "cosine": self.cosine, "max_rel_err": self.max_rel_err}


@dataclass
class LayerTable:
    """Per-layer SQNR rows, worst (lowest SQNR) first; ``unmatched``: A's tensors B has no counterpart for;
    ``skipped``: matched names whose values could not be compared (not float, or shapes differ), with why."""

    rows: list[LayerSQNR]
    unmatched: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    samples: int = 0

    def table(self, top: int | None = None) -> str:
        shown = self.rows if top is None else self.rows[:top]
        table = [("#", "tensor", "op", "in B", "SQNR dB", "cosine", "max rel err")]
        for r in shown:
            table.append((str(r.index) if r.index >= 0 else "input", r.tensor, r.op_type,
                          "after Q/DQ" if r.went_through_qdq else "as is", fmt_db(r.sqnr_db), f"{r.cosine:.6f}",
                          f"{r.max_rel_err:.2e}"))
        return format_table(table)

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "layers": [r.to_dict() for r in self.rows], "unmatched": self.unmatched,
                "skipped": self.skipped}



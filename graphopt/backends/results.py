"""What a backend's timing and evaluation give back: latency percentiles per setting (:class:`LatencyStats`,
:class:`BenchResult`) and accuracy on labelled data (:class:`Accuracy`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np

from graphopt.table import format_table

__all__ = ["Accuracy", "BenchResult", "LatencyStats"]


# -- timing results ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatencyStats:
    """Latency of one (batch size, threads) setting over ``iters`` timed runs, in milliseconds."""

    batch: int
    threads: int
    iters: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def from_times(cls, batch: int, threads: int, seconds: Iterable[float]) -> "LatencyStats":
        ms = np.asarray(list(seconds), np.float64) * 1000.0
        if ms.size == 0:
            raise ValueError("no timed runs")
        p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
        return cls(batch, threads, int(ms.size), p50, p90, p99, float(ms.mean()), float(ms.min()), float(ms.max()))

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency."""
        return self.batch * 1000.0 / self.p50_ms if self.p50_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "samples_per_s": self.throughput}


@dataclass
class BenchResult:
    model: str
    backend: str
    size_bytes: int
    warmup: int
    rows: list[LatencyStats] = field(default_factory=list)
    input_shapes: dict[int, dict[str, list[int]]] = field(default_factory=dict)  # batch -> input name -> shape
    settings: dict[str, Any] = field(default_factory=dict)  # what the runtime ran with (openvino: streams, precision)

    def get(self, batch: int, threads: int) -> LatencyStats:
        for row in self.rows:
            if row.batch == batch and row.threads == threads:
                return row
        raise KeyError((batch, threads))

    def table(self) -> str:
        rows = [("batch", "threads", "p50 ms", "p90 ms", "p99 ms", "mean ms", "samples/s")]
        for r in self.rows:
            rows.append((str(r.batch), str(r.threads), f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}", f"{r.p99_ms:.3f}",
                         f"{r.mean_ms:.3f}", f"{r.throughput:,.1f}"))
        return format_table(rows)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "backend": self.backend, "size_bytes": self.size_bytes, "warmup": self.warmup,
                "input_shapes": {str(b): s for b, s in self.input_shapes.items()},
                "latency": [r.to_dict() for r in self.rows], **({"settings": self.settings} if self.settings else {})}


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def __str__(self) -> str:
        return f"{100 * self.accuracy:.2f}% ({self.correct}/{self.total})"

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total}

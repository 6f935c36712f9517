"""Streaming observers: they see batches of one tensor and give the (low, high) range to quantize it with.

An observer's state has a fixed size, so calibrating on 10,000 samples takes the same memory as on 10:

- :class:`MinMaxObserver` keeps the running minimum and maximum (two floats).
- :class:`HistogramObserver` keeps a fixed number of bins (2048 by default) on a grid anchored at 0.0 whose bin
  width is a power of two. When a batch falls outside the current window the width doubles (as often as needed)
  and neighbouring bins are summed into the wider ones. Because every edge of the coarser grid is an edge of the
  finer one, this re-binning is *exact*: the merged histogram equals, count for count, a one-shot histogram of
  all the data on the final grid. At any time the data span more than half of the bins (less only when the data
  are constant), so 2048 bins give at least ~1024 bins of resolution over [min, max].

Ranges (:func:`compute_range`, or ``observer.range(...)``), all per tensor: ``minmax`` (the exact [min, max]), and
``percentile``, ``entropy`` and ``mse``, read from the histogram by the searches of :mod:`graphopt.calib.ranges`
(where each method is described). Scale and zero point for a range: :mod:`graphopt.calib.qparams`.

Non-finite values (NaN, +-inf) are skipped and counted in ``observer.nonfinite`` for the caller to report.
"""

from __future__ import annotations

import math

import numpy as np

from graphopt.calib.errors import ObserverError
from graphopt.calib.qparams import QuantParams, dequantize, quant_range, quantize, scale_zero_point
from graphopt.calib.ranges import _expected_sq_errors, _kl_divergences, _quantile, _search

__all__ = [
    "METHODS", "HistogramObserver", "MinMaxObserver", "Observer", "ObserverError", "QuantParams",
    "compute_range", "dequantize", "make_observer", "quant_range", "quantize", "scale_zero_point",
]

METHODS = ("minmax", "percentile", "entropy", "mse")
_CHUNK = 1 << 20  # values binned at a time: bounds the temporaries of one update to a few MB
_EXP_MIN = -64  # finest bin width, 2**-64 (only reached by constant or nearly constant tensors)
_EXACT = 1 << 52  # bin indices stay below this, so float64 holds them exactly


def _float_view(x) -> np.ndarray:
    """``x`` as a flat float32/float64 array (a view when it already is one)."""
    x = np.asarray(x)
    if x.dtype != np.float64 and x.dtype != np.float32:
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise ObserverError(f"observers take numeric tensors, got dtype {x.dtype}")
        x = x.astype(np.float32 if x.dtype.itemsize <= 2 else np.float64)
    return x.reshape(-1)


class Observer:
    """Base class: ``update(batch)`` as data flow, then ``range(...)``. The state has a fixed size."""

    def __init__(self) -> None:
        self.count = 0  # finite values seen
        self.nonfinite = 0  # NaN / inf values skipped
        self._min = math.inf
        self._max = -math.inf

    @property
    def min(self) -> float:
        return self._min

    @property
    def max(self) -> float:
        return self._max

    def update(self, x) -> None:
        """Observe a batch (any shape; every value counts, per-tensor)."""
        flat = _float_view(x)
        for start in range(0, flat.size, _CHUNK):
            chunk = flat[start:start + _CHUNK]
            lo, hi = chunk.min(), chunk.max()
            if not (math.isfinite(lo) and math.isfinite(hi)):
                finite = chunk[np.isfinite(chunk)]
                self.nonfinite += chunk.size - finite.size
                if finite.size == 0:
                    continue
                chunk, lo, hi = finite, finite.min(), finite.max()
            self._observe(chunk, float(lo), float(hi))
            self.count += chunk.size
            self._min, self._max = min(self._min, float(lo)), max(self._max, float(hi))

    def _observe(self, chunk: np.ndarray, lo: float, hi: float) -> None:
        pass

    def state_nbytes(self) -> int:
        """Bytes of the arrays this observer holds (constant: independent of how much data it has seen)."""
        return 0

    def range(self, method: str = "minmax", *, symmetric: bool = False, num_levels: int | None = None,
              percentile: float = 99.99) -> tuple[float, float]:
        """Shorthand for :func:`compute_range` on this observer."""
        return compute_range(self, method, symmetric=symmetric, num_levels=num_levels, percentile=percentile)

    def _check_seen(self) -> None:
        if self.count == 0:
            extra = f" ({self.nonfinite} non-finite values skipped)" if self.nonfinite else ""
            raise ObserverError(f"{type(self).__name__} has seen no finite values{extra}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(count={self.count}, min={self._min:.6g}, max={self._max:.6g})"


class MinMaxObserver(Observer):
    """The running [min, max] of every finite value seen. Supports only the ``minmax`` method."""


class HistogramObserver(Observer):
    """A fixed-size histogram on a power-of-two grid anchored at 0, merged exactly as the range grows.

    Bin ``j`` of the window covers ``[(first + j) * 2**exp, (first + j + 1) * 2**exp)``. ``bins`` is the number
    of bins kept (memory: ``8 * bins`` bytes); see the module docstring for how re-binning stays exact, and
    :mod:`graphopt.calib.ranges` for the range methods. ``merge(other)`` adds another observer's histogram (e.g.
    from a parallel worker).
    """

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        if not isinstance(bins, (int, np.integer)) or bins < 16:
            raise ObserverError(f"HistogramObserver needs at least 16 bins, got {bins!r}")
        self.bins = int(bins)
        self._counts = np.zeros(self.bins, dtype=np.int64)
        self._exp: int | None = None  # bin width is 2**_exp
        self._first = 0  # grid index of the window's first bin

    # -- state ---------------------------------------------------------------------------------------------
    def state_nbytes(self) -> int:
        return self._counts.nbytes

    @property
    def bin_width(self) -> float:
        self._check_seen()
        return math.ldexp(1.0, self._exp)

    @property
    def edges(self) -> np.ndarray:
        """The ``bins + 1`` edges of the current window (exact: multiples of a power of two)."""
        self._check_seen()
        return np.ldexp(np.arange(self._first, self._first + self.bins + 1, dtype=np.float64), self._exp)

    @property
    def counts(self) -> np.ndarray:
        """A copy of the bin counts (``int64``, ``bins`` of them)."""
        return self._counts.copy()

    # -- streaming -----------------------------------------------------------------------------------------
    def _fit(self, lo: float, hi: float, exp: int) -> tuple[int, int]:
        """The smallest exponent >= ``exp`` whose window of ``bins`` bins holds [lo, hi], and its first bin."""
        while True:
            a, b = math.floor(math.ldexp(lo, -exp)), math.floor(math.ldexp(hi, -exp))
            if b - a < self.bins and max(abs(a), abs(b)) < _EXACT:
                return exp, a
            exp += 1

    def _cover(self, lo: float, hi: float, min_exp: int | None = None) -> None:
        """Grow the window (coarsening exactly) until it holds [lo, hi] and the data seen so far."""
        if self._exp is None:
            span, start = hi - lo, _EXP_MIN
            if span > 0:  # log2(span / bins); past float64's range (|x| near 1.8e308) from the halves
                if math.isfinite(span):
                    log = math.log2(span / self.bins)
                else:
                    log = math.log2((hi / 2 - lo / 2) / self.bins) + 1
                start = max(_EXP_MIN, math.floor(log) - 1)
            if min_exp is not None:
                start = max(start, min_exp)
            self._exp, self._first = self._fit(lo, hi, start)
            return
        exp = self._exp if min_exp is None else max(self._exp, min_exp)
        w_lo, w_hi = math.floor(math.ldexp(lo, -exp)), math.floor(math.ldexp(hi, -exp))
        if exp == self._exp and w_lo >= self._first and w_hi < self._first + self.bins:
            return
        lo, hi = min(lo, self._min), max(hi, self._max)
        new_exp, new_first = self._fit(lo, hi, exp)
        occupied = np.flatnonzero(self._counts)
        if occupied.size:
            index = _shift(occupied.astype(np.int64) + self._first, new_exp - self._exp) - new_first
            self._counts = np.bincount(index, weights=self._counts[occupied], minlength=self.bins).astype(np.int64)
        self._exp, self._first = new_exp, new_first

    def _observe(self, chunk: np.ndarray, lo: float, hi: float) -> None:
        self._cover(lo, hi)
        scaled = chunk * chunk.dtype.type(math.ldexp(1.0, -self._exp))  # exact: a power-of-two scaling
        np.floor(scaled, out=scaled)
        index = scaled.astype(np.int64)
        index -= self._first
        self._counts += np.bincount(index, minlength=self.bins)

    def merge(self, other: "HistogramObserver") -> None:
        """Add ``other``'s data to this histogram (exact, as if this observer had seen it too)."""
        if not isinstance(other, HistogramObserver):
            raise ObserverError(f"cannot merge a {type(other).__name__} into a HistogramObserver")
        if other.count == 0:
            self.nonfinite += other.nonfinite
            return
        self._cover(other._min, other._max, min_exp=other._exp)
        occupied = np.flatnonzero(other._counts)
        index = _shift(occupied.astype(np.int64) + other._first, self._exp - other._exp) - self._first
        self._counts += np.bincount(index, weights=other._counts[occupied], minlength=self.bins).astype(np.int64)
        self.count += other.count
        self.nonfinite += other.nonfinite
        self._min, self._max = min(self._min, other._min), max(self._max, other._max)

    # -- dense views for the range methods -----------------------------------------------------------------
    def _occupied(self) -> tuple[np.ndarray, np.ndarray]:
        """(grid indices, counts) of the non-empty bins."""
        nz = np.flatnonzero(self._counts)
        return nz.astype(np.int64) + self._first, self._counts[nz].astype(np.float64)

    def _dense(self, index: np.ndarray, counts: np.ndarray, lo: int, hi: int, max_bins: int):
        """Counts on grid bins [lo, hi] (coarsened by powers of two to at most ``max_bins``): (hist, lo, exp)."""
        shift = 0
        while (hi >> shift) - (lo >> shift) + 1 > max_bins:
            shift += 1
        lo_s = lo >> shift
        hist = np.bincount(_shift(index, shift) - lo_s, weights=counts, minlength=(hi >> shift) - lo_s + 1)
        return hist, lo_s, self._exp + shift

    def _abs_hist(self, max_bins: int):
        """Histogram of |x| from 0: bin k >= 0 stays k, bin k < 0 ([k w, (k+1) w)) folds to -k-1. Exact."""
        index, counts = self._occupied()
        folded = np.where(index >= 0, index, -index - 1)
        return self._dense(folded, counts, 0, int(folded.max()), max_bins)

    def _zero_hist(self, max_bins: int):
        """Histogram over the window widened to contain 0; returns (hist, lo, exp) with edge 0 at index -lo."""
        index, counts = self._occupied()
        return self._dense(index, counts, min(int(index.min()), 0), max(int(index.max()), 0), max_bins)


def _shift(index: np.ndarray, d: int) -> np.ndarray:
    """floor(index / 2**d) for |index| < 2**52 (numpy shifts are undefined past the width)."""
    return index >> min(d, 62) if d else index


# -- range methods ---------------------------------------------------------------------------------------------
def make_observer(method: str, bins: int = 2048) -> Observer:
    """The cheapest observer that supports ``method``: MinMax for ``minmax``, else a histogram."""
    _check_method(method)
    return MinMaxObserver() if method == "minmax" else HistogramObserver(bins)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ObserverError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")


def compute_range(observer: Observer, method: str = "minmax", *, symmetric: bool = False,
                  num_levels: int | None = None, percentile: float = 99.99) -> tuple[float, float]:
    """The (low, high) range to quantize the observed tensor with; methods in :mod:`graphopt.calib.ranges`.

    ``symmetric`` gives (-t, t). ``num_levels`` (entropy, mse) is the number of quantization levels across the
    searched window: 128 for int8 symmetric (the window is [0, t] on |x|), 256 for uint8 asymmetric (the window
    contains 0); the default follows ``symmetric``. ``percentile`` is in (0, 100]. Asymmetric ``minmax`` and
    ``percentile`` ranges may exclude 0 (``scale_zero_point`` widens them).
    """
    low, high = _compute_range(observer, method, symmetric, num_levels, percentile)
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):  # never hand out a NaN or inf range
        raise ObserverError(f"{method} range of {observer!r} is not a finite interval: [{low}, {high}]")
    return low, high


def _compute_range(observer: Observer, method: str, symmetric: bool, num_levels: int | None,
                   percentile: float) -> tuple[float, float]:
    _check_method(method)
    observer._check_seen()
    if num_levels is None:
        num_levels = 128 if symmetric else 256
    if not isinstance(num_levels, (int, np.integer)) or num_levels < 2:
        raise ObserverError(f"num_levels must be an integer >= 2, got {num_levels!r}")
    if method == "minmax":
        if symmetric:
            m = max(abs(observer.min), abs(observer.max))
            return -m, m
        return observer.min, observer.max
    if not isinstance(observer, HistogramObserver):
        raise ObserverError(f"method {method!r} needs a HistogramObserver, got {type(observer).__name__}")
    if method == "percentile":
        return _percentile_range(observer, percentile, symmetric)
    objective = _kl_divergences if method == "entropy" else _expected_sq_errors
    if symmetric:
        hist, lo, exp = observer._abs_hist(observer.bins)
        start, end = _search(hist, 0, int(num_levels), objective)
        t = min(math.ldexp(lo + end, exp), max(abs(observer.min), abs(observer.max)))
        return -t, t
    hist, lo, exp = observer._zero_hist(observer.bins)
    start, end = _search(hist, -lo, int(num_levels), objective)
    low = max(math.ldexp(lo + start, exp), min(observer.min, 0.0))
    high = min(math.ldexp(lo + end, exp), max(observer.max, 0.0))
    return low, high


def _percentile_range(obs: HistogramObserver, percentile: float, symmetric: bool) -> tuple[float, float]:
    if not 0 < percentile <= 100:
        raise ObserverError(f"percentile must be in (0, 100], got {percentile!r}")
    q = percentile / 100.0
    if symmetric:
        hist, lo, exp = obs._abs_hist(1 << 16)
        t = _quantile(hist, lo, exp, q)
        t = min(t, max(abs(obs.min), abs(obs.max)))
        return -t, t
    tail = (1.0 - q) / 2.0
    hist = obs._counts.astype(np.float64)
    low = max(_quantile(hist, obs._first, obs._exp, tail), obs.min)
    high = min(_quantile(hist, obs._first, obs._exp, 1.0 - tail), obs.max)
    return min(low, high), high

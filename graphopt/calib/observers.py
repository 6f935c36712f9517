"""Streaming observers: they see batches of one tensor and give the (low, high) range to quantize it with.

An observer's state has a fixed size, so calibrating on 10,000 samples takes the same memory as on 10:

- :class:`MinMaxObserver` keeps the running minimum and maximum (two floats).
- :class:`HistogramObserver` keeps a fixed number of bins (2048 by default) on a grid anchored at 0.0 whose bin
  width is a power of two. When a batch falls outside the current window the width doubles (as often as needed)
  and neighbouring bins are summed into the wider ones. Because every edge of the coarser grid is an edge of the
  finer one, this re-binning is *exact*: the merged histogram equals, count for count, a one-shot histogram of
  all the data on the final grid. At any time the data span more than half of the bins (less only when the data
  are constant), so 2048 bins give at least ~1024 bins of resolution over [min, max].

Ranges (:func:`compute_range`, or ``observer.range(...)``), all per tensor:

- ``minmax``: the exact [min, max] (symmetric: [-m, m] with m = max |x|).
- ``percentile``: symmetric: t = the p-th percentile of |x|, range [-t, t]; asymmetric (as onnxruntime does):
  the (100-p)/2-th and the (100+p)/2-th percentiles. Read from the histogram with linear interpolation inside
  a bin (the true sample percentile lies in the same bin, so the error is below one bin width).
- ``entropy``: the TensorRT / onnxruntime KL-divergence search (Migacz, "8-bit Inference with TensorRT",
  GTC 2017). For a candidate window of ``i`` histogram bins, P is the histogram inside the window with the
  mass outside it added to the end bins (what clipping does), and Q is the in-window histogram merged into
  ``num_levels`` equal groups, each group's count spread evenly over its non-empty bins (what quantizing to
  ``num_levels`` bins keeps). The window minimizing KL(P || Q) = sum P log(P / Q) wins. Symmetric: on the
  histogram of |x|, windows [0, t] for t from ``num_levels`` bins up to max |x| (``num_levels=128`` for int8,
  the 128 magnitudes of the int8 grid); asymmetric: windows [a, b] that contain 0 (``num_levels=256`` for
  uint8), searched by coordinate descent (b with a fixed, then a with b fixed, until neither moves).
- ``mse``: the window minimizing the expected squared quantization error E[(x - q(x))^2] of a uniform grid of
  ``num_levels`` levels over the window (step = (b - a) / (num_levels - 1); values beyond the window clip to
  its ends). The expectation is taken over the histogram with the density uniform inside each bin, which has a
  closed form: with u = (x - a) / step and v = u - round(u), the integral of (u - round(u))^2 is
  G(u) = round(u) / 12 + (v^3 + 1/8) / 3, so a bin [l, r] inside the window contributes
  step^3 (G(u_r) - G(u_l)) / (r - l) per value, and a clipped bin ((r - b)^3 - (l - b)^3) / (3 (r - l)).
  Symmetric windows are [0, t] on |x| (levels 0, t/(n-1), ..., t: with n = 128 that is the int8 symmetric step
  t/127); asymmetric windows [a, b] contain 0 (n = 256: the uint8 step (b - a)/255). The grid of the real
  quantizer (zero point rounded to an integer) is not modelled.

Asymmetric ranges from ``minmax`` and ``percentile`` need not contain 0; :func:`scale_zero_point` widens every
range to include 0 so that 0.0 (padding, ReLU zeros) is exactly representable.

Non-finite values (NaN, +-inf) are skipped and counted in ``observer.nonfinite`` for the caller to report.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from graphopt.errors import GraphoptError

__all__ = [
    "METHODS", "HistogramObserver", "MinMaxObserver", "Observer", "ObserverError", "QuantParams",
    "compute_range", "dequantize", "make_observer", "quant_range", "quantize", "scale_zero_point",
]

METHODS = ("minmax", "percentile", "entropy", "mse")
_CHUNK = 1 << 20  # values binned at a time: bounds the temporaries of one update to a few MB
_EXP_MIN = -64  # finest bin width, 2**-64 (only reached by constant or nearly constant tensors)
_EXACT = 1 << 52  # bin indices stay below this, so float64 holds them exactly


class ObserverError(GraphoptError):
    """An observer cannot give a range: no data seen, an unknown method, or an invalid argument."""


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
    of bins kept (memory: ``8 * bins`` bytes); see the module docstring for how re-binning stays exact and for
    the range methods. ``merge(other)`` adds another observer's histogram (e.g. from a parallel worker).
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
            span = hi - lo
            start = _EXP_MIN if span <= 0 else max(_EXP_MIN, math.floor(math.log2(span / self.bins)) - 1)
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
    """The (low, high) range to quantize the observed tensor with; methods in the module docstring.

    ``symmetric`` gives (-t, t). ``num_levels`` (entropy, mse) is the number of quantization levels across the
    searched window: 128 for int8 symmetric (the window is [0, t] on |x|), 256 for uint8 asymmetric (the window
    contains 0); the default follows ``symmetric``. ``percentile`` is in (0, 100]. Asymmetric ``minmax`` and
    ``percentile`` ranges may exclude 0 (``scale_zero_point`` widens them).
    """
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


def _quantile(hist: np.ndarray, lo: int, exp: int, q: float) -> float:
    """The q-quantile of a histogram whose bin j is [(lo + j) 2**exp, (lo + j + 1) 2**exp), uniform inside bins."""
    cum = np.cumsum(hist)
    target = q * cum[-1]
    j = min(int(np.searchsorted(cum, target, side="left")), hist.size - 1)
    before = cum[j - 1] if j else 0.0
    frac = (target - before) / hist[j] if hist[j] else 1.0
    return math.ldexp(lo + j + min(max(frac, 0.0), 1.0), exp)


def _search(hist: np.ndarray, zero: int, levels: int, objective) -> tuple[int, int]:
    """Bin edges [start, end) minimizing ``objective(hist, starts, ends, levels)`` with start <= zero <= end.

    When 0 is inside the histogram, the search starts from the best window centred on 0; then every ``end``
    with end - start >= levels is tried at once, then every ``start`` likewise, until neither moves (a single
    round when 0 is an end of the histogram: symmetric on |x|, or one-signed data).
    """
    n = hist.size
    start, end = 0, n
    if n <= levels:
        return start, end
    if 0 < zero < n:  # two-sided: start from the best window centred on 0, so the descent starts near the optimum
        half = np.arange((levels + 1) // 2, max(zero, n - zero) + 1)
        lo, hi = np.maximum(zero - half, 0), np.minimum(zero + half, n)
        keep = hi - lo >= levels
        if keep.any():
            lo, hi = lo[keep], hi[keep]
            best = int(np.argmin(objective(hist, lo, hi, levels)))
            start, end = int(lo[best]), int(hi[best])
    for _ in range(8):
        ends = np.arange(max(zero, start + levels), n + 1)
        if ends.size:
            end = int(ends[np.argmin(objective(hist, np.full_like(ends, start), ends, levels))])
        starts = np.arange(0, min(zero, end - levels) + 1)
        new_start = start
        if starts.size:
            new_start = int(starts[np.argmin(objective(hist, starts, np.full_like(starts, end), levels))])
        if new_start == start:
            break
        start = new_start
    return start, end


def _hlogh(h: np.ndarray) -> np.ndarray:
    return h * np.log(np.where(h > 0, h, 1.0))


def _kl_divergences(hist: np.ndarray, starts: np.ndarray, ends: np.ndarray, levels: int) -> np.ndarray:
    """KL(P || Q) of each window of bins [starts[i], ends[i]) (module docstring), from prefix sums.

    The window's m bins are split into ``levels`` groups at s + floor(k m / levels) (TensorRT and onnxruntime
    give the last group the remainder of m // levels instead; equal shares distort less). With S_g the group's
    in-window count, F_g its bins where P > 0 and P_g its P mass, Q is S_g / F_g on those bins, so
    sum P log Q = sum_g P_g log(S_g / F_g), and KL = T / Ptot - log Ptot - sum_g P_g (log(S_g / F_g) - log Qtot)
    / Ptot with T = sum P log P. A group whose only mass is clipped outliers (S_g = 0 < P_g) gets Q = 1e-12.
    """
    h = hist.astype(np.float64)
    c0 = np.concatenate(([0.0], np.cumsum(h)))
    c1 = np.concatenate(([0.0], np.cumsum(_hlogh(h))))
    nz = np.concatenate(([0], np.cumsum(h > 0)))
    total = c0[-1]
    s, e = starts.astype(np.int64), ends.astype(np.int64)
    m = e - s
    left, right = c0[s], total - c0[e]
    bounds = s[:, None] + (np.arange(levels + 1)[None, :] * m[:, None]) // levels  # (C, levels + 1)
    sums = np.diff(c0[bounds], axis=1)
    filled = np.diff(nz[bounds], axis=1).astype(np.float64)
    mass = sums.copy()
    h_first, h_last = h[s], h[e - 1]
    filled[:, 0] += (h_first == 0) & (left > 0)
    filled[:, -1] += (h_last == 0) & (right > 0)
    mass[:, 0] += left
    mass[:, -1] += right
    t = (c1[e] - c1[s] - _hlogh(h_first) + _hlogh(h_first + left) - _hlogh(h_last) + _hlogh(h_last + right))
    q_total = c0[e] - c0[s]
    ok = (sums > 0) & (filled > 0)
    log_q = np.where(ok, np.log(np.where(ok, sums, 1.0) / np.where(ok, filled, 1.0))
                     - np.log(np.maximum(q_total, 1e-300))[:, None], math.log(1e-12))
    cross = np.sum(np.where(mass > 0, mass * log_q, 0.0), axis=1)
    kl = (t - cross) / total - math.log(total)
    return np.where(q_total > 0, kl, np.inf)


def _g(u: np.ndarray) -> np.ndarray:
    """Antiderivative of (u - round(u))^2: round(u)/12 + (v^3 + 1/8)/3 with v = u - round(u)."""
    r = np.floor(u + 0.5)
    v = u - r
    return r / 12.0 + (v * v * v + 0.125) / 3.0


def _expected_sq_errors(hist: np.ndarray, starts: np.ndarray, ends: np.ndarray, levels: int) -> np.ndarray:
    """E[(x - q(x))^2] (in bin widths squared) of each window of edges [starts[i], ends[i]], ``levels`` levels.

    Bin j is [j, j + 1) in bin-width units. A bin clipped to the edge a contributes, per value,
    the integral of (a - x)^2 over the bin: d^2 - d + 1/3 with d its far end's distance to a; summed over all
    clipped bins from prefix sums of c, c j and c j^2. Bins inside contribute step^3 (G(u_r) - G(u_l)).
    """
    h = hist.astype(np.float64)
    total = h.sum()
    j = np.arange(h.size, dtype=np.float64)
    p0 = np.concatenate(([0.0], np.cumsum(h)))
    p1 = np.concatenate(([0.0], np.cumsum(h * j)))
    p2 = np.concatenate(([0.0], np.cumsum(h * j * j)))
    a, b = starts.astype(np.int64), ends.astype(np.int64)
    af, bf = a.astype(np.float64), b.astype(np.float64) - 1.0
    below = p0[a] * (af * af - af + 1.0 / 3.0) - p1[a] * (2.0 * af - 1.0) + p2[a]
    t0, t1, t2 = p0[-1] - p0[b], p1[-1] - p1[b], p2[-1] - p2[b]
    above = t2 - t1 * (2.0 * bf + 1.0) + t0 * (bf * bf + bf + 1.0 / 3.0)
    nz = np.flatnonzero(h)
    counts, pos = h[nz], nz.astype(np.float64)[None, :]
    inside = np.empty(a.size)
    block = max(1, (1 << 18) // max(nz.size, 1))  # bounds the (windows x bins) temporaries to ~2 MB each
    for i in range(0, a.size, block):
        lo, hi = af[i:i + block, None], b[i:i + block, None].astype(np.float64)
        step = (hi - lo) / (levels - 1)
        u = (pos - lo) / step
        err = (_g(u + 1.0 / step) - _g(u)) * step ** 3
        err *= (pos >= lo) & (pos < hi)
        inside[i:i + block] = err @ counts
    return (below + above + inside) / total


# -- scale and zero point --------------------------------------------------------------------------------------
class QuantParams(NamedTuple):
    """``scale`` is exactly a float32 value; ``zero_point`` an integer of the quantized type's range."""

    scale: float
    zero_point: int


_QRANGE = {"uint8": (0, 255), "int8": (-128, 127)}


def quant_range(dtype: str, symmetric: bool = False) -> tuple[int, int]:
    """The integer range used: uint8 [0, 255], int8 [-128, 127]; symmetric int8 is restricted to [-127, 127]
    (so that the grid is symmetric about 0, as TensorRT and onnxruntime's symmetric mode use it)."""
    if dtype not in _QRANGE:
        raise ObserverError(f"quantized dtype must be 'uint8' or 'int8', got {dtype!r}")
    qmin, qmax = _QRANGE[dtype]
    return (-127, 127) if symmetric and dtype == "int8" else (qmin, qmax)


def scale_zero_point(low: float, high: float, dtype: str = "uint8", symmetric: bool = False) -> QuantParams:
    """(scale, zero_point) for ONNX QuantizeLinear, ``y = saturate(round_half_even(x / scale) + zero_point)``.

    The range is first widened to contain 0. Asymmetric: ``scale = (high - low) / (qmax - qmin)`` and
    ``zero_point = round(qmin - low / scale)``, an integer in [qmin, qmax], so 0.0 quantizes to ``zero_point``
    and back to exactly 0.0. Symmetric: ``m = max(|low|, |high|)``, ``scale = m / 127``, ``zero_point`` 0 for
    int8 (grid -127..127) and 128 for uint8 (grid 1..255). The scale is rounded *up* to float32, so every value
    of [low, high] dequantizes within scale/2 of itself. A zero-width range gets scale 1.0.
    """
    qmin, qmax = quant_range(dtype, symmetric)
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ObserverError(f"cannot quantize a non-finite range [{low}, {high}]")
    if low > high:
        raise ObserverError(f"range low {low} is above high {high}")
    low, high = min(low, 0.0), max(high, 0.0)
    if symmetric:
        m = max(-low, high)
        return QuantParams(_f32_up(m / 127.0) if m > 0 else 1.0, 0 if dtype == "int8" else 128)
    if high == low:
        return QuantParams(1.0, 0 if dtype == "uint8" else 0)
    scale = _f32_up((high - low) / (qmax - qmin))
    zero_point = int(np.clip(np.round(qmin - low / scale), qmin, qmax))
    return QuantParams(scale, zero_point)


def _f32_up(x: float) -> float:
    """The smallest float32 >= x (and >= the smallest normal float32)."""
    tiny = float(np.finfo(np.float32).tiny)
    f = np.float32(max(x, tiny))
    if float(f) < x:
        f = np.nextafter(f, np.float32(np.inf))
    return float(f)


def quantize(x, scale: float, zero_point: int, dtype: str = "uint8") -> np.ndarray:
    """Reference ONNX QuantizeLinear (per tensor): round half to even, then saturate."""
    qmin, qmax = _QRANGE[dtype]
    q = np.round(np.asarray(x, dtype=np.float64) / scale) + zero_point
    return np.clip(q, qmin, qmax).astype(dtype)


def dequantize(q, scale: float, zero_point: int) -> np.ndarray:
    """Reference ONNX DequantizeLinear (per tensor), in float64: ``(q - zero_point) * scale``."""
    return (np.asarray(q, dtype=np.float64) - zero_point) * scale

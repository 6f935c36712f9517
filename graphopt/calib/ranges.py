"""The range searches behind :func:`~graphopt.calib.observers.compute_range`, on a plain histogram (counts per
bin, in bin-width units): quantiles, and the window minimizing the KL divergence or the squared error.

The methods (``compute_range(observer, method)``, or ``observer.range(method)``), all per tensor:

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
"""

from __future__ import annotations

import math

import numpy as np


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

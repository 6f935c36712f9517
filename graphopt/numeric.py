"""How far one set of outputs is from another: the one home of graphopt's output metrics (numpy only).

Definitions (``ref`` is the reference tensor, ``x`` the other, both as float64):

- max relative error = max |x - ref| / max |ref| over the finite elements (a relative error that ignores the
  noise of near-zero elements), the measure the numeric check holds exact passes to;
- SQNR (dB) = 10 log10(sum(ref^2) / sum((x - ref)^2)); +inf when the two are equal;
- cosine = <ref, x> / (|ref| |x|) over the flattened tensors (1 when both are zero, 0 when one is).

NaN and infinities are compared, not skipped: a NaN where the reference has a NaN, or the same infinity where
it has that infinity, is equal; any other non-finite element on either side is a mismatch, and makes the error
infinite (``max()`` over errors that contain a NaN would otherwise quietly say 0). The finite elements are
measured as above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Difference:
    """One output against its reference."""

    max_rel_err: float
    sqnr_db: float
    cosine: float
    nonfinite_mismatches: int = 0  # elements non-finite on one side and not the same on the other
    shape_mismatch: str = ""  # why the two cannot be compared element-wise ("" when they can)

    @property
    def comparable(self) -> bool:
        return not self.shape_mismatch

    def describe(self) -> str:
        if self.shape_mismatch:
            return self.shape_mismatch
        text = f"max rel. error {self.max_rel_err:.2e}, SQNR {fmt_db(self.sqnr_db)} dB, cosine {self.cosine:.6f}"
        if self.nonfinite_mismatches:
            text += f", {self.nonfinite_mismatches} NaN/Inf element(s) the reference does not have"
        return text


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def difference(reference, test) -> Difference:
    """:class:`Difference` of ``test`` against ``reference`` (integer and bool outputs: equal or not)."""
    r, x = np.asarray(reference), np.asarray(test)
    if r.shape != x.shape:
        return Difference(math.inf, -math.inf, 0.0, 0, f"shape {tuple(x.shape)} instead of {tuple(r.shape)}")
    if r.dtype.kind not in "fc" and x.dtype.kind not in "fc":
        same = bool(np.array_equal(r, x))
        return Difference(0.0 if same else math.inf, math.inf if same else -math.inf, 1.0 if same else 0.0,
                          0 if same else int(np.sum(r != x)))
    r64, x64 = _f64(r), _f64(x)
    finite_r, finite_x = np.isfinite(r64), np.isfinite(x64)
    both = finite_r & finite_x
    same_nonfinite = ~finite_r & ~finite_x & ((np.isnan(r64) & np.isnan(x64)) | (r64 == x64))
    mismatches = int(np.sum(~both & ~same_nonfinite))
    rf, xf = r64[both], x64[both]
    signal, noise = float(np.sum(rf * rf)), float(np.sum((xf - rf) ** 2))
    if rf.size:
        err = float(np.max(np.abs(xf - rf)))
        rel = err / max(float(np.max(np.abs(rf))), 1e-12) if err else 0.0
    else:
        rel = 0.0
    if mismatches:
        return Difference(math.inf, -math.inf, _cosine(float(rf @ xf), signal, float(xf @ xf)), mismatches)
    return Difference(rel, sqnr(signal, noise), _cosine(float(rf @ xf), signal, float(xf @ xf)))


def max_difference(reference: list, test: list) -> Difference:
    """The worst of the outputs' differences: highest error, lowest SQNR and cosine, every mismatch counted."""
    if len(reference) != len(test):
        return Difference(math.inf, -math.inf, 0.0, 0, f"{len(test)} outputs instead of {len(reference)}")
    diffs = [difference(r, x) for r, x in zip(reference, test)]
    broken = [d for d in diffs if not d.comparable]
    if broken:
        return broken[0]
    if not diffs:
        return Difference(0.0, math.inf, 1.0)
    return Difference(max(d.max_rel_err for d in diffs), min(d.sqnr_db for d in diffs), min(d.cosine for d in diffs),
                      sum(d.nonfinite_mismatches for d in diffs))


def relative_error(reference: list, test: list) -> float:
    """The worst max relative error over all outputs; inf when shapes, counts or NaN/Inf positions differ."""
    return max_difference(reference, test).max_rel_err


def sqnr(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _cosine(dot: float, aa: float, bb: float) -> float:
    if aa == 0.0 and bb == 0.0:
        return 1.0
    if aa == 0.0 or bb == 0.0:
        return 0.0
    return dot / math.sqrt(aa * bb)


def fmt_db(value: float) -> str:
    return "inf" if value == math.inf else ("-inf" if value == -math.inf else f"{value:.2f}")

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

:func:`difference` compares two outputs as the numeric check does (integer outputs: equal or not);
:func:`sqnr_db`, :func:`cosine_similarity` and :func:`max_rel_error` measure any two arrays of one shape as
numbers. :func:`sqnr` and :func:`cosine` give the same measures from running sums, for callers that accumulate
over batches. Top-1: the argmax over the class axis (the last), against another model's or the labels.
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
    rel = rel_error(float(np.max(np.abs(xf - rf))), float(np.max(np.abs(rf)))) if rf.size else 0.0
    if mismatches:  # NaN/inf where the reference has numbers: no agreement to credit (not the finite rest's cosine)
        return Difference(math.inf, -math.inf, 0.0, mismatches)
    return Difference(rel, sqnr(signal, noise), cosine(float(rf @ xf), signal, float(xf @ xf)))


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


def _check_shapes(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")


def _as_numbers(reference, test) -> Difference:
    r, x = _f64(reference), _f64(test)
    _check_shapes(r, x)
    return difference(r, x)


def sqnr_db(reference, test) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference``, in dB (+inf if identical)."""
    return _as_numbers(reference, test).sqnr_db


def cosine_similarity(reference, test) -> float:
    """<ref, x> / (|ref| |x|) over the flattened arrays (1 when both are zero, 0 when one is)."""
    return _as_numbers(reference, test).cosine


def max_rel_error(reference, test) -> float:
    """max |test - reference| / max |reference| (0 for two empty or all-zero equal arrays)."""
    return _as_numbers(reference, test).max_rel_err


def rel_error(max_abs_err: float, max_abs_ref: float) -> float:
    """The max relative error from its two running maxima (the 1e-12 floor keeps an all-zero reference finite)."""
    return max_abs_err / max(max_abs_ref, 1e-12) if max_abs_err else 0.0


def top1(logits, axis: int = -1) -> np.ndarray:
    """The argmax over ``axis``; -1 (no class) for a sample whose logits hold NaN (numpy's argmax would pick the
    NaN's index, and credit it when that happens to be the label)."""
    logits = np.asarray(logits)
    pred = np.argmax(logits, axis=axis)
    if logits.dtype.kind in "fc":
        pred = np.where(np.isnan(logits).any(axis=axis), -1, pred)
    return pred


def top1_agreement(logits_a, logits_b, axis: int = -1) -> float:
    """Fraction of samples on which both models' argmax over ``axis`` (the class axis) agree."""
    a, b = top1(logits_a, axis), top1(logits_b, axis)
    _check_shapes(a, b)
    return float(np.mean((a == b) & (a >= 0))) if a.size else float("nan")  # two NaN rows do not agree


def top1_correct(logits, labels, axis: int = -1) -> int:
    """How many samples' argmax equals the (integer) label."""
    pred = top1(logits, axis)
    labels = np.asarray(labels).reshape(pred.shape) if np.size(labels) == pred.size else np.asarray(labels)
    _check_shapes(pred, labels)
    return int(np.sum(pred == labels.astype(np.int64)))


def top1_accuracy(logits, labels, axis: int = -1) -> float:
    n = np.asarray(labels).shape[0]
    return top1_correct(logits, labels, axis) / n if n else float("nan")


def sqnr(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine(dot: float, aa: float, bb: float) -> float:
    if aa == 0.0 and bb == 0.0:
        return 1.0
    if aa == 0.0 or bb == 0.0:
        return 0.0
    return dot / math.sqrt(aa * bb)


def fmt_ms(value: float) -> str:
    """A time in ms for a message, with the digits that tell two small ones apart (23.4 µs, not 0.023 ms)."""
    return f"{value:.3f} ms" if value >= 1 else f"{value * 1000:.1f} µs"


def fmt_db(value: float) -> str:
    return "inf" if value == math.inf else ("-inf" if value == -math.inf else f"{value:.2f}")

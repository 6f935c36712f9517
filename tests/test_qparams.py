"""One rule from a range to (scale, zero point): calibration's scale_zero_point and the scheme's TensorQuant.params
(place-qdq, int8-dynamic) give the same numbers on the same grid, and on every grid graphopt uses the rule keeps
each value of the range within scale/2, 0.0 exact, symmetric int8 in [-127, 127] and reduce_range in [-64, 64]."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.backends import TensorQuant
from graphopt.calib import dequantize, quantize, scale_zero_point

GRIDS = [  # every TensorQuant form a scheme of graphopt's uses or accepts
    TensorQuant("uint8", symmetric=False),
    TensorQuant("int8", symmetric=False),
    TensorQuant("int8", symmetric=True),
    TensorQuant("int8", symmetric=True, narrow_range=True),
    TensorQuant("int8", symmetric=True, narrow_range=True, reduce_range=True),
    TensorQuant("uint8", symmetric=True),
    TensorQuant("uint8", symmetric=False, reduce_range=True),
]

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


def _range(a: float, b: float) -> tuple[float, float]:
    return min(a, b), max(a, b)


@settings(max_examples=100, deadline=None)
@given(a=finite, b=finite, tq=st.sampled_from(GRIDS))
def test_every_value_of_the_range_is_on_the_grid(a, b, tq):
    low, high = _range(a, b)
    scale, zero = tq.params(low, high)
    assert scale.dtype == np.float32 and float(scale) > 0 and zero.dtype == tq.np_dtype
    lo, hi = min(low, 0.0), max(high, 0.0)  # the range is widened to contain 0
    if tq.symmetric:
        lo, hi = -max(-lo, hi), max(-lo, hi)
    x = np.linspace(lo, hi, 2001)
    q = tq.quantize(x, scale, zero)
    assert q.dtype == tq.np_dtype and q.min() >= tq.qmin and q.max() <= tq.qmax
    err = np.abs(dequantize(q, float(scale), int(zero)) - x)
    assert err.max() <= float(scale) / 2 * (1 + 1e-6) + 1e-30
    assert dequantize(tq.quantize(0.0, scale, zero), float(scale), int(zero)) == 0.0  # zero exactly representable


@settings(max_examples=100, deadline=None)
@given(a=finite, b=finite, dtype=st.sampled_from(["uint8", "int8"]), symmetric=st.booleans())
def test_calibration_and_the_scheme_give_the_same_numbers(a, b, dtype, symmetric):
    low, high = _range(a, b)
    tq = TensorQuant(dtype, symmetric, narrow_range=symmetric and dtype == "int8")
    scale, zero = tq.params(low, high)
    assert scale_zero_point(low, high, dtype, symmetric) == (float(scale), int(zero))
    x = np.linspace(low, high, 257)
    np.testing.assert_array_equal(quantize(x, float(scale), int(zero), dtype), tq.quantize(x, scale, zero))


def test_symmetric_int8_never_uses_minus_128():
    """Full range or narrow, symmetric int8 has 127 steps each side: -max|w| is -127, never -128."""
    for tq in (TensorQuant("int8", symmetric=True), TensorQuant("int8", symmetric=True, narrow_range=True)):
        scale, zero = tq.params(-2.0, 1.0)
        assert int(zero) == 0 and float(scale) >= 2.0 / 127 > float(np.nextafter(scale, np.float32(0)))
        q = tq.quantize(np.array([-2.0, 2.0]), scale, zero)
        assert q.tolist() == [-127, 127]


def test_reduce_range_weights_fit_minus_64_to_64_per_channel():
    tq = TensorQuant("int8", symmetric=True, per_channel=True, narrow_range=True, reduce_range=True)
    w = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32) * np.arange(1, 9)[:, None, None, None]
    scale, zero = tq.params(w.min(axis=(1, 2, 3)), w.max(axis=(1, 2, 3)))
    amax = np.abs(w).max(axis=(1, 2, 3))
    assert np.all(scale >= amax / 64) and np.all(scale <= np.nextafter((amax / 64).astype(np.float32), np.inf))
    q = tq.quantize(w, scale, zero, axis=0)
    assert q.min() >= -64 and q.max() <= 64 and set(np.abs(q).max(axis=(1, 2, 3)).tolist()) == {64}
    for c in range(8):  # per channel is per tensor, channel by channel
        s, z = tq.params(w[c].min(), w[c].max())
        assert (float(s), int(z)) == (float(scale[c]), int(zero[c]))
    with pytest.raises(ValueError, match="dtype"):
        TensorQuant("int4", symmetric=True)

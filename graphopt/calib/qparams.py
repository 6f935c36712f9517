"""From a range to quantization parameters: the one rule graphopt quantizes with (:func:`affine_params`; its
callers: observers and calibrate through :func:`scale_zero_point`, place-qdq and int8-dynamic through
``TensorQuant.params``), and the reference ONNX :func:`quantize` / :func:`dequantize`.

Asymmetric ranges from ``minmax`` and ``percentile`` need not contain 0; every range is widened to include 0 so
that 0.0 (padding, ReLU zeros) is exactly representable.

Besides the integer grids (uint8, int8), ``float8e4m3fn`` (ONNX's FLOAT8E4M3FN, opset 19+; numpy's
``ml_dtypes.float8_e4m3fn``: 4 exponent bits, 3 mantissa bits, no infinities, largest value 448): the same
symmetric rule gives ``scale = amax / 448`` and zero point 0 (a float8 zero), and :func:`quantize` rounds
``x / scale`` to the nearest float8 value (ties to even) instead of the nearest integer, saturating to ±448 as
QuantizeLinear's default ``saturate=1`` does.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import ml_dtypes
import numpy as np

from graphopt.calib.errors import ObserverError

__all__ = ["FLOAT8_DTYPES", "QuantParams", "affine_params", "dequantize", "is_float8", "np_quant_dtype", "quant_range",
           "quantize", "scale_zero_point"]


class QuantParams(NamedTuple):
    """``scale`` is exactly a float32 value; ``zero_point`` an integer of the quantized type's range."""

    scale: float
    zero_point: int


_QRANGE = {"uint8": (0, 255), "int8": (-128, 127), "float8e4m3fn": (-448, 448)}
_NARROW = {"uint8": (0, 254), "int8": (-127, 127), "float8e4m3fn": (-448, 448)}
FLOAT8_DTYPES = {"float8e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn)}  # quantized dtype name -> numpy dtype
# reduce_range: the widest ranges whose products with a uint8 activation, summed in pairs, fit in an int16
_REDUCED = {"uint8": (0, 127), "int8": (-64, 64)}


def quant_range(dtype: str, symmetric: bool = False, *, narrow: bool = False, reduced: bool = False
                ) -> tuple[int, int]:
    """The integer grid: uint8 [0, 255], int8 [-128, 127]; ``narrow`` (and symmetric int8) [-127, 127] (uint8
    [0, 254]), so that the grid is symmetric about 0, as TensorRT and onnxruntime's symmetric mode use it;
    ``reduced`` int8 [-64, 64] (uint8 [0, 127]), see :func:`affine_params`. float8e4m3fn: [-448, 448], its
    largest finite values (``narrow`` changes nothing; ``reduced`` is an int8 kernel's limit, refused)."""
    if dtype not in _QRANGE:
        raise ObserverError(f"quantized dtype must be one of {', '.join(_QRANGE)}, got {dtype!r}")
    if is_float8(dtype):
        if reduced:
            raise ObserverError(f"reduce_range is an int8 kernel's limit, not a {dtype} grid")
        return _QRANGE[dtype]
    if reduced:
        return _REDUCED[dtype]
    return _NARROW[dtype] if narrow or (symmetric and dtype == "int8") else _QRANGE[dtype]


def is_float8(dtype: str) -> bool:
    """Whether the quantized dtype ``dtype`` is a float8 type (values on a float grid, not integers)."""
    return dtype in FLOAT8_DTYPES


def np_quant_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of a quantized dtype name (``ml_dtypes.float8_e4m3fn`` for float8e4m3fn)."""
    return FLOAT8_DTYPES.get(dtype) or np.dtype(dtype)


def affine_params(lo, hi, qmin: int, qmax: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (int64) quantizing the real range [lo, hi] onto the integers [qmin, qmax]
    for ONNX QuantizeLinear, ``q = saturate(round_half_even(x / scale) + zero_point)``. ``lo`` and ``hi`` are
    finite scalars, or arrays (one range per channel).

    The rule, and why:

    - the range is first widened to contain 0, and the zero point is an integer of [qmin, qmax]: 0.0 quantizes
      to the zero point and back to exactly 0.0 (zero padding, Relu's zeros, masked values stay exact);
    - asymmetric: ``scale = (hi - lo) / (qmax - qmin)``, ``zero_point = round(qmin - lo / scale)``: the whole
      grid spans the range;
    - symmetric: the zero point is the middle of the grid, ``(qmin + qmax + 1) // 2`` (0 for int8, 128 for
      uint8 [0, 255]), and ``scale = max(|lo|, |hi|) / h`` with ``h`` the steps on the shorter side of it
      (``min(qmax - zp, zp - qmin)``). So symmetric int8 uses [-127, 127] (never -128: the grid is symmetric,
      a negated value cannot overflow), what TensorRT and onnxruntime's symmetric weights use; and the reduced
      int8 range [-64, 64] (``reduce_range``, for x86 CPUs without VNNI, whose int16 sums of two uint8 x int8
      products saturate on full-range weights) gets ``scale = max|w| / 64``;
    - the scale is rounded *up* to a float32 (at least the smallest normal float32): every value of the range
      then lands within the grid, and dequantizes within ``scale / 2`` of itself (a scale rounded to the nearest
      float32 could put ``hi`` a hair past ``qmax``);
    - a zero-width range (lo = hi = 0) gets scale 1 (and the zero point the rule gives).
    """
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    if symmetric:
        middle = (qmin + qmax + 1) // 2
        scale = np.maximum(-lo, hi) / min(qmax - middle, middle - qmin)
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = _f32_up(np.where(scale > 0, scale, 1.0))
    if symmetric:
        zero = np.full(np.shape(scale), middle, np.int64)
    else:
        zero = np.clip(np.round(qmin - lo / scale.astype(np.float64)), qmin, qmax).astype(np.int64)
    return scale, zero


def scale_zero_point(low: float, high: float, dtype: str = "uint8", symmetric: bool = False) -> QuantParams:
    """(scale, zero_point) of one tensor for the grid :func:`quant_range` gives, by :func:`affine_params`'s rule;
    a non-finite or inverted range is an :class:`ObserverError`."""
    qmin, qmax = quant_range(dtype, symmetric)
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ObserverError(f"cannot quantize a non-finite range [{low}, {high}]")
    if low > high:
        raise ObserverError(f"range low {low} is above high {high}")
    scale, zero_point = affine_params(low, high, qmin, qmax, symmetric)
    return QuantParams(float(scale), int(zero_point))


def _f32_up(x: np.ndarray) -> np.ndarray:
    """The smallest float32 >= x (and >= the smallest normal float32), elementwise."""
    x = np.maximum(np.asarray(x, np.float64), float(np.finfo(np.float32).tiny))
    f = x.astype(np.float32)
    return np.where(f.astype(np.float64) < x, np.nextafter(f, np.float32(np.inf)), f).astype(np.float32)


def quantize(x, scale, zero_point, dtype: str = "uint8", axis: int | None = None,
             qrange: tuple[int, int] | None = None) -> np.ndarray:
    """Reference ONNX QuantizeLinear: round half to even, then saturate to ``qrange`` (default: the dtype's whole
    range). Per tensor, or per channel along ``axis`` (``scale`` and ``zero_point`` one per channel). For a
    float8 ``dtype``, ``x / scale + zero_point`` is saturated, then rounded to the nearest float8 value (ties to
    even, as ``saturate=1`` QuantizeLinear does); NaN stays NaN."""
    qmin, qmax = qrange if qrange is not None else _QRANGE[dtype]
    x = np.asarray(x, dtype=np.float64)
    float8 = is_float8(dtype)
    scale = np.asarray(scale, np.float64)
    zero_point = np.asarray(zero_point, np.float64 if float8 else np.int64)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    if float8:
        return np.clip(x / scale + zero_point, qmin, qmax).astype(FLOAT8_DTYPES[dtype])
    return np.clip(np.round(x / scale) + zero_point, qmin, qmax).astype(dtype)


def dequantize(q, scale: float, zero_point: int) -> np.ndarray:
    """Reference ONNX DequantizeLinear (per tensor), in float64: ``(q - zero_point) * scale``."""
    return (np.asarray(q, dtype=np.float64) - np.float64(zero_point)) * scale

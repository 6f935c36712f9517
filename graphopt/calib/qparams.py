"""From a range to quantization parameters: :func:`scale_zero_point` for ONNX QuantizeLinear, and the reference
per-tensor :func:`quantize` / :func:`dequantize`.

Asymmetric ranges from ``minmax`` and ``percentile`` need not contain 0; :func:`scale_zero_point` widens every
range to include 0 so that 0.0 (padding, ReLU zeros) is exactly representable.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from graphopt.calib.errors import ObserverError

__all__ = ["QuantParams", "dequantize", "quant_range", "quantize", "scale_zero_point"]


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

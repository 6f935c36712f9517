"""Block-wise 4-bit (and 8-bit) weight quantization as onnxruntime's contrib ops read it: ``MatMulNBits``' packed
weights (by onnxruntime's own quantizer kernels), ``GatherBlockQuantized``'s tables (the same rounding, in numpy),
and GPTQ rounding (Frantar et al., 2022) on the same grid. Numbers only: the int4-weight pass rewrites the graph.

Layout: along the reduced axis, blocks of ``block`` values with one float32 scale each (and, asymmetric, one zero
point); two 4-bit codes a byte, the first in the low nibble (8 bits: one a byte); symmetric blocks use the default
zero point 2^(bits-1), which the ops assume when none is given.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BITS", "DEFAULT_ZERO", "block_params", "codes_of", "gptq", "pack_rows", "quantize_matmul",
           "quantize_table"]

BITS = 4
DEFAULT_ZERO = 1 << (BITS - 1)  # both ops' zero point when none is given: 8


def quantize_matmul(w: np.ndarray, block: int, symmetric: bool, bits: int = BITS):
    """MatMulNBits' B (N, blocks, block·bits/8) uint8, scales (N, blocks) float32 and packed zero points
    (N, ceil(blocks·bits/8)) uint8 (None when symmetric: the default 2^(bits-1) is what the symmetric quantizer
    used), by onnxruntime's own kernels (4 or 8 bits)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits  # MatMulNBitsQuantizer's

    k, n = w.shape
    blocks, per_byte = -(-k // block), 8 // bits
    padded = np.zeros((blocks * block, n), np.float32)
    padded[:k] = w
    packed = np.zeros((n, blocks, block // per_byte), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zeros = np.zeros((n, -(-blocks // per_byte)), np.uint8)
    quantize = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    quantize(packed, padded, scales, zeros, block, n, blocks * block, symmetric)
    return packed, scales, None if symmetric else zeros


def quantize_table(table: np.ndarray, block: int, symmetric: bool):
    """GatherBlockQuantized's uint8 data (V, H/2), scales (V, H/block) and packed zero points (V, ceil(H/block/2))
    (None when symmetric): the same rounding as onnxruntime's MatMulNBits quantizer, along H."""
    v, h = table.shape
    blocks = table.reshape(v, h // block, block).astype(np.float64)
    scales, zero = block_params(blocks, symmetric)
    q = codes_of(blocks, scales, zero).reshape(v, h)
    scales = scales[..., 0].astype(np.float32)
    return pack_rows(q), scales, None if symmetric else pack_rows(zero[..., 0].astype(np.uint8))


def block_params(blocks: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point (float64, keepdims) of each block along the last axis, as onnxruntime's quantizer sets
    them: symmetric, the value of largest magnitude maps to -8 exactly (the rest to [-8, 8], 8 clipped to 7);
    asymmetric, [min(w, 0), max(w, 0)] in 15 steps, so 0 is exact."""
    if symmetric:
        peak = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
        scales = peak / -8
        return scales, np.full(scales.shape, DEFAULT_ZERO, np.float64)
    low, high = np.minimum(blocks.min(-1, keepdims=True), 0), np.maximum(blocks.max(-1, keepdims=True), 0)
    scales = (high - low) / 15
    zero = np.clip(np.round(-low / np.where(scales == 0, 1, scales)), 0, 15)
    return scales, np.where(scales == 0, DEFAULT_ZERO, zero)


def codes_of(values: np.ndarray, scales: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """The 4-bit codes of ``values`` on each block's grid (a zero scale: every value 0, code ``zero``)."""
    return np.clip(np.round(values / np.where(scales == 0, 1, scales)) + zero, 0, 15).astype(np.uint8)


def gptq(w: np.ndarray, h: np.ndarray, block: int, symmetric: bool, damp: float, lazy: int = 128):
    """MatMulNBits' B, scales and zero points (as :func:`quantize_matmul`) for the (K, N) weight ``w``, rounded by
    GPTQ with the input Hessian ``h`` (K, K): rows of W in order, each block's parameters from its rows as
    updated so far, each row's error ``(w - q) / U[k, k]`` subtracted from the later rows along ``U[k]``, for
    ``U`` the upper Cholesky factor of ``(H + damp·mean(diag H)·I)⁻¹``; updates inside ``lazy`` rows at a time,
    the rest in one product per batch (the paper's lazy batch). An input the calibration data never made nonzero
    (diag 0) gets a unit diagonal: its weights are rounded to nearest, not zeroed as the paper's code does (the
    input may be nonzero later)."""
    k, n = w.shape
    blocks = -(-k // block)
    kp = blocks * block
    rows, hess = np.zeros((kp, n)), np.eye(kp)
    rows[:k], hess[:k, :k] = w, h
    dead = np.diag(hess) == 0
    hess[dead, dead] = 1.0
    hess[np.diag_indices(kp)] += damp * np.mean(np.diag(hess))
    upper = np.linalg.cholesky(np.linalg.inv(hess)).T
    codes = np.zeros((kp, n), np.uint8)
    scales, zero = np.zeros((blocks, n)), np.zeros((blocks, n))
    lazy = max(block, lazy // block * block)
    for start in range(0, kp, lazy):
        end = min(start + lazy, kp)
        batch, errors = rows[start:end].copy(), np.zeros((end - start, n))
        for i in range(end - start):
            row = start + i
            if row % block == 0:
                s, z = block_params(batch[i:i + block].T, symmetric)
                scales[row // block], zero[row // block] = s[:, 0].astype(np.float32), z[:, 0]  # as stored
            s, z = scales[row // block], zero[row // block]
            codes[row] = codes_of(batch[i], s, z)
            errors[i] = (batch[i] - (codes[row] - z) * s) / upper[row, row]
            batch[i + 1:] -= np.outer(upper[row, row + 1:end], errors[i])
        rows[end:] -= upper[start:end, end:].T @ errors
    packed = pack_rows(codes.T.reshape(n, blocks, block))
    return packed, scales.T.astype(np.float32), None if symmetric else pack_rows(zero.T.astype(np.uint8))


def pack_rows(q: np.ndarray) -> np.ndarray:
    """Two 4-bit values a byte along the last axis, the first in the low nibble (odd widths padded with 0)."""
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], -1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)

"""Built-in importance criteria: ``criterion(array, axis, role, grad) -> score per index along axis | None``.

``role`` says what the constant is to the op that reads it: ``weight`` (Conv/Gemm/MatMul weights, embedding
tables), ``norm_scale`` (BatchNorm/LayerNorm gamma), ``bias``, ``stat`` (running statistics) or ``elementwise``
(a per-channel constant of an Add/Mul). A criterion returns None for slices it does not read; a class's score is
the mean over the slices that scored it (see :func:`graphopt.prune.plan.score_classes`). A criterion that reads
``grad`` sets ``needs_gradients = True`` on itself.
"""

from __future__ import annotations

import numpy as np

WEIGHTS = ("weight", "norm_scale")


def _per_index(values: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(np.asarray(values, dtype=np.float64), axis, 0).reshape(values.shape[axis], -1)


def l1(array, axis, role, grad=None):
    """Sum of |w| over everything a channel owns (Torch-Pruning's MagnitudeImportance(p=1))."""
    return np.abs(_per_index(array, axis)).sum(axis=1) if role in WEIGHTS else None


def l2(array, axis, role, grad=None):
    """Sum of w² over everything a channel owns (Torch-Pruning's MagnitudeImportance(p=2))."""
    return np.square(_per_index(array, axis)).sum(axis=1) if role in WEIGHTS else None


def bn_scale(array, axis, role, grad=None):
    """|gamma| of the BatchNorm/LayerNorm after the channel (network slimming); groups without one use l1."""
    return np.abs(_per_index(array, axis)).sum(axis=1) if role == "norm_scale" else None


def taylor(array, axis, role, grad=None):
    """First-order Taylor |w · ∂L/∂w| summed per channel; needs gradients (FX graph with calibration data)."""
    if grad is None or role not in (*WEIGHTS, "bias"):
        return None
    return np.abs(_per_index(array, axis) * _per_index(grad, axis)).sum(axis=1)


taylor.needs_gradients = True  # the pass computes gradients (or refuses) for criteria marked so

BUILTIN = {"l1": l1, "l2": l2, "bn-scale": bn_scale, "taylor": taylor}

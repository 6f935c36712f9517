"""graphopt's quantization parameters as PT2E observer and fake-quantize modules.

torchao's ``prepare_pt2e`` puts one of these on every tensor the quantizer annotates; ``convert_pt2e`` asks each
for ``calculate_qparams()`` and writes the Q/DQ pair. They compute scales and zero points with graphopt's one rule
(:func:`graphopt.calib.qparams.affine_params`), the rule the ONNX route's place-qdq uses:

- :class:`RangeObserver` — an activation whose range graphopt's own streaming observers and calibration method
  already computed (``calibrate``); it observes nothing itself.
- :class:`PerChannelWeightObserver` — a weight: its per-output-channel minimum and maximum, read on the forward
  pass (per tensor when the scheme says so).
- :class:`FakeQuant` — quantization-aware training: ``x -> dequantize(quantize(x))`` in the forward pass and the
  straight-through estimator in the backward pass (the gradient passes where ``x`` is inside the range, zero
  outside; torch's ``fake_quantize_per_*_affine``). Activations start from their calibrated range and keep it
  (fixed scales); weights track their per-channel range until observers are frozen. ``learn=True`` makes the
  scales trainable parameters, as in LSQ (Esser et al., 2020): the gradient of the loss reaches the scale
  through ``torch._fake_quantize_learnable_per_*_affine``, scaled by ``1 / sqrt(numel * qmax)``.

The class names matter to torchao: ``prepare_pt2e`` hands ``ch_axis`` only to classes named ``PerChannel...``;
:class:`FakeQuant` takes it as an option of its own.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from graphopt.calib.qparams import affine_params
from graphopt.pt2e.torchao import pt2e

_ao = pt2e()
_SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)
_PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine)


def _params(lo, hi, quant_min: int, quant_max: int, qscheme) -> tuple[torch.Tensor, torch.Tensor]:
    scale, zero = affine_params(np.asarray(lo, np.float64), np.asarray(hi, np.float64), quant_min, quant_max,
                                qscheme in _SYMMETRIC)
    return torch.as_tensor(np.asarray(scale, np.float32)), torch.as_tensor(np.asarray(zero, np.int64)).to(torch.int32)


class RangeObserver(_ao.ObserverBase):
    """An activation's parameters from a range set with :meth:`set_range` (graphopt's calibration)."""

    def __init__(self, dtype=torch.uint8, quant_min: int = 0, quant_max: int = 255,
                 qscheme=torch.per_tensor_affine, is_dynamic: bool = False, **_):
        super().__init__(dtype, is_dynamic)
        self.quant_min, self.quant_max, self.qscheme = quant_min, quant_max, qscheme
        self.register_buffer("lo", torch.tensor(float("nan")))
        self.register_buffer("hi", torch.tensor(float("nan")))

    def set_range(self, lo: float, hi: float) -> None:
        self.lo.fill_(float(lo))
        self.hi.fill_(float(hi))

    @property
    def has_range(self) -> bool:
        return bool(torch.isfinite(self.lo) and torch.isfinite(self.hi))

    def forward(self, x):
        return x

    def calculate_qparams(self):
        if not self.has_range:
            raise RuntimeError("RangeObserver: no range was set")  # the quantizer sets every one it creates
        return _params(self.lo.item(), self.hi.item(), self.quant_min, self.quant_max, self.qscheme)


class PerChannelWeightObserver(_ao.ObserverBase):
    """A weight's range: per output channel (``ch_axis``) for per-channel schemes, else the whole tensor."""

    def __init__(self, dtype=torch.int8, quant_min: int = -127, quant_max: int = 127,
                 qscheme=torch.per_channel_symmetric, ch_axis: int = 0, is_dynamic: bool = False, **_):
        super().__init__(dtype, is_dynamic)
        self.quant_min, self.quant_max, self.qscheme, self.ch_axis = quant_min, quant_max, qscheme, ch_axis
        self.register_buffer("lo", torch.empty(0))
        self.register_buffer("hi", torch.empty(0))

    def forward(self, w):
        lo, hi = _weight_range(w.detach(), self.qscheme, self.ch_axis)
        self.lo, self.hi = lo, hi
        return w

    def calculate_qparams(self):
        if self.lo.numel() == 0:
            raise RuntimeError("PerChannelWeightObserver: the weight was never seen")
        return _params(self.lo.numpy(), self.hi.numpy(), self.quant_min, self.quant_max, self.qscheme)


def _weight_range(w: torch.Tensor, qscheme, ch_axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    if qscheme not in _PER_CHANNEL:
        return w.min().reshape(()), w.max().reshape(())
    flat = w.transpose(0, ch_axis).reshape(w.shape[ch_axis], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


class FakeQuant(_ao.FakeQuantizeBase):
    """Fake quantization for QAT (see the module docstring). ``observe``: the range follows the tensor (weights,
    until frozen: :meth:`disable_observer`); otherwise it stays as :meth:`set_range` set it, or — for a tensor no
    calibration saw — as the first training batch showed it. ``learn``: scales are trainable (LSQ)."""

    def __init__(self, dtype=torch.uint8, quant_min: int = 0, quant_max: int = 255,
                 qscheme=torch.per_tensor_affine, is_dynamic: bool = False, ch_axis: int = 0,
                 observe: bool = False, learn: bool = False, **_):
        super().__init__()
        self.dtype, self.is_dynamic = dtype, is_dynamic
        self.quant_min, self.quant_max, self.qscheme, self.ch_axis = quant_min, quant_max, qscheme, ch_axis
        self.observe, self.learn = observe, learn
        self.scale = torch.nn.Parameter(torch.ones(1), requires_grad=learn)
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def per_channel(self) -> bool:
        return self.qscheme in _PER_CHANNEL

    def set_range(self, lo, hi) -> None:
        scale, zero = _params(lo, hi, self.quant_min, self.quant_max, self.qscheme)
        with torch.no_grad():
            self.scale.data = scale.reshape(-1).clone()
            self.zero_point = zero.reshape(-1).clone()
        self.initialized.fill_(True)

    def forward(self, x):
        learned = self.learn and bool(self.initialized)  # a learned scale is the optimizer's: observing would undo it
        if self.observer_enabled[0] and not learned and (self.observe or not bool(self.initialized)):
            x_ = x.detach()
            if self.learn and self.observe:  # a weight's LSQ scale starts at 2 mean|w| / sqrt(qmax) (Esser et al.)
                self._lsq_init(x_)
            else:
                lo, hi = _weight_range(x_, self.qscheme, self.ch_axis) if self.per_channel else (x_.min(), x_.max())
                self.set_range(lo.cpu().numpy(), hi.cpu().numpy())
        if not self.fake_quant_enabled[0]:
            return x
        zero = self.zero_point
        if self.learn:
            grad = 1.0 / math.sqrt(max(x.numel() // max(self.scale.numel(), 1), 1) * self.quant_max)
            if self.per_channel:
                return torch._fake_quantize_learnable_per_channel_affine(
                    x, self.scale, zero.float(), self.ch_axis, self.quant_min, self.quant_max, grad)
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, self.scale, zero.float(), self.quant_min, self.quant_max, grad)
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(x, self.scale.detach(), zero, self.ch_axis,
                                                          self.quant_min, self.quant_max)
        return torch.fake_quantize_per_tensor_affine(x, self.scale.detach(), zero, self.quant_min, self.quant_max)

    def _lsq_init(self, w: torch.Tensor) -> None:
        """LSQ's initial weight scale, ``2 mean|w| / sqrt(qmax)`` (per channel when per-channel): unlike the range
        of the weight, one channel of outsized weights does not set it."""
        flat = w.abs().transpose(0, self.ch_axis).reshape(w.shape[self.ch_axis], -1) if self.per_channel else \
            w.abs().reshape(1, -1)
        scale = (2 * flat.mean(dim=1) / math.sqrt(self.quant_max)).clamp_min(torch.finfo(torch.float32).tiny)
        with torch.no_grad():
            self.scale.data = scale.float().clone()
            self.zero_point = torch.zeros_like(scale, dtype=torch.int32)  # symmetric weights
        self.initialized.fill_(True)

    def calculate_qparams(self):
        scale = self.scale.detach().abs().clamp_min(torch.finfo(torch.float32).tiny)
        if not self.per_channel:
            return scale.reshape(()), self.zero_point.reshape(())
        return scale.reshape(-1), self.zero_point.reshape(-1)

    def extra_repr(self) -> str:
        return (f"{'learned' if self.learn else 'fixed'} scale{'s' if self.per_channel else ''}, "
                f"[{self.quant_min}, {self.quant_max}]" + (", observing" if self.observe else ""))

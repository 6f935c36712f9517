"""The x86 CPU backend for PyTorch models: PT2E int8 lowered by inductor (with freezing) to oneDNN's int8 kernels.

The scheme is the form inductor's x86 quantization patterns (``torch/_inductor/fx_passes/quantization.py``) fuse
into oneDNN kernels, checked on this machine by lowering and reading the lowered graph:

- activations **uint8 asymmetric** per tensor, weights **int8 symmetric per output channel** (oneDNN multiplies
  unsigned activations by signed weights). On a CPU without VNNI the kernels add two products in an int16 and
  saturate on full-range weights (:mod:`graphopt.backends.cpu`): the weights then use [-64, 64], which keeps the
  lowered model equal to its Q/DQ reference (measured: full range 40.8 dB against fp32 as Q/DQ but 35.6 dB once
  lowered; [-64, 64] 39.9 dB both).
- Q/DQ on the **inputs** of the ops with int8 kernels (``requantize_outputs=False``): ``dq -> conv -> [relu] ->
  q`` becomes one ``qconv_pointwise`` with an int8 output when the next op reads int8, a float output otherwise.
- Conv (and Linear, as Gemm) with int8 kernels; the activations oneDNN fuses as post-ops (Relu, Clip / ReLU6 /
  Hardtanh, HardSwish); an Add reading a conv's output fuses into it as a ``sum`` post-op (``fused_add``): only
  its residual input is quantized. Other Adds stay float (``residual_add_qdq=False``): inductor has no faster
  form for them.
- MaxPool, average pooling, Flatten and Concat run on int8 sharing their input's scale.
- Bias stays float (oneDNN takes it in float).
- ConvTranspose and a MatMul of two activations (attention's) have no int8 lowering here: they stay float.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import numpy as np

from graphopt.backends.base import Backend, BackendError
from graphopt.backends.cpu import u8s8_saturates
from graphopt.backends.scheme import QuantRequest, QuantScheme, TensorQuant, UnsupportedRequestError, restrict_ops
from graphopt.ir.feeds import InputSpec

QUANTIZED_OPS = frozenset({"Conv", "Gemm", "Add"})
PASSTHROUGH_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Concat"})
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip", "HardSwish"})
WEIGHT_CHANNEL_AXIS = {"Conv": 0, "Gemm": 1}
NOT_INT8 = {
    "ConvTranspose": "inductor's x86 lowering has no int8 ConvTranspose",
    "MatMul": "inductor's x86 lowering has no int8 kernel for a product of two activations (attention's MatMuls "
              "stay float; Linear layers are Gemm)",
}


class X86Backend(Backend):
    """PyTorch models on x86 CPUs: inductor with freezing (oneDNN int8 kernels), AOTInductor packages."""

    name = "x86"

    def __init__(self, reduce_range: bool | None = None):
        """``reduce_range``: weights in [-64, 64] (see the module docstring); None: when this CPU needs it."""
        self.reduce_range = u8s8_saturates() if reduce_range is None else reduce_range

    def __repr__(self) -> str:
        return "X86Backend()"

    # -- the scheme ---------------------------------------------------------------------------------------
    def default_scheme(self) -> QuantScheme:
        return QuantScheme(
            backend=self.name,
            activations=TensorQuant("uint8", symmetric=False),
            weights=TensorQuant("int8", symmetric=True, per_channel=True, narrow_range=True,
                                reduce_range=self.reduce_range),
            weight_channel_axis=WEIGHT_CHANNEL_AXIS,
            quantized_ops=QUANTIZED_OPS,
            passthrough_ops=PASSTHROUGH_OPS,
            fused_activations=FUSED_ACTIVATIONS,
            residual_add_qdq=False,
            fused_add=True,
            requantize_outputs=False,
            bias="float",
            format="QDQ",
            min_opset=13,
        )

    def scheme(self, request: QuantRequest | None = None) -> QuantScheme:
        scheme = self.default_scheme()
        if request is None:
            return scheme
        for what, asked, have in (("activations", request.activation_dtype, "uint8"),
                                  ("weights", request.weight_dtype, "int8")):
            if asked is not None and asked != have:
                raise UnsupportedRequestError(
                    f"{what} {asked}: x86's oneDNN int8 kernels take uint8 activations x int8 weights only")
        if request.activation_symmetric:
            raise UnsupportedRequestError("symmetric activations: x86's int8 kernels take uint8 activations with a "
                                          "zero point; leave symmetric=backend")
        if request.weight_symmetric is False:
            raise UnsupportedRequestError("asymmetric weights: x86's int8 kernels take symmetric int8 weights")
        if request.per_channel is not None:
            scheme = replace(scheme, weights=replace(scheme.weights, per_channel=request.per_channel))
        return restrict_ops(scheme, request, NOT_INT8)

    # -- sessions (lowering: inductor with freezing / AOTInductor packages) -----------------------------------
    def session(self, model: Any, threads: int = 0):
        raise BackendError("the x86 backend cannot run models yet")

    def input_specs(self, session) -> list[InputSpec]:
        raise BackendError("the x86 backend cannot run models yet")

    def output_names(self, session) -> list[str]:
        raise BackendError("the x86 backend cannot run models yet")

    def run(self, session, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        raise BackendError("the x86 backend cannot run models yet")

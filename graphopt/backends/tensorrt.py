"""The TensorRT backend: explicit-quantization ONNX graphs (Q/DQ where TensorRT fuses them), checked, and built
into engines when TensorRT is installed.

TensorRT 10.1 deprecated implicit quantization (calibrators, INT8 builder flags) and TensorRT 11 removed it: int8
now comes only from QuantizeLinear/DequantizeLinear nodes in the ONNX graph, in a strongly typed network. Where
those nodes stand decides what fuses into int8 kernels, so the scheme is the form TensorRT's Q/DQ placement
recommendations ("Explicit Quantization" in the TensorRT developer guide) and NVIDIA ModelOpt's ONNX PTQ write:

- activations **int8 symmetric** per tensor (zero point 0: TensorRT's parser rejects any other), weights **int8
  symmetric per output channel** in [-127, 127], on the op's output-channel axis: Conv 0, ConvTranspose 1,
  Gemm 1 (0 with ``transB=1``), MatMul the last. Bias stays float (TensorRT folds it into the kernel).
- Q/DQ on the float **inputs** of Conv, ConvTranspose, Gemm and MatMul only ("quantize all inputs of weighted
  operations"; a MatMul of two activations, attention's Q·K^T and softmax·V, gets both: what the MHA fusion
  needs), never on their outputs for their own sake ("don't quantize the outputs of weighted operations",
  ``requantize_outputs=False``): an output is quantized only where an int8 op reads it, a graph output never.
  Softmax, LayerNormalization, GELU run in float; Softmax's output is quantized as the MatMul's input only.
- a residual Add after a weighted op (directly, or after its bias Add) that alone reads it fuses into the
  kernel's epilogue, with the activation after the add (conv -> add -> relu is one kernel; conv -> relu -> add
  fuses the relu only): its other input, the residual, gets Q/DQ ("quantize the residual input in skip
  connections", ``fused_add``); both inputs from weighted ops: ModelOpt's lowest-common-ancestor rule
  (:mod:`graphopt.backends.fusion`). Other Adds stay float (``residual_add_qdq=False``).
- Pad, Reshape, Transpose, Flatten, Squeeze, Unsqueeze, Slice, MaxPool and Concat commute with quantization
  (TensorRT propagates DQ forward and Q backward through them): the Q/DQ goes before them, never between a Pad /
  Reshape / Transpose and the Conv or MatMul it feeds, which would keep them from fusing. A Concat's inputs
  share one scale, so TensorRT concatenates in int8 without a reformat layer.
- ModelOpt's exclusions (``min_channels=16``, :func:`graphopt.backends.qdq_plan.too_small`): convs with fewer than
  16 input or output channels that TensorRT has no int8 tensor-core kernel for, GEMVs and Gemm/MatMul with K or
  N under 16 stay float.

Requests: uint8 activations or weights and asymmetric quantization are refused (a non-zero zero point is not
something TensorRT's parser takes); per-tensor weights are honoured, with a warning.

The graph is plain ONNX with standard Q/DQ semantics, so graphopt measures its accuracy here on onnxruntime's CPU
provider (``session``/``run`` delegate to it): ``graphopt compare`` and ``--eval`` work without TensorRT or a GPU.
The engine build (``tensorrt`` Python API, optional extra ``graphopt[tensorrt]``) lives in
:mod:`graphopt.backends.tensorrt_build` (SKELETON).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import numpy as np

from graphopt.backends.base import Backend
from graphopt.backends.onnxruntime import OnnxRuntimeBackend
from graphopt.backends.scheme import QuantRequest, QuantScheme, TensorQuant, UnsupportedRequestError, restrict_ops
from graphopt.ir.feeds import InputSpec

QUANTIZED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add"})  # Add: only as a fused residual
PASSTHROUGH_OPS = frozenset({"MaxPool", "Pad", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice",
                             "Concat"})
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh"})
WEIGHT_CHANNEL_AXIS = {"Conv": 0, "ConvTranspose": 1, "Gemm": 1, "MatMul": -1}
MIN_CHANNELS = 16  # TensorRT's int8 tensor-core kernels; ModelOpt's exclusion threshold
ZERO_POINT_REFUSAL = "TensorRT's ONNX parser takes only zero points of 0 (symmetric int8)"
PER_TENSOR_WARNING = ("per-tensor weights: TensorRT runs them, but one scale per output channel (the default) keeps "
                      "more accuracy at the same speed")


class TensorRTBackend(Backend):
    """TensorRT's explicit quantization: the ONNX form it fuses; accuracy measured on onnxruntime's CPU provider."""

    name = "tensorrt"
    irs = frozenset({"onnx"})

    def __init__(self):
        self._ort = OnnxRuntimeBackend()

    def __repr__(self) -> str:
        return "TensorRTBackend()"

    # -- the scheme -------------------------------------------------------------------------------------------
    def default_scheme(self) -> QuantScheme:
        return QuantScheme(
            backend=self.name,
            activations=TensorQuant("int8", symmetric=True),
            weights=TensorQuant("int8", symmetric=True, per_channel=True, narrow_range=True),
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
            min_channels=MIN_CHANNELS,
        )

    def scheme(self, request: QuantRequest | None = None) -> QuantScheme:
        """The default scheme, limited to the op types ``request`` allows; uint8 or asymmetric requests raise
        :class:`UnsupportedRequestError`, per-tensor weights come back with a warning."""
        scheme = self.default_scheme()
        if request is None:
            return scheme
        for what, asked in (("activations", request.activation_dtype), ("weights", request.weight_dtype)):
            if asked is not None and asked != "int8":
                raise UnsupportedRequestError(f"{what} {asked}: {ZERO_POINT_REFUSAL}; leave the type to the backend")
        for what, symmetric in (("activations", request.activation_symmetric),
                                ("weights", request.weight_symmetric)):
            if symmetric is False:
                raise UnsupportedRequestError(f"asymmetric {what}: {ZERO_POINT_REFUSAL}; leave symmetric=backend")
        if request.per_channel is False:
            scheme = replace(scheme, weights=replace(scheme.weights, per_channel=False),
                             warnings=(*scheme.warnings, PER_TENSOR_WARNING))
        return restrict_ops(scheme, request)

    # -- running: the graph's Q/DQ semantics on onnxruntime's CPU provider ---------------------------------------
    def session(self, model: Any, threads: int = 0):
        return self._ort.session(model, threads)

    def is_session(self, obj: Any) -> bool:
        return self._ort.is_session(obj)

    def input_specs(self, session) -> list[InputSpec]:
        return self._ort.input_specs(session)

    def output_names(self, session) -> list[str]:
        return self._ort.output_names(session)

    def run(self, session, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self._ort.run(session, feeds)

    # -- the artifact -----------------------------------------------------------------------------------------
    def write(self, graph, path: str) -> dict[str, Any]:
        """The explicit-quantization ONNX graph (SKELETON: the engine build comes with tensorrt_build)."""
        return super().write(graph, path)

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
:mod:`graphopt.backends.tensorrt_build`: :meth:`TensorRTBackend.write` writes the ONNX graph, then builds its engine
beside it when TensorRT and a GPU are there (or writes the trtexec command, ``emit_trtexec``), configured by the
backend's options (:class:`~graphopt.backends.tensorrt_plan.BuildOptions`: ``--backend tensorrt:workspace=1G``,
``--shapes``, ``--emit-trtexec``). Timing needs TensorRT and a GPU: ``bench`` says so in one line.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Mapping

import numpy as np

from graphopt.backends.base import Backend, BackendError
from graphopt.backends.onnxruntime import OnnxRuntimeBackend
from graphopt.backends.scheme import (
    FP8,
    FP8_OPSET,
    QuantRequest,
    QuantScheme,
    TensorQuant,
    UnsupportedRequestError,
    restrict_ops,
)
from graphopt.backends.tensorrt_plan import BuildOptions
from graphopt.errors import UnsupportedError
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
    runtime_packages = ("onnxruntime", "tensorrt")
    irs = frozenset({"onnx"})
    Options = BuildOptions
    options = BuildOptions()

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
        if FP8 in (request.activation_dtype, request.weight_dtype):
            return restrict_ops(_fp8(scheme, request), request)
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

    def lint_rules(self) -> tuple:
        """What TensorRT rejects or does not fuse in a Q/DQ graph (:mod:`graphopt.backends.tensorrt_rules`)."""
        from graphopt.backends.tensorrt_rules import tensorrt_rules

        return tensorrt_rules(self.scheme())

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
        """The explicit-quantization ONNX graph at ``path``, then its engine beside it (``NAME.engine`` and the
        inspector's per-layer report ``NAME.layers.json``) when TensorRT and a GPU are there, or ``NAME.trtexec.sh``
        (``emit_trtexec``); facts for the report, with ``summary`` lines (one says why no engine was built)."""
        return {**super().write(graph, path), **self.write_beside(graph, path)}

    def files(self, output: str) -> list[tuple[str, str]]:
        """The engine and its layer report (``engine=``, or beside the output), and the trtexec script."""
        stem = os.path.splitext(os.path.abspath(output))[0]
        engine = os.path.abspath(self.options.engine) if self.options.engine else stem + ".engine"
        written = [("tensorrt:engine=", engine), ("tensorrt:engine= (its layer report)",
                                                  os.path.splitext(engine)[0] + ".layers.json")]
        return written + ([("tensorrt:emit_trtexec", stem + ".trtexec.sh")] if self.options.emit_trtexec else [])

    def write_beside(self, graph, path: str) -> dict[str, Any]:
        """The engine (or trtexec command) of the ONNX graph written at ``path``, beside it; see :meth:`write`.
        A graph with ops TensorRT's parser cannot import (int4-weight's MatMulNBits, int8-dynamic's integer ops) is
        refused: no file is left that no TensorRT could build."""
        from graphopt.backends.lint import lint
        from graphopt.backends.tensorrt_build import deploy
        from graphopt.backends.tensorrt_rules import NoImporter

        if getattr(graph, "ir", None) == "onnx":
            found = lint(graph, (NoImporter(),))
            if found:
                ops = sorted({f.message.split(" ", 1)[0] for f in found})
                raise UnsupportedError(f"{path}: TensorRT's ONNX parser cannot import {', '.join(ops)} "
                                       f"({len(found)} node(s), e.g. '{found[0].node}'): {NoImporter.fix_text}")
        return deploy(path, self.options)

    def bench(self, model: Any, *args, **kwargs):
        """Timing runs the engine on a GPU: refused in one line (graphopt does not time TensorRT engines)."""
        from graphopt.backends.tensorrt_build import import_tensorrt

        trt, why = import_tensorrt()
        reason = f"the tensorrt package is {why}" if trt is None else "graphopt does not time TensorRT engines"
        raise BackendError(f"tensorrt: timing needs TensorRT and an NVIDIA GPU ({reason}): time the engine with "
                           f"trtexec --loadEngine=MODEL.engine; accuracy is measured here on onnxruntime "
                           f"(graphopt compare, graphopt run --eval)")


def _fp8(scheme: QuantScheme, request: QuantRequest) -> QuantScheme:
    """The fp8 mode: float8 E4M3 activations (per tensor) and weights (per output channel), symmetric (zero point
    0, ``scale = amax / 448``), at opset 19. TensorRT's FP8 layers take both inputs in float8: a request mixing
    float8 with int8, or asking for asymmetric float8, is refused."""
    asked = {request.activation_dtype, request.weight_dtype} - {None}
    if asked != {FP8}:
        raise UnsupportedRequestError(f"TensorRT's fp8 layers take float8 activations and weights together, not "
                                      f"{' with '.join(sorted(asked))}: ask for fp8 alone")
    if False in (request.activation_symmetric, request.weight_symmetric):
        raise UnsupportedRequestError("float8 quantization is symmetric (zero point 0): leave symmetric=backend")
    per_channel = scheme.weights.per_channel if request.per_channel is None else request.per_channel
    return replace(scheme, activations=TensorQuant(FP8, symmetric=True),
                   weights=TensorQuant(FP8, symmetric=True, per_channel=per_channel),
                   min_opset=max(scheme.min_opset, FP8_OPSET))

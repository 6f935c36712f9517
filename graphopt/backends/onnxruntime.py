"""The onnxruntime CPU backend: its int8 scheme on x86, sessions, timing and evaluation.

The scheme is the form onnxruntime's CPU kernels run fast, read off its QDQ fusion rules
(``qdq_selector_action_transformer.cc``) and checked on this machine:

- activations **uint8 asymmetric**, weights **int8 symmetric per channel**. The x86 int8 kernels (AVX-512
  VNNI / AVX2) multiply unsigned activations by signed weights; with int8 activations onnxruntime still fuses
  the QDQ groups, but the result runs *slower than fp32* (measured on ResNet-18: about 1.2x fp32 with int8
  activations, 0.4x with uint8). int8 activations are honoured on request, with that warning.
- int8 kernels (requantizing): Conv (QLinearConv), Gemm (QGemm), MatMul (QLinearMatMul), Add and Mul
  (QLinearAdd/Mul, so both inputs of a residual Add are quantized), Concat (QLinearConcat), AveragePool,
  GlobalAveragePool, Sigmoid, LeakyRelu (QLinear unary ops).
- passing int8 through (the DQ -> op -> Q group is dropped): MaxPool, Reshape, Flatten, Transpose, Squeeze,
  Unsqueeze, Slice, Gather, GatherElements, Expand, Tile, Resize, Split, ReduceMax, ReduceMin.
- Relu and Clip are absorbed by the QuantizeLinear after them (ReluQuantFusion / ClipQuantFusion).
- on an x86 CPU **without VNNI** (AVX2 only, or AVX-512 without VNNI) the uint8 x int8 kernels multiply with
  ``vpmaddubsw``, which adds two products in an int16 and saturates when weights use the full int8 range (the
  digits CNN loses 2 points of accuracy that way; onnxruntime 1.31 and 1.32 alike). There the weights use the
  reduced range [-64, 64], as onnxruntime's own quantizer does with ``reduce_range=True``: no saturation, the
  same kernels, half a bit of weight precision. With VNNI (``vpdpbusd`` accumulates in int32) the full range.
- ConvTranspose has **no** int8 CPU kernel: a QDQ ConvTranspose stays DQ -> float ConvTranspose -> Q, slower
  than leaving it float, so it is not in the scheme (asking for it is an error).
- Bias stays float: onnxruntime (>= 1.21, ``WeightBiasQuantization``) folds a float Conv/Gemm bias to int32
  with scale = input scale x weight scale itself. Older versions fuse only an int32 bias behind a
  DequantizeLinear, so for them the scheme asks place-qdq for ``bias="int32"``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import replace
from typing import Any, Mapping

import numpy as np

from graphopt.backends.base import Backend, BackendError, default_threads
from graphopt.backends.cpu import u8s8_saturates
from graphopt.backends.scheme import FP8, QuantRequest, QuantScheme, TensorQuant, UnsupportedRequestError, restrict_ops
from graphopt.errors import UnsupportedError, first_line
from graphopt.ir.feeds import InputSpec, session_input_specs
from graphopt.ir.ort_quirks import session_kwargs

QUANTIZED_OPS = frozenset({"Conv", "Gemm", "MatMul", "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool",
                           "Sigmoid", "LeakyRelu"})
PASSTHROUGH_OPS = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather",
                             "GatherElements", "Expand", "Tile", "Resize", "Split", "ReduceMax", "ReduceMin"})
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})
WEIGHT_CHANNEL_AXIS = {"Conv": 0, "Gemm": 1, "MatMul": -1}
NOT_INT8 = {
    "ConvTranspose": "onnxruntime's CPU provider has no int8 ConvTranspose; a QDQ ConvTranspose runs in float "
                     "between a DequantizeLinear and a QuantizeLinear, slower than leaving it float",
}
INT8_ACTIVATION_WARNING = (
    "int8 activations: onnxruntime's fast x86 int8 kernels multiply uint8 activations by int8 weights; with int8 "
    "activations a quantized CNN typically runs slower than fp32 (compare with --bench)")
UINT8_WEIGHT_WARNING = (
    "uint8 weights: onnxruntime's fast x86 path is uint8 activations x int8 weights; uint8 weights take a slower "
    "kernel")


def _ort_version() -> tuple[int, int]:
    import onnxruntime as ort

    major, minor = ort.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


_ORT_SUFFIX = re.compile(r"(_token_\d+|_nchwc|/\w*Fusion/?)$")


def _ort_source_name(name: str) -> str:
    """A kernel's name less the suffixes onnxruntime's graph transformers append (see ``profile_kernels``)."""
    while True:
        stripped = _ORT_SUFFIX.sub("", name)
        if stripped == name or not stripped:
            return name
        name = stripped


class OnnxRuntimeBackend(Backend):
    """onnxruntime's CPU execution provider (``providers`` may name others; the scheme is the x86 CPU one)."""

    name = "onnxruntime"
    runtime_packages = ("onnxruntime",)

    def __init__(self, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                 graph_optimization: str = "all", reduce_range: bool | None = None):
        """``reduce_range``: weights in [-64, 64] (see the module docstring); None: when this CPU needs it."""
        self.providers = tuple(tuple(p) if isinstance(p, list) else p for p in providers)  # (name, options) pairs
        self.graph_optimization = graph_optimization
        self.reduce_range = u8s8_saturates() if reduce_range is None else reduce_range

    def __repr__(self) -> str:
        return f"OnnxRuntimeBackend(providers={self.providers})"

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
            residual_add_qdq=True,
            bias="float" if _ort_version() >= (1, 21) else "int32",
            format="QDQ",
            min_opset=13,
        )

    def scheme(self, request: QuantRequest | None = None) -> QuantScheme:
        scheme = self.default_scheme()
        if request is None:
            return scheme
        if FP8 in (request.activation_dtype, request.weight_dtype):
            raise UnsupportedRequestError(
                f"{FP8} quantization: onnxruntime's CPU provider has no float8 kernels (it only dequantizes float8 "
                f"to float32); use --backend tensorrt, whose fp8 graphs onnxruntime still runs for accuracy")
        warnings = list(scheme.warnings)
        acts, weights = scheme.activations, scheme.weights
        if request.activation_dtype is not None and request.activation_dtype != acts.dtype:
            acts = TensorQuant(request.activation_dtype, acts.symmetric)
            if request.activation_dtype == "int8":
                warnings.append(INT8_ACTIVATION_WARNING)
        if request.activation_symmetric is not None:
            acts = TensorQuant(acts.dtype, request.activation_symmetric)
        if request.weight_dtype is not None and request.weight_dtype != weights.dtype:
            weights = replace(weights, dtype=request.weight_dtype)
            if request.weight_dtype == "uint8":
                warnings.append(UINT8_WEIGHT_WARNING)
        if request.weight_symmetric is not None:
            weights = replace(weights, symmetric=request.weight_symmetric, narrow_range=request.weight_symmetric)
        if request.per_channel is not None:
            weights = replace(weights, per_channel=request.per_channel)
        if weights.dtype == "uint8" and weights.symmetric:
            raise UnsupportedRequestError(
                "symmetric uint8 weights (zero point 128) are not a form onnxruntime's int8 kernels take; "
                "use int8 weights (the default) or asymmetric uint8")
        scheme = replace(scheme, activations=acts, weights=weights, warnings=tuple(warnings))
        return restrict_ops(scheme, request, NOT_INT8)

    # -- sessions -------------------------------------------------------------------------------------------
    def session(self, model: Any, threads: int = 0, *, profile_dir: str | None = None):
        """An ``onnxruntime.InferenceSession``: one intra-op pool of ``threads`` (0: :func:`default_threads`, else
        onnxruntime's default, one per core), one inter-op thread, sequential execution, every graph optimisation
        on; with ``profile_dir``, onnxruntime's profiler on, writing there."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if profile_dir is not None:
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(profile_dir, "ort")
        options.log_severity_level = 4  # errors come back as exceptions; its own log line would be a second
        options.intra_op_num_threads = int(threads) or default_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[self.graph_optimization]
        if isinstance(model, (str, os.PathLike)):
            path = os.fspath(model)
            if not os.path.isfile(path):
                raise BackendError(f"{path}: no such file")
            source: Any = path
        elif isinstance(model, (bytes, bytearray)):
            source = bytes(model)
        elif hasattr(model, "to_model"):  # OnnxGraph: weights handed over where they lie, not serialized
            try:
                return model.session(threads, options, self.providers)
            except Exception as exc:
                session = _bfloat16_emulated(ort, model.to_model().SerializeToString(), options, self.providers)
                if session is not None:
                    return session
                raise BackendError(f"onnxruntime could not load the model: {first_line(exc)}") from exc
        elif hasattr(model, "SerializeToString"):
            source = model.SerializeToString()
        else:
            raise BackendError(f"onnxruntime cannot run a {type(model).__name__} (give an .onnx path, a ModelProto "
                               "or an OnnxGraph)")
        try:
            return ort.InferenceSession(source, options, providers=list(self.providers), **session_kwargs(source))
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / RuntimeError types
            session = _bfloat16_emulated(ort, source, options, self.providers)
            if session is not None:
                return session
            where = f"{source}: " if isinstance(source, str) else ""
            raise BackendError(f"{where}onnxruntime could not load the model: {first_line(exc)}") from exc

    def profile_kernels(self, model: Any, feeds: Mapping[str, np.ndarray], runs: int = 5, threads: int = 1
                        ) -> list[dict]:
        """The kernels of the graph onnxruntime optimized from ``model`` (layouts changed, nodes fused), in
        execution order, from its profiler over ``runs`` runs after an untimed one: ``{"node": name, "op": kernel
        op type, "us": microseconds per run}`` (the fastest of the runs: a profile is wall time, and on a busy machine
        the slow runs are the ones something else interrupted). ``node`` is the kernel's name less what onnxruntime's
        transformers append (``_token_N``, ``_nchwc``, ``/<Name>Fusion/``): the name of the node of ``model`` it
        was built from, or of the tensor it writes (an NCHWc convolution is named after its output), or a name of
        onnxruntime's own (``Transpose``, ``ReorderOutput``: layout changes it inserted)."""
        runs = max(int(runs), 1)
        with tempfile.TemporaryDirectory(prefix="graphopt-ort-profile-") as folder:
            session = self.session(model, threads, profile_dir=folder)
            for _ in range(runs + 1):
                self.run(session, feeds)
            with open(session.end_profiling()) as f:
                events = json.load(f)
        times: dict[str, list[float]] = {}
        ops: dict[str, str] = {}
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                name = e["name"][: -len("_kernel_time")]
                times.setdefault(name, []).append(float(e["dur"]))
                ops[name] = e.get("args", {}).get("op_name", "")
        out = []
        for name, us in times.items():
            timed = us[len(us) // (runs + 1):]  # the first run is untimed (its allocations, its caches)
            out.append({"node": _ort_source_name(name), "op": ops[name],
                        "us": float(np.min(timed)) * len(timed) / runs})
        return out

    def is_session(self, obj: Any) -> bool:
        return hasattr(obj, "get_inputs") and hasattr(obj, "run")

    def input_specs(self, session) -> list[InputSpec]:
        try:
            return session_input_specs(session)
        except UnsupportedError as exc:
            raise BackendError(str(exc)) from None

    def output_names(self, session) -> list[str]:
        return [o.name for o in session.get_outputs()]

    def run(self, session, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        session = self._as_session(session)
        try:
            return [np.asarray(o) for o in session.run(None, dict(feeds))]
        except Exception as exc:
            raise BackendError(f"onnxruntime run failed: {first_line(exc)}") from exc


def _bfloat16_emulated(ort, source, options, providers):
    """For a bfloat16 model (which onnxruntime's CPU provider has no Conv/MatMul/Add kernels for): a session of its
    float32 emulation (:func:`graphopt.ir.bf16.emulate_bfloat16`), marked ``_graphopt_emulated``, so that its
    accuracy can be measured here (--eval, compare) and its latency is refused (that is TensorRT's, on a GPU); None
    for any other model, or one the emulation cannot take."""
    import onnx

    from graphopt.ir.bf16 import emulation

    try:
        emulated = emulation(onnx.load(source) if isinstance(source, str) else onnx.load_from_string(source))
        if emulated is None:
            return None
        session = ort.InferenceSession(emulated.SerializeToString(), options, providers=list(providers))
    except Exception:  # unreadable, or what onnxruntime refuses even in float32
        return None
    session._graphopt_emulated = "bfloat16, emulated in float32"
    return session

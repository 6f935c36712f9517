"""The OpenVINO backend: graphopt's Q/DQ ONNX graphs compiled by OpenVINO's CPU plugin, which turns them into int8
kernels, with a per-layer report of what it ran in int8 and what in float.

OpenVINO reads ONNX directly (``Core.read_model``); each QuantizeLinear/DequantizeLinear pair becomes a
FakeQuantize, and its low-precision transformations (LPT) move the dequantization past the ops that can run on
the quantized values, so a Conv between two FakeQuantize runs as an int8 convolution. ``openvino`` is optional
(``pip install 'graphopt[openvino]'``) and imported only when the backend is used.

**The scheme, by measurement** (this machine: AMD EPYC, AVX2, no VNNI; OpenVINO 2026.4.1; graphopt.zoo's
ResNet-18-like and MobileNetV2-like at 1x3x224x224, exported then folded; 1 thread, 1 stream, latency hint,
precision hint f32; CPU time per run, interleaved rounds, median; SQNR against OpenVINO's fp32 run; int8 / float
count the runtime model's compute layers by ``runtimePrecision``):

=====================================  ===========================  ===========================
graph                                  ResNet-18-like               MobileNetV2-like
=====================================  ===========================  ===========================
fp32                                   49.2 ms                      11.5 ms
onnxruntime form, weights [-127,127]   22.5 ms, 34.3 dB, 24/1       7.9 ms, 27.4 dB, 55/1
onnxruntime form, weights [-64,64]     23.2 ms, 37.3 dB, 24/1       8.2 ms, 38.4 dB, 55/1
tensorrt form, weights [-127,127]      24.1 ms, 11.9 dB, 27/2       9.5 ms, 12.9 dB, 63/2
tensorrt form, weights [-64,64]        24.1 ms, 37.0 dB, 27/2       9.2 ms, 38.9 dB, 63/2
tensorrt form, uint8 asym. activations 23.2 ms, 35.2 dB, 27/2       8.1 ms, 27.6 dB, 63/2
=====================================  ===========================  ===========================

So the scheme is the onnxruntime form: **uint8 asymmetric activations, int8 symmetric per-channel weights, every
quantized op's output requantized** (the residual Add quantized on both inputs, fused into the convolution
before it as the execution graph shows). It ran the fastest on both models with every convolution, the pooling
and the classifier in int8 (the only float layer left is the input's quantization); the tensorrt form (int8
symmetric activations, Q/DQ on the inputs of weighted ops only) leaves a requantization in float per residual
block, and runs 5-20 % slower. Like onnxruntime's, OpenVINO's x86 int8 kernels multiply uint8 by int8 with
``vpmaddubsw`` on CPUs without VNNI, which saturates on full-range weights: there (``u8s8_saturates``) the
weights use [-64, 64] (MobileNetV2 27 -> 38 dB; with int8 activations full-range weights fall to 12 dB). With
VNNI or AMX the full range.

**Measured again on a Xeon with AVX-512 VNNI and AMX** (the CPUs the OpenVINO issue was written on), beside NNCF's
``nncf.quantize`` defaults, two changes took graphopt's graph to NNCF's accuracy and kernels: the model's
**outputs stay float** (a Q/DQ on the classifier's logits is 8-bit noise on the output itself: ResNet-18-like
39.4 -> 43.0 dB, NNCF 42.9; OpenVINO's int8 kernels write float at no cost), and a **signed activation is
quantized symmetric int8** (``signed_activations``): the model's input then reaches the stem convolution
without a zero point, and OpenVINO runs it as ``brgconv_avx512_amx_i8``, as it runs NNCF's, instead of the uint8
kernel with zero-point compensation (in one profile 0.71 ms against NNCF's 0.54; after the change 0.39 against
0.39 in another). Non-negative tensors keep uint8, whose zero point is 0. This one is applied with VNNI/AMX only:
without VNNI (weights narrowed) int8 activations measured 5-10 % slower, and the signed form is unmeasured there.

**Precision.** ``precision=f32`` (the default) sets ``INFERENCE_PRECISION_HINT`` to f32, so an fp32 model runs
in fp32: OpenVINO's own default is bf16 on CPUs with AMX or AVX-512 BF16 (Xeon Sapphire Rapids and later), which
is faster but not fp32. ``precision=bf16`` asks for bf16 (on a CPU without bf16 instructions OpenVINO keeps f32;
the report says what the compiled model uses). Sessions use ``NUM_STREAMS=1``, ``PERFORMANCE_HINT=LATENCY`` and
``INFERENCE_NUM_THREADS`` = the thread count asked for (0: OpenVINO's default).

**Model cache.** Sessions compile through OpenVINO's model cache (``CACHE_DIR``; option ``cache_dir``, by default
``$GRAPHOPT_CACHE_DIR/openvino``, kept to ``cache_mb``): the same model compiled again is imported from its blob
(:meth:`cache`).

**Artifacts.** ``save_ir=DIR`` (``--save-ir DIR``) also writes the OpenVINO IR (``NAME.xml`` / ``NAME.bin``, by
``openvino.save_model``) of the ONNX output. The per-layer report is :mod:`graphopt.backends.openvino_layers`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np

from graphopt.backends.base import Backend, BackendError, default_threads
from graphopt.backends.cache import cache_folder, trim_cache
from graphopt.backends.cpu import u8s8_saturates
from graphopt.backends.onnxruntime import OnnxRuntimeBackend
from graphopt.backends.scheme import FP8, QuantRequest, QuantScheme, TensorQuant, UnsupportedRequestError, restrict_ops
from graphopt.errors import UnsupportedError
from graphopt.ir.feeds import InputSpec

INSTALL_HINT = "pip install 'graphopt[openvino]'"
PRECISIONS = ("f32", "bf16")
# OpenVINO 2026.4's CPU plugin computes ReduceMean / ReduceSum over axis 1 of a 3-D tensor read through a
# DequantizeLinear wrongly past the first sample of a batch (zeros: a mean-pooled BERT output at 0.4 dB); other
# reductions and 4-D ones are right. These read the float tensor instead (tests/test_backend_openvino.py).
FLOAT_READERS = frozenset({"ReduceMean", "ReduceSum"})
INT8_ACTIVATION_WARNING = (
    "int8 activations: OpenVINO's x86 int8 kernels are fastest with uint8 activations (measured: 5-10 % slower with "
    "int8), and on CPUs without VNNI int8 activations need the reduced weight range to avoid saturation")


_OV_SUFFIX = re.compile(r"(/WithoutBiases|/DequantizationMultiply)+$")  # ops OpenVINO split off an ONNX node


def import_openvino():
    """The ``openvino`` module, or an :class:`UnsupportedError` naming the install command."""
    try:
        import openvino
    except ImportError as exc:
        raise UnsupportedError(f"the openvino backend needs the openvino package ({exc.msg}): {INSTALL_HINT}") \
            from None
    return openvino


@dataclass(frozen=True)
class OpenVINOOptions:
    """The openvino backend's options: ``--backend openvino:precision=bf16:save_ir=ir`` (``--ov-precision`` and
    ``--save-ir`` on the command line set them)."""

    precision: str = "f32"  # INFERENCE_PRECISION_HINT: f32 (fp32 means fp32) or bf16
    save_ir: str = ""  # also write the OpenVINO IR (NAME.xml / NAME.bin) of the ONNX output into this folder
    layers: bool = True  # compile the written model and report which layers run in int8
    cache_dir: str = ""  # the model cache; "": $GRAPHOPT_CACHE_DIR/openvino (~/.cache/graphopt/openvino); none: off
    cache_mb: int = 2048  # the model cache's size: the oldest blobs go past it

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {self.cache_mb}")


@dataclass
class OVSession:
    """A compiled model, its infer request, and the settings it was compiled with."""

    compiled: Any
    request: Any
    config: dict


class OpenVINOBackend(Backend):
    """OpenVINO's CPU plugin running ONNX graphs (Q/DQ graphs in int8 through its low-precision transformations)."""

    name = "openvino"
    runtime_packages = ("openvino",)
    irs = frozenset({"onnx"})
    Options = OpenVINOOptions
    options = OpenVINOOptions()

    def __init__(self, reduce_range: bool | None = None, device: str = "CPU"):
        """``reduce_range``: weights in [-64, 64] (see the module docstring); None: when this CPU needs it."""
        self.reduce_range = u8s8_saturates() if reduce_range is None else reduce_range
        self.device = device

    def refuse_ir(self, ir: str) -> str | None:
        """A run on this backend without the openvino package is refused before any pass runs."""
        try:
            import_openvino()
        except UnsupportedError as exc:
            return str(exc)
        return None

    def __repr__(self) -> str:
        return f"OpenVINOBackend(device={self.device!r}, precision={self.options.precision!r})"

    # -- the scheme -------------------------------------------------------------------------------------------
    def default_scheme(self) -> QuantScheme:
        """onnxruntime's form (see the module docstring), with the bias left float (OpenVINO folds it itself) and the
        model's outputs float (OpenVINO's int8 kernels write float as cheaply as int8); with VNNI or AMX a signed
        activation (the model's input; a convolution's output before a residual Add) on the symmetric int8 grid,
        which its convolutions read without a zero point (measured there; on a CPU without VNNI, where the weights
        are narrowed, uint8 activations were the faster form and stay)."""
        ort = OnnxRuntimeBackend(reduce_range=self.reduce_range).default_scheme()
        signed = None if self.reduce_range else TensorQuant("int8", symmetric=True)
        return replace(ort, backend=self.name, bias="float", requantize_graph_outputs=False, signed_activations=signed,
                       float_readers=FLOAT_READERS)

    def scheme(self, request: QuantRequest | None = None) -> QuantScheme:
        """The default scheme, adjusted to ``request``: int8 activations and per-tensor or asymmetric weights are
        honoured (int8 activations with a warning), float8 is refused (OpenVINO's CPU plugin has no fp8 kernels)."""
        scheme = self.default_scheme()
        if request is None:
            return scheme
        if FP8 in (request.activation_dtype, request.weight_dtype):
            raise UnsupportedRequestError(f"{FP8} quantization: OpenVINO's CPU plugin has no float8 kernels; use "
                                          f"int8 (the default)")
        acts, weights, warnings = scheme.activations, scheme.weights, list(scheme.warnings)
        if request.activation_dtype is not None and request.activation_dtype != acts.dtype:
            acts = TensorQuant(request.activation_dtype, acts.symmetric)
            warnings.append(INT8_ACTIVATION_WARNING)
        if request.activation_symmetric is not None:
            acts = TensorQuant(acts.dtype, request.activation_symmetric)
        asked = request.activation_dtype is not None or request.activation_symmetric is not None
        signed = None if asked else scheme.signed_activations  # a request for activations names one grid for all
        if request.weight_dtype is not None and request.weight_dtype != weights.dtype:
            raise UnsupportedRequestError(f"{request.weight_dtype} weights: OpenVINO's int8 kernels take int8 "
                                          f"weights; leave the weight type to the backend")
        if request.weight_symmetric is not None:
            weights = replace(weights, symmetric=request.weight_symmetric, narrow_range=request.weight_symmetric)
        if request.per_channel is not None:
            weights = replace(weights, per_channel=request.per_channel)
        return restrict_ops(replace(scheme, activations=acts, signed_activations=signed, weights=weights,
                                    warnings=tuple(warnings)), request)

    # -- sessions ---------------------------------------------------------------------------------------------
    def compile_config(self, threads: int = 0) -> dict:
        """The compile properties: 1 stream, latency hint, the precision hint, ``threads`` (0:
        :func:`~graphopt.backends.base.default_threads`, else OpenVINO's)."""
        config = {"NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": self.options.precision}
        threads = int(threads) or default_threads()
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        return config

    def read_model(self, model: Any):
        """An ``openvino.Model`` of ``model`` (an .onnx path, a ModelProto, an OnnxGraph or serialized bytes)."""
        ov = import_openvino()
        core = ov.Core()
        if isinstance(model, (str, os.PathLike)):
            path = os.fspath(model)
            if not os.path.isfile(path):
                raise BackendError(f"{path}: no such file")
            try:
                return core.read_model(path)
            except Exception as exc:
                raise BackendError(f"{path}: OpenVINO could not read the model: {_reason(exc)}") from exc
        if hasattr(model, "to_model"):  # OnnxGraph
            model = model.to_model()
        if isinstance(model, (bytes, bytearray)):
            import onnx

            model = onnx.load_from_string(bytes(model))
        if not hasattr(model, "SerializeToString"):
            raise BackendError(f"openvino cannot run a {type(model).__name__} (give an .onnx path, a ModelProto or "
                               "an OnnxGraph)")
        import onnx

        folder = tempfile.mkdtemp(prefix="graphopt-ov-")
        try:  # through a file: the ONNX frontend reads external data (models over 2 GB) only from one
            path = os.path.join(folder, "model.onnx")
            large = model.ByteSize() > (1 << 30)
            onnx.save(model, path, save_as_external_data=large, location="model.onnx.data" if large else None)
            try:
                return core.read_model(path)
            except Exception as exc:
                raise BackendError(f"OpenVINO could not read the model: {_reason(exc)}") from exc
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def session(self, model: Any, threads: int = 0, **properties) -> OVSession:
        """A compiled model on the CPU (see :meth:`compile_config`; ``properties``: more compile properties),
        dynamic dimensions kept dynamic, through OpenVINO's model cache (:meth:`cache`)."""
        ov = import_openvino()
        config = {**self.compile_config(threads), **properties}
        cache = self.cache()
        try:
            compiled = ov.Core().compile_model(self.read_model(model), self.device,
                                               {**config, "CACHE_DIR": cache} if cache else config)
        except (BackendError, UnsupportedError):
            raise
        except Exception as exc:
            raise BackendError(f"OpenVINO could not compile the model: {_reason(exc)}") from exc
        return OVSession(compiled, compiled.create_infer_request(), config)

    def cache(self) -> str | None:
        """OpenVINO's model cache (``CACHE_DIR``), or None (``cache_dir=none``, or a folder that cannot be written).
        OpenVINO keys a compiled blob on the model (its weights included), the compile properties, the device and
        its own version, and imports it instead of compiling again: a second compile of the same model (the latency
        guard profiles a placement and later times it; ``bench`` per thread count; the next run) takes 0.1-0.2 s
        instead of 0.3-0.8 s (BERT-like, on a Xeon). ``PERF_COUNT`` is not part of the key: a profiled and a plain
        session share a blob. A sweep compiles a new placement per trial, so the folder is kept to ``cache_mb``:
        past it the oldest blobs are removed (a blob in use stays readable; one removed is compiled again)."""
        folder = cache_folder(self.options.cache_dir, "openvino")
        if folder is None:
            return None
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError:
            return None
        if not os.access(folder, os.W_OK):
            return None
        trim_cache(folder, ".blob", self.options.cache_mb << 20)
        return folder

    def profile_kernels(self, model: Any, feeds: Mapping[str, np.ndarray], runs: int = 5, threads: int = 1
                        ) -> list[dict]:
        """The layers OpenVINO's CPU plugin executes for ``model`` (its execution graph: FakeQuantize, Convolution
        and the Relu or residual Add fused into it as one layer), in execution order, from its performance counters
        (``PERF_COUNT``, compiled as :meth:`session` compiles) over ``runs`` runs after an untimed one: ``{"node":
        name, "op": layer type, "us": microseconds}``, each layer's fastest run (wall time: on a busy machine the
        slow runs are the ones something else interrupted). Only executed layers: those OpenVINO fused into another
        or left out (``NOT_RUN``, ``OPTIMIZED_OUT``) are not. ``node`` is the name of the ONNX node the layer kept,
        less what OpenVINO appends to the op it split off a node (``/WithoutBiases``: a Conv or Gemm without its
        bias; ``/DequantizationMultiply``), or the tensor it writes (the model's outputs), a Q/DQ node's
        (``<tensor>_QuantizeLinear`` run as a FakeQuantize), or one of OpenVINO's own (``x_abcd_acdb_conv``: a
        layout Reorder; ``Convert_12``, ``Subtract_13``: a DequantizeLinear it decomposed)."""
        session = self.session(model, threads, PERF_COUNT=True)
        self.run(session, feeds)  # untimed: its allocations, its caches
        fastest: dict[int, dict] = {}
        for _ in range(max(int(runs), 1)):
            self.run(session, feeds)
            executed = [p for p in session.request.get_profiling_info() if p.status == p.Status.EXECUTED]
            for i, p in enumerate(executed):
                us = p.real_time.total_seconds() * 1e6
                if i not in fastest or us < fastest[i]["us"]:
                    fastest[i] = {"node": _OV_SUFFIX.sub("", p.node_name), "op": p.node_type, "us": us}
        return [fastest[i] for i in sorted(fastest)]

    def is_session(self, obj: Any) -> bool:
        return isinstance(obj, OVSession)

    def input_specs(self, session) -> list[InputSpec]:
        session = self._as_session(session)
        specs = []
        for port in session.compiled.inputs:
            shape = port.get_partial_shape()
            dims = [d.get_length() if d.is_static else None for d in shape]
            specs.append(InputSpec(port.get_any_name(), tuple(dims), port.get_element_type().to_dtype()))
        return specs

    def output_names(self, session) -> list[str]:
        return [port.get_any_name() for port in self._as_session(session).compiled.outputs]

    def run(self, session, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        session = self._as_session(session)
        try:
            results = session.request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        except Exception as exc:
            raise BackendError(f"openvino run failed: {_reason(exc)}") from exc
        return [np.array(results[port]) for port in session.compiled.outputs]

    def run_written(self, path: str, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The written file on OpenVINO's CPU plugin (the run's check compares it with onnxruntime's run)."""
        return self.run(self.session(path), feeds)

    def settings(self, session) -> dict[str, Any]:
        """What a compiled model runs with: threads, streams, the precision hint, as OpenVINO reports them, and
        whether it came from the model cache."""
        compiled = self._as_session(session).compiled
        return {"device": self.device, "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
                "streams": int(compiled.get_property("NUM_STREAMS")),
                "performance_hint": str(compiled.get_property("PERFORMANCE_HINT")).split(".")[-1],
                "precision_hint": _type_name(compiled.get_property("INFERENCE_PRECISION_HINT")),
                "precision_asked": self.options.precision,
                "loaded_from_cache": bool(compiled.get_property("LOADED_FROM_CACHE"))}

    def bench(self, model: Any, *args, **kwargs):
        """The base timing, with the compiled settings (threads, streams, precision hint) in ``settings``."""
        result = super().bench(model, *args, **kwargs)
        threads = sorted({row.threads for row in result.rows})
        result.settings = {f"threads={t}": self.settings(self.session(model, t)) for t in threads}
        return result

    # -- the artifact -----------------------------------------------------------------------------------------
    def write(self, graph, path: str) -> dict[str, Any]:
        """The graph in its own format (a PyTorch model as ONNX when ``path`` ends in .onnx), then, for an ONNX
        file, what :meth:`write_beside` writes."""
        facts = super().write(graph, path)
        if path.lower().endswith(".onnx"):
            facts = {**facts, **self.write_beside(graph, path)}
        return facts

    def files(self, output: str) -> list[tuple[str, str]]:
        return [("--save-ir", path) for path in ir_paths(output, self.options.save_ir)] if self.options.save_ir else []

    def folders(self, output: str) -> list[tuple[str, str]]:
        return [("--save-ir", self.options.save_ir)] if self.options.save_ir else []

    def write_beside(self, graph, path: str) -> dict[str, Any]:
        """For the ONNX graph written at ``path``: the per-layer int8/float report of OpenVINO's execution graph
        (``layers``), and with ``save_ir`` the IR files (``NAME.xml`` / ``NAME.bin``; in the output's own folder
        they are written beside the staged file and move with it)."""
        from graphopt.backends.openvino_layers import layer_report

        facts: dict[str, Any] = {"summary": []}
        if self.options.layers:
            session = self.session(path, threads=1)
            report = layer_report(session.compiled, path)
            facts["openvino_layers"] = report
            facts["openvino_settings"] = self.settings(session)
            facts["summary"].append(report["summary"])
        if self.options.save_ir:
            facts["ir"] = save_ir(self.read_model(path), path, self.options.save_ir)
            facts["summary"].append(f"openvino: wrote IR {facts['ir']['xml']} (+ .bin)")
        return facts


def _type_name(value) -> str:
    """``f32`` for OpenVINO's ``Type.f32`` (``<Type: 'float32'>`` as str)."""
    return value.to_string() if hasattr(value, "to_string") else str(value)


def _reason(exc: BaseException) -> str:
    """OpenVINO's message without its first line when that only says where in its C++ it was raised
    ("Exception from src/inference/src/cpp/core.cpp:84:"): the line that says why ("No conversion rule found for
    operations: com.acme.MyRelu")."""
    lines = [line.strip(" -") for line in str(exc).splitlines() if line.strip(" -")]
    useful = [line for line in lines if not line.startswith(("Exception from ", "Check '", "Summary:"))]
    return " ".join(useful or lines or [type(exc).__name__])[:400]


def ir_paths(onnx_path: str, folder: str) -> tuple[str, str]:
    """Where ``--save-ir folder`` puts the IR of the ONNX output ``onnx_path``: ``folder/NAME.xml``, ``.bin``."""
    stem = os.path.splitext(os.path.basename(onnx_path))[0]
    return os.path.join(folder, stem + ".xml"), os.path.join(folder, stem + ".bin")


def save_ir(model, staged_path: str, folder: str) -> dict[str, str]:
    """Write ``model``'s IR for the ONNX file staged at ``staged_path`` (its final folder is the staging folder's
    parent). Into the output's own folder: beside the staged file, so it moves into place with it; elsewhere:
    written under temporary names in ``folder`` and renamed into place."""
    ov = import_openvino()
    final_folder = os.path.dirname(os.path.dirname(os.path.abspath(staged_path)))
    target = os.path.abspath(folder)
    xml, bin_ = ir_paths(staged_path, target)
    try:
        os.makedirs(target, exist_ok=True)
        if os.path.samefile(target, final_folder):
            staged_xml, _ = ir_paths(staged_path, os.path.dirname(staged_path))
            ov.save_model(model, staged_xml, compress_to_fp16=False)
            return {"xml": xml, "bin": bin_}
        tmp = tempfile.mkdtemp(prefix=".graphopt-ir-", dir=target)
        try:
            tmp_xml, tmp_bin = ir_paths(staged_path, tmp)
            ov.save_model(model, tmp_xml, compress_to_fp16=False)
            os.replace(tmp_bin, bin_)
            os.replace(tmp_xml, xml)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        from graphopt.errors import OutputError

        raise OutputError(f"--save-ir {folder}: cannot write the IR ({exc.strerror or exc})") from None
    return {"xml": xml, "bin": bin_}


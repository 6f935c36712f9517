"""The TensorRT engine build: the explicit-quantization ONNX graph -> a serialized engine, through the ``tensorrt``
Python API (optional extra ``graphopt[tensorrt]``; imported here, lazily, and nowhere else).

Written against TensorRT 10 and 11 (names and signatures checked against the ``tensorrt-cu12-bindings`` wheels
10.0.1, 10.13.3.9, 10.16.1.11, 11.0.0.114 and 11.4.0.106, and ``tensorrt-stubs`` 10.13):

- the network is **strongly typed** (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``: opt-in in 10, deprecated
  and always on in 11): int8 comes from the graph's Q/DQ nodes, so no precision builder flag is set — TensorRT 11
  removed ``BuilderFlag.INT8`` / ``FP16`` / ``BF16`` / ``FP8``, precision constraints and ``int8_calibrator``
  (calibrators were deprecated in 10.1). ``EXPLICIT_BATCH`` is not used: deprecated and ignored in 10, gone in 11;
- an optimization profile per dynamic input (:func:`graphopt.backends.tensorrt_plan.profiles`);
- the workspace pool limit (``set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)``);
- a timing cache file, loaded before the build and saved after it (per TensorRT version and GPU architecture);
- ``profiling_verbosity = DETAILED``, so the engine inspector reports each layer's types
  (:mod:`graphopt.backends.tensorrt_layers`).

Engines are cached (``cache_dir``) under a key of the model's bytes, TensorRT's and CUDA's versions, the builder
configuration, the profiles and the GPU's compute capability (:func:`~graphopt.backends.tensorrt_plan.cache_key`):
a second build of the same model on the same setup copies the cached engine. CUDA's version and the compute
capability are read from the CUDA driver library itself (``libcuda``, which is wherever TensorRT runs on a GPU),
so no pycuda, cuda-python or torch is needed.

Without ``tensorrt`` (or without a GPU), :func:`deploy` writes no engine and says so in one report line; the
ONNX graph is still the artifact. A model the ONNX parser refuses, or a build that fails, is one error line.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import onnx

from graphopt.backends.base import BackendError
from graphopt.backends.cache import trim_cache, used
from graphopt.backends.tensorrt_layers import parse_engine_information
from graphopt.backends.tensorrt_plan import (
    BuildOptions,
    Profile,
    builder_config,
    cache_folder,
    cache_key,
    defaulted_note,
    model_inputs,
    profiles,
    trtexec_command,
    trtexec_script,
    workspace_bytes,
)
from graphopt.errors import OutputError, UnsupportedError, first_line
from graphopt.ir import external_data_files
from graphopt.paths import file_sha256

INSTALL_HINT = "pip install 'graphopt[tensorrt]' on a machine with an NVIDIA GPU"


def import_tensorrt() -> tuple[Any, str | None]:
    """``(tensorrt module, None)``, or ``(None, why not)``: not installed, or installed without its libraries."""
    try:
        import tensorrt
    except ModuleNotFoundError:
        return None, "not installed"
    except Exception as exc:  # a broken install: the bindings without their libraries (OSError), and the like
        return None, f"installed but cannot be imported ({first_line(exc)})"
    major = str(getattr(tensorrt, "__version__", "0")).split(".")[0]
    if not major.isdigit() or int(major) < 10:
        return None, f"version {getattr(tensorrt, '__version__', '?')}; graphopt builds with TensorRT 10 or newer"
    return tensorrt, None


@dataclass(frozen=True)
class DeviceFacts:
    """The first CUDA device: the driver's CUDA version (``12.4``), compute capability (``8.9``) and name."""

    cuda_version: str
    compute_capability: str
    name: str


def device_facts() -> DeviceFacts | None:
    """The first visible CUDA device, from the CUDA driver API (``cuDriverGetVersion``, ``cuDeviceGetAttribute``
    75/76: compute capability major/minor); None when there is no driver or no device."""
    for lib_name in (("nvcuda.dll",) if os.name == "nt" else ("libcuda.so.1", "libcuda.so")):
        try:
            cuda = ctypes.CDLL(lib_name)
            break
        except OSError:
            continue
    else:
        return None
    version, device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    if (cuda.cuInit(0) != 0 or cuda.cuDriverGetVersion(ctypes.byref(version)) != 0
            or cuda.cuDeviceGet(ctypes.byref(device), 0) != 0
            or cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device) != 0
            or cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device) != 0):
        return None
    cuda.cuDeviceGetName(name, 256, device)
    return DeviceFacts(f"{version.value // 1000}.{version.value % 1000 // 10}", f"{major.value}.{minor.value}",
                       name.value.decode(errors="replace"))


def deploy(onnx_path: str, options: BuildOptions) -> dict[str, Any]:
    """After the ONNX graph is written at ``onnx_path``: build its engine beside it (or write the trtexec command,
    ``emit_trtexec``). Returns the facts for the run report, ``summary`` lines first."""
    inputs = model_inputs(onnx.load(onnx_path, load_external_data=False))
    plan = profiles(inputs, options)
    folder, onnx_name = os.path.split(os.path.abspath(onnx_path))
    stem = os.path.splitext(onnx_name)[0]
    engine_path = os.path.abspath(options.engine) if options.engine else os.path.join(folder, stem + ".engine")
    layers_path = os.path.splitext(engine_path)[0] + ".layers.json"
    note = defaulted_note(plan, inputs)
    facts: dict[str, Any] = {"profiles": [{"input": p.name, "min": list(p.min), "opt": list(p.opt),
                                           "max": list(p.max), "defaulted": p.defaulted} for p in plan]}
    notes = [note] if note else []
    if options.emit_trtexec:
        emitted = _emit_trtexec(folder, onnx_name, stem, engine_path, layers_path, plan, options)
        return {**facts, **emitted, "summary": emitted["summary"] + notes}
    if not options.build:
        return {**facts, "engine": None, "summary": ["tensorrt: engine build off (build=false): wrote the ONNX "
                                                     "graph only"]}
    trt, why = import_tensorrt()
    if trt is None:
        return {**facts, "engine": None, "summary": [f"tensorrt: no engine built: the tensorrt package is {why} "
                                                     f"({INSTALL_HINT}); the ONNX graph is written"]}
    device = device_facts()
    if device is None:
        return {**facts, "engine": None, "summary": [f"tensorrt: no engine built: TensorRT {trt.__version__} "
                                                     f"found no CUDA device; the ONNX graph is written"]}
    key = cache_key(file_sha256(onnx_path, *external_data_files(onnx_path)), trt.__version__,
                    device.cuda_version, device.compute_capability, builder_config(options), plan)
    cache = cache_folder(options)
    cached = cache is not None and os.path.isfile(os.path.join(cache, key + ".engine"))
    if cached:
        engine_bytes = _read(os.path.join(cache, key + ".engine"))
        info = _read(os.path.join(cache, key + ".layers.json")).decode()
        used(os.path.join(cache, key + ".engine"))
        took, timing_note = None, None
    else:
        start = time.perf_counter()
        engine_bytes, info, timing_note = build_engine(trt, onnx_path, plan, options, device)
        took = time.perf_counter() - start
        if cache is not None:
            stored = _store(cache, key, engine_bytes, info, options.cache_mb)
            notes += [stored] if stored else []
    write_bytes(engine_path, engine_bytes)
    write_bytes(layers_path, info.encode())
    try:
        report = parse_engine_information(info)
    except ValueError as exc:
        raise BackendError(f"tensorrt: {exc} (TensorRT {trt.__version__})") from None
    how = "from the engine cache" if cached else f"built in {took:.1f} s"
    summary = [f"tensorrt: engine {os.path.basename(engine_path)} {how} (TensorRT {trt.__version__}, "
               f"{device.name}, sm {device.compute_capability}, CUDA {device.cuda_version}; key {key[:12]})",
               report.line() + f"; per layer: {os.path.basename(layers_path)}"]
    return {**facts, "engine": engine_path, "layer_info": layers_path, "cache_key": key, "cache_hit": cached,
            "build_seconds": took, "tensorrt_version": trt.__version__, "device": asdict(device),
            "layers": report.to_dict(), "summary": summary + notes + ([timing_note] if timing_note else [])}


def _emit_trtexec(folder: str, onnx_name: str, stem: str, engine_path: str, layers_path: str,
                  plan: list[Profile], options: BuildOptions) -> dict[str, Any]:
    """Write ``NAME.trtexec.sh`` beside the ONNX graph: paths beside it are relative to the script's folder."""
    def rel(path: str) -> str:
        return os.path.basename(path) if os.path.dirname(path) == folder else path

    timing = options.timing_cache if options.timing_cache.lower() not in ("", "none") else None
    if not options.timing_cache:
        timing = stem + ".timing.cache"
    command = trtexec_command(onnx_name, rel(engine_path), rel(layers_path), plan, options,
                              os.path.abspath(timing) if timing and os.path.dirname(timing) else timing)
    script = os.path.join(folder, stem + ".trtexec.sh")
    write_bytes(script, trtexec_script(command).encode())
    os.chmod(script, 0o755)
    return {"engine": None, "trtexec": script, "trtexec_command": command,
            "summary": [f"tensorrt: wrote {os.path.basename(script)}, the trtexec command of the engine build "
                        f"(no engine built here): {command}"]}


def build_engine(trt, onnx_path: str, plan: list[Profile], options: BuildOptions, device: DeviceFacts
                 ) -> tuple[bytes, str, str | None]:
    """Build: ``(serialized engine, the inspector's JSON, a note on the timing cache or None)``."""
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors[:1]
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise BackendError(f"tensorrt: TensorRT {trt.__version__}'s ONNX parser refused "
                           f"{os.path.basename(onnx_path)}: {'; '.join(errors[:3]) or 'no reason given'}{more}")
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    workspace = workspace_bytes(options.workspace)
    if workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if plan:
        network_inputs = {t.name: t for t in (network.get_input(i) for i in range(network.num_inputs))}
        profile = builder.create_optimization_profile()
        for p in plan:
            tensor = network_inputs.get(p.name)
            if tensor is None:
                raise BackendError(f"tensorrt: the parsed network has no input '{p.name}' "
                                   f"(its inputs: {', '.join(network_inputs)})")
            if tensor.is_shape_tensor:
                raise UnsupportedError(f"tensorrt: input '{p.name}' is a shape tensor (its values set shapes); "
                                       f"graphopt builds profiles for data inputs only: build it with trtexec")
            profile.set_shape(p.name, p.min, p.opt, p.max)
        config.add_optimization_profile(profile)
    timing_path = _timing_cache_path(options, trt.__version__, device)
    note = None
    if timing_path:
        old = _read(timing_path) if os.path.isfile(timing_path) else b""
        if not config.set_timing_cache(config.create_timing_cache(old), False):
            config.set_timing_cache(config.create_timing_cache(b""), False)
            note = f"tensorrt: timing cache {timing_path} was made for another setup: not used"
    host = builder.build_serialized_network(network, config)
    if host is None:
        raise BackendError(f"tensorrt: TensorRT {trt.__version__} could not build the engine: "
                           f"{logger.errors[0] if logger.errors else 'no reason given'}")
    engine_bytes = bytes(memoryview(host))
    if timing_path:
        try:
            write_bytes(timing_path, bytes(memoryview(config.get_timing_cache().serialize())))
        except OutputError as exc:
            note = f"tensorrt: timing cache not saved: {exc}"
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise BackendError(f"tensorrt: the engine just built does not load: "
                           f"{logger.errors[-1] if logger.errors else 'no reason given'}")
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    return engine_bytes, info, note


def _timing_cache_path(options: BuildOptions, version: str, device: DeviceFacts) -> str | None:
    if options.timing_cache.lower() == "none":
        return None
    if options.timing_cache:
        return options.timing_cache
    cache = cache_folder(options)
    sm = device.compute_capability.replace(".", "")
    return os.path.join(cache, f"timing-trt{version}-sm{sm}.cache") if cache else None


def _logger(trt):
    """A TensorRT logger that keeps the errors (for the one-line error) and drops the rest."""
    class Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(first_line(Exception(msg)))

    return Log()


def _parser_error(error) -> str:
    """``node 'conv1' (Conv): <what>`` from an ``onnx`` parser error."""
    desc = first_line(Exception(error.desc()))
    if error.node() < 0:
        return desc
    return f"node '{error.node_name() or error.node()}' ({error.node_operator()}): {desc}"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """Write through a temporary file in the same folder, then move it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".graphopt-", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None


def _store(cache: str, key: str, engine_bytes: bytes, info: str, cache_mb: int) -> str | None:
    """Put a built engine and its layer report in the cache, after making room for it within ``cache_mb`` (the least
    recently used engines go first, with their reports); a failure is a report line, not an error."""
    try:
        if os.path.isdir(cache):
            trim_cache(cache, ".engine", max(0, (cache_mb << 20) - len(engine_bytes)), (".layers.json",))
        write_bytes(os.path.join(cache, key + ".layers.json"), info.encode())
        write_bytes(os.path.join(cache, key + ".engine"), engine_bytes)  # last: its presence means both are there
    except OutputError as exc:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(cache, key + ".layers.json"))
        return f"tensorrt: engine not cached: {exc}"
    return None

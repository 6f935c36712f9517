"""A stand-in for the ``tensorrt`` Python API, for testing graphopt's engine-build logic where TensorRT cannot run.

It defines only what :mod:`graphopt.backends.tensorrt_build` calls, with the real names and argument names,
checked against the pybind11 modules of the ``tensorrt-cu12-bindings`` wheels 10.0.1, 10.13.3.9, 10.16.1.11,
11.0.0.114 and 11.4.0.106 (``strings tensorrt.so``: class, method, enum-value and ``py::arg`` names, docstrings'
``:arg:`` lines) and the ``tensorrt-stubs`` 10.13.0.35.1 ``.pyi`` (signatures). Enum *values* are not in the
binaries; graphopt only uses ``int(flag)``, so the values here are the C++ headers' order.

Version switch: ``FAKE_TENSORRT_VERSION`` (default ``10.16.1.11``) read at import. The 10 / 11 differences
modelled (from the wheels' strings):

- ``BuilderFlag``: 10 has ``FP16``, ``BF16``, ``INT8``, ``FP8``, ``OBEY_PRECISION_CONSTRAINTS``,
  ``PREFER_PRECISION_CONSTRAINTS``; 11 has none of them (weak typing removed);
- ``NetworkDefinitionCreationFlag``: 10 has ``EXPLICIT_BATCH`` (deprecated, ignored) and ``STRONGLY_TYPED``;
  11 only ``STRONGLY_TYPED`` ("Deprecated in TensorRT 11.0. Strongly typed mode is always enabled");
- ``IBuilderConfig.int8_calibrator``: 10 only;
- the inspector's JSON: 10 lists ``"Bindings"`` (names), 11 ``"I/O Tensors"`` (objects).

What it does instead of TensorRT: the "parser" reads the ONNX file with ``onnx`` (inputs; ops in
``UNSUPPORTED_OPS`` become parser errors); a "build" records the network and config in ``BUILDS`` and returns
JSON bytes describing them; the inspector returns ``ENGINE_INFORMATION`` (set by the test) as is; the timing
cache is ``b"FAKETIMING:"`` plus one ``+`` per build that used it.
"""

from __future__ import annotations

import enum
import json
import os

import onnx

__version__ = os.environ.get("FAKE_TENSORRT_VERSION", "10.16.1.11")
_MAJOR = int(__version__.split(".")[0])

UNSUPPORTED_OPS: set[str] = set()  # test control: ops the fake parser refuses
ENGINE_INFORMATION = '{"Layers": []}'  # test control: what the inspector returns
BUILDS: list[dict] = []  # what each build_serialized_network call saw


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = Severity

    def __init__(self):
        self.min_severity = ILogger.Severity.WARNING

    def log(self, severity, msg):
        raise NotImplementedError


class Logger(ILogger):
    def __init__(self, min_severity=ILogger.Severity.WARNING):
        self.min_severity = min_severity

    def log(self, severity, msg):
        pass


NetworkDefinitionCreationFlag = enum.IntEnum(
    "NetworkDefinitionCreationFlag",
    {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if _MAJOR < 11 else {"STRONGLY_TYPED": 1})

_PRECISION_FLAGS = ["FP16", "BF16", "INT8", "FP8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"]
_OTHER_FLAGS = ["DEBUG", "GPU_FALLBACK", "DISABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS", "SAFETY_SCOPE",
                "DIRECT_IO", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "ERROR_ON_TIMING_CACHE_MISS",
                "DISABLE_COMPILATION_CACHE", "STRIP_PLAN", "REFIT_IDENTICAL", "WEIGHT_STREAMING"]
BuilderFlag = enum.IntEnum("BuilderFlag", (_PRECISION_FLAGS if _MAJOR < 11 else []) + _OTHER_FLAGS, start=0)
MemoryPoolType = enum.IntEnum("MemoryPoolType", ["WORKSPACE", "DLA_MANAGED_SRAM", "DLA_LOCAL_DRAM",
                                                 "DLA_GLOBAL_DRAM", "TACTIC_DRAM", "TACTIC_SHARED_MEMORY"], start=0)
ProfilingVerbosity = enum.IntEnum("ProfilingVerbosity", ["LAYER_NAMES_ONLY", "NONE", "DETAILED"], start=0)
LayerInformationFormat = enum.IntEnum("LayerInformationFormat", ["ONELINE", "JSON"], start=0)
DataType = enum.IntEnum("DataType", ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8", "BF16", "INT64",
                                     "INT4"], start=0)
ErrorCode = enum.IntEnum("ErrorCode", ["SUCCESS", "INTERNAL_ERROR", "MEM_ALLOC_FAILED", "MODEL_DESERIALIZE_FAILED",
                                       "INVALID_VALUE", "INVALID_GRAPH", "INVALID_NODE", "UNSUPPORTED_GRAPH",
                                       "UNSUPPORTED_NODE"], start=0)


class IHostMemory(bytes):
    """Real IHostMemory exposes the buffer protocol; a bytes subclass does too."""

    @property
    def nbytes(self) -> int:
        return len(self)


class ITensor:
    def __init__(self, name, shape, dtype=DataType.FLOAT):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype

    @property
    def is_shape_tensor(self) -> bool:
        return False


class INetworkDefinition:
    def __init__(self, flags):
        self.flags = flags
        self._inputs: list[ITensor] = []

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    def get_input(self, index: int) -> ITensor:
        return self._inputs[index]

    def get_flag(self, flag) -> bool:
        return bool(self.flags & (1 << int(flag)))


class ParserError:
    def __init__(self, node: int, name: str, op: str, desc: str):
        self._node, self._name, self._op, self._desc = node, name, op, desc

    def code(self):
        return ErrorCode.UNSUPPORTED_NODE

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node

    def node_name(self) -> str:
        return self._name

    def node_operator(self) -> str:
        return self._op

    def __str__(self) -> str:
        return f"In node {self._node} with name: {self._name} and operator: {self._op} ({self._desc})"


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: ILogger):
        self._network, self._logger, self._errors = network, logger, []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> ParserError:
        return self._errors[index]

    def clear_errors(self) -> None:
        self._errors = []

    def parse_from_file(self, model: str) -> bool:
        return self.parse(open(model, "rb").read(), model)

    def parse(self, model, path: str = None) -> bool:
        proto = onnx.load_from_string(bytes(model))
        for i, node in enumerate(proto.graph.node):
            if node.op_type in UNSUPPORTED_OPS:
                self._errors.append(ParserError(i, node.name, node.op_type,
                                                f"No importer registered for op: {node.op_type}"))
        init = {t.name for t in proto.graph.initializer}
        for value in proto.graph.input:
            if value.name not in init:
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
                self._network._inputs.append(ITensor(value.name, dims))
        return not self._errors


class IOptimizationProfile:
    def __init__(self):
        self._shapes = {}

    def set_shape(self, input: str, min, opt, max) -> None:
        self._shapes[input] = [list(min), list(opt), list(max)]

    def get_shape(self, input: str):
        return self._shapes.get(input)


class ITimingCache:
    def __init__(self, data: bytes):
        self._data = bytes(data) or b"FAKETIMING:"

    def serialize(self) -> IHostMemory:
        return IHostMemory(self._data)


class IBuilderConfig:
    def __init__(self):
        self.flags = 0
        self.profiling_verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY
        self._pools, self._profiles, self._timing = {}, [], None
        if _MAJOR < 11:
            self.int8_calibrator = None

    def set_flag(self, flag) -> None:
        self.flags |= 1 << int(flag)

    def get_flag(self, flag) -> bool:
        return bool(self.flags & (1 << int(flag)))

    def clear_flag(self, flag) -> None:
        self.flags &= ~(1 << int(flag))

    def set_memory_pool_limit(self, pool, pool_size: int) -> None:
        self._pools[MemoryPoolType(pool)] = int(pool_size)

    def get_memory_pool_limit(self, pool) -> int:
        return self._pools.get(MemoryPoolType(pool), 1 << 40)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self._profiles.append(profile)
        return len(self._profiles) - 1

    def create_timing_cache(self, serialized_timing_cache) -> ITimingCache:
        return ITimingCache(bytes(serialized_timing_cache))

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if not cache._data.startswith(b"FAKETIMING:") and not ignore_mismatch:
            return False
        self._timing = cache
        return True

    def get_timing_cache(self) -> ITimingCache:
        return self._timing


class Builder:
    def __init__(self, logger: ILogger):
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory:
        dynamic = [t.name for t in network._inputs if -1 in t.shape]
        profiled = {n for p in config._profiles for n in p._shapes}
        if any(n not in profiled for n in dynamic):  # what TensorRT refuses: a dynamic input without a profile
            self.logger.log(ILogger.Severity.ERROR, f"Network has dynamic or shape inputs, but no optimization "
                                                    f"profile has been defined for {dynamic[0]}.")
            return None
        record = {"network_flags": network.flags, "config_flags": config.flags,
                  "verbosity": config.profiling_verbosity.name,
                  "workspace": config._pools.get(MemoryPoolType.WORKSPACE),
                  "profiles": [p._shapes for p in config._profiles],
                  "timing_cache_in": config._timing._data.decode() if config._timing else None}
        BUILDS.append(record)
        if config._timing is not None:
            config._timing._data += b"+"
        return IHostMemory(b"FAKEENGINE" + json.dumps(record, sort_keys=True).encode())


class EngineInspector:
    def get_engine_information(self, format) -> str:
        return ENGINE_INFORMATION if format == LayerInformationFormat.JSON else "layers"

    def get_layer_information(self, layer_index: int, format) -> str:
        return json.dumps(json.loads(ENGINE_INFORMATION)["Layers"][layer_index])


class ICudaEngine:
    def __init__(self, data: bytes):
        self._data = data

    @property
    def num_layers(self) -> int:
        return len(json.loads(ENGINE_INFORMATION)["Layers"])

    def create_engine_inspector(self) -> EngineInspector:
        return EngineInspector()


class Runtime:
    def __init__(self, logger: ILogger):
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine) -> ICudaEngine:
        data = bytes(serialized_engine)
        return ICudaEngine(data) if data.startswith(b"FAKEENGINE") else None

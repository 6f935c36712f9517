"""The backend contract: what a backend runs fast in int8 (:class:`QuantScheme`, data), and how graphopt runs,
times and evaluates models on it (:class:`Backend`).

What the user asks for (:class:`QuantRequest`: int8 activations, per-tensor weights, only these op types) stays
separate from what a backend runs well (:class:`QuantScheme`). ``backend.scheme(request)`` reconciles the two:
a request it can honour changes the scheme, one it can honour only at a cost comes back with the cost in
``scheme.warnings``, and one it cannot honour raises :class:`UnsupportedRequestError`; nothing is dropped
silently. ``place-qdq`` reads the scheme and never asks which backend it is talking to, so a backend with another
scheme (TensorRT: symmetric int8 activations, bias left float) plugs in without changing it or its callers.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from types import MappingProxyType
from typing import Any, ClassVar, Iterable, Iterator, Mapping

import numpy as np

from graphopt.errors import GraphoptError, UsageError

INT8_DTYPES = ("uint8", "int8")
_QRANGE = {("uint8", False): (0, 255), ("uint8", True): (0, 254), ("int8", False): (-128, 127),
           ("int8", True): (-127, 127)}
BIAS_MODES = ("float", "int32")


class BackendError(GraphoptError):
    """A backend could not build, run or time a model (bad shapes, missing inputs, a runtime failure)."""


class UnsupportedRequestError(UsageError):
    """The user asked for quantization the backend cannot honour."""


# -- the scheme: data a backend states and place-qdq reads -------------------------------------------------
@dataclass(frozen=True)
class TensorQuant:
    """How one class of tensors (activations or weights) is quantized.

    ``dtype``: ``"uint8"`` or ``"int8"``. ``symmetric``: zero point fixed at the middle of the range (0 for
    int8, 128 for uint8) and the range centred on zero; otherwise the range is [min(lo, 0), max(hi, 0)] with a
    computed zero point. ``per_channel``: one scale per output channel (weights; the axis comes from
    :meth:`QuantScheme.channel_axis`). ``narrow_range``: int8 in [-127, 127] (uint8 [0, 254]), the range
    symmetric weights use so that negation cannot overflow.
    """

    dtype: str
    symmetric: bool
    per_channel: bool = False
    narrow_range: bool = False

    def __post_init__(self):
        if self.dtype not in INT8_DTYPES:
            raise ValueError(f"quantized dtype must be one of {INT8_DTYPES}, got {self.dtype!r}")

    @property
    def qmin(self) -> int:
        return _QRANGE[(self.dtype, self.narrow_range)][0]

    @property
    def qmax(self) -> int:
        return _QRANGE[(self.dtype, self.narrow_range)][1]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def params(self, lo, hi) -> tuple[np.ndarray, np.ndarray]:
        """Scale (float32) and zero point (this dtype) for real ranges [lo, hi] (scalars, or arrays per channel).

        The range always contains 0 (so that zero padding and Relu's zeros are exact); an empty range (lo = hi
        = 0) gets scale 1.
        """
        lo = np.minimum(np.asarray(lo, np.float64), 0.0)
        hi = np.maximum(np.asarray(hi, np.float64), 0.0)
        levels = float(self.qmax - self.qmin)
        if self.symmetric:
            amax = np.maximum(-lo, hi)
            scale = 2.0 * amax / levels
            zero = np.full(np.shape(scale), 0 if self.dtype == "int8" else 128, np.float64)
        else:
            scale = (hi - lo) / levels
            safe = np.where(scale > 0, scale, 1.0)
            zero = np.clip(np.round(self.qmin - lo / safe), self.qmin, self.qmax)
        scale = np.where(scale > 0, scale, 1.0)
        return scale.astype(np.float32), zero.astype(self.np_dtype)

    def describe(self) -> str:
        parts = [self.dtype, "symmetric" if self.symmetric else "asymmetric"]
        if self.per_channel:
            parts.append("per-channel")
        if self.narrow_range:
            parts.append(f"[{self.qmin}, {self.qmax}]")
        return " ".join(parts)


class FrozenDict(dict):
    """A read-only dict: hashable, picklable and deep-copyable (unlike ``MappingProxyType``)."""

    def _read_only(self, *args, **kwargs):
        raise TypeError("a QuantScheme's tables are read-only; make a new scheme with dataclasses.replace")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _read_only

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.items())))

    def __reduce__(self):
        return (type(self), (dict(self),))


@dataclass(frozen=True)
class QuantScheme:
    """What a backend runs fast in int8, as data. ``place-qdq`` reads it; it never branches on the backend.

    Op roles (ONNX op types; an op in none of them stays float, and the report lists it):

    - ``weight_channel_axis``: ops whose weight (input 1) is quantized, with the weight's output-channel axis:
      Conv 0, ConvTranspose 1, Gemm 1 (``transB=0``; 0 when ``transB=1``, see :meth:`channel_axis`),
      MatMul -1 (last). Negative axes count from the end.
    - ``quantized_ops``: ops with an int8 kernel: Q/DQ on their float inputs, a Q on their output with its own
      scale (they requantize). Weighted ops take int8 weights besides.
    - ``passthrough_ops``: ops that move int8 values without changing them (MaxPool, Reshape, Transpose, ...):
      their output shares the input's scale and zero point, so no requantization happens around them.
    - ``fused_activations``: activations (Relu, Clip) absorbed by the quantization of the op before them: that
      op's output Q is calibrated on the activation's output, whose clamp the Q's range performs.

    Placement: ``residual_add_qdq`` — both inputs of an Add (the residual one too) get Q/DQ, as the backend's
    int8 Add / fusion needs. ``bias``: ``"float"`` — the bias of Conv/Gemm stays float and the backend folds it
    to int32 itself (scale = input scale × weight scale, zero point 0); ``"int32"`` — place-qdq writes it as
    int32 behind a DequantizeLinear with that scale. ``format`` is ``"QDQ"`` (QuantizeLinear/DequantizeLinear
    pairs in a float graph, which the backend fuses); ``min_opset`` is the opset the placement needs (13:
    per-channel DequantizeLinear). ``warnings`` carry the cost of a request honoured against the backend's
    advice; a pass copies them into its context (``ctx.warn``) so the user sees them.
    """

    backend: str
    activations: TensorQuant
    weights: TensorQuant
    weight_channel_axis: Mapping[str, int]
    quantized_ops: frozenset[str]
    passthrough_ops: frozenset[str] = frozenset()
    fused_activations: frozenset[str] = frozenset()
    residual_add_qdq: bool = True
    bias: str = "float"
    format: str = "QDQ"
    min_opset: int = 13
    warnings: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "weight_channel_axis", FrozenDict(self.weight_channel_axis))
        for name in ("quantized_ops", "passthrough_ops", "fused_activations"):
            object.__setattr__(self, name, frozenset(getattr(self, name)))
        object.__setattr__(self, "warnings", tuple(self.warnings))
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.activations.per_channel:
            raise ValueError("per-channel activations are not a scheme graphopt places (weights only)")
        missing = set(self.weight_channel_axis) - self.quantized_ops
        if missing:
            raise ValueError(f"weighted ops {sorted(missing)} must also be in quantized_ops")
        both = self.quantized_ops & self.passthrough_ops
        if both:
            raise ValueError(f"ops {sorted(both)} cannot both requantize and pass int8 through")

    # -- questions place-qdq asks -------------------------------------------------------------------------
    @property
    def weighted_ops(self) -> frozenset[str]:
        return frozenset(self.weight_channel_axis)

    def takes_int8(self, op_type: str) -> bool:
        """Whether ``op_type`` runs on int8 inputs (requantizing or passing them through)."""
        return op_type in self.quantized_ops or op_type in self.passthrough_ops

    def channel_axis(self, op_type: str, attrs: Mapping[str, Any] | None = None, weight_rank: int | None = None
                     ) -> int | None:
        """The weight's output-channel axis for per-channel scales (None: per-tensor, or not a weighted op).

        Gemm's weight is ``B``: (K, N) with ``transB=0`` -> axis 1, (N, K) with ``transB=1`` -> axis 0.
        A negative axis is made positive when ``weight_rank`` is given.
        """
        if not self.weights.per_channel or op_type not in self.weight_channel_axis:
            return None
        axis = self.weight_channel_axis[op_type]
        if op_type == "Gemm" and attrs and int(attrs.get("transB", 0)):
            axis = 0
        if axis < 0 and weight_rank is not None:
            axis += weight_rank
        return axis

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "activations": asdict(self.activations), "weights": asdict(self.weights),
                "weight_channel_axis": dict(self.weight_channel_axis), "quantized_ops": sorted(self.quantized_ops),
                "passthrough_ops": sorted(self.passthrough_ops), "fused_activations": sorted(self.fused_activations),
                "residual_add_qdq": self.residual_add_qdq, "bias": self.bias, "format": self.format,
                "min_opset": self.min_opset, "warnings": list(self.warnings)}

    def describe(self) -> str:
        return (f"{self.backend}: activations {self.activations.describe()}, weights {self.weights.describe()}, "
                f"{self.format}, bias {'folded to int32 by the backend' if self.bias == 'float' else 'int32'}")


@dataclass(frozen=True)
class QuantRequest:
    """What the user asked for. ``None`` means "the backend's choice".

    ``op_types``: quantize only these op types; ``exclude_op_types``: keep these float. (Excluding single nodes,
    and keeping the first/last layer float, are placement options of the pass, not part of the scheme.)
    """

    activation_dtype: str | None = None
    activation_symmetric: bool | None = None
    weight_dtype: str | None = None
    weight_symmetric: bool | None = None
    per_channel: bool | None = None
    op_types: frozenset[str] | None = None
    exclude_op_types: frozenset[str] = frozenset()

    def __post_init__(self):
        for name in ("activation_dtype", "weight_dtype"):
            value = getattr(self, name)
            if value is not None and value not in INT8_DTYPES:
                raise UnsupportedRequestError(f"{name.replace('_', ' ')} must be one of {INT8_DTYPES}, got {value!r}")
        if self.op_types is not None:
            object.__setattr__(self, "op_types", frozenset(self.op_types))
        object.__setattr__(self, "exclude_op_types", frozenset(self.exclude_op_types))


def restrict_ops(scheme: QuantScheme, request: QuantRequest, why_not: Mapping[str, str] = MappingProxyType({})
                 ) -> QuantScheme:
    """``scheme`` limited to the op types ``request`` allows. Asking for an op type the scheme has no int8
    kernel for raises (``why_not`` may explain a particular op); excluding one is always possible."""
    known = scheme.quantized_ops | scheme.passthrough_ops | scheme.fused_activations
    keep = known
    if request.op_types is not None:
        unsupported = sorted(request.op_types - known)
        if unsupported:
            reasons = "; ".join(f"{op}: {why_not[op]}" for op in unsupported if op in why_not)
            raise UnsupportedRequestError(
                f"backend '{scheme.backend}' has no int8 kernel for {', '.join(unsupported)}"
                + (f" ({reasons})" if reasons else "")
                + f"; it quantizes {', '.join(sorted(known))}")
        keep = frozenset(request.op_types)
    keep = keep - request.exclude_op_types
    axes = {op: axis for op, axis in scheme.weight_channel_axis.items() if op in keep}
    return replace(scheme, weight_channel_axis=axes, quantized_ops=scheme.quantized_ops & keep,
                   passthrough_ops=scheme.passthrough_ops & keep, fused_activations=scheme.fused_activations & keep)


# -- timing results ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatencyStats:
    """Latency of one (batch size, threads) setting over ``iters`` timed runs, in milliseconds."""

    batch: int
    threads: int
    iters: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def from_times(cls, batch: int, threads: int, seconds: Iterable[float]) -> "LatencyStats":
        ms = np.asarray(list(seconds), np.float64) * 1000.0
        if ms.size == 0:
            raise ValueError("no timed runs")
        p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
        return cls(batch, threads, int(ms.size), p50, p90, p99, float(ms.mean()), float(ms.min()), float(ms.max()))

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency."""
        return self.batch * 1000.0 / self.p50_ms if self.p50_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "samples_per_s": self.throughput}


@dataclass
class BenchResult:
    model: str
    backend: str
    size_bytes: int
    warmup: int
    rows: list[LatencyStats] = field(default_factory=list)
    input_shapes: dict[int, dict[str, list[int]]] = field(default_factory=dict)  # batch -> input name -> shape

    def get(self, batch: int, threads: int) -> LatencyStats:
        for row in self.rows:
            if row.batch == batch and row.threads == threads:
                return row
        raise KeyError((batch, threads))

    def table(self) -> str:
        rows = [("batch", "threads", "p50 ms", "p90 ms", "p99 ms", "mean ms", "samples/s")]
        for r in self.rows:
            rows.append((str(r.batch), str(r.threads), f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}", f"{r.p99_ms:.3f}",
                         f"{r.mean_ms:.3f}", f"{r.throughput:,.1f}"))
        return format_table(rows)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "backend": self.backend, "size_bytes": self.size_bytes, "warmup": self.warmup,
                "input_shapes": {str(b): s for b, s in self.input_shapes.items()},
                "latency": [r.to_dict() for r in self.rows]}


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def __str__(self) -> str:
        return f"{100 * self.accuracy:.2f}% ({self.correct}/{self.total})"

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total}


def format_table(rows: list[tuple[str, ...]], right: Iterable[int] = ()) -> str:
    """Rows of strings as aligned columns, a dashed rule under the header (the style of the run report)."""
    right = set(right)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    lines = [line(row).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- inputs -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """A model input as a backend reports it: dims are ints, or None where symbolic / unknown."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype

    def concrete(self, batch: int, override: Iterable[int | None] | None = None) -> tuple[int, ...]:
        """The shape to feed at ``batch``: symbolic first dim -> ``batch``, other symbolic dims -> 1. An
        ``override`` replaces the model's shape; its None / -1 entries take the batch size."""
        if override is not None:
            return tuple(batch if d is None or d < 0 else int(d) for d in override)
        return tuple((batch if i == 0 else 1) if d is None else d for i, d in enumerate(self.shape))

    @property
    def batch_dim(self) -> int | None:
        """The fixed first dimension, or None if it is symbolic (or the input is a scalar)."""
        return self.shape[0] if self.shape else None


def random_inputs(specs: Iterable[InputSpec], batch: int, seed: int = 0,
                  shapes: Mapping[str, Iterable[int | None]] | None = None) -> dict[str, np.ndarray]:
    """Fixed-seed inputs: standard normal floats, 0/1 integers, False booleans."""
    rng = np.random.default_rng(seed)
    shapes = shapes or {}
    feeds = {}
    for spec in specs:
        shape = spec.concrete(batch, shapes.get(spec.name))
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feeds[spec.name] = np.zeros(shape, np.bool_)
        else:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
    return feeds


def check_feeds(specs: list[InputSpec], data: Mapping[str, np.ndarray], what: str = "data") -> int:
    """Check ``data`` has one array per model input with a common first dimension; return that sample count."""
    names = [s.name for s in specs]
    missing = [n for n in names if n not in data]
    if missing:
        raise BackendError(f"{what} has no array for model input(s) {', '.join(missing)} "
                           f"(model inputs: {', '.join(names)}; {what} has: {', '.join(sorted(data)) or 'nothing'})")
    counts = {n: (np.asarray(data[n]).shape[0] if np.ndim(data[n]) else 1) for n in names}
    if len(set(counts.values())) != 1:
        raise BackendError(f"{what}: inputs have different sample counts: "
                           + ", ".join(f"{n} {c}" for n, c in counts.items()))
    for spec in specs:
        arr = np.asarray(data[spec.name])
        if arr.ndim != len(spec.shape):
            raise BackendError(f"{what}: input '{spec.name}' has {arr.ndim} dimensions, the model expects "
                               f"{len(spec.shape)} ({_fmt_shape(spec.shape)})")
        bad = [i for i, d in enumerate(spec.shape) if i > 0 and d is not None and arr.shape[i] != d]
        if bad:
            raise BackendError(f"{what}: input '{spec.name}' has shape {tuple(arr.shape)}, the model expects "
                               f"{_fmt_shape(spec.shape)}")
    return next(iter(counts.values())) if counts else 0


def _fmt_shape(shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def iter_batches(specs: list[InputSpec], data: Mapping[str, np.ndarray], batch_size: int
                 ) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Yield ``(feeds, n_real)``: ``data`` cut into batches. A model with a fixed first dimension k gets
    batches of exactly k, the last one padded by repeating its final sample (``n_real`` says how many rows of
    the outputs are real)."""
    total = check_feeds(specs, data)
    fixed = {s.batch_dim for s in specs if s.batch_dim is not None}
    if len(fixed) > 1:
        raise BackendError(f"model inputs have different fixed batch dimensions {sorted(fixed)}")
    step = fixed.pop() if fixed else max(1, batch_size)
    for start in range(0, total, step):
        n = min(step, total - start)
        feeds = {}
        for s in specs:
            chunk = np.asarray(data[s.name][start:start + n]).astype(s.dtype, copy=False)
            if n < step and s.batch_dim is not None:
                pad = np.repeat(chunk[-1:], step - n, axis=0)
                chunk = np.concatenate([chunk, pad], axis=0)
            feeds[s.name] = chunk
        yield feeds, n


def model_size_bytes(model: Any) -> int:
    """Bytes of a model as stored: an .onnx path and its external data files, or a serialized ModelProto."""
    if isinstance(model, (str, os.PathLike)):
        import onnx
        from onnx.external_data_helper import uses_external_data

        path = os.fspath(model)
        size = os.path.getsize(path)
        proto = onnx.load(path, load_external_data=False)
        locations = set()
        for tensor in proto.graph.initializer:
            if uses_external_data(tensor):
                locations.update(e.value for e in tensor.external_data if e.key == "location")
        folder = os.path.dirname(os.path.abspath(path))
        return size + sum(os.path.getsize(os.path.join(folder, loc)) for loc in locations
                          if os.path.exists(os.path.join(folder, loc)))
    if isinstance(model, (bytes, bytearray)):
        return len(model)
    if hasattr(model, "to_model"):  # OnnxGraph
        model = model.to_model()
    if hasattr(model, "ByteSize"):
        return int(model.ByteSize())
    raise TypeError(f"cannot size a {type(model).__name__}")


def model_label(model: Any) -> str:
    return os.fspath(model) if isinstance(model, (str, os.PathLike)) else f"<{type(model).__name__}>"


# -- the backend contract -----------------------------------------------------------------------------------
class Backend(ABC):
    """A runtime graphopt targets: its int8 scheme, and sessions to run, time and evaluate models on it.

    ``model`` arguments take an .onnx path, an ``onnx.ModelProto``, an :class:`graphopt.ir.OnnxGraph` or
    serialized bytes; a ``session`` made by :meth:`session` is accepted wherever a model is run.
    """

    name: ClassVar[str] = ""

    @abstractmethod
    def scheme(self, request: QuantRequest | None = None) -> QuantScheme:
        """The int8 scheme this backend runs fast, adjusted to ``request``; a request it cannot honour raises
        :class:`UnsupportedRequestError`, one honoured at a cost says so in ``scheme.warnings``."""

    @abstractmethod
    def session(self, model: Any, threads: int = 0) -> Any:
        """A ready-to-run session on ``model`` (``threads`` intra-op threads; 0: the backend's default)."""

    @abstractmethod
    def input_specs(self, session: Any) -> list[InputSpec]:
        """The inputs of a session: names, shapes (None where symbolic), numpy dtypes."""

    @abstractmethod
    def output_names(self, session: Any) -> list[str]:
        ...

    @abstractmethod
    def run(self, session: Any, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """One run: the outputs as numpy arrays, in the model's output order."""

    def _as_session(self, model: Any, threads: int = 0) -> Any:
        return model if self.is_session(model) else self.session(model, threads)

    def is_session(self, obj: Any) -> bool:
        return False

    def run_batched(self, model: Any, data: Mapping[str, np.ndarray], batch_size: int = 32, threads: int = 0
                    ) -> list[np.ndarray]:
        """Run ``data`` (one array per input, samples along the first axis) in batches; outputs concatenated."""
        session = self._as_session(model, threads)
        specs = self.input_specs(session)
        parts: list[list[np.ndarray]] = []
        for feeds, n in iter_batches(specs, data, batch_size):
            outs = self.run(session, feeds)
            parts.append([o[:n] if np.ndim(o) else o for o in outs])
        if not parts:
            raise BackendError("no samples to run")
        return [np.concatenate([p[i] for p in parts], axis=0) if np.ndim(parts[0][i]) else parts[0][i]
                for i in range(len(parts[0]))]

    def bench(self, model: Any, batch_sizes: Iterable[int] = (1,), threads: Iterable[int] = (1,), warmup: int = 10,
              iters: int = 50, shapes: Mapping[str, Iterable[int | None]] | None = None, seed: int = 0
              ) -> BenchResult:
        """Latency percentiles per (batch size, threads): ``warmup`` untimed runs, then ``iters`` timed ones on
        fixed-seed inputs (see :meth:`InputSpec.concrete` for how shapes are filled; ``shapes`` overrides them
        per input name). One session per thread count, shared by the batch sizes."""
        batch_sizes, threads = list(batch_sizes), list(threads)
        if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
            raise UsageError(f"batch sizes must be positive integers, got {batch_sizes}")
        if not threads or any(int(t) < 1 for t in threads):
            raise UsageError(f"thread counts must be positive integers, got {threads}")
        if iters < 1 or warmup < 0:
            raise UsageError(f"iters must be >= 1 and warmup >= 0 (got iters={iters}, warmup={warmup})")
        result = BenchResult(model_label(model), self.name,
                             model_size_bytes(model) if not self.is_session(model) else 0, warmup)
        for t in threads:
            session = self.session(model, int(t))
            specs = self.input_specs(session)
            unknown = sorted(set(shapes or {}) - {s.name for s in specs})
            if unknown:
                raise UsageError(f"shape given for unknown input(s) {', '.join(unknown)} "
                                 f"(model inputs: {', '.join(s.name for s in specs)})")
            for b in batch_sizes:
                b = int(b)
                for s in specs:
                    if s.batch_dim is not None and s.batch_dim != b and (shapes or {}).get(s.name) is None:
                        raise BackendError(
                            f"input '{s.name}' has a fixed batch dimension {s.batch_dim}; batch {b} needs a model "
                            f"with a dynamic first dimension (export with dynamic_batch=True) or batch {s.batch_dim}")
                feeds = random_inputs(specs, b, seed, shapes)
                result.input_shapes[b] = {k: list(v.shape) for k, v in feeds.items()}
                for _ in range(warmup):
                    self.run(session, feeds)
                times = []
                for _ in range(iters):
                    start = time.perf_counter()
                    self.run(session, feeds)
                    times.append(time.perf_counter() - start)
                result.rows.append(LatencyStats.from_times(b, int(t), times))
        return result

    def evaluate(self, model: Any, data: Mapping[str, np.ndarray], labels: np.ndarray, batch_size: int = 64,
                 output: int = 0, threads: int = 0) -> Accuracy:
        """Top-1 accuracy of output ``output`` (logits, classes on the last axis) against integer ``labels``."""
        from graphopt.report.metrics import top1_correct

        logits = self.run_batched(model, data, batch_size, threads)[output]
        labels = np.asarray(labels)
        if labels.shape[0] != logits.shape[0]:
            raise BackendError(f"{labels.shape[0]} labels for {logits.shape[0]} samples")
        return Accuracy(top1_correct(logits, labels), int(labels.shape[0]))

"""The backend contract: how graphopt runs, times and evaluates models on a runtime (:class:`Backend`), and what the
runtime runs fast in int8 (:class:`QuantScheme`, data, in :mod:`graphopt.backends.scheme`), and what timing and
evaluation give back (:mod:`graphopt.backends.results`); both re-exported here."""

from __future__ import annotations

import copy
import inspect
import json
import os
import time
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Iterable, Iterator, Mapping

import numpy as np

from graphopt.backends.results import Accuracy, BenchResult, LatencyStats
from graphopt.backends.scheme import (
    BIAS_MODES,
    INT8_DTYPES,
    FrozenDict,
    QuantRequest,
    QuantScheme,
    TensorQuant,
    UnsupportedRequestError,
    restrict_ops,
)
from graphopt.errors import UnsupportedError, UsageError
from graphopt.ir.feeds import InputSpec, feeds
from graphopt.numeric import top1_correct

__all__ = [
    "BIAS_MODES", "INT8_DTYPES", "Accuracy", "Backend", "BackendError", "BenchResult", "DataError", "FrozenDict",
    "InputSpec", "LatencyStats", "QuantRequest", "QuantScheme", "TensorQuant", "UnsupportedRequestError",
    "THREADS_ENV", "check_feeds", "default_threads", "iter_batches", "model_label", "model_size_bytes",
    "restrict_ops",
]

THREADS_ENV = "GRAPHOPT_THREADS"


def default_threads() -> int:
    """The intra-op threads a session gets when none are asked for: ``$GRAPHOPT_THREADS`` when set (a worker's
    share of the cores: graphopt's executors set it in their worker processes, so that two trials side by side do
    not each start a pool of every core), else 0 (the runtime's own default, one thread per core)."""
    try:
        return max(0, int(os.environ.get(THREADS_ENV, "0")))
    except ValueError:
        return 0


class BackendError(UnsupportedError):
    """A backend could not build, run or time a model (a runtime failure, an input type it cannot feed)."""


class DataError(UsageError):
    """Data given for a model does not fit it: missing inputs, wrong shapes, labels that do not match."""


def check_classes(labels, logits, where: str = "") -> None:
    """Labels must be classes of the logits (0 to classes - 1): a label -1, or 10 of 10 classes, would count as
    wrong for every model alike and lower the accuracy without a word. DataError, prefixed with ``where``."""
    labels, classes = np.asarray(labels), np.shape(logits)[-1] if np.ndim(logits) else 0
    if labels.dtype == np.bool_ and classes != 2:
        raise DataError(f"{where}labels are booleans, but the model has {classes} outputs: give class indices "
                        f"0 to {classes - 1}")
    if labels.size and labels.dtype != np.bool_ and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"{where}labels must be classes 0 to {classes - 1} of the model's {classes} outputs; they "
                        f"hold {int(labels.min())} to {int(labels.max())}")


# -- data for a model (inputs are :class:`graphopt.ir.feeds.InputSpec`) -----------------------------------
def check_feeds(specs: list[InputSpec], data: Mapping[str, np.ndarray], what: str = "data") -> int:
    """Check ``data`` has one array per model input with a common first dimension; return that sample count."""
    names = [s.name for s in specs]
    missing = [n for n in names if n not in data]
    if missing:
        raise DataError(f"{what} has no array for model input(s) {', '.join(missing)} "
                        f"(model inputs: {', '.join(names)}; {what} has: {', '.join(sorted(data)) or 'nothing'})")
    counts = {n: (np.asarray(data[n]).shape[0] if np.ndim(data[n]) else 1) for n in names}
    if len(set(counts.values())) != 1:
        raise DataError(f"{what}: inputs have different sample counts: "
                        + ", ".join(f"{n} {c}" for n, c in counts.items()))
    for spec in specs:
        arr = np.asarray(data[spec.name])
        if arr.ndim != len(spec.shape):
            raise DataError(f"{what}: input '{spec.name}' has {arr.ndim} dimensions, the model expects "
                            f"{len(spec.shape)} ({spec.shape_str()})")
        bad = [i for i, d in enumerate(spec.shape) if i > 0 and isinstance(d, int) and arr.shape[i] != d]
        if bad:
            raise DataError(f"{what}: input '{spec.name}' has shape {tuple(arr.shape)}, the model expects "
                            f"{spec.shape_str()}")
    return next(iter(counts.values())) if counts else 0


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
    """Bytes of a model as stored: an .onnx path and its external data files, a PyTorch file (a torch.export
    program, an AOTInductor package: the file), a serialized ModelProto; for an FX graph or nn.Module, the bytes of
    its parameters and buffers."""
    if isinstance(model, (str, os.PathLike)):
        import onnx
        from onnx.external_data_helper import uses_external_data

        from graphopt.ir.torch_files import looks_like_torch_file

        path = os.fspath(model)
        size = os.path.getsize(path)
        if not path.lower().endswith(".onnx") and looks_like_torch_file(path):  # a program, a package: one file
            return size
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
    module = getattr(model, "gm", model)  # FxGraph -> its GraphModule
    if hasattr(module, "state_dict"):
        return int(sum(t.numel() * t.element_size() for t in module.state_dict().values()))
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
    irs: ClassVar[frozenset[str]] = frozenset({"onnx"})  # the IRs it runs (and times, compares, evaluates)
    # A backend's options, like a pass's: a frozen dataclass, set from ``--backend name:key=value:...`` (see
    # :func:`graphopt.backends.get_backend`); None: it has none. ``options`` holds the values of this instance.
    Options: ClassVar[type | None] = None
    options: Any = None
    # Optional: a backend that can profile the graph it actually runs defines
    # ``profile_kernels(model, feeds, runs, threads) -> [{"node", "op", "us"}]`` (its optimized graph's kernels, each
    # named after the node or tensor it came from, with its time per run); the latency guard then starts from it
    # (:mod:`graphopt.report.kernel_profile`). None: it cannot.
    profile_kernels: Any = None
    # The packages whose version decides what the backend computes and how fast: a study's cached trials are
    # keyed by them too (an upgraded onnxruntime rounds and fuses differently)
    runtime_packages: ClassVar[tuple[str, ...]] = ()

    def runtime_versions(self) -> dict[str, str]:
        """``{package: version}`` of :attr:`runtime_packages` as installed (absent ones left out)."""
        from importlib.metadata import PackageNotFoundError, version

        found = {}
        for package in self.runtime_packages:
            try:
                found[package] = version(package)
            except PackageNotFoundError:
                pass
        return found

    def spec(self) -> str:
        """The ``--backend`` text that makes this backend again (:func:`graphopt.backends.get_backend`): its name,
        then the options that differ from their defaults (``openvino:precision=bf16``). What a constructor was
        given beyond its options (``reduce_range``, providers) is not in it: :meth:`init_args` is."""
        from graphopt.passes.options import format_options

        text = format_options(self.options) if self.Options is not None and self.options is not None else ""
        return f"{self.name}:{text}" if text else self.name

    def init_args(self) -> dict[str, Any]:
        """What this backend's constructor was given, read back from the attributes of the same names (those it
        keeps as plain data: strings, numbers, booleans, lists and dicts of them; tuples as lists). With
        :meth:`spec`, what a study records so that its trials, in any process, run on this very backend
        (:meth:`remade`): a study made on ``OnnxRuntimeBackend(providers=...)`` or with ``reduce_range`` set must
        not be scored on the registered default."""
        args = {}
        for name in inspect.signature(type(self).__init__).parameters:
            if name != "self" and hasattr(self, name):
                try:  # as JSON holds it (tuples as lists), so that a study's record compares equal once read back
                    args[name] = json.loads(json.dumps(getattr(self, name)))
                except (TypeError, ValueError):  # an object JSON cannot hold: not recorded
                    pass
        return args

    def remade(self, args: Mapping[str, Any]) -> "Backend":
        """A backend of this class made with ``args`` (from :meth:`init_args`), with this one's options."""
        fresh = type(self)(**args)
        if self.Options is not None:
            fresh.options = self.options
        return fresh

    def configured(self, options: Any) -> "Backend":
        """This backend with ``options`` (an ``Options`` instance); the registered instance is left unchanged."""
        clone = copy.copy(self)
        clone.options = options
        return clone

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

    def write(self, graph: Any, path: str) -> dict[str, Any]:
        """Write ``graph`` (an optimized :class:`graphopt.ir.Graph`) to ``path`` as this backend deploys it; return
        facts about the artifact for the report (a ``summary`` list of lines to print, the rest for the JSON).
        Default: the graph's own format (``graph.save``), no facts."""
        graph.save(path)
        return {}

    def lint_rules(self) -> tuple:
        """The placement rules ``graphopt verify --backend NAME`` checks a Q/DQ graph against
        (:class:`graphopt.backends.lint.LintRule` instances, built on this backend's scheme). Default: none."""
        return ()

    def files(self, output: str) -> list[tuple[str, str]]:
        """The files this backend writes besides ``output`` when a run writes it, as ``(option, path)``: checked with
        the run's other files before any pass runs (none is a file the run reads, every folder exists). Default:
        none."""
        return []

    def folders(self, output: str) -> list[tuple[str, str]]:
        """The folders this backend writes :meth:`files` into and makes when missing, as ``(option, folder)``
        (checked as ``--report DIR`` is: not a file, writable where it will be made). Default: none."""
        return []

    def write_beside(self, graph: Any, path: str) -> dict[str, Any]:
        """Once ``graph`` is written at ``path`` in its own format (an ONNX run writes it there, staged, then calls
        this before moving it into place: files written in ``path``'s folder move with it, and nothing moves if
        this raises), write what the backend deploys from it beside it (an engine) and return facts for the
        report, as :meth:`write`. Default: nothing."""
        return {}

    def run_written(self, path: str, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray] | None:
        """The written ONNX file ``path`` run here on ``feeds``, for the numeric check's look at it on this backend
        (:meth:`graphopt.passes.check.NumericCheck.check_on_backend`); None where that adds nothing: onnxruntime's
        run is the check's own, and a backend that cannot run here (TensorRT without a GPU) measures on it too."""
        return None

    def refuse_ir(self, ir: str) -> str | None:
        """Why a run on this backend must refuse a model of IR ``ir`` outright (None: it is accepted, even when the
        backend cannot time it, as a PyTorch model with the default onnxruntime backend is optimized and saved)."""
        return None

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
        for batch, n in iter_batches(specs, data, batch_size):
            outs = self.run(session, batch)
            parts.append([o[:n] if np.ndim(o) else o for o in outs])
        if not parts:
            raise DataError("no samples to run")
        return [np.concatenate([p[i] for p in parts], axis=0) if np.ndim(parts[0][i]) else parts[0][i]
                for i in range(len(parts[0]))]

    def bench(self, model: Any, batch_sizes: Iterable[int] | None = (1,), threads: Iterable[int] = (1,),
              warmup: int = 10, iters: int = 50, shapes: Mapping[str, Iterable[int | None]] | None = None, seed: int = 0
              ) -> BenchResult:
        """Latency percentiles per (batch size, threads): ``warmup`` untimed runs, then ``iters`` timed ones on
        fixed-seed inputs (:func:`graphopt.ir.feeds.feeds`; see :meth:`InputSpec.concrete` for how shapes are
        filled; ``shapes`` overrides them per input name). One session per thread count, shared by the batch
        sizes. ``batch_sizes=None``: 1, or the batch the model fixes (a static package exported at 2)."""
        own = batch_sizes is None
        batch_sizes, threads = [1] if own else list(batch_sizes), list(threads)
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
            emulated = getattr(session, "_graphopt_emulated", None)
            if emulated:  # an emulation's latency says nothing of the model's
                raise BackendError(f"{self.name} runs this model only as an emulation ({emulated}): its latency "
                                   f"is not measured here (on its backend: a GPU for TensorRT's bfloat16)")
            specs = self.input_specs(session)
            unknown = sorted(set(shapes or {}) - {s.name for s in specs})
            if unknown:
                raise UsageError(f"shape given for unknown input(s) {', '.join(unknown)} "
                                 f"(model inputs: {', '.join(s.name for s in specs)})")
            fixed = [s.batch_dim for s in specs if s.batch_dim is not None]
            for b in [min(fixed)] if own and fixed else batch_sizes:
                b = int(b)
                for s in specs:
                    if s.batch_dim is not None and s.batch_dim != b and (shapes or {}).get(s.name) is None:
                        raise UsageError(
                            f"input '{s.name}' has a fixed batch dimension {s.batch_dim}; batch {b} needs a model "
                            f"with a dynamic first dimension (export with dynamic_batch=True) or batch {s.batch_dim}")
                for name, dims in (shapes or {}).items():
                    first = next(iter(dims), None)  # None, -1: the batch
                    if first is not None and first > 0 and first != b:  # it would run that batch, not the one asked
                        raise UsageError(f"the shape given for '{name}' fixes its first dimension at {first}, not "
                                         f"batch {b}: write N for the batch ({name}=Nx...) or ask for batch {first}")
                inputs = feeds(specs, seed, b, shapes=shapes)
                result.input_shapes[b] = {k: list(v.shape) for k, v in inputs.items()}
                for _ in range(warmup):
                    self.run(session, inputs)
                times = []
                for _ in range(iters):
                    start = time.perf_counter()
                    self.run(session, inputs)
                    times.append(time.perf_counter() - start)
                result.rows.append(LatencyStats.from_times(b, int(t), times))
        return result

    def evaluate(self, model: Any, data: Mapping[str, np.ndarray], labels: np.ndarray, batch_size: int = 64,
                 output: int = 0, threads: int = 0) -> Accuracy:
        """Top-1 accuracy of output ``output`` (logits, classes on the last axis) against integer ``labels``."""
        logits = self.run_batched(model, data, batch_size, threads)[output]
        labels = np.asarray(labels)
        if labels.shape[0] != logits.shape[0]:
            raise DataError(f"{labels.shape[0]} labels for {logits.shape[0]} samples")
        check_classes(labels, logits)
        return Accuracy(top1_correct(logits, labels), int(labels.shape[0]))

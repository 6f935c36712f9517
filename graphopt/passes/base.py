"""The pass contract.

A pass is a class with a ``name``, the ``irs`` it supports, how faithful it is (``equivalence``), typed
``Options`` (a frozen dataclass), and ``run_<ir>(graph, ctx) -> PassResult`` for each IR it declares. It may
check ``requires`` (preconditions) and ``ensures`` (postconditions); both raise errors that name the pass.

``PassResult.modified`` must be honest: a second run of a pass on its own output reports ``False``. ``stats``
are counts for the report, keyed ``"<verb> <object>"`` (``{"folded BatchNormalization": 20}`` is shown as
"folded 20 BatchNormalization"); ``skipped`` counts the nodes a pass left alone by reason, ``notes`` say it in words.
A pass made of rewrite rules (:mod:`graphopt.passes.rules`) fills all three from its rules.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, ClassVar, Protocol

from graphopt.errors import PassError, UnsupportedIRError, UsageError
from graphopt.ir.base import Graph

IRS = frozenset({"onnx", "fx"})


class Equivalence(str, Enum):
    """What the numeric-check instrument holds a pass to."""

    EXACT = "exact"  # outputs equal the input model's within float tolerance
    APPROXIMATE = "approximate"  # outputs close (quantization, fp16): measured and reported, not enforced
    NONE = "none"  # outputs are meant to change (pruning before fine-tuning): not compared


@dataclass(frozen=True)
class NoOptions:
    """This pass takes no options."""


@dataclass
class PassResult:
    graph: Graph
    modified: bool
    stats: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # things the user should know (skipped nodes, ...)
    # nodes left as they were, counted by why: "<what> <reason>" -> count (rule passes: graphopt.passes.rules)
    skipped: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        parts = []
        for key, count in self.stats.items():
            verb, _, obj = key.partition(" ")
            parts.append(f"{verb} {count} {obj}".rstrip())
        return ", ".join(parts) if parts else ("changed" if self.modified else "no change")


class SchemeSource(Protocol):
    """What a pass needs of the run's backend: its quantization scheme (:class:`graphopt.backends.Backend`)."""

    name: str

    def scheme(self, request: Any = None) -> Any: ...


@dataclass
class PassContext:
    """Everything a pass may need besides the graph. No pass keeps global state."""

    log: logging.Logger = field(default_factory=lambda: logging.getLogger("graphopt"))
    seed: int = 0
    # the run's backend (graphopt run --backend, optimize(backend=)): every quantization pass reads its scheme
    backend: SchemeSource | None = None
    calibration: Any = None  # a graphopt.calib CalibrationData: .batches() yields {input name: array}
    registry: Any = None  # the plugin Registry (channel handlers, importance criteria, ...)
    # the user's training loop, for passes that train the model themselves (qat): fn(module) -> module or None
    training: Callable[[Any], Any] | None = None
    # results one pass hands to a later one in the same pipeline (observed tensors, calibrated ranges, ...);
    # unlike analyses, kept when the graph changes: the pass that reads an entry checks it still applies
    state: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # where searches run their trials (--executor, optimize(executor=)); a pass's own executor= option wins
    executor: str = ""
    # the passes of the run, in order (set by the pass manager): a pass that prepares another reads its options
    pipeline: list[Any] = field(default_factory=list)
    # files the passes' options name (plot=, map=), written once the run succeeds: (path, write(path))
    deferred: list[tuple[str, Callable[[str], None]]] = field(default_factory=list)
    _analyses: dict[str, Any] = field(default_factory=dict)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.log.warning(message)

    def scheme(self, request: Any = None, who: str = "a pass") -> Any:
        """The run's backend's quantization scheme for ``request``: the one place quantization passes get it."""
        if self.backend is None:
            raise UsageError(f"{who}: no backend in the pass context (graphopt.optimize and graphopt run set one; "
                             f"give PassContext(backend=...) when running passes directly)")
        return self.backend.scheme(request)

    def write_after(self, path: str, write: Callable[[str], None]) -> None:
        """Have ``write(target)`` write the file at ``path`` once the run has succeeded (its model checked and
        written): how a pass writes the files its options name, so that a failed run, or one that writes no model
        (``--bisect``), leaves none behind. A pass called on its own (no context given) writes them when it ends."""
        self.deferred.append((path, write))

    def write_deferred(self) -> list[str]:
        """Write the files :meth:`write_after` put off (each atomically, in order); the paths written."""
        from graphopt.paths import Staged

        written, todo, self.deferred = [], self.deferred, []
        for path, write in todo:
            staged = Staged(path)
            try:
                with staged.named():
                    write(staged.staged_path)
                written += staged.commit()
            finally:
                staged.discard()
        return written

    def analysis(self, key: str, compute: Callable[[], Any]) -> Any:
        """A cached analysis; dropped after any pass that modifies the graph and does not preserve it."""
        if key not in self._analyses:
            self._analyses[key] = compute()
        return self._analyses[key]

    def invalidate(self, preserved: frozenset[str] = frozenset()) -> None:
        for key in [k for k in self._analyses if k not in preserved]:
            del self._analyses[key]


class Pass:
    """Base class of every pass. Subclasses set the class attributes and implement ``run_<ir>``."""

    name: ClassVar[str] = ""
    irs: ClassVar[frozenset[str]] = frozenset()
    equivalence: ClassVar[Equivalence] = Equivalence.EXACT
    Options: ClassVar[type] = NoOptions
    preserves: ClassVar[frozenset[str]] = frozenset()  # analyses still valid after this pass
    # the lowest default-domain ONNX opset the pass handles; the manager upgrades an older model
    # (onnx.version_converter, numerically checked) before running it. None: any opset.
    min_opset: ClassVar[int | None] = None
    # the mutation contract: True, the pass may edit the graph it is given (and returns it, or a new one);
    # False, it is functional: it builds a new graph and leaves its input as it was. The manager copies a graph
    # before a pass only when the pass may edit it and someone still needs the original (the caller's model,
    # the crash reproducer, bisect's snapshots).
    changes_input: ClassVar[bool] = True
    # what to do when the numeric check finds the outputs moved past the accuracy threshold (approximate passes)
    recovery: ClassVar[str] = ""
    # the pass runs the user's training loop (``PassContext.training``; ``optimize(..., qat=fn)``) itself
    trains: ClassVar[bool] = False

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()
        if not isinstance(self.options, self.Options):
            raise TypeError(f"{self.name}: options must be {self.Options.__name__}, got {type(self.options).__name__}")

    @classmethod
    def validate_class(cls) -> None:
        """Checked when a plugin registers the pass, so a malformed pass fails at load time, by name."""
        from graphopt.errors import PluginError

        where = f"{cls.__module__}.{cls.__qualname__}"
        if not cls.name or not all(c.isalnum() or c == "-" for c in cls.name):
            raise PluginError(f"{where}: pass name {cls.name!r} must be non-empty, letters, digits and '-'")
        if not cls.irs or not cls.irs <= IRS:
            raise PluginError(f"{where}: irs must be a non-empty subset of {sorted(IRS)}")
        missing = [ir for ir in cls.irs if not callable(getattr(cls, f"run_{ir}", None))]
        if missing:
            raise PluginError(f"{where}: declares irs {sorted(cls.irs)} but has no run_{missing[0]}()")
        if not (dataclasses.is_dataclass(cls.Options) and cls.Options.__dataclass_params__.frozen):
            raise PluginError(f"{where}: Options must be a frozen dataclass")

    def warn_unmatched(self, ctx: PassContext, option: str, missing, what: str = "node in the graph") -> None:
        """Warn, in one line, that ``option`` names what the model does not have (``missing``: a typo, most
        likely); nothing when none is missing."""
        if missing:
            ctx.warn(f"{self.name}: {option} names no {what}: {', '.join(missing)}")

    def files(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """The files this pass's options name: ``(reads, writes)``, as ``(what, path)`` and ``(option, path)``.
        The driver checks them with the run's other files before any pass runs (nothing read is written, every
        target's folder exists and is writable). Override where an option is a path."""
        return [], []

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        """Precondition; raise :class:`PassError` (via ``self.fail``) when the pass cannot run on ``graph``."""

    def ensures(self, graph: Graph, ctx: PassContext) -> None:
        """Postcondition on the pass's own output."""

    def fail(self, message: str) -> PassError:
        return PassError(self.name, message)

    def out_of_order(self, message: str) -> UsageError:
        """The pipeline lacks what this pass needs before it (observers, calibrated ranges): a usage error."""
        return UsageError(f"pass '{self.name}': {message}")

    def __call__(self, graph: Graph, ctx: PassContext | None = None) -> PassResult:
        own_ctx = ctx is None
        ctx = ctx or PassContext()
        if graph.ir not in self.irs:
            raise UnsupportedIRError(
                self.name,
                f"runs on {' and '.join(sorted(self.irs))} graphs, not {graph.ir} "
                f"(convert the model, or drop the pass from the pipeline)",
            )
        self.requires(graph, ctx)
        result = getattr(self, f"run_{graph.ir}")(graph, ctx)
        if not isinstance(result, PassResult):
            raise self.fail(f"returned {type(result).__name__}, not a PassResult")
        if not self.changes_input and result.modified and result.graph is graph:
            raise self.fail("declares changes_input=False (functional) but returned its input graph modified; "
                            "build a new graph, or declare changes_input=True")
        self.ensures(result.graph, ctx)
        if own_ctx:
            ctx.write_deferred()
        return result

    def __repr__(self) -> str:
        from graphopt.passes.options import format_options

        text = format_options(self.options)
        return f"{self.name}:{text}" if text else self.name

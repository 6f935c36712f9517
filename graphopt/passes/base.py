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
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, ClassVar, Protocol

from graphopt.errors import GraphoptError, OutputError, PassError, UnsupportedIRError, UsageError, first_line
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
    # files the passes' options name (plot=, map=), written once the run succeeds: (path, write(path), pass name)
    deferred: list[tuple[str, Callable[[str], None], str]] = field(default_factory=list)
    io: Any = None  # the run's files (graphopt.paths.IOPlan, set by the driver): what write_after must not write
    running: str = ""  # the pass running now (set by the pass manager), for messages
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
        (``--bisect``), leaves none behind. A pass called on its own (no context given) writes them when it ends.
        A path the run reads (the model, its data: :attr:`io`) is refused here, whether or not the pass declared
        it in :meth:`Pass.files`."""
        if self.io is not None:
            from graphopt.paths import IOPlan

            IOPlan(inputs=list(self.io.inputs), input_folders=list(self.io.input_folders),
                   outputs=[(f"{_who(self.running)} writes", os.fspath(path))]).check()
        self.deferred.append((os.fspath(path), write, self.running))

    def stage_deferred(self) -> list:
        """Write the files :meth:`write_after` put off beside their places (:class:`graphopt.paths.Staged`, in
        order), for the caller to commit once the model is in place; a writer that fails leaves none of them."""
        from graphopt.paths import Staged

        staged, todo, self.deferred = [], self.deferred, []
        try:
            for path, write, pass_name in todo:
                staged.append(Staged(path))
                with staged[-1].named():
                    try:
                        write(staged[-1].staged_path)
                    except GraphoptError:
                        raise
                    except OSError as exc:
                        raise OutputError(f"{path} ({_who(pass_name)}): cannot write it "
                                          f"({exc.strerror or first_line(exc)})") from None
                    except Exception as exc:
                        raise PassError(pass_name or "?", f"writing {path} raised {type(exc).__name__}: "
                                                          f"{first_line(exc)}") from exc
        except BaseException:
            for s in staged:
                s.discard()
            raise
        return staged

    def write_deferred(self) -> list[str]:
        """Write the files :meth:`write_after` put off (each atomically, in order); the paths written."""
        return commit_staged(self.stage_deferred())

    def analysis(self, key: str, compute: Callable[[], Any]) -> Any:
        """A cached analysis; dropped after any pass that modifies the graph and does not preserve it."""
        if key not in self._analyses:
            self._analyses[key] = compute()
        return self._analyses[key]

    def invalidate(self, preserved: frozenset[str] = frozenset()) -> None:
        for key in [k for k in self._analyses if k not in preserved]:
            del self._analyses[key]


def _who(pass_name: str) -> str:
    return f"pass '{pass_name}'" if pass_name else "a pass"


def commit_staged(staged: list) -> list[str]:
    """Move staged files (:meth:`PassContext.stage_deferred`) into place; the paths written."""
    written = []
    try:
        for s in staged:
            written += s.commit()
    finally:
        for s in staged:
            s.discard()
    return written


def is_builtin(pass_: Any) -> bool:
    """A pass of graphopt's own (the core's steps, its plugins): held to its contract by graphopt's tests; a
    plugin's pass is checked (:mod:`graphopt.passes.manager`)."""
    return type(pass_).__module__.split(".")[0] in ("graphopt", "graphopt_plugins")


def valid_pass_name(name: str) -> bool:
    """A pass or pipeline alias name: non-empty, letters, digits and '-'."""
    return bool(name) and all(c.isalnum() or c == "-" for c in name)


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
    # the pass decides by timing the model (so two runs may decide differently): a study, which scores placements
    # itself, and the recipe that replays its decision leave it out (graphopt/report/sensitivity.py)
    decides_by_timing: ClassVar[bool] = False

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()
        if not isinstance(self.options, self.Options):
            raise TypeError(f"{self.name}: options must be {self.Options.__name__}, got {type(self.options).__name__}")

    @classmethod
    def validate_class(cls) -> None:
        """Checked when a plugin registers the pass, so a malformed pass fails at load time, by name."""
        import typing

        from graphopt.errors import PluginError

        where = f"{cls.__module__}.{cls.__qualname__}"
        if not isinstance(cls.name, str) or not valid_pass_name(cls.name):
            raise PluginError(f"{where}: pass name {cls.name!r} must be non-empty, letters, digits and '-'")
        if not isinstance(cls.irs, (frozenset, set)) or not cls.irs or not cls.irs <= IRS:
            raise PluginError(f"{where}: irs must be a non-empty frozenset of {sorted(IRS)}, got {cls.irs!r}")
        missing = [ir for ir in cls.irs if not callable(getattr(cls, f"run_{ir}", None))]
        if missing:
            raise PluginError(f"{where}: declares irs {sorted(cls.irs)} but has no run_{missing[0]}()")
        if cls.equivalence not in tuple(Equivalence):
            raise PluginError(f"{where}: equivalence must be one of "
                              f"{', '.join(f'Equivalence.{e.name}' for e in Equivalence)}, got {cls.equivalence!r}")
        if not (dataclasses.is_dataclass(cls.Options) and cls.Options.__dataclass_params__.frozen):
            raise PluginError(f"{where}: Options must be a frozen dataclass")
        try:
            typing.get_type_hints(cls.Options)
        except Exception as exc:  # a misspelt annotation under `from __future__ import annotations`
            raise PluginError(f"{where}: an annotation of its Options does not resolve "
                              f"({type(exc).__name__}: {exc})") from None

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
        if not isinstance(result.graph, Graph) or result.graph.ir != graph.ir:
            raise self.fail(f"returned a PassResult holding {type(result.graph).__name__}, not a graph of the IR it "
                            f"was given ({graph.ir}): return PassResult(graph, ...) with the graph it edited or built")
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

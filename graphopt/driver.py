"""The driver: one way to run a pipeline, behind both `graphopt run` and `graphopt.optimize`.

A :class:`RunConfig` says what to run (pipeline, backend, data, checks, instruments); :class:`Driver` resolves it
once (syntax, passes, backend, instruments: every usage error before a model is read), loads the model, runs
the pass manager with the instruments the config asks for, verifies the result, and — when it is given an
output path — writes it beside its final place, runs the numeric check's last comparison on the written file,
and moves it into place only if everything passed. Every file the run reads and writes (the model, calibration
data, files named in pass options, the output, snapshots) is checked against each other before any pass runs
(:meth:`Driver.io_plan`, :mod:`graphopt.paths`), for the API as for the command line. The command line adds what
is only about a terminal: argument parsing, its own output flags (``--json``, ``--report``), printing and the JSON
report.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from graphopt.errors import (
    GraphoptError,
    InputError,
    ModelLoadError,
    NumericMismatchError,
    PassError,
    PluginError,
    UnsupportedError,
    UsageError,
    VerificationError,
    first_line,
)
from graphopt.ir import Graph, load_model, refuse_suffix
from graphopt.passes.base import PassContext, commit_staged
from graphopt.passes.check import CHECK_SAMPLES, NumericCheck
from graphopt.passes.instruments import (
    CrashReproducer,
    FineTune,
    Instrument,
    Snapshot,
    Verify,
    model_suffix,
    snapshot_name,
)
from graphopt.passes.manager import PassManager, RunReport
from graphopt.passes.pipeline import format_passes, parse_pipeline, resolve
from graphopt.paths import IOPlan, Staged, named_as, real

DEFAULT_PIPELINE = "fold"  # an alias the registry resolves (graphopt's own plugins register it)
API_FLAGS = {"output": "output=", "snapshot_dir": "snapshot_dir=", "reproducer": "reproducer="}  # how errors name them


@dataclass
class RunConfig:
    """What a run does. ``calibration``: int8 calibration data (a path, a mapping or an iterable; see
    :func:`graphopt.calib.sources.load_calibration`); ``eval_inputs``: labelled evaluation inputs (a mapping),
    whose first samples the numeric check compares on; ``instruments``: instrument objects, or names a plugin
    registered (``--instrument NAME``)."""

    passes: str = DEFAULT_PIPELINE
    backend: Any = "onnxruntime"
    example_inputs: Any = None
    calibration: Any = None
    image_options: Any = None
    eval_inputs: dict | None = None
    check: bool = True
    rtol: float = 1e-4
    verify_each: bool = False
    snapshot_dir: str | None = None
    reproducer: str | None = None
    instruments: tuple = ()
    finetune: Callable[[Any], Any] | None = None
    finetune_after: tuple | None = None
    qat: Callable[[Any], Any] | None = None  # the training loop of the passes that train (``trains``): qat
    trust_pickle: bool = False
    executor: str | None = None  # where searches run their trials (--executor): PassContext.executor


@dataclass
class RunResult:
    graph: Graph
    report: RunReport
    pipeline: str  # as written
    resolved: str  # aliases expanded, options canonical
    ctx: PassContext
    source: dict[str, Any] = field(default_factory=dict)  # the input's describe(): ir, nodes, parameters
    written: list[str] = field(default_factory=list)  # the files written (the model, its external data)
    artifact: dict[str, Any] = field(default_factory=dict)  # the backend's facts about the written file (write())

    def to_dict(self) -> dict[str, Any]:
        extra = {"artifact": self.artifact} if self.artifact else {}
        return {"pipeline": self.pipeline, "resolved": self.resolved, **self.report.to_dict(), **extra}


class Driver:
    def __init__(self, config: RunConfig, registry=None, ctx: PassContext | None = None):
        from graphopt.plugins import default_registry

        self.config = config
        self.registry = registry or default_registry()
        if not isinstance(config.passes, str):
            raise UsageError("passes must be a pipeline as text, like 'fold,int8' "
                             f"(got {type(config.passes).__name__})")
        rtol = config.rtol
        if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not math.isfinite(rtol) or rtol < 0:
            raise UsageError(f"rtol must be a number >= 0 (the relative error exact passes may leave), got {rtol!r}")
        self.pipeline = parse_pipeline(config.passes)
        self.passes = resolve(self.pipeline, self.registry)
        self.backend = self._backend(config.backend)
        if config.executor:  # a bad --executor said before any pass runs (a search starts it much later)
            from graphopt.executors import parse_executor

            parse_executor(config.executor)
        self.extra_instruments = [self._instrument(i) for i in config.instruments]
        self.ctx = ctx
        for label, fn in (("finetune=", config.finetune), ("qat=", config.qat)):
            if fn is not None and not callable(fn):
                raise UsageError(f"{label} must be a function of the module, got {type(fn).__name__}")
        self.finetune_after = None if config.finetune_after is None else self._finetune_after(config)
        if config.qat is not None and not any(p.trains for p in self.passes):
            raise UsageError(f"qat= is given but no pass of '{config.passes}' trains the model (use a pipeline "
                             f"with a pass that trains it: int8-qat)")

    def _finetune_after(self, config: RunConfig) -> tuple[str, ...]:
        """``finetune_after``'s names as the pipeline's pass names (an alias, ``prune``, names the passes it
        stands for); a name that is no pass of the pipeline, or the option without ``finetune=``, is refused."""
        if config.finetune is None:
            raise UsageError("finetune_after= names the passes to fine-tune after: give finetune=your_loop too")
        here = [p.name for p in self.passes]
        names: list[str] = []
        for name in config.finetune_after:
            try:
                resolved = [p.name for p in resolve(parse_pipeline(str(name)), self.registry)]
            except GraphoptError:
                resolved = []
            if not set(resolved) & set(here):
                raise UsageError(f"finetune_after: '{name}' is not a pass of the pipeline '{config.passes}' "
                                 f"(its passes: {', '.join(here)})")
            names += [n for n in resolved if n in here]
        return tuple(dict.fromkeys(names))

    def _backend(self, backend):
        from graphopt.backends import Backend, get_backend

        if isinstance(backend, str):
            return get_backend(self.registry, backend)
        if not isinstance(backend, Backend):
            raise UsageError(f"backend must be a registered backend's name (e.g. 'onnxruntime') or a Backend, got "
                             f"{type(backend).__name__}")
        return backend

    def _instrument(self, spec) -> Instrument:
        if not isinstance(spec, str):
            if not all(callable(getattr(spec, hook, None)) for hook in ("before_pass", "after_pass")):
                raise UsageError(f"instruments: {spec!r} is not an instrument (a registered name, or an object with "
                                 f"before_pass / after_pass, e.g. a graphopt.Instrument)")
            return spec
        if spec not in self.registry.instruments:
            known = ", ".join(sorted(self.registry.instruments)) or "none registered"
            raise UsageError(f"unknown instrument '{spec}' (known: {known}; plugins add them with "
                             f"graphopt_register_instruments)")
        try:
            return self.registry.instruments[spec]()
        except Exception as exc:  # a plugin's instrument class that needs arguments, or fails to build
            raise PluginError(f"instrument '{spec}' (plugin '{self.registry.origin.get(('instrument', spec))}') "
                              f"could not be made: {type(exc).__name__}: {first_line(exc)}") from None

    # -- loading ------------------------------------------------------------------------------------------
    def load(self, model: Any) -> Graph:
        graph = load_model(model, self.config.example_inputs, trust_pickle=self.config.trust_pickle)
        refusal = self.backend.refuse_ir(graph.ir)
        if refusal:
            where = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "the model"
            raise UnsupportedError(f"{where}: {refusal}")
        return graph

    def io_plan(self, model: Any, graph: Graph, output: str | None, flags: dict[str, str] = API_FLAGS) -> IOPlan:
        """Every file this run reads (the model and its external data, calibration data given as a path, the files
        pass options name) and writes (``output`` and its external data, files pass options name, snapshots, a
        reproducer), for :meth:`IOPlan.check`; ``flags`` names the outputs in its errors (the CLI's: ``-o``)."""
        from graphopt.ir import model_reads

        plan = IOPlan()
        if isinstance(model, (str, os.PathLike)):
            for what, path in model_reads("input model", model):
                plan.read(what, path)
        if isinstance(self.config.calibration, (str, os.PathLike)):
            plan.read("calibration data", os.fspath(self.config.calibration))
        for pass_ in self.passes:
            reads, writes = pass_.files()
            for what, path in reads:
                if not os.path.exists(path):  # said before any pass runs, not when the pass opens it
                    raise InputError(f"{pass_.name}: {what} {path}: no such file")
                plan.read(f"{what} of {pass_.name}", path)
            for option, path in writes:
                plan.write(f"{pass_.name}:{option}=", path)
        if output is not None:
            plan.write(flags["output"], output)
            plan.write(f"{flags['output']} (its external data)", output + ".data")
            for flag, folder in self.backend.folders(output):  # made if missing (OpenVINO's --save-ir DIR)
                plan.write_into(flag, folder, [])
            for flag, path in self.backend.files(output):  # an engine, OpenVINO IR: written with the model
                plan.write(flag, path)
        suffix = model_suffix(graph)
        snapshots = [snapshot_name(i, p.name, suffix) for i, p in enumerate(PassManager(self.passes).plan(graph), 1)]
        plan.write_into(flags["snapshot_dir"], self.config.snapshot_dir, snapshots + [n + ".data" for n in snapshots])
        plan.write_into(flags["reproducer"], self.config.reproducer,
                        [f"input{suffix}", f"input{suffix}.data", "reproduce.txt"])
        return plan

    def context(self, graph: Graph) -> PassContext:
        ctx = self.ctx or PassContext(registry=self.registry)
        if ctx.registry is None:
            ctx.registry = self.registry
        if ctx.backend is None:
            ctx.backend = self.backend
        if ctx.training is None:
            ctx.training = self.config.qat
        if not ctx.executor and self.config.executor:
            ctx.executor = self.config.executor
        if ctx.calibration is None and self.config.calibration is not None:
            ctx.calibration = self._calibration(graph, self.config.calibration)
        elif ctx.calibration is not None and not hasattr(ctx.calibration, "batches"):
            # a caller's own PassContext(calibration={...}): the same data the passes read, checked the same way
            ctx.calibration = self._calibration(graph, ctx.calibration)
        return ctx

    def _calibration(self, graph: Graph, source):
        """Calibration data opened and checked against the model's inputs before any pass runs."""
        from graphopt.calib.sources import input_specs, load_calibration

        source = graph.as_arrays(source) if graph.ir == "fx" else source
        return load_calibration(source, input_specs(graph), image_options=self.config.image_options)

    # -- running ------------------------------------------------------------------------------------------
    def instruments(self, graph: Graph, model: Any) -> tuple[list[Instrument], NumericCheck | None]:
        config, chain = self.config, []
        if config.finetune is not None:
            if graph.ir != "fx":
                raise UsageError("finetune= needs a PyTorch model (nn.Module with example_inputs): an ONNX model "
                                 "cannot be trained here")
            chain.append(FineTune(config.finetune, self.finetune_after))
        if config.verify_each:
            chain.append(Verify())
        check = None
        if config.check:
            inputs, label = None, ""
            if config.eval_inputs:
                inputs = {k: v[:CHECK_SAMPLES] for k, v in config.eval_inputs.items()}
                label = f"{len(next(iter(inputs.values())))} samples of the evaluation data"
            # the file itself is the first reference, unless loading changed it (nodes sharing a name renamed: a
            # file onnxruntime refuses)
            from_file = isinstance(model, (str, os.PathLike)) and graph.ir == "onnx" and not graph.notes
            reference = os.fspath(model) if from_file else None
            check = NumericCheck(rtol=config.rtol, per_pass=config.verify_each, inputs=inputs, inputs_label=label,
                                 reference_path=reference)
            chain.append(check)
        if config.snapshot_dir:
            chain.append(Snapshot(config.snapshot_dir))
        if config.reproducer:
            chain.append(CrashReproducer(config.reproducer))
        chain.extend(self.extra_instruments)
        return chain, check

    def run(self, model: Any, output: str | None = None, *, graph: Graph | None = None,
            before_move: Callable[[str, Graph], None] | None = None) -> RunResult:
        """Run the pipeline on ``model`` (a path, ModelProto, nn.Module or Graph; never modified). With
        ``output``, the result is written there (atomically, checked on the written file first).
        ``before_move(staged_path, result_graph)`` sees the written file, checked, before it moves into place (what
        the caller still measures on it: a failure there leaves nothing behind)."""
        owned = graph is not None or not isinstance(model, Graph)
        graph = graph if graph is not None else self.load(model)
        refuse_suffix(graph, output, API_FLAGS["output"])
        config = self.config
        plan = self.io_plan(model, graph, output)
        if output is not None or config.snapshot_dir or config.reproducer or any(p.files()[1] for p in self.passes):
            plan.check()  # nothing it reads is written, every target writable
        ctx = self.context(graph)
        ctx.io = plan  # what a pass's write_after must not write
        for note in getattr(graph, "notes", []) if graph.ir == "fx" else []:  # a module captured in train() mode
            ctx.warn(note)
        original = None if owned else graph  # the caller's graph: the manager copies it before editing
        try:
            return self._execute(model, graph, owned, ctx, output, before_move)
        except NumericMismatchError as exc:
            if len(getattr(exc, "passes", ())) > 1:
                self._blame(model, original, ctx)
            raise
        except PassError:
            self._refuse_invalid_input(model, original)
            raise

    def _execute(self, model: Any, graph: Graph, owned: bool, ctx: PassContext, output: str | None,
                 before_move: Callable[[str, Graph], None] | None = None) -> RunResult:
        chain, check = self.instruments(graph, model)
        source = graph.describe()
        manager = PassManager(self.passes, chain, ctx)
        out, report = manager.run(graph, in_place=owned, finish=False)
        if not (self.config.verify_each and report.modified):  # what is written is always checked once
            try:
                out.verify()
            except ValueError as exc:
                self._verify_as_the_input_allows(model, out, report, exc)
        written: list[str] = []
        artifact: dict[str, Any] = {}
        pending: list = []  # the files pass options name, staged with the model and moved in after it
        if output is None:
            manager.finish(out, report)
            written = ctx.write_deferred()
        elif out.ir == "onnx":  # written beside its place; the check's last run is on that file, then it moves

            def check_then_move(staged_path: str) -> None:
                if check is not None:
                    check.final_path = staged_path
                manager.finish(out, report)
                with named_as(staged_path, output):  # an engine built from the file; errors name -o's path
                    artifact.update(self.backend.write_beside(out, staged_path))
                    if check is not None and report.modified:  # the file as the backend runs it
                        check.check_on_backend(self.backend, staged_path, ctx)
                        report.checks["numeric"] = check.summary()
                if before_move is not None:
                    before_move(staged_path, out)
                pending.extend(ctx.stage_deferred())
                written.extend(os.path.join(os.path.dirname(real(output)), name)  # a link: where its target is
                               for name in sorted(os.listdir(os.path.dirname(staged_path))))

            try:
                out.save(output, before_move=check_then_move)
            except BaseException:
                for staged_file in pending:  # the model did not move in: neither do they
                    staged_file.discard()
                raise
            written += commit_staged(pending)
        else:
            staged = Staged(output)
            try:
                with staged.named():
                    artifact = self.backend.write(out, staged.staged_path)  # as the backend deploys it
                for warning in artifact.get("warnings", ()):
                    ctx.warn(warning)
                manager.finish(out, report)
                if before_move is not None:
                    before_move(staged.staged_path, out)
                pending = ctx.stage_deferred()
                written = staged.commit()
            finally:
                staged.discard()
                if not written:  # the model did not move in: neither do they
                    for staged_file in pending:
                        staged_file.discard()
            written += commit_staged(pending)
        return RunResult(out, report, str(self.pipeline), format_passes(self.passes), ctx, source, written, artifact)

    def _verify_as_the_input_allows(self, model: Any, out: Graph, report: RunReport, exc: ValueError) -> None:
        """The result fails the full check: a pass broke it (VerificationError) — unless the input itself fails
        the same check (onnx's strict inference rejects some valid models, e.g. its own function bodies): then
        the basic checker must pass, and the report says so. An input onnxruntime cannot load either is
        refused as invalid (exit 3)."""
        who, hint = report.culprits()
        failure = VerificationError(who, f"the result is not a valid model ({exc}); nothing written{hint}")
        if out.ir != "onnx" or isinstance(model, Graph):
            raise failure from None
        source = self.load(model)
        try:
            source.verify()
        except ValueError as original:
            if str(original) != str(exc):
                raise failure from None
            try:
                source.session(optimized=False)
            except Exception:  # neither onnx nor onnxruntime accepts the input: its fault, not the passes'
                self._refuse_invalid_input(model, source)
            try:
                out.verify(full=False)
            except ValueError:
                raise failure from None
            report.warnings.append(f"the input already fails onnx's full check ({exc}); the result passes the "
                                   f"basic checker, as the input does")
            return
        raise failure from None

    def _refuse_invalid_input(self, model: Any, original: Graph | None) -> None:
        """A pass failed: when the input itself fails the onnx checker's full check (strict shape inference; loading
        runs only the plain check), that is the error (unreadable input, exit 3), not the pass that tripped on it."""
        try:
            graph = original if original is not None else self.load(model)
        except GraphoptError:
            return
        if graph.ir != "onnx":
            return
        try:
            graph.verify()
        except ValueError as exc:
            where = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "the input model"
            raise ModelLoadError(f"{where}: invalid ONNX graph: {exc} (fix or re-export the model; `graphopt verify` "
                                 f"runs the same check)") from None

    def _blame(self, model: Any, original: Graph | None, ctx: PassContext) -> None:
        """Several exact passes together changed the outputs: run the pipeline again from the original with a
        comparison after every pass, which raises the error naming the first culprit (if it reproduces)."""
        graph = original if original is not None else self.load(model)
        _, check = self.instruments(graph, model)
        check.per_pass, check.reference_path = True, None
        fresh = PassContext(registry=ctx.registry, backend=ctx.backend, calibration=ctx.calibration, seed=ctx.seed,
                            training=ctx.training)
        PassManager(self.passes, [check], fresh).run(graph, in_place=original is None)

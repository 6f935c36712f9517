"""Instruments wrap every pass the manager runs: ``before_pass``, ``after_pass``, ``after_pass_failed``, and
``after_pipeline`` once the last pass has run.

Built in: :class:`Verify` (onnx checker with shape inference / FX lint after each pass), the numeric check
(:mod:`graphopt.passes.check`), :class:`Snapshot` (the graph after each pass, to a folder),
:class:`CrashReproducer` (the input graph and the failing pipeline, when a pass raises) and :class:`FloatReference`
(the PyTorch graph an approximate pass starts from, for per-layer comparison). Timing is recorded by
the manager for every pass. Plugins add more through ``graphopt_register_instruments`` (``--instrument NAME``).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable

from graphopt.errors import VerificationError
from graphopt.numeric import relative_error  # noqa: F401  (re-exported: tests and plugins compare outputs)
from graphopt.passes.base import Equivalence, is_builtin


class Instrument:
    needs_pass_input = False  # True: the manager keeps each pass's input graph intact (copies before each pass)

    def before_pass(self, pass_, graph, ctx) -> None: ...

    def after_pass(self, pass_, result, record, ctx) -> None: ...

    def after_pass_failed(self, pass_, graph, exc, ctx) -> None: ...

    def after_pipeline(self, graph, report, ctx) -> None:
        """Once, after the last pass, on the result (before it is written)."""


class FineTune(Instrument):
    """Runs the user's training loop on the model right after each modifying pass named in ``after`` (None:
    every pass meant to change the outputs, ``equivalence = none``: pruning, sparsity; not one that trains the
    model itself, ``trains``: qat).

    ``fn(module)`` receives the FX ``GraphModule`` (parameters are trainable ``nn.Parameter``s; call ``.train()``
    as your loop needs) and trains it in place or returns a replacement. The module is put back in eval mode and
    its shapes re-propagated before the next pass, so ``prune, fine-tune, int8`` is one pipeline.
    """

    def __init__(self, fn: Callable[[Any], Any], after: Iterable[str] | None = None):
        self.fn, self.after = fn, None if after is None else frozenset(after)

    def after_pass(self, pass_, result, record, ctx) -> None:
        if self.after is None:  # passes meant to change the outputs, except those that train the model themselves
            chosen = pass_.equivalence == Equivalence.NONE and not pass_.trains
        else:
            chosen = pass_.name in self.after
        if not chosen or not result.modified:
            return
        graph, start = result.graph, time.perf_counter()
        from graphopt.train import trained_module

        returned = trained_module(self.fn(graph.gm), "finetune=")
        if returned is not None:
            graph.gm = returned
        graph.gm.eval()
        graph.infer_shapes()
        name = getattr(self.fn, "__name__", type(self.fn).__name__)
        record.notes.append(f"fine-tuned by {name}() in {time.perf_counter() - start:.1f} s")
        record.checks["fine_tuned"] = True  # the numeric check holds no pass trained after to the outputs before


class Verify(Instrument):
    """Fail the pipeline, naming the pass, when a pass leaves an invalid graph."""

    def after_pass(self, pass_, result, record, ctx) -> None:
        if not result.modified:
            return
        try:
            result.graph.verify()
        except ValueError as exc:
            raise VerificationError(pass_.name, f"left an invalid graph: {exc}") from None
        record.checks["verified"] = True


def model_suffix(graph) -> str:
    """The suffix graphopt writes a graph of this IR with: .onnx, or .pt2 (a torch.export program)."""
    return ".onnx" if graph.ir == "onnx" else ".pt2"


def snapshot_name(index: int, pass_name: str, suffix: str) -> str:
    return f"{index:02d}-{pass_name}{suffix}"


class FloatReference(Instrument):
    """Keeps a copy of the graph the first approximate pass receives when it is a PyTorch ATen graph (the float
    graph a quantization pass starts from: captured, BatchNorm folded). Its node names are the ones the quantized
    graph keeps, so :func:`graphopt.report.metrics.per_layer_sqnr` can match the two layer by layer."""

    def __init__(self):
        self.graph = None

    def before_pass(self, pass_, graph, ctx) -> None:
        from graphopt.passes.base import Equivalence

        if self.graph is None and pass_.equivalence == Equivalence.APPROXIMATE and graph.ir == "fx" \
                and graph.is_aten():
            self.graph = graph.copy()


class Snapshot(Instrument):
    """Save the graph after each pass as ``DIR/NN-<pass>.<ext>`` (NN: the step's number in the report)."""

    def __init__(self, directory: str):
        self.directory = directory

    def after_pass(self, pass_, result, record, ctx) -> None:
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, snapshot_name(record.index, pass_.name, model_suffix(result.graph)))
        result.graph.save(path)
        record.checks["snapshot"] = path


class CrashReproducer(Instrument):
    """When a pass raises, write the graph it was given and the command that reruns that pass to ``DIR``."""

    needs_pass_input = True

    def __init__(self, directory: str):
        self.directory = directory

    def after_pass_failed(self, pass_, graph, exc, ctx) -> None:
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, "input" + model_suffix(graph))
        try:
            graph.save(path)
            saved = ""
        except Exception as save_error:  # never hide the pass's own error behind the reproducer's
            saved = f"(the input could not be saved: {type(save_error).__name__}: {save_error})\n"
        origin = getattr(ctx.registry, "origin", {}).get(pass_.name)
        plugin = f" -p {origin}" if origin and not is_builtin(pass_) else ""  # found with autoload off too
        with open(os.path.join(self.directory, "reproduce.txt"), "w") as f:
            f.write(f"failing pass: {pass_!r}\nerror: {exc}\n{saved}")
            f.write(f"graphopt run {path} --passes {pass_!r}{plugin} --debug\n")

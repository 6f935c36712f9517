"""Instruments wrap every pass the manager runs: ``before_pass``, ``after_pass``, ``after_pass_failed``, and
``after_pipeline`` once the last pass has run.

Built in: :class:`Verify` (onnx checker with shape inference / FX lint after each pass), the numeric check
(:mod:`graphopt.passes.check`), :class:`Snapshot` (the graph after each pass, to a folder) and
:class:`CrashReproducer` (the input graph and the failing pipeline, when a pass raises). Timing is recorded by
the manager for every pass. Plugins add more through ``graphopt_register_instruments`` (``--instrument NAME``).
"""

from __future__ import annotations

import os

from graphopt.errors import VerificationError
from graphopt.numeric import relative_error  # noqa: F401  (re-exported: tests and plugins compare outputs)


class Instrument:
    needs_pass_input = False  # True: the manager keeps each pass's input graph intact (copies before each pass)

    def before_pass(self, pass_, graph, ctx) -> None: ...

    def after_pass(self, pass_, result, record, ctx) -> None: ...

    def after_pass_failed(self, pass_, graph, exc, ctx) -> None: ...

    def after_pipeline(self, graph, report, ctx) -> None:
        """Once, after the last pass, on the result (before it is written)."""


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


class Snapshot(Instrument):
    """Save the graph after each pass as ``DIR/NN-<pass>.<ext>``."""

    def __init__(self, directory: str):
        self.directory = directory
        self.count = 0

    def after_pass(self, pass_, result, record, ctx) -> None:
        os.makedirs(self.directory, exist_ok=True)
        self.count += 1
        ext = "onnx" if result.graph.ir == "onnx" else "pt"
        path = os.path.join(self.directory, f"{self.count:02d}-{pass_.name}.{ext}")
        result.graph.save(path)
        record.checks["snapshot"] = path


class CrashReproducer(Instrument):
    """When a pass raises, write the graph it was given and the command that reruns that pass to ``DIR``."""

    needs_pass_input = True

    def __init__(self, directory: str):
        self.directory = directory

    def after_pass_failed(self, pass_, graph, exc, ctx) -> None:
        os.makedirs(self.directory, exist_ok=True)
        ext = "onnx" if graph.ir == "onnx" else "pt"
        graph.save(os.path.join(self.directory, f"input.{ext}"))
        with open(os.path.join(self.directory, "reproduce.txt"), "w") as f:
            f.write(f"failing pass: {pass_!r}\nerror: {exc}\n")
            f.write(f"graphopt run {self.directory}/input.{ext} --passes {pass_!r} --debug\n")

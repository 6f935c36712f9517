"""Instruments wrap every pass the manager runs: ``before_pass``, ``after_pass``, ``after_pass_failed``.

Built in: :class:`Verify` (onnx checker with shape inference / FX lint after each pass), :class:`NumericCheck`
(the model run before and after each modifying pass on fixed-seed inputs; passes that declare themselves exact
must match within ``rtol``), :class:`Snapshot` (the graph after each pass, to a folder) and
:class:`CrashReproducer` (the input graph and the failing pipeline, when a pass raises). Timing is recorded by
the manager for every pass. Plugins add more through ``graphopt_register_instruments``.
"""

from __future__ import annotations

import os

import numpy as np

from graphopt.errors import NumericMismatchError, VerificationError
from graphopt.passes.base import Equivalence


class Instrument:
    needs_pass_input = False  # True: the manager keeps each pass's input graph intact (copies before each pass)

    def before_pass(self, pass_, graph, ctx) -> None: ...

    def after_pass(self, pass_, result, record, ctx) -> None: ...

    def after_pass_failed(self, pass_, graph, exc, ctx) -> None: ...


def relative_error(reference: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """max |a - r| / max |r| over all outputs (a relative error that ignores near-zero elements' noise)."""
    if len(reference) != len(actual):
        return float("inf")
    worst = 0.0
    for r, a in zip(reference, actual):
        if r.shape != a.shape:
            return float("inf")
        r64, a64 = r.astype(np.float64), a.astype(np.float64)
        if not np.issubdtype(r.dtype, np.floating):
            worst = max(worst, float(np.any(r64 != a64)))
            continue
        scale = max(float(np.max(np.abs(r64))) if r64.size else 0.0, 1e-12)
        worst = max(worst, float(np.max(np.abs(a64 - r64))) / scale if r64.size else 0.0)
    return worst


def _calibration_batch(graph, ctx) -> dict | None:
    """The first batch of the pipeline's calibration data (real inputs make approximate passes' errors mean
    something), or None when there is none or it does not fit the graph."""
    if getattr(ctx, "calibration", None) is None or graph.ir != "onnx":
        return None
    from graphopt.calib.sources import input_specs, load_calibration

    try:
        return next(iter(load_calibration(ctx.calibration, input_specs(graph), batch_size=8, limit=8,
                                          progress=False).batches()), None)
    except Exception:  # the numeric check falls back to fixed-seed inputs; calibrate reports data problems
        return None


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


class NumericCheck(Instrument):
    """Run the graph before and after each modifying pass on the same fixed-seed inputs."""

    def __init__(self, rtol: float = 1e-4, seed: int = 0):
        self.rtol = rtol
        self.seed = seed
        self._inputs = None
        self._before = None

    def before_pass(self, pass_, graph, ctx) -> None:
        if self._inputs is None:
            self._inputs = _calibration_batch(graph, ctx) or graph.sample_inputs(self.seed)
        if self._before is None and pass_.equivalence != Equivalence.NONE:
            self._before = graph.run(self._inputs)

    def after_pass(self, pass_, result, record, ctx) -> None:
        if not result.modified:
            return
        if pass_.equivalence == Equivalence.NONE:
            self._before = None  # outputs are meant to change; the next pass compares against this graph
            record.checks["numeric"] = "not compared"
            return
        after = result.graph.run(self._inputs)
        err = relative_error(self._before, after)
        self._before = after
        record.checks["max_rel_err"] = err
        if pass_.equivalence == Equivalence.EXACT and not err <= self.rtol:
            raise NumericMismatchError(
                pass_.name,
                f"declares itself exact but changed the outputs: max relative error {err:.3g} > {self.rtol:g}",
            )


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

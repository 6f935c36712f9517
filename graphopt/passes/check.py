"""The numeric check: the model's outputs before and after the passes, on the same inputs.

Passes come in runs of the same kind (``equivalence``): exact passes (fold) must keep the outputs within
``rtol``; approximate ones (int8, fp16) and those meant to change them (pruning, sparsity) are measured, and
when they move the outputs past the accuracy threshold (output cosine < ``min_cosine`` or SQNR <
``min_sqnr_db``) the run says so, with what to do. By default the model is run once at the start and once at the
end of each run of passes (``fold`` = one comparison: the original's outputs against the result's), which is
what makes the verified default cheap; ``per_pass=True`` (``--verify-each``) compares after every modifying
pass, naming the culprit directly. A run of several exact passes that breaks equivalence is blamed on the one
that changed the model, or on all that did with the advice to rerun with ``--verify-each``.

Inputs: the data the caller gives (``inputs=``: ``--eval`` / ``--calib`` samples), else the calibration data in
the context, else generated ones (:mod:`graphopt.ir.feeds`: random data, valid indices / shapes / axes). When
the original model does not run on any of them, or onnxruntime cannot run it at all (a custom-domain op, an
opset newer than it knows), nothing is compared and the run says "not compared: <why>" instead of failing.

Models are run by onnxruntime with graph optimizations off for the reference and between exact passes (nothing
to fuse, less to build), and with its optimizations on for approximate passes (so int8 is measured on the kernels
that will run it) and for the result (run as a user will load it: onnxruntime's own folding can expose a model it
then refuses). When nothing could be compared, the result must still load wherever the original did.
An exact run of passes whose result differs from the reference only because one of the two ran with onnxruntime's
optimizations and the other without (a model with Q/DQ: its fused int8 kernels round differently from op-by-op
Q/DQ) is compared the same way on both sides instead, and the gap between the two ways is recorded.
The first reference and the final result may be run from files (``reference_path`` / ``final_path``): a model
of several GB is then never serialized in memory for the check.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt.errors import GraphoptError, NumericMismatchError, PassError, first_line
from graphopt.numeric import Difference, fmt_db, max_difference
from graphopt.passes.base import Equivalence
from graphopt.passes.instruments import Instrument

DEFAULT_MIN_COSINE = 0.99
DEFAULT_MIN_SQNR_DB = 20.0
CHECK_SAMPLES = 8
BACKEND_GAP_DB = 10.0  # past the threshold on both: the backend is blamed only when this much worse


class NotRunnable(Exception):
    """The model cannot be run on the check inputs (the reason is the message)."""


def run_model(graph, inputs: dict, *, optimized: bool, path: str | None = None) -> list[np.ndarray]:
    """The outputs of ``graph`` (or of the ONNX file at ``path``, the same model) on ``inputs``."""
    if graph.ir != "onnx":
        try:
            return graph.run(inputs)
        except Exception as exc:  # the module raises on these inputs
            raise NotRunnable(f"it raises on these inputs: {type(exc).__name__}: {first_line(exc)}") from exc
    try:
        session = graph.session(optimized=optimized, path=path)
    except Exception as exc:
        session = _bfloat16_emulated(graph, path, optimized)
        if session is None:
            raise NotRunnable(f"onnxruntime cannot load it: {first_line(exc)}") from exc
    declared = {i.name: i.type for i in session.get_inputs()}
    feeds = {}
    for name, value in inputs.items():
        if name not in declared:
            continue
        if declared[name] == "tensor(float16)" and value.dtype.kind == "f":
            value = value.astype(np.float16)
        elif declared[name] == "tensor(float)" and value.dtype.kind == "f":
            value = value.astype(np.float32)
        feeds[name] = value
    try:
        return [np.asarray(o) for o in session.run(None, feeds)]
    except Exception as exc:
        raise NotRunnable(f"onnxruntime cannot run it on these inputs: {first_line(exc)}") from exc


def _bfloat16_emulated(graph, path: str | None, optimized: bool):
    """A session of the model with bfloat16 compute emulated in float32 (:func:`graphopt.ir.bf16.emulate_bfloat16`:
    onnxruntime's CPU provider has no bfloat16 Conv/MatMul/Add), or None when the model computes no bfloat16 or
    cannot be emulated."""
    import onnx

    from graphopt.ir import OnnxGraph
    from graphopt.ir.bf16 import emulation

    emulated = emulation(onnx.load(path) if path else graph.to_model())
    if emulated is None:
        return None
    try:
        return OnnxGraph.from_model(emulated).session(optimized=optimized)
    except Exception:  # what onnxruntime refuses even in float32
        return None


class NumericCheck(Instrument):
    """Compare the outputs across each run of passes of one kind; see the module docstring."""

    def __init__(self, rtol: float = 1e-4, seed: int = 0, *, per_pass: bool = False, inputs: dict | None = None,
                 inputs_label: str = "", min_cosine: float = DEFAULT_MIN_COSINE,
                 min_sqnr_db: float = DEFAULT_MIN_SQNR_DB, reference_path: str | None = None):
        self.rtol, self.seed, self.per_pass = rtol, seed, per_pass
        self.min_cosine, self.min_sqnr_db = min_cosine, min_sqnr_db
        self.reference_path = reference_path  # the original model's file, run for the first reference
        self.final_path: str | None = None  # set by the caller: the result's file, run for the last comparison
        self._inputs, self._label = inputs, inputs_label
        self.not_compared: str | None = None
        self._original_loads = False  # not compared, but onnxruntime could build a session on the original
        self.comparisons: list[dict[str, Any]] = []
        self._ref: list[np.ndarray] | None = None
        self._original: list[np.ndarray] | None = None  # the first reference: the input model's outputs
        self.on_backend: dict[str, Any] | None = None  # the written file on the target backend (check_on_backend)
        self._segment: list[tuple[Any, Any]] = []  # (pass, record) of the modifying passes not yet compared
        self._kind: Equivalence | None = None

    # -- the instrument hooks -------------------------------------------------------------------------------
    def before_pass(self, pass_, graph, ctx) -> None:
        if self.not_compared:
            return
        kind = Equivalence.EXACT if pass_.equivalence == Equivalence.EXACT else Equivalence.APPROXIMATE
        if self._segment and kind != self._kind:
            self._close(graph, ctx)
        if self._ref is None and not self._start(graph, ctx):
            return
        self._kind = kind

    def after_pass(self, pass_, result, record, ctx) -> None:
        if not result.modified:
            return
        if self.not_compared:
            record.checks["numeric"] = "not compared"
            return
        self._segment.append((pass_, record))
        if record.checks.get("fine_tuned"):  # trained after the pass (finetune_after=): meant to move the outputs
            self._kind = Equivalence.APPROXIMATE
        if self.per_pass:
            self._close(result.graph, ctx)

    def after_pipeline(self, graph, report, ctx) -> None:
        if self._segment and not self.not_compared:
            self._close(graph, ctx, path=self.final_path, final=True)
        elif self.not_compared and self._original_loads and report.modified and graph.ir == "onnx":
            # nothing could be compared, but a result onnxruntime cannot even load is still caught
            try:
                graph.session(path=self.final_path)  # as a user loads it: optimizations on
            except Exception as exc:
                names = [r.name for r in report.records if r.modified]
                raise PassError(_who(names), f"left a model onnxruntime can no longer load, though it loaded the "
                                f"original ({first_line(exc)})") from None
        report.checks = {"numeric": self.summary()}

    def summary(self) -> dict[str, Any]:
        if self.not_compared:
            return {"compared": False, "reason": self.not_compared}
        summary = {"compared": True, "inputs": self._label, "rtol": self.rtol, "min_cosine": self.min_cosine,
                   "min_sqnr_db": self.min_sqnr_db, "comparisons": self.comparisons}
        if self.on_backend is not None:
            summary["on_backend"] = self.on_backend
        return summary

    def check_on_backend(self, backend, path: str, ctx) -> None:
        """Run the written file ``path`` on ``backend`` (one that runs ONNX files here, other than onnxruntime:
        :meth:`~graphopt.backends.Backend.run_written`) on the check's inputs, against the input model's outputs
        on onnxruntime: a backend that computes the file otherwise than onnxruntime does (a kernel of its own
        that is wrong, or less precise) is measured, and a result past the accuracy threshold there is warned
        about when onnxruntime's run of the same file was within it, or was past it too but ``BACKEND_GAP_DB``
        better (past it on both alike, the passes moved the outputs: their own warning says so)."""
        if self.not_compared or self._original is None or self._ref is None or not self.comparisons:
            return
        outputs = backend.run_written(path, self._inputs)
        if outputs is None:
            return
        original = [r[:len(o)] if np.ndim(r) and np.ndim(o) else r for r, o in zip(self._original, outputs)]
        there, here = max_difference(original, outputs), max_difference(original, self._ref)
        self.on_backend = {"backend": backend.name, "sqnr_db": there.sqnr_db, "cosine": there.cosine,
                           "max_rel_err": there.max_rel_err, "onnxruntime_sqnr_db": here.sqnr_db,
                           "onnxruntime_cosine": here.cosine}
        def past(d: Difference) -> bool:
            return d.cosine < self.min_cosine or d.sqnr_db < self.min_sqnr_db or bool(d.nonfinite_mismatches)

        if past(there):
            self.on_backend["past_threshold"] = True
        if past(there) and (not past(here) or there.sqnr_db < here.sqnr_db - BACKEND_GAP_DB):
            ctx.warn(f"numeric check: on {backend.name} the written model's outputs moved past the accuracy "
                     f"threshold ({_moved(there, self.min_cosine, self.min_sqnr_db)}; onnxruntime runs the same file "
                     f"at SQNR {fmt_db(here.sqnr_db)} dB, cosine {here.cosine:.4f}, on {self._label}): "
                     f"{backend.name} computes this model differently; measure it there with --eval data, or "
                     f"keep the layers it gets wrong float (exclude_nodes)")

    # -- inputs and the first reference --------------------------------------------------------------------
    def _start(self, graph, ctx) -> bool:
        """Choose the inputs (if not yet) and compute the reference outputs; False (and ``not_compared`` set)
        when the model does not run on any."""
        path = self.reference_path if not self.comparisons else None
        self.reference_path = None  # only the original graph is that file
        odd = [t for t in graph.gs.inputs if getattr(t, "type", "tensor_type") != "tensor_type"] \
            if graph.ir == "onnx" else []
        if odd:
            kind = odd[0].type.replace("_type", "")
            self.not_compared = f"not compared: input '{odd[0].name}' is {'an' if kind[0] in 'aeiou' else 'a'} " \
                                f"{kind}, not a tensor"
            ctx.warn(f"numeric check: {self.not_compared}")
            return False
        reason = ""
        try:
            for label, inputs in self._candidates(graph, ctx):
                try:
                    self._ref = run_model(graph, inputs, optimized=False, path=path)
                except NotRunnable as exc:
                    reason = str(exc)
                    if reason.startswith("onnxruntime cannot load"):
                        break
                    if label.endswith("calibration samples") and exc.__cause__ is not None:
                        from graphopt.calib.errors import refused_data

                        refused = refused_data(exc.__cause__)  # the data the user gave do not fit the model
                        if refused is not None:
                            raise refused from None
                    self._original_loads = True
                    continue
                self._inputs, self._label = inputs, label
                self._original = self._ref
                return True
        except GraphoptError:
            raise
        except Exception as exc:  # no inputs can be made for it: a type numpy lacks, a shape too large to allocate
            reason = f"no inputs can be generated for it: {type(exc).__name__}: {first_line(exc)}"
        what = "the model" if not self.comparisons else "the model after the previous passes"
        self.not_compared = f"not compared: {what} does not run here ({reason})" + (
            "" if self._label or "cannot load" in reason else "; give --calib or --eval data to check it")
        ctx.warn(f"numeric check: {self.not_compared}")
        return False

    def _candidates(self, graph, ctx):
        if self._inputs is not None:
            inputs = _fit_batch(graph, self._inputs)
            label = self._label or "the given inputs"
            if inputs is not self._inputs:
                label = f"{label} (the first {len(next(iter(inputs.values())))}: the model's batch is fixed)"
            return [(label, inputs)]
        batch = calibration_batch(graph, ctx)
        if batch is not None:
            return [(f"{len(next(iter(batch.values())))} calibration samples", batch)]
        if graph.ir != "onnx":
            return [(f"fixed-seed random inputs, seed {self.seed}", graph.sample_inputs(self.seed))]
        from graphopt.ir.feeds import candidate_feeds, input_roles

        roles = input_roles(graph.gs)
        return [(f"fixed-seed generated inputs, seed {self.seed}", f)
                for f in candidate_feeds(graph.input_specs(), roles, self.seed)]

    # -- one comparison ------------------------------------------------------------------------------------
    def _close(self, graph, ctx, path: str | None = None, final: bool = False) -> None:
        segment, self._segment = self._segment, []
        exact = self._kind == Equivalence.EXACT
        names = [p.name for p, _ in segment]
        inputs = _fit_batch(graph, self._inputs)
        if inputs is not self._inputs:  # the passes fixed the batch (a capture fell back to static shapes)
            k = len(next(iter(inputs.values())))
            self._inputs, self._ref = inputs, [r[:k] if np.ndim(r) else r for r in self._ref]
            self._label = f"{self._label} (the first {k}: the model's batch became fixed)"
        optimized = final or not exact
        try:  # the result is run as a user will load it, with onnxruntime's optimizations on
            outputs = run_model(graph, self._inputs, optimized=optimized, path=path)
        except NotRunnable as exc:
            raise PassError(_who(names), f"left a model that no longer runs ({exc})") from None
        diff, record, fused = max_difference(self._ref, outputs), segment[-1][1], None
        if exact and graph.ir == "onnx" and not diff.max_rel_err <= _tolerance(self.rtol, self._ref):
            diff, fused = self._optimizations_apart(graph, path, optimized, outputs, diff, ctx)
        record.checks.update({"max_rel_err": diff.max_rel_err, "sqnr_db": diff.sqnr_db, "cosine": diff.cosine})
        if len(segment) > 1:
            record.checks["compared_passes"] = names
        entry = {"passes": names, "equivalence": self._kind.value, "max_rel_err": diff.max_rel_err,
                 "sqnr_db": diff.sqnr_db, "cosine": diff.cosine, "nonfinite_mismatches": diff.nonfinite_mismatches}
        if fused is not None:
            entry["onnxruntime_optimizations"] = {"max_rel_err": fused.max_rel_err, "sqnr_db": fused.sqnr_db,
                                                  "cosine": fused.cosine}
        self.comparisons.append(entry)
        self._ref = outputs
        if exact:
            rtol = _tolerance(self.rtol, self._ref)
            if not diff.max_rel_err <= rtol:
                error = NumericMismatchError(_who(names), _mismatch(diff, rtol, len(segment)))
                error.passes = names
                raise error
            return
        if diff.cosine < self.min_cosine or diff.sqnr_db < self.min_sqnr_db or diff.nonfinite_mismatches:
            hints = [h for h in dict.fromkeys(getattr(p, "recovery", "") for p, _ in segment) if h]
            entry["past_threshold"] = True
            record.checks["past_threshold"] = True
            ctx.warn(f"{', '.join(names)}: the outputs moved past the accuracy threshold on {self._label} "
                     f"({_moved(diff, self.min_cosine, self.min_sqnr_db)}): "
                     + ("; ".join(hints) or "measure the accuracy with --eval data before using this model"))

    def _optimizations_apart(self, graph, path, optimized: bool, outputs, diff: Difference, ctx):
        """An exact run of passes moved the outputs: ``(diff, None)`` when it did, ``(the difference with the graph
        run the other way, the gap between the two ways)`` when onnxruntime's graph optimizations make it. The
        reference and the result are run with them on and off in turn; on a model with Q/DQ, onnxruntime's fused
        int8 kernels (QLinearConv, QGemm) round differently from its op-by-op Q/DQ, so the same graph's outputs
        differ by more than ``rtol`` between the two ways, whatever the passes did. A gap past the accuracy
        threshold is warned about: onnxruntime's optimizations, not the passes, move this model's outputs."""
        try:
            other = run_model(graph, self._inputs, optimized=not optimized, path=path)
        except NotRunnable:
            return diff, None
        apart = max_difference(self._ref, other)
        if not apart.max_rel_err <= _tolerance(self.rtol, self._ref):
            return diff, None
        gap = max_difference(other, outputs)
        if gap.cosine < self.min_cosine or gap.sqnr_db < self.min_sqnr_db:
            ctx.warn(f"numeric check: onnxruntime's graph optimizations move this model's outputs "
                     f"({_moved(gap, self.min_cosine, self.min_sqnr_db)}), with or without the passes")
        return apart, gap


def _tolerance(rtol: float, reference: list[np.ndarray]) -> float:
    """What an exact pass must keep: ``rtol``, and at least two float16 ulps when an output is float16 (a folded
    fp16 value is rounded once where the run rounded it at another step)."""
    if any(np.asarray(r).dtype == np.float16 for r in reference):
        return max(rtol, 2 * float(np.finfo(np.float16).eps))
    return rtol


def _who(names: list[str]) -> str:
    return names[0] if len(names) == 1 else " + ".join(names)


def _mismatch(diff: Difference, rtol: float, count: int) -> str:
    what = (f"{diff.shape_mismatch}" if not diff.comparable else
            f"{diff.nonfinite_mismatches} output element(s) became NaN/Inf" if diff.nonfinite_mismatches else
            f"max relative error {diff.max_rel_err:.3g} > {rtol:g}")
    head = "declares itself exact but changed the outputs" if count == 1 else \
        "declare themselves exact but together changed the outputs"
    tail = "" if count == 1 else " (rerun with --verify-each to name the pass)"
    return f"{head}: {what}{tail}"


def _moved(diff: Difference, min_cosine: float, min_sqnr: float) -> str:
    parts = [f"cosine {diff.cosine:.4f}" + (f" < {min_cosine:g}" if diff.cosine < min_cosine else ""),
             f"SQNR {fmt_db(diff.sqnr_db)} dB" + (f" < {min_sqnr:g}" if diff.sqnr_db < min_sqnr else "")]
    if diff.nonfinite_mismatches:
        parts.append(f"{diff.nonfinite_mismatches} NaN/Inf elements")
    return ", ".join(parts)


def _fit_batch(graph, inputs: dict) -> dict:
    """``inputs`` cut to the model's fixed batch size when it has one and they hold more samples (a PyTorch program
    exported at batch 1, an ONNX model with batch 1)."""
    try:
        fixed = {s.batch_dim for s in graph.input_specs() if s.name in inputs and s.batch_dim is not None}
    except Exception:  # inputs graphopt cannot describe: leave them as given
        return inputs
    if len(fixed) != 1:
        return inputs
    k = fixed.pop()
    if not any(np.ndim(v) and np.shape(v)[0] > k for v in inputs.values()):
        return inputs
    return {name: v[:k] if np.ndim(v) and np.shape(v)[0] > k else v for name, v in inputs.items()}


def calibration_batch(graph, ctx) -> dict | None:
    """The first samples of the pipeline's calibration data (real inputs make approximate passes' errors mean
    something), or None when there is none or it does not fit the graph."""
    if getattr(ctx, "calibration", None) is None or not getattr(ctx.calibration, "reiterable", True):
        return None  # a generator is read once, by calibrate: taking samples here would take them from it
    from graphopt.calib.sources import input_specs, load_calibration

    try:
        return next(iter(load_calibration(ctx.calibration, input_specs(graph), batch_size=CHECK_SAMPLES,
                                          limit=CHECK_SAMPLES, progress=False).batches()), None)
    except Exception:  # the check falls back to generated inputs; calibrate reports data problems itself
        return None


def run_inputs(graph, ctx) -> dict:
    """Inputs to run ``graph`` on for a pass's own check that it still runs: the calibration data's first samples
    (a model whose dynamic dims must be large enough — a CNN's height and width — runs on them), cut to a fixed
    batch, else fixed-seed generated ones (every dynamic dim 1)."""
    batch = calibration_batch(graph, ctx)
    return _fit_batch(graph, batch) if batch is not None else graph.sample_inputs()


__all__ = ["CHECK_SAMPLES", "DEFAULT_MIN_COSINE", "DEFAULT_MIN_SQNR_DB", "NotRunnable", "NumericCheck", "run_inputs",
           "run_model"]

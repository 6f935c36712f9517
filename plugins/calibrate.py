"""calibrate: run calibration data through the model and turn each observer into a quantization range."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from graphopt import Pass, PassResult, hookimpl
from graphopt.backends import QuantRequest
from graphopt.calib.errors import refused_data
from graphopt.calib.observers import compute_range
from graphopt.calib.sources import SYNTHETIC_WARNING, input_specs, load_calibration, synthetic
from graphopt.calib.state import CALIBRATION, OBSERVERS, RANGES
from graphopt.errors import UnsupportedError, first_line
from graphopt.ir.expose import expose
from graphopt.ir.ops import custom_ops


class Calibrate(Pass):
    """Stream the calibration data through the model and compute each observed tensor's range.

    Reads the observers ``insert-observers`` attached and the data in the context (``--calib`` on the CLI,
    ``calibration=`` in the API). Without data it calibrates on fixed-seed random inputs and says loudly, on
    screen and in the report, that such scales are not fit for production. The model runs on onnxruntime with
    the observed tensors as extra outputs, one batch at a time; each batch updates the histograms and is
    dropped, so memory does not grow with the number of samples.

    ``method``: ``minmax``, ``percentile`` (of |x| or each tail, ``percentile`` option), ``entropy`` (KL
    divergence, as TensorRT) or ``mse``. Ranges are symmetric when the backend's activations are.

    On a PyTorch model the ATen graph (see insert-observers) runs eagerly with the observed nodes as extra outputs.
    Its data may also be a tensor, or a tuple of tensors in input order.
    """

    name = "calibrate"
    irs = frozenset({"onnx", "fx"})

    @dataclass(frozen=True)
    class Options:
        method: Literal["minmax", "percentile", "entropy", "mse"] = "minmax"
        percentile: float = 99.999
        batch_size: int = 8
        limit: int = 0  # use at most this many samples (0: all)
        synthetic_samples: int = 32  # random samples when no calibration data is given

        def __post_init__(self):
            if not 0 < self.percentile <= 100:
                raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
            if self.batch_size < 1 or self.limit < 0 or self.synthetic_samples < 1:
                raise ValueError("batch_size and synthetic_samples must be >= 1, limit >= 0")

    def requires(self, graph, ctx):
        if OBSERVERS not in ctx.state:
            raise self.out_of_order("no observers: run insert-observers first (the int8 alias does)")

    def run_onnx(self, graph, ctx):
        observers = ctx.state[OBSERVERS]
        data, notes = self._data(graph, ctx)
        # graph optimizations off, so that no fusion hides an observed tensor
        session = self._run(graph, lambda: expose(graph, observers).session(optimized=False))
        names = [o.name for o in session.get_outputs()]
        samples = 0
        for batch in data.batches():
            for name, value in zip(names, self._run(graph, lambda: session.run(names, batch))):
                if name in observers:
                    observers[name].update(value)
            samples += len(next(iter(batch.values())))
        return self._ranges(graph, ctx, observers, data, samples, notes)

    def run_fx(self, graph, ctx):
        import numpy as np
        import torch

        from graphopt.ir.expose import expose_fx

        observers = ctx.state[OBSERVERS]
        names = list(observers)
        data, notes = self._data(graph, ctx)
        exposed = expose_fx(graph.gm, names)
        inputs = graph.input_names()
        samples = 0
        for batch in data.batches():
            args = [torch.from_numpy(np.ascontiguousarray(batch[name])) for name in inputs]
            try:
                with torch.no_grad():
                    values = exposed(*args)[-len(names):] if names else ()
            except Exception as exc:
                raise self.fail(f"the model raises on the calibration data: {type(exc).__name__}: "
                                f"{first_line(exc, 160)} (check that the data fits the model's inputs: "
                                f"{', '.join(f'{s.name} {s.shape_str()}' for s in graph.input_specs())})") from None
            for name, value in zip(names, values):
                observers[name].update(value.detach().numpy())
            samples += len(args[0]) if args else 0
        return self._ranges(graph, ctx, observers, data, samples, notes)

    def _ranges(self, graph, ctx, observers, data, samples: int, notes: list[str]):
        scheme = ctx.scheme(QuantRequest(), self.name)
        symmetric = scheme.activations.symmetric
        ranges = {}
        for name, observer in observers.items():
            if observer.count:
                ranges[name] = compute_range(observer, self.options.method, symmetric=symmetric,
                                             percentile=self.options.percentile)
        ctx.state[RANGES] = ranges
        _warn_nonfinite(self.name, ctx, observers)
        ctx.state[CALIBRATION] = {"method": self.options.method, "samples": samples, "synthetic": data.synthetic,
                                  "source": data.description}
        notes += [n for n in data.notes if n != SYNTHETIC_WARNING]
        return PassResult(graph, False,
                          {"calibrated tensors": len(ranges), "read samples": samples}, notes)

    def _run(self, graph, call):
        """``call()`` on onnxruntime; an op outside the domains it knows is a clear UnsupportedError."""
        try:
            return call()
        except Exception as exc:  # onnxruntime's own error types
            ops = custom_ops(graph.gs.nodes)
            if not ops:
                if not type(exc).__module__.startswith("onnxruntime"):
                    raise  # not onnxruntime's: a bug, reported as one
                refused = refused_data(exc)
                if refused is not None:
                    raise refused from exc
                raise self.fail(f"the model does not run on onnxruntime with the calibration data: "
                                f"{first_line(exc, 160)} (check the model with graphopt verify, and that the data "
                                f"fits its inputs)") from exc
            raise UnsupportedError(
                f"pass '{self.name}': onnxruntime cannot run {', '.join(ops)} (domain:op), so the model cannot be "
                f"run to calibrate it: {first_line(exc, 160)} (int8-dynamic quantizes MatMul/Gemm without "
                f"calibration)") from exc

    def _data(self, graph, ctx):
        specs = input_specs(graph)
        limit = self.options.limit or None
        if ctx.calibration is None:
            ctx.warn(f"{self.name}: {SYNTHETIC_WARNING}")
            return synthetic(specs, self.options.synthetic_samples, batch_size=self.options.batch_size,
                             progress=False), []
        return load_calibration(ctx.calibration, specs, batch_size=self.options.batch_size, limit=limit), []


def _warn_nonfinite(pass_name: str, ctx, observers) -> None:
    """Name the tensors that computed NaN/inf on the (finite) calibration data: the model makes them, so the
    observers leave those values out; a tensor with nothing else gets no range and place-qdq leaves it float."""
    for what, names in (("were NaN/inf on every sample (no range: they stay float)",
                         [n for n, o in observers.items() if o.nonfinite and not o.count]),
                        ("held NaN/inf values, left out of their ranges",
                         [n for n, o in observers.items() if o.nonfinite and o.count])):
        if names:
            ctx.warn(f"{pass_name}: {len(names)} tensors {what}: {', '.join(names[:5])}"
                     + (" ..." if len(names) > 5 else ""))


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(Calibrate)


"""insert-observers: choose the tensors calibration watches, and give each a streaming histogram observer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt import Pass, PassResult, hookimpl
from graphopt.calib.observers import HistogramObserver
from graphopt.calib.state import OBSERVERS


class InsertObservers(Pass):
    """Attach an observer to every float activation: graph inputs and node outputs that are not constants.

    The graph itself is not changed (``calibrate`` runs a copy with those tensors as extra outputs); the
    observers go into the pipeline's state for ``calibrate`` to fill and ``place-qdq`` to read. Every observer is
    a fixed-size histogram (``bins``) that also tracks min and max, so every calibration method works from it
    and memory stays flat in the number of samples. All activations are observed, not only the ones the
    backend's scheme will quantize: which those are is ``place-qdq``'s decision, and a histogram is cheap.

    On a PyTorch model (FX) the module is first captured as ATen ops (torch.export, batch and token dimensions
    dynamic), the graph PT2E quantization works on, and — with ``fold_bn`` — its BatchNorms folded into the
    convolutions before them, as PT2E's prepare does, so that calibration observes the tensors place-qdq will
    quantize. Both are exact. The QAT pipeline (``int8-qat``) keeps BatchNorm: QAT trains through it and folds it
    when it converts.
    """

    name = "insert-observers"
    irs = frozenset({"onnx", "fx"})

    @dataclass(frozen=True)
    class Options:
        bins: int = 2048  # histogram bins per observed tensor
        fold_bn: bool = True  # FX: fold BatchNorm into the conv before it first (ONNX: the fold pipeline does)

        def __post_init__(self):
            if self.bins < 16:
                raise ValueError(f"bins must be >= 16, got {self.bins}")

    def run_onnx(self, graph, ctx):
        types = graph.inferred_shapes()
        names = [t.name for t in graph.gs.inputs]
        names += [t.name for node in graph.gs.nodes for t in node.outputs if t.name and not t.is_empty()]
        tensors = graph.gs.tensors()  # one map for all (gs rebuilds it on every call)
        floats = [n for n in dict.fromkeys(names) if _is_float(tensors.get(n), types.get(n))]
        ctx.state[OBSERVERS] = {name: HistogramObserver(self.options.bins) for name in floats}
        return PassResult(graph, False, {"observed tensors": len(floats)})


    def run_fx(self, graph, ctx):
        from graphopt.pt2e.prepare import float_activations, fold_batch_norms

        aten = graph.aten()
        folded = fold_batch_norms(aten.gm) if self.options.fold_bn else 0
        names = float_activations(aten.gm)
        ctx.state[OBSERVERS] = {name: HistogramObserver(self.options.bins) for name in names}
        stats = {"captured with torch.export": int(aten is not graph), "folded BatchNorm": folded,
                 "observed tensors": len(names)}
        return PassResult(aten, aten is not graph or folded > 0, {k: v for k, v in stats.items() if v})


def _is_float(tensor, inferred) -> bool:
    """Whether a tensor holds floats: its own dtype, else the inferred ``(shape, dtype)``."""
    dtype = tensor.dtype if tensor is not None and tensor.dtype is not None else (inferred or (None, None))[1]
    return dtype is not None and np.issubdtype(np.dtype(dtype), np.floating)


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(InsertObservers)

"""qat: quantization-aware training of a PyTorch model, in the backend's int8 scheme, then its Q/DQ graph."""

from __future__ import annotations

from dataclasses import dataclass

from graphopt import Equivalence, Pass, PassResult, hookimpl
from graphopt.backends.scheme import Placement
from graphopt.calib.state import RANGES
from graphopt.errors import UsageError
from graphopt.train import trained_module


class Qat(Pass):
    """Fake-quantize the model where the backend's scheme runs int8, train it with your loop, and convert it.

    The placement is place-qdq's (the same scheme and options); fake quantizers replace its observers: the forward
    pass rounds and clamps as int8 will, the backward pass lets gradients through inside the range (the
    straight-through estimator). Activation scales start from ``calibrate``'s ranges and stay fixed; weight scales
    follow the weights per output channel until ``freeze_observers_after`` training steps. ``learn_scales=true``
    makes every scale a trained parameter instead (LSQ). BatchNorm is kept through training (the QAT pipeline
    ``int8-qat`` does not fold it first), normalizing with batch statistics until ``freeze_bn_after`` steps, with
    its running statistics after; conversion folds it into the convs. The result is the same kind of Q/DQ graph
    place-qdq writes, checked to hold no ``batch_norm`` and no fake quantizer.

    The training loop is yours: ``graphopt.optimize(model, "int8-qat", ..., qat=train)`` calls ``train(module)`` on
    the fake-quantized ``torch.fx.GraphModule`` (its parameters, and LSQ scales, are trainable; ``module.train()``
    and ``.eval()`` work); it trains in place or returns the module. ``graphopt.train.distiller(teacher, data)`` is
    such a loop. A step is a forward pass in training mode. The outputs are meant to change (the model trains),
    so the numeric check does not hold the pass to the original's; measure accuracy on labelled data.
    """

    name = "qat"
    irs = frozenset({"fx"})
    equivalence = Equivalence.NONE  # trained: the outputs are meant to change (measure accuracy with --eval)
    trains = True
    recovery = ("train longer or with a lower learning rate, freeze BatchNorm later (freeze_bn_after=...), try "
                "learn_scales=true, or keep sensitive layers float (exclude_nodes=...)")

    @dataclass(frozen=True)
    class Options(Placement):
        learn_scales: bool = False  # LSQ: scales are trained with the weights
        freeze_observers_after: int = 0  # training steps before weight scales stop following the weights (0: never)
        freeze_bn_after: int = 0  # training steps before BatchNorm uses its running statistics (0: never)

        def __post_init__(self):
            if self.freeze_observers_after < 0 or self.freeze_bn_after < 0:
                raise ValueError("freeze_observers_after and freeze_bn_after must be >= 0 (0: never)")

    def requires(self, graph, ctx):
        if ctx.training is None:
            raise UsageError(f"pass '{self.name}' needs a training loop: give it in the Python API, "
                             f"graphopt.optimize(model, 'int8-qat', ..., qat=train) (train(module) trains the "
                             f"fake-quantized module); the command line cannot run one")
        if RANGES not in ctx.state:
            raise self.out_of_order("no calibrated ranges: "
                                    "run insert-observers and calibrate first (the int8-qat alias does)")
        if not graph.is_aten():
            raise self.out_of_order("the PyTorch model is not an ATen graph: "
                                    "run insert-observers first (int8-qat does)")

    def run_fx(self, graph, ctx):
        from graphopt.ir.fx_graph import FxGraph
        from graphopt.pt2e import qat
        from graphopt.pt2e.prepare import qdq_counts
        from graphopt.pt2e.quantizer import SchemeQuantizer

        scheme = ctx.scheme(self.options.request(), self.name)
        for warning in scheme.warnings:
            ctx.warn(f"{self.name}: {warning}")
        o = self.options
        quantizer = SchemeQuantizer(scheme, ctx.state[RANGES], exclude=o.exclude_nodes, keep_first=o.keep_first,
                                    keep_last=o.keep_last, qat=True, learn=o.learn_scales)
        model, schedule = qat.prepare(graph.gm, quantizer, graph.example_inputs, freeze_bn_after=o.freeze_bn_after,
                                      freeze_observers_after=o.freeze_observers_after)
        returned = trained_module(ctx.training(model), "qat=")
        model = returned if returned is not None else model
        schedule.remove()
        converted, left = qat.convert(model)
        if left:
            raise self.fail(f"conversion left the training form behind: {', '.join(left[:5])} (please report this "
                            f"with --debug's traceback)")
        notes = [f"trained {schedule.steps} steps" + (f"; weight scales frozen after {o.freeze_observers_after}"
                                                      if schedule.observers_frozen else "")
                 + (f"; BatchNorm frozen after {o.freeze_bn_after}" if schedule.bn_frozen else "")]
        if quantizer.unranged:
            notes.append(f"{len(quantizer.unranged)} tensors had no calibrated range and took the first batch's: "
                         + ", ".join(quantizer.unranged[:5]))
        placed = quantizer.plan
        stats = {"quantized nodes": len(placed.quantized), "inserted Q/DQ pairs": qdq_counts(converted)["quantize"],
                 "quantized weights": len(placed.weights)}
        return PassResult(FxGraph(converted, graph.example_inputs, "torch.export"), True,
                          {k: v for k, v in stats.items() if v}, notes)


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(Qat)

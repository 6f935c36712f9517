"""The Python API: ``graphopt.optimize(model, "fold")`` on an ONNX path/ModelProto or an nn.Module."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from graphopt.errors import UsageError
from graphopt.ir import Graph, load_model
from graphopt.passes.base import PassContext
from graphopt.passes.instruments import Instrument, NumericCheck, Snapshot, Verify
from graphopt.passes.manager import PassManager, RunReport
from graphopt.passes.pipeline import format_passes, resolve
from graphopt.plugins import Registry, load_registry

_registry: Registry | None = None


def default_registry() -> Registry:
    """Every plugin autoloaded once per process (``GRAPHOPT_DISABLE_PLUGIN_AUTOLOAD`` is honoured)."""
    global _registry
    if _registry is None:
        _registry = load_registry()
    return _registry


class FineTune(Instrument):
    """Runs the user's training loop on the model right after each modifying pass named in ``after``.

    ``fn(module)`` receives the FX ``GraphModule`` (parameters are trainable ``nn.Parameter``s; call ``.train()``
    as your loop needs) and trains it in place or returns a replacement. The module is put back in eval mode and
    its shapes re-propagated before the next pass, so ``prune, fine-tune, int8`` is one pipeline.
    """

    def __init__(self, fn: Callable[[Any], Any], after: Iterable[str] = ("prune-channels",)):
        self.fn, self.after = fn, frozenset(after)

    def after_pass(self, pass_, result, record, ctx) -> None:
        if pass_.name not in self.after or not result.modified:
            return
        graph, start = result.graph, time.perf_counter()
        returned = self.fn(graph.gm)
        if returned is not None:
            graph.gm = returned
        graph.gm.eval()
        graph.infer_shapes()
        name = getattr(self.fn, "__name__", type(self.fn).__name__)
        record.notes.append(f"fine-tuned by {name}() in {time.perf_counter() - start:.1f} s")


@dataclass
class OptimizeResult:
    graph: Graph
    report: RunReport
    pipeline: str  # the resolved pipeline, aliases expanded
    _exported: Any = None

    @property
    def model(self) -> Any:
        """The optimized model in its native form: ``onnx.ModelProto`` or ``torch.fx.GraphModule``."""
        if self._exported is None:
            self._exported = self.graph.export()
        return self._exported

    def save(self, path: str) -> None:
        self.graph.save(path)


def optimize(
    model: Any,
    passes: str = "fold",
    *,
    example_inputs: Any = None,
    calibration: Any = None,
    backend: Any = "onnxruntime",
    verify_each: bool = False,
    check: bool = True,
    rtol: float = 1e-4,
    snapshot_dir: str | None = None,
    instruments: Iterable[Any] = (),
    registry: Registry | None = None,
    ctx: PassContext | None = None,
    finetune: Callable[[Any], Any] | None = None,
    finetune_after: Iterable[str] = ("prune-channels",),
) -> OptimizeResult:
    """Run a textual pipeline on ``model``.

    ``backend`` is the target: a registered backend's name or a :class:`graphopt.backends.Backend`; its
    quantization scheme is the one every quantization pass places (a ``ctx`` that has a backend keeps it).
    ``calibration`` is int8 calibration data: a path (.npz, .npy, folders of them or of images), a mapping
    ``{input name: array}`` or an iterable of such batches (see :func:`graphopt.calib.sources.load_calibration`).
    ``check`` runs the numeric-check instrument (every pass declared exact must keep the outputs within
    ``rtol``); ``verify_each`` runs the onnx checker / FX lint after every modifying pass (the final graph is
    always verified). ``model`` is never modified.

    ``finetune(module)`` is your training loop, called right after each pass named in ``finetune_after`` that
    changed the model (pruning, by default) on the FX ``GraphModule``; see :class:`FineTune`. It needs an
    ``nn.Module`` model.
    """
    registry = registry or default_registry()
    graph = load_model(model, example_inputs)
    pass_list = resolve(passes, registry)
    chain = list(instruments)
    if finetune is not None:
        if graph.ir != "fx":
            raise UsageError("finetune= needs a PyTorch model (nn.Module with example_inputs): an ONNX model "
                             "cannot be trained here")
        chain.insert(0, FineTune(finetune, finetune_after))
    if verify_each:
        chain.append(Verify())
    if check:
        chain.append(NumericCheck(rtol=rtol))
    if snapshot_dir:
        chain.append(Snapshot(snapshot_dir))
    if isinstance(backend, str):
        from graphopt.backends import get_backend

        backend = get_backend(registry, backend)
    ctx = ctx or PassContext(registry=registry, calibration=calibration)
    if ctx.backend is None:
        ctx.backend = backend
    # a graph loaded here is ours alone: the passes may work on it directly (the caller's object is untouched)
    out, report = PassManager(pass_list, chain, ctx).run(graph, in_place=graph is not model)
    exported = None
    if report.modified and not verify_each:  # the input was checked when loaded; a changed graph is checked here
        exported = out.export()
        try:
            out.verify(exported)
        except ValueError as exc:
            from graphopt.errors import VerificationError

            raise VerificationError(report.records[-1].name, f"pipeline output is invalid: {exc}") from None
    return OptimizeResult(out, report, format_passes(pass_list), exported)

"""The Python API: ``graphopt.optimize(model, "fold")`` on an ONNX path/ModelProto or an nn.Module.

It builds a :class:`graphopt.driver.RunConfig` and runs it through the same :class:`graphopt.driver.Driver` as
`graphopt run`: the same passes, instruments, checks and report for the same pipeline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from graphopt.driver import Driver, RunConfig
from graphopt.errors import UsageError
from graphopt.ir import Graph, refuse_suffix
from graphopt.passes.base import PassContext
from graphopt.passes.instruments import FineTune
from graphopt.passes.manager import RunReport
from graphopt.plugins import Registry, default_registry

__all__ = ["FineTune", "OptimizeResult", "default_registry", "optimize"]


@dataclass
class OptimizeResult:
    graph: Graph
    report: RunReport
    pipeline: str  # the resolved pipeline, aliases expanded
    _exported: Any = None
    backend: Any = None  # the run's backend: save() writes what it deploys (x86: an AOTInductor package)
    artifact: dict = field(default_factory=dict)  # the backend's facts about the file output= wrote (x86: kernels)
    reads: list = field(default_factory=list)  # (what, path) of every file the run read: save() never writes them

    @property
    def model(self) -> Any:
        """The optimized model in its native form: ``onnx.ModelProto`` or ``torch.fx.GraphModule``."""
        if self._exported is None:
            self._exported = self.graph.export()
        return self._exported

    def save(self, path: str) -> dict[str, Any]:
        """Write the model to ``path`` as the run's backend deploys it (ONNX: external data beside it when it has
        any; a PyTorch model with backend x86: an AOTInductor package, any suffix but .onnx), atomically; returns
        the backend's facts about the file (x86: compile time, kernels, CPU features)."""
        from graphopt.paths import IOPlan, Staged

        if not isinstance(path, (str, os.PathLike)):
            raise UsageError(f"save(): the path must be a str or os.PathLike, got {type(path).__name__}")
        path = os.fspath(path)
        refuse_suffix(self.graph, path, "save()")
        IOPlan(inputs=list(self.reads), outputs=[("save()", path), ("save() (its external data)", path + ".data")]
               ).check()  # the model this came from, its calibration data, ...: never written
        staged = Staged(path)
        try:
            with staged.named():
                if self.backend is not None and self.graph.ir == "fx":
                    facts = self.backend.write(self.graph, staged.staged_path)
                else:
                    self.graph.save(staged.staged_path)
                    facts = {}
            staged.commit()
        finally:
            staged.discard()
        return facts


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
    finetune_after: Iterable[str] | None = None,
    qat: Callable[[Any], Any] | None = None,
    trust_pickle: bool = False,
    output: str | None = None,
    executor: str | None = None,
) -> OptimizeResult:
    """Run a textual pipeline on ``model`` (an .onnx / .pt2 path, an ``onnx.ModelProto``, an ``nn.Module`` with
    ``example_inputs``, or a graphopt Graph); ``model`` is never modified.

    ``backend`` is the target: a registered backend's name or a :class:`graphopt.backends.Backend`; its
    quantization scheme is the one every quantization pass places (a ``ctx`` that has a backend keeps it).
    ``calibration`` is int8 calibration data: a path (.npz, .npy, folders of them or of images), a mapping
    ``{input name: array}`` or an iterable of such batches (see :func:`graphopt.calib.sources.load_calibration`).
    ``check`` runs the numeric check (exact passes must keep the outputs within ``rtol``; approximate ones are
    measured and warned about past the accuracy threshold; see :mod:`graphopt.passes.check`); ``verify_each``
    runs the onnx checker / FX lint and the comparison after every modifying pass (the final graph is always
    verified). ``output``: also write the result there, atomically, checked on the written file.

    ``finetune(module)`` is your training loop, called on the FX ``GraphModule`` right after each pass that changed
    the model and is named in ``finetune_after`` (default: every pass meant to change the outputs — pruning,
    sparsity); see :class:`FineTune`. It needs an ``nn.Module`` model.

    ``executor`` is where searches run their trials (``prune:budget=...``): ``"inprocess"``, ``"processes[:N]"``,
    ``"ray"``, ``"ray://host:port"`` (default in-process; a pass's own ``executor=`` option wins).

    ``qat(module)`` is your training loop for quantization-aware training (the ``int8-qat`` pipeline, its ``qat``
    pass): it trains the fake-quantized ``GraphModule`` (in place, or returns it) before conversion to int8.
    """
    if output is not None and not isinstance(output, (str, os.PathLike)):
        raise UsageError(f"output must be a path (str or os.PathLike), got {type(output).__name__}")
    output = None if output is None else os.fspath(output)
    after = finetune_after.split(",") if isinstance(finetune_after, str) else finetune_after  # "prune,fold-bn"
    after = None if after is None else tuple(after)
    config = RunConfig(passes=passes, backend=backend, example_inputs=example_inputs, calibration=calibration,
                       check=check, rtol=rtol, verify_each=verify_each, snapshot_dir=snapshot_dir,
                       instruments=tuple(instruments), finetune=finetune, finetune_after=after, qat=qat,
                       trust_pickle=trust_pickle, executor=executor)
    driver = Driver(config, registry or default_registry(), ctx)
    result = driver.run(model, output)
    return OptimizeResult(result.graph, result.report, result.resolved, backend=driver.backend,
                          artifact=result.artifact, reads=driver.io_plan(model, result.graph, None).inputs)

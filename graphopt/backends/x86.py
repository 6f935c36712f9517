"""The x86 CPU backend for PyTorch models: PT2E int8 lowered by inductor (with freezing) to oneDNN's int8 kernels.

The scheme is the form inductor's x86 quantization patterns (``torch/_inductor/fx_passes/quantization.py``) fuse
into oneDNN kernels, checked on this machine by lowering and reading the lowered graph:

- activations **uint8 asymmetric** per tensor, weights **int8 symmetric per output channel** (oneDNN multiplies
  unsigned activations by signed weights). On a CPU without VNNI the kernels add two products in an int16 and
  saturate on full-range weights (:mod:`graphopt.backends.cpu`): the weights then use [-64, 64], which keeps the
  lowered model equal to its Q/DQ reference (measured: full range 40.8 dB against fp32 as Q/DQ but 35.6 dB once
  lowered; [-64, 64] 39.9 dB both).
- Q/DQ on the **inputs** of the ops with int8 kernels (``requantize_outputs=False``): ``dq -> conv -> [relu] ->
  q`` becomes one ``qconv_pointwise`` with an int8 output when the next op reads int8, a float output otherwise.
- Conv (and Linear, as Gemm) with int8 kernels; the activations oneDNN fuses as post-ops (Relu, Clip / ReLU6 /
  Hardtanh, HardSwish); an Add reading a conv's output fuses into it as a ``sum`` post-op (``fused_add``): only
  its residual input is quantized. Other Adds stay float (``residual_add_qdq=False``): inductor has no faster
  form for them.
- MaxPool, average pooling, Flatten and Concat run on int8 sharing their input's scale.
- Bias stays float (oneDNN takes it in float).
- ConvTranspose, Conv3d and a MatMul of two activations (attention's) have no int8 lowering here: they stay float
  (a Conv3d's Q/DQ would only add rounding: inductor runs it as a float convolution).

Running models: engine ``inductor`` (the default) lowers an FX graph to an AOTInductor package with freezing
(:mod:`graphopt.backends.x86_aoti`: dynamic batch, a compile cache, the kernels the package calls) and runs the
package; the package is also the artifact :meth:`X86Backend.write` saves, which runs without graphopt. Engines
``fx-x86`` / ``fx-fbgemm`` / ``fx-onednn`` run the same Q/DQ graph on torch's deprecated eager quantized kernels
(:mod:`graphopt.backends.x86_fx`), for comparison. torch is imported inside functions only (the ONNX route never
imports it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np

from graphopt.backends.base import Backend, BackendError, DataError
from graphopt.backends.cpu import u8s8_saturates
from graphopt.backends.scheme import QuantRequest, QuantScheme, TensorQuant, UnsupportedRequestError, restrict_ops
from graphopt.backends.x86_aoti import CACHE_MB, LoweringFacts, build_package, load_package, specs_from_description
from graphopt.backends.x86_export import torch_module
from graphopt.errors import OutputError, UsageError, first_line
from graphopt.ir.feeds import InputSpec
from graphopt.numeric import fmt_db, sqnr_db
from graphopt.passes.check import DEFAULT_MIN_SQNR_DB

QUANTIZED_OPS = frozenset({"Conv", "Gemm", "Add"})
PASSTHROUGH_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Concat"})
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip", "HardSwish"})
WEIGHT_CHANNEL_AXIS = {"Conv": 0, "Gemm": 1}
NOT_INT8 = {
    "ConvTranspose": "inductor's x86 lowering has no int8 ConvTranspose",
    "MatMul": "inductor's x86 lowering has no int8 kernel for a product of two activations (attention's MatMuls "
              "stay float; Linear layers are Gemm)",
}
ENGINES = ("inductor", "fx-x86", "fx-fbgemm", "fx-onednn")
ONNX_REFUSAL = "x86 runs PyTorch models: give a .pt2 / nn.Module, or use --backend onnxruntime"


class X86Backend(Backend):
    """PyTorch models on x86 CPUs: inductor with freezing (oneDNN int8 kernels), AOTInductor packages."""

    name = "x86"
    runtime_packages = ("torch", "torchao")
    irs = frozenset({"fx"})

    def __init__(self, reduce_range: bool | None = None, engine: str = "inductor", use_cache: bool = True,
                 cache_mb: int = CACHE_MB):
        """``reduce_range``: weights in [-64, 64] (see the module docstring); None: when this CPU needs it.
        ``engine``: ``inductor`` (AOTInductor packages, oneDNN int8 kernels) or ``fx-x86`` / ``fx-fbgemm`` /
        ``fx-onednn`` (torch's deprecated eager quantized kernels, for comparison). ``use_cache``: reuse packages
        from the compile cache (``$GRAPHOPT_CACHE_DIR/x86``), kept to ``cache_mb`` (the least recently used
        packages go first)."""
        if engine not in ENGINES:
            raise UsageError(f"unknown x86 engine '{engine}' (known: {', '.join(ENGINES)})")
        self.reduce_range = u8s8_saturates() if reduce_range is None else reduce_range
        self.engine = engine
        self.use_cache, self.cache_mb = use_cache, cache_mb
        if engine != "inductor":  # reports and the scheme say which engine ran
            self.name = f"x86-{engine}"

    def __repr__(self) -> str:
        return f"X86Backend(engine={self.engine!r})"

    def refuse_ir(self, ir: str) -> str | None:
        return None if ir == "fx" else ONNX_REFUSAL

    # -- the scheme ---------------------------------------------------------------------------------------
    def default_scheme(self) -> QuantScheme:
        return QuantScheme(
            backend=self.name,
            activations=TensorQuant("uint8", symmetric=False),
            weights=TensorQuant("int8", symmetric=True, per_channel=True, narrow_range=True,
                                reduce_range=self.reduce_range),
            weight_channel_axis=WEIGHT_CHANNEL_AXIS,
            quantized_ops=QUANTIZED_OPS,
            passthrough_ops=PASSTHROUGH_OPS,
            fused_activations=FUSED_ACTIVATIONS,
            residual_add_qdq=False,
            fused_add=True,
            requantize_outputs=False,
            bias="float",
            format="QDQ",
            min_opset=13,
            conv_dims=frozenset({1, 2}),  # inductor lowers conv1d / conv2d to int8 oneDNN kernels, not conv3d
        )

    def scheme(self, request: QuantRequest | None = None) -> QuantScheme:
        scheme = self.default_scheme()
        if request is None:
            return scheme
        for what, asked, have in (("activations", request.activation_dtype, "uint8"),
                                  ("weights", request.weight_dtype, "int8")):
            if asked is not None and asked != have:
                raise UnsupportedRequestError(
                    f"{what} {asked}: x86's oneDNN int8 kernels take uint8 activations x int8 weights only")
        if request.activation_symmetric:
            raise UnsupportedRequestError("symmetric activations: x86's int8 kernels take uint8 activations with a "
                                          "zero point; leave symmetric=backend")
        if request.weight_symmetric is False:
            raise UnsupportedRequestError("asymmetric weights: x86's int8 kernels take symmetric int8 weights")
        if request.per_channel is not None:
            scheme = replace(scheme, weights=replace(scheme.weights, per_channel=request.per_channel))
        return restrict_ops(scheme, request, NOT_INT8)

    # -- sessions: AOTInductor packages (engine inductor) or torch's eager quantized kernels (fx-*) -----------------
    def session(self, model: Any, threads: int = 0) -> X86Session:
        """A session on ``model``: an :class:`~graphopt.ir.FxGraph` (or a GraphModule from ``torch.export``, an
        ``ExportedProgram``, a torch.export ``.pt2``), lowered by this backend's engine (``inductor``: an
        AOTInductor package with freezing, through the compile cache, see :mod:`graphopt.backends.x86_aoti`;
        ``fx-*``: :mod:`graphopt.backends.x86_fx`); or the path of an AOTInductor package graphopt built.
        ``threads``: torch's intra-op threads (``torch.set_num_threads``, process-wide) when this session runs; 0
        leaves torch's setting as it is."""
        if isinstance(model, X86Session):
            return replace(model, threads=int(threads))
        if isinstance(model, (str, os.PathLike)):
            path = os.fspath(model)
            if self._file_kind(path) == "aoti":
                if self.engine != "inductor":
                    raise BackendError(f"{path}: an AOTInductor package runs on engine inductor, not {self.engine} "
                                       f"(give the torch.export program to compare engines)")
                runner, description = load_package(path)
                if description is None:
                    raise BackendError(f"{path}: a package graphopt did not build: its inputs are not described "
                                       f"(build it with graphopt run --backend x86, or run it with torch directly)")
                return X86Session(runner, specs_from_description(description), list(description["outputs"]),
                                  int(threads))
            from graphopt.ir.fx_graph import FxGraph

            graph = FxGraph.load(path)
        else:
            graph = as_fx_graph(model)
        return self._lower(graph, int(threads))

    def _file_kind(self, path: str) -> str:
        """What a model file is (:func:`~graphopt.ir.torch_files.torch_file_kind`: a damaged archive is a
        ModelLoadError); an ONNX file, or anything that is not a PyTorch file, is refused."""
        from graphopt.ir.torch_files import looks_like_torch_file, torch_file_kind

        if not os.path.isfile(path):
            raise BackendError(f"{path}: no such file")
        if path.lower().endswith(".onnx") or not looks_like_torch_file(path):
            raise BackendError(f"{path}: {ONNX_REFUSAL}")
        return torch_file_kind(path)

    def _lower(self, graph, threads: int) -> X86Session:
        specs = fx_input_specs(graph)
        outputs = fx_output_names(graph)
        if self.engine == "inductor":
            facts = build_package(graph.gm, graph.example_inputs, [s.name for s in specs], outputs,
                                  use_cache=self.use_cache, cache_mb=self.cache_mb)
            runner, description = load_package(facts.package)
            return X86Session(runner, specs_from_description(description), outputs, threads, facts=facts)
        from graphopt.backends.x86_fx import lower_fx

        quant_engine = self.engine[len("fx-"):]
        runner, notes = lower_fx(graph.gm, quant_engine, graph.example_inputs)
        return X86Session(runner, specs, outputs, threads, engine=self.engine, notes=notes, quant_engine=quant_engine)

    def is_session(self, obj: Any) -> bool:
        return isinstance(obj, X86Session)

    def input_specs(self, session) -> list[InputSpec]:
        return list(self._as_session(session).inputs)

    def output_names(self, session) -> list[str]:
        return list(self._as_session(session).outputs)

    def run(self, session, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        session = self._as_session(session)
        torch = torch_module()
        args = [torch.from_numpy(np.ascontiguousarray(_feed(spec, feeds))) for spec in session.inputs]
        with _torch_settings(torch, session.threads, session.quant_engine), torch.no_grad():
            try:
                out = session.runner(*args)
            except Exception as exc:
                raise BackendError(f"x86 run failed ({session.engine}): {first_line(exc)}") from None
        return [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
                for t in torch.utils._pytree.tree_leaves(out)]

    # -- the artifact -------------------------------------------------------------------------------------------
    def write(self, graph, path: str) -> dict[str, Any]:
        """``.onnx``: the graph's ONNX export. Any other path: the AOTInductor package (engine inductor; from the
        cache when it holds it), checked against the graph on its example inputs before it is written; returns
        the lowering facts (:class:`~graphopt.backends.x86_aoti.LoweringFacts` as a dict, with ``summary``
        lines). The fx engines run in this process only: they write the graph's torch.export program."""
        if str(path).lower().endswith(".onnx") or graph.ir != "fx":
            return super().write(graph, path)
        if self.engine != "inductor":
            graph.save(path)
            return {"engine": self.engine, "summary": [f"x86 engine {self.engine} runs in-process only: wrote the "
                                                       f"torch.export program (engine inductor writes a package)"]}
        session = self._lower(graph, 0)
        sqnr = self._check_package(graph, session)
        try:
            shutil.copyfile(session.facts.package, path)
        except OSError as exc:
            raise OutputError(f"{path}: cannot be written ({exc.strerror or first_line(exc)})") from None
        facts = session.facts.to_dict()
        facts.pop("package")
        check = f"x86: the package against the graph on its example inputs: SQNR {fmt_db(sqnr)} dB"
        warnings = []
        if not any(session.facts.dynamic.values()) or session.facts.static_reason:  # a package checks no shape
            shapes = ", ".join(f"{s.name} {'x'.join(map(str, s.shape))}" for s in session.inputs)
            what = "its example's shapes" if not any(session.facts.dynamic.values()) else \
                "its example's sizes in every dim but those it lists as dynamic"
            warnings.append(f"x86: the package takes only {what} ({shapes}; "
                            f"{session.facts.static_reason or 'no dim could be dynamic'}): AOTInductor checks no "
                            f"input shape when it runs, so a package fed other sizes there computes a wrong result "
                            f"without an error; feed it exactly these sizes")
        return {**facts, "engine": self.engine, "check_sqnr_db": sqnr, "warnings": warnings,
                "summary": session.facts.lines() + [check]}

    def _check_package(self, graph, session: X86Session) -> float:
        """The lowest output SQNR of the package against the graph on the graph's example inputs; below the
        accuracy threshold the lowering is wrong, and nothing is written."""
        feeds = {s.name: x.detach().cpu().numpy() for s, x in zip(session.inputs, graph.example_inputs)}
        expected, got = graph.run(feeds), self.run(session, feeds)
        if len(expected) != len(got) or any(e.shape != g.shape for e, g in zip(expected, got)):
            raise BackendError(f"the compiled package's outputs {[g.shape for g in got]} differ in shape from the "
                               f"graph's {[e.shape for e in expected]} (report this with the model)")
        worst = min(sqnr_db(e, g) for e, g in zip(expected, got))
        if not worst >= DEFAULT_MIN_SQNR_DB:
            raise BackendError(f"the compiled package's outputs differ from the graph's: SQNR {fmt_db(worst)} dB < "
                               f"{DEFAULT_MIN_SQNR_DB:g} (run with --backend onnxruntime, or report the model)")
        return worst


@dataclass
class X86Session:
    """A model ready to run on x86: ``runner`` takes and returns torch tensors (a loaded AOTInductor package, or a
    GraphModule on torch's eager quantized kernels); ``facts``: how the package was built (engine inductor)."""

    runner: Any
    inputs: list[InputSpec]
    outputs: list[str]
    threads: int = 0
    engine: str = "inductor"
    facts: LoweringFacts | None = None
    notes: list[str] = field(default_factory=list)  # fx engines: what stayed float, and why
    quant_engine: str | None = None  # fx engines: torch.backends.quantized.engine


def as_fx_graph(model: Any):
    """An FxGraph from an FxGraph, an ``ExportedProgram``, or a GraphModule whose placeholders carry example values
    (``torch.export(...).module()``, PT2E's output); anything else is a :class:`BackendError` saying what to give."""
    from graphopt.ir.fx_graph import FxGraph

    if getattr(model, "ir", None) == "fx":
        return model
    if getattr(model, "ir", None) == "onnx" or type(model).__name__ == "ModelProto":
        raise BackendError(ONNX_REFUSAL)
    torch = torch_module()
    if isinstance(model, torch.export.ExportedProgram):
        return FxGraph.from_exported(model)
    if isinstance(model, torch.fx.GraphModule):
        vals = [n.meta.get("val") for n in model.graph.nodes if n.op == "placeholder"]
        if vals and all(isinstance(v, torch.Tensor) for v in vals):
            gen = torch.Generator().manual_seed(0)
            inputs = [torch.randn(tuple(int(d) for d in v.shape), generator=gen, dtype=v.dtype)
                      if v.is_floating_point() else torch.zeros(tuple(int(d) for d in v.shape), dtype=v.dtype)
                      for v in vals]
            return FxGraph(model, inputs, "torch.export")
    raise BackendError(f"x86 needs example inputs to lower a {type(model).__name__}: give FxGraph(module, "
                       f"example_inputs) or a torch.export program")


def fx_input_specs(graph) -> list[InputSpec]:
    """The graph's inputs as the example inputs show them (every dim static; a package's description says which
    dims its lowering made dynamic)."""
    torch = torch_module()
    return [InputSpec(name, tuple(x.shape), torch.empty((), dtype=x.dtype).numpy().dtype)
            for name, x in zip(graph.input_names(), graph.example_inputs)]


def fx_output_names(graph) -> list[str]:
    """Names of the graph's outputs: the nodes the output node returns (``output_<i>`` for anything else)."""
    torch = torch_module()
    out = next(n for n in graph.gm.graph.nodes if n.op == "output")
    leaves = torch.utils._pytree.tree_leaves(out.args[0])
    return [leaf.name if isinstance(leaf, torch.fx.Node) else f"output_{i}" for i, leaf in enumerate(leaves)]


def _feed(spec: InputSpec, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    if spec.name not in feeds:
        raise DataError(f"no array for model input '{spec.name}' (given: {', '.join(sorted(feeds)) or 'nothing'})")
    arr = np.asarray(feeds[spec.name])
    if arr.ndim != len(spec.shape) or any(isinstance(d, int) and d != n for d, n in zip(spec.shape, arr.shape)):
        raise DataError(f"input '{spec.name}' has shape {tuple(arr.shape)}, the model takes {spec.shape_str()} "
                        f"(a static dim must match: the model was lowered with those dims fixed)")
    return arr.astype(spec.dtype, copy=False)


@contextlib.contextmanager
def _torch_settings(torch, threads: int, quant_engine: str | None):
    """torch's intra-op threads for this run (``threads`` > 0; left set, as switching the OpenMP pool back and forth
    on every run would cost more than the run) and the quantized engine (restored after the run)."""
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    old_engine = torch.backends.quantized.engine
    if quant_engine:
        torch.backends.quantized.engine = quant_engine
    try:
        yield
    finally:
        if quant_engine:
            torch.backends.quantized.engine = old_engine

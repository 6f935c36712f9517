"""Lowering a PyTorch model to an AOTInductor package for x86 CPUs, with a compile cache.

The FX module is exported (``torch.export``, dynamic dimensions where the model allows, see
:func:`dynamic_dims`) and compiled by AOTInductor with **freezing** into a ``.pt2`` package: freezing is where
inductor's x86 quantization patterns (``torch/_inductor/fx_passes/quantization.py``) turn ``dequantize -> conv /
linear -> [activation] -> quantize`` into oneDNN int8 kernels (``onednn.qconv_pointwise``, ``qconv2d_pointwise
.binary`` for conv + add + relu, ``qlinear_pointwise``), with the weights prepacked; a float graph gets oneDNN's
float kernels. Freezing only runs with gradients off (``compile_fx``: ``config.freezing and not
torch.is_grad_enabled()``), so the compile runs under ``torch.no_grad()``. The package loads in any process that
has torch (``torch._inductor.aoti_load_package``), without graphopt.

Which kernels a package calls is read from its own generated wrapper code (:func:`package_kernels`): what is
counted is what runs. The compile cache (``GRAPHOPT_CACHE_DIR``, default ``~/.cache/graphopt/x86``) keys a package
on the module (its code, module tree and every tensor's bytes), the example input shapes, the dynamic dims, torch's
version, the inductor config, the CPU's features and this module's lowering version; a hit copies the file. (AOT
compilation does not use inductor's own FX graph cache: ``compile_fx`` skips it in ``aot_mode``.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any

from graphopt.backends.base import BackendError
from graphopt.errors import UnsupportedError, first_line
from graphopt.ir.feeds import InputSpec

LOWERING_VERSION = 1  # bump when the lowering below changes what a package holds: old cache entries are not reused
INDUCTOR_CONFIGS = {"freezing": True}
METADATA_KEY = "graphopt"  # the package's AOTI metadata entry holding its inputs, outputs and dynamic dims
INSTALL_HINT = "pip install 'graphopt[torch]'"
# extern kernels in AOTInductor's generated wrapper (aoti_torch_cpu_<op>), by what they compute
_KERNEL_KINDS = (("int8 conv", re.compile(r"qconv")), ("int8 linear", re.compile(r"qlinear")),
                 ("float conv", re.compile(r"convolution")),
                 ("float linear/matmul", re.compile(r"(^|_)(linear|mm|addmm|bmm|baddbmm|matmul)(_|$)")))


def torch_module():
    """torch, with inductor and the ``quantized_decomposed`` ops a PT2E graph holds (registered on import of
    ``torch.ao.quantization.fx._decomposed``); a one-line error naming the install when they are missing."""
    try:
        with _quiet():
            import torch
            import torch._inductor  # noqa: F401
            import torch.ao.quantization.fx._decomposed  # noqa: F401
    except ImportError as exc:
        raise UnsupportedError(f"the x86 backend needs torch with inductor ({exc.msg}): {INSTALL_HINT}") from None
    return torch


def cache_dir() -> str:
    return os.environ.get("GRAPHOPT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "graphopt", "x86")


@dataclass
class LoweringFacts:
    """What lowering a model gave: for the report (``lines``) and the JSON (``to_dict``)."""

    package: str
    cache: str  # "hit", "miss", or "off (<why>)"
    compile_s: float  # the compile that made the package (on a hit: the original compile, as recorded)
    build_s: float  # this build: the compile, or the cache look-up and copy
    cpu_features: str
    cpu_capability: str
    torch_version: str
    kernels: dict[str, int] = field(default_factory=dict)
    dynamic: dict[str, list[int]] = field(default_factory=dict)  # input -> its dynamic dims
    static_reason: str = ""  # why the batch dims are static, when they are
    size_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        cache = {"hit": f"cache hit, {self.build_s:.2f} s (compiled in {self.compile_s:.1f} s)",
                 "miss": f"compiled in {self.compile_s:.1f} s"}.get(self.cache, f"compiled in {self.compile_s:.1f} s, "
                                                                               f"cache {self.cache}")
        dims = "; ".join(f"'{name}' dim {', '.join(map(str, d))}" for name, d in self.dynamic.items() if d)
        shapes = f"dynamic {dims}" if dims else f"static shapes ({self.static_reason or 'no dim could be dynamic'})"
        return [f"x86: AOTInductor package with freezing, {cache}; {self.size_bytes:,} bytes",
                f"x86: kernels {format_kernels(self.kernels)}; {shapes}",
                f"x86: CPU {self.cpu_features}; torch {self.torch_version}, ATen CPU capability {self.cpu_capability}"]


def format_kernels(kernels: dict[str, int]) -> str:
    shown = ", ".join(f"{n} {kind}" for kind, n in kernels.items() if n)
    return shown or "none of conv / linear (elementwise code only)"


# -- dynamic dims ------------------------------------------------------------------------------------------
def dynamic_dims(example_inputs) -> list[tuple[int, ...]]:
    """The dims asked to be dynamic, per input: the first (batch) of every input; the second of integer and bool
    inputs of rank >= 2 (token ids, attention masks: the sequence) and of float inputs of rank 3 (a sequence of
    embeddings). They are asked as ``Dim.AUTO``: a dim the model fixes (a view to a constant size) stays static
    without an error, and :func:`export_dynamic` reports the dims that did become dynamic."""
    dims = []
    for x in example_inputs:
        chosen = (0,) if x.dim() >= 1 else ()
        if (not x.is_floating_point() and x.dim() >= 2) or (x.is_floating_point() and x.dim() == 3):
            chosen = (0, 1)
        dims.append(chosen)
    return dims


def _widen(x, dims: tuple[int, ...]):
    """``x`` repeated along each of ``dims`` whose size is 1 (export specializes dims of size 0 or 1)."""
    for d in dims:
        if x.shape[d] == 1:
            x = x.repeat_interleave(2, dim=d)
    return x


def strip_guards(gm) -> None:
    """Remove the ``_guards_fn`` call a ``torch.export(...).module()`` carries: it asserts the *original*
    export's input shapes (``x.size()[0] == 2``), which would fix every dim again on re-export."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()


def export_dynamic(gm, example_inputs) -> tuple[Any, dict[str, list[int]], str]:
    """``(exported program, input name -> dynamic dims, why static)``. ``gm`` is exported with :func:`dynamic_dims`
    as ``Dim.AUTO``, then with the batch dims only, and each program is probed: run (eagerly, with torch.export's
    guards) on inputs one larger in every dim it made dynamic. A graph that fixes a size (a view to the example's
    ``[2, 8, 4, 16]`` holds only while batch x sequence = 16: export keeps that as a guard, not a static dim, and an
    AOTInductor package does not check guards) fails the probe; when every attempt fails it is exported static,
    with the reason."""
    torch = torch_module()
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    static = {n: [] for n in names}
    reason = _dynamic_hazard(gm)
    if reason:
        return _export_static(gm, example_inputs), static, reason
    wanted = dynamic_dims(example_inputs)
    attempts = [wanted] + ([[d[:1] for d in wanted]] if any(len(d) > 1 for d in wanted) else [])
    for dims in attempts:
        widened = tuple(_widen(x, d) for x, d in zip(example_inputs, dims))
        spec = tuple({d: torch.export.Dim.AUTO for d in ds} for ds in dims)
        try:
            program = torch.export.export(gm, widened, dynamic_shapes=spec)
        except Exception as exc:
            reason = f"torch.export could not free them: {first_line(exc, 160)}"
            continue
        user_inputs = set(program.graph_signature.user_inputs)
        placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
        dynamic = {name: [i for i, d in enumerate(getattr(node.meta.get("val"), "shape", ()))
                          if not isinstance(d, int)] for name, node in zip(names, placeholders)}
        if not any(dynamic.values()):
            return program, static, "the model fixes every dim torch.export was asked to free"
        probe = tuple(_grow(x, dynamic[name]) for name, x in zip(names, widened))
        try:
            with torch.no_grad():
                program.module()(*probe)
        except Exception as exc:
            reason = f"the graph holds a size of its example inputs: {first_line(exc, 120)}"
            continue
        return program, dynamic, ""
    return _export_static(gm, example_inputs), static, reason


def _grow(x, dims: list[int]):
    """``x`` one larger along each of ``dims`` (its first slice repeated: valid token ids stay valid)."""
    torch = torch_module()
    for d in dims:
        x = torch.cat([x, x.narrow(d, 0, 1)], dim=d)
    return x


def _export_static(gm, example_inputs):
    torch = torch_module()
    try:
        return torch.export.export(gm, tuple(example_inputs))
    except Exception as exc:
        raise UnsupportedError(f"torch.export cannot capture the model for x86 ({first_line(exc)}) (check that the "
                               f"module runs on its example inputs)") from None


def _dynamic_hazard(gm) -> str:
    """Why dynamic dims would give wrong results, or "". torch 2.13's inductor assumes a *contiguous* output for a
    conv on a 1-channel input when shapes are dynamic (``mkldnn_ir._prepare_convolution_fusion_create``: such an
    input is both contiguous and channels-last), which holds for the float kernel but not for oneDNN's int8 conv,
    whose output is always channels-last: the next op reads it transposed (measured: SQNR < 15 dB against the Q/DQ
    graph). Such a graph is compiled with static shapes."""
    torch = torch_module()
    dq = torch.ops.quantized_decomposed.dequantize_per_tensor
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.ops.aten.conv2d.default,
                                                             torch.ops.aten.convolution.default):
            continue
        x, w = node.args[0], node.args[1]
        quantized = isinstance(x, torch.fx.Node) and x.op == "call_function" and x.target in (dq.default, dq.tensor)
        shape = _weight_shape(gm, w)
        groups = node.args[6] if node.target == torch.ops.aten.conv2d.default and len(node.args) > 6 else \
            (node.args[8] if len(node.args) > 8 else 1)
        if quantized and shape is not None and len(shape) > 1 and shape[1] * groups == 1:
            return (f"inductor miscompiles an int8 conv on a 1-channel input ('{node.name}') with dynamic shapes, "
                    f"torch {torch.__version__}")
    return ""


def _weight_shape(gm, node):
    """The shape of a conv's weight: its example value, or the tensor a (dequantized) get_attr reads."""
    val = getattr(node, "meta", {}).get("val")
    if val is not None:
        return tuple(val.shape)
    while getattr(node, "op", None) == "call_function" and node.args:  # dequantize_per_channel(get_attr, ...)
        node = node.args[0]
    value = _attr(gm, node.target) if getattr(node, "op", None) == "get_attr" else None
    return tuple(value.shape) if value is not None and hasattr(value, "shape") else None


# -- the cache key -------------------------------------------------------------------------------------------
def _tensor_bytes(t) -> bytes:
    t = t.detach().cpu()
    if t.is_quantized:
        t = t.int_repr()
    return t.contiguous().reshape(-1).view(__import__("torch").uint8).numpy().tobytes()


def cache_key(gm, example_inputs, dims: list[tuple[int, ...]]) -> str:
    """A hash of everything a package depends on (see the module docstring)."""
    torch = torch_module()
    from graphopt.backends.cpu import int8_features

    h = hashlib.sha256()
    for part in (f"graphopt-x86-lowering {LOWERING_VERSION}", torch.__version__, json.dumps(INDUCTOR_CONFIGS),
                 torch.backends.cpu.get_cpu_capability(), int8_features(), str(gm),  # str: module tree + code
                 repr([(tuple(x.shape), str(x.dtype)) for x in example_inputs]), repr(dims)):
        h.update(part.encode() + b"\0")
    tensors = dict(gm.state_dict(keep_vars=True))
    for node in gm.graph.nodes:  # tensors a get_attr reads that are not parameters or buffers (PT2E's scales)
        if node.op == "get_attr" and node.target not in tensors:
            value = _attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                tensors[node.target] = value
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode() + b"\0")
        h.update(_tensor_bytes(t))
    return h.hexdigest()[:40]


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock on ``path`` (a parallel build of the same model waits, then finds it in the cache)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux / macOS: no lock, a race costs a second compile
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- building a package --------------------------------------------------------------------------------------
def build_package(gm, example_inputs, input_names: list[str], output_names: list[str], *, use_cache: bool = True
                  ) -> LoweringFacts:
    """The AOTInductor package of ``gm`` (from the cache when it holds it): its path and the facts of its build.
    ``gm`` is not modified."""
    import copy

    torch = torch_module()
    from graphopt.backends.cpu import int8_features

    start = time.perf_counter()
    with _quiet():
        gm = copy.deepcopy(gm)
    strip_guards(gm)
    example_inputs = tuple(example_inputs)
    dims = dynamic_dims(example_inputs)
    key = cache_key(gm, example_inputs, dims)
    folder, cache_state = cache_dir(), "miss"
    if use_cache:
        try:
            os.makedirs(folder, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-")
            probe.close()
        except OSError as exc:
            folder, cache_state = None, f"off ({folder}: {exc.strerror or exc})"
    else:
        folder, cache_state = None, "off (not asked)"
    if folder is None:
        folder = tempfile.mkdtemp(prefix="graphopt-x86-")
    package, sidecar = os.path.join(folder, f"{key}.pt2"), os.path.join(folder, f"{key}.json")
    with _locked(os.path.join(folder, f"{key}.lock")) if cache_state == "miss" else contextlib.nullcontext():
        if cache_state == "miss" and os.path.isfile(package) and os.path.isfile(sidecar):
            try:
                with open(sidecar) as f:
                    recorded = json.load(f)
                facts = LoweringFacts(**{**recorded, "package": package, "cache": "hit",
                                         "build_s": time.perf_counter() - start})
                return facts
            except (OSError, ValueError, TypeError):
                pass  # a damaged entry: compile again over it
        compile_start = time.perf_counter()
        with _quiet():
            program, dynamic, static_reason = export_dynamic(gm, example_inputs)
            metadata = {METADATA_KEY: json.dumps(_describe(program, input_names, output_names, dynamic))}
            staged = os.path.join(folder, f".{key}.{os.getpid()}.pt2")
            try:
                with torch.no_grad():
                    torch._inductor.aoti_compile_and_package(
                        program, package_path=staged,
                        inductor_configs={**INDUCTOR_CONFIGS, "aot_inductor.metadata": metadata})
            except Exception as exc:
                if os.path.exists(staged):
                    os.unlink(staged)
                raise BackendError(f"inductor could not compile the model for x86: {first_line(exc)} (run it with "
                                   f"--backend onnxruntime, or report the op that fails)") from None
        compile_s = time.perf_counter() - compile_start
        os.replace(staged, package)
        facts = LoweringFacts(package, cache_state, compile_s, time.perf_counter() - start, int8_features(),
                              torch.backends.cpu.get_cpu_capability(), torch.__version__, package_kernels(package),
                              dynamic, static_reason, os.path.getsize(package))
        if cache_state == "miss":
            _write_json(sidecar, {k: v for k, v in facts.to_dict().items() if k not in ("package", "cache",
                                                                                      "build_s")})
    return facts


def _write_json(path: str, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".graphopt-", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _describe(program, input_names: list[str], output_names: list[str], dynamic: dict[str, list[int]]) -> dict:
    """What graphopt needs to feed a package: input names, shapes (dynamic dims as None), dtypes; output names."""
    user_inputs = set(program.graph_signature.user_inputs)
    vals = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    inputs = []
    for name, val in zip(input_names, vals):
        dims = dynamic.get(name, [])
        shape = [None if i in dims else int(d) for i, d in enumerate(val.shape)]
        inputs.append({"name": name, "shape": shape, "dtype": str(val.dtype).replace("torch.", "")})
    return {"inputs": inputs, "outputs": list(output_names), "lowering": LOWERING_VERSION}


@contextlib.contextmanager
def _quiet():
    from graphopt.pt2e.torchao import quiet_torch_logs

    with quiet_torch_logs():
        yield


# -- reading a package -------------------------------------------------------------------------------------------
def package_kernels(path: str) -> dict[str, int]:
    """How many extern kernel calls of each kind (int8 / float conv, int8 / float linear or matmul) the package's
    generated wrapper code makes; ``{}`` when the package holds no wrapper source."""
    counts = {kind: 0 for kind, _ in _KERNEL_KINDS}
    try:
        with zipfile.ZipFile(path) as zf:
            sources = [zf.read(n).decode("utf-8", "replace") for n in zf.namelist() if n.endswith("wrapper.cpp")]
    except (OSError, zipfile.BadZipFile) as exc:
        raise BackendError(f"{path}: cannot read the package ({first_line(exc)})") from None
    if not sources:
        return {}
    for call in re.findall(r"aoti_torch_cpu_(\w+?)\(", "\n".join(sources)):
        for kind, pattern in _KERNEL_KINDS:
            if pattern.search(call):
                counts[kind] += 1
                break
    return counts


def load_package(path: str):
    """``(runner, description)``: the loaded package and graphopt's description of its inputs and outputs (None
    for a package graphopt did not build)."""
    torch = torch_module()
    isa = _package_isa(path)
    here = torch.backends.cpu.get_cpu_capability()
    if isa and "AVX512" in isa.upper() and "AVX512" not in here.upper():
        raise BackendError(f"{path}: compiled for {isa}; this CPU runs {here} (build the package on this machine)")
    try:
        with _quiet():
            runner = torch._inductor.aoti_load_package(path)
    except Exception as exc:
        raise BackendError(f"{path}: AOTInductor could not load the package: {first_line(exc)} (build it again with "
                           f"this torch, {torch.__version__})") from None
    description = None
    text = runner.get_metadata().get(METADATA_KEY)
    if text:
        try:
            description = json.loads(text)
        except ValueError:
            description = None
    return runner, description


def _package_isa(path: str) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if name.endswith("wrapper_metadata.json"):
                    return json.loads(zf.read(name)).get("AOTI_CPU_ISA", "")
    except (OSError, zipfile.BadZipFile, ValueError):
        raise BackendError(f"{path}: not a readable AOTInductor package (a damaged zip archive)") from None
    return ""


def specs_from_description(description: dict) -> list[InputSpec]:
    import numpy as np

    return [InputSpec(i["name"], tuple(i["shape"]), np.dtype(_NUMPY_DTYPES.get(i["dtype"], i["dtype"])))
            for i in description["inputs"]]


_NUMPY_DTYPES = {"float32": "float32", "float16": "float16", "float64": "float64", "bfloat16": "float32",
                 "int64": "int64", "int32": "int32", "bool": "bool", "uint8": "uint8", "int8": "int8"}

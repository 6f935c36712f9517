"""Lowering a PyTorch model to an AOTInductor package for x86 CPUs, with a compile cache.

The FX module is exported (``torch.export``, dynamic dimensions where the model allows and they check out: see
:mod:`graphopt.backends.x86_export`) and compiled by AOTInductor with **freezing** into a ``.pt2`` package:
freezing is where inductor's x86 quantization patterns (``torch/_inductor/fx_passes/quantization.py``) turn
``dequantize -> conv / linear -> [activation] -> quantize`` into oneDNN int8 kernels (``onednn.qconv_pointwise``,
``qconv2d_pointwise.binary`` for conv + add + relu, ``qlinear_pointwise``), with the weights prepacked; a float
graph gets oneDNN's float kernels. Freezing only runs with gradients off (``compile_fx``: ``config.freezing and not
torch.is_grad_enabled()``), so the compile runs under ``torch.no_grad()``. The package loads in any process that
has torch (``torch._inductor.aoti_load_package``), without graphopt.

Which kernels a package calls is read from its own generated wrapper code (:func:`package_kernels`): what is
counted is what runs. The compile cache (``$GRAPHOPT_CACHE_DIR/x86``, default ``~/.cache/graphopt/x86``) keys a package
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
import shutil
import subprocess
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any

from graphopt.backends.base import BackendError
from graphopt.backends.cache import cache_folder, trim_cache, used
from graphopt.backends.x86_export import (
    dynamic_dims,
    export_dynamic,
    export_static,
    quiet,
    strip_guards,
    torch_module,
)
from graphopt.errors import first_line
from graphopt.ir.feeds import InputSpec
from graphopt.ir.fx_ops import get_attr

CACHE_MB = 2048  # the compile cache's size: the least recently used packages go past it
LOWERING_VERSION = 4  # bump when the lowering below changes what a package holds: old cache entries are not reused
INDUCTOR_CONFIGS = {"freezing": True}
METADATA_KEY = "graphopt"  # the package's AOTI metadata entry holding its inputs, outputs and dynamic dims
# extern kernels in AOTInductor's generated wrapper (aoti_torch_cpu_<op>), by what they compute
_KERNEL_KINDS = (("int8 conv", re.compile(r"qconv")), ("int8 linear", re.compile(r"qlinear")),
                 ("float conv", re.compile(r"convolution")),
                 ("float linear/matmul", re.compile(r"(^|_)(linear|mm|addmm|bmm|baddbmm|matmul)(_|$)")))


def cache_dir() -> str:
    """The compile cache: ``$GRAPHOPT_CACHE_DIR/x86`` (``~/.cache/graphopt/x86``), as the other backends' caches."""
    return cache_folder("", "x86")


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
            value = get_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                tensors[node.target] = value
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode() + b"\0")
        h.update(_tensor_bytes(t))
    return h.hexdigest()[:40]


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
def build_package(gm, example_inputs, input_names: list[str], output_names: list[str], *, use_cache: bool = True,
                  cache_mb: int = CACHE_MB) -> LoweringFacts:
    """The AOTInductor package of ``gm`` (from the cache when it holds it): its path and the facts of its build.
    ``gm`` is not modified. After a compile the cache is kept to ``cache_mb`` (least recently used packages go
    first, with their facts)."""
    import copy

    torch = torch_module()
    from graphopt.backends.cpu import int8_features

    start = time.perf_counter()
    with quiet():
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
                used(package)
                return facts
            except (OSError, ValueError, TypeError):
                pass  # a damaged entry: compile again over it
        compile_start = time.perf_counter()
        with quiet():
            program, dynamic, static_reason = export_dynamic(gm, example_inputs)
            staged = os.path.join(folder, f".{key}.{os.getpid()}.pt2")
            try:
                _compile(program, staged, input_names, output_names, dynamic)
            except Exception as exc:
                if not any(dynamic.values()):
                    raise _cannot_compile(exc) from None
                # inductor fails on some dynamic forms (attention with a padding mask): the example's shapes, said
                program, dynamic = export_static(gm, example_inputs), {name: [] for name in dynamic}
                static_reason = f"inductor could not compile the dynamic form: {first_line(exc, 120)}"
                try:
                    _compile(program, staged, input_names, output_names, dynamic)
                except Exception as again:
                    raise _cannot_compile(again) from None
            strip_debug_info(staged)
        compile_s = time.perf_counter() - compile_start
        if cache_state == "miss":  # room for the new package: the least recently used ones go, with their facts
            trim_cache(folder, ".pt2", max(0, (cache_mb << 20) - os.path.getsize(staged)), (".json", ".lock"))
        os.replace(staged, package)
        kernels = package_kernels(package)
        inlined = quantized_layers(gm) - kernels.get("int8 conv", 0) - kernels.get("int8 linear", 0)
        if kernels and inlined > 0:  # Q/DQ layers inductor wrote as float code of its own (no extern int8 call)
            kernels["int8 layer lowered as float code"] = inlined
        facts = LoweringFacts(package, cache_state, compile_s, time.perf_counter() - start, int8_features(),
                              torch.backends.cpu.get_cpu_capability(), torch.__version__, kernels,
                              dynamic, static_reason, os.path.getsize(package))
        if cache_state == "miss":
            _write_json(sidecar, {k: v for k, v in facts.to_dict().items() if k not in ("package", "cache",
                                                                                      "build_s")})
    return facts


def _cannot_compile(exc: Exception) -> BackendError:
    return BackendError(f"inductor could not compile the model for x86: {first_line(exc)} (run it with --backend "
                        f"onnxruntime, or report the op that fails)")


def _compile(program, staged: str, input_names, output_names, dynamic) -> None:
    """AOTInductor's package of ``program`` at ``staged``, described for graphopt (inputs, outputs, dynamic dims);
    nothing left there when it fails."""
    torch = torch_module()
    metadata = {METADATA_KEY: json.dumps(_describe(program, input_names, output_names, dynamic))}
    try:
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(
                program, package_path=staged, inductor_configs={**INDUCTOR_CONFIGS, "aot_inductor.metadata": metadata})
    except BaseException:
        if os.path.exists(staged):
            os.unlink(staged)
        raise


def strip_debug_info(package: str) -> None:
    """Rewrite the package with the debug information of its shared library removed (binutils' ``strip
    --strip-debug``; nothing when it is not installed or fails): AOTInductor's library carries DWARF for its
    runtime, 1.2 of a 28k-parameter CNN's 1.7 MB package. The code, the weights and the other files (the
    generated sources :func:`package_kernels` reads) are kept as they are."""
    torch_module()
    from torch.export.pt2_archive._package import PT2ArchiveReader, PT2ArchiveWriter

    tool = shutil.which("strip")
    if tool is None:
        return
    with tempfile.TemporaryDirectory(prefix=".graphopt-strip-", dir=os.path.dirname(os.path.abspath(package))) as tmp:
        try:
            with PT2ArchiveReader(package) as reader:
                records = {name: reader.read_bytes(name) for name in reader.get_file_names()}
            for name, data in records.items():
                if name.endswith(".so"):
                    lib = os.path.join(tmp, "lib.so")
                    with open(lib, "wb") as f:
                        f.write(data)
                    subprocess.run([tool, "--strip-debug", lib], check=True, capture_output=True, timeout=120)
                    with open(lib, "rb") as f:
                        records[name] = f.read()
            rewritten = os.path.join(tmp, "package.pt2")
            writer = PT2ArchiveWriter(rewritten)
            for name, data in records.items():
                if not writer.has_record(name):
                    writer.write_bytes(name, data)
            writer.close()
        except (OSError, RuntimeError, subprocess.SubprocessError):
            return
        shutil.move(rewritten, package)


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


# -- reading a package -------------------------------------------------------------------------------------------
def quantized_layers(gm) -> int:
    """How many conv / linear nodes of ATen graph ``gm`` read a dequantized weight (the layers a Q/DQ graph means to
    run in int8): what the package's int8 kernels are counted against."""
    from graphopt.ir.fx_ops import aten_name, onnx_op_type

    return sum(1 for n in gm.graph.nodes if onnx_op_type(n) in ("Conv", "Gemm") and len(n.args) > 1
               and aten_name(n.args[1]).startswith("dequantize"))


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
        with quiet():
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

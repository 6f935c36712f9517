"""What a TensorRT engine build will be, decided without TensorRT: the build options, the optimization profiles,
the workspace size, the engine cache key and the equivalent ``trtexec`` command.

Everything here is plain Python so that it is tested on machines without TensorRT or a GPU, and so that
``--emit-trtexec`` writes the same build as the Python API would make (:mod:`graphopt.backends.tensorrt_build`).

**Profiles.** TensorRT needs an optimization profile (min / opt / max shape) for every input with a dynamic
dimension. They come from ``shapes`` (graphopt's ``--shapes``): ``name:MIN/OPT/MAX`` per input, shapes written
``1x3x224x224`` as trtexec writes them, several inputs separated by ``,`` (a single shape ``name:1x3x224x224``
means min = opt = max, as trtexec's ``--shapes``). An input with a dynamic dimension that ``shapes`` does not
name gets each dynamic dimension min 1 / opt ``dynamic_opt`` (8) / max ``dynamic_max`` (32), batch or not: a
default that builds, not one tuned for the model; the run report says when it was used.

**Workspace.** As trtexec's ``--memPoolSize``: a number with a base-2 suffix ``B``, ``K``, ``M`` or ``G``; a bare
number is MiB.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass

import onnx

from graphopt.backends.cache import cache_folder as backend_cache_folder
from graphopt.errors import UsageError
from graphopt.ir.feeds import InputSpec

DEFAULT_OPT, DEFAULT_MAX = 8, 32
UNITS = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


@dataclass(frozen=True)
class BuildOptions:
    """The tensorrt backend's options: ``--backend tensorrt:workspace=1G:emit_trtexec=true`` (``--shapes`` and
    ``--emit-trtexec`` on ``graphopt run`` set ``shapes`` and ``emit_trtexec``)."""

    shapes: str = ""  # min/opt/max per input: name:1x3x224x224/8x3x224x224/32x3x224x224[,name2:...]
    dynamic_opt: int = DEFAULT_OPT  # opt size of a dynamic dimension that `shapes` does not set
    dynamic_max: int = DEFAULT_MAX  # max size of a dynamic dimension that `shapes` does not set (min is 1)
    workspace: str = ""  # the workspace memory pool limit, e.g. 1G or 512M (bare number: MiB); "": TensorRT's
    engine: str = ""  # the engine file; "": beside the ONNX output, NAME.engine
    cache_dir: str = ""  # the engine cache; "": $GRAPHOPT_CACHE_DIR/tensorrt (~/.cache/graphopt/tensorrt); none: off
    cache_mb: int = 2048  # the engine cache's size: the least recently used engines go past it
    timing_cache: str = ""  # the timing cache file; "": timing.cache in the engine cache; none: no timing cache
    emit_trtexec: bool = False  # write NAME.trtexec.sh (the same build as a trtexec command) instead of building
    build: bool = True  # false: write the ONNX graph only

    def __post_init__(self):
        if not 1 <= self.dynamic_opt <= self.dynamic_max:
            raise ValueError(f"need 1 <= dynamic_opt <= dynamic_max, got {self.dynamic_opt} and {self.dynamic_max}")
        workspace_bytes(self.workspace)  # a malformed size is a usage error before any pass runs
        if self.cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {self.cache_mb}")
        if self.shapes:
            parse_shapes(self.shapes)


@dataclass(frozen=True)
class Profile:
    """One input's optimization profile; ``defaulted``: its dynamic dims took the defaults (no ``shapes``)."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]
    defaulted: bool = False

    def text(self) -> str:
        return f"{self.name} {_dims(self.min)} / {_dims(self.opt)} / {_dims(self.max)}"


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def workspace_bytes(text: str) -> int | None:
    """``1G`` -> 1073741824; ``""`` -> None (TensorRT's default: the device's memory)."""
    text = text.strip()
    if not text:
        return None
    unit = text[-1].upper() if not text[-1].isdigit() else "M"
    number = text[:-1] if not text[-1].isdigit() else text
    try:
        value = float(number) * UNITS[unit]
    except (KeyError, ValueError):
        raise ValueError(f"workspace '{text}' is not a size like 1G, 512M or 64K (a bare number is MiB)") from None
    if value <= 0:
        raise ValueError(f"workspace '{text}' must be positive")
    return int(value)


def size_text(n: int) -> str:
    """Bytes as trtexec reads them: ``1G``, ``512M``, ``4096B``."""
    for unit in ("G", "M", "K"):
        if n % UNITS[unit] == 0:
            return f"{n // UNITS[unit]}{unit}"
    return f"{n}B"


def _shape(text: str, where: str) -> tuple[int, ...]:
    if text in ("", "scalar"):
        return ()
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{where}: '{text}' is not a shape like 1x3x224x224") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"{where}: '{text}' has a negative dimension")
    return dims


def parse_shapes(text: str) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """``x:1x3x8x8/4x3x8x8/8x3x8x8,y:1x4`` -> ``{name: (min, opt, max)}``. A name may hold ``:`` (the shapes
    follow the last one) and may be wrapped in single quotes, as trtexec allows."""
    out = {}
    for item in text.split(","):
        name, sep, spec = item.strip().rpartition(":")
        name = name.strip().strip("'")
        if not sep or not name:
            raise ValueError(f"shapes '{item}' is not NAME:MIN/OPT/MAX (e.g. x:1x3x224x224/8x3x224x224/32x3x224x224)")
        if name in out:
            raise ValueError(f"shapes: input '{name}' given twice")
        parts = spec.split("/")
        if len(parts) not in (1, 3):
            raise ValueError(f"shapes '{item}': give one shape or three (min/opt/max), not {len(parts)}")
        dims = [_shape(p.strip(), f"shapes '{item}'") for p in parts]
        lo, opt, hi = dims if len(dims) == 3 else dims * 3
        if not len(lo) == len(opt) == len(hi):
            raise ValueError(f"shapes '{item}': min, opt and max have different ranks")
        if any(not a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise ValueError(f"shapes '{item}': each dimension needs min <= opt <= max")
        out[name] = (lo, opt, hi)
    return out


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph's inputs that are not initializers, dims fixed (int) or dynamic (a name or None)."""
    init = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in init:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in value.type.tensor_type.shape.dim]
        specs.append(InputSpec(value.name, tuple(dims)))
    return specs


def profiles(inputs: list[InputSpec], options: BuildOptions) -> list[Profile]:
    """The profile of every input with a dynamic dimension or named in ``options.shapes``; none when all inputs
    are static and ``shapes`` is empty (TensorRT needs no profile then). A shape that contradicts a fixed
    dimension, or names an input the model does not have, is a usage error."""
    given = parse_shapes(options.shapes) if options.shapes else {}
    names = [s.name for s in inputs]
    unknown = [n for n in given if n not in names]
    if unknown:
        raise UsageError(f"--shapes names {', '.join(unknown)}, not an input of the model "
                         f"(its inputs: {', '.join(names) or 'none'})")
    out = []
    for spec in inputs:
        dynamic = [i for i, d in enumerate(spec.shape) if not isinstance(d, int)]
        if spec.name in given:
            lo, opt, hi = given[spec.name]
            if len(lo) != len(spec.shape):
                raise UsageError(f"--shapes {spec.name}: {len(lo)} dimensions, the model's input has "
                                 f"{len(spec.shape)} {spec.shape_str()}")
            for i, d in enumerate(spec.shape):
                if isinstance(d, int) and not lo[i] == opt[i] == hi[i] == d:
                    raise UsageError(f"--shapes {spec.name}: dimension {i} is fixed to {d} in the model "
                                     f"{spec.shape_str()}, got {lo[i]}/{opt[i]}/{hi[i]}")
            out.append(Profile(spec.name, lo, opt, hi))
        elif dynamic:
            pick = lambda v: tuple(d if isinstance(d, int) else v for d in spec.shape)  # noqa: E731
            out.append(Profile(spec.name, pick(1), pick(options.dynamic_opt), pick(options.dynamic_max), True))
    return out


def defaulted_note(plan: list[Profile], inputs: list[InputSpec]) -> str | None:
    """A line for the report when some dynamic dims took the defaults."""
    used = [p for p in plan if p.defaulted]
    if not used:
        return None
    dims = {p.name: next(s for s in inputs if s.name == p.name).shape_str() for p in used}
    return ("tensorrt: dynamic dims without --shapes got min 1 / opt / max defaults: "
            + "; ".join(f"{p.text()} (model {dims[p.name]})" for p in used))


def cache_key(model_sha256: str, tensorrt_version: str, cuda_version: str, compute_capability: str,
              config: dict, plan: list[Profile]) -> str:
    """The engine cache key: the model's bytes, TensorRT's and CUDA's versions, the builder configuration, the
    profiles and the GPU's compute capability (an engine runs only on the TensorRT version and the GPU
    architecture it was built for). The same inputs give the same key; any change gives another."""
    parts = {"model_sha256": model_sha256, "tensorrt": tensorrt_version, "cuda": cuda_version,
             "compute_capability": compute_capability, "config": config,
             "profiles": [[p.name, list(p.min), list(p.opt), list(p.max)] for p in plan]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def builder_config(options: BuildOptions) -> dict:
    """The builder settings that change the engine, as data (the cache key holds it; the build applies it)."""
    return {"strongly_typed": True, "profiling_verbosity": "detailed", "workspace": workspace_bytes(options.workspace)}


def trtexec_command(onnx_name: str, engine_name: str, layers_name: str, plan: list[Profile],
                    options: BuildOptions, timing_cache: str | None) -> str:
    """The trtexec command that makes the same engine (flags checked against trtexec's help in TensorRT 10.0,
    10.13, 10.16, 11.0 and 11.1: ``--stronglyTyped`` is required in 10 and a deprecated no-op in 11, where
    strong typing is always on)."""
    args = ["trtexec", f"--onnx={onnx_name}", "--stronglyTyped"]
    if plan:
        for flag, pick in (("--minShapes", lambda p: p.min), ("--optShapes", lambda p: p.opt),
                           ("--maxShapes", lambda p: p.max)):
            args.append(f"{flag}=" + ",".join(f"{_quote_name(p.name)}:{_dims(pick(p))}" for p in plan))
    workspace = workspace_bytes(options.workspace)
    if workspace is not None:
        args.append(f"--memPoolSize=workspace:{size_text(workspace)}")
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    args += ["--profilingVerbosity=detailed", f"--exportLayerInfo={layers_name}", f"--saveEngine={engine_name}",
             "--skipInference"]
    return " ".join(shlex.quote(a) for a in args)


def _quote_name(name: str) -> str:
    """trtexec reads a name holding ``:`` or ``,`` wrapped in single quotes ('Input:0')."""
    return f"'{name}'" if (":" in name or "," in name) else name


def trtexec_script(command: str) -> str:
    """A shell script running ``command`` from its own folder (the paths in it are relative to it)."""
    return ("#!/bin/sh\n# The TensorRT engine build graphopt would make, as a trtexec command (graphopt run "
            "--emit-trtexec).\nset -e\ncd \"$(dirname \"$0\")\"\n" + command + "\n")


def cache_folder(options: BuildOptions) -> str | None:
    """The engine cache folder; None when ``cache_dir=none``."""
    return backend_cache_folder(options.cache_dir, "tensorrt")

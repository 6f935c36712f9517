"""Generated model inputs: the one home of "fixed-seed inputs fit to run a model" (numeric check, bench, compare).

Random values are right for data, wrong for inputs that are indices, shapes, axes or sizes: a Reshape fed a
random target, a Gather fed out-of-range indices or a Resize fed negative scales makes onnxruntime refuse to
run the model at all. :func:`input_roles` reads what each graph input feeds (ONNX only), and :func:`feeds`
gives such inputs values that are valid for most models: indices and axes 0, counts and sizes 1, scales 1.0.
:func:`candidate_feeds` yields a few alternatives for the caller to try in order when a model does not run on
the first; the numeric check says "not compared" rather than fail when none runs.

:class:`InputSpec` is the one description of a model input graphopt has (the numeric check, the backends,
calibration): a name, a shape whose dims are fixed ints or symbolic (a name, or None when unknown), a numpy dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence, Union

import numpy as np

from graphopt.errors import UnsupportedError

# op type -> {input slot: role}. "index": must be a valid index (0 is); "shape": a shape / sizes / repeats
# (1 keeps every dimension); "axis": axes / a dimension number (0); "count": a count or bound (1); "scale": a
# positive float (1.0). Slots not listed are data.
SLOT_ROLES: dict[str, dict[int, str]] = {
    "Gather": {1: "index"}, "GatherElements": {1: "index"}, "GatherND": {1: "index"},
    "ScatterElements": {1: "index"}, "ScatterND": {1: "index"}, "Scatter": {1: "index"},
    "OneHot": {0: "index", 1: "count"}, "Embedding": {1: "index"},
    "Reshape": {1: "shape"}, "Expand": {1: "shape"}, "Tile": {1: "shape"}, "ConstantOfShape": {0: "shape"},
    "Resize": {1: "scale", 2: "scale", 3: "shape"}, "Upsample": {1: "scale"},
    "Slice": {1: "index", 2: "count", 3: "axis", 4: "count"}, "Pad": {1: "index", 3: "axis"},
    "Squeeze": {1: "axis"}, "Unsqueeze": {1: "axis"}, "Split": {1: "shape"}, "CumSum": {1: "axis"},
    "ReduceSum": {1: "axis"}, "ReduceMean": {1: "axis"}, "ReduceMax": {1: "axis"}, "ReduceMin": {1: "axis"},
    "ReduceProd": {1: "axis"}, "ReduceL1": {1: "axis"}, "ReduceL2": {1: "axis"}, "ReduceLogSum": {1: "axis"},
    "ReduceLogSumExp": {1: "axis"}, "ReduceSumSquare": {1: "axis"},
    "TopK": {1: "count"}, "Range": {0: "index", 1: "count", 2: "count"}, "Trilu": {1: "index"},
    "NonMaxSuppression": {2: "count", 3: "scale", 4: "scale"}, "RoiAlign": {2: "index"},
    "Compress": {1: "index"}, "SplitToSequence": {1: "shape", 2: "axis"}, "SequenceAt": {1: "index"},
    "Loop": {0: "count"}, "DFT": {1: "count", 2: "axis"}, "STFT": {1: "count", 3: "count"},
    "CenterCropPad": {1: "shape"}, "Col2Im": {1: "shape", 2: "shape"}, "Mod": {1: "divisor"},
    "Div": {1: "divisor"},
}
_ROLE_VALUE = {"index": 0, "axis": 0, "count": 1, "shape": 1, "scale": 1.0}


Dim = Union[int, str, None]


def _norm_dim(d) -> Dim:
    if isinstance(d, (int, np.integer)) and not isinstance(d, bool):
        return int(d) if d >= 0 else None  # -1: unknown, as some tools write it; 0 is an empty dimension
    if isinstance(d, str) and d:
        return d
    return None


def dim_str(d: Dim) -> str:
    """A dim for messages: its size, its symbolic name, or ``?`` when unknown."""
    return str(d) if d is not None else "?"


@dataclass(frozen=True)
class InputSpec:
    """One model input: ``name``, ``shape`` (ints are fixed; strings, the dim's symbolic name, and None are
    symbolic) and numpy ``dtype``. Negative dims (how some tools write "unknown") become None."""

    name: str
    shape: tuple
    dtype: np.dtype = np.dtype(np.float32)

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(_norm_dim(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @property
    def batch_dim(self) -> int | None:
        """The fixed size of the first (batch) dimension, or None when it is symbolic (or the input a scalar)."""
        return self.shape[0] if self.shape and isinstance(self.shape[0], int) else None

    def concrete(self, batch: int = 1, override: Sequence | None = None) -> tuple[int, ...]:
        """The shape to feed at ``batch``: see :func:`concrete_shape`."""
        return concrete_shape(self.shape, batch, override)

    def shape_str(self, dims: Sequence | None = None) -> str:
        """``(N, 3, 224, 224)``: this input's shape (or ``dims``), unknown dims as ``?``."""
        return "(" + ", ".join(dim_str(d) for d in (self.shape if dims is None else dims)) + ")"

    def __str__(self) -> str:
        return f"'{self.name}' {self.dtype} {self.shape_str()}"




_ORT_TYPES = {"float": np.float32, "float16": np.float16, "double": np.float64, "int8": np.int8, "uint8": np.uint8,
              "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32, "int64": np.int64,
              "uint64": np.uint64, "bool": np.bool_}


def session_input_specs(session) -> list[InputSpec]:
    """The inputs of an onnxruntime ``InferenceSession`` (symbolic dims by name, as onnxruntime reports them); an
    input of a type graphopt cannot feed (a string, a sequence, a map) is an :class:`UnsupportedError`."""
    specs = []
    for arg in session.get_inputs():
        kind = arg.type[len("tensor("):-1] if arg.type.startswith("tensor(") else arg.type
        if kind not in _ORT_TYPES:
            raise UnsupportedError(f"model input '{arg.name}' has type {arg.type}, which graphopt cannot feed")
        specs.append(InputSpec(arg.name, tuple(arg.shape), _ORT_TYPES[kind]))
    return specs


def concrete_shape(shape: Sequence, batch: int = 1, override: Sequence | None = None) -> tuple[int, ...]:
    """The shape to feed: symbolic first dim -> ``batch``, other symbolic dims -> 1; an ``override`` (None or -1
    entries take the batch size) replaces the model's shape."""
    if override is not None:
        return tuple(batch if d is None or int(d) < 0 else int(d) for d in override)
    return tuple((batch if i == 0 else 1) if not isinstance(d, (int, np.integer)) or d < 0 else int(d)
                 for i, d in enumerate(shape))


def random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype, role: str | None = None) -> np.ndarray:
    """One generated input: standard normal floats, 0/1 integers, False booleans; a role's valid value."""
    dtype = np.dtype(dtype)
    if role in _ROLE_VALUE:
        return np.full(shape, _ROLE_VALUE[role], dtype)
    if np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.complexfloating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return np.zeros(shape, np.bool_)
    if dtype.kind in "US":
        return np.full(shape, "a", dtype)
    return rng.integers(0, 2, size=shape).astype(dtype)


MAX_GENERATED_BYTES = 4 << 30  # fixed-seed inputs graphopt makes for a check or a benchmark, at most


def feeds(specs: Sequence[InputSpec], seed: int = 0, batch: int = 1, roles: Mapping[str, str] | None = None,
          shapes: Mapping[str, Sequence] | None = None) -> dict[str, np.ndarray]:
    """Fixed-seed inputs for ``specs`` at ``batch`` (shapes as :func:`concrete_shape` fills them, ``shapes``
    overriding them per input name; values as :func:`random_array` makes them); ``roles`` from
    :func:`input_roles`."""
    rng = np.random.default_rng(seed)
    roles, shapes = roles or {}, shapes or {}
    concrete = {s.name: concrete_shape(s.shape, batch, shapes.get(s.name)) for s in specs}
    total = sum(math.prod(shape) * np.dtype(s.dtype).itemsize for s, shape in zip(specs, concrete.values()))
    if total > MAX_GENERATED_BYTES:  # a declared shape like 1e12 x 3: said, not allocated (or tried until swap)
        raise ValueError(f"generated inputs would take {total / 2**30:.1f} GiB (over "
                         f"{MAX_GENERATED_BYTES >> 30} GiB): the model's declared input shapes are that large")
    return {s.name: random_array(rng, concrete[s.name], s.dtype, roles.get(s.name)) for s in specs}


def samples(specs: Sequence[InputSpec], n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` fixed-seed samples per input along axis 0, whatever the model's batch dimension (a data set to cut
    into batches, not one batch); other symbolic dims are 1, scalar inputs stay scalars."""
    shapes = {s.name: (n, *concrete_shape(s.shape)[1:]) for s in specs if s.shape}
    return feeds(specs, seed, n, shapes=shapes)


def input_roles(gs_graph) -> dict[str, str]:
    """For each graph input of an onnx-graphsurgeon graph that feeds a non-data slot (:data:`SLOT_ROLES`),
    directly or through Cast/Identity/Squeeze/Unsqueeze/Concat, the role of that slot."""
    roles: dict[str, str] = {}
    for tensor in gs_graph.inputs:
        frontier, seen = [tensor], set()
        while frontier and tensor.name not in roles:
            t = frontier.pop()
            if id(t) in seen:
                continue
            seen.add(id(t))
            for node in t.outputs:
                for slot, inp in enumerate(node.inputs):
                    if inp is not t:
                        continue
                    role = SLOT_ROLES.get(node.op, {}).get(slot)
                    if role == "divisor":  # an integer divisor of 0 is an error; a float one is data
                        role = "count" if np.dtype(tensor.dtype or np.float32).kind in "iu" else None
                    if role:
                        roles[tensor.name] = role
                    elif node.op in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Concat", "Flatten", "Reshape") \
                            and slot == 0:
                        frontier.extend(node.outputs)
    return roles


def candidate_feeds(specs: Sequence[InputSpec], roles: Mapping[str, str], seed: int = 0
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Inputs to try, best first: random data with role-aware values; then every integer input 0; then every
    integer input 1 and every float 1.0 (a model that runs on none of them is not compared)."""
    yield feeds(specs, seed, roles=roles)
    if any(np.dtype(s.dtype).kind in "iu" for s in specs):
        yield feeds(specs, seed, roles={**{s.name: "index" for s in specs if np.dtype(s.dtype).kind in "iu"},
                                        **roles})
        yield feeds(specs, seed, roles={s.name: "count" for s in specs if np.dtype(s.dtype).kind in "iuf"})
    elif roles:
        yield feeds(specs, seed)

"""External data: where a model's tensors say their bytes are, whether that is safe, and reading them lazily.

Every reference is checked before anything reads it (onnxruntime reads external data in C++ without onnx's
Python checks; CVE-2024-27318 and its kin): a plain relative path (no absolute path, drive, backslash or ``..``)
to a regular file in the model's folder or below, reached through no symlink, not a hard link, with offset and
length inside the file and the length the tensor's type and shape need. :class:`ExternalValues` then give
onnx-graphsurgeon the tensor's shape and dtype at once and its bytes only when asked (memory-mapped, read-only).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto
from onnx_graphsurgeon.importers.onnx_importer import get_onnx_tensor_dtype
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt.errors import ModelLoadError

_MMAP_MIN = 2**20  # smaller external tensors are read into memory rather than mapped

# tensor types whose raw bytes are a little-endian numpy array of this dtype (others go through onnx's numpy_helper)
RAW_NUMPY = {
    TensorProto.FLOAT: "<f4", TensorProto.DOUBLE: "<f8", TensorProto.FLOAT16: "<f2", TensorProto.INT8: "i1",
    TensorProto.UINT8: "u1", TensorProto.INT16: "<i2", TensorProto.UINT16: "<u2", TensorProto.INT32: "<i4",
    TensorProto.UINT32: "<u4", TensorProto.INT64: "<i8", TensorProto.UINT64: "<u8", TensorProto.BOOL: "?",
    TensorProto.COMPLEX64: "<c8", TensorProto.COMPLEX128: "<c16",
}


@dataclass(frozen=True)
class Source:
    """``length`` bytes at ``offset`` of the (validated, real) file ``path``."""

    path: str
    offset: int
    length: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), self.length, self.offset) if self.length else b""


# -- external data references -------------------------------------------------------------------------------------
def _graph_tensors(graph: onnx.GraphProto) -> Iterator[tuple[TensorProto, bool]]:
    """Every TensorProto of a graph and its subgraphs, with whether graphsurgeon imports it as a Constant of its
    own (initializers and single-tensor attributes) rather than inside a sparse tensor or a list."""
    for t in graph.initializer:
        yield t, True
    for sparse in graph.sparse_initializer:
        yield sparse.values, False
        yield sparse.indices, False
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[tuple[TensorProto, bool]]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t, True
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values, False
            yield attr.sparse_tensor.indices, False
        for t in attr.tensors:
            yield t, False
        for s in attr.sparse_tensors:
            yield s.values, False
            yield s.indices, False
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for g in attr.graphs:
            yield from _graph_tensors(g)


def model_tensors(model: onnx.ModelProto) -> Iterator[tuple[TensorProto, bool]]:
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            for t, _ in _node_tensors(node):
                yield t, False


def is_external(t: TensorProto) -> bool:
    return t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL


def reference(t: TensorProto) -> tuple[str, str | None, str | None]:
    info = {entry.key: entry.value for entry in t.external_data}
    return info.get("location", ""), info.get("offset"), info.get("length")


def _expected_bytes(t: TensorProto) -> int | None:
    count = int(np.prod(t.dims, dtype=np.int64))
    if t.data_type in RAW_NUMPY:
        return count * np.dtype(RAW_NUMPY[t.data_type]).itemsize
    try:
        bits = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * 8
    except (KeyError, ValueError, TypeError):
        return None
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4, getattr(TensorProto, "FLOAT4E2M1", -1)):
        return (count + 1) // 2
    return count * bits // 8


def _resolve(base: str, location: str) -> str:
    """The real path of ``location`` under the real folder ``base``; ValueError says why it is refused."""
    if not location:
        raise ValueError("has no location")
    if "\0" in location or "\\" in location or ":" in location or os.path.isabs(location):
        raise ValueError(f"location '{location}' is not a plain relative path")
    parts = [p for p in location.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"location '{location}' leaves the model's folder")
    path = base
    for i, part in enumerate(parts):
        path = os.path.join(path, part)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            raise ValueError(f"'{location}' does not exist") from None
        if stat.S_ISLNK(info.st_mode):
            raise ValueError(f"'{location}' is reached through a symlink")
        if i < len(parts) - 1 and not stat.S_ISDIR(info.st_mode):
            raise ValueError(f"'{location}' is not in a folder")
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"'{location}' is not a regular file")
    if info.st_nlink > 1:
        raise ValueError(f"'{location}' is a hard link ({info.st_nlink} names)")
    real = os.path.realpath(path)
    if os.path.commonpath([real, base]) != base:
        raise ValueError(f"'{location}' is outside the model's folder")
    return real


def check_external_data(model: onnx.ModelProto, model_path: str) -> dict[tuple, Source]:
    """Validate every external-data reference of ``model`` (read from ``model_path``) without reading any data.
    Returns ``{(location, offset, length): Source}`` (the references as written); raises ModelLoadError."""
    base = os.path.realpath(os.path.dirname(os.path.abspath(model_path)))
    sources: dict[tuple, Source] = {}
    sizes: dict[str, int] = {}
    for t, _ in model_tensors(model):
        if not is_external(t):
            continue
        key = reference(t)
        what = f"{model_path}: external data of tensor '{t.name}'"
        try:
            real = _resolve(base, key[0])
            offset = int(key[1]) if key[1] is not None else 0
            size = sizes.setdefault(real, os.stat(real).st_size)
            length = int(key[2]) if key[2] is not None else size - offset
            if offset < 0 or length < 0:
                raise ValueError(f"has a negative offset or length ({offset}, {length})")
            if offset + length > size:
                raise ValueError(f"runs past the end of '{key[0]}' (offset {offset} + length {length} > {size} "
                                 f"bytes)")
            expected = _expected_bytes(t)
            if t.data_type == TensorProto.STRING:
                raise ValueError("is a string tensor, which cannot be stored as external data")
            if expected is not None and expected != length:
                raise ValueError(f"is {length} bytes, but a {list(t.dims)} "
                                 f"{onnx.helper.tensor_dtype_to_string(t.data_type)} tensor needs {expected}")
        except ValueError as exc:
            raise ModelLoadError(f"{what} {exc} (external data must be a regular file in the model's folder or "
                                 f"below it, given by a relative path, not a link; copy the data there)") from None
        except OSError as exc:
            raise ModelLoadError(f"{what} cannot be read: {exc.strerror or exc} (check the data file)") from None
        sources[key] = Source(real, offset, length)
    return sources


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t, _ in model_tensors(model))


class FileArray(np.memmap):
    """A read-only memory map of a validated external tensor; ``source`` (set only on the array :class:`ExternalValues`
    made, never on views or results) says which bytes of which file it shows, so saving can copy them file to file."""


class ExternalValues(LazyValues):
    """A tensor's values in an external data file: shape and dtype known, bytes read when asked. ``load()``
    memory-maps them (read-only); ``tensor`` (what graphsurgeon's exporter embeds) carries them as raw data."""

    def __init__(self, proto: TensorProto, source: Source):  # LazyValues.__init__ would keep proto as .tensor
        self.meta = TensorProto()
        self.meta.CopyFrom(proto)
        del self.meta.external_data[:]
        self.meta.ClearField("data_location")
        self.source = source
        self.shape = list(self.meta.dims)
        self.dtype = get_onnx_tensor_dtype(self.meta)
        self.nbytes = source.length

    @property
    def tensor(self) -> TensorProto:
        t = TensorProto()
        t.CopyFrom(self.meta)
        t.raw_data = self.source.read()
        return t

    def load(self) -> np.ndarray:
        raw = RAW_NUMPY.get(self.meta.data_type)
        if raw is None:
            return np.array(onnx.numpy_helper.to_array(self.tensor))
        if self.source.length < _MMAP_MIN:
            return np.frombuffer(bytearray(self.source.read()), dtype=raw).reshape(self.shape)
        array = FileArray(self.source.path, dtype=raw, mode="r", offset=self.source.offset, shape=tuple(self.shape))
        array.source = self.source
        return array

    def __str__(self):
        return f"ExternalValues (shape={self.shape}, dtype={self.dtype}, file={self.source.path})"


def file_source(values) -> Source | None:
    """Where ``values`` (a Constant's ``_values``) lie unchanged on disk, or None."""
    if isinstance(values, ExternalValues):
        return values.source
    if type(values) is FileArray and "source" in values.__dict__:
        return values.__dict__["source"]
    return None

"""Readers: where chunks of raw calibration data come from, one :class:`Source` per kind of source.

A source yields ``(where, item)`` chunks (``where`` names the chunk in messages; ``item`` is a dict, an array or a
tuple) that :class:`~graphopt.calib.data.CalibrationData` validates and re-cuts into batches; at load time it
checks what it can see cheaply (file headers) with :class:`~graphopt.calib.validate.InputChecks`. The kinds: a
``.npz`` (members streamed from the zip), ``.npy`` files or per-input folders of them (memory-mapped), a folder
of ``.npz``, in-memory arrays, an iterable or a function, fixed-seed synthetic samples. Image folders are read in
:mod:`graphopt.calib.images`; :mod:`graphopt.calib.sources` says which source kind a path or object is.
"""

from __future__ import annotations

import contextlib
import math
import re
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.calib.errors import CalibrationDataError, CalibrationInputError
from graphopt.calib.validate import InputChecks
from graphopt.errors import first_line
from graphopt.ir.feeds import InputSpec, dim_str, random_array
from graphopt.paths import require_regular

__all__ = ["ArraysSource", "IterableSource", "NpyFolderSource", "NpzFolderSource", "NpzSource", "Source",
           "SyntheticSource", "natural_key", "to_numpy"]


class Source(ABC):
    """Yields ``(where, item)``: ``where`` names the chunk in messages, ``item`` is a dict/array/tuple."""

    description = "calibration data"
    reiterable = True

    @abstractmethod
    def chunks(self, read_size: int) -> Iterator[tuple[str, Any]]:
        """The data in pieces of about ``read_size`` samples (one file, one zip slice, one item...)."""

    def count(self) -> int | None:
        """Number of samples, when known without reading the data."""
        return None

    def check(self, checks: InputChecks) -> None:
        """Cheap checks at load time (names, shapes and dtypes from file headers)."""


def natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _read_npy_header(fp):
    """(shape, fortran_order, dtype) of the .npy stream ``fp``, positioned at the data; None if unsupported."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fp)
    return None


class NpzSource(Source):
    def __init__(self, path: Path, ranks: Mapping[str, int]):
        self.path, self.ranks, self.names = path, dict(ranks), list(ranks)
        self.description = str(path)
        self._headers = None

    def headers(self) -> dict[str, tuple]:
        """{member name: (shape, dtype)} of every array in the file, from the headers only."""
        if self._headers is None:
            with _reading(self.path, ".npz"):
                self._headers = self._read_headers()
        return self._headers

    def _read_headers(self) -> dict[str, tuple]:
        try:
            zf = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise CalibrationDataError(f"{self.path}: not a readable .npz file ({exc})") from None
        headers = {}
        with zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as fp:
                    header = _read_npy_header(fp)
                if header is None:
                    with np.load(self.path, allow_pickle=False) as npz:
                        arr = npz[info.filename[:-4]]
                    header = (arr.shape, False, arr.dtype)
                headers[info.filename[:-4]] = (tuple(header[0]), header[2], header[1])
        return headers

    def count(self) -> int | None:
        headers = self.headers()
        name = self.names[0]
        if name not in headers:
            return None
        shape = headers[name][0]
        return shape[0] if len(shape) == self.ranks[name] and shape else 1

    def check(self, checks: InputChecks) -> None:
        headers = self.headers()
        checks.names(list(headers), self.description)
        counts = {}
        for spec in checks.specs:
            shape, dtype, _ = headers[spec.name]
            batched = checks.array(spec, shape, dtype, self.description)
            counts[spec.name] = shape[0] if batched else 1
        checks.counts(counts, self.description)

    def chunks(self, read_size: int):
        with _reading(self.path, ".npz"):
            yield from self._chunks(read_size)

    def _chunks(self, read_size: int):
        headers = self.headers()
        with zipfile.ZipFile(self.path) as zf:
            streams, whole = {}, {}
            try:
                for name in self.names:
                    shape, dtype, fortran = headers[name]
                    fp = zf.open(name + ".npy")
                    header = _read_npy_header(fp)
                    if header is None or fortran or dtype.hasobject or len(shape) != self.ranks[name]:
                        fp.close()
                        with np.load(self.path, allow_pickle=False) as npz:
                            whole[name] = npz[name]
                    else:
                        streams[name] = fp
                if not streams:
                    yield self.description, whole
                    return
                n = headers[next(iter(streams))][0][0]
                for start in range(0, n, read_size):
                    k = min(read_size, n - start)
                    item = {}
                    for name in self.names:
                        if name in whole:  # read whole (or a single sample: the same one for every slice)
                            arr = whole[name]
                            item[name] = arr[start:start + k] if arr.ndim == self.ranks[name] else arr
                            continue
                        shape, dtype, _ = headers[name]
                        sample = math.prod(shape[1:]) * dtype.itemsize
                        buf = streams[name].read(k * sample)
                        if len(buf) != k * sample:
                            raise CalibrationDataError(f"{self.path}: member '{name}' is truncated")
                        item[name] = np.frombuffer(buf, dtype=dtype).reshape((k,) + tuple(shape[1:]))
                    yield f"{self.description}[{start}:{start + k}]", item
            finally:
                for fp in streams.values():
                    fp.close()


def _mmap(path: Path) -> np.ndarray:
    with _reading(path, ".npy"):
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:  # an empty array cannot be mapped
            if "pickle" in str(exc):
                raise
            return np.load(path, allow_pickle=False)


@contextlib.contextmanager
def _reading(path: Path, kind: str):
    """Reading a user's file: whatever a damaged or foreign file makes numpy or zipfile raise (a bad CRC, a pickle,
    an unknown compression, a device) is one CalibrationDataError naming it."""
    require_regular(str(path), "calibration data")
    try:
        yield
    except CalibrationDataError:
        raise
    except Exception as exc:
        raise CalibrationDataError(f"{path}: not a readable {kind} file ({type(exc).__name__}: "
                                   f"{first_line(exc)})") from None


class NpyFolderSource(Source):
    """``files[name]`` is the list of .npy files of input ``name``; list i of every input pairs up."""

    def __init__(self, folder: Path, files: dict[str, list[Path]], ranks: dict[str, int]):
        self.folder, self.files, self.ranks = folder, files, ranks
        first = next(iter(files.values()))
        self.description = f"{folder} ({len(first)} .npy files)" if folder.is_dir() else str(folder)
        self._count = None

    def count(self) -> int | None:
        if self._count is None:
            name, paths = next(iter(self.files.items()))
            total = 0
            for p in paths:
                shape = _mmap(p).shape
                total += shape[0] if len(shape) == self.ranks[name] and shape else 1
            self._count = total
        return self._count

    def check(self, checks: InputChecks) -> None:
        for spec in checks.specs:  # the first file of each input; the others are checked as they are read
            arr = _mmap(self.files[spec.name][0])
            checks.array(spec, arr.shape, arr.dtype, str(self.files[spec.name][0]))

    def chunks(self, read_size: int):
        names = list(self.files)
        for i, path in enumerate(self.files[names[0]]):
            item = {name: _mmap(self.files[name][i]) for name in names}
            yield str(path), item


class NpzFolderSource(Source):
    def __init__(self, folder: Path, paths: list[Path], ranks: Mapping[str, int]):
        self.parts = [NpzSource(p, ranks) for p in paths]
        self.description = f"{folder} ({len(paths)} .npz files)"

    def count(self) -> int | None:
        return sum(part.count() or 0 for part in self.parts)

    def check(self, checks: InputChecks) -> None:
        self.parts[0].check(checks)

    def chunks(self, read_size: int):
        for part in self.parts:
            yield from part.chunks(read_size)


class ArraysSource(Source):
    def __init__(self, arrays: Mapping[str, Any], description: str = "in-memory arrays"):
        self.arrays = {k: to_numpy(v, k, description) for k, v in arrays.items()}
        self.description = description
        self._n = None

    def count(self) -> int | None:
        return self._n

    def check(self, checks: InputChecks) -> None:
        checks.names(list(self.arrays), self.description)
        counts = {}
        for spec in checks.specs:
            arr = self.arrays[spec.name]
            counts[spec.name] = arr.shape[0] if checks.array(spec, arr.shape, arr.dtype, self.description) else 1
        checks.counts(counts, self.description)
        self._n = next(iter(counts.values()))

    def chunks(self, read_size: int):
        yield self.description, self.arrays


class IterableSource(Source):
    def __init__(self, obj):
        self.obj = obj
        if callable(obj) and not isinstance(obj, Iterable):
            self.factory, self.reiterable = obj, True
            self.description = f"items of {getattr(obj, '__name__', type(obj).__name__)}()"
        else:
            self.factory = None
            self.reiterable = not isinstance(obj, Iterator)  # generators and iterators are read once
            self.description = f"items of a {type(obj).__name__}"

    def chunks(self, read_size: int):
        source = self.factory() if self.factory is not None else self.obj
        for i, item in enumerate(source):
            yield f"item {i}", item


class SyntheticSource(Source):
    def __init__(self, specs: Sequence[InputSpec], n: int, seed: int, dims: Mapping[str, int], notes: list[str]):
        self.n, self.seed = n, seed
        self.description = f"synthetic data ({n} samples, seed {seed})"
        self.shapes = {}
        for spec in specs:
            shape = []
            for d in spec.shape[1:]:
                if isinstance(d, int):
                    shape.append(d)
                elif isinstance(d, str) and d in dims:
                    shape.append(int(dims[d]))
                else:
                    shape.append(1)
                    notes.append(f"synthetic data: symbolic dimension {dim_str(d)} of input '{spec.name}' set to "
                                 "1 (pass dims={name: size})")
            self.shapes[spec.name] = (tuple(shape), spec.dtype)

    def count(self) -> int | None:
        return self.n

    def chunks(self, read_size: int):
        for i in range(self.n):  # one generator per sample: the data do not depend on the batch size
            rng = np.random.default_rng([self.seed, i])
            yield f"synthetic sample {i}", {name: random_array(rng, shape, dtype)
                                            for name, (shape, dtype) in self.shapes.items()}


def to_numpy(value, name: str, where: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        arr = value
    elif hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
        arr = value.detach().cpu().numpy()
    else:
        arr = np.asarray(value)
    if arr.dtype.hasobject or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise CalibrationInputError(f"{where}: input '{name}' is not a numeric array (dtype {arr.dtype})")
    return arr

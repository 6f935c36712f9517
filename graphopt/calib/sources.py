"""Calibration data: a re-iterable source of batches, each a ``dict[str, np.ndarray]`` keyed by model input name.

Where the data may come from (:func:`load_calibration` picks by what it is given):

=============================  ===============================================================================
``data.npz``                   one array per model input name, samples on axis 0 (other arrays, e.g.
                               ``labels``, are ignored with a note). Members are *streamed*: each batch reads
                               only its samples from the zip member (``np.savez`` and ``np.savez_compressed``
                               alike); Fortran-ordered members are read whole when first needed.
a ``.npy`` file                one-input models: one sample, or a stack with samples on axis 0.
folder of ``.npy``             one-input models: every ``*.npy`` in the folder (sorted by name, numbers in names
                               compared as numbers), each one sample or a stack. Several inputs: one subfolder
                               per input, named after it, holding files of the same names (``a/0001.npy`` pairs
                               with ``b/0001.npy``). Files are memory-mapped (``np.load(mmap_mode="r")``).
folder of ``.npz``             each file is read as a ``.npz`` above, one after the other.
folder of images               one-input 4-D image models: PNG / JPEG / BMP / WebP / TIFF files, searched
                               recursively, decoded one at a time with Pillow (optional extra
                               ``graphopt[images]``) and preprocessed as :class:`ImageOptions` says.
a mapping                      ``{input name: array}`` in memory, samples on axis 0.
an iterable / a function       (Python API) items are dicts ``{name: array}``, a bare array (one-input
                               models) or a tuple of arrays in input order; each item one sample or a batch.
                               Lists and other re-iterable containers, and functions returning a fresh
                               iterator, can be read many times; a generator only once.
=============================  ===============================================================================

An array is a batch when it has as many dimensions as the model input, and a single sample when it has one
fewer. Batches are re-cut to at most ``batch_size`` samples along axis 0 (exactly the model's batch size when its
first dimension is fixed; a last incomplete batch is then dropped with a note). Samples whose symbolic dimensions
differ (e.g. sequence lengths) are never concatenated: a batch ends where the shape changes.

Validation, per model input: the name must be present; the sample shape must match every fixed dimension of
the model input; floats are cast to the input's float type (with a note in ``data.notes``); integer or boolean
data for a float input (and floats for an integer input) are refused; integers are cast between integer types
only when the values fit. Problems raise :class:`CalibrationDataError` subclasses with a one-line message that
names the input. Files are never read whole (Fortran-ordered ``.npz`` members excepted): at most one batch,
plus one decoded image or one ``.npz`` read block, is in memory at a time.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from graphopt.errors import GraphoptError

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES", "CalibrationData", "CalibrationDataError",
    "CalibrationInputError", "EmptyCalibrationDataError", "ImageOptions", "InputSpec", "MissingDependencyError",
    "SYNTHETIC_WARNING", "input_specs", "load_calibration", "synthetic",
]

log = logging.getLogger("graphopt.calib")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYNTHETIC_WARNING = ("calibrated on synthetic random inputs: the quantization scales are not fit for production; "
                     "pass real calibration data")


class CalibrationDataError(GraphoptError):
    """Calibration data could not be read or used (missing path, unsupported file, unreadable image, ...)."""


class CalibrationInputError(CalibrationDataError):
    """Calibration data do not fit the model's inputs: a name, a shape or a dtype. The message names the input."""


class EmptyCalibrationDataError(CalibrationDataError):
    """The calibration source holds no samples."""


class MissingDependencyError(CalibrationDataError):
    """An optional package is needed for this source (Pillow for image folders)."""


# -- model inputs --------------------------------------------------------------------------------------------
Dim = Union[int, str, None]


def _norm_dim(d) -> Dim:
    if isinstance(d, (int, np.integer)) and not isinstance(d, bool):
        return int(d) if d > 0 else None  # -1 / 0: unknown, as some tools write it
    if isinstance(d, str) and d:
        return d
    return None


def _dim_str(d: Dim) -> str:
    return str(d) if d is not None else "?"


@dataclass(frozen=True)
class InputSpec:
    """One model input: ``name``, ``shape`` (ints are fixed, strings or None symbolic) and numpy ``dtype``."""

    name: str
    shape: tuple
    dtype: np.dtype = field(default=np.dtype(np.float32))

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(_norm_dim(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @property
    def batch_dim(self) -> int | None:
        """The fixed size of the first (batch) dimension, or None when it is symbolic."""
        return self.shape[0] if self.shape and isinstance(self.shape[0], int) else None

    def shape_str(self, dims=None) -> str:
        dims = self.shape if dims is None else dims
        return "(" + ", ".join(_dim_str(d) for d in dims) + ")"

    def __str__(self) -> str:
        return f"'{self.name}' {self.dtype} {self.shape_str()}"


_ORT_TYPES = {"float": "float32", "double": "float64", "float16": "float16", "int8": "int8", "uint8": "uint8",
              "int16": "int16", "uint16": "uint16", "int32": "int32", "uint32": "uint32", "int64": "int64",
              "uint64": "uint64", "bool": "bool"}


def input_specs(model) -> tuple[InputSpec, ...]:
    """The inputs of ``model`` as :class:`InputSpec` s.

    ``model``: a sequence of InputSpec or of ``(name, shape, dtype)`` tuples; a mapping ``{name: (shape, dtype)}``;
    an ``onnx.ModelProto`` or a path to one (initializers listed as inputs are skipped); a graphopt ``OnnxGraph``;
    an onnxruntime ``InferenceSession``.
    """
    if isinstance(model, InputSpec):
        return (model,)
    if isinstance(model, Mapping):
        specs = []
        for name, value in model.items():
            if isinstance(value, InputSpec):
                specs.append(value)
            else:
                shape, dtype = value
                specs.append(InputSpec(name, tuple(shape), dtype))
        return tuple(specs)
    if isinstance(model, (list, tuple)) and all(isinstance(s, (InputSpec, tuple, list)) for s in model):
        return tuple(s if isinstance(s, InputSpec) else InputSpec(*s) for s in model)
    if hasattr(model, "get_inputs"):  # onnxruntime.InferenceSession
        specs = []
        for arg in model.get_inputs():
            kind = arg.type[len("tensor("):-1] if arg.type.startswith("tensor(") else arg.type
            if kind not in _ORT_TYPES:
                raise CalibrationInputError(f"model input '{arg.name}' has type {arg.type}, which calibration "
                                            "does not support")
            specs.append(InputSpec(arg.name, tuple(arg.shape), _ORT_TYPES[kind]))
        return tuple(specs)
    if hasattr(model, "gs") and hasattr(model.gs, "inputs"):  # graphopt OnnxGraph
        return tuple(InputSpec(t.name, tuple(t.shape or ()), t.dtype if t.dtype is not None else np.float32)
                     for t in model.gs.inputs)
    import onnx

    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model), load_external_data=False)
    if isinstance(model, onnx.ModelProto):
        inits = {i.name for i in model.graph.initializer}
        specs = []
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
            specs.append(InputSpec(vi.name, dims, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)))
        return tuple(specs)
    raise TypeError(f"cannot read model inputs from a {type(model).__name__}")


# -- images --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageOptions:
    """How image files become model inputs, in this order.

    Decode (RGB, or grayscale for a 1-channel input) -> ``resize`` the shorter side to this many pixels (bilinear,
    aspect kept) -> center ``crop`` to ``crop`` (int: square; or (height, width)) -> ``scale`` to [0, 1] (divide by
    255) -> ``channel_order`` "RGB" or "BGR" -> subtract ``mean``, divide by ``std`` (per channel, after scaling)
    -> ``layout`` "NCHW" or "NHWC".

    Defaults follow the model input: when neither ``resize`` nor ``crop`` is given and the input has a fixed
    height H and width W, the shorter side is resized to max(H, W) and the center H x W cropped; ``crop`` alone
    is used as given, ``resize`` alone is followed by a center crop to H x W. ``scale`` defaults to True for
    float inputs and False for integer (uint8) inputs, which also take no mean/std. ``mean``/``std`` default to
    none (0 and 1); ImageNet models usually want ``IMAGENET_MEAN`` / ``IMAGENET_STD``.
    """

    resize: int | None = None
    crop: int | tuple[int, int] | None = None
    scale: bool | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channel_order: str = "RGB"
    layout: str = "NCHW"

    def __post_init__(self):
        if self.layout not in ("NCHW", "NHWC"):
            raise CalibrationDataError(f"image layout must be NCHW or NHWC, got {self.layout!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise CalibrationDataError(f"image channel order must be RGB or BGR, got {self.channel_order!r}")
        if self.resize is not None and (not isinstance(self.resize, int) or self.resize < 1):
            raise CalibrationDataError(f"image resize must be a positive number of pixels, got {self.resize!r}")
        crop = (self.crop, self.crop) if isinstance(self.crop, int) else self.crop
        if crop is not None and not (len(crop) == 2 and all(isinstance(c, int) and c > 0 for c in crop)):
            raise CalibrationDataError(f"image crop must be a size in pixels or (height, width), got {self.crop!r}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None:
                value = (float(value),) if np.isscalar(value) else tuple(float(v) for v in value)
                object.__setattr__(self, key, value)
        if self.std is not None and any(s == 0 for s in self.std):
            raise CalibrationDataError("image std must not contain 0")


def _need_pillow(where: object = "image folders"):
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependencyError(f"{where}: reading images needs Pillow, which is not installed: "
                                     "pip install 'graphopt[images]' (or pip install Pillow)") from None
    return Image


# -- sources: where chunks of raw data come from ---------------------------------------------------------------
class _Source:
    """Yields ``(where, item)``: ``where`` names the chunk in messages, ``item`` is a dict/array/tuple."""

    description = "calibration data"
    reiterable = True

    def chunks(self, read_size: int) -> Iterator[tuple[str, Any]]:
        raise NotImplementedError

    def count(self) -> int | None:
        """Number of samples, when known without reading the data."""
        return None

    def check(self, data: "CalibrationData") -> None:
        """Cheap checks at load time (names, shapes and dtypes from file headers)."""


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _read_npy_header(fp):
    """(shape, fortran_order, dtype) of the .npy stream ``fp``, positioned at the data; None if unsupported."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fp)
    return None


class _NpzSource(_Source):
    def __init__(self, path: Path, ranks: Mapping[str, int]):
        self.path, self.ranks, self.names = path, dict(ranks), list(ranks)
        self.description = str(path)
        self._headers = None

    def headers(self) -> dict[str, tuple]:
        """{member name: (shape, dtype)} of every array in the file, from the headers only."""
        if self._headers is None:
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
            self._headers = headers
        return self._headers

    def count(self) -> int | None:
        headers = self.headers()
        name = self.names[0]
        if name not in headers:
            return None
        shape = headers[name][0]
        return shape[0] if len(shape) == self.ranks[name] and shape else 1

    def check(self, data: "CalibrationData") -> None:
        headers = self.headers()
        data._check_names(list(headers), self.description)
        counts = {}
        for spec in data.specs:
            shape, dtype, _ = headers[spec.name]
            batched = data._check_array(spec, shape, dtype, self.description)
            counts[spec.name] = shape[0] if batched else 1
        data._check_counts(counts, self.description)

    def chunks(self, read_size: int):
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
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:  # an empty array cannot be mapped
        return np.load(path, allow_pickle=False)
    except OSError as exc:
        raise CalibrationDataError(f"{path}: not a readable .npy file ({exc})") from None


class _NpyFolderSource(_Source):
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

    def check(self, data: "CalibrationData") -> None:
        for spec in data.specs:  # the first file of each input; the others are checked as they are read
            arr = _mmap(self.files[spec.name][0])
            data._check_array(spec, arr.shape, arr.dtype, str(self.files[spec.name][0]))

    def chunks(self, read_size: int):
        names = list(self.files)
        for i, path in enumerate(self.files[names[0]]):
            item = {name: _mmap(self.files[name][i]) for name in names}
            yield str(path), item


class _NpzFolderSource(_Source):
    def __init__(self, folder: Path, paths: list[Path], ranks: Mapping[str, int]):
        self.parts = [_NpzSource(p, ranks) for p in paths]
        self.description = f"{folder} ({len(paths)} .npz files)"

    def count(self) -> int | None:
        return sum(part.count() or 0 for part in self.parts)

    def check(self, data: "CalibrationData") -> None:
        self.parts[0].check(data)

    def chunks(self, read_size: int):
        for part in self.parts:
            yield from part.chunks(read_size)


class _ArraysSource(_Source):
    def __init__(self, arrays: Mapping[str, Any], description: str = "in-memory arrays"):
        self.arrays = {k: _to_numpy(v, k, description) for k, v in arrays.items()}
        self.description = description
        self._n = None

    def count(self) -> int | None:
        return self._n

    def check(self, data: "CalibrationData") -> None:
        data._check_names(list(self.arrays), self.description)
        counts = {}
        for spec in data.specs:
            arr = self.arrays[spec.name]
            counts[spec.name] = arr.shape[0] if data._check_array(spec, arr.shape, arr.dtype, self.description) else 1
        data._check_counts(counts, self.description)
        self._n = next(iter(counts.values()))

    def chunks(self, read_size: int):
        yield self.description, self.arrays


class _IterableSource(_Source):
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


class _ImageFolderSource(_Source):
    def __init__(self, folder: Path, paths: list[Path], spec: InputSpec, options: ImageOptions,
                 notes: list[str]):
        self.folder, self.paths, self.spec = folder, paths, spec
        self.description = f"{folder} ({len(paths)} images)"
        if len(spec.shape) != 4:
            raise CalibrationInputError(f"image folders feed 4-D image inputs; model input {spec} is "
                                        f"{len(spec.shape)}-D")
        nchw = options.layout == "NCHW"
        c, h, w = (spec.shape[1], spec.shape[2], spec.shape[3]) if nchw else (spec.shape[3], spec.shape[1],
                                                                              spec.shape[2])
        if c not in (1, 3, None):
            raise CalibrationInputError(f"model input '{spec.name}' has {c} channels in {options.layout} layout; "
                                        "images give 1 or 3 (set the layout option?)")
        self.channels = c or 3
        is_float = np.issubdtype(spec.dtype, np.floating)
        scale = options.scale if options.scale is not None else is_float
        if not is_float and (scale or options.mean is not None or options.std is not None):
            raise CalibrationInputError(f"model input '{spec.name}' is {spec.dtype}: images are passed as 0-255 "
                                        "integers, without scale, mean or std")
        resize, crop = options.resize, options.crop
        fixed = isinstance(h, int) and isinstance(w, int)
        if fixed and crop is None:
            crop = (h, w)
            if resize is None:
                resize = max(h, w)
                notes.append(f"images: shorter side resized to {resize}, center {h}x{w} crop (the model's size)")
        if isinstance(crop, int):
            crop = (crop, crop)
        for key, value in (("mean", options.mean), ("std", options.std)):
            if value is not None and len(value) not in (1, self.channels):
                raise CalibrationDataError(f"image {key} has {len(value)} values; the model input has "
                                           f"{self.channels} channels")
        self.resize, self.crop, self.scale = resize, crop, scale
        self.mean = None if options.mean is None else np.asarray(options.mean, np.float32)
        self.std = None if options.std is None else np.asarray(options.std, np.float32)
        self.bgr, self.nchw = options.channel_order == "BGR", nchw

    def count(self) -> int | None:
        return len(self.paths)

    def check(self, data: "CalibrationData") -> None:
        _need_pillow(self.folder)

    def load(self, path: Path) -> np.ndarray:
        Image = _need_pillow(path)
        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.channels == 1 else "RGB")
                if self.resize:
                    width, height = img.size
                    short, long_ = min(width, height), max(width, height)
                    new_long = int(self.resize * long_ / short)
                    size = (self.resize, new_long) if width <= height else (new_long, self.resize)
                    img = img.resize(size, getattr(Image, "Resampling", Image).BILINEAR)
                if self.crop:
                    ch, cw = self.crop
                    width, height = img.size
                    if ch > height or cw > width:
                        raise CalibrationDataError(f"{path}: image of {width}x{height} is smaller than the "
                                                   f"{cw}x{ch} crop (set a resize)")
                    top, left = int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0))
                    img = img.crop((left, top, left + cw, top + ch))
                arr = np.asarray(img)
        except CalibrationDataError:
            raise
        except Exception as exc:  # PIL.UnidentifiedImageError, truncated files, ...
            raise CalibrationDataError(f"{path}: not an image Pillow can read ({type(exc).__name__})") from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if self.bgr:
            arr = arr[:, :, ::-1]
        if np.issubdtype(self.spec.dtype, np.floating):
            arr = arr.astype(np.float32)
            if self.scale:
                arr /= 255.0
            if self.mean is not None:
                arr -= self.mean
            if self.std is not None:
                arr /= self.std
        if self.nchw:
            arr = arr.transpose(2, 0, 1)
        return np.ascontiguousarray(arr)

    def chunks(self, read_size: int):
        for path in self.paths:
            yield str(path), {self.spec.name: self.load(path)}


class _SyntheticSource(_Source):
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
                    notes.append(f"synthetic data: symbolic dimension {_dim_str(d)} of input '{spec.name}' set to "
                                 "1 (pass dims={name: size})")
            self.shapes[spec.name] = (tuple(shape), spec.dtype)

    def count(self) -> int | None:
        return self.n

    def chunks(self, read_size: int):
        for i in range(self.n):  # one generator per sample: the data do not depend on the batch size
            rng = np.random.default_rng([self.seed, i])
            item = {}
            for name, (shape, dtype) in self.shapes.items():
                if np.issubdtype(dtype, np.floating):
                    item[name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
                elif dtype == np.bool_:
                    item[name] = np.zeros(shape, dtype)
                else:
                    item[name] = rng.integers(0, 2, size=shape).astype(dtype)
            yield f"synthetic sample {i}", item


def _to_numpy(value, name: str, where: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        arr = value
    elif hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
        arr = value.detach().cpu().numpy()
    else:
        arr = np.asarray(value)
    if arr.dtype.hasobject or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise CalibrationInputError(f"{where}: input '{name}' is not a numeric array (dtype {arr.dtype})")
    return arr


# -- the public object ---------------------------------------------------------------------------------------
class _NullBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: Callable[[], int | None], enabled: bool | None, desc: str):
    """A tqdm bar on stderr (``total()`` asked only when one is shown), or a no-op without tqdm or a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _NullBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NullBar()
    return tqdm(total=total(), desc=desc, unit="sample", leave=False, file=sys.stderr)


class CalibrationData:
    """A re-iterable source of calibration batches ``{model input name: np.ndarray}``.

    Build one with :func:`load_calibration`, :func:`synthetic` or the ``from_*`` class methods, then iterate
    (``for batch in data`` or ``data.batches(progress=False)``). Attributes: ``specs`` (the model inputs),
    ``batch_size`` (effective: the model's fixed batch size wins), ``limit`` (at most this many samples),
    ``num_samples`` (after ``limit``; None when unknown before reading, as for generators), ``synthetic`` (True
    for :func:`synthetic` data: callers must warn that such scales are not fit for production, see
    ``SYNTHETIC_WARNING``), ``notes`` (casts, ignored arrays, defaults taken: things to show the user),
    ``description``, ``reiterable`` (False for a generator, which can be read once).
    """

    synthetic: bool = False

    def __init__(self, source: _Source, specs, *, batch_size: int = 8, limit: int | None = None,
                 progress: bool | None = None, synthetic: bool = False, notes: list[str] | None = None):
        self.specs = input_specs(specs)
        if not self.specs:
            raise CalibrationInputError("the model has no inputs to calibrate with")
        for spec in self.specs:
            if not spec.shape:
                raise CalibrationInputError(f"model input '{spec.name}' is a scalar: calibration needs a batch "
                                            "axis on every input")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise CalibrationDataError(f"batch_size must be a positive integer, got {batch_size!r}")
        if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 1):
            raise CalibrationDataError(f"limit must be a positive integer or None, got {limit!r}")
        self._source = source
        self.synthetic = synthetic
        self.limit = None if limit is None else int(limit)
        self.progress = progress
        self.notes: list[str] = []
        for note in notes or ():
            self._note(note)
        fixed = {s.batch_dim for s in self.specs if s.batch_dim is not None}
        if len(fixed) > 1:
            raise CalibrationInputError("model inputs have different fixed batch sizes: "
                                        + ", ".join(f"'{s.name}' {s.batch_dim}" for s in self.specs))
        self.fixed_batch = fixed.pop() if fixed else None
        self.batch_size = int(batch_size)
        if self.fixed_batch is not None and self.fixed_batch != self.batch_size:
            self._note(f"the model's batch size is fixed at {self.fixed_batch}: batches of {self.fixed_batch} "
                       f"(batch_size={batch_size} not used)")
            self.batch_size = self.fixed_batch
        self._consumed = False
        self._count = None
        source.check(self)
        if synthetic:
            self._note(SYNTHETIC_WARNING)

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_npz(cls, path, specs, **kwargs) -> "CalibrationData":
        """A ``.npz`` with one array per input name (samples on axis 0), streamed batch by batch."""
        specs = input_specs(specs)
        return cls(_NpzSource(Path(path), {s.name: len(s.shape) for s in specs}), specs, **kwargs)

    @classmethod
    def from_npy_folder(cls, folder, specs, **kwargs) -> "CalibrationData":
        """A folder of ``.npy`` (one-input models) or of per-input subfolders of ``.npy``, memory-mapped."""
        specs = input_specs(specs)
        folder = Path(folder)
        ranks = {s.name: len(s.shape) for s in specs}
        top = sorted(folder.glob("*.npy"), key=_natural_key)
        if top:
            if len(specs) > 1:
                raise CalibrationInputError(
                    f"{folder}: a folder of .npy files feeds a one-input model; the model has inputs "
                    f"{_names(specs)}: put each input's files in a subfolder named after it")
            files = {specs[0].name: top}
        else:
            files = {}
            for spec in specs:
                sub = folder / spec.name
                found = sorted(sub.glob("*.npy"), key=_natural_key) if sub.is_dir() else []
                if not found:
                    raise CalibrationInputError(f"{folder}: no .npy files for model input '{spec.name}' (expected "
                                                f"{'*.npy in the folder or ' if len(specs) == 1 else ''}"
                                                f"the subfolder {spec.name}/)")
                files[spec.name] = found
            names = {n: [p.name for p in paths] for n, paths in files.items()}
            ref_name, ref = next(iter(names.items()))
            for name, listed in names.items():
                if listed != ref:
                    odd = sorted(set(listed) ^ set(ref))[:1] or ["(order)"]
                    raise CalibrationInputError(f"{folder}: subfolders '{ref_name}/' and '{name}/' hold different "
                                                f"files (e.g. {odd[0]}); files pair up by name")
        return cls(_NpyFolderSource(folder, files, ranks), specs, **kwargs)

    @classmethod
    def from_npz_folder(cls, folder, specs, **kwargs) -> "CalibrationData":
        """A folder of ``.npz`` files, each as :meth:`from_npz`, read in name order."""
        specs = input_specs(specs)
        folder = Path(folder)
        paths = sorted(folder.glob("*.npz"), key=_natural_key)
        if not paths:
            raise EmptyCalibrationDataError(f"{folder}: no .npz files")
        return cls(_NpzFolderSource(folder, paths, {s.name: len(s.shape) for s in specs}), specs, **kwargs)

    @classmethod
    def from_image_folder(cls, folder, specs, options: ImageOptions | Mapping | None = None,
                          **kwargs) -> "CalibrationData":
        """Image files under ``folder`` (recursive, name order), decoded one at a time; see ImageOptions."""
        specs = input_specs(specs)
        folder = Path(folder)
        if len(specs) != 1:
            raise CalibrationInputError(f"{folder}: image folders feed one-input models; the model has inputs "
                                        f"{_names(specs)}")
        options = _image_options(options)
        paths = _image_files(folder)
        if not paths:
            raise EmptyCalibrationDataError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        _need_pillow(folder)
        notes: list[str] = []
        source = _ImageFolderSource(folder, paths, specs[0], options, notes)
        return cls(source, specs, notes=notes, **kwargs)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], specs, **kwargs) -> "CalibrationData":
        """In-memory arrays ``{input name: array}`` with samples on axis 0."""
        return cls(_ArraysSource(arrays), specs, **kwargs)

    @classmethod
    def from_iterable(cls, items, specs, **kwargs) -> "CalibrationData":
        """Items from a list, a re-iterable object, a generator (read once) or a function returning an iterator.

        Each item: ``{name: array}``, a bare array (one-input models) or a tuple/list of arrays in input order;
        torch tensors are accepted. Each array is one sample or a batch (see the module docstring).
        """
        return cls(_IterableSource(items), specs, **kwargs)

    # -- reading ------------------------------------------------------------------------------------------
    @property
    def description(self) -> str:
        """Where the data come from, for messages."""
        return self._source.description

    @property
    def reiterable(self) -> bool:
        return self._source.reiterable

    @property
    def num_samples(self) -> int | None:
        if self._count is None:
            count = self._source.count()
            if count is not None:
                if self.limit is not None:
                    count = min(count, self.limit)
                if self.fixed_batch:
                    count -= count % self.fixed_batch
            self._count = count
        return self._count

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.batches()

    def batches(self, progress: bool | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield batches ``{input name: array}`` of at most ``batch_size`` samples, validated and cast.

        ``progress``: a tqdm bar on stderr (None: the object's setting, by default only when stderr is a TTY).
        """
        if self._consumed and not self.reiterable:
            raise CalibrationDataError(f"{self.description}: a generator can be read only once; pass a list or a "
                                       "function returning a fresh iterator to read the data again")
        self._consumed = True
        bar = _progress_bar(lambda: self.num_samples, self.progress if progress is None else progress,
                            "calibration")
        seen = 0
        try:
            for batch in self._rebatch():
                n = next(iter(batch.values())).shape[0]
                seen += n
                bar.update(n)
                yield batch
        finally:
            bar.close()
        if seen == 0:
            if self.fixed_batch and self.fixed_batch > 1 and self._dropped:
                raise EmptyCalibrationDataError(f"{self.description}: {self._dropped} samples, fewer than the "
                                                f"model's fixed batch size {self.fixed_batch}")
            raise EmptyCalibrationDataError(f"{self.description}: no calibration samples")

    def _rebatch(self) -> Iterator[dict[str, np.ndarray]]:
        size = self.batch_size
        remaining = self.limit if self.limit is not None else math.inf
        pending: list[tuple[str, dict]] = []
        pending_n, pending_key = 0, None
        self._dropped = 0
        for where, item in self._source.chunks(size):
            if remaining <= 0:
                break
            arrays, n = self._prepare(item, where)
            key = tuple(arrays[s.name].shape[1:] for s in self.specs)
            start = 0
            while start < n and remaining > 0:
                if pending and key != pending_key:
                    yield self._flush(pending)
                    pending, pending_n = [], 0
                take = int(min(size - pending_n, n - start, remaining))
                pending.append((where, {k: v[start:start + take] for k, v in arrays.items()}))
                pending_n, pending_key = pending_n + take, key
                start += take
                remaining -= take
                if pending_n == size:
                    yield self._flush(pending)
                    pending, pending_n = [], 0
        if pending:
            if self.fixed_batch and pending_n < self.fixed_batch:
                self._dropped = pending_n
                self._note(f"the last {pending_n} samples were dropped: fewer than the model's fixed batch size "
                           f"{self.fixed_batch}")
            else:
                yield self._flush(pending)

    def _flush(self, pending: list[tuple[str, dict]]) -> dict[str, np.ndarray]:
        batch = {}
        for spec in self.specs:
            parts = [arrays[spec.name] for _, arrays in pending]
            if np.issubdtype(spec.dtype, np.integer):
                for (where, arrays), part in zip(pending, parts):
                    self._check_int_values(spec, part, where)
            if len(parts) == 1:
                batch[spec.name] = np.array(parts[0], dtype=spec.dtype, order="C", copy=True)
            else:
                batch[spec.name] = np.concatenate(parts, axis=0, dtype=spec.dtype, casting="unsafe")
        return batch

    # -- validation ---------------------------------------------------------------------------------------
    def _note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)
            log.info(message)

    def _check_names(self, found: Sequence[str], where: str) -> None:
        missing = [s.name for s in self.specs if s.name not in found]
        if missing:
            have = ", ".join(f"'{k}'" for k in found) or "nothing"
            raise CalibrationInputError(f"{where}: no data for model input '{missing[0]}' (found {have}; model "
                                        f"inputs {_names(self.specs)})")
        extra = [k for k in found if k not in {s.name for s in self.specs}]
        if extra:
            self._note(f"{where}: arrays that are not model inputs ignored: {', '.join(extra)}")

    def _check_counts(self, counts: Mapping[str, int], where: str) -> None:
        values = set(counts.values())
        if len(values) > 1:
            detail = ", ".join(f"'{k}' {v}" for k, v in counts.items())
            raise CalibrationInputError(f"{where}: model inputs have different numbers of samples ({detail})")
        if values == {0}:
            raise EmptyCalibrationDataError(f"{where}: no calibration samples (0 along axis 0)")

    def _check_array(self, spec: InputSpec, shape: tuple, dtype: np.dtype, where: str) -> bool:
        """Checks one array against ``spec``; True when it holds a batch (samples on axis 0), False for one sample."""
        rank = len(spec.shape)
        if len(shape) == rank:
            batched, sample = True, tuple(shape[1:])
        elif len(shape) == rank - 1:
            batched, sample = False, tuple(shape)
        else:
            raise CalibrationInputError(
                f"{where}: input '{spec.name}' has shape {tuple(shape)}, but the model input is {rank}-D "
                f"{spec.shape_str()}: give one sample ({rank - 1}-D) or samples on axis 0 ({rank}-D)")
        want = spec.shape[1:]
        if any(isinstance(w, int) and w != s for w, s in zip(want, sample)):
            raise CalibrationInputError(
                f"{where}: input '{spec.name}' has samples of shape {sample}, the model expects "
                f"{spec.shape_str(want)} per sample")
        self._check_dtype(spec, np.dtype(dtype), where)
        return batched

    def _check_dtype(self, spec: InputSpec, dtype: np.dtype, where: str) -> None:
        want = spec.dtype
        if dtype == want:
            return
        if np.issubdtype(want, np.floating):
            if np.issubdtype(dtype, np.floating):
                self._note(f"input '{spec.name}': {dtype} data cast to the model's {want}")
                return
            raise CalibrationInputError(
                f"{where}: input '{spec.name}' is {dtype} but the model takes {want}; convert it yourself (e.g. "
                "x.astype(np.float32) / 255 and any mean/std the model expects), or use an image folder")
        if np.issubdtype(want, np.integer) and np.issubdtype(dtype, np.integer):
            if not np.can_cast(dtype, want, "safe"):
                self._note(f"input '{spec.name}': {dtype} data cast to the model's {want} (values checked)")
            return
        if want == np.bool_ and dtype == np.bool_:
            return
        raise CalibrationInputError(f"{where}: input '{spec.name}' is {dtype} but the model takes {want}; "
                                    "convert it yourself")

    def _check_int_values(self, spec: InputSpec, part: np.ndarray, where: str) -> None:
        if part.dtype == spec.dtype or part.size == 0 or np.can_cast(part.dtype, spec.dtype, "safe"):
            return
        info = np.iinfo(spec.dtype)
        lo, hi = part.min(), part.max()
        if lo < info.min or hi > info.max:
            raise CalibrationInputError(f"{where}: input '{spec.name}' has values in [{lo}, {hi}], outside the "
                                        f"model's {spec.dtype}")

    def _prepare(self, item, where: str) -> tuple[dict[str, np.ndarray], int]:
        """``item`` as {input name: array with samples on axis 0} (lazy arrays stay lazy) and its sample count."""
        if isinstance(item, Mapping):
            found = dict(item)
        elif isinstance(item, (tuple, list)):
            if len(item) != len(self.specs):
                raise CalibrationInputError(f"{where}: {len(item)} arrays for a model with {len(self.specs)} "
                                            f"input(s) ({_names(self.specs)}); yield dicts keyed by input name")
            found = {s.name: v for s, v in zip(self.specs, item)}
        else:
            if len(self.specs) != 1:
                raise CalibrationInputError(f"{where}: a bare array feeds one-input models; the model has inputs "
                                            f"{_names(self.specs)}: yield dicts keyed by input name")
            found = {self.specs[0].name: item}
        self._check_names(list(found), where)
        arrays, counts = {}, {}
        for spec in self.specs:
            arr = _to_numpy(found[spec.name], spec.name, where)
            if not self._check_array(spec, arr.shape, arr.dtype, where):
                arr = arr[None]
            arrays[spec.name], counts[spec.name] = arr, arr.shape[0]
        if len(set(counts.values())) > 1:
            self._check_counts(counts, where)
        return arrays, next(iter(counts.values()))

    def __repr__(self) -> str:
        n = self.num_samples
        flag = ", synthetic" if self.synthetic else ""
        return (f"CalibrationData({self.description}: {'?' if n is None else n} samples, batch {self.batch_size}, "
                f"inputs {', '.join(str(s) for s in self.specs)}{flag})")


def _names(specs: Sequence[InputSpec]) -> str:
    return ", ".join(f"'{s.name}'" for s in specs)


def _image_options(options) -> ImageOptions:
    if options is None:
        return ImageOptions()
    if isinstance(options, ImageOptions):
        return options
    if isinstance(options, Mapping):
        try:
            return ImageOptions(**options)
        except TypeError as exc:
            raise CalibrationDataError(f"image options: {exc}") from None
    raise CalibrationDataError(f"image options must be an ImageOptions or a dict, got {type(options).__name__}")


def _image_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                  key=lambda p: [_natural_key(Path(part)) for part in p.relative_to(folder).parts])


# -- front doors ---------------------------------------------------------------------------------------------
def load_calibration(source, input_specs_, *, batch_size: int = 8, limit: int | None = None,
                     image_options: ImageOptions | Mapping | None = None,
                     progress: bool | None = None) -> CalibrationData:
    """Calibration data from ``source`` for a model with inputs ``input_specs_`` (see :func:`input_specs`).

    ``source``: a path (``.npz``, ``.npy``, or a folder of ``.npy`` / per-input subfolders / ``.npz`` / images),
    a mapping ``{name: array}``, a bare array (one-input models), an iterable or a function returning one, or a
    CalibrationData (re-bound to these inputs and options). ``limit``: use at most this many samples.
    ``image_options`` (image folders only): an :class:`ImageOptions` or a dict of its fields. ``progress``: True,
    False, or None (a bar when stderr is a terminal). Cheap checks (names, shapes, dtypes from file headers)
    happen here; the rest as batches are read.
    """
    specs = input_specs(input_specs_)
    kwargs = dict(batch_size=batch_size, limit=limit, progress=progress)
    if isinstance(source, CalibrationData):
        return CalibrationData(source._source, specs, synthetic=source.synthetic, notes=source.notes, **kwargs)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise CalibrationDataError(f"calibration data {path} does not exist")
        if image_options is not None and _folder_kind(path, specs) != "images":
            raise CalibrationDataError(f"{path}: image options apply to folders of images only")
        if path.is_file():
            suffix = path.suffix.lower()
            if suffix == ".npz":
                return CalibrationData.from_npz(path, specs, **kwargs)
            if suffix == ".npy":
                if len(specs) != 1:
                    raise CalibrationInputError(f"{path}: a .npy file feeds a one-input model; the model has "
                                                f"inputs {_names(specs)} (use a .npz)")
                ranks = {specs[0].name: len(specs[0].shape)}
                return CalibrationData(_NpyFolderSource(path, {specs[0].name: [path]}, ranks), specs, **kwargs)
            raise CalibrationDataError(f"{path}: unsupported calibration file type '{suffix}' (expected .npz, "
                                       ".npy, or a folder of .npy, .npz or images)")
        kind = _folder_kind(path, specs)
        if kind == "npy":
            return CalibrationData.from_npy_folder(path, specs, **kwargs)
        if kind == "npz":
            return CalibrationData.from_npz_folder(path, specs, **kwargs)
        if kind == "images":
            return CalibrationData.from_image_folder(path, specs, image_options, **kwargs)
        raise EmptyCalibrationDataError(f"{path}: no .npy, .npz or image files (nor .npy subfolders named after "
                                        f"the model inputs {_names(specs)})")
    if image_options is not None:
        raise CalibrationDataError("image options apply to folders of images only")
    if isinstance(source, Mapping):
        return CalibrationData.from_arrays(source, specs, **kwargs)
    if isinstance(source, np.ndarray):
        if len(specs) != 1:
            raise CalibrationInputError(f"a bare array feeds one-input models; the model has inputs {_names(specs)}")
        return CalibrationData(_ArraysSource({specs[0].name: source}, "an array"), specs, **kwargs)
    if isinstance(source, Iterable) or callable(source):
        return CalibrationData.from_iterable(source, specs, **kwargs)
    raise CalibrationDataError(f"cannot read calibration data from a {type(source).__name__}")


def _folder_kind(folder: Path, specs: Sequence[InputSpec]) -> str | None:
    if not folder.is_dir():
        return None
    if any(folder.glob("*.npy")):
        return "npy"
    if all((folder / s.name).is_dir() and any((folder / s.name).glob("*.npy")) for s in specs):
        return "npy"
    if any(folder.glob("*.npz")):
        return "npz"
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*")):
        return "images"
    return None


def synthetic(input_specs_, n: int = 32, seed: int = 0, *, batch_size: int = 8,
              dims: Mapping[str, int] | None = None, progress: bool | None = None) -> CalibrationData:
    """``n`` fixed-seed random samples (floats standard normal, integers 0/1, booleans False) per model input.

    Sample ``i`` depends only on ``(seed, i)``, not on the batch size. Symbolic dimensions take their size from
    ``dims`` (``{"seq": 128}``) or 1. The result has ``synthetic = True`` and carries ``SYNTHETIC_WARNING`` in its
    notes: scales calibrated on it are not fit for production, and callers must say so loudly.
    """
    specs = input_specs(input_specs_)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise CalibrationDataError(f"synthetic data needs n >= 1 samples, got {n!r}")
    notes: list[str] = []
    source = _SyntheticSource(specs, int(n), int(seed), dims or {}, notes)
    return CalibrationData(source, specs, batch_size=batch_size, progress=progress, synthetic=True, notes=notes)

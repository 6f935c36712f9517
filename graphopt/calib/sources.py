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

What a batch is, and how the arrays are checked and cast, is :mod:`graphopt.calib.data`'s part
(:class:`CalibrationData`). This module holds the front doors, :func:`load_calibration` and :func:`synthetic`, and
re-exports the public names of the others: ``specs`` (model inputs), ``readers`` and ``images`` (one reader per
source kind), ``data`` and ``errors``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from graphopt.calib.data import SYNTHETIC_WARNING, CalibrationData
from graphopt.calib.errors import (
    CalibrationDataError,
    CalibrationInputError,
    EmptyCalibrationDataError,
    MissingDependencyError,
)
from graphopt.calib.images import IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, ImageOptions
from graphopt.calib.readers import ArraysSource, NpyFolderSource, SyntheticSource
from graphopt.calib.specs import Dim as Dim  # re-exported: the type of an InputSpec dim
from graphopt.calib.specs import InputSpec, input_specs, quoted_names

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES", "CalibrationData", "CalibrationDataError",
    "CalibrationInputError", "EmptyCalibrationDataError", "ImageOptions", "InputSpec", "MissingDependencyError",
    "SYNTHETIC_WARNING", "input_specs", "load_calibration", "synthetic",
]


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
        return CalibrationData(source.source, specs, synthetic=source.synthetic, notes=source.notes, **kwargs)
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
                                                f"inputs {quoted_names(specs)} (use a .npz)")
                ranks = {specs[0].name: len(specs[0].shape)}
                return CalibrationData(NpyFolderSource(path, {specs[0].name: [path]}, ranks), specs, **kwargs)
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
                                        f"the model inputs {quoted_names(specs)})")
    if image_options is not None:
        raise CalibrationDataError("image options apply to folders of images only")
    if isinstance(source, Mapping):
        return CalibrationData.from_arrays(source, specs, **kwargs)
    if isinstance(source, np.ndarray):
        if len(specs) != 1:
            raise CalibrationInputError("a bare array feeds one-input models; the model has inputs "
                                        f"{quoted_names(specs)}")
        return CalibrationData(ArraysSource({specs[0].name: source}, "an array"), specs, **kwargs)
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
    source = SyntheticSource(specs, int(n), int(seed), dims or {}, notes)
    return CalibrationData(source, specs, batch_size=batch_size, progress=progress, synthetic=True, notes=notes)

"""The calibration data object, :class:`CalibrationData`: it reads chunks from a source (:mod:`graphopt.calib.readers`,
:mod:`graphopt.calib.images`), checks them against the model inputs (:mod:`graphopt.calib.validate`) and re-cuts
them into batches.

An array is a batch when it has as many dimensions as the model input, and a single sample when it has one
fewer. Batches are re-cut to at most ``batch_size`` samples along axis 0 (exactly the model's batch size when its
first dimension is fixed; a last incomplete batch is then dropped with a note). Samples whose symbolic dimensions
differ (e.g. sequence lengths) are never concatenated: a batch ends where the shape changes.

Validation, per model input: the name must be present; the sample shape must match every fixed dimension of
the model input; floats are cast to the input's float type (with a note in ``data.notes``); integer or boolean
data for a float input (and floats for an integer input) are refused; integers are cast between integer types
only when the values fit; float data holding NaN or inf (also after the cast) are refused, with the number of
such values and samples. Problems raise :class:`CalibrationDataError` subclasses with a one-line message that
names the input. Files are never read whole (Fortran-ordered ``.npz`` members excepted): at most one batch,
plus one decoded image or one ``.npz`` read block, is in memory at a time.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.calib.errors import CalibrationDataError, CalibrationInputError, EmptyCalibrationDataError
from graphopt.calib.images import (
    IMAGE_SUFFIXES,
    ImageFolderSource,
    ImageOptions,
    image_files,
    image_options,
    need_pillow,
)
from graphopt.calib.readers import (
    ArraysSource,
    IterableSource,
    NpyFolderSource,
    NpzFolderSource,
    NpzSource,
    Source,
    natural_key,
    to_numpy,
)
from graphopt.calib.specs import input_specs, quoted_names
from graphopt.calib.validate import InputChecks

__all__ = ["SYNTHETIC_WARNING", "CalibrationData"]

log = logging.getLogger("graphopt.calib")


SYNTHETIC_WARNING = ("calibrated on synthetic random inputs: the quantization scales are not fit for production; "
                     "pass real calibration data")


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
    ``description``, ``reiterable`` (False for a generator, which can be read once), ``source`` (the reader the
    chunks come from) and ``checks`` (the :class:`InputChecks` every chunk goes through).
    """

    synthetic: bool = False

    def __init__(self, source: Source, specs, *, batch_size: int = 8, limit: int | None = None,
                 progress: bool | None = None, synthetic: bool = False, notes: list[str] | None = None):
        self.specs = input_specs(specs)
        if not self.specs:
            raise CalibrationInputError("the model has no inputs to calibrate with")
        for spec in self.specs:
            if not spec.shape:
                from graphopt.errors import UnsupportedError

                raise UnsupportedError(f"model input '{spec.name}' is a scalar: graphopt calibrates through a batch "
                                       f"axis on every input, which a scalar has not (make it a 1-element tensor, "
                                       f"or fix it to a constant, before quantizing)")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise CalibrationDataError(f"batch_size must be a positive integer, got {batch_size!r}")
        if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 1):
            raise CalibrationDataError(f"limit must be a positive integer or None, got {limit!r}")
        self.source = source
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
        if self.fixed_batch == 0:
            raise CalibrationInputError("the model's batch dimension is fixed at 0: no sample fits it")
        self.batch_size = int(batch_size)
        if self.fixed_batch is not None and self.fixed_batch != self.batch_size:
            self._note(f"the model's batch size is fixed at {self.fixed_batch}: batches of {self.fixed_batch} "
                       f"(batch_size={batch_size} not used)")
            self.batch_size = self.fixed_batch
        self._consumed = False
        self._count = None
        self.checks = InputChecks(self.specs, self._note)
        source.check(self.checks)
        if synthetic:
            self._note(SYNTHETIC_WARNING)

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_npz(cls, path, specs, **kwargs) -> "CalibrationData":
        """A ``.npz`` with one array per input name (samples on axis 0), streamed batch by batch."""
        specs = input_specs(specs)
        return cls(NpzSource(Path(path), {s.name: len(s.shape) for s in specs}), specs, **kwargs)

    @classmethod
    def from_npy_folder(cls, folder, specs, **kwargs) -> "CalibrationData":
        """A folder of ``.npy`` (one-input models) or of per-input subfolders of ``.npy``, memory-mapped."""
        specs = input_specs(specs)
        folder = Path(folder)
        ranks = {s.name: len(s.shape) for s in specs}
        top = sorted(folder.glob("*.npy"), key=natural_key)
        if top:
            if len(specs) > 1:
                raise CalibrationInputError(
                    f"{folder}: a folder of .npy files feeds a one-input model; the model has inputs "
                    f"{quoted_names(specs)}: put each input's files in a subfolder named after it")
            files = {specs[0].name: top}
        else:
            files = {}
            for spec in specs:
                sub = folder / spec.name
                found = sorted(sub.glob("*.npy"), key=natural_key) if sub.is_dir() else []
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
        return cls(NpyFolderSource(folder, files, ranks), specs, **kwargs)

    @classmethod
    def from_npz_folder(cls, folder, specs, **kwargs) -> "CalibrationData":
        """A folder of ``.npz`` files, each as :meth:`from_npz`, read in name order."""
        specs = input_specs(specs)
        folder = Path(folder)
        paths = sorted(folder.glob("*.npz"), key=natural_key)
        if not paths:
            raise EmptyCalibrationDataError(f"{folder}: no .npz files")
        return cls(NpzFolderSource(folder, paths, {s.name: len(s.shape) for s in specs}), specs, **kwargs)

    @classmethod
    def from_image_folder(cls, folder, specs, options: ImageOptions | Mapping | None = None,
                          **kwargs) -> "CalibrationData":
        """Image files under ``folder`` (recursive, name order), decoded one at a time; see ImageOptions."""
        specs = input_specs(specs)
        folder = Path(folder)
        if len(specs) != 1:
            raise CalibrationInputError(f"{folder}: image folders feed one-input models; the model has inputs "
                                        f"{quoted_names(specs)}")
        options = image_options(options)
        paths = image_files(folder)
        if not paths:
            raise EmptyCalibrationDataError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        need_pillow(folder)
        notes: list[str] = []
        source = ImageFolderSource(folder, paths, specs[0], options, notes)
        return cls(source, specs, notes=notes, **kwargs)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], specs, **kwargs) -> "CalibrationData":
        """In-memory arrays ``{input name: array}`` with samples on axis 0."""
        return cls(ArraysSource(arrays), specs, **kwargs)

    @classmethod
    def from_iterable(cls, items, specs, **kwargs) -> "CalibrationData":
        """Items from a list, a re-iterable object, a generator (read once) or a function returning an iterator.

        Each item: ``{name: array}``, a bare array (one-input models) or a tuple/list of arrays in input order;
        torch tensors are accepted. Each array is one sample or a batch (see the module docstring).
        """
        return cls(IterableSource(items), specs, **kwargs)

    # -- reading ------------------------------------------------------------------------------------------
    @property
    def description(self) -> str:
        """Where the data come from, for messages."""
        return self.source.description

    @property
    def reiterable(self) -> bool:
        return self.source.reiterable

    @property
    def num_samples(self) -> int | None:
        if self._count is None:
            count = self.source.count()
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
        for where, item in self.source.chunks(size):
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
                piece = {k: v[start:start + take] for k, v in arrays.items()}
                self.checks.finite(piece, where, start)
                pending.append((where, piece))
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
                    self.checks.int_values(spec, part, where)
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

    def _prepare(self, item, where: str) -> tuple[dict[str, np.ndarray], int]:
        """``item`` as {input name: array with samples on axis 0} (lazy arrays stay lazy) and its sample count."""
        if isinstance(item, Mapping):
            found = dict(item)
        elif isinstance(item, (tuple, list)):
            if len(item) != len(self.specs):
                raise CalibrationInputError(f"{where}: {len(item)} arrays for a model with {len(self.specs)} "
                                            f"input(s) ({quoted_names(self.specs)}); yield dicts keyed by input name")
            found = {s.name: v for s, v in zip(self.specs, item)}
        else:
            if len(self.specs) != 1:
                raise CalibrationInputError(f"{where}: a bare array feeds one-input models; the model has inputs "
                                            f"{quoted_names(self.specs)}: yield dicts keyed by input name")
            found = {self.specs[0].name: item}
        self.checks.names(list(found), where)
        arrays, counts = {}, {}
        for spec in self.specs:
            arr = to_numpy(found[spec.name], spec.name, where)
            if not self.checks.array(spec, arr.shape, arr.dtype, where):
                arr = arr[None]
            arrays[spec.name], counts[spec.name] = arr, arr.shape[0]
        if len(set(counts.values())) > 1:
            self.checks.counts(counts, where)
        return arrays, next(iter(counts.values()))

    def __repr__(self) -> str:
        n = self.num_samples
        flag = ", synthetic" if self.synthetic else ""
        return (f"CalibrationData({self.description}: {'?' if n is None else n} samples, batch {self.batch_size}, "
                f"inputs {', '.join(str(s) for s in self.specs)}{flag})")

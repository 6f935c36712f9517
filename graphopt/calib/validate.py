"""The checks calibration arrays go through against the model inputs (:class:`InputChecks`), shared by the
readers, which check file headers when the data are loaded, and :class:`~graphopt.calib.data.CalibrationData`,
which checks every batch as it is read. Problems raise :class:`CalibrationInputError` with a one-line message
that names the input; casts worth telling the user become notes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from graphopt.calib.errors import CalibrationInputError, EmptyCalibrationDataError
from graphopt.calib.specs import InputSpec, quoted_names

__all__ = ["InputChecks"]


class InputChecks:
    """Checks for data meant for the inputs ``specs``; ``note(message)`` records what the user should be told."""

    def __init__(self, specs: Sequence[InputSpec], note: Callable[[str], None]):
        self.specs = tuple(specs)
        self.note = note

    def names(self, found: Sequence[str], where: str) -> None:
        """Every model input is in ``found``; names that are not model inputs are ignored with a note."""
        missing = [s.name for s in self.specs if s.name not in found]
        if missing:
            have = ", ".join(f"'{k}'" for k in found) or "nothing"
            raise CalibrationInputError(f"{where}: no data for model input '{missing[0]}' (found {have}; model "
                                        f"inputs {quoted_names(self.specs)})")
        extra = [k for k in found if k not in {s.name for s in self.specs}]
        if extra:
            self.note(f"{where}: arrays that are not model inputs ignored: {', '.join(extra)}")

    @staticmethod
    def counts(counts: Mapping[str, int], where: str) -> None:
        """Every input has the same number of samples, and more than none."""
        values = set(counts.values())
        if len(values) > 1:
            detail = ", ".join(f"'{k}' {v}" for k, v in counts.items())
            raise CalibrationInputError(f"{where}: model inputs have different numbers of samples ({detail})")
        if values == {0}:
            raise EmptyCalibrationDataError(f"{where}: no calibration samples (0 along axis 0)")

    def array(self, spec: InputSpec, shape: tuple, dtype: np.dtype, where: str) -> bool:
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
        self.dtype(spec, np.dtype(dtype), where)
        return batched

    def dtype(self, spec: InputSpec, dtype: np.dtype, where: str) -> None:
        """Floats for a float input are cast (with a note); integers cast between integer types (values checked
        by :meth:`int_values`); any other mix is refused."""
        want = spec.dtype
        if dtype == want:
            return
        if np.issubdtype(want, np.floating):
            if np.issubdtype(dtype, np.floating):
                self.note(f"input '{spec.name}': {dtype} data cast to the model's {want}")
                return
            raise CalibrationInputError(
                f"{where}: input '{spec.name}' is {dtype} but the model takes {want}; convert it yourself (e.g. "
                "x.astype(np.float32) / 255 and any mean/std the model expects), or use an image folder")
        if np.issubdtype(want, np.integer) and np.issubdtype(dtype, np.integer):
            if not np.can_cast(dtype, want, "safe"):
                self.note(f"input '{spec.name}': {dtype} data cast to the model's {want} (values checked)")
            return
        if want == np.bool_ and dtype == np.bool_:
            return
        raise CalibrationInputError(f"{where}: input '{spec.name}' is {dtype} but the model takes {want}; "
                                    "convert it yourself")

    def finite(self, piece: Mapping[str, np.ndarray], where: str, start: int) -> None:
        """Float inputs must be finite (after the cast to the model's type): a NaN or inf would reach every
        observer downstream and leave it nothing to calibrate on, so the data are refused, naming the input."""
        for spec in self.specs:
            if not np.issubdtype(spec.dtype, np.floating):
                continue
            with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: reported below
                values = np.asarray(piece[spec.name], dtype=spec.dtype)
            finite = np.isfinite(values)
            if finite.all():
                continue
            bad = finite.size - int(np.count_nonzero(finite))
            rows = np.flatnonzero(~finite.reshape(len(values), -1).all(axis=1))
            samples = (f"sample {start}" if len(values) == 1 else f"{len(rows)} of samples {start}.."
                       f"{start + len(values) - 1} (first: sample {start + int(rows[0])})")
            raise CalibrationInputError(f"{where}: input '{spec.name}' has {bad} non-finite values (NaN/inf) in "
                                        f"{samples}; calibration needs finite inputs: check how the data were made")

    @staticmethod
    def int_values(spec: InputSpec, part: np.ndarray, where: str) -> None:
        """Integers cast to a narrower integer type must fit it."""
        if part.dtype == spec.dtype or part.size == 0 or np.can_cast(part.dtype, spec.dtype, "safe"):
            return
        info = np.iinfo(spec.dtype)
        lo, hi = part.min(), part.max()
        if lo < info.min or hi > info.max:
            raise CalibrationInputError(f"{where}: input '{spec.name}' has values in [{lo}, {hi}], outside the "
                                        f"model's {spec.dtype}")

"""The errors of calibration: data that cannot be read or do not fit the model (:class:`CalibrationDataError` and
its subclasses), and observers that cannot give a range (:class:`ObserverError`). Messages are one line."""

from graphopt.errors import InputError, UnsupportedError, first_line

__all__ = [
    "CalibrationDataError", "CalibrationInputError", "EmptyCalibrationDataError", "MissingDependencyError",
    "ObserverError", "refused_data",
]


class CalibrationDataError(InputError):
    """Calibration data could not be read or used (missing path, unsupported file, unreadable image, ...)."""


class CalibrationInputError(CalibrationDataError):
    """Calibration data do not fit the model's inputs: a name, a shape or a dtype. The message names the input."""


class EmptyCalibrationDataError(CalibrationDataError):
    """The calibration source holds no samples."""


class MissingDependencyError(CalibrationDataError):
    """An optional package is needed for this source (Pillow for image folders)."""

    exit_code = UnsupportedError.exit_code


class ObserverError(InputError):
    """An observer cannot give a range: no data seen, an unknown method, or an invalid argument."""


def refused_data(exc: BaseException, what: str = "the calibration data") -> CalibrationInputError | None:
    """The error to raise when onnxruntime refused to run a model on data that has the right names, shapes and
    types (INVALID_ARGUMENT: token ids past the embedding table, say): the data do not fit the model (exit 3),
    onnxruntime's reason kept whole. None for any other failure."""
    text = first_line(exc, 600)
    if not type(exc).__module__.startswith("onnxruntime") or "INVALID_ARGUMENT" not in text:
        return None
    reason = text.split("Non-zero status code returned while running ", 1)[-1].split("INVALID_ARGUMENT : ", 1)[-1]
    return CalibrationInputError(f"{what} do not fit the model: onnxruntime refused them while running {reason} "
                                 f"(give data in the range the model takes)")

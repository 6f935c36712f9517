"""The errors of calibration: data that cannot be read or do not fit the model (:class:`CalibrationDataError` and
its subclasses), and observers that cannot give a range (:class:`ObserverError`). Messages are one line."""

from graphopt.errors import InputError, UnsupportedError

__all__ = [
    "CalibrationDataError", "CalibrationInputError", "EmptyCalibrationDataError", "MissingDependencyError",
    "ObserverError",
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

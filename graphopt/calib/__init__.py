"""Calibration for int8: where the data come from (``sources``) and what is learnt from them (``observers``).

Modules: ``sources`` (the front doors :func:`load_calibration` and :func:`synthetic`), ``specs`` (model inputs),
``readers`` and ``images`` (one reader per source kind), ``validate`` (the checks against the model inputs),
``data`` (:class:`CalibrationData`: batching), ``observers`` (streaming observers and :func:`compute_range`),
``ranges`` (the histogram searches behind it), ``qparams`` (scale and zero point), ``errors``, ``state`` (the
pass-to-pass keys).

A calibrating pass does, in outline::

    data = load_calibration("data.npz", model)                  # or synthetic(model, n=32): data.synthetic is True
    observers = {name: make_observer("entropy") for name in tensors}
    for batch in data:                                          # {input name: array}, at most batch_size samples
        for name, value in zip(tensors, session.run(tensors, batch)):
            observers[name].update(value)                       # fixed-size state: memory flat in the samples
    low, high = compute_range(observers[name], "entropy", symmetric=False, num_levels=256)
    scale, zero_point = scale_zero_point(low, high, "uint8")   # 0.0 exactly representable

numpy only (Pillow for image folders, tqdm for the progress bar, both optional).
"""

from graphopt.calib.data import SYNTHETIC_WARNING, CalibrationData
from graphopt.calib.errors import (
    CalibrationDataError,
    CalibrationInputError,
    EmptyCalibrationDataError,
    MissingDependencyError,
    ObserverError,
)
from graphopt.calib.images import IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, ImageOptions
from graphopt.calib.observers import (
    METHODS,
    HistogramObserver,
    MinMaxObserver,
    Observer,
    compute_range,
    make_observer,
)
from graphopt.calib.qparams import QuantParams, dequantize, quant_range, quantize, scale_zero_point
from graphopt.calib.sources import load_calibration, synthetic
from graphopt.calib.specs import InputSpec, input_specs

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES", "METHODS", "SYNTHETIC_WARNING", "CalibrationData",
    "CalibrationDataError", "CalibrationInputError", "EmptyCalibrationDataError", "HistogramObserver", "ImageOptions",
    "InputSpec", "MinMaxObserver", "MissingDependencyError", "Observer", "ObserverError", "QuantParams",
    "compute_range", "dequantize", "input_specs", "load_calibration", "make_observer", "quant_range", "quantize",
    "scale_zero_point", "synthetic",
]

"""Calibration for int8: where the data come from (``sources``) and what is learnt from them (``observers``).

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

from graphopt.calib.observers import (
    METHODS,
    HistogramObserver,
    MinMaxObserver,
    Observer,
    ObserverError,
    QuantParams,
    compute_range,
    dequantize,
    make_observer,
    quant_range,
    quantize,
    scale_zero_point,
)
from graphopt.calib.sources import (
    IMAGE_SUFFIXES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SYNTHETIC_WARNING,
    CalibrationData,
    CalibrationDataError,
    CalibrationInputError,
    EmptyCalibrationDataError,
    ImageOptions,
    InputSpec,
    MissingDependencyError,
    input_specs,
    load_calibration,
    synthetic,
)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES", "METHODS", "SYNTHETIC_WARNING", "CalibrationData",
    "CalibrationDataError", "CalibrationInputError", "EmptyCalibrationDataError", "HistogramObserver", "ImageOptions",
    "InputSpec", "MinMaxObserver", "MissingDependencyError", "Observer", "ObserverError", "QuantParams",
    "compute_range", "dequantize", "input_specs", "load_calibration", "make_observer", "quant_range", "quantize",
    "scale_zero_point", "synthetic",
]

"""Image folders as calibration data: PNG / JPEG / BMP / WebP / TIFF files, found recursively and decoded one at a
time with Pillow (optional extra ``graphopt[images]``), preprocessed for a 4-D image input as :class:`ImageOptions`
says."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphopt.calib.errors import CalibrationDataError, CalibrationInputError, MissingDependencyError
from graphopt.calib.readers import Source, natural_key
from graphopt.calib.validate import InputChecks
from graphopt.ir.feeds import InputSpec

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES", "ImageFolderSource", "ImageOptions", "image_files",
           "image_options", "need_pillow"]


IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def need_pillow(where: object = "image folders"):
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependencyError(f"{where}: reading images needs Pillow, which is not installed: "
                                     "pip install 'graphopt[images]' (or pip install Pillow)") from None
    return Image


class ImageFolderSource(Source):
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

    def check(self, checks: InputChecks) -> None:
        need_pillow(self.folder)

    def load(self, path: Path) -> np.ndarray:
        Image = need_pillow(path)
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


def image_options(options) -> ImageOptions:
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


def image_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                  key=lambda p: [natural_key(Path(part)) for part in p.relative_to(folder).parts])

"""Intensity presets: how raw pixel values of a modality become network inputs.

A preset is a plain JSON-able dict stored in each adapter's metadata and reapplied automatically at prediction, so
a model always sees its inputs scaled the way it was trained.

Kinds:

* ``ct_window`` — ``{"center": 40, "width": 400}`` in Hounsfield units (HU): clip to
  ``[center - width/2, center + width/2]``, scale to [0, 1].
  **8-bit rule:** an image whose *source file* is 8-bit (``source_dtype`` ``"uint8"`` or ``"bool"``, e.g. the
  already-windowed COVID19 MedSeg JPEGs) holds display grey levels, not HU; windowing it again would clip most
  of it away. Such images are scaled by 1/255 instead. DICOM, NIfTI and NRRD CT (16-bit or float) are windowed.
* ``percentile`` — ``{"low": 0.5, "high": 99.5}``: per-image percentiles (over all channels) to [0, 1]. The default
  for MRI (arbitrary scanner units), X-ray, ultrasound and electron microscopy (8- or 16-bit grey levels whose
  range differs per device; percentiles ignore burnt-in text and a few saturated pixels, min/max would not).
* ``minmax`` — ``{}``: per-image minimum/maximum to [0, 1]. Available for users; not a default.
* ``rgb_meanstd`` — ``{"mean": [...], "std": [...]}`` (ImageNet by default): scale to [0, 1], then per-channel
  ``(x - mean) / std``. The default for fundus, dermoscopy and endoscopy (8-bit colour photographs). The scale is
  ``preset["scale"]`` when given, else it follows ``source_dtype``: 1/255 for 8-bit, 1/65535 for 16-bit, 1 for
  float images already in [0, 1], 1/255 for other float images.
* ``clahe`` — ``{"tiles": 8, "clip": 0.01}``: scaled to [0, 1] as ``rgb_meanstd`` does, then contrast-limited
  adaptive histogram equalisation of each channel (Zuiderveld 1994, as ``skimage.exposure.equalize_adapthist``:
  a ``tiles`` × ``tiles`` grid of 256-bin histograms clipped at ``clip`` of a tile's pixels, the excess spread
  evenly, mappings interpolated bilinearly between tile centres), then ``(x - 0.5) / 0.29`` (a uniform
  distribution's mean and standard deviation). Differences of exposure and uneven lighting are partly evened out
  (a brightness gap across an image halved, tests/test_data.py; the clip limit keeps noise from being amplified);
  the tiles are a share of the image, so the result does not depend on its pixel size. Available for colour
  photographs (fundus, endoscopy); not a default.

A constant image (max = min) maps to zeros under ``percentile`` and ``minmax`` (no division by zero).
NaN/Inf pixels are refused with :class:`~m4oe_adapters.errors.DataError` (readers refuse them earlier too).
Modality names match case-insensitively, with aliases (``x-ray``/``cxr`` → ``xray``, ``em`` →
``electron_microscopy``, ``mr`` → ``mri``, ``us`` → ``ultrasound``...).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .errors import ConfigError, DataError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

ALIASES = {
    "x-ray": "xray", "x_ray": "xray", "cxr": "xray", "radiograph": "xray", "mr": "mri", "em": "electron_microscopy",
    "electron microscopy": "electron_microscopy", "microscopy": "electron_microscopy", "us": "ultrasound",
    "dermatoscopy": "dermoscopy", "colonoscopy": "endoscopy", "retina": "fundus",
}
PERCENTILE = {"kind": "percentile", "low": 0.5, "high": 99.5}
RGB_IMAGENET = {"kind": "rgb_meanstd", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
DEFAULTS: dict[str, dict[str, Any]] = {
    "ct": {"kind": "ct_window", "center": 40.0, "width": 400.0},
    "mri": PERCENTILE,
    "xray": PERCENTILE,
    "ultrasound": PERCENTILE,
    "electron_microscopy": PERCENTILE,
    "fundus": RGB_IMAGENET,
    "dermoscopy": RGB_IMAGENET,
    "endoscopy": RGB_IMAGENET,
}
KINDS = ("ct_window", "percentile", "minmax", "rgb_meanstd", "clahe")
CLAHE_BINS = 256
EIGHT_BIT_SOURCES = ("uint8", "int8", "bool")


class PresetError(ConfigError):
    """A preset has an unknown kind, a missing parameter or a value of the wrong type or range."""


def canonical_modality(modality: str) -> str:
    """``"X-Ray"`` → ``"xray"``: lower case, aliases resolved."""
    name = str(modality).strip().lower()
    return ALIASES.get(name, name)


def known_modality(name: str, samples: Sequence = ()) -> str:
    """The modality whose preset and scale an adapter called ``name`` takes: ``name`` itself when it is a known
    modality (``"fundus"``, ``"X-Ray"``), else the one modality of its training ``samples`` (an adapter named
    ``"fundus-clinicA"`` trained on fundus images is preprocessed as fundus), else ``name``."""
    if canonical_modality(name) in DEFAULTS:
        return name
    found = {getattr(sample, "modality", None) for sample in samples} - {None, ""}
    return found.pop() if len(found) == 1 else name


def default_preset(modality: str) -> dict[str, Any]:
    """A fresh copy of the preset used for ``modality`` unless told otherwise (percentile for unknown ones)."""
    preset = DEFAULTS.get(canonical_modality(modality), PERCENTILE)
    return {key: (list(value) if isinstance(value, list) else value) for key, value in preset.items()}


def _number(preset: dict, key: str, default: float | None = None) -> float:
    value = preset.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise PresetError(f"preset {preset.get('kind')!r}: {key} must be a finite number, got {value!r}")
    return float(value)


def _numbers(preset: dict, key: str) -> list[float]:
    values = preset.get(key)
    if (
        not isinstance(values, list) or not values
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values)
    ):
        raise PresetError(f"preset 'rgb_meanstd': {key} must be a non-empty list of finite numbers, got {values!r}")
    return [float(v) for v in values]


def validate_preset(preset: Any) -> dict[str, Any]:
    """Check a preset's kind and parameters.

    Returns:
        A normalised copy (numbers as floats, defaults filled in), JSON-able.

    Raises:
        PresetError: unknown kind, wrong types, ``width <= 0``, ``low >= high``, ``std <= 0``...
    """
    if not isinstance(preset, dict) or preset.get("kind") not in KINDS:
        raise PresetError(f"a preset must be a mapping with 'kind' in {KINDS}, got {preset!r}")
    kind = preset["kind"]
    if kind == "ct_window":
        width = _number(preset, "width")
        if width <= 0:
            raise PresetError(f"ct_window preset: width must be > 0 HU, got {width}")
        return {"kind": kind, "center": _number(preset, "center"), "width": width}
    if kind == "percentile":
        low, high = _number(preset, "low", 0.5), _number(preset, "high", 99.5)
        if not 0 <= low < high <= 100:
            raise PresetError(f"percentile preset: need 0 <= low < high <= 100, got low={low}, high={high}")
        return {"kind": kind, "low": low, "high": high}
    if kind == "minmax":
        return {"kind": kind}
    if kind == "clahe":
        tiles, clip = preset.get("tiles", 8), _number(preset, "clip", 0.01)
        if isinstance(tiles, bool) or not isinstance(tiles, int) or not 1 <= tiles <= 64:
            raise PresetError(f"clahe preset: tiles must be an integer from 1 to 64, got {tiles!r}")
        if not 0 < clip <= 1:
            raise PresetError(f"clahe preset: clip must be in (0, 1], got {clip}")
        checked = {"kind": kind, "tiles": tiles, "clip": clip}
        if "scale" in preset:
            checked["scale"] = _number(preset, "scale")
        return checked
    mean, std = _numbers(preset, "mean"), _numbers(preset, "std")
    if len(mean) != len(std):
        raise PresetError(f"rgb_meanstd preset: {len(mean)} means but {len(std)} standard deviations")
    if any(v <= 0 for v in std):
        raise PresetError(f"rgb_meanstd preset: std must be > 0, got {std}")
    checked: dict[str, Any] = {"kind": kind, "mean": mean, "std": std}
    if "scale" in preset:
        checked["scale"] = _number(preset, "scale")
    return checked


def _unit_range(data: np.ndarray, low: float, high: float) -> np.ndarray:
    if not high - low > 1e-6:  # constant image: zeros rather than a division by zero
        return np.zeros_like(data)
    scaled = (np.clip(data, low, high) - low) / (high - low)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)  # float32 rounding can land a hair above 1


def _rgb_scale(data: np.ndarray, source_dtype: str | None) -> float:
    if source_dtype in EIGHT_BIT_SOURCES:
        return 1 / 255
    if source_dtype in ("uint16", "int16"):
        return 1 / 65535
    return 1.0 if data.size and float(data.max()) <= 1.0 else 1 / 255


def apply_preset(image: np.ndarray, preset: dict[str, Any], source_dtype: str | None = None) -> np.ndarray:
    """Normalise one image.

    Args:
        image: ``[C, H, W]`` raw values (HU for DICOM/NIfTI CT, grey levels or colour otherwise).
        preset: see the module docstring; an empty dict means ``percentile``.
        source_dtype: the source file's pixel type (``ImageRecord.meta["dtype"]``, e.g. ``"uint8"``); 8-bit CT
            is scaled by 1/255, not windowed, and it picks the ``rgb_meanstd`` scale.

    Returns:
        ``[C, H, W]`` float32.

    Raises:
        PresetError: a bad preset. DataError: NaN/Inf pixels.
    """
    preset = validate_preset(preset or PERCENTILE)
    data = np.asarray(image, dtype=np.float32)
    if data.size and not np.isfinite(data).all():
        raise DataError("the image holds NaN or Inf values; fix the file before normalising it")
    kind = preset["kind"]
    if kind == "ct_window":
        if source_dtype in EIGHT_BIT_SOURCES:
            return (data / 255.0).astype(np.float32)
        low = preset["center"] - preset["width"] / 2
        return _unit_range(data, low, low + preset["width"])
    if kind == "percentile":
        if data.size == 0:
            return data
        low, high = np.percentile(data, [preset["low"], preset["high"]])
        return _unit_range(data, float(low), float(high))
    if kind == "minmax":
        return _unit_range(data, float(data.min()), float(data.max())) if data.size else data
    scale = preset.get("scale", _rgb_scale(data, source_dtype))
    if kind == "clahe":
        unit = np.clip(data * scale, 0.0, 1.0)
        equalised = np.stack([clahe(channel, preset["tiles"], preset["clip"]) for channel in unit])
        return ((equalised - 0.5) / 0.29).astype(np.float32)
    channels = data.shape[0]
    mean, std = np.asarray(preset["mean"], np.float32), np.asarray(preset["std"], np.float32)
    if len(mean) != channels:  # a grey image under an RGB preset: the channel means, repeated
        mean, std = np.full(channels, mean.mean(), np.float32), np.full(channels, std.mean(), np.float32)
    return ((data * scale - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


def clahe(image: np.ndarray, tiles: int = 8, clip: float = 0.01) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of one ``[H, W]`` image in [0, 1] → [0, 1] (see the
    ``clahe`` preset). Tiles are ``ceil(H / tiles)`` × ``ceil(W / tiles)`` pixels of the image padded by reflection;
    each tile's 256-bin histogram is clipped at ``max(1, clip × its pixels)``, the excess spread over every bin, and
    its cumulative share maps grey levels; a pixel takes the bilinear blend of the mappings of the four tiles whose
    centres surround it (the nearest ones at the border)."""
    height, width = image.shape
    if height == 0 or width == 0:
        return image.astype(np.float32)
    tile_h, tile_w = -(-height // tiles), -(-width // tiles)
    padded = np.pad(image, ((0, tile_h * tiles - height), (0, tile_w * tiles - width)), mode="reflect"
                    if height > 1 and width > 1 else "edge")
    levels = np.minimum((padded * CLAHE_BINS).astype(np.int64), CLAHE_BINS - 1)
    blocks = levels.reshape(tiles, tile_h, tiles, tile_w).transpose(0, 2, 1, 3).reshape(tiles * tiles, -1)
    offsets = np.arange(tiles * tiles)[:, None] * CLAHE_BINS
    histograms = np.bincount((blocks + offsets).ravel(), minlength=tiles * tiles * CLAHE_BINS)
    histograms = histograms.reshape(tiles * tiles, CLAHE_BINS).astype(np.float64)
    limit = max(1.0, clip * blocks.shape[1])
    excess = np.maximum(histograms - limit, 0).sum(1, keepdims=True)
    histograms = np.minimum(histograms, limit) + excess / CLAHE_BINS
    mappings = (np.cumsum(histograms, 1) / blocks.shape[1]).reshape(tiles, tiles, CLAHE_BINS)
    # Each pixel's position in tile-centre coordinates: tile i's centre is at (i + 0.5) tile sizes.
    y = np.clip((np.arange(height) + 0.5) / tile_h - 0.5, 0, tiles - 1)
    x = np.clip((np.arange(width) + 0.5) / tile_w - 0.5, 0, tiles - 1)
    y0, x0 = np.minimum(y.astype(np.int64), tiles - 2 if tiles > 1 else 0), np.minimum(x.astype(np.int64),
                                                                                      tiles - 2 if tiles > 1 else 0)
    y1, x1 = np.minimum(y0 + 1, tiles - 1), np.minimum(x0 + 1, tiles - 1)
    wy, wx = (y - y0)[:, None], (x - x0)[None, :]
    grey = levels[:height, :width]
    top = mappings[y0[:, None], x0[None, :], grey] * (1 - wx) + mappings[y0[:, None], x1[None, :], grey] * wx
    bottom = mappings[y1[:, None], x0[None, :], grey] * (1 - wx) + mappings[y1[:, None], x1[None, :], grey] * wx
    return np.clip(top * (1 - wy) + bottom * wy, 0.0, 1.0).astype(np.float32)

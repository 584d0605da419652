"""Intensity presets: how raw pixel values of a modality become network inputs. A preset is a plain JSON-able dict
stored in each adapter's metadata and reapplied automatically at prediction.

Kinds:

* ``ct_window`` — ``{"center": 40, "width": 400}`` in Hounsfield units: clip to the window, scale to [0, 1]. Images
  whose source is 8-bit (already-windowed JPEG/PNG CT, e.g. COVID19 MedSeg) are *not* re-windowed: they are in
  display units, not HU, so they are scaled by 1/255 instead (``apply_preset(..., source_dtype="uint8")``).
* ``percentile`` — ``{"low": 0.5, "high": 99.5}``: per-image percentiles to [0, 1] (MRI, X-ray, ultrasound, EM:
  arbitrary scanner units or 8/16-bit grey levels).
* ``rgb_meanstd`` — ``{"mean": [...], "std": [...]}``: scale by ``scale`` (default 1/255), then per-channel
  ``(x - mean) / std`` (fundus, dermoscopy, endoscopy: 8-bit colour photographs).

A constant image maps to zeros (no division by zero).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ConfigError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

ALIASES = {
    "x-ray": "xray", "cxr": "xray", "radiograph": "xray", "mr": "mri", "em": "electron_microscopy",
    "microscopy": "electron_microscopy", "us": "ultrasound", "dermatoscopy": "dermoscopy",
    "colonoscopy": "endoscopy", "retina": "fundus",
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "ct": {"kind": "ct_window", "center": 40.0, "width": 400.0},
    "mri": {"kind": "percentile", "low": 0.5, "high": 99.5},
    "xray": {"kind": "percentile", "low": 0.5, "high": 99.5},
    "ultrasound": {"kind": "percentile", "low": 0.5, "high": 99.5},
    "electron_microscopy": {"kind": "percentile", "low": 0.5, "high": 99.5},
    "fundus": {"kind": "rgb_meanstd", "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "scale": 1 / 255},
    "dermoscopy": {"kind": "rgb_meanstd", "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "scale": 1 / 255},
    "endoscopy": {"kind": "rgb_meanstd", "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "scale": 1 / 255},
}
KINDS = ("ct_window", "percentile", "rgb_meanstd")


def canonical_modality(modality: str) -> str:
    name = modality.strip().lower()
    return ALIASES.get(name, name)


def default_preset(modality: str) -> dict[str, Any]:
    """The preset used for ``modality`` unless told otherwise (percentile for unknown modalities)."""
    preset = DEFAULTS.get(canonical_modality(modality), {"kind": "percentile", "low": 0.5, "high": 99.5})
    return {key: (list(value) if isinstance(value, list) else value) for key, value in preset.items()}


def _number(preset: dict, key: str, default: float | None = None) -> float:
    value = preset.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ConfigError(f"preset {preset.get('kind')!r}: {key} must be a finite number, got {value!r}")
    return float(value)


def validate_preset(preset: Any) -> dict[str, Any]:
    """Check a preset's kind and parameters; returns it unchanged or raises :class:`ConfigError`."""
    if not isinstance(preset, dict) or preset.get("kind") not in KINDS:
        raise ConfigError(f"preset must be a mapping with kind in {KINDS}, got {preset!r}")
    kind = preset["kind"]
    if kind == "ct_window":
        _number(preset, "center")
        if _number(preset, "width") <= 0:
            raise ConfigError("ct_window preset: width must be > 0 HU")
    elif kind == "percentile":
        low, high = _number(preset, "low", 0.5), _number(preset, "high", 99.5)
        if not 0 <= low < high <= 100:
            raise ConfigError(f"percentile preset: need 0 <= low < high <= 100, got {low}, {high}")
    else:
        for key in ("mean", "std"):
            values = preset.get(key)
            if not isinstance(values, list) or not values or not all(isinstance(v, (int, float)) for v in values):
                raise ConfigError(f"rgb_meanstd preset: {key} must be a list of numbers")
        if any(v <= 0 for v in preset["std"]):
            raise ConfigError("rgb_meanstd preset: std must be > 0")
        _number(preset, "scale", 1 / 255)
    return preset


def apply_preset(image: np.ndarray, preset: dict[str, Any], source_dtype: str | None = None) -> np.ndarray:
    """Normalise one image.

    Args:
        image: ``[C, H, W]`` raw values (HU for CT volumes/DICOM, grey levels or colour otherwise).
        preset: see the module docstring; an empty dict means ``percentile``.
        source_dtype: the file's pixel type (``"uint8"``...); 8-bit CT is scaled by 1/255, not windowed.

    Returns:
        ``[C, H, W]`` float32.
    """
    preset = preset or {"kind": "percentile", "low": 0.5, "high": 99.5}
    validate_preset(preset)
    data = np.asarray(image, dtype=np.float32)
    kind = preset["kind"]
    if kind == "ct_window":
        if source_dtype == "uint8":
            return data / 255.0
        low = preset["center"] - preset["width"] / 2
        return ((np.clip(data, low, low + preset["width"]) - low) / preset["width"]).astype(np.float32)
    if kind == "percentile":
        low, high = np.percentile(data, [preset.get("low", 0.5), preset.get("high", 99.5)])
        if high - low < 1e-6:
            return np.zeros_like(data)
        return ((np.clip(data, low, high) - low) / (high - low)).astype(np.float32)
    scale = float(preset.get("scale", 1 / 255))
    mean = np.asarray(preset["mean"], dtype=np.float32)
    std = np.asarray(preset["std"], dtype=np.float32)
    channels = data.shape[0]
    if channels != len(mean):
        mean = np.resize(mean, channels) if len(mean) > 1 else np.full(channels, mean[0])
        std = np.resize(std, channels) if len(std) > 1 else np.full(channels, std[0])
    return ((data * scale - mean[:, None, None]) / std[:, None, None]).astype(np.float32)

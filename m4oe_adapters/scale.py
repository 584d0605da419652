"""Scale harmonisation: every adapter records the scale it was trained at, and prediction resamples each input to
that scale, then the mask back to the input's grid.

Sites differ in pixel size more than in anything else (DRIVE is 565 px wide, CHASE_DB1 999, HRF 3504), and an
adapter trained on native-resolution crops sees vessels/polyps of the training site's size only. A scale is a small
mapping stored in the adapter's provenance::

    {"kind": "fov_diameter_px", "value": 541.0, "images": 20}   # photographs: the field-of-view disc, measured
    {"kind": "pixel_spacing_mm", "value": 0.78, "images": 96}   # volumes/DICOM: in-plane spacing from the header
    {"kind": "pixel_size", "value": 0.01, "images": 0}          # given by the user (--pixel-size, any unit)

    input → measure its scale (same kind) → factor = how much to enlarge it → resample → predict → mask back

Training resamples alike: a ``crop`` adapter's training images are each resampled to the scale it records
(:class:`~m4oe_adapters.data.SegmentationDataset` ``scale``), the first training site's when there are several, and
``--init`` keeps the starting adapter's scale (:func:`~m4oe_adapters.adapt.fit_modality`).

The factor is ``recorded / measured`` for a field-of-view diameter (a disc twice as wide is shrunk by half) and
``measured / recorded`` for a pixel size (pixels twice as large are enlarged twice).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError

FOV_DIAMETER = "fov_diameter_px"
PIXEL_SPACING = "pixel_spacing_mm"
PIXEL_SIZE = "pixel_size"
KINDS = (FOV_DIAMETER, PIXEL_SPACING, PIXEL_SIZE)
MODALITY_KIND = {"fundus": FOV_DIAMETER, "CT": PIXEL_SPACING, "MRI": PIXEL_SPACING}
MIN_FACTOR, MAX_FACTOR = 1 / 8, 8.0  # beyond this a measurement is more likely wrong than the site that different
NEGLIGIBLE = 0.05  # factors within 5% of 1 are not worth a resampling (and its blur)


def fov_diameter_px(raw: np.ndarray) -> float:
    """Diameter in pixels of a fundus photograph's circular field of view.

    ``raw``: ``[C, H, W]`` (any dtype; channel 0 is red for RGB). The field of view is the largest connected region
    brighter than 10% of the red channel's 99th percentile (holes filled); its diameter is the larger of its
    equivalent diameter ``2·sqrt(area/π)`` and its widest row (cameras often cut the disc at top and bottom, which
    shrinks the area but not the width).

    Raises:
        DataError: no bright region (not a fundus photograph, or a blank image).
    """
    from scipy import ndimage

    channel = np.asarray(raw, dtype=np.float32)
    channel = channel[0] if channel.ndim == 3 else channel
    high = float(np.percentile(channel, 99))
    if high <= 0:
        raise DataError("cannot measure the field of view: the image is blank")
    bright = channel > 0.1 * high
    bright = ndimage.binary_opening(bright, iterations=2)
    components, count = ndimage.label(bright)
    if count == 0:
        raise DataError("cannot measure the field of view: no bright region")
    sizes = ndimage.sum(bright, components, index=range(1, count + 1))
    disc = ndimage.binary_fill_holes(components == (int(np.argmax(sizes)) + 1))
    equivalent = 2.0 * np.sqrt(disc.sum() / np.pi)
    widest = float(disc.sum(axis=1).max())
    return float(max(equivalent, widest))


def pixel_spacing_mm(meta: dict[str, Any] | None) -> float | None:
    """Mean in-plane pixel spacing in mm from a reader's ``meta["spacing"]`` (NIfTI affine, DICOM PixelSpacing);
    ``None`` when the header has none."""
    spacing = (meta or {}).get("spacing")
    if not spacing:
        return None
    values = [float(v) for v in spacing[:2] if float(v) > 0]
    return float(np.mean(values)) if values else None


def measure(kind: str, raw: np.ndarray, meta: dict[str, Any] | None = None, pixel_size: float | None = None
            ) -> float | None:
    """The scale of one raw ``[C, H, W]`` image in ``kind``'s unit; ``None`` when it cannot be known (no header
    spacing, no user ``pixel_size``). ``pixel_size`` (the user's ``--pixel-size``) wins over any measurement."""
    if kind not in KINDS:
        raise ConfigError(f"unknown scale kind {kind!r}; expected one of {KINDS}")
    if pixel_size is not None and kind in (PIXEL_SIZE, PIXEL_SPACING):
        return float(pixel_size)
    if kind == FOV_DIAMETER:
        return fov_diameter_px(raw)
    if kind == PIXEL_SPACING:
        return pixel_spacing_mm(meta)
    return None


def measure_samples(samples: Sequence, kind: str, limit: int = 32, pixel_size: float | None = None
                    ) -> dict[str, Any] | None:
    """The scale an adapter trained on ``samples`` records: the median over up to ``limit`` of their images
    (evenly spread), or ``None`` when none can be measured. Unreadable images are left out."""
    from .data import read_image

    if kind == PIXEL_SIZE:
        return None if pixel_size is None else {"kind": kind, "value": float(pixel_size), "images": 0}
    images = sorted({(str(s.image), getattr(s, "slice_index", None), getattr(s, "slice_axis", 2)) for s in samples})
    if kind == PIXEL_SPACING:  # one header per file: the slices of a volume share its spacing
        images = sorted({path: (path, index, axis) for path, index, axis in images}.values())
    if len(images) > limit:
        images = [images[round(i * (len(images) - 1) / (limit - 1))] for i in range(limit)]
    values = []
    for path, slice_index, axis in images:
        try:
            record = read_image(path, slice_axis=axis, slice_index=slice_index)
            value = measure(kind, record.array, record.meta, pixel_size)
        except DataError:
            continue
        if value is not None:
            values.append(value)
    if not values:
        return None
    return {"kind": kind, "value": float(np.median(values)), "images": len(values)}


def scale_for_modality(modality: str, samples: Sequence, pixel_size: float | None = None) -> dict[str, Any] | None:
    """What :func:`m4oe_adapters.adapt.fit_modality` records: the user's pixel size if given, else the modality's
    measurable kind (fundus: field of view; CT/MRI: header spacing), else ``None`` (no harmonisation)."""
    if pixel_size is not None:
        return {"kind": PIXEL_SIZE, "value": float(pixel_size), "images": 0}
    kind = MODALITY_KIND.get(modality)
    return measure_samples(samples, kind) if kind else None


def parse_scale(text: str) -> dict[str, Any]:
    """``"fov_diameter_px:541"`` → ``{"kind": "fov_diameter_px", "value": 541.0}`` (CLI ``--adapter-scale``)."""
    kind, _, value = text.partition(":")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"--adapter-scale {text!r}: expected KIND:VALUE, e.g. fov_diameter_px:541") from None
    if kind not in KINDS or number <= 0:
        raise ConfigError(f"--adapter-scale {text!r}: KIND is one of {KINDS} and VALUE is positive")
    return {"kind": kind, "value": number}


def resampling_factor(recorded: dict[str, Any] | None, raw: np.ndarray, meta: dict[str, Any] | None = None,
                      pixel_size: float | None = None) -> float:
    """How much to enlarge an input (``new size = factor × size``) so it matches the adapter's recorded scale.

    1.0 when the adapter recorded no scale, when the input's scale cannot be measured, or when the factor is within
    5% of 1. Clamped to [1/8, 8].
    """
    if not recorded:
        return 1.0
    kind, value = recorded["kind"], float(recorded["value"])
    try:
        measured = measure(kind, raw, meta, pixel_size)
    except DataError:
        return 1.0
    if measured is None or measured <= 0 or value <= 0:
        return 1.0
    factor = value / measured if kind == FOV_DIAMETER else measured / value
    factor = float(np.clip(factor, MIN_FACTOR, MAX_FACTOR))
    return 1.0 if abs(factor - 1.0) < NEGLIGIBLE else factor


def resample(image: torch.Tensor, factor: float) -> torch.Tensor:
    """``[C, H, W]`` enlarged by ``factor`` (area averaging when shrinking, bilinear when enlarging): how an input
    is brought to an adapter's scale, at prediction and at training (:class:`~m4oe_adapters.data.SegmentationDataset`
    ``scale``)."""
    height, width = image.shape[-2:]
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    return F.interpolate(image[None], size=size, mode="area" if factor < 1 else "bilinear",
                         **({} if factor < 1 else {"align_corners": False}))[0]


def predict_probabilities_at_scale(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    input_size: Sequence[int],
    resize_mode: str = "crop",
    *,
    scale: dict[str, Any] | None = None,
    raw: np.ndarray | None = None,
    meta: dict[str, Any] | None = None,
    pixel_size: float | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """``[K, H, W]`` class probabilities for a preprocessed ``[C, H, W]`` image, predicted at the adapter's recorded
    ``scale`` (measured on ``raw``, the image as read) and returned on the input's grid.

    Only ``crop`` adapters (native-resolution windows) are resampled: a ``resize`` adapter sees every image resized
    to its input size anyway. The class probabilities are resampled back (bilinear), so the mask on the input's grid
    has smooth edges.
    """
    from .evaluation import predict_probabilities
    from .inference import segment

    factor = 1.0
    if resize_mode == "crop" and scale:
        factor = resampling_factor(scale, raw if raw is not None else image.numpy(), meta, pixel_size)
    if factor == 1.0:
        return predict_probabilities(predictor, image, input_size, resize_mode, progress)
    height, width = image.shape[-2:]
    _, probabilities = segment(predictor, resample(image, factor), input_size)
    return F.interpolate(probabilities[None], size=(height, width), mode="bilinear", align_corners=False)[0]


def predict_mask_at_scale(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    input_size: Sequence[int],
    resize_mode: str = "crop",
    *,
    threshold: float | str | None = None,
    **options,
) -> torch.Tensor:
    """``[H, W]`` class ids on the input's grid from :func:`predict_probabilities_at_scale` (``options``: its
    keyword arguments): the most probable class, or the foreground above ``threshold`` (two-class adapters)."""
    from .inference import mask_from_probabilities

    return mask_from_probabilities(
        predict_probabilities_at_scale(predictor, image, input_size, resize_mode, **options), threshold)

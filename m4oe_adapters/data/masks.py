"""Reading masks in every encoding the shared data uses, as ``[H, W]`` int64 class ids.

Encodings: ``binary255`` (0/255), ``binary01`` (0/1), ``onebit`` (PIL mode "1"), ``class_ids`` (0..K-1),
``jpeg`` (compression noise: foreground where > 127), ``invert255`` (255 = background, e.g. ISBI2012 membranes),
``rgb`` (colour-coded classes, ``palette={(r, g, b): class}``) and ``auto``:

* bool or {0, 1} → as is; {0, 255} → 0/1; RGB(A) whose colour channels are equal → the first channel, then again;
* a JPEG file → threshold at 127 (its values are noisy by nature);
* few distinct small integers (max < 64) → class ids;
* anything else → :class:`MaskError` (e.g. a PNG with 0/255 plus stray 37s: a resized or smoothed mask).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ImageReadError, MaskError
from .readers import read_hdf5, read_pil, read_volume, suffix, take_slice

ENCODINGS = ("auto", "binary255", "binary01", "onebit", "class_ids", "jpeg", "invert255", "rgb")


def decode_mask(values: np.ndarray, encoding: str, path: Path, palette: dict | None = None) -> np.ndarray:
    """Class ids ``[H, W]`` from raw mask values ``[H, W]`` or ``[H, W, C]``."""
    if encoding not in ENCODINGS:
        raise MaskError(f"{path}: unknown mask encoding {encoding!r}; use one of {ENCODINGS}")
    data = np.asarray(values)
    if encoding == "rgb":
        if data.ndim != 3 or not palette:
            raise MaskError(f"{path}: rgb encoding needs an RGB mask and a palette")
        result = np.zeros(data.shape[:2], dtype=np.int64)
        matched = np.zeros(data.shape[:2], dtype=bool)
        for colour, class_id in palette.items():
            hit = np.all(data[..., : len(colour)] == np.asarray(colour), axis=-1)
            result[hit], matched = class_id, matched | hit
        if not matched.all():
            raise MaskError(f"{path}: {int((~matched).sum())} pixels have colours outside the palette")
        return result
    if data.ndim == 3:
        colour = data[..., :3] if data.shape[-1] >= 3 else data[..., :1]
        if encoding != "jpeg" and not np.all(colour == colour[..., :1]):
            raise MaskError(f"{path}: a colour mask with different channels; give encoding 'rgb' and a palette")
        data = colour.mean(axis=-1) if encoding == "jpeg" else colour[..., 0]
    if encoding == "auto":
        encoding = guess_encoding(data, path)
    if encoding == "jpeg":
        return (data > 127).astype(np.int64)
    unique = np.unique(data)
    if encoding in ("binary01", "onebit"):
        if not set(unique.tolist()) <= {0, 1}:
            raise MaskError(f"{path}: values {unique[:8].tolist()} in a 0/1 mask")
        return data.astype(np.int64)
    if encoding in ("binary255", "invert255"):
        if not set(unique.tolist()) <= {0, 255}:
            raise MaskError(f"{path}: values {unique[:8].tolist()} in a 0/255 mask (a JPEG? use encoding 'jpeg')")
        ones = (data == 255).astype(np.int64)
        return 1 - ones if encoding == "invert255" else ones
    if not np.allclose(data, np.round(data)) or unique.min() < 0 or unique.max() > 1023:
        raise MaskError(f"{path}: class ids must be integers in 0..1023, found {unique[:8].tolist()}")
    return data.astype(np.int64)


def guess_encoding(data: np.ndarray, path: Path) -> str:
    if data.dtype == bool:
        return "binary01"
    if suffix(path) in (".jpg", ".jpeg"):
        return "jpeg"
    unique = set(np.unique(data).tolist())
    if unique <= {0, 1}:
        return "binary01"
    if unique <= {0, 255}:
        return "binary255"
    if len(unique) <= 64 and max(unique) < 64 and all(float(v).is_integer() for v in unique):
        return "class_ids"
    raise MaskError(
        f"{path}: cannot tell the mask encoding from values {sorted(unique)[:10]}...; pass an explicit encoding"
    )


def read_mask(
    path: str | Path,
    *,
    encoding: str = "auto",
    slice_axis: int = 2,
    slice_index: int | None = None,
    palette: dict | None = None,
) -> np.ndarray:
    """``[H, W]`` int64 class ids from a mask file (PNG/JPG/TIF/BMP/GIF, NIfTI/NRRD slice, HDF5 ``label``)."""
    path = Path(path)
    if not path.is_file():
        raise MaskError(f"{path}: mask file not found")
    kind = suffix(path)
    try:
        if kind in (".h5", ".hdf5"):
            values = read_hdf5(path, "label")
            values = take_slice(values, path, 0, slice_index) if values.ndim == 3 else values
        elif kind in (".nii", ".nii.gz", ".nrrd"):
            volume, _ = read_volume(path)
            values = take_slice(volume, path, slice_axis, slice_index)
        else:
            values, _ = read_pil(path)
    except ImageReadError as error:
        raise MaskError(str(error)) from None
    return decode_mask(values, encoding, path, palette)


def check_pair(image_shape: tuple[int, ...], mask: np.ndarray, image_path: Path, mask_path: Path) -> None:
    """Image ``[C, H, W]`` and mask ``[H, W]`` must cover the same pixels."""
    if tuple(image_shape[-2:]) != tuple(mask.shape):
        raise MaskError(
            f"{mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} but image {image_path} is "
            f"{image_shape[-2]}x{image_shape[-1]} (H x W); they must match pixel for pixel"
        )

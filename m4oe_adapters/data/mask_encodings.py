"""Mask value encodings: raw mask values → ``[H, W]`` int64 class ids (0 = background).

Encodings:

* ``binary255``: values {0, 255}, 255 = foreground (DRIVE, BUSI, HC18, COVID19 CT, CXR imlab).
* ``binary01`` / ``onebit``: values {0, 1} or a 1-bit image (PIL mode "1", CHASE_DB1, PH2), 1 = foreground.
* ``class_ids``: integers 0..K-1 as stored (ACDC h5, NIfTI/NRRD label volumes), at most 1023.
* ``jpeg``: a JPEG-compressed binary mask: foreground where the grey level (mean of the colour channels) > 127.
* ``invert255``: {0, 255} with 255 = background (ISBI2012: 0 = membrane, the foreground).
* ``rgb``: colour-coded classes, ``palette={(r, g, b): class_id}``; a colour outside the palette is an error.
* ``auto`` decides from the file and its values, in this order:

  1. a colour mask whose channels are all equal is read as grey (its first channel); one with differing
     channels needs ``rgb`` and a palette (error otherwise);
  2. a ``.jpg``/``.jpeg`` file → ``jpeg`` (its values are noisy by nature);
  3. bool, or values within {0, 1} → ``binary01``;
  4. values within {0, 255} → ``binary255``;
  5. at most 64 distinct non-negative integers, all < 64 → ``class_ids``;
  6. anything else → :class:`MaskError` naming the file (e.g. a PNG with 0/255 plus stray 37s: a resized,
     smoothed or re-encoded mask that would silently gain a class).

Reading mask files (and the datasets that bring their own encoding) is :mod:`.masks`; this module imports no other
mask code, so dataset-specific readers (:mod:`.known_datasets`) can decode values without an import cycle.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import MaskError
from .readers import suffix

ENCODINGS = ("auto", "binary255", "binary01", "onebit", "class_ids", "jpeg", "invert255", "rgb")


def decode_mask(values: np.ndarray, encoding: str, path: Path, palette: dict | None = None) -> np.ndarray:
    """Class ids ``[H, W]`` int64 from raw mask values ``[H, W]`` or ``[H, W, C]`` (``path`` is for messages)."""
    if encoding not in ENCODINGS:
        raise MaskError(f"{path}: unknown mask encoding {encoding!r}; use one of {ENCODINGS}")
    data = np.asarray(values)
    if encoding == "auto" and suffix(Path(path)) in (".jpg", ".jpeg"):
        encoding = "jpeg"  # colour JPEG masks have chroma noise: their channels never agree exactly
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
            raise MaskError(
                f"{path}: values {unique[:8].tolist()} in a 0/1 mask; pass the right encoding "
                f"('binary255', 'class_ids', 'jpeg'...)"
            )
        return data.astype(np.int64)
    if encoding in ("binary255", "invert255"):
        if not set(unique.tolist()) <= {0, 255}:
            raise MaskError(
                f"{path}: values {unique[:8].tolist()} in a 0/255 mask: a resized or re-encoded mask? "
                f"Re-export it with nearest-neighbour resizing, or use encoding 'jpeg' to threshold at 127"
            )
        ones = (data == 255).astype(np.int64)
        return 1 - ones if encoding == "invert255" else ones
    if not np.allclose(data, np.round(data)) or unique.min() < 0 or unique.max() > 1023:
        raise MaskError(f"{path}: class ids must be integers in 0..1023, found {unique[:8].tolist()}")
    return data.astype(np.int64)


def guess_encoding(data: np.ndarray, path: Path) -> str:
    """The ``auto`` rule of the module docstring, for grey ``[H, W]`` values."""
    if data.dtype == bool:
        return "binary01"
    if suffix(path) in (".jpg", ".jpeg"):
        return "jpeg"
    unique = set(np.unique(data).tolist())
    if unique <= {0, 1}:
        return "binary01"
    if unique <= {0, 255}:
        return "binary255"
    if len(unique) <= 64 and 0 <= min(unique) and max(unique) < 64 and all(float(v).is_integer() for v in unique):
        return "class_ids"
    raise MaskError(
        f"{path}: cannot tell the mask encoding from values {sorted(unique)[:10]}...; pass an explicit encoding"
    )

"""Reading masks in every encoding the shared data uses, as ``[H, W]`` int64 class ids (0 = background): the
value encodings are in :mod:`.mask_encodings`; datasets in :data:`~.known_datasets.KNOWN_DATASETS` bring their own
encoding or reader (``read_mask(..., dataset=...)``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ImageReadError, MaskError
from .mask_encodings import decode_mask
from .readers import ImageRecord, read_hdf5, read_pil, read_volume, suffix, take_slice


def read_mask(
    path: str | Path,
    *,
    encoding: str = "auto",
    image_record: ImageRecord | None = None,
    dataset: str | None = None,
    slice_axis: int | None = None,
    slice_index: int | None = None,
    palette: dict | None = None,
) -> np.ndarray:
    """``[H, W]`` int64 class ids from a mask file.

    Args:
        path: PNG/JPG/TIF/BMP/GIF, a NIfTI/NRRD volume (with ``slice_index``) or an HDF5 file's ``label`` dataset.
        encoding: see the module docstring; ``"auto"`` defers to ``dataset``'s known encoding, then guesses.
        image_record: the image this mask belongs to: the mask must have its H, W, and datasets with their own
            mask reader (CXR crops, DICOM ↔ NRRD) need it.
        dataset: a manifest ``dataset`` name, looked up in ``KNOWN_DATASETS``.
        slice_axis, slice_index: which slice of a volume (default axis: 2 for NIfTI/NRRD, 0 for HDF5).
        palette: ``{(r, g, b): class_id}`` for ``encoding="rgb"``.

    Raises:
        MaskError: missing/unreadable file, unexpected values, or a size different from ``image_record``'s.
    """
    from .known_datasets import KNOWN_DATASETS

    path = Path(path)
    if not path.is_file():
        raise MaskError(f"{path}: mask file not found")
    quirks = KNOWN_DATASETS.get(dataset or "", {})
    if "mask_reader" in quirks and encoding == "auto":
        if image_record is None:
            raise MaskError(f"{path}: masks of dataset {dataset} are built with their image; pass image_record")
        mask = quirks["mask_reader"](path, image_record)
    else:
        if encoding == "auto":
            encoding = quirks.get("encoding", "auto")
        kind = suffix(path)
        try:
            if kind in (".h5", ".hdf5"):
                values = take_slice(read_hdf5(path, "label"), path, 0 if slice_axis is None else slice_axis, slice_index)
            elif kind in (".nii", ".nii.gz", ".nrrd"):
                values = take_slice(read_volume(path)[0], path, 2 if slice_axis is None else slice_axis, slice_index)
            else:
                values, _ = read_pil(path)
        except ImageReadError as error:
            raise MaskError(str(error)) from None
        mask = decode_mask(values, encoding, path, palette)
    if image_record is not None:
        check_pair(image_record.array.shape, mask, Path(image_record.meta.get("source", "<memory>")), path)
    return mask


def check_pair(image_shape: tuple[int, ...], mask: np.ndarray, image_path: Path, mask_path: Path | None) -> None:
    """Image ``[C, H, W]`` and mask ``[H, W]`` must cover the same pixels; :class:`MaskError` names both files."""
    if tuple(image_shape[-2:]) != tuple(mask.shape):
        raise MaskError(
            f"{mask_path}: mask is {'x'.join(map(str, mask.shape))} but image {image_path} is "
            f"{image_shape[-2]}x{image_shape[-1]} (H x W); they must match pixel for pixel (a resized or "
            f"mispaired mask?)"
        )

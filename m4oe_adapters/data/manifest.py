"""Samples: which image goes with which mask, from a manifest CSV or from image/mask folders.

A manifest has columns ``dataset, modality, site, image, mask`` (paths relative to the CSV's folder), optionally
``split_hint``, ``mask_encoding`` and ``slice_index``. Datasets whose masks need more than an encoding (pasting
crops, matching a DICOM slice to a label volume) are handled by :data:`~.known_datasets.KNOWN_DATASETS`, keyed by the
``dataset`` column. 3D volumes (NIfTI, NRRD, HDF5 ``[Z, H, W]``) become one sample per slice.

The shared data folder is ``$M4OE_DATA``, else ``../shared/data`` (from the working directory), else the
repository's sibling ``shared/data`` (:func:`data_root`).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import DataError
from .errors import ManifestError, MaskError
from .known_datasets import KNOWN_DATASETS
from .masks import read_mask
from .readers import IMAGE_SUFFIXES_ALL, hdf5_shape, read_hdf5, read_image, read_volume, suffix, through_plane_axis

REQUIRED_COLUMNS = ("dataset", "modality", "site", "image", "mask")
# Mask-name endings stripped (case-insensitively) before pairing with an image of the same stem.
MASK_SUFFIXES = (
    "_mask", "-mask", "_manual1", "_manual2", "_1stho", "_2ndho", "_lesion", "_annotation", "_seg-manual", "_seg",
    "_segmentation", "_label", "_labels", "_gt",
)
# Image-name endings stripped when no mask has the image's exact stem (DRIVE: 21_training.tif ↔ 21_manual1.gif).
IMAGE_SUFFIXES_TO_STRIP = ("_training", "_test", "_image", "_img")
DATA_ENV = "M4OE_DATA"


def data_root() -> Path:
    """The shared data folder: ``$M4OE_DATA``, else ``../shared/data`` if it exists, else ``<repo>/../shared/data``
    (which may not exist; callers check and skip or explain)."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    relative = Path("..") / "shared" / "data"
    if relative.is_dir():
        return relative.resolve()
    return Path(__file__).resolve().parents[3] / "shared" / "data"


@dataclass(frozen=True)
class Sample:
    """One labelled 2D image, or one slice of a volume (``slice_index`` along ``slice_axis``).

    ``image`` and ``mask`` are absolute paths (``mask`` is None for unlabelled images); ``mask_encoding`` is one of
    :data:`~.mask_encodings.ENCODINGS` (``"auto"``: the dataset's known encoding, else guessed).
    """

    dataset: str
    modality: str
    site: str
    image: Path
    mask: Path | None
    split_hint: str = ""
    mask_encoding: str = "auto"
    slice_index: int | None = None
    slice_axis: int = 2


# ---------------------------------------------------------------------------------------------- reading pairs
def load_pair(sample: Sample) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(image [C, H, W] float32 raw, mask [H, W] int64, meta)`` of one sample, checked to cover the same pixels.

    Raises:
        ImageReadError, MaskError: unreadable files, unexpected mask values, size mismatch (naming both files).
    """
    record = read_image(sample.image, slice_axis=sample.slice_axis, slice_index=sample.slice_index)
    if sample.mask is None:
        raise MaskError(f"{sample.image}: this sample has no mask; give one in the manifest or the mask folder")
    mask = read_mask(
        sample.mask, encoding=sample.mask_encoding, image_record=record, dataset=sample.dataset,
        slice_axis=sample.slice_axis, slice_index=sample.slice_index,
    )
    return record.array, mask, record.meta


# ---------------------------------------------------------------------------------------------- manifests
def read_manifest(
    csv_path: str | Path, *, expand_volumes: bool = True, nonempty_slices: bool = False, slice_axis: int | None = None
) -> list[Sample]:
    """Samples of a manifest CSV (absolute paths); 3D volumes become one sample per slice along ``slice_axis``
    (see :func:`expand_volume`): every slice, as the command line does, or only slices whose mask has foreground
    when ``nonempty_slices`` (``--foreground-slices``).

    Raises:
        ManifestError: missing CSV or columns, or a row naming a missing file (with its line number).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ManifestError(f"{csv_path}: manifest not found")
    root = csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.DictReader(stream)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{csv_path}: missing columns {missing} (need {', '.join(REQUIRED_COLUMNS)})")
        rows = list(reader)
    samples: list[Sample] = []
    for line, row in enumerate(rows, start=2):
        if not row.get("image"):
            raise ManifestError(f"{csv_path}, line {line}: empty image column")
        image = (root / row["image"]).resolve()
        mask = (root / row["mask"]).resolve() if row.get("mask") else None
        if not image.is_file():
            raise ManifestError(f"{csv_path}, line {line}: image {image} does not exist")
        if mask is not None and not mask.is_file():
            raise ManifestError(f"{csv_path}, line {line}: mask {mask} does not exist")
        try:
            slice_index = int(row["slice_index"]) if row.get("slice_index") else None
        except ValueError:
            raise ManifestError(f"{csv_path}, line {line}: slice_index {row['slice_index']!r} is not an integer") from None
        sample = Sample(
            dataset=row["dataset"], modality=row["modality"], site=row["site"], image=image, mask=mask,
            split_hint=row.get("split_hint", "") or "", mask_encoding=row.get("mask_encoding") or "auto",
            slice_index=slice_index,
        )
        try:
            samples += expand_volume(sample, nonempty_slices, slice_axis) if expand_volumes else [sample]
        except DataError as error:
            raise ManifestError(f"{csv_path}, line {line}: {error}") from None
    return samples


def is_volume(sample: Sample) -> bool:
    """Whether the sample's image is a 3D volume that needs a slice index."""
    kind = suffix(sample.image)
    if kind in (".nii", ".nii.gz", ".nrrd"):
        return True
    if kind in (".h5", ".hdf5"):
        return len(hdf5_shape(sample.image, "image")) == 3
    return False


def expand_volume(sample: Sample, nonempty_slices: bool = True, slice_axis: int | None = None) -> list[Sample]:
    """One sample per slice of a 3D image (only slices whose mask is non-empty when ``nonempty_slices``); a 2D
    image or a sample that already has a slice index is returned as is.

    The slicing axis is ``slice_axis`` when given, else the dataset's known ``volume_axis``, else the volume's
    through-plane axis (:func:`~.readers.through_plane_axis`: coarsest spacing in the header; with isotropic or
    unknown spacing, as in HDF5, the axis with the fewest voxels)."""
    if sample.slice_index is not None or not is_volume(sample):
        return [sample]
    known = KNOWN_DATASETS.get(sample.dataset, {}).get("volume_axis")
    if suffix(sample.image) in (".h5", ".hdf5"):
        shape = hdf5_shape(sample.image, "image")
        axis = slice_axis if slice_axis is not None else known if known is not None else through_plane_axis(shape)
        labels = read_hdf5(sample.mask, "label") if sample.mask and nonempty_slices else None
    else:
        volume, affine = read_volume(sample.image)
        if volume.ndim == 2:
            return [sample]
        shape = volume.shape
        spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0).tolist()
        axis = slice_axis if slice_axis is not None else known if known is not None else through_plane_axis(shape, spacing)
        labels = (read_volume(sample.mask)[0] if nonempty_slices and sample.mask and suffix(sample.mask) == suffix(sample.image)
                  else None)
        if labels is not None and labels.shape != volume.shape:
            raise MaskError(f"{sample.mask}: label volume {labels.shape} differs from image {sample.image} {volume.shape}")
    if not 0 <= axis < len(shape):
        raise DataError(f"{sample.image}: slice axis {axis} does not exist in a volume of shape {tuple(shape)}")
    count = shape[axis]
    keep = range(count)
    if nonempty_slices and labels is not None:
        keep = [k for k in keep if np.take(labels, k, axis=axis).any()]
    return [replace(sample, slice_index=k, slice_axis=axis) for k in keep]


def strip_ending(stem: str, endings: Sequence[str]) -> str:
    """``stem`` without the first of ``endings`` it ends with (case-insensitive)."""
    for ending in endings:
        if stem.lower().endswith(ending.lower()):
            return stem[: -len(ending)]
    return stem


def mask_stem(name: str) -> str:
    """``"21_manual1"`` → ``"21"``: a mask's stem without its mask ending."""
    return strip_ending(name, MASK_SUFFIXES)


def samples_from_folders(
    image_dir: str | Path,
    mask_dir: str | Path | None,
    modality: str,
    site: str = "local",
    *,
    dataset: str = "folder",
    encoding: str = "auto",
    nonempty_slices: bool = True,
    slice_axis: int | None = None,
) -> list[Sample]:
    """Pair images and masks by file stem, tolerating mask endings such as ``_mask``, ``_manual1``, ``_1stHO``,
    ``_lesion``, ``_Annotation`` (case-insensitive) and image endings ``_training``/``_test``. Without
    ``mask_dir`` every image is an unlabelled sample. Volumes become one sample per slice.

    Raises:
        ManifestError: a missing folder, an image without a mask, or two masks claiming the same image.
    """
    image_dir = Path(image_dir).resolve()
    if not image_dir.is_dir():
        raise ManifestError(f"{image_dir}: image folder not found")
    images = sorted(p for p in image_dir.iterdir() if p.is_file() and suffix(p) in IMAGE_SUFFIXES_ALL)
    masks: dict[str, Path] = {}
    if mask_dir is not None:
        mask_dir = Path(mask_dir).resolve()
        if not mask_dir.is_dir():
            raise ManifestError(f"{mask_dir}: mask folder not found")
        for path in sorted(mask_dir.iterdir()):
            if path.is_file() and suffix(path) in IMAGE_SUFFIXES_ALL:
                stem = path.name[: -len(suffix(path))]
                if mask_dir == image_dir and mask_stem(stem) == stem:
                    continue  # one folder for both: only names with a mask ending are masks
                key = mask_stem(stem).lower()
                if key in masks:
                    raise ManifestError(f"{path} and {masks[key]} both pair with image stem {key!r}; keep one")
                masks[key] = path
        if mask_dir == image_dir:
            images = [p for p in images if p not in masks.values()]
    samples = []
    for image in images:
        stem = image.name[: -len(suffix(image))]
        mask = masks.get(stem.lower()) or masks.get(strip_ending(stem, IMAGE_SUFFIXES_TO_STRIP).lower())
        if mask_dir is not None and mask is None:
            raise ManifestError(f"{image}: no mask named like {stem}[_mask|_manual1|...] in {mask_dir}")
        samples.append(Sample(dataset, modality, site, image, mask, mask_encoding=encoding))
    return [piece for sample in samples for piece in expand_volume(sample, nonempty_slices, slice_axis)]


def select(samples: Sequence[Sample], *, modality: str | None = None, sites: Sequence[str] | None = None,
           split: str | None = None) -> list[Sample]:
    """Filter by modality (case-insensitive, aliases allowed), sites and split hint."""
    from ..presets import canonical_modality

    wanted = canonical_modality(modality) if modality else None
    return [
        s for s in samples
        if (wanted is None or canonical_modality(s.modality) == wanted)
        and (not sites or s.site in set(sites))
        and (split is None or s.split_hint == split)
    ]


def scan_samples(samples: Sequence[Sample], check: Callable[[Sample], Any] = load_pair):
    """``(good, bad)``: samples that read correctly, and ``(sample, message)`` for those that do not, so a folder
    run can skip and report bad files instead of stopping halfway. ``check`` defaults to :func:`load_pair`
    (reads everything once); only :class:`DataError` counts as bad, anything else is a bug and propagates."""
    good, bad = [], []
    for sample in samples:
        try:
            check(sample)
            good.append(sample)
        except DataError as error:
            bad.append((sample, str(error)))
    return good, bad

"""Samples: which image goes with which mask, from a manifest CSV or from image/mask folders.

A manifest has columns ``dataset, modality, site, image, mask, split_hint`` (paths relative to the CSV), optionally
``mask_encoding`` and ``slice_index``. Datasets whose masks need more than an encoding (pasting crops, matching a
DICOM slice to a label volume) are handled by :data:`KNOWN_DATASETS`, keyed by the ``dataset`` column.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import ManifestError, MaskError
from .masks import check_pair, decode_mask, read_mask
from .readers import IMAGE_SUFFIXES_ALL, ImageRecord, read_image, read_pil, read_volume, suffix

REQUIRED_COLUMNS = ("dataset", "modality", "site", "image", "mask")
MASK_SUFFIXES = ("_mask", "_manual1", "_1stHO", "_lesion", "_Annotation", "-mask", "_seg", "_label", "_gt")


@dataclass(frozen=True)
class Sample:
    """One labelled 2D image (or one slice of a volume)."""

    dataset: str
    modality: str
    site: str
    image: Path
    mask: Path | None
    split_hint: str = ""
    mask_encoding: str = "auto"
    slice_index: int | None = None
    slice_axis: int = 2


# ---------------------------------------------------------------------------------------------- dataset quirks
def cxr_both_lungs(sample: Sample, image: ImageRecord) -> np.ndarray:
    """GeneralBlockchain CXR: left and right lung masks are RGBA crops pasted at offsets (lung_masks_index.csv)."""
    index_path = sample.image.parent.parent / "lung_masks_index.csv"
    if not index_path.is_file():
        raise MaskError(f"{index_path}: missing; needed to paste the lung crops of {sample.image}")
    key = f"images/{sample.image.name}"
    with open(index_path, newline="") as stream:
        row = next((r for r in csv.DictReader(stream) if r["image"] == key), None)
    if row is None:
        raise MaskError(f"{index_path}: no row for {key}")
    height, width = image.array.shape[-2:]
    mask = np.zeros((height, width), dtype=np.int64)
    for side in ("left", "right"):
        crop_path = index_path.parent / row[f"{side}_lung_mask"]
        crop, _ = read_pil(crop_path)
        lung = crop[..., :3].max(axis=-1) > 0
        top, left = int(row[f"{side}_top"]), int(row[f"{side}_left"])
        region = mask[top : top + lung.shape[0], left : left + lung.shape[1]]
        region[lung[: region.shape[0], : region.shape[1]]] = 1
    return mask


def dicom_slice_of_nrrd(sample: Sample, image: ImageRecord) -> np.ndarray:
    """dcmqi CT: one NRRD label volume for all DICOM slices; slice k is chosen by the DICOM z position, and
    ``label[:, :, k].T`` matches ``pixel_array`` (checked in SOURCE.md)."""
    import nrrd

    header = nrrd.read_header(str(sample.mask))
    volume, _ = read_volume(sample.mask)
    origin = float(header["space origin"][2])
    step = float(np.asarray(header["space directions"], dtype=float)[2, 2])
    position = image.meta.get("position")
    if not position:
        raise MaskError(f"{sample.image}: no ImagePositionPatient to find its slice in {sample.mask}")
    k = int(round((position[2] - origin) / step))
    if not 0 <= k < volume.shape[2]:
        raise MaskError(f"{sample.image}: z={position[2]} falls outside {sample.mask}")
    return decode_mask(volume[:, :, k].T, "class_ids", sample.mask)


KNOWN_DATASETS: dict[str, dict[str, Any]] = {
    "DRIVE": {"encoding": "binary255", "labels": ["background", "vessel"]},
    "CHASE_DB1": {"encoding": "binary01", "labels": ["background", "vessel"]},
    "PH2": {"encoding": "binary01", "labels": ["background", "lesion"]},
    "BUSI": {"encoding": "binary255", "labels": ["background", "lesion"]},
    "HC18_fetal_head_US": {"encoding": "binary255", "labels": ["background", "fetal_head"]},
    "ISBI2012_EM": {"encoding": "invert255", "labels": ["background", "membrane"]},
    "Kvasir-SEG_subset": {"encoding": "jpeg", "labels": ["background", "polyp"]},
    "CVC-ClinicDB_subset": {"encoding": "jpeg", "labels": ["background", "polyp"]},
    "COVID19_CT_MedSeg_InfNet": {"encoding": "binary255", "labels": ["background", "infection"]},
    "CXR_COVID_GeneralBlockchain": {"mask_reader": cxr_both_lungs, "labels": ["background", "lung"]},
    "CXR_lung_imlab_demo": {"encoding": "binary255", "labels": ["background", "lung"]},
    "CT_dcmqi_3slice": {"mask_reader": dicom_slice_of_nrrd, "labels": ["background", "liver", "spine"]},
    "ACDC_cardiac_MRI_SSL4MIS_h5": {"encoding": "class_ids", "labels": ["background", "RV", "myocardium", "LV"],
                                     "volume_axis": 0},
    "SCT_spinalcord_MRI": {"encoding": "binary01", "labels": ["background", "spinal_cord"], "volume_axis": 2},
}


def label_names(dataset: str, num_classes: int) -> list[str]:
    names = KNOWN_DATASETS.get(dataset, {}).get("labels")
    if names and len(names) == num_classes:
        return list(names)
    return ["background"] + [f"class_{i}" for i in range(1, num_classes)]


# ---------------------------------------------------------------------------------------------- reading pairs
def load_pair(sample: Sample) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(image [C, H, W] float32 raw, mask [H, W] int64, meta)`` of one sample, checked to match."""
    record = read_image(sample.image, slice_axis=sample.slice_axis, slice_index=sample.slice_index)
    if sample.mask is None:
        raise MaskError(f"{sample.image}: this sample has no mask")
    quirks = KNOWN_DATASETS.get(sample.dataset, {})
    if "mask_reader" in quirks:
        mask = quirks["mask_reader"](sample, record)
    else:
        encoding = sample.mask_encoding if sample.mask_encoding != "auto" else quirks.get("encoding", "auto")
        mask = read_mask(sample.mask, encoding=encoding, slice_axis=sample.slice_axis, slice_index=sample.slice_index)
    check_pair(record.array.shape, mask, sample.image, sample.mask)
    return record.array, mask, record.meta


# ---------------------------------------------------------------------------------------------- manifests
def read_manifest(csv_path: str | Path, *, expand_volumes: bool = True, nonempty_slices: bool = True) -> list[Sample]:
    """Samples of a manifest CSV; 3D volumes become one sample per slice (only slices with foreground when
    ``nonempty_slices``)."""
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
        image = root / row["image"]
        mask = root / row["mask"] if row.get("mask") else None
        if not image.is_file():
            raise ManifestError(f"{csv_path}, line {line}: image {image} does not exist")
        if mask is not None and not mask.is_file():
            raise ManifestError(f"{csv_path}, line {line}: mask {mask} does not exist")
        sample = Sample(
            dataset=row["dataset"], modality=row["modality"], site=row["site"], image=image, mask=mask,
            split_hint=row.get("split_hint", "") or "", mask_encoding=row.get("mask_encoding") or "auto",
            slice_index=int(row["slice_index"]) if row.get("slice_index") else None,
        )
        samples += expand_volume(sample, nonempty_slices) if expand_volumes else [sample]
    return samples


def is_volume(sample: Sample) -> bool:
    kind = suffix(sample.image)
    if kind in (".nii", ".nii.gz"):
        return True
    if kind in (".h5", ".hdf5"):
        from .readers import read_hdf5

        return read_hdf5(sample.image, "image").ndim == 3
    return False


def expand_volume(sample: Sample, nonempty_slices: bool = True) -> list[Sample]:
    if sample.slice_index is not None or not is_volume(sample):
        return [sample]
    axis = KNOWN_DATASETS.get(sample.dataset, {}).get("volume_axis", 2)
    if suffix(sample.image) in (".h5", ".hdf5"):
        from .readers import read_hdf5

        labels = read_hdf5(sample.mask, "label") if sample.mask else None
        count = read_hdf5(sample.image, "image").shape[0]
        axis = 0
    else:
        volume, _ = read_volume(sample.image)
        if volume.ndim == 2:
            return [sample]
        labels = read_volume(sample.mask)[0] if sample.mask else None
        count = volume.shape[axis]
    keep = range(count)
    if nonempty_slices and labels is not None:
        keep = [k for k in keep if np.take(labels, k, axis=axis).any()]
    return [replace(sample, slice_index=k, slice_axis=axis) for k in keep]


def mask_stem(name: str) -> str:
    stem = name
    for marker in MASK_SUFFIXES:
        if stem.endswith(marker):
            return stem[: -len(marker)]
    return stem


def samples_from_folders(image_dir, mask_dir, *, modality: str, site: str = "local", dataset: str = "folder",
                         encoding: str = "auto") -> list[Sample]:
    """Pair images and masks by file stem, tolerating mask suffixes such as ``_mask``, ``_manual1``, ``_lesion``."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise ManifestError(f"{image_dir}: image folder not found")
    images = sorted(p for p in image_dir.iterdir() if p.is_file() and suffix(p) in IMAGE_SUFFIXES_ALL)
    masks: dict[str, Path] = {}
    if mask_dir is not None:
        mask_dir = Path(mask_dir)
        if not mask_dir.is_dir():
            raise ManifestError(f"{mask_dir}: mask folder not found")
        for path in mask_dir.iterdir():
            if path.is_file() and suffix(path) in IMAGE_SUFFIXES_ALL:
                masks[mask_stem(path.name[: -len(suffix(path))])] = path
    samples = []
    for image in images:
        stem = mask_stem(image.name[: -len(suffix(image))])
        stem = stem.replace("_training", "").replace("_test", "") if stem not in masks else stem
        mask = masks.get(stem)
        if mask_dir is not None and mask is None:
            raise ManifestError(f"{image}: no mask with a matching name in {mask_dir}")
        samples.append(Sample(dataset, modality, site, image, mask, mask_encoding=encoding))
    return [s for sample in samples for s in expand_volume(sample)]


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
    run can skip and report bad files instead of stopping halfway."""
    from ..errors import DataError

    good, bad = [], []
    for sample in samples:
        try:
            check(sample)
            good.append(sample)
        except DataError as error:
            bad.append((sample, str(error)))
    return good, bad

"""What each shared dataset needs beyond "read the mask file": its mask encoding, label names, how its volumes
slice, and for two datasets a mask reader of its own. Keyed by the manifest's ``dataset`` column.

* ``encoding``: the mask encoding (see :mod:`.masks`) used when the manifest does not give one.
* ``labels``: class names, index = class id.
* ``volume_axis``: the axis 3D volumes are sliced along (NIfTI: stored z = 2; SSL4MIS HDF5: ``[Z, H, W]`` = 0).
* ``group``: ``image_path -> str`` for datasets whose images are not independent (frames of one video): images of
  one group (the same key across datasets: ``CVC-ClinicDB_subset`` is sequence 1 of ``CVC-ClinicDB``) stay on one
  side of every split (:func:`sample_group`).
* ``mask_reader``: ``(mask_path, image_record) -> [H, W] int64`` for masks that are not one picture of the image:

  - ``CXR_COVID_GeneralBlockchain``: both lungs are RGBA bounding-box crops, pasted at the offsets listed in
    ``lung_masks_index.csv`` (the manifest names only the left lung; both are used).
  - ``CT_dcmqi_3slice``: every DICOM slice points to one NRRD label volume; slice ``k`` is chosen from the DICOM
    z position (ImagePositionPatient) and ``label[:, :, k].T`` matches ``pixel_array``.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImageReadError, MaskError
from .mask_encodings import decode_mask
from .readers import ImageRecord, read_pil, read_volume


def paste_lung_crops(mask_path: Path, image: ImageRecord) -> np.ndarray:
    """GeneralBlockchain CXR: ``[H, W]`` with 1 = lung (left and right), from crops pasted at their offsets."""
    image_path = Path(image.meta["source"])
    index_path = image_path.parent.parent / "lung_masks_index.csv"
    if not index_path.is_file():
        raise MaskError(f"{index_path}: missing; it lists where to paste the lung crops of {image_path}")
    key = f"{image_path.parent.name}/{image_path.name}"
    with open(index_path, newline="") as stream:
        row = next((r for r in csv.DictReader(stream) if r["image"] == key), None)
    if row is None:
        raise MaskError(f"{index_path}: no row for image {key}; add its lung mask paths and offsets")
    height, width = image.array.shape[-2:]
    mask = np.zeros((height, width), dtype=np.int64)
    for side in ("left", "right"):
        crop_path = index_path.parent / row[f"{side}_lung_mask"]
        try:
            crop, _ = read_pil(crop_path)
        except ImageReadError as error:
            raise MaskError(str(error)) from None
        lung = (crop[..., :3].max(axis=-1) if crop.ndim == 3 else crop) > 0
        top, left = int(row[f"{side}_top"]), int(row[f"{side}_left"])
        if top < 0 or left < 0 or top + lung.shape[0] > height or left + lung.shape[1] > width:
            raise MaskError(
                f"{crop_path}: a {lung.shape[1]}x{lung.shape[0]} crop at left={left}, top={top} falls outside "
                f"the {width}x{height} image {image_path}; check {index_path}"
            )
        mask[top : top + lung.shape[0], left : left + lung.shape[1]][lung] = 1
    return mask


def nrrd_slice_for_dicom(mask_path: Path, image: ImageRecord) -> np.ndarray:
    """dcmqi CT: ``[H, W]`` class ids of the NRRD label slice at the DICOM slice's z position."""
    import nrrd

    try:
        header = nrrd.read_header(str(mask_path))
        volume, _ = read_volume(mask_path)
        origin = float(header["space origin"][2])
        step = float(np.asarray(header["space directions"], dtype=float)[2, 2])
    except (ImageReadError, KeyError, OSError, ValueError, nrrd.NRRDError) as error:
        raise MaskError(f"{mask_path}: cannot read the label volume's geometry ({error})") from None
    position = image.meta.get("position")
    if not position:
        raise MaskError(f"{image.meta.get('source')}: no ImagePositionPatient, so no slice of {mask_path} matches")
    k = int(round((position[2] - origin) / step))
    if not 0 <= k < volume.shape[2]:
        raise MaskError(
            f"{image.meta.get('source')}: z = {position[2]} mm is outside {mask_path} "
            f"(z from {origin} mm, {volume.shape[2]} slices of {step} mm)"
        )
    return decode_mask(volume[:, :, k].T, "class_ids", mask_path)


# First frame of each of CVC-ClinicDB's 29 video sequences (its README.txt: "1 to 25 is sequence 1", ...).
CLINICDB_SEQUENCE_STARTS = (1, 26, 51, 68, 79, 104, 127, 152, 178, 200, 206, 228, 253, 278, 298, 318, 343, 364, 384,
                            409, 429, 448, 467, 479, 504, 529, 547, 572, 592)


def clinicdb_sequence(image: Path) -> str:
    """``"CVC-ClinicDB sequence N"`` of a frame ``<frame>.jpg`` (neighbouring frames are near-duplicates)."""
    import bisect

    try:
        frame = int(Path(image).stem)
    except ValueError:
        return str(image)  # not a numbered frame: its own group
    return f"CVC-ClinicDB sequence {bisect.bisect_right(CLINICDB_SEQUENCE_STARTS, frame)}"


def chase_child(image: Path) -> str:
    """``"CHASE_DB1 child NN"`` of ``Image_NNL.jpg`` / ``Image_NNR.jpg``: both eyes of one child."""
    stem = Path(image).stem
    if len(stem) == 9 and stem.startswith("Image_") and stem[6:8].isdigit() and stem[8] in "LR":
        return f"CHASE_DB1 child {stem[6:8]}"
    return str(image)  # not named as the dataset names them: its own group


KNOWN_DATASETS: dict[str, dict[str, Any]] = {
    "DRIVE": {"encoding": "binary255", "labels": ["background", "vessel"]},
    "CHASE_DB1": {"encoding": "onebit", "labels": ["background", "vessel"], "group": chase_child},
    "PH2": {"encoding": "onebit", "labels": ["background", "lesion"]},
    "BUSI": {"encoding": "binary255", "labels": ["background", "lesion"]},
    "HC18_fetal_head_US": {"encoding": "binary255", "labels": ["background", "fetal_head"]},  # filled RGB masks
    "ISBI2012_EM": {"encoding": "invert255", "labels": ["background", "membrane"]},  # 255 = non-membrane
    "Kvasir-SEG_subset": {"encoding": "jpeg", "labels": ["background", "polyp"]},
    "CVC-ClinicDB_subset": {"encoding": "jpeg", "labels": ["background", "polyp"],  # frames 1-20 (sequence 1)
                            "group": lambda image: "CVC-ClinicDB sequence 1"},
    "CVC-ClinicDB": {"encoding": "jpeg", "labels": ["background", "polyp"], "group": clinicdb_sequence},
    "Kvasir-SEG": {"encoding": "jpeg", "labels": ["background", "polyp"]},
    "COVID19_CT_MedSeg_InfNet": {"encoding": "binary255", "labels": ["background", "infection"]},
    "CXR_COVID_GeneralBlockchain": {"mask_reader": paste_lung_crops, "labels": ["background", "lung"]},
    "CXR_lung_imlab_demo": {"encoding": "binary255", "labels": ["background", "lung"]},
    "CT_dcmqi_3slice": {"mask_reader": nrrd_slice_for_dicom, "labels": ["background", "liver", "spine"]},
    "ACDC_cardiac_MRI_SSL4MIS_h5": {
        "encoding": "class_ids", "labels": ["background", "RV", "myocardium", "LV"], "volume_axis": 0,
    },
    "SCT_spinalcord_MRI": {"encoding": "binary01", "labels": ["background", "spinal_cord"], "volume_axis": 2},
}


def label_names(dataset: str, num_classes: int) -> list[str]:
    """Class names of a known dataset, else ``["background", "class_1", ...]``."""
    names = KNOWN_DATASETS.get(dataset, {}).get("labels")
    if names and len(names) == num_classes:
        return list(names)
    return ["background"] + [f"class_{i}" for i in range(1, num_classes)]


def sample_group(sample) -> str:
    """What must stay on one side of a split with ``sample``: its dataset's ``group`` (a video sequence, a child's
    two eyes), else its image file (all slices of one volume)."""
    group = KNOWN_DATASETS.get(sample.dataset, {}).get("group")
    return group(sample.image) if group else str(sample.image)

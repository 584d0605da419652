"""Prediction on files: an image, a volume or a folder in; masks out in the same geometry (PNG of the same size for
2D images, DICOM slices included; NIfTI with the same affine for NIfTI and NRRD volumes), plus optional overlays.

Each input is routed to its own adapter: by ``modality`` if given, else by the DICOM ``Modality`` tag (CT, MR...)
matched to a loaded modality, else the only loaded modality.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import DataError, M4oEError
from .evaluation import predict_mask
from .model import SegmentationModel
from .scale import predict_mask_at_scale

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".dcm", ".h5", ".hdf5")
DICOM_MODALITY = {"CT": "CT", "MR": "MRI", "CR": "xray", "DX": "xray", "US": "ultrasound", "XC": "dermoscopy",
                  "ES": "endoscopy", "OP": "fundus", "SM": "microscopy"}


@dataclass
class PredictionResult:
    source: Path
    output: Path | None
    modality: str | None
    error: str | None = None
    overlay: Path | None = None


def suffix_of(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def collect_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files named directly, and every image/volume file inside named folders (sorted)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and suffix_of(p) in IMAGE_SUFFIXES + VOLUME_SUFFIXES)
        elif path.exists():
            found.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return found


def choose_modality(model: SegmentationModel, requested: str | None, meta: dict) -> str:
    if requested:
        model._require(requested)
        return requested
    tag = meta.get("dicom_modality") or meta.get("modality")
    if tag:
        wanted = DICOM_MODALITY.get(str(tag).upper(), str(tag))
        for name in model.modalities:
            if name.lower() == wanted.lower():
                return name
    if len(model.modalities) == 1:
        return next(iter(model.modalities))
    raise DataError(
        f"cannot tell the modality of {meta.get('source', 'this image')} (DICOM tag {tag!r}); "
        f"pass --modality, one of {list(model.modalities)}"
    )


def predict_array(model: SegmentationModel, raw: np.ndarray, modality: str, meta: dict | None = None) -> np.ndarray:
    """``[H, W]`` class ids for one raw ``[C, H, W]`` image, with the modality's preset and input size."""
    from .data import normalise

    info = model.modalities[modality]
    image = torch.from_numpy(np.ascontiguousarray(normalise(raw, meta or {}, info.preset,
                                                            model.backbone.in_chans))).float()
    resize_mode = info.provenance.get("resize_mode", "crop")
    model.eval()
    return predict_mask_at_scale(lambda x: model(x, modality), image, info.input_size, resize_mode,
                                 scale=info.provenance.get("scale"), raw=raw, meta=meta).numpy()


def output_path(source: Path, out_dir: Path, root: Path | None) -> Path:
    relative = source.relative_to(root) if root and source.is_relative_to(root) else Path(source.name)
    suffix = suffix_of(source)
    stem = relative.name[: -len(suffix)] if suffix else relative.name
    if suffix in VOLUME_SUFFIXES:  # NRRD volumes get a NIfTI mask with the same affine
        return out_dir / relative.parent / f"{stem}_mask.nii.gz"
    return out_dir / relative.parent / f"{stem}_mask.png"


def predict_files(
    model: SegmentationModel,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    modality: str | None = None,
    overlays: bool = False,
    slice_axis: int = 2,
) -> list[PredictionResult]:
    """Segment every input; a bad file is reported in its result and the run goes on."""
    from .data import read_image, read_volume, write_mask
    from .reporting import overlay_png

    out = Path(out_dir)
    files = collect_inputs(inputs)
    roots = [Path(p) for p in inputs if Path(p).is_dir()]
    results = []
    for source in files:
        root = next((r for r in roots if source.is_relative_to(r)), None)
        target = output_path(source, out, root)
        try:
            if suffix_of(source) in VOLUME_SUFFIXES:
                volume, affine = read_volume(source)
                chosen = choose_modality(model, modality, {"source": source})
                slices = np.moveaxis(np.asarray(volume, dtype=np.float32), slice_axis, 0)
                meta = {"dtype": str(volume.dtype)}
                masks = [predict_array(model, slice_[None], chosen, meta) for slice_ in slices]
                mask = np.moveaxis(np.stack(masks), 0, slice_axis).astype(np.uint8)
                write_mask(mask, target, affine=affine)
                results.append(PredictionResult(source, target, chosen))
                continue
            record = read_image(source)
            chosen = choose_modality(model, modality, {**record.meta, "source": source})
            mask = predict_array(model, record.array, chosen, record.meta)
            write_mask(mask.astype(np.uint8), target)
            result = PredictionResult(source, target, chosen)
            if overlays:
                result.overlay = overlay_png(record.array, mask, None, target.with_name(target.stem + "_overlay.png"),
                                             title=f"{source.name} [{chosen}]")
            results.append(result)
        except M4oEError as error:
            results.append(PredictionResult(source, None, modality, error=str(error)))
    return results

"""Prediction on files: an image, a volume or a folder in; masks out in the same geometry (PNG of the same size for
2D images, DICOM slices included; NIfTI with the same affine for NIfTI and NRRD volumes), plus optional overlays.

Each input goes to its own adapter: ``modality`` if given; else a DICOM ``Modality`` tag that names a loaded modality;
else the only loaded adapter; else image-level routing (:meth:`SegmentationModel.route`: every format, no tag
needed). An input that fits no loaded adapter is reported *unknown* and gets no mask. Every decision is written to
``predictions.csv`` (input, status, modality, how it was chosen, confidence, output file).

Outputs never collide (two inputs that would share a mask name get their suffix in it: ``a_tif_mask.png``,
``a_png_mask.png``) and an existing file is never replaced unless ``overwrite=True``: the run refuses before
segmenting anything.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import ConfigError, DataError, M4oEError
from .model import SegmentationModel
from .routing import volume_routing_indices
from .scale import predict_mask_at_scale

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".dcm", ".h5", ".hdf5")
DICOM_MODALITY = {"CT": "CT", "MR": "MRI", "CR": "xray", "DX": "xray", "US": "ultrasound", "XC": "dermoscopy",
                  "ES": "endoscopy", "OP": "fundus", "SM": "microscopy"}


DECISIONS_CSV = "predictions.csv"


@dataclass
class PredictionResult:
    source: Path
    output: Path | None
    modality: str | None
    error: str | None = None
    overlay: Path | None = None
    chosen_by: str = ""  # "given", "dicom tag", "only adapter", "router"
    confidence: float | None = None
    unknown: bool = False


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


def choose_modality(model: SegmentationModel, requested: str | None, meta: dict, raw: np.ndarray | None = None,
                    min_confidence: float | None = None, volume: Sequence[np.ndarray] | None = None
                    ) -> tuple[str | None, str, float | None]:
    """``(modality or None for unknown, how it was chosen, routing confidence)`` for one raw ``[C, H, W]`` image, or
    for a volume from some of its ``[1, H, W]`` slices (``volume``: routed as a whole, see
    :meth:`SegmentationModel.route_volume`)."""
    if requested:
        model._require(requested)
        return requested, "given", None
    tag = meta.get("dicom_modality") or meta.get("modality")
    if tag:
        wanted = DICOM_MODALITY.get(str(tag).upper(), str(tag))
        for name in model.modalities:
            if name.lower() == wanted.lower():
                return name, "dicom tag", None
    if len(model.modalities) == 1:
        return next(iter(model.modalities)), "only adapter", None
    if (raw is None and volume is None) or not model.signatures:
        raise DataError(
            f"cannot tell the modality of {meta.get('source', 'this image')}: no loaded adapter has a routing "
            f"signature (add one with `m4oe sign`) and no DICOM tag names one; pass --modality, one of "
            f"{list(model.modalities)}"
        )
    if volume is not None:
        decision = model.route_volume(list(volume), min_confidence)
    else:
        decision = model.route([raw], min_confidence)[0]
    return decision.modality, NOISE_REFUSAL if decision.reason == "noise" else "router", decision.confidence


NOISE_REFUSAL = "router: pixel noise"  # how an input that is pixel noise was refused (predictions.csv, chosen_by)


def predict_array(model: SegmentationModel, raw: np.ndarray, modality: str, meta: dict | None = None,
                  routing: str | None = None, device: torch.device | str | None = None,
                  precision: str = "32", tta: str = "none", threshold: float | str | None = None) -> np.ndarray:
    """``[H, W]`` class ids for one raw ``[C, H, W]`` image, with the modality's preset and input size (and
    ``routing`` ``"hard"``/``"soft"`` for the experts, default the model's). With ``device`` (where the model is),
    each window batch goes there and runs under ``precision`` (``"32"``, ``"bf16"``, ``"16"`` autocast); the image
    and its mask stay on the CPU. ``tta``: test-time augmentation over mirrored views
    (:func:`~.inference.flip_averaged`). ``threshold``: for a two-class modality, foreground where its probability
    exceeds it (other modalities keep the most probable class)."""
    from .data import normalise
    from .inference import flip_averaged

    info = model.modalities[modality]
    image = torch.from_numpy(np.ascontiguousarray(normalise(raw, meta or {}, info.preset,
                                                            model.backbone.in_chans))).float()
    resize_mode = info.provenance.get("resize_mode", "crop")
    model.eval()
    function = lambda x: model(x, modality, routing=routing)  # noqa: E731
    if device is not None or precision != "32":
        from .runtime import device_predictor, module_device

        function = device_predictor(function, device if device is not None else module_device(model), precision)
    function = flip_averaged(function, tta)
    return predict_mask_at_scale(function, image, info.input_size, resize_mode,
                                 scale=info.provenance.get("scale"), raw=raw, meta=meta,
                                 threshold=threshold if info.num_classes == 2 else None).numpy()


def output_path(source: Path, out_dir: Path, root: Path | None, keep_suffix: bool = False) -> Path:
    relative = source.relative_to(root) if root and source.is_relative_to(root) else Path(source.name)
    suffix = suffix_of(source)
    stem = relative.name[: -len(suffix)] if suffix else relative.name
    if keep_suffix and suffix:
        stem = f"{stem}_{suffix.lstrip('.').replace('.', '_')}"
    if is_volume_file(source):  # volumes (NRRD and 3D HDF5 included) get a NIfTI mask with the same affine
        return out_dir / relative.parent / f"{stem}_mask.nii.gz"
    return out_dir / relative.parent / f"{stem}_mask.png"


def overlay_path(target: Path) -> Path:
    """``x_mask.png`` / ``x_mask.nii.gz`` → ``x_mask_overlay.png``."""
    name = target.name[: -len(".nii.gz")] if target.name.endswith(".nii.gz") else target.stem
    return target.with_name(name + "_overlay.png")


def is_volume_file(source: Path) -> bool:
    """NIfTI/NRRD files, and HDF5 files whose ``image`` is 3D, are segmented as whole volumes."""
    if suffix_of(source) in VOLUME_SUFFIXES:
        return True
    if suffix_of(source) in (".h5", ".hdf5"):
        from .data.readers import hdf5_shape

        try:
            return len(hdf5_shape(source, "image")) == 3
        except M4oEError:
            return False  # reported when the file is read
    return False


def plan_outputs(files: Sequence[Path], roots: Sequence[Path], out_dir: Path) -> dict[Path, Path]:
    """Each input's mask path; inputs that would share one (``a.tif`` and ``a.png``) keep their suffix in it."""
    def root_of(source: Path) -> Path | None:
        return next((r for r in roots if source.is_relative_to(r)), None)

    plain = {source: output_path(source, out_dir, root_of(source)) for source in files}
    counts: dict[Path, int] = {}
    for target in plain.values():
        counts[target] = counts.get(target, 0) + 1
    plan = {source: output_path(source, out_dir, root_of(source), keep_suffix=counts[target] > 1)
            for source, target in plain.items()}
    if len(set(plan.values())) != len(plan):  # e.g. "a.tif" beside a file literally named "a_tif.png"
        seen: dict[Path, Path] = {}
        for source, target in plan.items():
            if target in seen:
                raise DataError(f"{source} and {seen[target]} would both be written to {target}; rename one")
            seen[target] = source
    return plan


def predict_files(
    model: SegmentationModel,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    modality: str | None = None,
    overlays: bool = False,
    slice_axis: int | None = None,
    min_confidence: float | None = None,
    overwrite: bool = False,
    progress: bool = False,
    device: torch.device | str | None = None,
    precision: str = "32",
    tta: str = "none",
    threshold: float | str | None = None,
) -> list[PredictionResult]:
    """Segment every input; a bad or unknown file is reported in its result (and ``predictions.csv``) and the run
    goes on.

    Volumes (NIfTI, NRRD, 3D HDF5) are segmented slice by slice along ``slice_axis`` (``None``: the through-plane
    axis, see :func:`~.data.readers.through_plane_axis`) and written whole as NIfTI with the input's affine
    (identity for HDF5, which has none); a volume is routed as a whole, by up to 16 evenly spaced slices; its
    overlay shows a few slices in one PNG. PNG masks of two-class modalities hold 0/255, of more classes a palette
    PNG of class ids (see :func:`~.data.write_mask`). ``device``/``precision``/``tta``/``threshold``: see
    :func:`predict_array` (the model must already be on ``device``).

    Raises:
        ConfigError: an output file (a mask, an overlay or ``predictions.csv``) already exists and ``overwrite``
            is false; nothing has been written then.
    """
    from .data import read_image, read_volume, write_mask
    from .data.readers import read_hdf5, through_plane_axis
    from .reporting import overlay_png, volume_overlay_png

    out = Path(out_dir)
    files = collect_inputs(inputs)
    roots = [Path(p) for p in inputs if Path(p).is_dir()]
    plan = plan_outputs(files, roots, out)
    planned = list(plan.values()) + [out / DECISIONS_CSV]
    if overlays:
        planned += [overlay_path(target) for target in plan.values()]
    existing = [path for path in planned if path.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"{len(existing)} output file(s) already exist in {out} (first: {existing[0]}); choose another --out "
            "or pass --overwrite to replace them"
        )
    results = []
    if progress:
        from tqdm.auto import tqdm

        files = tqdm(files, desc="predict", unit="file")
    for source in files:
        target = plan[source]
        try:
            if is_volume_file(source):
                if suffix_of(source) in (".h5", ".hdf5"):
                    volume, affine = read_hdf5(source, "image"), np.eye(4)
                    spacing = None
                else:
                    volume, affine = read_volume(source)
                    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0).tolist()
                axis = through_plane_axis(volume.shape, spacing) if slice_axis is None else slice_axis
                if not 0 <= axis < volume.ndim:
                    raise DataError(f"{source}: slice axis {axis} does not exist in a volume of shape {volume.shape}")
                slices = np.moveaxis(np.asarray(volume, dtype=np.float32), axis, 0)
                routing_slices = [slices[index][None] for index in volume_routing_indices(len(slices))]
                chosen, how, confidence = choose_modality(model, modality, {"source": source}, None, min_confidence,
                                                          volume=routing_slices)
                if chosen is None:
                    results.append(_unknown(source, confidence, how))
                    continue
                meta = {"dtype": str(volume.dtype)}
                if spacing is not None:  # in-plane spacing of the slices: adapters that recorded one resample to it
                    meta["spacing"] = [value for index, value in enumerate(spacing) if index != axis]
                if progress:  # a volume can take minutes: a bar over its slices (with ETA) under the files' bar
                    from tqdm.auto import tqdm

                    slices = tqdm(slices, desc=source.name, unit="slice", leave=False)
                masks = [predict_array(model, slice_[None], chosen, meta, device=device, precision=precision, tta=tta,
                                       threshold=threshold)
                         for slice_ in slices]
                mask = np.moveaxis(np.stack(masks), 0, axis)
                write_mask(mask, target, affine=affine)
                result = PredictionResult(source, target, chosen, chosen_by=how, confidence=confidence)
                if overlays:
                    result.overlay = volume_overlay_png(volume, mask, axis, overlay_path(target),
                                                        title=f"{source.name} [{chosen}]")
                results.append(result)
                continue
            record = read_image(source)
            chosen, how, confidence = choose_modality(model, modality, {**record.meta, "source": source},
                                                      record.array, min_confidence)
            if chosen is None:
                results.append(_unknown(source, confidence, how))
                continue
            mask = predict_array(model, record.array, chosen, record.meta, device=device, precision=precision, tta=tta,
                                 threshold=threshold)
            write_mask(mask, target, num_classes=model.modalities[chosen].num_classes)
            result = PredictionResult(source, target, chosen, chosen_by=how, confidence=confidence)
            if overlays:
                result.overlay = overlay_png(record.array, mask, None, overlay_path(target),
                                             title=f"{source.name} [{chosen}]")
            results.append(result)
        except M4oEError as error:
            results.append(PredictionResult(source, None, modality, error=str(error)))
    write_decisions(results, out / DECISIONS_CSV)
    return results


def _unknown(source: Path, confidence: float | None, how: str = "router") -> PredictionResult:
    if how == NOISE_REFUSAL:
        error = ("unknown: the image is pixel noise (neighbouring pixels do not correlate), refused whatever "
                 "--min-confidence says; pass --modality to force one")
    else:
        error = (f"unknown: fits no loaded adapter (best confidence {confidence:.2g}); pass --modality to force one, "
                 "or lower --min-confidence")
    return PredictionResult(source, None, None, chosen_by=how, confidence=confidence, unknown=True, error=error)


def write_decisions(results: Sequence[PredictionResult], path: Path) -> Path:
    """``predictions.csv``: one row per input (input, status, modality, chosen_by, confidence, output, message)."""
    from .adapter_file import atomic_write

    def write(temporary: str) -> None:
        with open(temporary, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["input", "status", "modality", "chosen_by", "confidence", "output", "message"])
            for r in results:
                status = "unknown" if r.unknown else ("error" if r.error else "segmented")
                writer.writerow([r.source, status, r.modality or "", r.chosen_by,
                                 "" if r.confidence is None else f"{r.confidence:.6g}", r.output or "",
                                 r.error or ""])

    return atomic_write(path, write)

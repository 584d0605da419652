"""Evaluation at native resolution: per image, per class and per site Dice/HD95, and the site-generalisation
protocol (train on some sites, test on others) of Cekmeceli et al. 2024, for every training mode.

    samples → read image + mask → preset → sliding-window logits (or resize) → mask → MONAI Dice, HD95 → summary
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import M4oEError
from .inference import mask_from_probabilities, round_to_32, segment
from .metrics import score_mask, summarise
from .scale import predict_mask_at_scale, resampling_factor


WINDOWS_WORTH_A_BAR = 64  # sliding windows of one image above which a progress bar is shown


@dataclass
class Prepared:
    """One evaluation image: preprocessed tensor ``[C, H, W]``, label ``[H, W]`` and where it came from."""

    image: torch.Tensor
    label: np.ndarray
    raw: np.ndarray
    sample: Any
    meta: dict[str, Any] = field(default_factory=dict)


def prepare(sample, preset: dict[str, Any], in_chans: int) -> Prepared:
    """Read one sample at native resolution and apply the modality's preset and channel conversion."""
    from .data import load_pair, normalise

    image, label, meta = load_pair(sample)
    tensor = torch.from_numpy(np.ascontiguousarray(normalise(image, meta, preset, in_chans))).float()
    return Prepared(tensor, np.asarray(label), image, sample, dict(meta or {}))


def predict_probabilities(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    input_size: Sequence[int],
    resize_mode: str = "crop",
    progress: bool | None = None,
) -> torch.Tensor:
    """``[K, H, W]`` class probabilities for a preprocessed ``[C, H, W]`` image, the way the expert was trained (see
    :func:`m4oe_adapters.adapt.fit_modality`: native-resolution windows for ``crop``, resized input for ``resize``).

    ``progress``: a bar over the windows (``None``: only when the image needs more than
    :data:`WINDOWS_WORTH_A_BAR` windows, e.g. a 3500 x 3025 fundus photograph at 224 px)."""
    if resize_mode == "resize":
        height, width = image.shape[-2:]
        small = F.interpolate(image[None], size=round_to_32(input_size), mode="bilinear", align_corners=False)
        with torch.no_grad():
            logits = predictor(small)
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return logits[0].softmax(0)
    if progress is None:
        windows = math.prod(math.ceil(s / (0.75 * w)) for s, w in zip(image.shape[-2:], round_to_32(input_size)))
        progress = windows > WINDOWS_WORTH_A_BAR
    _, probabilities = segment(predictor, image, input_size, progress=progress)
    return probabilities


def predict_mask(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    input_size: Sequence[int],
    resize_mode: str = "crop",
    progress: bool | None = None,
    threshold: float | str | None = None,
) -> torch.Tensor:
    """``[H, W]`` class ids for a preprocessed ``[C, H, W]`` image (:func:`predict_probabilities`, then the most
    probable class, or the foreground above ``threshold``: :func:`~m4oe_adapters.inference.mask_from_probabilities`)."""
    return mask_from_probabilities(predict_probabilities(predictor, image, input_size, resize_mode, progress),
                                   threshold)


def evaluate_samples(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    samples: Sequence,
    *,
    preset: dict[str, Any],
    in_chans: int,
    num_classes: int,
    label_names: Sequence[str],
    input_size: Sequence[int],
    resize_mode: str = "crop",
    extra: dict[str, Any] | None = None,
    keep_predictions: bool = False,
    progress: bool = False,
    volumes: bool = False,
    scale: dict[str, Any] | None = None,
    pixel_size: float | None = None,
    threshold: float | str | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Score every sample; bad files are skipped and reported, not fatal. ``progress``: a bar over the images (with
    ETA), and one over the windows of each large image.

    With ``scale`` (the adapter's recorded training scale, see :mod:`m4oe_adapters.scale`) each image is resampled
    to it before prediction and the mask back to the image's grid; the row's ``scale_factor`` says by how much.
    With ``threshold`` (two-class adapters) the foreground is where its probability exceeds it, not the argmax.

    Returns:
        ``(rows, skipped)``: one row per image and class (``label`` = class name, plus a ``mean`` row per image)
        with dataset, site, image path, ``level`` (``image``, ``slice`` or ``volume``), slice axis and index for
        slices, dice, hd95 (``hd95_unit``: mm where the file gives a spacing, else px) and ``extra`` fields; and
        ``[{path, error}]`` for skipped files. With ``volumes``, slices of one volume are also scored together:
        ``volume`` rows hold the 3D Dice and HD95 (mm) of the stacked slices (``slices`` of ``volume_slices``;
        every slice unless only foreground slices were selected).
    """
    rows, skipped = [], []
    stacked: dict[str, dict[str, Any]] = {}
    if progress:
        from tqdm.auto import tqdm

        samples = tqdm(samples, desc="evaluate", unit="image")
    for sample in samples:
        try:
            prepared = prepare(sample, preset, in_chans)
        except M4oEError as error:
            skipped.append({"path": str(sample.image), "error": str(error)})
            continue
        factor = 1.0
        if scale and resize_mode == "crop":
            factor = resampling_factor(scale, prepared.raw, prepared.meta, pixel_size)
        mask = predict_mask_at_scale(predictor, prepared.image, input_size, resize_mode, scale=scale,
                                     raw=prepared.raw, meta=prepared.meta, pixel_size=pixel_size,
                                     progress=None if progress else False, threshold=threshold).numpy()
        label = prepared.label
        if label.max() >= num_classes:
            skipped.append({"path": str(sample.mask), "error": f"label value {label.max()} >= {num_classes} classes"})
            continue
        spacing = prepared.meta.get("spacing")
        spacing = spacing if spacing is not None and len(spacing) == 2 else None
        scores = score_mask(mask, label, num_classes, spacing)
        slice_index = getattr(sample, "slice_index", None)
        base = {
            "dataset": getattr(sample, "dataset", ""),
            "site": getattr(sample, "site", ""),
            "image": str(sample.image),
            "level": "image" if slice_index is None else "slice",
            **({} if slice_index is None else {"slice_axis": sample.slice_axis, "slice_index": slice_index}),
            "hd95_unit": "px" if spacing is None else "mm",
            "scale_factor": round(factor, 4),
            **(extra or {}),
        }
        if slice_index is not None and volumes:
            volume = stacked.setdefault(str(sample.image), {"base": base, "meta": prepared.meta, "slices": []})
            volume["slices"].append((slice_index, mask.astype(np.uint16), label.astype(np.uint16)))
        for index, score in scores.items():
            rows.append({**base, "label": label_names[index], **score})
        image_dice = [score["dice"] for score in scores.values()]
        image_hd = [score["hd95"] for score in scores.values() if np.isfinite(score["hd95"])]
        mean_row = {**base, "label": "mean", "dice": float(np.mean(image_dice)),
                    "hd95": float(np.mean(image_hd)) if image_hd else float("nan")}
        if keep_predictions:
            mean_row["_prediction"] = mask
            mean_row["_label"] = label
            mean_row["_raw"] = prepared.raw
        rows.append(mean_row)
    for volume in stacked.values():
        rows += score_volume(volume, num_classes, label_names)
    return rows, skipped


def score_volume(volume: dict[str, Any], num_classes: int, label_names: Sequence[str]) -> list[dict[str, Any]]:
    """3D Dice and HD95 of one volume's slices stacked in slice order: rows per class and a ``mean`` row."""
    slices = sorted(volume["slices"], key=lambda part: part[0])
    base, meta = dict(volume["base"]), volume["meta"]
    axis = base["slice_axis"]
    full = meta.get("volume_spacing")
    spacing = None if full is None else [full[axis]] + [s for index, s in enumerate(full) if index != axis]
    prediction = np.stack([part[1] for part in slices])
    label = np.stack([part[2] for part in slices])
    scores = score_mask(prediction, label, num_classes, spacing)
    shape = meta.get("volume_shape")
    for key in ("slice_index",):
        base.pop(key, None)
    base.update(level="volume", hd95_unit="px" if spacing is None else "mm", slices=len(slices),
                volume_slices=shape[axis] if shape else len(slices))
    rows = [{**base, "label": label_names[index], **score} for index, score in scores.items()]
    hd = [score["hd95"] for score in scores.values() if np.isfinite(score["hd95"])]
    rows.append({**base, "label": "mean", "dice": float(np.mean([s["dice"] for s in scores.values()])),
                 "hd95": float(np.mean(hd)) if hd else float("nan")})
    return rows


def write_outputs(out_dir: str | Path, rows: list[dict[str, Any]], skipped: list[dict[str, Any]],
                  title: str, notes: Sequence[str] = ()) -> dict[str, Path]:
    """``metrics.csv``, ``metrics.json``, ``report.md``, a Dice plot per site and mode, and best/worst overlays."""
    import csv

    from .adapter_file import atomic_write
    from .reporting import dice_plot, overlay_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    columns = list(dict.fromkeys(key for row in public for key in row))

    def write_csv(temporary: str) -> None:
        with open(temporary, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns)
            writer.writeheader()
            writer.writerows(public)

    atomic_write(out / "metrics.csv", write_csv)
    per_image = [row for row in public if row["label"] == "mean" and row.get("level") != "volume"]
    per_class = [row for row in public if row["label"] != "mean" and row.get("level") != "volume"]
    per_volume = [row for row in public if row.get("level") == "volume"]
    summary_site = summarise(per_image, ("mode", "shots", "domain", "site"))
    summary_class = summarise(per_class, ("mode", "shots", "domain", "site", "label"))
    document = {"title": title, "summary": summary_site, "per_class": summary_class, "images": public,
                "skipped": skipped, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    text = json.dumps(document, indent=1, default=float)
    atomic_write(out / "metrics.json", lambda temporary: Path(temporary).write_text(text))
    outputs = {"csv": out / "metrics.csv", "json": out / "metrics.json"}
    with_predictions = [row for row in rows if "_prediction" in row]
    overlays = []
    if with_predictions:
        ordered = sorted(with_predictions, key=lambda row: row["dice"])
        for tag, row in (("worst", ordered[0]), ("best", ordered[-1])):
            path = out / f"overlay_{tag}.png"
            where = "" if row.get("slice_index") is None else f" slice {row['slice_index']}"
            mode = f" [{row['mode']}]" if row.get("mode") else ""
            overlay_png(row["_raw"], row["_prediction"], row["_label"], path,
                        title=f"{tag}: {Path(row['image']).name}{where}{mode} Dice {row['dice']:.3f}")
            overlays.append(path)
    plot = dice_plot(summary_site, out / "dice_per_site.png")
    lines = [f"# {title}", ""] + [f"- {note}" for note in notes] + ["", "## Dice per site (mean over classes)", ""]
    lines += markdown_table(summary_site)
    lines += ["", "## Per class", ""] + markdown_table(summary_class)
    if per_volume:
        summary_volume = summarise([row for row in per_volume if row["label"] != "mean"],
                                   ("mode", "shots", "domain", "site", "label"))
        partial = [row for row in per_volume if row["label"] == "mean" and row["slices"] < row["volume_slices"]]
        lines += ["", "## Per volume (3D Dice and HD95 of the stacked slices, mm where the file gives a spacing)", ""]
        lines += markdown_table(summary_volume)
        if partial:
            lines += ["", f"{len(partial)} volume(s) scored on part of their slices (only slices with foreground "
                      "were selected): their 3D numbers leave the other slices out"]
    if skipped:
        lines += ["", f"## Skipped files ({len(skipped)})", ""] + [f"- `{s['path']}`: {s['error']}" for s in skipped]
    if overlays:
        lines += ["", "## Best and worst cases (green outline: expert mask; blue: prediction, other classes in "
                  "their own colour)", ""]
        lines += [f"![{p.stem}]({p.name})" for p in overlays]
    if plot:
        lines += ["", f"![Dice per site]({plot.name})"]
    report = "\n".join(lines) + "\n"
    atomic_write(out / "report.md", lambda temporary: Path(temporary).write_text(report))
    outputs["report"] = out / "report.md"
    return outputs


def markdown_table(summary: list[dict[str, Any]]) -> list[str]:
    if not summary:
        return ["(no images scored)"]
    keys = [k for k in ("mode", "shots", "domain", "site", "label") if k in summary[0]]
    header = keys + ["images", "Dice (95% CI)", "HD95 px or mm (95% CI)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in summary:
        dice = format_interval(entry["dice"], entry["dice_low"], entry["dice_high"], scale=100)
        hd95 = format_interval(entry["hd95"], entry["hd95_low"], entry["hd95_high"])
        lines.append("| " + " | ".join([str(entry[k]) for k in keys] + [str(entry["images"]), dice, hd95]) + " |")
    return lines


def format_interval(mean: float, low: float, high: float, scale: float = 1.0) -> str:
    if not np.isfinite(mean):
        return "n/a"
    if not np.isfinite(low):
        return f"{mean * scale:.1f}"
    return f"{mean * scale:.1f} ({low * scale:.1f}–{high * scale:.1f})"

"""Pictures for reports: mask overlays and a Dice-per-site plot (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

# Class colours (class 0 is never drawn). Class 1 is blue, not red: red outlines vanish on fundus and endoscopy
# images; green is kept for the reference (expert) mask's outline.
PALETTE = np.array(
    [[0, 0, 0], [0, 120, 255], [255, 140, 0], [230, 0, 230], [255, 230, 0], [0, 230, 230], [150, 80, 255]],
    dtype=np.float32,
)
REFERENCE_COLOUR = (0, 230, 0)


def display_image(raw: np.ndarray) -> np.ndarray:
    """``[C, H, W]`` raw intensities → ``[H, W, 3]`` uint8 for display (1st–99th percentile stretch)."""
    image = np.asarray(raw, dtype=np.float32)
    image = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    image = np.moveaxis(image, 0, -1)
    finite = image[np.isfinite(image)]
    low, high = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    scaled = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
    return (np.nan_to_num(scaled) * 255).astype(np.uint8)


def line_width(height: int, width: int) -> int:
    """Outline thickness in pixels that stays visible once a large image is shown scaled down (1 px at 300 px)."""
    return max(1, round(min(height, width) / 300))


def overlay(raw: np.ndarray, prediction: np.ndarray, label: np.ndarray | None = None, alpha: float = 0.3) -> np.ndarray:
    """``[H, W, 3]`` uint8: predicted classes lightly tinted and outlined in their colour (blue for class 1...),
    the reference (expert) mask outlined in green; outlines thicken with the image size."""
    base = display_image(raw).astype(np.float32)
    prediction = np.asarray(prediction)
    colours = PALETTE[np.clip(prediction, 0, len(PALETTE) - 1)]
    tinted = np.where(prediction[..., None] > 0, (1 - alpha) * base + alpha * colours, base)
    thickness = line_width(*prediction.shape)
    predicted_edge = thicken(label_edges(prediction), thickness)
    tinted[predicted_edge] = colours[predicted_edge]
    if label is not None:
        tinted[thicken(label_edges(np.asarray(label)), thickness)] = REFERENCE_COLOUR
    return tinted.clip(0, 255).astype(np.uint8)


def thicken(edge: np.ndarray, thickness: int) -> np.ndarray:
    if thickness <= 1:
        return edge
    from scipy.ndimage import binary_dilation

    return binary_dilation(edge, iterations=thickness - 1)


def label_edges(label: np.ndarray) -> np.ndarray:
    padded = np.pad(label, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    edge = np.zeros_like(label, dtype=bool)
    for dy, dx in ((0, 1), (1, 0), (1, 2), (2, 1)):
        edge |= padded[dy : dy + label.shape[0], dx : dx + label.shape[1]] != centre
    return edge & (label > 0)


def caption(picture, text: str) -> None:
    """Write ``text`` in the top-left corner, on a dark band, in a font scaled to the picture (readable on a
    3500 px photograph and on a 128 px slice alike); text that does not fit loses its middle, not its end."""
    from PIL import ImageDraw, ImageFont

    if not text:
        return
    size = max(10, round(min(picture.size) / 28))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(picture)
    limit = picture.size[0] - 2 * size // 3
    if draw.textlength(text, font=font) > limit:  # elide the middle: the start (what) and end (score) stay
        head, tail = text[: len(text) // 2], text[len(text) // 2 :]
        while len(head) + len(tail) > 8 and draw.textlength(head + "…" + tail, font=font) > limit:
            head, tail = (head[:-1], tail) if len(head) >= len(tail) else (head, tail[1:])
        text = head + "…" + tail
    left, top, right, bottom = draw.textbbox((size // 3, size // 3), text, font=font)
    draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=(0, 0, 0))
    draw.text((size // 3, size // 3), text, fill=(255, 255, 0), font=font)


def overlay_png(raw, prediction, label, path: str | Path, title: str = "") -> Path:
    from PIL import Image

    from .adapter_file import atomic_write

    picture = Image.fromarray(overlay(raw, prediction, label))
    caption(picture, title)
    return atomic_write(path, lambda temporary: picture.save(temporary, format="PNG"))


def volume_overlay_png(
    volume: np.ndarray, prediction: np.ndarray, axis: int, path: str | Path, title: str = "",
    label: np.ndarray | None = None, count: int = 4,
) -> Path:
    """A few slices of a volume side by side in one PNG, each with its overlay and ``slice k`` caption.

    Args:
        volume, prediction (and label): ``[X, Y, Z]`` arrays of one shape; ``axis``: the slicing axis.
        count: slices shown, evenly spread over those with predicted (or reference) foreground, else the volume.
    """
    from PIL import Image

    from .adapter_file import atomic_write

    volume, prediction = np.moveaxis(np.asarray(volume), axis, 0), np.moveaxis(np.asarray(prediction), axis, 0)
    label = None if label is None else np.moveaxis(np.asarray(label), axis, 0)
    marked = prediction.reshape(len(prediction), -1).any(1)
    if label is not None:
        marked |= label.reshape(len(label), -1).any(1)
    candidates = np.flatnonzero(marked) if marked.any() else np.arange(len(volume))
    chosen = sorted({int(candidates[round(i)]) for i in np.linspace(0, len(candidates) - 1, min(count, len(candidates)))})
    tiles = []
    for index in chosen:
        tile = Image.fromarray(overlay(volume[index][None], prediction[index], None if label is None else label[index]))
        caption(tile, f"slice {index} (axis {axis})")
        tiles.append(tile)
    band = max(16, round(min(tiles[0].size) / 12)) if title else 0
    sheet = Image.new("RGB", (sum(t.size[0] for t in tiles), max(t.size[1] for t in tiles) + band))
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, band))
        x += tile.size[0]
    if title:
        caption(sheet, title)
    return atomic_write(path, lambda temporary: sheet.save(temporary, format="PNG"))


def dice_plot(summary: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Bar chart of mean Dice (with 95% interval) per site, one bar group per mode."""
    if not summary:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .adapter_file import atomic_write

    sites = list(dict.fromkeys(str(entry.get("site", "")) for entry in summary))
    series = list(dict.fromkeys((str(entry.get("mode", "")), str(entry.get("shots", ""))) for entry in summary))
    width = 0.8 / max(1, len(series))
    figure, axis = plt.subplots(figsize=(max(5, 1.6 * len(sites) * max(1, len(series)) / 2), 3.5))
    for offset, (mode, shots) in enumerate(series):
        heights, errors = [], []
        for site in sites:
            match = [e for e in summary if str(e.get("site", "")) == site and str(e.get("mode", "")) == mode
                     and str(e.get("shots", "")) == shots]
            mean = match[0]["dice"] if match else np.nan
            low = match[0]["dice_low"] if match else np.nan
            heights.append(mean * 100)
            errors.append((mean - low) * 100 if np.isfinite(low) else 0)
        label = f"{mode} ({shots} shots)" if shots not in ("", "None") else mode
        axis.bar(np.arange(len(sites)) + offset * width, heights, width, yerr=errors, label=label, capsize=2)
    axis.set_xticks(np.arange(len(sites)) + width * (len(series) - 1) / 2, sites)
    axis.set_ylabel("Dice (%)")
    axis.set_ylim(0, 100)
    axis.legend(fontsize=7)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110))
    plt.close(figure)
    return Path(path)


ARCHITECTURE_ARGS = (("embed_dim", "embed"), ("feature_size", "feature size"), ("hidden_size", "hidden"),
                     ("depths", "depths"), ("num_heads", "heads"), ("window_size", "window"))


def describe_backbone(family: str, name: str, model_args: dict[str, Any] | None) -> str:
    """``family:name`` with the architecture arguments it was built with, e.g.
    ``timm:swin_tiny_patch4_window7_224 (embed 48, depths 2-2-6-2, heads 3-6-12-24, window 7)``.

    The family's name alone names the published defaults (Swin-T: embed 96); a backbone built with overrides, such
    as the zoo's reference backbone, must not be reported as that published model.
    """
    parts = []
    model_args = model_args if isinstance(model_args, dict) else {}  # an adapter file's metadata is untrusted
    for key, label in ARCHITECTURE_ARGS:
        value = model_args.get(key)
        if value is None:
            continue
        parts.append(f"{label} {'-'.join(str(v) for v in value) if isinstance(value, (list, tuple)) else value}")
    return f"{family}:{name}" + (f" ({', '.join(parts)})" if parts else "")

"""Pictures for reports: mask overlays and a Dice-per-site plot (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

PALETTE = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240]],
    dtype=np.float32,
)


def display_image(raw: np.ndarray) -> np.ndarray:
    """``[C, H, W]`` raw intensities → ``[H, W, 3]`` uint8 for display (1st–99th percentile stretch)."""
    image = np.asarray(raw, dtype=np.float32)
    image = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    image = np.moveaxis(image, 0, -1)
    finite = image[np.isfinite(image)]
    low, high = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    scaled = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
    return (np.nan_to_num(scaled) * 255).astype(np.uint8)


def overlay(raw: np.ndarray, prediction: np.ndarray, label: np.ndarray | None = None, alpha: float = 0.45) -> np.ndarray:
    """``[H, W, 3]`` uint8: prediction classes tinted (red for class 1...), the expert mask's outline in green."""
    base = display_image(raw).astype(np.float32)
    colours = PALETTE[np.clip(prediction, 0, len(PALETTE) - 1)]
    tinted = np.where(prediction[..., None] > 0, (1 - alpha) * base + alpha * colours, base)
    if label is not None:
        edge = label_edges(label)
        tinted[edge] = [0, 255, 0]
    return tinted.clip(0, 255).astype(np.uint8)


def label_edges(label: np.ndarray) -> np.ndarray:
    padded = np.pad(label, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    edge = np.zeros_like(label, dtype=bool)
    for dy, dx in ((0, 1), (1, 0), (1, 2), (2, 1)):
        edge |= padded[dy : dy + label.shape[0], dx : dx + label.shape[1]] != centre
    return edge & (label > 0)


def overlay_png(raw, prediction, label, path: str | Path, title: str = "") -> Path:
    from PIL import Image, ImageDraw

    from .adapter_file import atomic_write

    picture = Image.fromarray(overlay(raw, prediction, label))
    if title:
        ImageDraw.Draw(picture).text((4, 4), title, fill=(255, 255, 0))
    return atomic_write(path, lambda temporary: picture.save(temporary, format="PNG"))


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
    for key, label in ARCHITECTURE_ARGS:
        value = (model_args or {}).get(key)
        if value is None:
            continue
        parts.append(f"{label} {'-'.join(str(v) for v in value) if isinstance(value, (list, tuple)) else value}")
    return f"{family}:{name}" + (f" ({', '.join(parts)})" if parts else "")

"""Per-image scores and their summaries: MONAI's Dice and HD95, means with 95% intervals per site and class."""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Any, Iterable

import numpy as np
import torch


def score_mask(
    prediction: np.ndarray, label: np.ndarray, num_classes: int, spacing=None
) -> dict[int, dict[str, float]]:
    """Dice and HD95 of each foreground class of one image or volume.

    Args:
        prediction, label: ``[H, W]`` (or ``[D, H, W]``) class ids.
        spacing: mm per pixel along each axis: HD95 in mm; ``None``: HD95 in pixels.

    Returns:
        ``{class id: {"dice": ..., "hd95": ...}}``. Dice is 1 when both masks are empty for a class; HD95 is NaN
        when either mask is empty (a distance is undefined then).
    """
    from monai.metrics import compute_dice, compute_hausdorff_distance
    from monai.networks.utils import one_hot

    predicted = one_hot(torch.as_tensor(prediction, dtype=torch.long)[None, None], num_classes, dim=1)
    truth = one_hot(torch.as_tensor(label, dtype=torch.long)[None, None], num_classes, dim=1)
    dice = compute_dice(predicted, truth, include_background=False, ignore_empty=False)[0]
    scores: dict[int, dict[str, float]] = {}
    for index in range(1, num_classes):
        has_pred, has_truth = bool(predicted[0, index].any()), bool(truth[0, index].any())
        if has_pred and has_truth:
            with warnings.catch_warnings():  # MONAI >= 1.5 warns about its own internal argument on every call
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
                hd95 = compute_hausdorff_distance(
                    predicted[:, [0, index]], truth[:, [0, index]], include_background=False, percentile=95,
                    spacing=None if spacing is None else [float(s) for s in spacing],
                )
            distance = float(hd95[0, 0])
        else:
            distance = float("nan")
        scores[index] = {"dice": float(dice[index - 1]), "hd95": distance}
    return scores


def mean_interval(values: Iterable[float]) -> dict[str, float]:
    """Mean and 95% confidence interval (Student t) of the finite values; ``n`` counts them."""
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if data.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    mean = float(data.mean())
    if data.size == 1:
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "n": 1}
    from scipy import stats

    half = float(stats.t.ppf(0.975, data.size - 1) * data.std(ddof=1) / math.sqrt(data.size))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(data.size)}


def summarise(rows: list[dict[str, Any]], keys: tuple[str, ...] = ("mode", "site", "label")) -> list[dict[str, Any]]:
    """Group per-image rows by ``keys`` (those present) and give Dice and HD95 mean ± 95% interval per group
    (t-interval, clipped to the metric's range).

    A row's ``dice``/``hd95`` are per image and class; an image's overall score is the mean over its classes
    (``label == "mean"`` rows, when the caller added them).
    """
    present = [key for key in keys if rows and key in rows[0]]
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[key] for key in present)].append(row)
    summary = []
    for group_key, members in sorted(groups.items(), key=lambda item: tuple(str(v) for v in item[0])):
        dice = mean_interval(row["dice"] for row in members)
        hd95 = mean_interval(row["hd95"] for row in members)
        entry = dict(zip(present, group_key))
        entry.update(
            {
                "images": len(members),
                "dice": dice["mean"],
                "dice_low": max(0.0, dice["low"]) if math.isfinite(dice["low"]) else dice["low"],
                "dice_high": min(1.0, dice["high"]) if math.isfinite(dice["high"]) else dice["high"],
                "hd95": hd95["mean"],
                "hd95_low": max(0.0, hd95["low"]) if math.isfinite(hd95["low"]) else hd95["low"],
                "hd95_high": hd95["high"],
            }
        )
        summary.append(entry)
    return summary

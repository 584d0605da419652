"""Native-resolution inference: MONAI sliding-window inference over windows of the size the expert was trained
at, so memory stays bounded for any image size (a 2828×2320 X-ray runs as overlapping 224×224 windows)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .errors import ConfigError, DataError

Predictor = Callable[[torch.Tensor], torch.Tensor]


def round_to_32(size: Sequence[int]) -> tuple[int, int]:
    return tuple(max(32, (int(s) + 31) // 32 * 32) for s in size)  # type: ignore[return-value]


@torch.no_grad()
def sliding_window_logits(
    predictor: Predictor,
    image: torch.Tensor,
    roi_size: Sequence[int],
    *,
    overlap: float = 0.25,
    window_batch: int = 4,
    progress: bool = False,
) -> torch.Tensor:
    """Logits of one preprocessed image.

    Args:
        predictor: ``[N, C, h, w] → [N, K, h, w]`` (e.g. ``lambda x: model(x, "fundus")``).
        image: ``[C, H, W]`` float, already preprocessed; any ``H, W``.
        roi_size: window ``(h, w)`` in pixels, rounded up to multiples of 32.
        overlap: fraction of overlap between windows (blended with a Gaussian weight).
        window_batch: windows per forward pass (bounds memory).
        progress: show a progress bar over the window batches (with ETA; worth it for large images).

    Returns:
        ``[K, H, W]`` logits at the image's own resolution.
    """
    from monai.inferers import sliding_window_inference

    if image.dim() != 3:
        raise DataError(f"expected one image [C, H, W], got shape {tuple(image.shape)}")
    if not bool(torch.isfinite(image).all()):
        raise DataError("the image holds NaN or Inf values after preprocessing")
    roi = round_to_32(roi_size)
    logits = sliding_window_inference(
        image[None].float(), roi, window_batch, predictor, overlap=overlap, mode="gaussian", padding_mode="constant",
        progress=progress,
    )
    return logits[0]


TTA_FLIPS = {  # test-time augmentation: the extra views, as the image dimensions each one mirrors
    "none": (),
    "flip": ((-1,),),                   # left-right
    "flips": ((-1,), (-2,), (-2, -1)),  # left-right, up-down, both (nnU-Net's 2D mirroring)
}


def flip_averaged(predictor: Predictor, tta: str = "none") -> Predictor:
    """``predictor`` averaged over mirrored views of its input (test-time augmentation).

    Each view is the input flipped along some image axes; its logits are flipped back and the mean of the logits of
    the original and every view is returned, so every caller (sliding windows, resized input, scale resampling,
    the service) gets it unchanged. ``tta``: ``"none"`` (the predictor itself), ``"flip"`` (left-right: 2 passes),
    ``"flips"`` (left-right, up-down and both: 4 passes). Training's basic augmentation flips images, so the experts
    have seen every view.
    """
    if tta not in TTA_FLIPS:
        raise ConfigError(f"unknown test-time augmentation {tta!r}; choose one of {', '.join(TTA_FLIPS)}")
    flips = TTA_FLIPS[tta]
    if not flips:
        return predictor

    def averaged(images: torch.Tensor) -> torch.Tensor:
        total = predictor(images).float()
        for dims in flips:
            total = total + predictor(images.flip(dims)).float().flip(dims)
        return total / (1 + len(flips))

    return averaged


def mask_from_probabilities(probabilities: torch.Tensor, threshold: float | str | None = None) -> torch.Tensor:
    """``[K, H, W]`` class probabilities → ``[H, W]`` int64 class ids: the most probable class, or with
    ``threshold`` (two-class adapters only) the foreground wherever its probability exceeds it.

    A threshold below 0.5 keeps pixels the adapter is less sure of: at a new site, where its foreground
    probabilities fall, that can recover what the argmax misses (``m4oe eval --threshold``). ``threshold="otsu"``
    chooses it per image without labels: Otsu's threshold of the image's foreground probabilities
    (:func:`otsu_threshold`), for images that each hold the structure (vessels, a polyp): on an image without it,
    Otsu splits the background's own probabilities."""
    if threshold is None:
        return probabilities.argmax(dim=0)
    if probabilities.shape[0] != 2:
        raise ConfigError(f"a foreground threshold applies to two-class adapters; this one has "
                          f"{probabilities.shape[0]} classes (drop --threshold)")
    threshold = parse_threshold(threshold)
    if threshold == OTSU:
        threshold = otsu_threshold(probabilities[1])
    return (probabilities[1] > threshold).long()


OTSU = "otsu"


def parse_threshold(value: float | str | None) -> float | str | None:
    """A foreground threshold as given (a number, or text from a query string): ``None``, ``"otsu"`` or a number
    strictly between 0 and 1; anything else is a :class:`ConfigError` saying what is accepted."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() == OTSU:
            return OTSU
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"the foreground threshold must lie strictly between 0 and 1 or be {OTSU!r}, "
                              f"got {value!r}") from None
    if not 0.0 < float(value) < 1.0:
        raise ConfigError(f"the foreground threshold must lie strictly between 0 and 1 or be {OTSU!r}, got {value!r}")
    return float(value)


def otsu_threshold(probability: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of a foreground-probability map (values in [0, 1]): the bin edge of a ``bins``-bin histogram
    that maximises the between-class variance of the two sides; the upper edge of the best split, so the foreground
    is ``probability > threshold``. A constant map has no split: 0.5 (the argmax)."""
    counts = torch.histc(probability.detach().to("cpu", torch.float64).flatten(), bins=bins, min=0.0, max=1.0)
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    below = counts.cumsum(0)
    above = below[-1] - below
    mass = (counts * centres).cumsum(0)
    between = (mass[-1] * below / below[-1] - mass) ** 2 / (below * above)
    between = torch.where(torch.isfinite(between), between, torch.full_like(between, -1.0))
    if float(between.max()) <= 0:
        return 0.5
    return float(int(between.argmax()) + 1) / bins


def segment(
    predictor: Predictor, image: torch.Tensor, roi_size: Sequence[int], **options
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask [H, W] int64, probabilities [K, H, W])`` of one preprocessed image."""
    logits = sliding_window_logits(predictor, image, roi_size, **options)
    probabilities = logits.softmax(dim=0)
    return probabilities.argmax(dim=0), probabilities

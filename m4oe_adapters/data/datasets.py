"""Training datasets: samples → cached preprocessed arrays → MONAI dictionary transforms → tensors.

Each item is ``{"image": FloatTensor [C, H, W], "label": LongTensor [1, H, W], "modality", "site", "path"}``.
Sizes: ``mode="crop"`` takes native-resolution crops of ``size`` (padded when the image is smaller; random when
augmenting, centred otherwise), ``mode="resize"`` resizes the whole image (labels with nearest neighbour),
``size=None`` keeps the native size; with ``scale`` (crop mode), each image is first resampled to the adapter's
scale, as prediction resamples its inputs (:mod:`m4oe_adapters.scale`). Augmentation (flips, 90° rotations when
square, intensity scale/shift; with ``augment="site"`` also what differs between hospitals and devices: a colour cast
per channel, gamma, blur, noise and a zoom of 0.7-1.4) is seeded: the same ``seed`` and access order give the same
items, and :meth:`set_sample_seed` seeds one item, so a training run is reproducible and resumable.

Decoded, preset-normalised images are cached in memory (the shared datasets are small); bad inputs raise the
typed errors of :mod:`.readers` and :mod:`.masks` (use :func:`~.manifest.scan_samples` first to skip them).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..presets import apply_preset, default_preset
from ..scale import resample, resampling_factor
from .errors import ImageReadError
from .manifest import Sample, load_pair


def convert_channels(image: np.ndarray, channels: int, source: str | None = None) -> np.ndarray:
    """``[C, H, W]`` → ``[channels, H, W]``: RGB → grey by luminance (ITU-R 601 weights), grey → RGB by repetition.

    Raises:
        ImageReadError: any other conversion (e.g. 3 → 2 channels), naming ``source``.
    """
    current = image.shape[0]
    if current == channels:
        return image
    if current == 3 and channels == 1:
        weights = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)[:, None, None]
        return (image * weights).sum(axis=0, keepdims=True).astype(np.float32)
    if current == 1:
        return np.repeat(image, channels, axis=0)
    raise ImageReadError(f"{source or '<memory>'}: cannot convert a {current}-channel image to {channels} channels")


def normalise(image: np.ndarray, meta: dict[str, Any], preset: dict[str, Any], channels: int) -> np.ndarray:
    """``[C, H, W]`` raw → ``[channels, H, W]`` network input: the preset (told the source pixel type, so 8-bit CT
    is not re-windowed), then channel conversion."""
    normalised = apply_preset(image, preset, source_dtype=meta.get("dtype"))
    return convert_channels(normalised, channels, meta.get("source"))


AUGMENTATIONS = (False, True, "basic", "site")
# What differs between sites of one modality, drawn in the normalised image: per-channel gain (a colour cast /
# white balance), gamma (exposure, contrast curve), blur (focus, resolution), noise, and object scale (field of view,
# pixel size), within ranges seen between public datasets of one modality; not tuned on any test site.
SITE_AUGMENTATION = {"channel_gain": 0.2, "gamma": (0.7, 1.5), "blur_sigma": (0.25, 1.5), "noise_std": 0.05,
                     "zoom": (0.7, 1.4)}


class SegmentationDataset(torch.utils.data.Dataset):
    """Labelled 2D samples of one modality, preprocessed and (optionally) augmented.

    Args:
        samples: from :func:`~m4oe_adapters.data.read_manifest` or :func:`samples_from_folders`.
        preset: intensity preset (default: the modality's).
        in_channels: channels the backbone takes (1 or 3).
        size: ``(H, W)`` training size, or ``None`` for native size.
        mode: ``"crop"`` or ``"resize"``.
        augment: ``False``; ``True`` or ``"basic"``: random flips, 90° rotations and intensity jitter; ``"site"``:
            those plus the site shifts of :data:`SITE_AUGMENTATION` (for adapters meant for unseen sites).
        seed: base seed of the augmentation.
        scale: the scale the adapter is trained at (:mod:`m4oe_adapters.scale`; ``crop`` mode only): each image is
            resampled to it once, as prediction resamples every input, so images of sites with other pixel sizes
            train at one scale (a CHASE_DB1 photograph shrunk by about 0.6 beside DRIVE's).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        preset: dict[str, Any] | None = None,
        in_channels: int = 3,
        size: tuple[int, int] | None = (224, 224),
        mode: str = "crop",
        augment: bool | str = False,
        seed: int = 0,
        scale: dict[str, Any] | None = None,
    ) -> None:
        from monai.transforms import (
            CenterSpatialCropd,
            Compose,
            RandAdjustContrastd,
            RandFlipd,
            RandGaussianNoised,
            RandGaussianSmoothd,
            RandRotate90d,
            RandScaleIntensityd,
            RandShiftIntensityd,
            RandSpatialCropd,
            RandZoomd,
            Resized,
            SpatialPadd,
        )

        self.samples = list(samples)
        if not self.samples:
            raise DataError("no samples to build a dataset from; check the modality/site/split filters and paths")
        if in_channels not in (1, 3):
            raise ConfigError(f"in_channels must be 1 or 3, got {in_channels!r}")
        if mode not in ("crop", "resize"):
            raise ConfigError(f"mode must be 'crop' or 'resize', got {mode!r}")
        if augment not in AUGMENTATIONS:
            raise ConfigError(f"augment must be one of {', '.join(map(repr, AUGMENTATIONS))}, got {augment!r}")
        self.preset = preset or default_preset(self.samples[0].modality)
        self.in_channels = in_channels
        self.scale = scale if mode == "crop" else None  # a resized image has no pixel size left to match
        self.factors: dict[int, float] = {}  # resampling factor of each image loaded so far (1.0: left as it is)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        keys = ["image", "label"]
        steps: list = []
        # "resize" is deterministic, so it runs once when an image enters the cache, not at every step (a 2828 x 2320
        # X-ray resized 600 times made training several times slower); labels by nearest neighbour: no new class ids.
        self._resize = (Resized(keys, spatial_size=size, mode=("bilinear", "nearest"))
                        if size is not None and mode == "resize" else None)
        if size is not None:
            if mode != "resize":
                steps.append(SpatialPadd(keys, spatial_size=size))
                steps.append(RandSpatialCropd(keys, roi_size=size, random_size=False) if augment
                             else CenterSpatialCropd(keys, roi_size=size))
        if augment:
            steps += [RandFlipd(keys, prob=0.5, spatial_axis=1), RandFlipd(keys, prob=0.2, spatial_axis=0)]
            if size is not None and size[0] == size[1]:  # a 90° turn would change a non-square shape
                steps.append(RandRotate90d(keys, prob=0.3, max_k=3))
            steps += [
                RandScaleIntensityd("image", factors=0.1, prob=0.5),
                RandShiftIntensityd("image", offsets=0.1, prob=0.5),
            ]
        if augment == "site":
            shift = SITE_AUGMENTATION
            steps += [
                RandScaleIntensityd("image", factors=shift["channel_gain"], prob=0.8, channel_wise=True),
                RandAdjustContrastd("image", gamma=shift["gamma"], prob=0.5),
                RandGaussianSmoothd("image", sigma_x=shift["blur_sigma"], sigma_y=shift["blur_sigma"], prob=0.3),
                RandGaussianNoised("image", std=shift["noise_std"], prob=0.2),
                RandZoomd(keys, min_zoom=shift["zoom"][0], max_zoom=shift["zoom"][1], prob=0.5,
                          mode=("bilinear", "nearest"), keep_size=True),
            ]
        self.transform = Compose(steps)
        self.transform.set_random_state(seed=seed)

    def __len__(self) -> int:
        return len(self.samples)

    def set_sample_seed(self, seed: int) -> None:
        """Seed the augmentation of the next item (the training loop passes one seed per step)."""
        self.transform.set_random_state(seed=seed)

    def preprocessed(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image [C, H, W], mask [H, W])`` after the preset (cached): native resolution, or the training size in
        ``resize`` mode."""
        if index not in self._cache:
            image, mask, meta = load_pair(self.samples[index])
            factor = resampling_factor(self.scale, image, meta) if self.scale else 1.0
            image = normalise(image, meta, self.preset, self.in_channels)
            if factor != 1.0:  # as predict_probabilities_at_scale resamples an input, labels by nearest neighbour
                image, mask = resample_pair(image, mask, factor)
            self.factors[index] = factor
            if self._resize is not None:
                item = self._resize({"image": torch.from_numpy(image), "label": torch.from_numpy(mask[None].copy())})
                image = np.asarray(item["image"].as_tensor() if hasattr(item["image"], "as_tensor") else item["image"])
                label = item["label"]
                mask = np.asarray(label.as_tensor() if hasattr(label, "as_tensor") else label)[0].astype(mask.dtype)
            self._cache[index] = (image, mask)
        return self._cache[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask = self.preprocessed(index)
        item = self.transform({"image": torch.from_numpy(image.copy()), "label": torch.from_numpy(mask[None].copy())})
        # MONAI returns MetaTensors; plain tensors keep collate and torch.compile simple.
        sample = self.samples[index]
        image, label = item["image"], item["label"]
        return {
            "image": (image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)).float(),
            "label": (label.as_tensor() if hasattr(label, "as_tensor") else torch.as_tensor(label)).long(),
            "modality": sample.modality,
            "site": sample.site,
            "path": str(sample.image),
        }


def resample_pair(image: np.ndarray, mask: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """``image [C, H, W]`` and ``mask [H, W]`` enlarged by ``factor``: the image as prediction resamples an input
    (:func:`m4oe_adapters.scale.resample`), the mask by nearest neighbour (no new class ids)."""
    import torch.nn.functional as F

    resampled = resample(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), factor)
    labels = F.interpolate(torch.from_numpy(np.ascontiguousarray(mask))[None, None].float(),
                           size=tuple(resampled.shape[-2:]), mode="nearest-exact")[0, 0]
    return resampled.numpy().astype(image.dtype, copy=False), labels.numpy().astype(mask.dtype)

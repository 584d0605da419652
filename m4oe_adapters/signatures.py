"""Image signatures: what an adapter carries to recognise the images it was made for.

A signature is fitted on the adapter's own training images and nothing else, so adding or removing an adapter never
changes another adapter's scores (routing needs no joint retraining).

    raw image [C, H, W] (any intensity scale)
      → routing thumbnail [3, 160, 160]: percentiles 0.5–99.5 over all channels to [0, 1], grey repeated to RGB
      → image descriptor [200]: colour (chroma, rg-chromaticity and saturation of lit pixels, specular highlights),
        layout (4×4 and 8×8 grey maps, a 4×4 dark-pixel map: the black surround of fundus, endoscopy and CT; a
        radial profile), grey histogram, texture (gradient-magnitude histograms and local contrast at three scales,
        4-neighbour sign patterns at two), and the radial power spectrum
      → per adapter: a Gaussian over descriptors of its training images *and* augmented views of them (crops,
        flips, colour casts, saturation, gamma, contrast, blur: the changes a new site brings), its covariance
        shrunk towards the diagonal and stored as 32 principal directions plus a per-feature residual variance
      → score = Mahalanobis distance² / D (lower is closer)

Why these descriptors and not the frozen backbone's pooled features: on the shared data (nine zoo adapters, their
held-out images) nearest-neighbour modality recognition reached 0.55–0.69 with pooled multi-stage features of the
reference backbone at 64–224 px, 0.74 with its patch-embedding statistics, and 0.875 with a first version of these
descriptors (``docs/routing.md``: the measurements). They also cost almost nothing: one 160-px thumbnail per image, no
backbone pass, so routing stays a small fraction of a segmentation forward (``m4oe bench`` reports it).

Calibration: the adapter's training images are split into five folds; each fold's views are scored by a Gaussian fitted
on the other four. Those held-out scores (their quantiles are stored) turn a score into a *confidence*: the fraction
of the adapter's own held-out views that fit it worse (an empirical p-value up to the 95th percentile, an exponential
tail beyond it). The default acceptance threshold, ``min_confidence``, is stored with the signature.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .adapter_header import SIGNATURE_PREFIX, SIGNATURE_TENSORS
from .errors import ConfigError, DataError

FEATURE_VERSION = "m4oe-descriptor-2"
THUMBNAIL_SIZE = 160
CALIBRATION_POINTS = 101  # stored quantiles of the held-out calibration scores
TAIL_QUANTILE = 95  # confidence is empirical up to this calibration percentile, an exponential tail beyond
DEFAULT_VIEWS = 8  # augmented views per training image
DEFAULT_MIN_CONFIDENCE = 1e-3
COMPONENTS = 32  # principal directions kept with their own variance; the rest gets a per-feature residual variance
BORDER_TOLERANCE = 0.02  # frame pixels lie this close (share of the value range) to the corner's colour
MAX_BORDER = 0.45  # at most this share of the height or width is taken as a frame per side
SHRINKAGE = 0.2  # covariance shrunk 20 % towards its diagonal: hundreds of views, a few hundred dimensions
# An image whose neighbouring pixels correlate less than this is pixel noise, not an image of any modality: white
# noise sits near 0 (±0.01 for 64 px), every image of the shared data at 0.69 or more (spinal-cord MRI, the lowest;
# electron microscopy 0.78, CT 0.80, every other modality above 0.89): far from both (tests/test_routing.py).
NOISE_CORRELATION = 0.3


# ---------------------------------------------------------------------------------------------- descriptors
def routing_thumbnails(images: torch.Tensor | np.ndarray | Iterable) -> torch.Tensor:
    """Images of any size and intensity scale → ``[B, 3, 160, 160]`` in [0, 1].

    Args:
        images: ``[C, H, W]``, ``[B, C, H, W]`` or a list of ``[C, H, W]`` arrays/tensors of different sizes
            (C = 1 or 3; other channel counts keep their first three, or repeat the first).

    Each image is scaled by its own 0.5/99.5 percentiles over all channels, so any affine intensity preset applied
    before (HU windows without clipping, percentile or min/max scaling) gives the same thumbnail.
    """
    if isinstance(images, (torch.Tensor, np.ndarray)) and np.ndim(images) == 4:
        images = list(images)
    elif isinstance(images, (torch.Tensor, np.ndarray)):
        images = [images]
    thumbs = [_thumbnail(torch.as_tensor(np.asarray(image) if isinstance(image, np.ndarray) else image))
              for image in images]
    if not thumbs:
        raise DataError("no images to route")
    return torch.stack(thumbs)


def without_border(image: torch.Tensor | np.ndarray) -> torch.Tensor | None:
    """``image`` (``[C, H, W]`` or ``[H, W]``) without a frame of one constant colour (letterboxing, another export's
    margins): the edge rows and columns whose every pixel lies within 2 % of the value range of the top-left corner's
    colour, at most 45 % of the size per side. ``None`` when there is no such frame."""
    image = torch.as_tensor(np.asarray(image) if isinstance(image, np.ndarray) else image).detach().float()
    if image.dim() == 2:
        image = image[None]
    height, width = image.shape[-2:]
    low, high = image.aminmax()
    tolerance = BORDER_TOLERANCE * float(high - low)
    corner = image[:, :1, :1]
    # A frame needs one whole edge line of the corner's colour; most images have none, and then the four lines
    # (not every pixel) are all that is compared.
    edges = (image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1])
    if not any(bool(((line - corner[:, 0]).abs().amax(0) <= tolerance).all()) for line in edges):
        return None
    flat = (image - corner).abs().amax(0) <= tolerance  # [H, W]: the pixel has the corner's colour
    rows, columns = flat.all(1).tolist(), flat.all(0).tolist()

    def run(values: list[bool], limit: int) -> int:
        count = 0
        while count < limit and values[count]:
            count += 1
        return count

    top, bottom = run(rows, int(MAX_BORDER * height)), run(rows[::-1], int(MAX_BORDER * height))
    left, right = run(columns, int(MAX_BORDER * width)), run(columns[::-1], int(MAX_BORDER * width))
    if top + bottom + left + right == 0:
        return None
    return image[:, top : height - bottom, left : width - right]


def as_image_list(images) -> list:
    """``[B, C, H, W]`` → its B images; one ``[C, H, W]`` or ``[H, W]`` image → ``[image]``; a list stays a list."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return list(images) if np.ndim(images) == 4 else [images]
    return list(images)


def neighbour_correlation(image: torch.Tensor | np.ndarray) -> float:
    """Pearson correlation of horizontally and vertically adjacent pixels of an image (``[C, H, W]`` or ``[H, W]``;
    the mean of its first three channels), at its native resolution, over about 64 evenly spaced rows and 64
    columns (enough: white noise gives 0 ± 0.01 from them). Near 0 for pixel noise, near 1 for photographs and
    scans; 1 for a constant image (there is nothing to refuse as noise: the signatures refuse a blank frame)."""
    pixels = torch.as_tensor(np.asarray(image) if isinstance(image, np.ndarray) else image).detach()
    if pixels.dim() == 2:
        pixels = pixels[None]
    pixels = pixels[:3]
    height, width = pixels.shape[-2:]
    # only the sampled rows and columns are converted, so a 3500-px photograph costs what a 224-px one does
    rows = pixels[:, :: max(1, height // 64)].to("cpu", torch.float64).mean(0)
    columns = pixels[:, :, :: max(1, width // 64)].to("cpu", torch.float64).mean(0)
    first = torch.cat([rows[:, :-1].reshape(-1), columns[:-1].reshape(-1)])
    second = torch.cat([rows[:, 1:].reshape(-1), columns[1:].reshape(-1)])
    if first.numel() < 2:
        return 1.0
    first, second = first - first.mean(), second - second.mean()
    norm = float((first.square().sum() * second.square().sum()).sqrt())
    return 1.0 if norm == 0 or not np.isfinite(norm) else float((first * second).sum()) / norm


def looks_like_noise(image: torch.Tensor | np.ndarray) -> bool:
    """Whether an image is pixel noise (:func:`neighbour_correlation` under :data:`NOISE_CORRELATION`): routing
    refuses it whatever the signatures say. An image in a constant-colour frame is judged by the picture inside
    (a frame's equal neighbours would hide noise). Smoothed or upsampled noise correlates and is left to the
    signatures."""
    inner = without_border(image)
    return neighbour_correlation(image if inner is None else inner) < NOISE_CORRELATION


def routing_descriptors(images) -> list[torch.Tensor]:
    """What the router scores, per image a ``[V, D]`` stack: the image's descriptor and, when the image has a
    constant-colour frame (:func:`without_border`), also the descriptor of the image without it; each adapter keeps
    its better fit (``routing.view_scores``), so a letterboxed image routes like the picture inside it.

    Args:
        images: as for :func:`routing_thumbnails`.
    """
    images = as_image_list(images)
    plain = image_descriptors(routing_thumbnails(images))
    framed = {index: inner for index, image in enumerate(images) if (inner := without_border(image)) is not None}
    inner = dict(zip(framed, image_descriptors(routing_thumbnails(list(framed.values()))))) if framed else {}
    return [torch.stack([plain[index], inner[index]]) if index in inner else plain[index : index + 1]
            for index in range(len(images))]


def _thumbnail(image: torch.Tensor) -> torch.Tensor:
    if image.dim() == 2:
        image = image[None]
    if image.dim() != 3:
        raise DataError(f"routing expects [C, H, W] images, got shape {tuple(image.shape)}")
    image = image.detach().to("cpu", torch.float32)
    # a NaN or Inf makes the sum non-finite; only then (or on overflow) is every pixel checked
    if not bool(torch.isfinite(image.sum())) and not bool(torch.isfinite(image).all()):
        raise DataError("the image holds NaN or Inf values; it cannot be routed")
    image = image[:3] if image.shape[0] >= 3 else image[:1].repeat(3, 1, 1)
    flat = image.reshape(-1)
    flat = flat[:: max(1, flat.numel() // 300_000)]  # percentiles of a strided sample: same to < 1/256 on real images
    low, high = _percentile(flat, 0.005), _percentile(flat, 0.995)
    image = ((image - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)
    return F.interpolate(image[None], size=(THUMBNAIL_SIZE, THUMBNAIL_SIZE), mode="bilinear", antialias=True,
                         align_corners=False)[0]


def _percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) of a 1-d tensor from a partial sort of the tail that holds
    it: for q near 0 or 1 a few thousand values instead of sorting all of them (3× faster on a 512-px image).

    On a large tensor the tail is first narrowed to the values beyond a cut taken from every 16th value; when at
    least as many values as the tail needs lie beyond it, the tail's most extreme values are all among them, so the
    result is exact either way (the cut only saves time: half, on a 224-px colour image)."""
    count = values.numel()
    position = torch.tensor(q, dtype=values.dtype) * (count - 1)  # in the values' dtype, as torch.quantile does
    index = int(position.floor())
    below, above = (index, min(index + 1, count - 1)) if q <= 0.5 else (count - 1 - index, max(count - 2 - index, 0))
    needed, largest = max(below, above) + 1, q > 0.5
    candidates = values
    if count >= 20_000 and needed * 8 <= count:
        sample = values[::16]
        rank = min(sample.numel() - 1, 2 * needed // 16 + 8)  # about twice the tail's share of the sample
        cut = torch.topk(sample, rank + 1, largest=largest, sorted=True).values[rank]
        beyond = values[values >= cut] if largest else values[values <= cut]
        if beyond.numel() >= needed:
            candidates = beyond
    tail = torch.topk(candidates, needed, largest=largest, sorted=True).values
    return torch.lerp(tail[below], tail[above], position - index)


def _histogram(values: torch.Tensor, edges: list[float]) -> torch.Tensor:
    """Share of each sample's values in ``[edges[i], edges[i + 1])`` (increasing edges; values outside every bin count
    nowhere): ``[B, ...]`` → ``[B, len(edges) - 1]``. One ``bucketize`` and one ``bincount`` per call (a comparison
    and a cast per edge cost 10× more); edges are compared in the values' dtype, as ``values >= edge`` would."""
    flat = values.reshape(values.shape[0], -1)
    bounds = torch.tensor(edges, dtype=flat.dtype, device=flat.device)
    slots = len(edges) + 1  # bucketize(right=True) gives i where edges[i-1] <= v < edges[i]: bin j is slot j + 1
    index = torch.bucketize(flat, bounds, right=True)
    index += torch.arange(flat.shape[0], device=flat.device)[:, None] * slots
    counts = torch.bincount(index.reshape(-1), minlength=flat.shape[0] * slots).reshape(flat.shape[0], slots)
    return counts[:, 1 : len(edges)].float() / flat.shape[1]


def image_descriptors(thumbnails: torch.Tensor) -> torch.Tensor:
    """``[B, 3, 160, 160]`` thumbnails → ``[B, D]`` descriptors (D = 200), float64 for stable statistics."""
    batch = thumbnails.shape[0]
    x = thumbnails.float()
    grey = x.mean(1, keepdim=True)
    chroma = x - grey
    brightest, darkest = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    saturation = (brightest - darkest) / brightest.clamp_min(1e-3)
    lit = (grey > 0.1).float()
    weights = lit / lit.sum((2, 3), keepdim=True).clamp_min(1)
    chromaticity = ((x / x.sum(1, keepdim=True).clamp_min(1e-3)) * weights).sum((2, 3))
    parts = [
        chroma.abs().mean((1, 2, 3))[:, None], chroma.mean((2, 3)), _std(chroma),
        (grey < 0.05).float().mean((1, 2, 3))[:, None], (grey > 0.95).float().mean((1, 2, 3))[:, None],
        F.adaptive_avg_pool2d(grey, 4).reshape(batch, -1),
        F.adaptive_avg_pool2d((grey < 0.05).float(), 4).reshape(batch, -1),
        _histogram(grey, [i / 10 for i in range(10)] + [1.0001]),
        chromaticity,
        _histogram(torch.where(lit > 0, saturation, torch.full_like(saturation, -1)), [0, .1, .2, .35, .5, .7, 1.01]),
        ((grey > 0.9) & (saturation < 0.2)).float().mean((1, 2, 3))[:, None],
    ]
    for scaled in (grey, F.avg_pool2d(grey, 2), F.avg_pool2d(grey, 4)):
        parts.append(_histogram(_sobel_magnitude(scaled), [0, .005, .01, .02, .04, .08, .16, 10.0]))
        squares, means = _box_mean(torch.cat([scaled ** 2, scaled], 1), 5).split(1, 1)
        variance = squares - means ** 2
        parts.append(variance.clamp_min(0).sqrt().mean((1, 2, 3))[:, None])
    # Finer layout (8×8 grey), the radial profile (circular fields of view), the power spectrum (speckle, smooth
    # MRI, membranes) and 4-neighbour sign patterns (local texture) at two scales.
    parts.append(F.adaptive_avg_pool2d(grey, 8).reshape(batch, -1))
    rings, bands = _masks(x.shape[-1], str(x.device))
    parts.append(grey[:, 0].reshape(batch, -1) @ rings)
    power = torch.fft.fft2(grey[:, 0] - grey[:, 0].mean((1, 2), keepdim=True)).abs() ** 2
    band_power = power.reshape(batch, -1) @ bands
    parts.append(torch.log(band_power / band_power.sum(1, keepdim=True).clamp_min(1e-12) + 1e-6) / 10)
    for scaled in (grey, F.avg_pool2d(grey, 2)):
        centre = scaled[..., 1:-1, 1:-1]
        neighbours = (scaled[..., :-2, 1:-1], scaled[..., 2:, 1:-1], scaled[..., 1:-1, :-2], scaled[..., 1:-1, 2:])
        code = sum((n > centre + 0.01).long() << bit for bit, n in enumerate(neighbours)).reshape(batch, -1)
        offsets = torch.arange(batch, device=x.device)[:, None] * 16
        counts = torch.bincount((code + offsets).reshape(-1), minlength=batch * 16).reshape(batch, 16)
        parts.append(counts.float() / code.shape[1])
    return torch.cat(parts, 1).double()


def _sobel_magnitude(image: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude of the 3×3 Sobel filter (÷ 8) at pixels 2 or more from the border, ``[B, 1, h-4, w-4]``;
    separable differences and sums (a 3×3 convolution is 10× slower on CPU for one channel)."""
    difference = image[..., :, 2:] - image[..., :, :-2]
    gx = (difference[..., :-2, :] + 2 * difference[..., 1:-1, :] + difference[..., 2:, :]) / 8
    smooth = image[..., :, :-2] + 2 * image[..., :, 1:-1] + image[..., :, 2:]
    gy = (smooth[..., 2:, :] - smooth[..., :-2, :]) / 8
    return (gx ** 2 + gy ** 2).sqrt()[..., 1:-1, 1:-1]


def _std(values: torch.Tensor) -> torch.Tensor:
    """``values.std((2, 3))`` (unbiased), computed directly: torch's strided std is 15× slower on CPU."""
    count = values.shape[2] * values.shape[3]
    centred = values - values.mean((2, 3), keepdim=True)
    return ((centred ** 2).sum((2, 3)) / (count - 1)).sqrt()


def _box_mean(values: torch.Tensor, size: int) -> torch.Tensor:
    """``F.avg_pool2d(values, size, 1)`` from running sums in float64 (5× faster on CPU, as exact)."""
    total = values.double().cumsum(-1)
    total = torch.cat([total[..., size - 1 : size], total[..., size:] - total[..., :-size]], -1)
    total = total.cumsum(-2)
    total = torch.cat([total[..., size - 1 : size, :], total[..., size:, :] - total[..., :-size, :]], -2)
    return (total / size ** 2).to(values.dtype)


@functools.lru_cache(maxsize=4)
def _masks(size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``[size², 8]`` ring weights (mean over each of 8 rings of the normalised distance from the centre, 1 = the
    corner) and ``[size², 11]`` 0/1 masks of radial spatial-frequency bands, so both profiles are one matmul."""
    coordinates = torch.arange(size, dtype=torch.float32, device=device)
    y, x = torch.meshgrid(coordinates, coordinates, indexing="ij")
    centre = (size - 1) / 2
    radius = (((y - centre) ** 2 + (x - centre) ** 2).sqrt() / (centre * 2 ** 0.5)).reshape(-1)
    fy, fx = torch.meshgrid(torch.fft.fftfreq(size, device=device), torch.fft.fftfreq(size, device=device),
                            indexing="ij")
    frequency = (fy ** 2 + fx ** 2).sqrt().reshape(-1)
    edges = torch.linspace(0, 1, 9, device=device)
    rings = torch.stack([((radius >= lo) & (radius < hi + 1e-6)).float() for lo, hi in zip(edges, edges[1:])], 1)
    bands = [0, .01, .02, .04, .06, .09, .13, .18, .25, .35, .5, .8]
    band_masks = torch.stack([((frequency >= lo) & (frequency < hi)).float() for lo, hi in zip(bands, bands[1:])], 1)
    return rings / rings.sum(0), band_masks


def augmented_views(thumbnails: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random view of each thumbnail, as a new site might show it: a crop of 60–100 % of the area (aspect
    0.8–1.25), a flip, for colour images a cast of ±25 % per channel and saturation ×0.6–1.4 (cameras and white
    balance differ most between sites), gamma 0.7–1.4, contrast 0.8–1.2 and brightness ±0.1, a 2× blur with
    probability 0.3; then the routing normalisation again."""
    size = THUMBNAIL_SIZE
    views = []

    def uniform(low: float, high: float) -> float:
        return float(torch.empty(1).uniform_(low, high, generator=generator))

    for image in thumbnails:
        area, aspect = uniform(0.6, 1.0), uniform(0.8, 1.25)
        height = int(min(size, size * (area * aspect) ** 0.5))
        width = int(min(size, size * (area / aspect) ** 0.5))
        top = int(torch.randint(0, size - height + 1, (1,), generator=generator))
        left = int(torch.randint(0, size - width + 1, (1,), generator=generator))
        view = F.interpolate(image[None, :, top : top + height, left : left + width], size=(size, size),
                             mode="bilinear", align_corners=False)
        if uniform(0, 1) < 0.5:
            view = view.flip(-1)
        if bool((image[0] != image[1]).any()):  # colour: a cast of ±25 % per channel, saturation ×0.6–1.4
            view = view * torch.empty(1, 3, 1, 1).uniform_(0.75, 1.25, generator=generator)
            grey = view.mean(1, keepdim=True)
            view = grey + (view - grey) * uniform(0.6, 1.4)
        view = view.clamp(0, 1) ** uniform(0.7, 1.4)
        view = view * uniform(0.8, 1.2) + uniform(-0.1, 0.1)
        if uniform(0, 1) < 0.3:
            view = F.interpolate(F.avg_pool2d(view, 2), size=(size, size), mode="bilinear", align_corners=False)
        views.append(view[0])
    return routing_thumbnails(torch.stack(views))


# ---------------------------------------------------------------------------------------------- the signature
@dataclass
class ImageSignature:
    """One adapter's recogniser of its own images.

    Attributes:
        mean: ``[D]`` mean descriptor of the training images and their views.
        components, eigenvalues: ``[k, D]`` and ``[k]``, the k (≤ 32) leading principal directions of the shrunk
            covariance and their variances.
        residual: ``[D]`` the variance left per feature outside those directions (floored at 5 % of the median
            feature variance plus 1e-4, so a feature constant in training does not put every new image
            infinitely far, and fp16 files keep it positive).
        calibration: ``[101]`` quantiles (0, 1, ..., 100 %) of held-out calibration scores (module docstring).
        min_confidence: default acceptance threshold on :meth:`confidence`.
        images: how many training images it was fitted on; ``views``: augmented views per image.
        image_hashes: short content hashes of those images (so an evaluation can exclude them).
    """

    mean: torch.Tensor
    components: torch.Tensor
    eigenvalues: torch.Tensor
    residual: torch.Tensor
    calibration: torch.Tensor
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    images: int = 0
    views: int = DEFAULT_VIEWS
    image_hashes: tuple[str, ...] = ()
    feature: str = FEATURE_VERSION

    # ------------------------------------------------------------------------------------ fit
    @classmethod
    def fit(
        cls,
        thumbnails: torch.Tensor,
        *,
        views: int = DEFAULT_VIEWS,
        seed: int = 0,
        min_confidence: float = DEFAULT_MIN_CONFIDENCE,
        image_hashes: Iterable[str] = (),
    ) -> "ImageSignature":
        """Fit on ``[N, 3, 160, 160]`` routing thumbnails of the adapter's training images (N >= 1)."""
        count = thumbnails.shape[0]
        if count < 1:
            raise ConfigError("a signature needs at least one training image")
        generator = torch.Generator().manual_seed(seed)
        per_view = [image_descriptors(thumbnails)]
        for _ in range(views):
            per_view.append(image_descriptors(augmented_views(thumbnails, generator)))
        descriptors = torch.stack(per_view, 1)  # [N, views + 1, D]
        width = descriptors.shape[-1]
        gaussian = _gaussian(descriptors.reshape(-1, width))
        held_out = []
        if count >= 2:
            order = torch.randperm(count, generator=generator)
            folds = min(5, count)
            for fold in range(folds):
                test = set(order[fold::folds].tolist())
                train = [i for i in order.tolist() if i not in test]
                fold_gaussian = _gaussian(descriptors[train].reshape(-1, width))
                held_out.append(_score(descriptors[sorted(test)].reshape(-1, width), *fold_gaussian))
        else:  # one image: its augmented views against the Gaussian of all views (optimistic; stated in the docs)
            held_out.append(_score(descriptors.reshape(-1, width), *gaussian))
        scores = torch.cat(held_out)
        calibration = torch.quantile(scores, torch.linspace(0, 1, CALIBRATION_POINTS, dtype=scores.dtype))
        return cls(*(t.float() for t in gaussian), calibration.float(), float(min_confidence), int(count),
                   int(views), tuple(image_hashes))

    # ------------------------------------------------------------------------------------ scoring
    def score(self, descriptors: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` descriptors → ``[B]`` Mahalanobis distances² / D (lower: closer to the training images)."""
        return _score(descriptors.double(), self.mean.double(), self.components.double(), self.eigenvalues.double(),
                      self.residual.double())

    def relative_score(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores divided by the median held-out calibration score: comparable across adapters (1 = typical)."""
        return scores / self.calibration[CALIBRATION_POINTS // 2].double().clamp_min(1e-12)

    def confidence(self, scores: torch.Tensor) -> torch.Tensor:
        """``[B]`` in [0, 1]: the fraction of the adapter's held-out calibration views that score worse, up to their
        95th percentile; past it an exponential tail (each further q50-to-q95 distance divides it by e), so a few
        atypical training images do not make the adapter accept anything."""
        return calibrated_confidence(self.calibration.double(), scores.double())

    # ------------------------------------------------------------------------------------ storage
    def tensors(self) -> dict[str, torch.Tensor]:
        """File tensors under ``signature.*`` (about 35 KB in fp32, 17 KB in fp16)."""
        return {f"{SIGNATURE_PREFIX}{name}": getattr(self, name).detach().float().contiguous()
                for name in SIGNATURE_TENSORS}

    def metadata(self) -> dict[str, Any]:
        return {"feature": self.feature, "min_confidence": self.min_confidence, "images": self.images,
                "views": self.views, "image_hashes": list(self.image_hashes)}

    @classmethod
    def from_file(cls, metadata: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "ImageSignature":
        """Rebuild from an adapter file's ``routing`` metadata and ``signature.*`` tensors (already validated)."""
        values = [tensors[f"{SIGNATURE_PREFIX}{name}"].float() for name in SIGNATURE_TENSORS]
        return cls(*values, float(metadata["min_confidence"]), int(metadata["images"]), int(metadata["views"]),
                   tuple(metadata.get("image_hashes", ())), str(metadata["feature"]))


def calibrated_confidence(calibration: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """:meth:`ImageSignature.confidence` of ``scores`` ``[..., B]`` under sorted calibration quantiles
    ``[..., CALIBRATION_POINTS]`` (float64; leading dimensions: one row per signature, so several adapters are
    scored in one call)."""
    scores = scores.contiguous()
    fraction = 1.0 - torch.searchsorted(calibration, scores, right=False).double() / (calibration.shape[-1] - 1)
    edge = calibration[..., TAIL_QUANTILE : TAIL_QUANTILE + 1]
    median = calibration[..., CALIBRATION_POINTS // 2 : CALIBRATION_POINTS // 2 + 1]
    tail = (1 - TAIL_QUANTILE / 100) * torch.exp(-(scores - edge) / (edge - median).clamp_min(1e-12))
    return torch.where(scores > edge, tail, fraction.clamp(1 - TAIL_QUANTILE / 100, 1.0))


def image_hash(path, slice_index: int | None = None) -> str:
    """16 hex digits of sha256 over the file's bytes (and the slice index): the same image in two folders (the
    shared data's ``_subset`` copies) hashes alike."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256(Path(path).read_bytes())
    if slice_index is not None:
        digest.update(f"slice={slice_index}".encode())
    return digest.hexdigest()[:16]


def signature_from_samples(samples, *, views: int = DEFAULT_VIEWS, seed: int = 0,
                           min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> ImageSignature:
    """Fit a signature on the images of manifest/folder samples (masks are not read; each distinct image once)."""
    from .data import read_image

    unique = {}
    for sample in samples:
        unique.setdefault((str(sample.image), sample.slice_index), sample)
    if not unique:
        raise ConfigError("a signature needs at least one training image")
    arrays, hashes = [], []
    for sample in unique.values():
        record = read_image(sample.image, slice_axis=getattr(sample, "slice_axis", 2), slice_index=sample.slice_index)
        arrays.append(record.array)
        hashes.append(image_hash(sample.image, sample.slice_index))
    return ImageSignature.fit(routing_thumbnails(arrays), views=views, seed=seed, min_confidence=min_confidence,
                              image_hashes=sorted(set(hashes)))


def descriptor_size() -> int:
    """D, the length of :func:`image_descriptors` (200 for ``m4oe-descriptor-2``)."""
    return int(image_descriptors(torch.zeros(1, 3, THUMBNAIL_SIZE, THUMBNAIL_SIZE)).shape[1])


def _gaussian(descriptors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(mean, components [k, D], eigenvalues [k], residual [D])`` of descriptors ``[M, D]``."""
    mean = descriptors.mean(0)
    centred = descriptors - mean
    covariance = centred.T @ centred / max(1, descriptors.shape[0])
    diagonal = covariance.diagonal().clone()
    floor = 0.05 * diagonal.median() + 1e-4  # descriptors live in [0, 1]: σ = 0.01 is below any real difference
    covariance = (1 - SHRINKAGE) * covariance + SHRINKAGE * torch.diag(diagonal)
    eigenvalues, vectors = torch.linalg.eigh(covariance)
    keep = min(COMPONENTS, descriptors.shape[0] - 1, len(mean))
    order = eigenvalues.argsort(descending=True)[: max(keep, 0)]
    components, values = vectors[:, order].T, eigenvalues[order].clamp_min(floor)
    residual = (covariance.diagonal() - (components ** 2 * values[:, None]).sum(0)).clamp_min(0) + floor
    if keep < 1:  # a single descriptor: no direction is known, the residual carries everything
        components, values = torch.zeros(1, len(mean), dtype=mean.dtype), torch.ones(1, dtype=mean.dtype)
    return mean, components, values, residual


def _score(descriptors, mean, components, eigenvalues, residual) -> torch.Tensor:
    centred = descriptors - mean
    projected = centred @ components.T
    rest = centred - projected @ components
    return ((projected ** 2 / eigenvalues).sum(1) + (rest ** 2 / residual).sum(1)) / descriptors.shape[1]


__all__ = ["ImageSignature", "augmented_views", "descriptor_size", "image_descriptors", "image_hash",
           "routing_thumbnails", "signature_from_samples"]

"""The site-generalisation protocol (Cekmeceli et al. 2024): train on the images of some sites, test on held-out
images of those sites (in-domain) and on every image of sites never seen (out-of-domain), for each training mode and
number of labelled images.

    pool of train sites ─┬─ in-domain test images (the dataset's own ``test`` split, else a seeded 30%)
                         └─ remaining images → shots + validation → fit (per mode) → evaluate in- and out-of-domain
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Sequence

from .adapt import fit_modality
from .backbones import Backbone
from .errors import DataError
from .evaluation import evaluate_samples
from .presets import known_modality
from .runtime import device_predictor, module_device
from .scale import scale_for_modality
from .training import TrainConfig


def split_in_domain(pool: Sequence, seed: int, test_fraction: float = 0.3) -> tuple[list, list]:
    """``(development, in-domain test)`` images of the training sites, split by group (:func:`sample_group`: a
    video's frames, a volume's slices, a child's two eyes stay on one side). The manifest's ``test`` hints are used
    when they split whole groups, and a site of the pool that has no hint then gets its own random
    ``test_fraction`` of its groups (DRIVE's hinted split beside CHASE_DB1's children); hints that would put frames of
    one video on both sides are ignored (the test images would have near-duplicates in training), and a random
    split of ``test_fraction`` of the groups is made instead (of the images when all are one group)."""
    from .data import sample_group

    marked = [s for s in pool if getattr(s, "split_hint", "") == "test"]
    if marked and len(marked) < len(pool):
        test_groups = {sample_group(s) for s in marked}
        development = [s for s in pool if getattr(s, "split_hint", "") != "test"]
        if not any(sample_group(s) in test_groups for s in development):
            hinted_sites = {getattr(s, "site", "") for s in marked}
            unhinted = [s for s in development if getattr(s, "site", "") not in hinted_sites]
            held = {id(s) for s in _random_split(unhinted, seed, test_fraction)[1]} if unhinted else set()
            return ([s for s in development if id(s) not in held],
                    [s for s in pool if getattr(s, "split_hint", "") == "test" or id(s) in held])
    return _random_split(pool, seed, test_fraction)


def _random_split(pool: Sequence, seed: int, test_fraction: float) -> tuple[list, list]:
    """A seeded random ``test_fraction`` of the groups of ``pool`` held out (of its images when it is one group)."""
    from .data import sample_group

    groups = sorted({sample_group(s) for s in pool})
    if len(groups) < 2:  # one video only: nothing to hold out whole, so its frames are split (they will leak)
        groups = sorted({str(s.image) for s in pool})
        random.Random(seed).shuffle(groups)
        held = set(groups[: max(1, round(test_fraction * len(groups)))])
        return [s for s in pool if str(s.image) not in held], [s for s in pool if str(s.image) in held]
    random.Random(seed).shuffle(groups)
    held = set(groups[: max(1, round(test_fraction * len(groups)))])
    return [s for s in pool if sample_group(s) not in held], [s for s in pool if sample_group(s) in held]


def run_protocol(
    backbone_factory: Callable[[], Backbone],
    samples: Sequence,
    modality: str,
    *,
    train_sites: Sequence[str],
    test_sites: Sequence[str],
    modes: Sequence[str] = ("experts",),
    shots: Sequence[int | None] = (None,),
    train_config: TrainConfig | None = None,
    in_chans: int = 3,
    size: tuple[int, int] = (224, 224),
    resize_mode: str = "crop",
    val_count: int = 4,
    expert_config=None,
    max_test_images: int | None = None,
    keep_predictions: bool = True,
    save_dir: str | Path | None = None,
    label_names: Sequence[str] | None = None,
    preset: dict[str, Any] | None = None,
    augment: str = "basic",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Fit each (mode, shots) on ``train_sites`` and score it in- and out-of-domain.

    Returns:
        ``(rows, skipped)`` as :func:`~m4oe_adapters.evaluation.evaluate_samples`, each row tagged with ``mode``,
        ``shots`` (``"all"`` for every image), ``domain`` (``"in"``/``"out"``) and the ``train_images`` /
        ``val_images`` counts of the run that made it. ``label_names``: class names, background first
        (default: the dataset's known names, else ``class_<k>``). ``preset``: intensity preset (default: the
        modality's, see :func:`~m4oe_adapters.presets.known_modality`). ``augment``: ``"basic"`` or ``"site"``
        (:func:`~m4oe_adapters.adapt.fit_modality`).
    """
    train_config = train_config or TrainConfig()
    pool = [s for s in samples if s.site in set(train_sites)]
    if not pool:
        raise DataError(f"no {modality} images from training sites {list(train_sites)}")
    development, in_domain = split_in_domain(pool, train_config.seed)
    # Every training image is resampled to one scale, the first training site's (m4oe_adapters.scale: the median
    # over its development images); with several sites, the others' images are resampled to it.
    first_site = [s for s in development if s.site == train_sites[0]]
    scale = (scale_for_modality(known_modality(modality, first_site), first_site)
             if first_site and resize_mode == "crop" else None)
    out_domain = {site: [s for s in samples if s.site == site] for site in test_sites}
    for site, members in out_domain.items():
        if not members:
            raise DataError(f"no {modality} images from test site {site!r}")
    if max_test_images:
        in_domain = in_domain[:max_test_images]
        out_domain = {site: members[:max_test_images] for site, members in out_domain.items()}
    rows, skipped = [], []
    for mode in modes:
        for shot in shots:
            tag = "all" if shot is None else shot
            log(f"[{modality}] mode={mode} shots={tag}: training on {', '.join(train_sites)}")
            output = None if save_dir is None else Path(save_dir) / f"{modality}_{mode}_{tag}.safetensors"
            fit = fit_modality(
                backbone_factory, development, modality, mode=mode, shots=shot, val_count=val_count,
                in_chans=in_chans, size=size, resize_mode=resize_mode, expert_config=expert_config,
                train_config=train_config, output=output, progress=progress, scale=scale, preset=preset,
                augment=augment,
                label_names=None if label_names is None else list(label_names),
                num_classes=None if label_names is None else len(label_names),
            )
            log(f"[{modality}] mode={mode} shots={tag}: trained on {fit.provenance['num_labelled_images']} images "
                f"({len(fit.train_samples)} samples), validated on {fit.provenance['num_validation_images']}")
            fit.segmenter.eval()
            for domain, site, members in [("in", ",".join(train_sites), in_domain)] + [
                ("out", site, members) for site, members in out_domain.items()
            ]:
                extra = {"mode": mode, "shots": tag, "domain": domain, "site": site,
                         "train_images": fit.provenance["num_labelled_images"],
                         "val_images": fit.provenance["num_validation_images"]}
                predictor = device_predictor(fit.segmenter, module_device(fit.segmenter), train_config.precision)
                found, bad = evaluate_samples(
                    predictor, members, preset=fit.preset, in_chans=in_chans, num_classes=fit.num_classes,
                    label_names=fit.label_names, input_size=size, resize_mode=resize_mode, extra=extra,
                    keep_predictions=keep_predictions, progress=progress, volumes=True,
                    scale=fit.provenance.get("scale"),
                )
                rows += found
                skipped += bad
    return rows, skipped

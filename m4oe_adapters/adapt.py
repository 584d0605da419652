"""Fitting one modality (or a new site of a known modality) from labelled images: select the data (modality,
sites, a few shots, a validation split), build the segmenter for the chosen mode, train, and save the result with
its provenance.

    samples → select(modality, sites) → shots + validation split → datasets (preset, size, augmentation)
            → build_segmenter(mode) → train → adapter file (experts/decoder) or baseline checkpoint
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .adapter_file import save_adapter
from .backbones import Backbone
from .config import DecoderConfig, ExpertConfig
from .adapter_file import label_names_problem
from .errors import ConfigError, DataError
from .segmenters import ModalitySegmenter, build_segmenter
from .signatures import signature_from_samples
from .training import TrainConfig, TrainResult, train


@dataclass
class FitResult:
    segmenter: torch.nn.Module
    result: TrainResult
    train_samples: list
    val_samples: list
    num_classes: int
    label_names: list[str]
    preset: dict[str, Any]
    output: Path | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


def split_samples(samples: Sequence, shots: int | None, val_count: int, seed: int) -> tuple[list, list]:
    """Pick ``shots`` training images and ``val_count`` validation images, disjoint, reproducibly.

    Samples from the same source image (slices of one volume) stay on one side of the split.
    """
    groups: dict[str, list] = {}
    for sample in samples:
        groups.setdefault(str(sample.image), []).append(sample)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    val_keys = keys[:val_count] if len(keys) > val_count else keys[: max(0, len(keys) - 1)]
    train_keys = [key for key in keys if key not in set(val_keys)]
    if shots is not None:
        train_keys = train_keys[:shots]
    train = [s for key in train_keys for s in groups[key]]
    val = [s for key in val_keys for s in groups[key]]
    if not train:
        raise DataError(f"no training images left ({len(samples)} samples, {val_count} held out for validation)")
    return train, val


def count_classes(dataset, limit: int = 64) -> int:
    """Largest class id seen in the first ``limit`` labels, plus one (at least 2)."""
    highest = 1
    for index in range(min(len(dataset), limit)):
        highest = max(highest, int(dataset[index]["label"].max()))
    return highest + 1


DEFAULT_SIZE = (224, 224)
DEFAULT_RESIZE_MODE = "crop"


def inherit_recipe(
    init_adapter: str | Path,
    *,
    size: tuple[int, int] | None = None,
    resize_mode: str | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    target_pattern: str | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The training recipe of ``init_adapter``, with the arguments that are not ``None`` overriding it.

    Size and resize mode may change (a note says so). Rank, alpha (the LoRA scale ``alpha / rank``) and target
    layers cannot: training continues from the file's expert tensors, so a different value is refused.

    Returns:
        ``(recipe, notes)``: recipe keys ``size``, ``resize_mode``, ``rank``, ``alpha``, ``target_pattern``,
        ``preset``; notes are lines saying what was inherited and what changed (the CLI prints them).
    """
    from .adapter_file import read_header

    metadata, _ = read_header(init_adapter)
    if metadata["mode"] not in ("experts", "decoder"):
        raise ConfigError(f"{init_adapter}: a {metadata['mode']}-mode file (a baseline); --init continues from an "
                          "experts or decoder adapter")
    provenance, expert = metadata.get("provenance", {}), metadata["expert"]
    stored = {
        "size": tuple(provenance.get("train_size") or metadata["input_size"]),
        "resize_mode": provenance.get("resize_mode", DEFAULT_RESIZE_MODE),
        "rank": expert["rank"],
        "alpha": float(expert["alpha"]),
        "target_pattern": expert.get("target_pattern"),
    }
    given = {"size": None if size is None else tuple(size), "resize_mode": resize_mode, "rank": rank,
             "alpha": None if alpha is None else float(alpha), "target_pattern": target_pattern}
    fixed = [key for key in ("rank", "alpha", "target_pattern") if given[key] is not None and given[key] != stored[key]]
    if fixed:
        raise ConfigError(
            f"{init_adapter}: its experts have " + ", ".join(f"{key} {stored[key]}" for key in fixed)
            + "; training continues from them, so " + ", ".join(f"{key} {given[key]}" for key in fixed)
            + " cannot apply (drop the flag, or train without --init)"
        )
    recipe = {key: stored[key] if given[key] is None else given[key] for key in stored}
    recipe["preset"] = metadata["preset"]
    inherited = [f"{key} {_shown(stored[key])}" for key in stored if given[key] is None]
    changed = [f"{key} {_shown(stored[key])} -> {_shown(given[key])}" for key in ("size", "resize_mode")
               if given[key] is not None and given[key] != stored[key]]
    notes = [f"recipe inherited from {Path(init_adapter).name}: " + (", ".join(inherited) or "nothing")
             + f", preset {metadata['preset'].get('kind', metadata['preset']) if metadata['preset'] else 'default'}"]
    if changed:
        notes.append("changed by flags: " + ", ".join(changed))
    return recipe, notes


def _shown(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2:
        return f"{value[0]}x{value[1]}"
    return str(value)


def fit_modality(
    backbone_factory: Callable[[], Backbone],
    samples: Sequence,
    modality: str,
    *,
    mode: str = "experts",
    shots: int | None = None,
    val_count: int = 4,
    in_chans: int = 3,
    size: tuple[int, int] | None = None,
    resize_mode: str | None = None,
    num_classes: int | None = None,
    label_names: list[str] | None = None,
    preset: dict[str, Any] | None = None,
    expert_config: ExpertConfig | None = None,
    decoder_config: DecoderConfig | None = None,
    init_adapter: str | Path | None = None,
    train_config: TrainConfig | None = None,
    out_dir: str | Path | None = None,
    output: str | Path | None = None,
    dtype: str = "fp32",
    resume: bool = False,
    progress: bool = True,
) -> FitResult:
    """Train modality ``modality`` on ``samples`` (already filtered to its sites) and save it.

    Args:
        backbone_factory: builds the frozen backbone (called once; not for ``scratch``). Its channel count
            overrides ``in_chans``.
        shots: use only this many labelled training images (the few-label new-site case); ``None``: all.
        val_count: images held out for validation / early stopping.
        size: training input size (crops or resizes, see ``resize_mode``); ``None``: the ``init_adapter``'s, else
            224 x 224.
        resize_mode: ``"crop"`` or ``"resize"``; ``None``: the ``init_adapter``'s, else ``"crop"``.
        init_adapter: start from this adapter file (a known modality adapted to a new site); its recipe (see
            :func:`inherit_recipe`) applies unless an argument overrides it.
        output: adapter file to write (modes experts/decoder) or baseline checkpoint (other modes).
    """
    from .data import SegmentationDataset
    from .presets import default_preset

    from .data import label_names as dataset_label_names
    from .training import seed_everything

    train_config = train_config or TrainConfig()
    if init_adapter is not None and mode not in ("experts", "decoder"):
        raise ConfigError(f"--init starts from an expert adapter; mode {mode!r} does not use one (use experts or "
                          "decoder, or drop --init)")
    if init_adapter is not None:
        recipe, _ = inherit_recipe(init_adapter, size=size, resize_mode=resize_mode)
        size, resize_mode = recipe["size"], recipe["resize_mode"]
    size = tuple(size or DEFAULT_SIZE)
    resize_mode = resize_mode or DEFAULT_RESIZE_MODE
    problem = label_names_problem(label_names) if label_names is not None else None
    if problem:  # checked before training, not when the file is written an hour later
        raise ConfigError(problem)
    seed_everything(train_config.seed)  # a random-weight backbone must be the same in two runs
    backbone = None if mode == "scratch" else backbone_factory()
    if backbone is not None:
        in_chans = backbone.in_chans  # the backbone decides; images are converted to match
    train_samples, val_samples = split_samples(samples, shots, val_count, train_config.seed)
    if init_adapter is not None and preset is None:
        from .adapter_file import read_header

        metadata, _ = read_header(init_adapter)
        preset, label_names, num_classes = metadata["preset"], metadata["label_names"], metadata["num_classes"]
    preset = preset or default_preset(modality)
    train_set = SegmentationDataset(
        train_samples, preset=preset, in_channels=in_chans, size=size, mode=resize_mode, augment=True,
        seed=train_config.seed,
    )
    val_set = SegmentationDataset(
        val_samples, preset=preset, in_channels=in_chans, size=size, mode=resize_mode, augment=False
    ) if val_samples else None
    num_classes = num_classes or count_classes(train_set)
    label_names = label_names or dataset_label_names(train_samples[0].dataset, num_classes)
    problem = label_names_problem(list(label_names))
    if problem:
        raise ConfigError(problem)
    segmenter = build_segmenter(
        mode, lambda: backbone, modality, num_classes, label_names=label_names, preset=preset, input_size=size,
        in_chans=in_chans, expert_config=expert_config, decoder_config=decoder_config,
        init_adapter=None if init_adapter is None else str(init_adapter), seed=train_config.seed,
    )
    result = train(segmenter, train_set, val_set, num_classes, train_config, out_dir=out_dir, resume=resume,
                   progress=progress)
    sites = sorted({getattr(sample, "site", "") for sample in train_samples})
    provenance = {
        "mode": mode,
        "sites": sites,
        "datasets": sorted({getattr(sample, "dataset", "") for sample in train_samples}),
        "num_labelled_images": len({str(sample.image) for sample in train_samples}),
        "num_validation_images": len({str(sample.image) for sample in val_samples}),
        "shots": shots,
        "steps": result.steps_done,
        "seed": train_config.seed,
        "init_adapter": None if init_adapter is None else Path(init_adapter).name,
        "train_size": list(size),
        # How prediction must treat sizes: "crop" = trained on native-resolution crops, predict with sliding
        # windows at native resolution; "resize" = trained on resized images, predict on the image resized alike.
        "resize_mode": resize_mode,
    }
    fit = FitResult(segmenter, result, list(train_samples), list(val_samples), num_classes, label_names, preset,
                    provenance=provenance)
    if isinstance(segmenter, ModalitySegmenter):
        info = segmenter.model.modalities[modality]
        info.provenance = provenance
        info.metrics = {"val_dice": result.best_val_dice, "val_images": provenance["num_validation_images"]}
        # The adapter learns to recognise its own images: training and validation images, never test images.
        segmenter.model.set_signature(modality, signature_from_samples(list(train_samples) + list(val_samples),
                                                                       seed=train_config.seed))
    if output is not None:
        fit.output = save_result(fit, modality, output, dtype=dtype)
    return fit


def save_result(fit: FitResult, modality: str, path: str | Path, dtype: str = "fp32") -> Path:
    """Write the trained segmenter: an adapter file for experts/decoder modes, the same container with the
    baseline's state dict for lora/full/scratch (:mod:`.segmenter_file`); every one loads with ``load_segmenter``."""
    segmenter = fit.segmenter
    if isinstance(segmenter, ModalitySegmenter):
        return save_adapter(segmenter.model, modality, path, dtype=dtype)
    from .model import ModalityInfo
    from .segmenter_file import save_baseline

    info = ModalityInfo(
        modality, fit.num_classes, list(fit.label_names), dict(fit.preset),
        list(fit.provenance.get("train_size", [224, 224])), dict(fit.provenance),
        {"val_dice": fit.result.best_val_dice, "val_images": fit.provenance.get("num_validation_images")},
    )
    return save_baseline(segmenter, info, path, dtype=dtype)

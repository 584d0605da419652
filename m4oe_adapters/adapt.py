"""Fitting one modality (or a new site of a known modality) from labelled images: select the data (modality,
sites, a few shots, a validation split), build the segmenter for the chosen mode, train, and save the result with
its provenance.

    samples → select(modality, sites) → shots + validation split → datasets (preset, size, augmentation)
            → build_segmenter(mode) → train → adapter file (experts/decoder) or baseline checkpoint
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .adapter_file import save_adapter
from .backbones import Backbone
from .config import DecoderConfig, ExpertConfig
from .adapter_file import label_names_problem
from .errors import ConfigError, DataError
from .scale import scale_for_modality
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


DEFAULT_VAL_COUNT = 4  # validation images held out when every labelled image is offered (no ``shots``)


def split_samples(samples: Sequence, shots: int | None, val_count: int | None, seed: int) -> tuple[list, list]:
    """Pick ``shots`` training images and ``val_count`` validation images, disjoint, reproducibly.

    Few labels are never eaten by validation: with ``shots=k`` all k images train, and validation images come only
    from the images beyond the k (``val_count`` of them when there are that many, else as many as there are); its
    default (``None``) is 0 with ``shots`` and :data:`DEFAULT_VAL_COUNT` without. Without ``shots``, ``val_count``
    images are held out and the rest train (at least one always trains). Samples from the same source image (slices
    of one volume) stay on one side of the split; without ``shots``, so do the images of one group
    (:func:`~m4oe_adapters.data.sample_group`: the frames of one video), whole groups being held out until at least
    ``val_count`` images validate (validation frames with near-duplicates in training would stop training late).

    Raises:
        DataError: ``shots`` is more than the images there are, or no training image is left.
    """
    groups: dict[str, list] = {}
    for sample in samples:
        groups.setdefault(str(sample.image), []).append(sample)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    if val_count is None:
        val_count = 0 if shots is not None else DEFAULT_VAL_COUNT
    if val_count < 0 or (shots is not None and shots < 1):
        raise DataError(f"--shots must be at least 1 and --val at least 0 (got shots={shots}, val={val_count})")
    if shots is not None:
        if shots > len(keys):
            raise DataError(f"--shots {shots}: only {len(keys)} labelled images were selected; "
                            "lower --shots or select more sites/datasets")
        # validation first in the shuffled order, so a large pool gives the same images as before this rule
        val_keys = keys[: min(val_count, len(keys) - shots)]
        train_keys = keys[len(val_keys) : len(val_keys) + shots]
    else:
        val_keys = _whole_groups(keys, groups, val_count) if len(keys) > val_count else keys[: max(0, len(keys) - 1)]
        held = set(val_keys)
        train_keys = [key for key in keys if key not in held]
    train = [s for key in train_keys for s in groups[key]]
    val = [s for key in val_keys for s in groups[key]]
    if not train:
        raise DataError(f"no training images left ({len(samples)} samples, {val_count} held out for validation)")
    return train, val


def _whole_groups(keys: list[str], groups: dict[str, list], count: int) -> list[str]:
    """The first ``count`` image keys in ``keys``' order, completed with every other image of their groups (while
    at least one image is left to train); plain images are their own group, so nothing changes for them."""
    from .data import sample_group

    group_of = {key: sample_group(groups[key][0]) for key in keys}
    chosen: list[str] = []
    for key in keys:
        if len(chosen) >= count:
            break
        if key in chosen:
            continue
        members = [other for other in keys if group_of[other] == group_of[key] and other not in chosen]
        if len(chosen) + len(members) >= len(keys):  # a group this large would leave nothing to train
            members = [key]
        chosen += members
    return chosen


def split_message(train: Sequence, val: Sequence, shots: int | None, val_count: int | None,
                  cross_validation_folds: int | None = None) -> str:
    """The line a run starts with: how many images train and validate, and what chooses the kept weights."""
    n_train, n_val = len({str(s.image) for s in train}), len({str(s.image) for s in val})
    line = f"training on {n_train} labelled image{'s' * (n_train != 1)}"
    line += f" (--shots {shots})" if shots is not None else ""
    if n_val:
        line += f", validating on {n_val} other image{'s' * (n_val != 1)} (best validation Dice is kept)"
    elif cross_validation_folds:
        line += f", no validation images: {cross_validation_folds}-fold cross-validation over them chooses the steps"
    else:
        line += ", no validation images: the last step's weights are kept"
        if shots is not None and val_count:
            line += f" (asked --val {val_count}, but every selected image is one of the {shots} shots)"
    return line


def cross_validated_steps(backbone_factory, samples: Sequence, modality: str, folds: int, train_config: TrainConfig,
                          log: Callable[[str], None], options: dict[str, Any]) -> dict[str, Any]:
    """Best validation step of each fold of ``samples`` (split by source image, at most one fold per image), and
    their median as the step count for training on all of them. Each fold trains ``train_config.steps`` steps.
    Starting from an adapter (``options["init_adapter"]``), step 0 (that adapter unchanged) is a candidate too."""
    import numpy as np

    init_adapter = options.get("init_adapter")
    keys = sorted({str(sample.image) for sample in samples})
    random.Random(train_config.seed).shuffle(keys)
    folds = min(folds, len(keys))
    if folds < 2:
        raise DataError(f"--val-from-shots needs at least 2 labelled images (got {len(keys)})")
    best_steps, fold_dice = [], []
    for fold in range(folds):
        held_out = set(keys[fold::folds])
        train = [s for s in samples if str(s.image) not in held_out]
        val = [s for s in samples if str(s.image) in held_out]
        log(f"cross-validation fold {fold + 1}/{folds}: training on {len({str(s.image) for s in train})} images, "
            f"validating on {len(held_out)}")
        fit = fit_modality(backbone_factory, samples, modality, split=(train, val), train_config=train_config,
                           log=log, **options)
        validated = fit.result.best_val_dice is not None
        best_steps.append(int(fit.result.best_step if validated else fit.result.steps_done))
        fold_dice.append(round(float(fit.result.best_val_dice), 4) if validated else None)
    # 0 when most folds validated best on the starting adapter (--init): it is then kept as it is.
    chosen = int(round(float(np.median(best_steps))))
    if init_adapter is None:
        chosen = max(1, chosen)
    return {"folds": folds, "best_steps": best_steps, "fold_dice": fold_dice, "chosen_steps": chosen}


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
        ``preset``, ``scale`` (the recorded scale of a ``crop`` adapter, else ``None``); notes are lines saying what
        was inherited and what changed (the CLI prints them).
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
    # The scale its experts learnt at: a new site's images are resampled to it (m4oe_adapters.scale)
    recipe["scale"] = provenance.get("scale") if recipe["resize_mode"] == "crop" else None
    inherited = [f"{key} {_shown(stored[key])}" for key in stored if given[key] is None]
    changed = [f"{key} {_shown(stored[key])} -> {_shown(given[key])}" for key in ("size", "resize_mode")
               if given[key] is not None and given[key] != stored[key]]
    notes = [f"recipe inherited from {Path(init_adapter).name}: " + (", ".join(inherited) or "nothing")
             + f", preset {metadata['preset'].get('kind', metadata['preset']) if metadata['preset'] else 'default'}"
             + (f", scale {recipe['scale']['kind']} {recipe['scale']['value']:g} (the new images are resampled to "
                "it)" if recipe["scale"] else "")]
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
    val_count: int | None = None,
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
    log: Callable[[str], None] = print,
    pixel_size: float | None = None,
    cross_validation_folds: int | None = None,
    split: tuple[Sequence, Sequence] | None = None,
    augment: str = "basic",
    scale: dict[str, Any] | None = None,
) -> FitResult:
    """Train modality ``modality`` on ``samples`` (already filtered to its sites) and save it.

    Args:
        backbone_factory: builds the frozen backbone (called once; not for ``scratch``). Its channel count
            overrides ``in_chans``.
        shots: use only this many labelled training images (the few-label new-site case); ``None``: all.
        val_count: validation images for early stopping / model choice, taken from images that are not shots;
            ``None``: 0 with ``shots`` (all k labels train), else 4 (see :func:`split_samples`).
        log: receives the start-of-run line saying how many images train and validate.
        pixel_size: the training images' pixel size (any unit; ``m4oe train --pixel-size``), recorded as the
            adapter's scale; without it the scale is measured where the modality allows (see
            :func:`m4oe_adapters.scale.scale_for_modality`) and prediction resamples inputs to it.
        cross_validation_folds: choose the step count by cross-validation over the training images (``m4oe train
            --val-from-shots N``): each of N folds trains on the others and validates on itself, and the final run
            trains on every image for the median of the folds' best steps. Costs N + 1 trainings; no label is spent
            on validation.
        split: ``(train, validation)`` samples given as they are (no shots/validation split).
        augment: ``"basic"`` (flips, rotations, intensity jitter) or ``"site"`` (also colour cast, gamma, blur,
            noise and zoom: :data:`~m4oe_adapters.data.datasets.SITE_AUGMENTATION`); recorded in the provenance.
        scale: the scale to train at and record (:mod:`m4oe_adapters.scale`); ``None``: the ``init_adapter``'s
            (its experts learnt at it; not with ``pixel_size``), else measured on the training images (median). In
            ``crop`` mode every training and validation image is resampled to it, as prediction resamples every
            input, so images of several sites train at one scale.
        size: training input size (crops or resizes, see ``resize_mode``); ``None``: the ``init_adapter``'s, else
            224 x 224.
        resize_mode: ``"crop"`` or ``"resize"``; ``None``: the ``init_adapter``'s, else ``"crop"``.
        init_adapter: start from this adapter file (a known modality adapted to a new site); its recipe (see
            :func:`inherit_recipe`) applies unless an argument overrides it.
        output: adapter file to write (modes experts/decoder) or baseline checkpoint (other modes).
    """
    from .data import SegmentationDataset
    from .presets import default_preset, known_modality, validate_preset

    from .data import label_names as dataset_label_names
    from .training import seed_everything

    train_config = train_config or TrainConfig()
    if init_adapter is not None:  # the adapter as it starts is a candidate: kept if no step validates better
        train_config = replace(train_config, validate_start=True)
    if init_adapter is not None and mode not in ("experts", "decoder"):
        raise ConfigError(f"--init starts from an expert adapter; mode {mode!r} does not use one (use experts or "
                          "decoder, or drop --init)")
    inherited_scale = None
    if init_adapter is not None:
        recipe, _ = inherit_recipe(init_adapter, size=size, resize_mode=resize_mode)
        size, resize_mode, inherited_scale = recipe["size"], recipe["resize_mode"], recipe["scale"]
    size = tuple(size or DEFAULT_SIZE)
    resize_mode = resize_mode or DEFAULT_RESIZE_MODE
    problem = label_names_problem(label_names) if label_names is not None else None
    if problem:  # checked before training, not when the file is written an hour later
        raise ConfigError(problem)
    seed_everything(train_config.seed)  # a random-weight backbone must be the same in two runs
    backbone = None if mode == "scratch" else backbone_factory()
    if backbone is not None:
        in_chans = backbone.in_chans  # the backbone decides; images are converted to match
    if split is not None:
        train_samples, val_samples = list(split[0]), list(split[1])
    else:
        train_samples, val_samples = split_samples(samples, shots, val_count, train_config.seed)
        log(split_message(train_samples, val_samples, shots, val_count, cross_validation_folds))
    if scale is None and inherited_scale and pixel_size is None:  # --init: the scale its experts learnt at
        scale = inherited_scale
    if scale is None:  # the scale the adapter is trained at; predict/eval resample every input to it
        scale = scale_for_modality(known_modality(modality, train_samples), train_samples, pixel_size)
    cross_validation = None
    if cross_validation_folds:
        if val_samples:
            raise ConfigError("--val-from-shots chooses the steps without validation images: leave --val at 0")
        cross_validation = cross_validated_steps(
            backbone_factory, train_samples, modality, cross_validation_folds, train_config, log,
            dict(mode=mode, in_chans=in_chans, size=size, resize_mode=resize_mode, num_classes=num_classes,
                 label_names=label_names, preset=preset, expert_config=expert_config, decoder_config=decoder_config,
                 init_adapter=init_adapter, progress=progress, augment=augment, scale=scale),
        )
        train_config = replace(train_config, steps=cross_validation["chosen_steps"], patience=None)
        log(f"cross-validation over {len(cross_validation['best_steps'])} folds: best steps "
            f"{cross_validation['best_steps']} (fold Dice {cross_validation['fold_dice']}); " + (
                f"training on all {len(train_samples)} samples for {train_config.steps} steps" if train_config.steps
                else f"the starting adapter {Path(init_adapter).name} validated best: it is kept unchanged"))
    if init_adapter is not None and preset is None:
        from .adapter_file import read_header

        metadata, _ = read_header(init_adapter)
        preset, label_names, num_classes = metadata["preset"], metadata["label_names"], metadata["num_classes"]
    # Stored with every parameter spelled out, so the file keeps its meaning if a default changes later.
    preset = validate_preset(preset or default_preset(known_modality(modality, train_samples)))
    train_set = SegmentationDataset(
        train_samples, preset=preset, in_channels=in_chans, size=size, mode=resize_mode, augment=augment,
        seed=train_config.seed, scale=scale,
    )
    val_set = SegmentationDataset(
        val_samples, preset=preset, in_channels=in_chans, size=size, mode=resize_mode, augment=False, scale=scale,
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
    if train_config.steps == 0:  # cross-validation chose the starting adapter (--init) as it is
        segmenter.eval()
        result = TrainResult(None, 0, 0)
    else:
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
        "cross_validation": cross_validation,
        "train_size": list(size),
        # How prediction must treat sizes: "crop" = trained on native-resolution crops, predict with sliding
        # windows at native resolution; "resize" = trained on resized images, predict on the image resized alike.
        "resize_mode": resize_mode,
        "augment": augment,
        # The scale the adapter was trained at (m4oe_adapters.scale): predict/eval resample every input to it.
        "scale": scale,
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

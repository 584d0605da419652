"""Files of every training mode, and one function that turns any of them into a callable segmenter.

``experts`` and ``decoder`` runs write a modality adapter (:mod:`.adapter_file`). The baselines are not expert
mixtures, so they are stored in the same container with a different payload:

=========  ============================================================  ==============================================
mode       tensors (one dtype, under ``model.``)                          needs at load time
=========  ============================================================  ==============================================
lora       the PEFT LoRA matrices of the backbone + decoder and head      the frozen backbone it was trained on
full       the whole fine-tuned backbone + decoder and head               the backbone's architecture (weights optional)
scratch    the MONAI U-Net                                                nothing (metadata ``backbone`` is ``null``)
=========  ============================================================  ==============================================

The metadata is the adapter's (``format``, modality, labels, preset, input size, provenance...) with ``mode`` naming
the payload; integer buffers (BatchNorm's ``num_batches_tracked``) are not stored, a fresh network's are kept.
:func:`load_segmenter` reads any mode and returns a :class:`LoadedSegmenter`: ``segmenter(images [B, C, H, W]) →
logits [B, K, H, W]`` plus the modality's :class:`~.model.ModalityInfo`, which is what ``m4oe eval --adapter``,
``predict`` and ``inspect`` use.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .adapter_file import (
    ADAPTER_MODES,
    BASELINE_PREFIX,
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    build_metadata,
    read_adapter,
    read_header,
    write_checked,
)
from .config import DecoderConfig, ExpertConfig
from .errors import BackboneMismatchError, ConfigError
from .model import ModalityInfo


def save_baseline(
    segmenter: nn.Module, info: ModalityInfo, path: str | Path, *, dtype: str = "fp32"
) -> Path:
    """Write a ``lora``/``full``/``scratch`` segmenter (see :mod:`.segmenters`) for modality ``info`` atomically;
    the file is checked with the reader's rules first.

    Args:
        segmenter: a ``BackboneSegmenter`` or ``ScratchUNet`` (its ``mode`` attribute names the payload).
        info: the modality's name, classes, labels, preset, input size, provenance and metrics.
    """
    mode = getattr(segmenter, "mode", None)
    if mode in ADAPTER_MODES or mode is None:
        raise ConfigError(f"save_baseline writes the lora/full/scratch baselines, not mode {mode!r}: use save_adapter")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tensors = {
        BASELINE_PREFIX + key: value.detach().to("cpu", DTYPES[dtype]).contiguous()
        for key, value in segmenter.checkpoint_state().items()
        if value.is_floating_point()
    }
    backbone = getattr(segmenter, "backbone", None)
    if backbone is not None:
        metadata = build_metadata(_Described(segmenter, info), info.name, dtype)
    else:
        metadata = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "modality": info.name,
            "num_classes": info.num_classes, "label_names": list(info.label_names), "preset": info.preset,
            "in_chans": segmenter.in_chans, "input_size": list(info.input_size), "backbone": None,
            "network": segmenter.description(), "provenance": dict(info.provenance), "metrics": dict(info.metrics),
            "dtype": dtype,
        }
    metadata["mode"] = mode
    metadata["provenance"] = {**metadata.get("provenance", {}), "mode": mode}
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "m4oe": json.dumps(metadata)}
    return write_checked(path, tensors, header)


class _Described:
    """What :func:`~.adapter_file.build_metadata` reads from a SegmentationModel, for a lora/full segmenter."""

    def __init__(self, segmenter: nn.Module, info: ModalityInfo) -> None:
        self.modalities = {info.name: info}
        self.backbone = _StartingBackbone(segmenter.backbone_identity, segmenter.backbone.in_chans)
        self.expert_config = segmenter.expert_config
        self.target_pattern = segmenter.expert_config.target_pattern or segmenter.backbone.default_target_pattern
        self.decoder_config = segmenter.decoder_config


@dataclass
class _StartingBackbone:
    """The backbone a baseline started from (before LoRA injection / fine-tuning changed its fingerprint)."""

    recorded: dict[str, Any]
    in_chans: int

    def identity(self) -> dict[str, Any]:
        return dict(self.recorded)


@dataclass
class LoadedSegmenter:
    """A segmenter read from a file of any mode.

    Attributes:
        segmenter: ``images [B, C, H, W]`` (preprocessed with ``info.preset``) → ``logits [B, K, H, W]``.
        info: modality name, classes, labels, preset, input size, provenance, metrics.
        mode: the training mode that wrote the file.
        in_chans: channels the network takes.
        model: the :class:`~.model.SegmentationModel` for ``experts``/``decoder`` files (more adapters can be
            loaded onto it), else ``None``.
        backbone_note: one line saying which backbone (and weights) the segmenter runs on.
    """

    segmenter: nn.Module
    info: ModalityInfo
    mode: str
    in_chans: int
    model: Any = None
    backbone_note: str = ""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.segmenter(images)


class SingleModalityModel(nn.Module):
    """A baseline segmenter behind the part of the :class:`~.model.SegmentationModel` interface prediction uses
    (``modalities``, ``backbone.in_chans``, ``model(images, modality)``), so ``predict_files`` treats it alike."""

    def __init__(self, loaded: LoadedSegmenter) -> None:
        super().__init__()
        self.segmenter = loaded.segmenter
        self.modalities = {loaded.info.name: loaded.info}
        self.backbone = _StartingBackbone({}, loaded.in_chans)
        self.mode = loaded.mode

    def _require(self, name: str) -> None:
        if name not in self.modalities:
            raise ConfigError(f"modality {name!r} is not loaded (this {self.mode} file holds {list(self.modalities)})")

    def forward(self, images: torch.Tensor, modality: str | None = None, **_: Any) -> torch.Tensor:
        if modality is not None:
            self._require(modality)
        return self.segmenter(images)


def _backbone_note(backbone) -> str:
    if backbone is None:
        return "no backbone (U-Net trained from scratch)"
    identity = backbone.identity()
    kind = f"pretrained weights {identity['weights']}" if identity["pretrained"] else "RANDOM weights (not pretrained)"
    return f"backbone {identity['family']}:{identity['name']} with {kind}, fingerprint {identity['fingerprint'][:12]}"


def load_segmenter(
    path: str | Path, weights: str | Path | None = None, *, backbone=None, force: bool = False
) -> LoadedSegmenter:
    """Read a file of any training mode and rebuild its segmenter (in eval mode).

    Args:
        weights: the backbone checkpoint the file was trained on (``experts``, ``decoder``, ``lora``; for ``full``
            only the architecture is used, the file holds every backbone weight; ignored for ``scratch``).
        backbone: an already loaded backbone to use instead of ``weights``.
        force: accept a backbone with other weights but the same architecture (``experts``/``decoder``/``lora``).
    """
    from .segmenters import BackboneSegmenter, ModalitySegmenter, ScratchUNet

    metadata, _ = read_header(path)
    mode = metadata["mode"]
    if mode in ADAPTER_MODES:
        from .adapter_file import model_from_adapter

        model = model_from_adapter(path, weights, backbone=backbone, force=force).eval()
        info = model.modalities[metadata["modality"]]
        segmenter = ModalitySegmenter(model, info.name, mode).eval()
        return LoadedSegmenter(segmenter, info, mode, model.backbone.in_chans, model, _backbone_note(model.backbone))
    metadata, tensors = read_adapter(path)
    info = ModalityInfo(
        metadata["modality"], metadata["num_classes"], list(metadata["label_names"]), dict(metadata["preset"]),
        list(metadata["input_size"]), dict(metadata.get("provenance", {})), dict(metadata.get("metrics", {})),
    )
    state = {key[len(BASELINE_PREFIX):]: value.float() for key, value in tensors.items()}
    if mode == "scratch":
        network = ScratchUNet(metadata["in_chans"], metadata["num_classes"])
        _load_state(network, state, path)
        return LoadedSegmenter(network.eval(), info, mode, metadata["in_chans"], None, _backbone_note(None))
    from .backbones import backbone_from_identity

    identity = metadata["backbone"]
    if backbone is None:
        backbone = backbone_from_identity(identity, weights if mode == "lora" else weights or "none")
    ours = backbone.identity()
    if mode == "lora" and ours["fingerprint"] != identity["fingerprint"] and not force:
        raise BackboneMismatchError(
            f"{path}: this lora file was trained on backbone {identity['family']}:{identity['name']} with weights "
            f"{identity.get('weights')} (fingerprint {identity['fingerprint'][:16]}…), but the backbone given has "
            f"fingerprint {ours['fingerprint'][:16]}… (weights {ours['weights']}); give the backbone it was trained on"
        )
    if (ours["family"], ours["name"], ours["in_chans"]) != (identity["family"], identity["name"], identity["in_chans"]):
        raise BackboneMismatchError(
            f"{path}: the file needs a {identity['family']}:{identity['name']} backbone with {identity['in_chans']} "
            f"channels, got {ours['family']}:{ours['name']} with {ours['in_chans']}"
        )
    network = BackboneSegmenter(
        backbone, metadata["num_classes"], mode, ExpertConfig.from_dict(metadata["expert"]),
        DecoderConfig.from_dict(metadata["decoder"]),
    )
    _load_state(network, state, path)
    note = _backbone_note(backbone) + (" (every backbone weight fine-tuned, read from the file)" if mode == "full" else "")
    return LoadedSegmenter(network.eval(), info, mode, backbone.in_chans, None, note)


def _load_state(network: nn.Module, state: dict[str, torch.Tensor], path) -> None:
    """Load ``state`` into ``network``; only integer buffers (not stored) may be missing."""
    expected = {key: value for key, value in network.state_dict().items()}
    missing = [key for key, value in expected.items() if key not in state and value.is_floating_point()]
    if getattr(network, "mode", "") == "lora":  # the frozen backbone weights come from the backbone checkpoint
        missing = [key for key in missing if not key.startswith("backbone.") or "lora_" in key]
    unexpected = sorted(set(state) - set(expected))
    wrong = [key for key in state if key in expected and tuple(state[key].shape) != tuple(expected[key].shape)]
    if missing or unexpected or wrong:
        raise BackboneMismatchError(
            f"{path}: the stored network does not fit the one its metadata describes (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, other shapes {wrong[:3]}); the file or the backbone differ"
        )
    with torch.no_grad():
        network.load_state_dict(state, strict=False)


__all__ = ["LoadedSegmenter", "SingleModalityModel", "load_segmenter", "save_baseline"]

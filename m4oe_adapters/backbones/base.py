"""What every backbone family provides: four NCHW feature maps with declared channels and strides, frozen weights,
and a fingerprint that identifies the exact weights an adapter was trained on."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import BackboneError, DataError
from .checkpoints import LoadReport

FEATURE_STRIDES = (4, 8, 16, 32)
SIZE_MULTIPLE = 32


def weight_fingerprint(named_tensors: list[tuple[str, torch.Tensor]]) -> str:
    """sha256 over ``(name, dtype, shape, bytes)`` of each tensor, in name order (hex digest)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(data.dtype).encode())
        digest.update(str(tuple(data.shape)).encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


class Backbone(nn.Module):
    """A frozen Swin encoder wrapped to a common interface.

    Subclasses set ``self.model`` (the family's own module, unchanged, so its checkpoints and PEFT see their native
    names) and implement :meth:`extract_features`.

    Attributes:
        family: ``"timm"``, ``"transformers"`` or ``"monai"``.
        name: architecture name within the family.
        in_chans: input channels ``C`` (1 for CT/MRI, 3 for RGB).
        feature_channels: channels of the four maps, e.g. ``(96, 192, 384, 768)`` for Swin-T.
        feature_strides: ``(4, 8, 16, 32)`` pixels.
        default_target_pattern: regex of the linears that get experts by default.
        model_args: the architecture arguments needed to rebuild it (JSON-able).
        weights: where the weights came from (a path), or ``None`` for a random initialisation.
        load_report: what the checkpoint load did (:class:`~.checkpoints.LoadReport`); ``None`` at random. A
            backbone with weights exists only after the check that every tensor came from the file passed.
    """

    family: str = ""
    default_target_pattern: str = ""

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        in_chans: int,
        feature_channels: tuple[int, int, int, int],
        model_args: dict[str, Any],
        weights: str | Path | None,
        load_report: "LoadReport | None" = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.in_chans = in_chans
        self.feature_channels = tuple(int(c) for c in feature_channels)
        self.feature_strides = FEATURE_STRIDES
        self.model_args = model_args
        self.weights = None if weights is None else str(weights)
        self.load_report = load_report
        if weights is not None and (load_report is None or not load_report.complete):
            raise BackboneError(f"{weights}: {self.family}:{name} was built without a complete, checked load")
        self._fingerprint: str | None = None
        self.freeze()
        self.train(False)

    @property
    def pretrained(self) -> bool:
        """True only when weights were given and every backbone tensor was checked to come from them."""
        return self.weights is not None and self.load_report is not None and self.load_report.complete

    def architecture(self) -> dict[str, Any]:
        """``embed_dim``, ``depths``, ``num_heads``, ``window_size`` (and family-specific extras)."""
        return {}

    def freeze(self) -> None:
        """Every backbone parameter stops requiring gradients (experts live in their own parameters)."""
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> "Backbone":
        """The frozen backbone always runs in eval mode (no dropout or stochastic depth); expert layers inside it
        follow ``mode`` so their training-time behaviour (router-key updates) works."""
        super().train(mode)
        self.model.eval()
        from ..experts import ModalityExpertLinear

        for module in self.model.modules():
            if isinstance(module, ModalityExpertLinear):
                module.train(mode)
        return self

    def frozen_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The backbone's own parameters under their native names (expert wrappers' ``.base_layer`` removed)."""
        return [
            (name.replace(".base_layer.", "."), tensor)
            for name, tensor in self.model.named_parameters()
            if ".lora_" not in name and ".router_key." not in name
        ]

    def fingerprint(self, recompute: bool = False) -> str:
        """sha256 of the frozen weights, computed once and cached (``recompute=True`` hashes the current bytes)."""
        if recompute:
            return weight_fingerprint(self.frozen_tensors())
        if self._fingerprint is None:
            self._fingerprint = weight_fingerprint(self.frozen_tensors())
        return self._fingerprint

    def identity(self) -> dict[str, Any]:
        """What an adapter file records to be matched against a backbone later."""
        return {
            "family": self.family,
            "name": self.name,
            "fingerprint": self.fingerprint(),
            "in_chans": self.in_chans,
            "feature_channels": list(self.feature_channels),
            "model_args": self.model_args,
            "pretrained": self.pretrained,
            "weights": Path(self.weights).name if self.weights else "none (random initialisation)",
            "architecture": self.architecture(),
            "load": self._load_summary(),
        }

    def _load_summary(self) -> dict[str, Any] | None:
        if self.load_report is None:
            return None
        report = self.load_report
        return {
            "tensors_from_file": report.tensors_from_file,
            "tensors_in_backbone": report.tensors_in_backbone,
            "container": list(report.container),
            "prefix": report.prefix,
            "transformed": len(report.transformed),
            "ignored": len(report.ignored),
        }

    def summary_line(self) -> str:
        """One line for reports: family:name, architecture, where the weights came from and the fingerprint."""
        arch = self.architecture()
        shape = ", ".join(f"{key} {arch[key]}" for key in ("embed_dim", "depths", "window_size") if key in arch)
        source = self.load_report.summary() if self.load_report else "RANDOM weights (not pretrained)"
        return f"backbone {self.family}:{self.name} ({shape}), {source}, fingerprint {self.fingerprint()[:12]}"

    def describe(self) -> dict[str, Any]:
        """Everything ``m4oe backbone check`` prints: identity, feature maps and the full load report."""
        return {
            "spec": f"{self.family}:{self.name}",
            "family": self.family,
            "name": self.name,
            "architecture": self.architecture(),
            "in_chans": self.in_chans,
            "feature_channels": list(self.feature_channels),
            "feature_strides": list(self.feature_strides),
            "parameters": sum(parameter.numel() for _, parameter in self.frozen_tensors()),
            "source": self.weights,
            "pretrained": self.pretrained,
            "load": None if self.load_report is None else self.load_report.to_dict(),
            "summary": self.load_report.summary() if self.load_report else "random initialisation (not pretrained)",
            "fingerprint": self.fingerprint(),
        }

    def check_input(self, images: torch.Tensor) -> None:
        if images.dim() != 4:
            raise DataError(f"expected an image batch [B, C, H, W], got shape {tuple(images.shape)}")
        _, channels, height, width = images.shape
        if channels != self.in_chans:
            raise DataError(
                f"images have {channels} channels but the backbone {self.family}:{self.name} takes {self.in_chans}; "
                "convert the images (see m4oe_adapters.data) or build the backbone with in_chans="
                f"{channels}"
            )
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise DataError(
                f"image size {height}x{width} is not a multiple of {SIZE_MULTIPLE}; resize, crop or pad first "
                "(prediction pads automatically)"
            )

    def extract_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Args: ``images [B, C, H, W]`` with ``H, W`` multiples of 32.

        Returns: four maps ``[B, feature_channels[i], H / s_i, W / s_i]`` for strides ``s = (4, 8, 16, 32)``.
        """
        self.check_input(images)
        features = self.extract_features(images)
        if len(features) != 4:
            raise BackboneError(f"{self.family}:{self.name} returned {len(features)} feature maps, expected 4")
        return features

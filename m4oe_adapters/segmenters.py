"""What gets trained: the modality-expert model and the baselines users compare it against, behind one interface.

Every segmenter maps ``images [B, C, H, W]`` to ``logits [B, K, H, W]`` for one modality and knows which of its
tensors training changes (``checkpoint_state``), so the training loop, evaluation and resumable checkpoints treat all
five modes alike:

==========  =====================================================================================================
experts     (default) the modality's low-rank experts + its decoder and head; frozen backbone. Saved as an adapter.
decoder     frozen backbone, decoder and head only (experts stay the identity). Saved as an adapter too.
lora        one plain PEFT LoRA of the same rank on the same layers (the peft library, no mixture) + decoder.
full        full fine-tuning of the backbone + decoder.
scratch     a MONAI U-Net trained from scratch (no backbone), the from-scratch baseline.
==========  =====================================================================================================
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from .backbones import Backbone
from .config import DecoderConfig, ExpertConfig
from .decoder import ModalityDecoder
from .errors import ConfigError
from .model import SegmentationModel

MODES = ("experts", "decoder", "lora", "full", "scratch")


KEY_UPDATES = "router_key_updates"


class ModalitySegmenter(nn.Module):
    """One modality of a :class:`SegmentationModel` (modes ``experts`` and ``decoder``)."""

    def __init__(self, model: SegmentationModel, modality: str, mode: str = "experts") -> None:
        super().__init__()
        self.model = model
        self.modality = modality
        self.mode = mode
        model._require(modality)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, self.modality, routing="hard")

    def trainable_parameters(self) -> list[nn.Parameter]:
        parameters = self.model.train_only(self.modality)
        if self.mode == "decoder":
            for layer in self.model.expert_layers.values():
                for table in (layer.lora_A, layer.lora_B, layer.router_key):
                    table[self.modality].requires_grad_(False)
            return list(self.model.decoders[self.modality].parameters())
        # Router keys follow the mean token (moving average), not the gradient, in hard routing.
        for layer in self.model.expert_layers.values():
            layer.router_key[self.modality].requires_grad_(False)
        return [p for p in parameters if p.requires_grad]

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        state = {key: value.detach().clone() for key, value in self.model.modality_tensors(self.modality).items()}
        # How many updates each router key has seen (its running mean is bias-corrected): a resumed run must
        # continue the same average.
        state[KEY_UPDATES] = torch.tensor([layer._key_updates.get(self.modality, 0)
                                           for layer in self.model.expert_layers.values()], dtype=torch.int64)
        return state

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.set_modality_tensors(self.modality, {k: v for k, v in state.items() if k != KEY_UPDATES})
        if KEY_UPDATES in state:
            for layer, count in zip(self.model.expert_layers.values(), state[KEY_UPDATES].tolist()):
                layer._key_updates[self.modality] = int(count)

    def set_training_behaviour(self, training: bool) -> None:
        """Hard-routing training moves the expert's router key towards the mean token it sees."""
        self.model.routing.update_keys = training and self.mode == "experts"


class BackboneSegmenter(nn.Module):
    """A Swin backbone + the same per-modality decoder, for the ``lora`` and ``full`` baselines."""

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        mode: str,
        expert_config: ExpertConfig,
        decoder_config: DecoderConfig,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.mode = mode
        self.expert_config, self.decoder_config = expert_config, decoder_config  # written into its file
        # The backbone as it was before LoRA injection or fine-tuning: its file names these starting weights.
        self.backbone_identity = backbone.identity()
        weight = next(backbone.parameters())  # the decoder lives where the backbone does (a GPU, float64...)
        self.decoder = ModalityDecoder(
            backbone.feature_channels, backbone.in_chans, num_classes, decoder_config.channels,
            decoder_config.stem_channels,
        ).to(device=weight.device, dtype=weight.dtype)
        if mode == "lora":
            import peft

            pattern = expert_config.target_pattern or backbone.default_target_pattern
            config = peft.LoraConfig(
                r=expert_config.rank, lora_alpha=expert_config.alpha, lora_dropout=0.0, target_modules=pattern
            )
            peft.inject_adapter_in_model(config, backbone.model)
        elif mode != "full":
            raise ConfigError(f"BackboneSegmenter handles modes lora and full, not {mode!r}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.backbone(images), images)

    def trainable_parameters(self) -> list[nn.Parameter]:
        for name, parameter in self.backbone.model.named_parameters():
            parameter.requires_grad_(self.mode == "full" or "lora_" in name)
        return [p for p in self.parameters() if p.requires_grad]

    def _is_trained(self, key: str) -> bool:
        return self.mode == "full" or not key.startswith("backbone.") or "lora_" in key

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items() if self._is_trained(k)}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected or any(self._is_trained(key) for key in missing):
            raise ConfigError(f"checkpoint does not fit this {self.mode} model: unexpected {unexpected[:3]}")

    def set_training_behaviour(self, training: bool) -> None:
        self.backbone.model.eval()  # no dropout / stochastic depth, as for the expert model


class ScratchUNet(nn.Module):
    """MONAI's 2D U-Net trained from scratch: the baseline of Cekmeceli et al.'s comparison."""

    def __init__(self, in_chans: int, num_classes: int) -> None:
        super().__init__()
        from monai.networks.nets import UNet

        self.mode = "scratch"
        self.in_chans, self.num_classes = in_chans, num_classes
        self.net = UNet(
            spatial_dims=2, in_channels=in_chans, out_channels=num_classes, channels=(16, 32, 64, 128, 256),
            strides=(2, 2, 2, 2), num_res_units=2, norm="batch",
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def description(self) -> dict[str, Any]:
        """The architecture, as its file records it."""
        return {"name": "monai.networks.nets.UNet", "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2],
                "num_res_units": 2, "norm": "batch", "in_chans": self.in_chans, "num_classes": self.num_classes}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state)

    def set_training_behaviour(self, training: bool) -> None:
        pass


def build_segmenter(
    mode: str,
    backbone_factory: Callable[[], Backbone],
    modality: str,
    num_classes: int,
    *,
    label_names: list[str] | None = None,
    preset: dict[str, Any] | None = None,
    input_size: tuple[int, int] = (224, 224),
    in_chans: int = 3,
    expert_config: ExpertConfig | None = None,
    decoder_config: DecoderConfig | None = None,
    init_adapter: str | None = None,
    seed: int = 0,
) -> nn.Module:
    """Build the segmenter for a training mode (see the module docstring).

    Args:
        backbone_factory: builds the frozen backbone (not called for ``scratch``).
        init_adapter: ``experts``/``decoder`` only: start from this adapter file (a known modality adapted to a new
            site) instead of an identity expert; its class count and labels are used.
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    expert_config = expert_config or ExpertConfig()
    decoder_config = decoder_config or DecoderConfig()
    torch.manual_seed(seed)
    if mode == "scratch":
        return ScratchUNet(in_chans, num_classes)
    backbone = backbone_factory()
    if mode in ("lora", "full"):
        return BackboneSegmenter(backbone, num_classes, mode, expert_config, decoder_config)
    if init_adapter is not None:
        from .adapter_file import read_header

        metadata, _ = read_header(init_adapter)
        expert_config = ExpertConfig.from_dict(metadata["expert"])
        decoder_config = DecoderConfig.from_dict(metadata["decoder"])
    model = SegmentationModel(backbone, expert_config, decoder_config)
    if init_adapter is not None:
        from .adapter_file import load_adapter

        info = load_adapter(model, init_adapter)
        if info.name != modality:
            model.modalities[modality] = model.modalities.pop(info.name)
            model.modalities[modality].name = modality
            _rename_modality(model, info.name, modality)
    else:
        model.add_modality(modality, num_classes, label_names, preset=preset, input_size=input_size, seed=seed)
    return ModalitySegmenter(model, modality, mode)


def _rename_modality(model: SegmentationModel, old: str, new: str) -> None:
    for layer in model.expert_layers.values():
        for table in (layer.lora_A, layer.lora_B, layer.router_key):
            table[new] = table.pop(old)
    model.decoders[new] = model.decoders.pop(old)
    if model.active_modality == old:
        model.active_modality = new

"""transformers ``SwinModel``/``Swinv2Model`` from a ``save_pretrained`` folder (``config.json`` + weights).

transformers v5 names the block linears ``attention.q_proj/k_proj/v_proj/o_proj`` and ``mlp.fc1/fc2``.
Features are the stage outputs *before* patch merging (``output_hidden_states_before_downsampling=True``), so the
four maps have strides 4, 8, 16, 32 and channels ``C, 2C, 4C, 8C``. ``Swinv2Model.forward`` drops that option, so
for SwinV2 the embeddings and encoder are called directly.

Sizes: transformers' Swin v1 shrinks a layer's window to the feature map when the map is smaller than the window
(stride-32 map under ``window_size`` cells, i.e. inputs under 224 px at window 7), then fails on its relative
position bias, and keeps the shrunken window and zero shift for later calls. So inputs are padded (zeros, bottom and
right) to at least ``32 * window_size`` per side and the maps cropped back to ``H / stride``, and every layer's
window and shift are restored before each call. SwinV2 fixes its windows at construction and runs at any size.

Loading is checked: every backbone tensor must come from the folder (transformers' ``output_loading_info``), or a
:class:`BackboneError` names the missing keys.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import BackboneError
from .base import Backbone
from .checkpoints import LoadReport, adapt_input_channels, check_complete, is_derived

MODEL_TYPES = ("swin", "swinv2")


class TransformersSwinBackbone(Backbone):
    family = "transformers"
    default_target_pattern = (
        r"encoder\.layers\.\d+\.blocks\.\d+\.(attention\.(q_proj|k_proj|v_proj|o_proj|self\.(query|key|value)|"
        r"output\.dense)|mlp\.fc[12]|intermediate\.dense|output\.dense)"
    )

    def _window_states(self) -> list[tuple[nn.Module, Any, Any]]:
        """Each Swin v1 layer with the window and shift it was built with (transformers mutates them)."""
        if getattr(self, "_initial_windows", None) is None:
            self._initial_windows = [
                (module, module.window_size, module.shift_size)
                for module in self.model.modules()
                if hasattr(module, "set_shift_and_window_size")
            ]
        return self._initial_windows

    def minimum_side(self) -> int:
        """Smallest input side in pixels the family runs at without shrinking windows (padding covers the rest)."""
        if self.model.config.model_type != "swin":
            return 32
        return 32 * int(self.model.config.window_size)

    def extract_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        height, width = images.shape[-2:]
        side = self.minimum_side()
        pad_bottom, pad_right = max(0, side - height), max(0, side - width)
        if pad_bottom or pad_right:
            images = nn.functional.pad(images, (0, pad_right, 0, pad_bottom))
        if self.model.config.model_type == "swin":
            for layer, window, shift in self._window_states():
                layer.window_size, layer.shift_size = window, shift
            output = self.model(
                pixel_values=images, output_hidden_states=True, output_hidden_states_before_downsampling=True
            )
        else:
            embedded, dimensions = self.model.embeddings(images)
            output = self.model.encoder(
                embedded, dimensions, output_hidden_states=True, output_hidden_states_before_downsampling=True
            )
        maps = list(output.reshaped_hidden_states[1:5])
        return [
            feature[..., : height // stride, : width // stride]
            for feature, stride in zip(maps, self.feature_strides)
        ]

    def architecture(self) -> dict[str, Any]:
        config = self.model.config
        result = {
            "version": "v2" if config.model_type == "swinv2" else "v1",
            "embed_dim": int(config.embed_dim),
            "depths": list(config.depths),
            "num_heads": list(config.num_heads),
            "window_size": int(config.window_size),
        }
        if config.model_type == "swinv2":
            result["pretrained_window_sizes"] = list(config.pretrained_window_sizes)
        return result


def _model_class(model_type: str):
    import transformers

    if model_type == "swin":
        return transformers.SwinModel, transformers.SwinConfig
    if model_type == "swinv2":
        return transformers.Swinv2Model, transformers.Swinv2Config
    raise BackboneError(f"transformers backbone must be one of {MODEL_TYPES}, got model_type {model_type!r}")


def build_transformers_swin(
    name: str | None,
    weights: str | Path | None,
    *,
    in_chans: int | None = None,
    img_size: int = 224,
    model_args: dict[str, Any] | None = None,
) -> TransformersSwinBackbone:
    """Build a frozen transformers Swin.

    Args:
        name: ``"swin"`` or ``"swinv2"`` (checked against the folder's ``config.json``).
        weights: a ``save_pretrained`` folder, or ``None`` for a random initialisation from ``model_args``.
        in_chans: input channels; the patch embedding is adapted the way timm does when it differs.
        img_size: nominal input size (the config's ``image_size``).
        model_args: config overrides for a random initialisation (``embed_dim``, ``depths``, ``num_heads``...).
    """
    report = None
    if weights is None:
        model_type = name or "swin"
        model_class, config_class = _model_class(model_type)
        config = config_class(image_size=img_size, num_channels=in_chans or 3, **(model_args or {}))
        model = model_class(config, add_pooling_layer=False)
    else:
        folder = Path(weights)
        if not (folder / "config.json").is_file():
            raise BackboneError(f"{folder}: not a transformers save_pretrained folder (no config.json)")
        import transformers

        try:
            config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise BackboneError(f"{folder}/config.json: cannot read it ({error})") from None
        model_type = config.model_type
        if name and name != model_type:
            raise BackboneError(f"{folder}: config says model_type {model_type!r}, spec asked for {name!r}")
        model_class, _ = _model_class(model_type)
        try:
            model, info = model_class.from_pretrained(
                str(folder), local_files_only=True, add_pooling_layer=False, output_loading_info=True
            )
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            raise BackboneError(f"{folder}: cannot load the weights ({str(error).splitlines()[0][:300]})") from None
        report = _check_transformers_load(model, info, folder, f"transformers:{model_type}")
    in_chans = in_chans or model.config.num_channels
    if in_chans != model.config.num_channels:
        if report is not None:
            report.transformed.append(
                f"embeddings.patch_embeddings.projection.weight: {model.config.num_channels} -> {in_chans} input "
                "channels (timm adapt_input_conv)"
            )
        _adapt_patch_embedding(model, in_chans)
    config = model.config
    channels = tuple(int(config.embed_dim * 2**i) for i in range(4))
    recorded = {
        "model_type": model_type,
        "embed_dim": config.embed_dim,
        "depths": list(config.depths),
        "num_heads": list(config.num_heads),
        "window_size": config.window_size,
        "patch_size": config.patch_size,
        "image_size": config.image_size,
    }
    return TransformersSwinBackbone(
        model, name=model_type, in_chans=in_chans, feature_channels=channels, model_args=recorded, weights=weights,
        load_report=report,
    )


def _check_transformers_load(model: nn.Module, info: dict[str, Any], folder: Path, spec: str) -> LoadReport:
    """A :class:`LoadReport` from transformers' loading info; raises unless every tensor came from the folder."""
    model_keys = {key for key in model.state_dict() if not is_derived(key)}
    missing = [key for key in info.get("missing_keys", ()) if not is_derived(key)]
    mismatched = [
        f"{item[0]}: file {list(item[1])} vs model {list(item[2])}"
        if isinstance(item, (tuple, list)) and len(item) == 3
        else str(item)
        for item in info.get("mismatched_keys", ())
    ]
    unexpected = [key for key in info.get("unexpected_keys", ()) if not is_derived(key)]
    names = ("model.safetensors", "pytorch_model.bin")
    weight_file = next((folder / name for name in names if (folder / name).exists()), folder)
    report = LoadReport(
        source=str(folder),
        tensors_from_file=len(model_keys - set(missing)),
        tensors_in_backbone=len(model_keys),
        ignored=sorted(unexpected),
    )
    file_keys: list[str] = []
    if missing and weight_file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weight_file), "pt") as handle:
            file_keys = list(handle.keys())
    check_complete(
        report, spec=spec, missing=missing, unexpected=unexpected, mismatched=mismatched, file_keys=file_keys,
        family="transformers",
    )
    return report


@torch.no_grad()
def _adapt_patch_embedding(model: nn.Module, in_chans: int) -> None:
    patch_embeddings = model.embeddings.patch_embeddings
    old = patch_embeddings.projection
    new = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, bias=old.bias is not None)
    new.weight.copy_(adapt_input_channels(old.weight, in_chans))
    if old.bias is not None:
        new.bias.copy_(old.bias)
    patch_embeddings.projection = new
    patch_embeddings.num_channels = in_chans
    model.config.num_channels = in_chans

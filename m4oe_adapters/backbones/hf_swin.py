"""transformers ``SwinModel``/``Swinv2Model`` from a ``save_pretrained`` folder (``config.json`` + weights).

transformers v5 names the block linears ``attention.q_proj/k_proj/v_proj/o_proj`` and ``mlp.fc1/fc2``.
Features are the stage outputs *before* patch merging (``output_hidden_states_before_downsampling=True``), so the
four maps have strides 4, 8, 16, 32 and channels ``C, 2C, 4C, 8C``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import BackboneError
from .base import Backbone
from .checkpoints import adapt_input_channels

MODEL_TYPES = ("swin", "swinv2")


class TransformersSwinBackbone(Backbone):
    family = "transformers"
    default_target_pattern = (
        r"encoder\.layers\.\d+\.blocks\.\d+\.(attention\.(q_proj|k_proj|v_proj|o_proj|self\.(query|key|value)|"
        r"output\.dense)|mlp\.fc[12]|intermediate\.dense|output\.dense)"
    )

    def extract_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        output = self.model(
            pixel_values=images, output_hidden_states=True, output_hidden_states_before_downsampling=True
        )
        return list(output.reshaped_hidden_states[1:5])


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
            model = model_class.from_pretrained(str(folder), local_files_only=True, add_pooling_layer=False)
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            raise BackboneError(f"{folder}: cannot load the weights ({str(error).splitlines()[0][:300]})") from None
    in_chans = in_chans or model.config.num_channels
    if in_chans != model.config.num_channels:
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
        model, name=model_type, in_chans=in_chans, feature_channels=channels, model_args=recorded, weights=weights
    )


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

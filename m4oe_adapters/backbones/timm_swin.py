"""timm Swin (``swin_*``, ``swinv2_*``) from a local checkpoint in timm's native format.

Accepted weights: a ``.safetensors``/``.pth``/``.bin`` state dict, or a folder in timm's hub layout
(``model.safetensors`` + ``config.json`` with ``architecture`` and ``model_args``, as ``m4oe pretrain`` writes).
The state dict is read here (``.pth`` only with ``weights_only=True``, which timm's own file loader does not use) and
handed to timm through ``pretrained_cfg_overlay=dict(state_dict=...)``, so timm's own filtering, input-channel
adaptation and strict key check apply.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import BackboneError
from .base import Backbone
from .checkpoints import read_state_dict

SIZE_FREE_ARGS = ("strict_img_size",)


class TimmSwinBackbone(Backbone):
    family = "timm"
    default_target_pattern = r"layers\.\d+\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"

    def extract_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(images, intermediates_only=True)


def read_timm_weights(weights: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str | None]:
    """State dict, model_args and architecture name (from ``config.json`` when the weights are a hub folder)."""
    if weights.is_dir():
        config_path = weights / "config.json"
        weight_files = [weights / name for name in ("model.safetensors", "pytorch_model.bin") if (weights / name).exists()]
        if not weight_files:
            raise BackboneError(f"{weights}: folder has no model.safetensors (timm hub layout expected)")
        config: dict[str, Any] = {}
        if config_path.exists():
            try:
                config = json.loads(config_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise BackboneError(f"{config_path}: not valid JSON ({error})") from None
        return read_state_dict(weight_files[0]), dict(config.get("model_args", {})), config.get("architecture")
    return read_state_dict(weights), {}, None


def build_timm_swin(
    name: str | None,
    weights: str | Path | None,
    *,
    in_chans: int | None = None,
    img_size: int | tuple[int, int] = 224,
    model_args: dict[str, Any] | None = None,
) -> TimmSwinBackbone:
    """Build a frozen timm Swin.

    Args:
        name: timm architecture (``swin_tiny_patch4_window7_224``...); ``None`` takes it from the folder's config.
        weights: checkpoint path, or ``None`` for a random initialisation (recorded as such).
        in_chans: input channels; default: the checkpoint's. A 3-channel checkpoint is adapted to 1 channel by
            summing the first convolution over its input channels (timm's rule).
        img_size: nominal input size; any multiple of 32 is accepted at run time.
        model_args: architecture overrides (``embed_dim``, ``depths``, ``num_heads``, ``window_size``...).
    """
    import timm

    args: dict[str, Any] = {}
    state_dict = None
    if weights is not None:
        state_dict, file_args, file_name = read_timm_weights(Path(weights))
        args.update(file_args)
        name = name or file_name
        if "patch_embed.proj.weight" in state_dict and in_chans is None:
            in_chans = int(state_dict["patch_embed.proj.weight"].shape[1])
    args.update(model_args or {})
    for key in ("in_chans", "img_size", "num_classes", *SIZE_FREE_ARGS):
        args.pop(key, None)
    if not name or not name.startswith("swin"):
        raise BackboneError(f"timm backbone must be a Swin architecture (swin_*, swinv2_*), got {name!r}")
    in_chans = in_chans or 3
    try:
        model = timm.create_model(
            name,
            pretrained=state_dict is not None,
            pretrained_cfg_overlay=dict(state_dict=state_dict) if state_dict is not None else None,
            num_classes=0,
            in_chans=in_chans,
            img_size=img_size,
            strict_img_size=False,
            drop_path_rate=0.0,
            **args,
        )
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        where = weights if weights is not None else "random initialisation"
        raise BackboneError(
            f"{where}: cannot build timm:{name} with {args}: {str(error).splitlines()[0][:400]}. "
            "Check the architecture name and --model-args against the checkpoint"
        ) from None
    channels = tuple(int(info["num_chs"]) for info in model.feature_info)
    recorded = {key: (list(value) if isinstance(value, tuple) else value) for key, value in args.items()}
    recorded["img_size"] = list(img_size) if isinstance(img_size, (tuple, list)) else int(img_size)
    return TimmSwinBackbone(
        model, name=name, in_chans=in_chans, feature_channels=channels, model_args=recorded, weights=weights
    )

"""MONAI's Swin encoder (the ``swinViT`` of ``SwinUNETR``), 2D, from a MONAI checkpoint.

Key layouts accepted: a bare ``SwinTransformer`` state dict; a full ``SwinUNETR`` state dict (``swinViT.`` prefix,
decoder keys ignored); ``DataParallel`` wrapping (``module.``); the self-supervised layout (``swin_vit.``,
``mlp.fc1/fc2``) and the Disruptive-Autoencoder ``encoder.`` layout handled by MONAI's ``filter_swinunetr``; any of
them nested under ``state_dict``/``model`` (next to ``epoch``/``best_acc``/``optimizer`` as MONAI's BTCV trainer
saves them; numpy scalars read safely). The architecture (feature size, depths, heads, window, channels) is read
from the tensor shapes, so the checkpoint alone is enough. MONAI's public self-supervised weights are 3D; this
library segments 2D images, so 3D checkpoints are refused with a clear message.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..errors import BackboneError
from .base import Backbone
from .checkpoints import (
    LoadReport,
    adapt_input_channels,
    check_complete,
    is_derived,
    read_checkpoint,
    split_by_shape,
    strip_prefixes,
)

DEFAULT_ARGS = {"feature_size": 48, "depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24], "window_size": 7}


class MonaiSwinBackbone(Backbone):
    family = "monai"
    default_target_pattern = r"layers[1-4]\.0\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear[12])"

    def extract_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        # MONAI returns 5 maps (strides 2..32, patch size 2); the last four match the common interface.
        return list(self.model(images, normalize=True)[1:5])

    def architecture(self) -> dict[str, Any]:
        args = self.model_args
        return {
            "embed_dim": args["feature_size"],
            "depths": list(args["depths"]),
            "num_heads": list(args["num_heads"]),
            "window_size": args["window_size"],
            "use_v2": bool(args.get("use_v2", False)),
        }


def normalise_monai_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map every accepted key layout onto bare ``SwinTransformer`` keys."""
    from monai.networks.nets.swin_unetr import filter_swinunetr

    if any(key.startswith("encoder.") for key in state_dict):
        mapped = {}
        for key, value in state_dict.items():
            result = filter_swinunetr(key, value)
            if result is not None:
                mapped[result[0]] = result[1]
        state_dict = mapped
    state_dict = strip_prefixes(state_dict, ("module.", "model.", "backbone.", "swinViT.", "swin_vit."))
    renamed = {}
    for key, value in state_dict.items():
        key = key.replace("mlp.fc1.", "mlp.linear1.").replace("mlp.fc2.", "mlp.linear2.")
        if key.startswith(("patch_embed.", "layers")):
            renamed[key] = value
    return renamed


def infer_architecture(state_dict: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """feature_size, in_chans, spatial_dims, depths, num_heads, window_size from tensor shapes."""
    embed = state_dict.get("patch_embed.proj.weight")
    if embed is None:
        raise BackboneError(f"{path}: no patch_embed.proj.weight: not a MONAI SwinUNETR/SwinTransformer checkpoint")
    spatial_dims = embed.dim() - 2
    depths, heads, window = [], [], None
    for stage in range(1, 5):
        blocks = {
            int(match.group(1))
            for key in state_dict
            if (match := re.match(rf"layers{stage}\.0\.blocks\.(\d+)\.", key))
        }
        if not blocks:
            raise BackboneError(f"{path}: stage layers{stage} missing from the checkpoint")
        depths.append(max(blocks) + 1)
        table = state_dict[f"layers{stage}.0.blocks.0.attn.relative_position_bias_table"]
        heads.append(int(table.shape[1]))
        side = round(table.shape[0] ** (1 / spatial_dims))
        window = (side + 1) // 2
    return {
        "feature_size": int(embed.shape[0]),
        "in_chans": int(embed.shape[1]),
        "spatial_dims": spatial_dims,
        "patch_size": int(embed.shape[-1]),
        "depths": depths,
        "num_heads": heads,
        "window_size": window,
        "use_v2": any(key.startswith("layers1c") for key in state_dict),
    }


def build_monai_swin(
    name: str | None,
    weights: str | Path | None,
    *,
    in_chans: int | None = None,
    img_size: int = 224,
    model_args: dict[str, Any] | None = None,
) -> MonaiSwinBackbone:
    """Build a frozen 2D MONAI Swin encoder from a checkpoint (architecture read from it) or at random."""
    from monai.networks.nets.swin_unetr import SwinTransformer

    state_dict = None
    checkpoint = None
    if weights is not None:
        path = Path(weights)
        checkpoint = read_checkpoint(path)
        state_dict = normalise_monai_keys(checkpoint.tensors)
        args = infer_architecture(state_dict, path)
        if args["spatial_dims"] != 2:
            raise BackboneError(
                f"{path}: this is a {args['spatial_dims']}D MONAI checkpoint (feature size {args['feature_size']}, "
                f"depths {args['depths']}); m4oe-adapters segments 2D images and a 3D Swin's weights cannot be used "
                "as a 2D backbone. Ways forward: a 2D SwinUNETR/SwinTransformer checkpoint (spatial_dims=2) with "
                "--backbone monai:swin_unetr; a 2D Swin from timm or transformers (--backbone timm:NAME --weights "
                "FILE); or pretrain one on your own images with `m4oe pretrain` (writes a timm folder)"
            )
    else:
        args = {**DEFAULT_ARGS, "in_chans": in_chans or 1, "spatial_dims": 2, "patch_size": 2, "use_v2": False}
        args.update(model_args or {})
    checkpoint_chans = args["in_chans"]
    in_chans = in_chans or checkpoint_chans
    window = args["window_size"]
    model = SwinTransformer(
        in_chans=in_chans,
        embed_dim=args["feature_size"],
        window_size=(window, window),
        patch_size=(args["patch_size"], args["patch_size"]),
        depths=tuple(args["depths"]),
        num_heads=tuple(args["num_heads"]),
        spatial_dims=2,
        use_v2=args.get("use_v2", False),
    )
    report = None
    if state_dict is not None and checkpoint is not None:
        transformed = []
        if checkpoint_chans != in_chans:
            embed = state_dict["patch_embed.proj.weight"]
            state_dict["patch_embed.proj.weight"] = adapt_input_channels(embed, in_chans)
            transformed.append(
                f"patch_embed.proj.weight: {checkpoint_chans} -> {in_chans} input channels (timm adapt_input_conv)"
            )
        model_keys = {key for key in model.state_dict() if not is_derived(key)}
        state_dict = {key: value for key, value in state_dict.items() if not is_derived(key)}
        state_dict, mismatched = split_by_shape(state_dict, model.state_dict())
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        missing = [key for key in missing if not is_derived(key)]
        report = LoadReport(
            source=str(weights),
            tensors_from_file=len(model_keys - set(missing)),
            tensors_in_backbone=len(model_keys),
            container=checkpoint.container,
            prefix="",
            transformed=transformed,
            ignored=sorted(key for key in checkpoint.tensors if "patch_embed." not in key and "layers" not in key),
            ignored_entries=checkpoint.ignored_entries,
        )
        # The architecture is read from the file, so a leftover key means a layout this loader does not understand.
        if unexpected and not missing:
            raise BackboneError(
                f"{weights}: {len(unexpected)} encoder tensors of the file have no place in the MONAI Swin inferred "
                f"from it ({', '.join(list(unexpected)[:5])}); the checkpoint layout is not one this loader knows"
            )
        check_complete(
            report, spec=f"monai:{name or 'swin_unetr'}", missing=missing, unexpected=list(unexpected),
            mismatched=mismatched, file_keys=checkpoint.tensors, family="monai",
            file_architecture=f"feature_size {args['feature_size']}, depths {args['depths']}",
        )
    feature_size = args["feature_size"]
    channels = (2 * feature_size, 4 * feature_size, 8 * feature_size, 16 * feature_size)
    recorded = {key: value for key, value in args.items() if key != "in_chans"}
    recorded["img_size"] = img_size
    return MonaiSwinBackbone(
        model, name=name or "swin_unetr", in_chans=in_chans, feature_channels=channels, model_args=recorded,
        weights=weights, load_report=report,
    )

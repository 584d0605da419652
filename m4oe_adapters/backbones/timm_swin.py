"""timm Swin (``swin_*``, ``swinv2_*``) from a local checkpoint in timm's native format.

Accepted weights: a ``.safetensors``/``.pth``/``.bin`` state dict, or a folder in timm's hub layout
(``model.safetensors`` + ``config.json`` with ``architecture`` and ``model_args``, as ``m4oe pretrain`` writes).
Also the layouts users save: the original Microsoft releases, SimMIM (``encoder.*``), DDP (``module.*``), DINO-style
``teacher``/``student`` containers, fine-tuning containers (``state_dict`` next to ``epoch``/``optimizer``). The file
is read here (``.pth`` only with ``weights_only=True``, see :mod:`.checkpoints`), passed through timm's own
``checkpoint_filter_fn`` and input-channel adaptation, loaded, and checked: every backbone tensor must come from
the file, or the load is refused (timm alone would load with ``strict=False`` and leave the rest random).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import BackboneError
from .base import Backbone
from .checkpoints import (
    Checkpoint,
    LoadReport,
    adapt_input_channels,
    check_complete,
    is_derived,
    read_checkpoint,
    split_by_shape,
    unwrap,
)

SIZE_FREE_ARGS = ("strict_img_size",)


class TimmSwinBackbone(Backbone):
    family = "timm"
    default_target_pattern = r"layers\.\d+\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"

    def extract_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(images, intermediates_only=True)

    def architecture(self) -> dict[str, Any]:
        return timm_architecture(self.model)


def read_timm_weights(weights: Path) -> tuple[Checkpoint, dict[str, Any], str | None]:
    """The checkpoint, model_args and architecture name (from ``config.json`` when the weights are a hub folder)."""
    if weights.is_dir():
        config_path = weights / "config.json"
        weight_files = [weights / name for name in ("model.safetensors", "pytorch_model.bin") if (weights / name).exists()]
        config: dict[str, Any] = {}
        if config_path.exists():
            try:
                config = json.loads(config_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise BackboneError(f"{config_path}: not valid JSON ({error})") from None
        if config.get("model_type") in ("swin", "swinv2") and "architecture" not in config:
            raise BackboneError(
                f"{weights}: this is a transformers save_pretrained folder (model_type {config['model_type']!r}); "
                f"load it with --backbone transformers:{config['model_type']}"
            )
        if not weight_files:
            raise BackboneError(f"{weights}: folder has no model.safetensors (timm hub layout expected)")
        return read_checkpoint(weight_files[0]), dict(config.get("model_args", {})), config.get("architecture")
    return read_checkpoint(weights), {}, None


def timm_architecture(model: torch.nn.Module) -> dict[str, Any]:
    """embed_dim, depths, num_heads, window_size of a timm Swin (v1 or v2), read from the built modules."""
    stages = list(model.layers)
    first_attention = stages[0].blocks[0].attn
    window = getattr(first_attention, "window_size", None) or getattr(stages[0].blocks[0], "window_size", None)
    return {
        "version": "v2" if hasattr(first_attention, "logit_scale") else "v1",
        "embed_dim": int(model.feature_info[0]["num_chs"]),
        "depths": [len(stage.blocks) for stage in stages],
        "num_heads": [int(stage.blocks[0].attn.num_heads) for stage in stages],
        "window_size": list(window) if isinstance(window, (tuple, list)) else window,
    }


def file_architecture(state_dict: dict[str, torch.Tensor]) -> str | None:
    """A description of the Swin a timm/Microsoft state dict holds, read from its shapes (for error messages)."""
    embed = state_dict.get("patch_embed.proj.weight")
    if embed is None:
        return None
    depths = []
    for stage in range(8):
        blocks = {int(m.group(1)) for key in state_dict if (m := re.match(rf"layers\.{stage}\.blocks\.(\d+)\.", key))}
        if not blocks:
            break
        depths.append(max(blocks) + 1)
    text = f"embed_dim {embed.shape[0]}, depths {depths}, {embed.shape[1]} input channels"
    table = state_dict.get("layers.0.blocks.0.attn.relative_position_bias_table")
    if table is not None:
        side = round(table.shape[0] ** 0.5)
        text += f", window {(side + 1) // 2}, Swin v1"
    elif any("cpb_mlp" in key for key in state_dict):
        text += ", SwinV2"
    return text


def infer_timm_arguments(tensors: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]] | None:
    """A timm name and ``model_args`` that rebuild the Swin a timm/Microsoft-layout state dict holds, or ``None``.

    Read from shapes under any wrapper prefix: embed dim (``patch_embed.proj``), depths (block indices), heads
    (relative-position table or SwinV2's ``cpb_mlp``), window (Swin v1's table, or the Microsoft SwinV2
    ``relative_coords_table``). ``None`` when a value cannot be read (e.g. a timm-native SwinV2 file, which stores no
    window-sized tensor).
    """
    embed_key = next((key for key in tensors if key.endswith("patch_embed.proj.weight")), None)
    if embed_key is None:
        return None
    prefix = embed_key[: -len("patch_embed.proj.weight")]
    state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
    depths, heads, window = [], [], None
    v2 = any("cpb_mlp" in key for key in state)
    for stage in range(8):
        blocks = {int(m.group(1)) for key in state if (m := re.match(rf"layers\.{stage}\.blocks\.(\d+)\.", key))}
        if not blocks:
            break
        depths.append(max(blocks) + 1)
        attention = f"layers.{stage}.blocks.0.attn."
        if v2:
            head_tensor = state.get(attention + "cpb_mlp.2.weight")
            coords = state.get(attention + "relative_coords_table")
            if head_tensor is None:
                return None
            heads.append(int(head_tensor.shape[0]))
            if stage == 0 and coords is not None:
                window = (int(coords.shape[1]) + 1) // 2
        else:
            table = state.get(attention + "relative_position_bias_table")
            if table is None:
                return None
            heads.append(int(table.shape[1]))
            if stage == 0:
                window = (round(table.shape[0] ** 0.5) + 1) // 2
    if len(depths) != 4 or window is None:
        return None
    args = {"embed_dim": int(state[embed_key[len(prefix):]].shape[0]), "depths": depths, "num_heads": heads,
            "window_size": window}
    return ("swinv2_tiny_window8_256" if v2 else "swin_tiny_patch4_window7_224"), args


def load_timm_checkpoint(
    model: torch.nn.Module, checkpoint: Checkpoint, *, spec: str, in_chans: int
) -> LoadReport:
    """Copy ``checkpoint`` into ``model`` through timm's own ``checkpoint_filter_fn`` and prove it complete.

    The steps are timm's (``timm.models._builder.load_pretrained``): the family's filter (Microsoft layout →
    timm layout, relative-position tables resized to the model's window, patch embedding resampled), then the
    input-channel adaptation of ``patch_embed.proj``; but the load is checked here: a backbone tensor missing
    from the file raises :class:`BackboneError` instead of staying random.
    """
    model_state = model.state_dict()
    model_keys = {key for key in model_state if not is_derived(key)}
    # Microsoft's layout puts downsampling at the end of a stage; those keys match after timm's filter only,
    # so the wrapper prefix is found on the keys both layouts share.
    tensors, prefix, outside = unwrap(checkpoint.tensors, model_keys)
    modules = dict(model.named_modules())
    early_unexpected = [
        key for key in tensors
        if key.endswith("relative_position_bias_table") and key[: -len(".relative_position_bias_table")] not in modules
    ]
    for key in early_unexpected:  # timm's v1 filter looks the owner module up and would raise AttributeError
        tensors.pop(key)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    originals = {id(value): tuple(value.shape) for value in tensors.values()}
    if filter_fn is not None:
        # timm before 1.0.31 takes a file without ``head.fc.weight`` for Microsoft's layout and moves every
        # downsampling layer one stage on; a headless file in timm's own layout (what ``m4oe pretrain`` writes: no
        # stage-0 downsampling) then loses 9 tensors. A marker head tells those versions the layout; newer ones
        # decide by stage 0's downsampling and pass the marker through; it is dropped after the filter.
        marker = None
        if "head.fc.weight" not in tensors and "layers.0.downsample.reduction.weight" not in tensors \
                and any(".downsample." in key for key in tensors):
            marker = torch.zeros(0)
            tensors = {**tensors, "head.fc.weight": marker}
        try:
            tensors = filter_fn(tensors, model)
            if marker is not None:  # the file had no head: whatever the filter made of the marker goes
                tensors.pop("head.fc.weight", None)
        except (AttributeError, RuntimeError, KeyError, ValueError, TypeError, IndexError) as error:
            raise BackboneError(
                f"{checkpoint.path}: timm's checkpoint filter for {spec} failed on this file "
                f"({type(error).__name__}: {str(error).splitlines()[0][:300]}). "
                f"The file holds {file_architecture(checkpoint.tensors) or 'no recognisable Swin'}: check the "
                "family, architecture name and --model-args"
            ) from None
    # The filter renames keys (Microsoft layout) without touching tensors; a new tensor object is a transformation.
    transformed = [
        f"{key}: recomputed to {list(value.shape)} by timm's checkpoint_filter_fn (window or patch size differs)"
        for key, value in tensors.items()
        if id(value) not in originals
    ]
    final_norm = getattr(model, "norm", None)
    if tensors and "norm.weight" not in tensors and isinstance(final_norm, torch.nn.LayerNorm):
        # Encoders saved without the classifier path (Swin-MAE) have no final norm; the four feature maps never
        # use it, so it is removed rather than left at its initial values.
        model.norm = torch.nn.Identity()
        model_state = model.state_dict()
        model_keys = {key for key in model_state if not is_derived(key)}
        transformed.append("norm (final LayerNorm): not in the file and unused by the feature maps, removed")
    embed = tensors.get("patch_embed.proj.weight")
    if embed is not None and embed.dim() == 4 and embed.shape[1] != in_chans:
        tensors["patch_embed.proj.weight"] = adapt_input_channels(embed, in_chans)
        transformed.append(
            f"patch_embed.proj.weight: {embed.shape[1]} -> {in_chans} input channels (timm adapt_input_conv)"
        )
    tensors = {key: value for key, value in tensors.items() if not is_derived(key)}
    fitting, mismatched = split_by_shape(tensors, model_state)
    result = model.load_state_dict(fitting, strict=False)
    missing = [key for key in result.missing_keys if not is_derived(key)]
    unexpected = list(result.unexpected_keys) + early_unexpected
    report = LoadReport(
        source=str(checkpoint.path),
        tensors_from_file=len(model_keys - set(missing)),
        tensors_in_backbone=len(model_keys),
        container=checkpoint.container,
        prefix=prefix,
        transformed=transformed,
        ignored=sorted(outside + unexpected),
        ignored_entries=checkpoint.ignored_entries,
    )
    check_complete(
        report, spec=spec, missing=missing, unexpected=unexpected, mismatched=mismatched,
        file_keys=checkpoint.tensors, family="timm", file_architecture=file_architecture(tensors),
    )
    return report


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

    Raises:
        BackboneError: unreadable file, or a file that does not provide every backbone tensor (see
            :func:`load_timm_checkpoint`).
    """
    import timm

    args: dict[str, Any] = {}
    checkpoint = None
    if weights is not None:
        checkpoint, file_args, file_name = read_timm_weights(Path(weights))
        args.update(file_args)
        name = name or file_name
        embed = next(
            (value for key, value in checkpoint.tensors.items() if key.endswith("patch_embed.proj.weight")), None
        )
        if embed is not None and embed.dim() == 4 and in_chans is None:
            in_chans = int(embed.shape[1])
    args.update(model_args or {})
    for key in ("in_chans", "img_size", "num_classes", *SIZE_FREE_ARGS):
        args.pop(key, None)
    if not name or not name.startswith("swin"):
        raise BackboneError(f"timm backbone must be a Swin architecture (swin_*, swinv2_*), got {name!r}")
    in_chans = in_chans or 3
    where = weights if weights is not None else "random initialisation"
    try:
        model = timm.create_model(
            name,
            pretrained=False,
            num_classes=0,
            in_chans=in_chans,
            img_size=img_size,
            strict_img_size=False,
            drop_path_rate=0.0,
            **args,
        )
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        raise BackboneError(
            f"{where}: cannot build timm:{name} with {args}: {str(error).splitlines()[0][:400]}. "
            "Check the architecture name and --model-args against the checkpoint"
        ) from None
    report = None
    if checkpoint is not None:
        report = load_timm_checkpoint(model, checkpoint, spec=f"timm:{name}", in_chans=in_chans)
    channels = tuple(int(info["num_chs"]) for info in model.feature_info)
    recorded = {key: (list(value) if isinstance(value, tuple) else value) for key, value in args.items()}
    recorded["img_size"] = list(img_size) if isinstance(img_size, (tuple, list)) else int(img_size)
    return TimmSwinBackbone(
        model, name=name, in_chans=in_chans, feature_channels=channels, model_args=recorded, weights=weights,
        load_report=report,
    )

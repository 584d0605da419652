"""A small convolutional decoder and head, one per modality.

Why per-modality and convolutional (not a Swin-UNet decoder with experts, as M4oE has): each modality's file must
be small and independent of the others. A shared decoder would tie every modality to the one it was trained with;
a Swin-UNet decoder for Swin-T is about as large as the encoder stages it mirrors. This FPN-style decoder is about
0.3 M parameters at width 64 for Swin-T (≈1.2 MB in fp32), trains fast on CPU, and a full-resolution image stem
restores the thin structures (retinal vessels, membranes) that stride-4 features blur.

Data flow, for feature maps ``f1..f4`` at strides 4, 8, 16, 32:

    p4 = lateral(f4);  p_i = smooth(lateral(f_i) + up(p_{i+1}))  for i = 3, 2, 1      (stride 4, D channels)
    d2 = fuse(up(p1) ++ stem_half(image))                                              (stride 2)
    d1 = fuse(up(d2) ++ stem_full(image))                                              (stride 1)
    logits = head(d1)                                                                  [B, num_classes, H, W]
"""
from __future__ import annotations

import math
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_norm_act(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    groups = 8 if out_channels % 8 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.GELU(),
    )


class ModalityDecoder(nn.Module):
    """Decoder + segmentation head of one modality.

    Args:
        feature_channels: channels of the backbone's four maps (strides 4, 8, 16, 32).
        in_chans: image channels (the stem reads the normalised image itself).
        num_classes: output classes, background included.
        channels: pyramid width ``D``.
        stem_channels: width of the image stem.
    """

    def __init__(
        self,
        feature_channels: tuple[int, ...],
        in_chans: int,
        num_classes: int,
        channels: int = 64,
        stem_channels: int = 16,
    ) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in feature_channels)
        self.smooth = nn.ModuleList(conv_norm_act(channels, channels) for _ in feature_channels[:-1])
        self.stem_full = conv_norm_act(in_chans, stem_channels)
        self.stem_half = conv_norm_act(stem_channels, stem_channels, stride=2)
        half = max(channels // 2, 8)
        self.fuse_half = conv_norm_act(channels + stem_channels, half)
        self.fuse_full = conv_norm_act(half + stem_channels, half)
        self.head = nn.Conv2d(half, num_classes, 1)

    @property
    def num_classes(self) -> int:
        return self.head.out_channels

    def forward(self, features: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """Args: ``features`` (4 maps ``[B, C_i, H/s_i, W/s_i]``), ``images [B, C, H, W]``.

        Returns: logits ``[B, num_classes, H, W]``.
        """
        pyramid = self.lateral[-1](features[-1])
        for index in range(len(features) - 2, -1, -1):
            lateral = self.lateral[index](features[index])
            pyramid = lateral + F.interpolate(pyramid, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            pyramid = self.smooth[index](pyramid)
        stem_full = self.stem_full(images)
        stem_half = self.stem_half(stem_full)
        up = F.interpolate(pyramid, size=stem_half.shape[-2:], mode="bilinear", align_corners=False)
        decoded = self.fuse_half(torch.cat([up, stem_half], dim=1))
        up = F.interpolate(decoded, size=stem_full.shape[-2:], mode="bilinear", align_corners=False)
        decoded = self.fuse_full(torch.cat([up, stem_full], dim=1))
        return self.head(decoded)


class PackedDecoder(nn.Module):
    """A decoder held for inference as one flat buffer: what a service holding many adapters keeps per modality.

    A :class:`ModalityDecoder` is ~36 ``nn.Module`` objects and ~30 tensors; their Python and C++ bookkeeping costs
    about 0.1 MB per adapter, a tenth of a 1 MB fp16 file (``examples/serve_memory_breakdown.py``). Here the same
    values live in one buffer of the stored dtype; a forward builds views of it (cast to ``dtype``) and runs them
    through a shared, weightless template of the same shape (meta device, one per thread, so concurrent forwards
    never swap each other's tensors). Its state-dict keys and values are the unpacked decoder's (``lateral.0.weight``
    …), so files, :meth:`SegmentationModel.modality_tensors` and replacement see no difference. No parameters: it
    cannot be trained (:meth:`SegmentationModel.train_only` refuses it).
    """

    _templates = threading.local()

    def __init__(self, feature_channels: tuple[int, ...], in_chans: int, num_classes: int, channels: int = 64,
                 stem_channels: int = 16, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.shape_key = (tuple(feature_channels), in_chans, num_classes, channels, stem_channels)
        layout, offset = [], 0
        for name, tensor in self._template().state_dict(keep_vars=True).items():
            layout.append((name, tuple(tensor.shape), offset))
            offset += tensor.numel()
        self.layout = tuple(layout)
        self.register_buffer("flat", torch.zeros(offset, dtype=dtype, device=device), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.shape_key[2]

    def _template(self) -> ModalityDecoder:
        templates = self._templates.__dict__.setdefault("by_shape", {})
        if self.shape_key not in templates:
            feature_channels, in_chans, num_classes, channels, stem_channels = self.shape_key
            with torch.device("meta"):
                templates[self.shape_key] = ModalityDecoder(feature_channels, in_chans, num_classes, channels,
                                                            stem_channels)
        return templates[self.shape_key]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The decoder's tensors under their ``ModalityDecoder`` names: views of the flat buffer (writable)."""
        return {name: self.flat[offset:offset + math.prod(shape)].view(shape) for name, shape, offset in self.layout}

    def forward(self, features: list[torch.Tensor], images: torch.Tensor,
                dtype: torch.dtype | None = None) -> torch.Tensor:
        """:meth:`ModalityDecoder.forward` with these values, computed in ``dtype`` (default: the stored one)."""
        state = {name: view.to(dtype) if dtype is not None else view for name, view in self.tensors().items()}
        return torch.func.functional_call(self._template(), state, (features, images))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, view in self.tensors().items():
            destination[prefix + name] = view if keep_vars else view.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        views = self.tensors()
        for name, view in views.items():
            if prefix + name in state_dict:
                with torch.no_grad():
                    view.copy_(state_dict[prefix + name])
            elif strict:
                missing_keys.append(prefix + name)
        if strict:
            unexpected_keys.extend(key for key in state_dict if key.startswith(prefix) and key[len(prefix):] not in views)

    def extra_repr(self) -> str:
        return f"{len(self.layout)} tensors, {self.flat.numel()} values, {self.flat.dtype}"


def stored_dtype(decoder: nn.Module) -> torch.dtype:
    """The dtype a decoder's values are held in (packed or not)."""
    if isinstance(decoder, PackedDecoder):
        return decoder.flat.dtype
    return next(decoder.parameters()).dtype

"""Shared fixtures: tiny Swin backbones and checkpoints made on the spot (no download, seconds on 2 CPU cores)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from m4oe_adapters import ExpertConfig, SegmentationModel, load_backbone

TINY_TIMM = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), window_size=4)
TIMM_NAME = "swin_tiny_patch4_window7_224"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_timm_model(in_chans: int = 3, seed: int = 0):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, in_chans=in_chans, img_size=64, **TINY_TIMM)
    return model.eval()


@pytest.fixture
def timm_checkpoint(tmp_path: Path) -> Path:
    """A tiny 3-channel timm Swin saved as safetensors (random values, standing in for real pretrained weights)."""
    import safetensors.torch

    path = tmp_path / "tiny_swin.safetensors"
    safetensors.torch.save_file(tiny_timm_model().state_dict(), str(path))
    return path


def tiny_backbone(weights=None, in_chans: int = 1, seed: int = 0):
    return load_backbone(
        f"timm:{TIMM_NAME}", weights, in_chans=in_chans, img_size=64, model_args=TINY_TIMM, random_seed=seed
    )


def tiny_model(weights=None, in_chans: int = 1, rank: int = 4, modalities=("CT", "MRI"), trained=True, seed=0):
    """A tiny model with the given modalities; ``trained`` gives the experts non-zero ``B`` so they matter."""
    model = SegmentationModel(tiny_backbone(weights, in_chans, seed), ExpertConfig(rank=rank))
    for index, name in enumerate(modalities):
        model.add_modality(name, 2 + index, seed=index)
        if trained:
            generator = torch.Generator().manual_seed(100 + index)
            with torch.no_grad():
                for layer in model.expert_layers.values():
                    layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=generator) * 0.05)
    return model.eval()


@pytest.fixture
def model():
    return tiny_model()

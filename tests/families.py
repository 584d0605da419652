"""Tiny random backbones of the three families (timm, transformers, MONAI) for tests that must hold on each."""
from __future__ import annotations

from m4oe_adapters import ExpertConfig, SegmentationModel, load_backbone

from conftest import TIMM_NAME, TINY_TIMM

FAMILIES = {
    "timm": (f"timm:{TIMM_NAME}", TINY_TIMM),
    "transformers": ("transformers:swin", dict(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 1, 2, 2],
                                               window_size=2)),  # 4 fails at 64 px (issue 13 item 6)
    "monai": ("monai:swin_unetr", dict(feature_size=12, depths=[1, 1, 2, 1], num_heads=[1, 1, 2, 2], window_size=4)),
}


def family_model(family: str, modalities=("CT", "MRI"), rank: int = 4, in_chans: int = 1, seed: int = 0):
    """A tiny model of ``family`` with trained-looking experts (non-zero ``B``) for each modality."""
    import torch

    spec, args = FAMILIES[family]
    backbone = load_backbone(spec, None, in_chans=in_chans, img_size=64, model_args=dict(args), random_seed=seed)
    model = SegmentationModel(backbone, ExpertConfig(rank=rank))
    for index, name in enumerate(modalities):
        model.add_modality(name, 2 + index, seed=index)
        generator = torch.Generator().manual_seed(100 + index)
        with torch.no_grad():
            for layer in model.expert_layers.values():
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=generator) * 0.05)
    return model.eval()

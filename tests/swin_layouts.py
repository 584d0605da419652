"""Checkpoint layouts of the public Swin releases, rebuilt from a tiny timm model (random values, real key names).

Each function returns what the named training code saves, so tests load files exactly as users have them:
the Microsoft releases (microsoft/Swin-Transformer ``models/swin_transformer*.py``: downsampling at the *end* of a
stage, ``head.*``, persistent ``relative_position_index``/``attn_mask``/``relative_coords_table`` buffers, saved as
``{'model': ...}``), SimMIM (``models/simmim.py``: ``encoder.*`` + ``encoder.mask_token`` + ``decoder.0.*``), Swin-MAE
(``swin_mae.py``: Microsoft block names, no final norm, plus ``pos_embed``, ``mask_token``, ``layers_up.*``,
``norm_up``, ``decoder_pred``; saved with the argparse ``args``), DDP (``module.*``) and DINO-style containers.
The key sets were checked against the Microsoft code itself (see the ckpt branch report).
"""
from __future__ import annotations

import argparse
import re

import numpy as np
import torch

TIMM_ONLY_BUFFERS = ("k_bias",)


def microsoft_layout(model: torch.nn.Module, classes: int = 0) -> dict[str, torch.Tensor]:
    """A timm Swin/SwinV2 model's tensors under the Microsoft release's key names (classifier of ``classes``)."""
    state = dict(model.state_dict())
    for name, buffer in model.named_buffers():  # the Microsoft code keeps these buffers persistent
        if buffer is not None and name.rsplit(".", 1)[-1] not in TIMM_ONLY_BUFFERS:
            state[name] = buffer
    out = {}
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in TIMM_ONLY_BUFFERS:
            continue
        match = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        if match:
            key = f"layers.{int(match.group(1)) - 1}.downsample.{match.group(2)}"
        out[key] = value.clone()
    out = {key: value for key, value in out.items() if not key.startswith("head.")}
    if classes:
        generator = torch.Generator().manual_seed(7)
        width = model.num_features
        out["head.weight"] = torch.randn(classes, width, generator=generator)
        out["head.bias"] = torch.randn(classes, generator=generator)
    return out


def simmim_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """SimMIM's ``SimMIM(encoder, encoder_stride)`` state dict: ``encoder.*`` (with ``mask_token``) + ``decoder.0``."""
    encoder = microsoft_layout(model)
    width = model.num_features
    out = {f"encoder.{key}": value for key, value in encoder.items()}
    out["encoder.mask_token"] = torch.randn(1, 1, int(model.feature_info[0]["num_chs"]))
    out["decoder.0.weight"] = torch.randn(32 * 32 * 3, width, 1, 1)
    out["decoder.0.bias"] = torch.randn(32 * 32 * 3)
    return out


def swin_mae_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Swin-MAE's ``SwinMAE`` state dict: Microsoft encoder blocks without the final norm, plus its decoder."""
    encoder = {key: value for key, value in microsoft_layout(model).items() if not key.startswith("norm.")}
    embed = int(model.feature_info[0]["num_chs"])
    encoder["pos_embed"] = torch.randn(1, 256, embed)
    encoder["mask_token"] = torch.randn(1, 1, embed)
    encoder["layers_up.0.blocks.0.norm1.weight"] = torch.randn(4 * embed)
    encoder["layers_up.0.upsample.expand.weight"] = torch.randn(8 * embed, 4 * embed)
    encoder["first_patch_expanding.expand.weight"] = torch.randn(16 * embed, 8 * embed)
    encoder["norm_up.weight"] = torch.randn(embed)
    encoder["decoder_pred.weight"] = torch.randn(48, embed // 2)
    return encoder


def ddp(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"module.{key}": value for key, value in state.items()}


def microsoft_release(state: dict[str, torch.Tensor]) -> dict:
    return {"model": state}


def simmim_training_save(state: dict[str, torch.Tensor]) -> dict:
    """utils_simmim.save_checkpoint without its yacs ``config`` (a non-data class, refused: see the tests)."""
    return {"model": state, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"last_epoch": 9},
            "scaler": {"scale": 65536.0}, "max_accuracy": 0.0, "epoch": 9}


def swin_mae_save(state: dict[str, torch.Tensor]) -> dict:
    """utils/misc.save_model: ``model``, ``optimizer``, ``epoch``, ``scaler`` and the argparse ``args``."""
    args = argparse.Namespace(batch_size=96, epochs=400, mask_ratio=0.75, input_size=224, output_dir="out")
    return {"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 399,
            "scaler": {"scale": 65536.0}, "args": args}


def dino_save(state: dict[str, torch.Tensor]) -> dict:
    """DINO/EsViT ``checkpoint.pth``: ``student`` (DDP) and ``teacher`` with ``backbone.*``/``head.*``."""
    head = {"head.mlp.0.weight": torch.randn(8, 8), "head.last_layer.weight_g": torch.randn(8, 1)}
    teacher = {**{f"backbone.{key}": value for key, value in state.items()}, **head}
    student = {f"module.{key}": value.clone() + 1 for key, value in teacher.items()}
    return {"student": student, "teacher": teacher, "optimizer": {"state": {}}, "epoch": 100,
            "args": argparse.Namespace(arch="swin_tiny"), "dino_loss": {"center": torch.zeros(1, 8)}}


def monai_btcv_save(state: dict[str, torch.Tensor]) -> dict:
    """research-contributions SwinUNETR/BTCV trainer.save_checkpoint: epoch, numpy ``best_acc``, state_dict."""
    return {"epoch": 5000, "best_acc": np.float32(0.81), "state_dict": state,
            "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 5000}}

"""A modality's backbone experts are plain LoRA: PEFT loads them onto the plain timm model, and back."""
from __future__ import annotations

import json

import pytest
import torch

from m4oe_adapters import AdapterFormatError, ExpertConfig, SegmentationModel, export_peft, import_peft, load_backbone

from conftest import TIMM_NAME, TINY_TIMM, tiny_model


def plain_timm(checkpoint):
    """The plain timm backbone a PEFT user would have (no m4oe code involved)."""
    import safetensors.torch
    import timm

    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, in_chans=3, img_size=64, **TINY_TIMM)
    model.load_state_dict(safetensors.torch.load_file(str(checkpoint)))
    return model.eval()


def test_exported_folder_loads_in_peft_and_reproduces_backbone_features(tmp_path, timm_checkpoint):
    import peft

    model = tiny_model(weights=timm_checkpoint, in_chans=3)
    folder = export_peft(model, "MRI", tmp_path / "mri_lora")
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    peft_model = peft.PeftModel.from_pretrained(plain_timm(timm_checkpoint), str(folder)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model._hard_features(x, ["MRI", "MRI"])
        theirs = peft_model.base_model.model.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_peft_folder_imports_as_an_expert(tmp_path, timm_checkpoint):
    source = tiny_model(weights=timm_checkpoint, in_chans=3)
    folder = export_peft(source, "CT", tmp_path / "ct_lora")
    target = SegmentationModel(load_backbone(f"timm:{TIMM_NAME}", timm_checkpoint, img_size=64, model_args=TINY_TIMM),
                               ExpertConfig(rank=4)).eval()
    import_peft(target, folder, "CT", num_classes=2)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(target._hard_features(x, ["CT"]), source._hard_features(x, ["CT"])):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lower_rank_peft_lora_is_zero_padded_into_the_expert(tmp_path, timm_checkpoint):
    import peft

    base = plain_timm(timm_checkpoint)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["qkv", "fc1"], lora_dropout=0.0, init_lora_weights=False)
    peft_model = peft.get_peft_model(base, config).eval()
    peft_model.save_pretrained(str(tmp_path / "r2"))
    target = SegmentationModel(load_backbone(f"timm:{TIMM_NAME}", timm_checkpoint, img_size=64, model_args=TINY_TIMM),
                               ExpertConfig(rank=4)).eval()
    import_peft(target, tmp_path / "r2", "xray")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        theirs = peft_model.base_model.model.forward_intermediates(x, intermediates_only=True)
        ours = target._hard_features(x, ["xray"])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_folder_without_peft_files_is_refused(tmp_path, model):
    with pytest.raises(AdapterFormatError, match="not a PEFT adapter folder"):
        import_peft(model, tmp_path, "CT")

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


def test_export_refuses_a_folder_holding_the_users_files_and_keeps_them(tmp_path, model):
    from m4oe_adapters import ConfigError

    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "results.csv").write_text("patient,dice\n1,0.8\n")
    (folder / "scan.nii.gz").write_bytes(b"\x1f\x8b not really a volume")
    with pytest.raises(ConfigError, match="--overwrite"):
        export_peft(model, "CT", folder)
    assert sorted(p.name for p in folder.iterdir()) == ["results.csv", "scan.nii.gz"]
    assert (folder / "results.csv").read_text() == "patient,dice\n1,0.8\n"
    assert not list(tmp_path.glob(".work*"))  # no staging folder left behind


def test_export_with_overwrite_adds_the_peft_files_and_keeps_every_other_file(tmp_path, model):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "results.csv").write_text("kept")
    export_peft(model, "CT", folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                         "results.csv"]
    assert (folder / "results.csv").read_text() == "kept"
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4


def test_export_replaces_its_own_earlier_export_but_not_a_foreign_peft_folder(tmp_path, model):
    import safetensors.torch

    from m4oe_adapters import ConfigError

    folder = export_peft(model, "CT", tmp_path / "lora")
    export_peft(model, "MRI", folder)  # our own earlier export: replaced without --overwrite
    tensors = safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))
    layer_name, layer = next(iter(model.expert_layers.items()))
    assert torch.equal(tensors[f"base_model.model.{layer_name}.lora_B.weight"], layer.lora_B["MRI"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(foreign / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match="did not write"):
        export_peft(model, "CT", foreign)
    assert json.loads((foreign / "adapter_config.json").read_text()) == {"peft_type": "LORA"}


def test_export_into_a_new_or_empty_folder_needs_no_flag(tmp_path, model):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sorted(p.name for p in export_peft(model, "CT", empty).iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    assert (export_peft(model, "CT", tmp_path / "new" / "deeper") / "adapter_config.json").is_file()


def test_export_peft_cli_refuses_a_users_folder_without_overwrite(tmp_path, timm_checkpoint, capsys):
    from m4oe_adapters import save_adapter
    from m4oe_adapters.cli import main

    adapter = save_adapter(tiny_model(weights=timm_checkpoint, in_chans=3), "CT", tmp_path / "ct.safetensors")
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    code = main(["export-peft", str(adapter), str(folder), "--weights", str(timm_checkpoint)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert main(["export-peft", str(adapter), str(folder), "--weights", str(timm_checkpoint), "--overwrite"]) == 0
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("family", ["timm", "transformers", "monai"])
def test_exported_experts_reproduce_features_in_peft_on_every_family(family, tmp_path):
    import peft

    from families import FAMILIES, family_model

    model = family_model(family, seed=3)
    folder = export_peft(model, "MRI", tmp_path / family)
    spec, args = FAMILIES[family]
    plain = load_backbone(spec, None, in_chans=1, img_size=64, model_args=dict(args), random_seed=3)  # no experts
    peft.PeftModel.from_pretrained(plain.model, str(folder))  # injects PEFT's LoRA layers into plain.model
    assert any("lora_A" in name for name, _ in plain.model.named_parameters())
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        ours = model._hard_features(x, ["MRI", "MRI"])
        theirs = plain(x)
        without = model.backbone(x)  # the experts matter: features differ from the frozen backbone's
    for a, b, c in zip(ours, theirs, without):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours[-1], without[-1], atol=1e-4)


def peft_folder(tmp_path, timm_checkpoint, **options):
    """A PEFT LoRA folder saved by PEFT itself on the plain timm model, and that PEFT model."""
    import peft

    config = peft.LoraConfig(target_modules=["qkv", "fc1", "attn.proj"], lora_dropout=0.0, init_lora_weights=False,
                             **options)
    peft_model = peft.get_peft_model(plain_timm(timm_checkpoint), config).eval()
    folder = tmp_path / "peft_folder"
    peft_model.save_pretrained(str(folder))
    return folder, peft_model


def test_rank_and_alpha_patterns_import_exactly_as_peft_computes_them(tmp_path, timm_checkpoint):
    folder, peft_model = peft_folder(tmp_path, timm_checkpoint, r=3, lora_alpha=5, use_rslora=False,
                                     rank_pattern={"qkv": 2}, alpha_pattern={"fc1": 11, r"layers\.3\..*proj": 1})
    target = SegmentationModel(load_backbone(f"timm:{TIMM_NAME}", timm_checkpoint, img_size=64, model_args=TINY_TIMM),
                               ExpertConfig(rank=4)).eval()
    import_peft(target, folder, "xray")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        theirs = peft_model.base_model.model.forward_intermediates(x, intermediates_only=True)
        ours = target._hard_features(x, ["xray"])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("option,message", [
    (dict(use_dora=True), "DoRA"),
    (dict(bias="lora_only"), "bias"),
    (dict(lora_bias=True), "lora_bias"),
])
def test_peft_features_an_expert_cannot_hold_are_refused_with_a_clear_error(tmp_path, timm_checkpoint, model,
                                                                             option, message):
    folder, _ = peft_folder(tmp_path, timm_checkpoint, r=2, lora_alpha=4, **option)
    target = SegmentationModel(load_backbone(f"timm:{TIMM_NAME}", timm_checkpoint, img_size=64, model_args=TINY_TIMM),
                               ExpertConfig(rank=4)).eval()
    with pytest.raises(AdapterFormatError, match=message) as error:
        import_peft(target, folder, "xray")
    assert "adapter_config.json" in str(error.value) and "xray" not in target.modalities


def test_a_peft_folder_with_extra_tensors_is_refused(tmp_path, timm_checkpoint):
    import safetensors.torch

    folder, _ = peft_folder(tmp_path, timm_checkpoint, r=2, lora_alpha=4)
    weights = folder / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(str(weights))
    tensors["base_model.model.layers.0.blocks.0.attn.qkv.lora_magnitude_vector"] = torch.ones(48)
    safetensors.torch.save_file(tensors, str(weights))
    target = SegmentationModel(load_backbone(f"timm:{TIMM_NAME}", timm_checkpoint, img_size=64, model_args=TINY_TIMM),
                               ExpertConfig(rank=4)).eval()
    with pytest.raises(AdapterFormatError, match="lora_magnitude_vector"):
        import_peft(target, folder, "xray")

"""The Swin checkpoints users have each load exactly (every backbone tensor from the file) or are refused with the
cause: never a backbone that is silently part random. Files are built in the real layouts (see swin_layouts.py)
with random values that differ per tensor, so "equal to the file" cannot hold by accident."""
from __future__ import annotations

import json
import pickle

import pytest
import safetensors.torch
import torch

from m4oe_adapters import BackboneError, load_backbone
from m4oe_adapters.cli import main
from m4oe_adapters.runtime import available_devices

from conftest import TIMM_NAME, TINY_TIMM
from swin_layouts import (
    ddp,
    dino_save,
    microsoft_layout,
    microsoft_release,
    monai_btcv_save,
    simmim_layout,
    simmim_training_save,
    swin_mae_layout,
    swin_mae_save,
)

V2_NAME = "swinv2_tiny_window8_256"


def distinct_random(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter redrawn (LayerNorm ones/zeros and zero biases included), so each tensor is unique."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def tiny_timm(version: str = "v1") -> torch.nn.Module:
    import timm

    name = TIMM_NAME if version == "v1" else V2_NAME
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=64, strict_img_size=False, **TINY_TIMM)
    return distinct_random(model)


def spec(version: str) -> str:
    return f"timm:{TIMM_NAME if version == 'v1' else V2_NAME}"


def save(obj, path):
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(obj, str(path))
    else:
        torch.save(obj, path)
    return path


def assert_every_tensor_from(backbone, source: torch.nn.Module) -> None:
    """Each backbone tensor equals the source model's tensor of the same (timm) name, and the report says N/N."""
    expected = source.state_dict()
    tensors = dict(backbone.frozen_tensors())
    for name, tensor in tensors.items():
        assert torch.equal(tensor, expected[name]), name
    report = backbone.load_report
    assert report.complete and report.tensors_from_file == len(tensors)
    assert backbone.pretrained and backbone.identity()["pretrained"] is True


LAYOUTS = {
    # name: (version, builder of the saved object from the source model, file suffix)
    "timm state dict": ("v1", lambda m: m.state_dict(), ".safetensors"),
    "timm SwinV2 state dict": ("v2", lambda m: m.state_dict(), ".safetensors"),
    "Microsoft Swin release {'model'}": ("v1", lambda m: microsoft_release(microsoft_layout(m, classes=10)), ".pth"),
    "Microsoft SwinV2 release {'model'}": ("v2", lambda m: microsoft_release(microsoft_layout(m, classes=10)), ".pth"),
    "DDP Swin state dict (module.)": ("v1", lambda m: ddp(m.state_dict()), ".pth"),
    "DDP SwinV2 state dict (module.)": ("v2", lambda m: ddp(m.state_dict()), ".pth"),
    "SimMIM Swin training save": ("v1", lambda m: simmim_training_save(simmim_layout(m)), ".pth"),
    "SimMIM SwinV2 training save": ("v2", lambda m: simmim_training_save(simmim_layout(m)), ".pth"),
    "Swin-MAE save with argparse args": ("v1", lambda m: swin_mae_save(swin_mae_layout(m)), ".pth"),
    "DINO teacher/student": ("v1", lambda m: dino_save(m.state_dict()), ".pth"),
    "fine-tuning container, numpy best_acc": ("v1", lambda m: monai_btcv_save(ddp(m.state_dict())), ".pth"),
    "model. prefix under state_dict": (
        "v2", lambda m: {"state_dict": {f"model.{k}": v for k, v in m.state_dict().items()}, "epoch": 3}, ".pt"
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_public_checkpoint_layout_loads_every_backbone_tensor_from_the_file(tmp_path, layout):
    version, build, suffix = LAYOUTS[layout]
    source = tiny_timm(version)
    path = save(build(source), tmp_path / f"checkpoint{suffix}")
    backbone = load_backbone(spec(version), path, img_size=64, model_args=TINY_TIMM)
    assert_every_tensor_from(backbone, source)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = source.forward_intermediates(x, intermediates_only=True)
        for a, b in zip(expected, backbone(x)):
            torch.testing.assert_close(a, b)


def test_dino_checkpoint_uses_the_teacher_and_ignores_optimizer_and_args(tmp_path):
    source = tiny_timm()
    path = save(dino_save(source.state_dict()), tmp_path / "checkpoint.pth")
    report = load_backbone(spec("v1"), path, img_size=64, model_args=TINY_TIMM).load_report
    assert report.container == ["teacher"] and report.prefix == "backbone."
    assert {"student", "optimizer", "epoch", "args", "dino_loss"} <= set(report.ignored_entries)
    assert "head.mlp.0.weight" in report.ignored


def test_swin_mae_encoder_without_final_norm_loads_and_says_the_norm_was_removed(tmp_path):
    source = tiny_timm()
    path = save(swin_mae_save(swin_mae_layout(source)), tmp_path / "swin_mae.pth")
    backbone = load_backbone(spec("v1"), path, img_size=64, model_args=TINY_TIMM)
    assert not any(name.startswith("norm.") for name, _ in backbone.frozen_tensors())
    assert any("norm (final LayerNorm)" in line for line in backbone.load_report.transformed)
    assert {"pos_embed", "mask_token", "norm_up.weight"} <= set(backbone.load_report.ignored)


def test_microsoft_release_is_adapted_to_one_channel_and_says_so(tmp_path):
    source = tiny_timm()
    path = save(microsoft_release(microsoft_layout(source)), tmp_path / "swin_tiny.pth")
    backbone = load_backbone(spec("v1"), path, in_chans=1, img_size=64, model_args=TINY_TIMM)
    torch.testing.assert_close(
        backbone.model.patch_embed.proj.weight, source.patch_embed.proj.weight.sum(dim=1, keepdim=True)
    )
    assert any("3 -> 1 input channels" in line for line in backbone.load_report.transformed)
    assert backbone.load_report.complete


# ------------------------------------------------------------------------------------------------- refusals
def test_swin_v1_file_for_a_swinv2_name_is_refused_listing_missing_keys(tmp_path):
    path = save(tiny_timm("v1").state_dict(), tmp_path / "swin_v1.safetensors")
    with pytest.raises(BackboneError) as error:
        load_backbone(spec("v2"), path, img_size=64, model_args=TINY_TIMM)
    message = str(error.value)
    assert "swin_v1.safetensors" in message and "refusing to run with the rest random" in message
    assert "Missing (" in message and "logit_scale" in message and "Likely cause" in message


def test_checkpoint_of_another_size_is_refused_naming_the_files_architecture(tmp_path):
    path = save(tiny_timm().state_dict(), tmp_path / "small.safetensors")
    with pytest.raises(BackboneError, match="embed_dim 16") as error:
        load_backbone(spec("v1"), path, img_size=64, model_args={**TINY_TIMM, "embed_dim": 32})
    assert "--model-args" in str(error.value)


def test_half_a_checkpoint_is_refused_not_half_random(tmp_path):
    state = tiny_timm().state_dict()
    kept = {key: value for key, value in state.items() if not key.startswith("layers.3")}
    path = save(kept, tmp_path / "partial.safetensors")
    with pytest.raises(BackboneError, match="only part of the backbone") as error:
        load_backbone(spec("v1"), path, img_size=64, model_args=TINY_TIMM)
    assert "layers.3." in str(error.value)


def test_unknown_wrapper_prefix_is_refused_naming_the_prefix(tmp_path):
    state = {f"net_wrapper_{i % 1}.x.{key}": value for i, (key, value) in enumerate(tiny_timm().state_dict().items())}
    state = {key.replace(".x.", ".y.z.w."): value for key, value in state.items()}  # deeper than 3 components
    path = save(state, tmp_path / "wrapped.safetensors")
    with pytest.raises(BackboneError, match="net_wrapper_0"):
        load_backbone(spec("v1"), path, img_size=64, model_args=TINY_TIMM)


def test_monai_file_given_to_timm_is_refused_naming_the_monai_family(tmp_path):
    from monai.networks.nets import SwinUNETR

    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=2, depths=(1, 1, 1, 1),
                    num_heads=(1, 1, 2, 2), window_size=4)
    path = save({"state_dict": net.state_dict()}, tmp_path / "monai.pt")
    with pytest.raises(BackboneError, match="monai key layout"):
        load_backbone(spec("v1"), path, img_size=64, model_args=TINY_TIMM)


class CfgNode(dict):
    """Stands in for yacs' CfgNode, which SimMIM's training loop saves as ``config``."""


class Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch EXPLOITED_BY_PICKLE",))


@pytest.mark.parametrize("payload", ["config object", "code"])
def test_checkpoint_with_non_data_objects_is_refused_naming_them_with_a_resave_command(tmp_path, monkeypatch, payload):
    monkeypatch.chdir(tmp_path)
    state = simmim_training_save(simmim_layout(tiny_timm()))
    path = tmp_path / "ckpt_epoch_99.pth"
    if payload == "config object":
        torch.save({**state, "config": CfgNode(MODEL="swin")}, path)
    else:
        with open(path, "wb") as stream:
            pickle.dump({**state, "config": Exploit()}, stream)
    with pytest.raises(BackboneError) as error:
        load_backbone(spec("v1"), path, img_size=64, model_args=TINY_TIMM)
    message = str(error.value)
    assert "ckpt_epoch_99.pth" in message and "re-save" in message and "safetensors" in message
    if payload == "config object":
        assert "CfgNode" in message
    assert not (tmp_path / "EXPLOITED_BY_PICKLE").exists()


# ------------------------------------------------------------------------------------------------- MONAI
def monai_net(spatial_dims=2):
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    net = SwinUNETR(
        in_channels=1, out_channels=2, feature_size=12, spatial_dims=spatial_dims, depths=(1, 1, 1, 1),
        num_heads=(1, 1, 2, 2), window_size=4 if spatial_dims == 2 else 2,
    )
    return distinct_random(net)


def test_monai_2d_checkpoint_in_the_btcv_trainer_container_loads_exactly(tmp_path):
    net = monai_net()
    path = save(monai_btcv_save(net.state_dict()), tmp_path / "model.pt")
    backbone = load_backbone("monai:swin_unetr", path, img_size=64)
    expected = net.swinViT.state_dict()
    for name, tensor in backbone.frozen_tensors():
        assert torch.equal(tensor, expected[name]), name
    report = backbone.load_report
    assert report.complete and report.container == ["state_dict"] and "best_acc" in report.ignored_entries


def test_monai_3d_checkpoint_refusal_names_a_way_forward(tmp_path):
    path = save({"state_dict": monai_net(spatial_dims=3).swinViT.state_dict()}, tmp_path / "model_swinvit.pt")
    with pytest.raises(BackboneError, match="3D") as error:
        load_backbone("monai:swin_unetr", path)
    assert "m4oe pretrain" in str(error.value) and "spatial_dims=2" in str(error.value)


# ------------------------------------------------------------------------------------------------- CLI
def test_backbone_check_prints_loaded_n_of_n_and_the_fingerprint(tmp_path, capsys):
    source = tiny_timm()
    path = save(ddp(source.state_dict()), tmp_path / "ddp.pth")
    code = main(["backbone", "check", str(path), "--backbone", spec("v1"), "--img-size", "64",
                 "--model-args", '{"embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 1, 2, 2], '
                 '"window_size": 4}'])
    out = capsys.readouterr().out
    total = len(list(source.parameters()))
    assert code == 0 and f"loaded, {total}/{total} tensors from {path}" in out
    assert "prefix 'module.' removed" in out and "fingerprint" in out and "[16, 16, 16]" in out


def test_backbone_check_refusal_exits_2_with_the_cause(tmp_path, capsys):
    path = save(tiny_timm("v1").state_dict(), tmp_path / "swin_v1.safetensors")
    code = main(["backbone", "check", str(path), "--backbone", spec("v2"), "--img-size", "64",
                 "--model-args", '{"embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 1, 2, 2], '
                 '"window_size": 4}'])
    assert code == 2 and "Likely cause" in capsys.readouterr().err


def test_adapter_metadata_and_inspect_say_what_the_backbone_is(tmp_path, capsys):
    from m4oe_adapters import SegmentationModel, load_adapter, save_adapter

    source = tiny_timm()
    path = save(microsoft_release(microsoft_layout(source)), tmp_path / "swin.pth")
    model = SegmentationModel(load_backbone(spec("v1"), path, img_size=64, model_args=TINY_TIMM))
    model.add_modality("CT", 2)
    adapter = tmp_path / "ct.safetensors"
    save_adapter(model, "CT", adapter)
    assert main(["inspect", str(adapter)]) == 0
    out = capsys.readouterr().out
    total = len(list(source.parameters()))
    assert f"backbone load   {total}/{total} tensors from swin.pth" in out
    assert "embed_dim 16, depths [1, 1, 2, 1]" in out and "(pretrained: swin.pth)" in out
    load_adapter(model, adapter, replace=True)  # the new metadata fields pass the adapter file checks


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_backbone_check_reads_the_architecture_of_a_microsoft_release_without_backbone_flag(tmp_path, capsys,
                                                                                            version):
    source = tiny_timm(version)
    path = save(microsoft_release(microsoft_layout(source, classes=10)), tmp_path / "release.pth")
    assert main(["backbone", "check", str(path), "--img-size", "64"]) == 0
    out = capsys.readouterr().out
    total = len(list(source.parameters()))
    assert f"version {version}, embed_dim 16, depths [1, 1, 2, 1], num_heads [1, 1, 2, 2]" in out
    assert f"loaded, {total}/{total} tensors" in out


@pytest.mark.parametrize("device", available_devices())
def test_backbone_check_runs_its_test_forward_on_the_device_asked(tmp_path, capsys, device):
    path = save(microsoft_release(microsoft_layout(tiny_timm("v1"), classes=10)), tmp_path / "release.pth")
    assert main(["backbone", "check", str(path), "--img-size", "64", "--device", device, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["feature_shapes"][0] == [16, 16, 16]


def test_backbone_check_of_a_bare_timm_swinv2_file_asks_for_the_backbone(tmp_path, capsys):
    path = save(tiny_timm("v2").state_dict(), tmp_path / "v2.safetensors")
    assert main(["backbone", "check", str(path)]) == 2
    assert "--backbone" in capsys.readouterr().err


def test_adapter_whose_header_length_starts_with_a_pickle_byte_still_loads(tmp_path):
    """Header lengths of 128 + 256k bytes begin with 0x80 like a pickle; the file is still a valid adapter."""
    import json
    import struct

    from m4oe_adapters import SegmentationModel, load_adapter, save_adapter

    model = SegmentationModel(load_backbone(spec("v1"), None, img_size=64, model_args=TINY_TIMM))
    model.add_modality("CT", 2)
    data = save_adapter(model, "CT", tmp_path / "ct.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + length].rstrip(b" ")
    padded = header + b" " * ((0x80 - len(header)) % 256)
    assert struct.pack("<Q", len(padded))[:1] == b"\x80"
    json.loads(padded)  # still the same JSON header (safetensors pads with spaces)
    (tmp_path / "padded.safetensors").write_bytes(struct.pack("<Q", len(padded)) + padded + data[8 + length :])
    load_adapter(model, tmp_path / "padded.safetensors", replace=True)

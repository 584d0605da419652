"""Backbones load from local checkpoints in each family's native format, frozen, with four declared feature maps."""
from __future__ import annotations

import pickle

import pytest
import torch

from m4oe_adapters import BackboneError, DataError, load_backbone
from m4oe_adapters.backbones import weight_fingerprint

from conftest import TIMM_NAME, TINY_TIMM, tiny_backbone, tiny_timm_model


def assert_pyramid(features, backbone, height, width):
    assert len(features) == 4
    for feature, channels, stride in zip(features, backbone.feature_channels, backbone.feature_strides):
        assert feature.shape[1:] == (channels, height // stride, width // stride)


def test_timm_safetensors_checkpoint_loads_its_exact_weights(timm_checkpoint):
    source = tiny_timm_model()
    backbone = load_backbone(f"timm:{TIMM_NAME}", timm_checkpoint, img_size=64, model_args=TINY_TIMM)
    assert backbone.pretrained and backbone.in_chans == 3
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source.forward_intermediates(x, intermediates_only=True)
        got = backbone(x)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("module_name", ["swin_transformer", "swin_transformer_v2"])
def test_a_headless_timm_layout_file_loads_under_timms_older_layout_rule(tmp_path, monkeypatch, module_name):
    """timm before 1.0.31 took every file without ``head.fc.weight`` for Microsoft's layout and moved its
    downsampling layers one stage on, so a headless file in timm's own layout (what ``m4oe pretrain`` and the zoo
    backbone are) lost 9 tensors and was refused on a machine with timm 1.0.29. Here the current filter runs behind
    that older rule: the loader must still take every tensor from the file."""
    import re

    import safetensors.torch
    import timm

    module = getattr(timm.models, module_name)
    current = module.checkpoint_filter_fn

    def older_rule(state_dict, model):
        if "head.fc.weight" in state_dict:  # timm 1.0.29: "native" only when the classifier says so
            return current(state_dict, model)
        moved = {re.sub(r"layers.(\d+).downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key): value
                 for key, value in state_dict.items()}
        return current(moved, model)

    monkeypatch.setattr(module, "checkpoint_filter_fn", older_rule)
    name = TIMM_NAME if module_name == "swin_transformer" else "swinv2_tiny_window8_256"
    torch.manual_seed(0)
    args = dict(TINY_TIMM) if module_name == "swin_transformer" else dict(TINY_TIMM, window_size=4)
    source = timm.create_model(name, pretrained=False, num_classes=0, img_size=64, **args).eval()
    state = source.state_dict()
    assert "head.fc.weight" not in state and "layers.1.downsample.reduction.weight" in state
    path = tmp_path / "headless.safetensors"
    safetensors.torch.save_file(state, str(path))
    backbone = load_backbone(f"timm:{name}", path, img_size=64, model_args=args)
    assert backbone.load_report.tensors_from_file == backbone.load_report.tensors_in_backbone
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(source.forward_intermediates(x, intermediates_only=True), backbone(x)):
            torch.testing.assert_close(a, b)


def test_timm_pth_checkpoint_is_read_weights_only(tmp_path):
    path = tmp_path / "swin.pth"
    torch.save({"state_dict": tiny_timm_model().state_dict()}, path)
    backbone = load_backbone(f"timm:{TIMM_NAME}", path, img_size=64, model_args=TINY_TIMM)
    assert backbone.weights == str(path)


class Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch EXPLOITED_BY_PICKLE",))


def test_pth_checkpoint_with_code_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as stream:
        pickle.dump({"state_dict": Exploit()}, stream)
    with pytest.raises(BackboneError, match="evil.pth"):
        load_backbone(f"timm:{TIMM_NAME}", path, img_size=64, model_args=TINY_TIMM)
    assert not (tmp_path / "EXPLOITED_BY_PICKLE").exists()


def test_timm_hub_folder_with_config_json_loads(tmp_path):
    import json

    import safetensors.torch

    folder = tmp_path / "backbone"
    folder.mkdir()
    safetensors.torch.save_file(tiny_timm_model().state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(
        json.dumps({"architecture": TIMM_NAME, "model_args": {**TINY_TIMM, "depths": list(TINY_TIMM["depths"])}})
    )
    backbone = load_backbone("timm:", folder, img_size=64)
    assert backbone.name == TIMM_NAME and backbone.feature_channels == (16, 32, 64, 128)


def test_three_channel_checkpoint_is_adapted_to_one_channel_like_timm(timm_checkpoint):
    source = tiny_timm_model()
    backbone = load_backbone(f"timm:{TIMM_NAME}", timm_checkpoint, in_chans=1, img_size=64, model_args=TINY_TIMM)
    expected = source.patch_embed.proj.weight.sum(dim=1, keepdim=True)
    torch.testing.assert_close(backbone.model.patch_embed.proj.weight, expected)
    assert backbone(torch.randn(1, 1, 64, 64))[0].shape[1] == 16


@pytest.mark.parametrize("source,target", [(3, 1), (3, 2), (3, 5), (1, 3), (4, 2)])
def test_input_channels_are_adapted_by_timms_rule_whatever_the_timm_version(monkeypatch, source, target):
    """timm's current ``adapt_input_conv(..., base_chans=C)`` rule, without depending on that argument: timm 1.0.29
    has no ``base_chans`` (seen on a GPU machine: every 1-channel load failed there). Here timm's function is
    swapped for one with the old signature; the loader must not need it, and gives the current rule's result."""
    import timm.models._manipulate as manipulate

    from m4oe_adapters.backbones.checkpoints import adapt_input_channels

    current = manipulate.adapt_input_conv
    weight = torch.randn(8, source, 4, 4, generator=torch.Generator().manual_seed(source))
    expected = current(target, weight.clone(), base_chans=source)
    monkeypatch.setattr(manipulate, "adapt_input_conv", lambda in_chans, conv_weight: conv_weight)
    torch.testing.assert_close(adapt_input_channels(weight, target), expected)
    volume = weight[..., None].repeat(1, 1, 1, 1, 2)  # a 3D kernel: the same rule per depth slice
    torch.testing.assert_close(adapt_input_channels(volume, target), expected[..., None].repeat(1, 1, 1, 1, 2))


def test_wrong_architecture_for_checkpoint_raises_backbone_error(timm_checkpoint):
    with pytest.raises(BackboneError, match="tiny_swin.safetensors"):
        load_backbone(f"timm:{TIMM_NAME}", timm_checkpoint, img_size=64, model_args={**TINY_TIMM, "embed_dim": 32})


def test_missing_weights_file_raises_backbone_error(tmp_path):
    with pytest.raises(BackboneError, match="not found"):
        load_backbone(f"timm:{TIMM_NAME}", tmp_path / "nope.safetensors")


def test_random_weights_are_recorded_as_not_pretrained():
    backbone = tiny_backbone(None)
    identity = backbone.identity()
    assert identity["pretrained"] is False
    assert "random" in identity["weights"]


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (128, 160)])
def test_any_multiple_of_32_gives_four_nchw_maps_with_declared_strides(size):
    backbone = tiny_backbone()
    with torch.no_grad():
        assert_pyramid(backbone(torch.randn(1, 1, *size)), backbone, *size)


def test_size_not_multiple_of_32_or_wrong_channels_is_a_data_error():
    backbone = tiny_backbone()
    with pytest.raises(DataError, match="multiple of 32"):
        backbone(torch.randn(1, 1, 70, 64))
    with pytest.raises(DataError, match="channels"):
        backbone(torch.randn(1, 3, 64, 64))


def test_every_backbone_parameter_is_frozen():
    backbone = tiny_backbone()
    assert not any(parameter.requires_grad for parameter in backbone.parameters())


def test_fingerprint_is_cached_and_tracks_the_bytes():
    backbone = tiny_backbone()
    first = backbone.fingerprint()
    assert backbone.fingerprint() is first
    assert first == weight_fingerprint(backbone.frozen_tensors())
    with torch.no_grad():
        backbone.model.patch_embed.proj.weight[0, 0, 0, 0] += 1
    assert backbone.fingerprint(recompute=True) != first


def hf_folder(tmp_path, in_chans=3):
    from transformers import SwinConfig, SwinModel

    torch.manual_seed(0)
    config = SwinConfig(
        image_size=64, patch_size=4, num_channels=in_chans, embed_dim=16, depths=[1, 1, 2, 1],
        num_heads=[1, 1, 2, 2], window_size=2,
    )
    model = SwinModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(tmp_path / "hf_swin")
    return model, tmp_path / "hf_swin"


def test_transformers_save_pretrained_folder_loads_and_matches(tmp_path):
    source, folder = hf_folder(tmp_path)
    backbone = load_backbone("transformers:swin", folder, img_size=64)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = source(x, output_hidden_states=True, output_hidden_states_before_downsampling=True)
        got = backbone(x)
    assert_pyramid(got, backbone, 64, 96)
    for a, b in zip(expected.reshaped_hidden_states[1:5], got):
        torch.testing.assert_close(a, b)


def test_transformers_default_targets_are_q_k_v_o_proj_and_fc(tmp_path):
    from m4oe_adapters import SegmentationModel

    _, folder = hf_folder(tmp_path)
    model = SegmentationModel(load_backbone("transformers:swin", folder, in_chans=1, img_size=64))
    suffixes = {name.rsplit(".", 1)[1] for name in model.expert_layers}
    assert suffixes == {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}
    assert model.backbone.in_chans == 1


def monai_state(spatial_dims=2):
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    net = SwinUNETR(
        in_channels=1, out_channels=2, feature_size=12, spatial_dims=spatial_dims, depths=(1, 1, 1, 1),
        num_heads=(1, 1, 2, 2), window_size=4 if spatial_dims == 2 else 2,
    )
    return net


@pytest.mark.parametrize("layout", ["swinunetr", "ssl_module"])
def test_monai_checkpoints_with_their_key_layouts_load(tmp_path, layout):
    net = monai_state()
    if layout == "swinunetr":  # a whole SwinUNETR checkpoint: swinViT.* plus decoder keys
        checkpoint = {"state_dict": net.state_dict()}
    else:  # self-supervised layout: module. prefix, mlp.fc1/fc2 names, encoder only
        checkpoint = {
            "model": {
                "module." + k.replace("mlp.linear", "mlp.fc"): v for k, v in net.swinViT.state_dict().items()
            }
        }
    path = tmp_path / "monai.pt"
    torch.save(checkpoint, path)
    backbone = load_backbone("monai:swin_unetr", path, img_size=64)
    assert backbone.feature_channels == (24, 48, 96, 192)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        expected = net.swinViT(x, normalize=True)[1:5]
        got = backbone(x)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b)


def test_monai_3d_checkpoint_is_refused_with_reason(tmp_path):
    path = tmp_path / "monai3d.pt"
    torch.save(monai_state(spatial_dims=3).state_dict(), path)
    with pytest.raises(BackboneError, match="3D"):
        load_backbone("monai:swin_unetr", path)

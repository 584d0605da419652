"""The transformers Swin backbones run at every size the README promises (any multiple of 32) with the real window
size 7, give the four declared stage maps for Swin and SwinV2, and load only complete folders."""
from __future__ import annotations

import pytest
import safetensors.torch
import torch

from m4oe_adapters import BackboneError, SegmentationModel, load_backbone

SIZES = [(192, 192), (224, 320), (96, 160), (64, 64), (256, 224)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def hf_folder(tmp_path, model_type="swin", window=7):
    import transformers

    config_class = transformers.SwinConfig if model_type == "swin" else transformers.Swinv2Config
    model_class = transformers.SwinModel if model_type == "swin" else transformers.Swinv2Model
    config = config_class(image_size=224, embed_dim=8, depths=[1, 1, 1, 2], num_heads=[1, 1, 2, 2], window_size=window)
    torch.manual_seed(0)
    model = model_class(config, add_pooling_layer=False).eval()
    folder = tmp_path / model_type
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_type", ["swin", "swinv2"])
def test_window_7_backbone_gives_four_declared_maps_at_every_multiple_of_32(tmp_path, model_type, device):
    _, folder = hf_folder(tmp_path, model_type)
    backbone = load_backbone(f"transformers:{model_type}", folder).to(device)
    assert backbone.feature_channels == (8, 16, 32, 64)
    for height, width in SIZES + [(224, 224)]:
        with torch.no_grad():
            features = backbone(torch.randn(1, 3, height, width, device=device))
        assert [tuple(f.shape[1:]) for f in features] == [
            (channels, height // stride, width // stride)
            for channels, stride in zip(backbone.feature_channels, backbone.feature_strides)
        ], (height, width)


@pytest.mark.parametrize("model_type", ["swin", "swinv2"])
def test_output_does_not_depend_on_earlier_calls_at_other_sizes(tmp_path, model_type):
    _, folder = hf_folder(tmp_path, model_type)
    backbone = load_backbone(f"transformers:{model_type}", folder)
    x = torch.randn(1, 3, 224, 224)
    y = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        fresh_224 = backbone(x)
        fresh_256 = load_backbone(f"transformers:{model_type}", folder)(y)
        for size in SIZES:
            backbone(torch.randn(1, 3, *size))
        again_224, again_256 = backbone(x), backbone(y)
    for a, b in zip(fresh_224 + fresh_256, again_224 + again_256):
        torch.testing.assert_close(a, b)


def test_swin_at_224_matches_transformers_own_stage_outputs(tmp_path):
    source, folder = hf_folder(tmp_path, "swin")
    backbone = load_backbone("transformers:swin", folder)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = source(x, output_hidden_states=True, output_hidden_states_before_downsampling=True)
        got = backbone(x)
    for a, b in zip(expected.reshaped_hidden_states[1:5], got):
        torch.testing.assert_close(a, b)


def test_small_inputs_are_padded_and_cropped_back_not_resized(tmp_path):
    """At 96x160 the maps are the top-left crop of the maps of the same image zero-padded to 224x224."""
    _, folder = hf_folder(tmp_path, "swin")
    backbone = load_backbone("transformers:swin", folder)
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        small = backbone(x)
        padded = backbone(torch.nn.functional.pad(x, (0, 64, 0, 128)))
    for stride, a, b in zip(backbone.feature_strides, small, padded):
        torch.testing.assert_close(a, b[..., : 96 // stride, : 160 // stride])


def test_swinv2_segmenter_runs_on_the_declared_channels(tmp_path):
    _, folder = hf_folder(tmp_path, "swinv2")
    model = SegmentationModel(load_backbone("transformers:swinv2", folder, in_chans=1))
    model.add_modality("CT", 3)
    with torch.no_grad():
        logits = model(torch.randn(2, 1, 96, 160), modality="CT")
    assert logits.shape == (2, 3, 96, 160)


def test_transformers_folder_reports_every_tensor_from_the_file(tmp_path):
    source, folder = hf_folder(tmp_path, "swinv2")
    backbone = load_backbone("transformers:swinv2", folder)
    expected = source.state_dict()
    for name, tensor in backbone.frozen_tensors():
        assert torch.equal(tensor, expected[name]), name
    assert backbone.load_report.complete and backbone.pretrained


def test_transformers_folder_missing_tensors_is_refused(tmp_path):
    _, folder = hf_folder(tmp_path, "swin")
    weights = folder / "model.safetensors"
    state = safetensors.torch.load_file(str(weights))
    state = {key: value for key, value in state.items() if "layers.3" not in key}
    safetensors.torch.save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(BackboneError, match="refusing to run with the rest random") as error:
        load_backbone("transformers:swin", folder)
    assert "encoder.layers.3." in str(error.value)


V4_NAMES = [
    ("attention.q_proj.", "attention.self.query."), ("attention.k_proj.", "attention.self.key."),
    ("attention.v_proj.", "attention.self.value."), ("attention.o_proj.", "attention.output.dense."),
    ("attention.relative_position_bias.relative_position_bias_table", "attention.self.relative_position_bias_table"),
    ("mlp.fc1.", "intermediate.dense."), ("mlp.fc2.", "output.dense."),
]


def test_transformers_4_classification_folder_loads_every_tensor(tmp_path):
    """microsoft/swin-* folders: SwinForImageClassification (``swin.`` prefix, classifier) with 4.x names."""
    source, folder = hf_folder(tmp_path, "swin")
    state = {}
    for key, value in source.state_dict().items():
        for new, old in V4_NAMES:
            key = key.replace(new, old)
        state[f"swin.{key}"] = value
    state["classifier.weight"], state["classifier.bias"] = torch.randn(5, 64), torch.randn(5)
    safetensors.torch.save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    backbone = load_backbone("transformers:swin", folder)
    expected = source.state_dict()
    for name, tensor in backbone.frozen_tensors():
        assert torch.equal(tensor, expected[name]), name
    assert backbone.load_report.complete

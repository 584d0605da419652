"""Runs where users run: mixed precision (bf16/fp16 autocast) in every routing mode, device and dtype moves.

Tolerance of the bf16 checks: bf16 keeps 8 bits of mantissa (relative rounding 2⁻⁸ ≈ 0.4 % per operation); on the tiny
model losses agree with fp32 to about 0.03 % and gradients to about 0.5-0.7 % (relative L2 norm). The tests allow
1 % for the loss and 3 % for each group of gradients, so a real error (a wrong cast, a gradient lost in a cast, an
expert skipped) fails them while bf16 rounding does not.
"""
from __future__ import annotations

import pytest
import torch

from m4oe_adapters.runtime import autocast, available_devices
from m4oe_adapters.segmenters import build_segmenter
from m4oe_adapters.training import TrainConfig, train

from conftest import tiny_backbone, tiny_model

DEVICES = available_devices()
LOSS_TOLERANCE = 0.01
GRADIENT_TOLERANCE = 0.03
ROUTING_CASES = {
    "hard": dict(modality="CT"),
    "mixed_batch": dict(modality=["CT", "MRI", "MRI", "CT"]),
    "soft": dict(modality=["CT", "MRI", "MRI", "CT"], routing="soft"),
    "soft_modality_free": dict(routing="soft"),
}


def images(device="cpu", batch=4):
    return torch.randn(batch, 1, 64, 64, generator=torch.Generator().manual_seed(1)).to(device)


def loss_and_gradients(precision: str, case: dict, device: str = "cpu"):
    """One forward + backward of the tiny two-modality model; the loss and the gradients of the experts and of
    the decoders, each flattened into one fp32 vector."""
    model = tiny_model().to(device).train()
    x = images(device)
    target = (x[:, 0] > 0).long()
    with autocast(device, precision):
        logits = model(x, **case)
    loss = torch.nn.functional.cross_entropy(logits.float()[:, :2], target)
    loss.backward()
    groups = {"experts": [], "decoders": []}
    for name, parameter in model.named_parameters():
        if parameter.grad is None:
            continue
        assert parameter.grad.dtype == torch.float32, f"{name}: gradient in {parameter.grad.dtype}"
        group = "experts" if ".lora_" in name else "decoders" if name.startswith("decoders.") else None
        if group:
            groups[group].append(parameter.grad.flatten())
    return loss.item(), {name: torch.cat(grads) for name, grads in groups.items() if grads}, logits


@pytest.mark.parametrize("case", list(ROUTING_CASES))
def test_bf16_autocast_training_matches_fp32_in_every_routing_mode(case):
    loss32, grads32, logits32 = loss_and_gradients("32", ROUTING_CASES[case])
    loss16, grads16, logits16 = loss_and_gradients("bf16", ROUTING_CASES[case])
    assert logits16.dtype == torch.bfloat16 and logits32.dtype == torch.float32  # autocast really ran
    assert abs(loss16 - loss32) <= LOSS_TOLERANCE * abs(loss32)
    assert set(grads16) == set(grads32) == {"experts", "decoders"}
    for group, reference in grads32.items():
        assert reference.norm() > 0
        error = (grads16[group] - reference).norm() / reference.norm()
        assert error <= GRADIENT_TOLERANCE, f"{case}: {group} gradients differ by {error:.4f} (relative)"


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_autocast_inference_matches_fp32_merged_and_unmerged(precision):
    model = tiny_model()
    x = images()
    with torch.no_grad():
        reference = model(x, "MRI")
        with autocast("cpu", precision):
            unmerged = model(x, "MRI")
        model.merge("MRI")
        with autocast("cpu", precision):
            merged = model(x, "MRI")
    scale = reference.abs().max()
    for output in (unmerged, merged):
        assert output.dtype != torch.float32
        assert (output.float() - reference).abs().max() <= 0.05 * scale


def test_fp16_training_uses_a_gradient_scaler_and_learns_like_fp32(tmp_path):
    from test_training import Discs

    losses = {}
    for precision in ("32", "16"):
        segmenter = build_segmenter("experts", lambda: tiny_backbone(), "disc", 2, in_chans=1, seed=0)
        config = TrainConfig(steps=3, batch_size=2, lr=3e-3, val_every=0, seed=0, precision=precision,
                             checkpoint_every=3, log_every=1)
        result = train(segmenter, Discs(4, 0), None, 2, config, out_dir=tmp_path / precision, progress=False)
        losses[precision] = [row["loss"] for row in result.history]
    checkpoint = torch.load(tmp_path / "16" / "checkpoint.pt", weights_only=True)
    assert checkpoint["scaler"]["scale"] > 1  # the loss was scaled (resume continues with this scale)
    assert "scaler" not in torch.load(tmp_path / "32" / "checkpoint.pt", weights_only=True)
    assert len(losses["16"]) == len(losses["32"]) == 3
    for fp16, fp32 in zip(losses["16"], losses["32"]):
        assert abs(fp16 - fp32) <= 0.02 * abs(fp32)


def test_an_unknown_precision_or_unavailable_device_is_a_config_error():
    from m4oe_adapters import ConfigError
    from m4oe_adapters.runtime import resolve_device

    with pytest.raises(ConfigError, match="precision"):
        train(None, [1], None, 2, TrainConfig(precision="8"), progress=False)
    with pytest.raises(ConfigError, match="--device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            resolve_device("cuda")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_baseline_segmenter_builds_its_decoder_where_its_backbone_lives(mode):
    """``BackboneSegmenter`` on a backbone already moved (here to float64; on a GPU machine to CUDA, where the
    benchmark's LoRA baseline failed with "Input type (torch.cuda.FloatTensor) and weight type
    (torch.FloatTensor)"): the decoder follows the backbone, so the first forward runs."""
    from m4oe_adapters.config import DecoderConfig, ExpertConfig
    from m4oe_adapters.segmenters import BackboneSegmenter

    from conftest import tiny_backbone

    segmenter = BackboneSegmenter(tiny_backbone().double(), 2, mode, ExpertConfig(rank=4), DecoderConfig())
    assert {p.dtype for p in segmenter.decoder.parameters()} == {torch.float64}
    assert segmenter(torch.randn(1, 1, 64, 64, dtype=torch.float64)).dtype == torch.float64


@pytest.fixture
def exact_float32():
    """fp32 matmuls and convolutions in full fp32 on CUDA: cuDNN takes TF32 for convolutions by default, which
    moves a tiny model's logits by ~1e-3 against the CPU's (seen on an H200), far beyond what a device move may."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("device", DEVICES)
def test_a_model_moved_to_a_device_gives_the_same_segmentation_in_every_routing_mode(device, exact_float32):
    model = tiny_model()
    x = images()
    cases = {"hard": dict(modality="CT"), "mixed": dict(modality=["CT", "MRI", "MRI", "CT"]),
             "soft": dict(modality="CT", routing="soft")}
    with torch.no_grad():
        reference = {name: model(x, **case) for name, case in cases.items()}  # also fills the stack cache on CPU
        model.to(device)
        for name, case in cases.items():
            moved = model(x.to(device), **case)
            assert moved.device.type == torch.device(device).type
            torch.testing.assert_close(moved.cpu(), reference[name], atol=1e-4, rtol=1e-4)
        model.add_modality("xray", 2, seed=7)  # a modality added after the move lives on the device too
        assert all(p.device.type == torch.device(device).type for p in model.modality_parameters("xray"))
        model.merge("MRI")
        model.to("cpu")
        model.unmerge()  # the saved pre-merge weights moved with the model
    assert model.backbone.fingerprint(recompute=True) == tiny_model().backbone.fingerprint()


def test_after_double_every_routing_mode_computes_in_float64():
    model = tiny_model()
    x = images()
    names = ["CT", "MRI", "MRI", "CT"]
    with torch.no_grad():
        model(x, names)  # caches the expert stacks in float32
        model.double()
        mixed = model(x.double(), names)
        assert mixed.dtype == torch.float64
        for index, name in enumerate(names):  # a sample alone takes the uncached single-expert path
            alone = model(x[index : index + 1].double(), name)
            # float64 agreement: float32 stacks left in the cache would differ by about 1e-7
            torch.testing.assert_close(mixed[index, : alone.shape[1]], alone[0], atol=1e-12, rtol=1e-12)
        model.add_modality("xray", 2, seed=7)
        assert {p.dtype for p in model.modality_parameters("xray")} == {torch.float64}
